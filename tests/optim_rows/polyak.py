"""Rows of the Polyak family."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import SPS, InvalidArgumentError, Momo, MomoStar, Polyak, SPSMax

ROWS = [
    OptimizerInfo(
        Polyak,
        kwargs=dict(f_star=0.0),
        extra_kwargs=[dict(f_star=0.0, max_step=0.5)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError, r"Polyak: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)"),
            ErrorInput(dict(max_step=0.0), InvalidArgumentError, r"max_step = 0.0 is invalid; allowed: 0 < max_step"),
            ErrorInput(dict(f_star=float("nan")), InvalidArgumentError, r"f_star = nan is invalid"),
        ],
        misspelt="fstar",
    ),
    OptimizerInfo(
        SPS,
        kwargs=dict(c=0.5),
        error_inputs=[
            ErrorInput(dict(c=0.0), InvalidArgumentError, r"SPS: c = 0.0 is invalid; allowed: 0 < c \(recommended: 0.5\)"),
        ],
        misspelt="f_sta",
    ),
    OptimizerInfo(
        SPSMax,
        kwargs=dict(max_step=1.0),
        error_inputs=[
            ErrorInput(dict(max_step=None), InvalidArgumentError, r"SPSMax: max_step = None is invalid"),
            ErrorInput(dict(max_step=-2.0), InvalidArgumentError, r"max_step = -2.0 is invalid"),
        ],
        misspelt="maxstep",
    ),
    OptimizerInfo(
        Momo,
        kwargs=dict(beta=0.9),
        extra_kwargs=[dict(estimate_lower_bound=True), dict(weight_decay=0.01, estimate_lower_bound=True)],
        error_inputs=[
            ErrorInput(dict(beta=1.0), InvalidArgumentError, r"Momo: beta = 1.0 is invalid; allowed: 0 <= beta and beta < 1"),
            ErrorInput(dict(estimate_lower_bound=1), InvalidArgumentError, r"estimate_lower_bound = 1 is invalid; allowed: True or False"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError, r"weight_decay = -0.1 is invalid"),
        ],
        misspelt="weight_decy",
        lr_is_multiplier=False,  # lr caps the step size (min(lr, Polyak-type step))
    ),
    OptimizerInfo(
        MomoStar,
        kwargs=dict(),
        extra_kwargs=[dict(beta=0.0, lower_bound=-1.0)],
        error_inputs=[
            ErrorInput(dict(lr=float("inf")), InvalidArgumentError, r"MomoStar: lr = inf is invalid"),
        ],
        misspelt="lowerbound",
        lr_is_multiplier=False,
    ),
]
