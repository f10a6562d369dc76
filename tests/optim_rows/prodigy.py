"""Rows of Prodigy (Mishchenko & Defazio, 2024)."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, Prodigy

_ERRORS = [
    ErrorInput(dict(lr=-1.0), InvalidArgumentError,
               r"^Prodigy: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
    ErrorInput(dict(d0=0.0), InvalidArgumentError,
               r"^Prodigy: d0 = 0.0 is invalid; allowed: 0 < d0 \(recommended: 1e-06\)$"),
    ErrorInput(dict(d_coef=-1.0), InvalidArgumentError,
               r"^Prodigy: d_coef = -1.0 is invalid; allowed: 0 < d_coef \(recommended: 1.0\)$"),
    ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError,
               r"^Prodigy: betas\[1\] = 1.0 is invalid; allowed: 0 <= betas\[1\] and betas\[1\] < 1 \(recommended: 0.999\)$"),
    ErrorInput(dict(betas=(0.9,)), InvalidArgumentError,
               r"^Prodigy: betas = \(0.9,\) is invalid; allowed: a tuple of 2 numbers in \[0, 1\) \(recommended: \(0.9, 0.999\)\)$"),
    ErrorInput(dict(beta3=1.0), InvalidArgumentError,
               r"^Prodigy: beta3 = 1.0 is invalid; allowed: 0 <= beta3 and beta3 < 1$"),
    ErrorInput(dict(eps=0.0), InvalidArgumentError,
               r"^Prodigy: eps = 0.0 is invalid; allowed: 0 < eps \(recommended: 1e-08\)$"),
    ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError,
               r"^Prodigy: weight_decay = -0.1 is invalid; allowed: 0 <= weight_decay \(recommended: 0.0\)$"),
    ErrorInput(dict(growth_rate=0.5), InvalidArgumentError,
               r"^Prodigy: growth_rate = 0.5 is invalid; allowed: 1 <= growth_rate \(inf: no limit\) \(recommended: inf\)$"),
    ErrorInput(dict(slice_p=0), InvalidArgumentError,
               r"^Prodigy: slice_p = 0 is invalid; allowed: an integer with 1 <= slice_p \(recommended: 1\)$"),
    ErrorInput(dict(slice_p=2.5), InvalidArgumentError,
               r"^Prodigy: slice_p = 2.5 is invalid; allowed: an integer with 1 <= slice_p \(recommended: 1\)$"),
    ErrorInput(dict(decouple=1), InvalidArgumentError,
               r"^Prodigy: decouple = 1 is invalid; allowed: True or False$"),
    ErrorInput(dict(safeguard_warmup="yes"), InvalidArgumentError,
               r"^Prodigy: safeguard_warmup = 'yes' is invalid; allowed: True or False$"),
]

ROWS = [
    OptimizerInfo(Prodigy, kwargs={}, error_inputs=_ERRORS, misspelt="weight_decy"),
    OptimizerInfo(
        Prodigy,
        kwargs=dict(safeguard_warmup=True, use_bias_correction=True),
        error_inputs=_ERRORS[:2],
        misspelt="safeguard_warmpu",
        id="Prodigy-safeguard-bias_correction",
    ),
    OptimizerInfo(
        Prodigy,
        kwargs=dict(slice_p=3),
        extra_kwargs=[dict(slice_p=2, betas=(0.0, 0.999))],
        error_inputs=_ERRORS[-4:],
        misspelt="slicep",
        id="Prodigy-slice_p",
    ),
    OptimizerInfo(
        Prodigy,
        kwargs=dict(weight_decay=0.1, decouple=False),
        extra_kwargs=[dict(weight_decay=0.1, growth_rate=1.05, d_coef=0.5)],
        error_inputs=_ERRORS[7:9],
        misspelt="decoupled",
        id="Prodigy-coupled_weight_decay",
    ),
]
