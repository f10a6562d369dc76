"""Rows of the DoG family: DoG, L-DoG (Ivgi et al., 2023) and DoWG (Khaled et al., 2023)."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import DoG, DoWG, InvalidArgumentError, LDoG

ROWS = [
    OptimizerInfo(
        DoG,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(init_eta=1e-3), dict(reps_rel=1e-4, eps=0.0)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                       r"^DoG: lr = -1\.0 is invalid; allowed: 0 <= lr \(recommended: 1\.0\)$"),
            ErrorInput(dict(reps_rel=0.0), InvalidArgumentError,
                       r"^DoG: reps_rel = 0\.0 is invalid; allowed: 0 < reps_rel \(recommended: 1e-06\)$"),
            ErrorInput(dict(eps=-1e-8), InvalidArgumentError,
                       r"^DoG: eps = -1e-08 is invalid; allowed: 0 <= eps \(recommended: 1e-08\)$"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError,
                       r"^DoG: weight_decay = -0\.1 is invalid; allowed: 0 <= weight_decay \(recommended: 0\.0\)$"),
            ErrorInput(dict(init_eta=0.0), InvalidArgumentError,
                       r"^DoG: init_eta = 0\.0 is invalid; allowed: 0 < init_eta$"),
            ErrorInput(dict(reps_rel=float("nan")), InvalidArgumentError, r"^DoG: reps_rel = nan is invalid"),
        ],
        misspelt="reps_rell",
        downhill_steps=40,
    ),
    OptimizerInfo(
        LDoG,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(init_eta=1e-3)],
        error_inputs=[
            ErrorInput(dict(reps_rel=-1e-6), InvalidArgumentError,
                       r"^LDoG: reps_rel = -1e-06 is invalid; allowed: 0 < reps_rel \(recommended: 1e-06\)$"),
            ErrorInput(dict(lr=float("inf")), InvalidArgumentError,
                       r"^LDoG: lr = inf is invalid; allowed: 0 <= lr \(finite\) \(recommended: 1\.0\)$"),
            ErrorInput(dict(init_eta=-1.0), InvalidArgumentError,
                       r"^LDoG: init_eta = -1\.0 is invalid; allowed: 0 < init_eta$"),
        ],
        misspelt="weight_decy",
        global_step_size=False,  # one step size per tensor
        downhill_steps=40,
    ),
    OptimizerInfo(
        DoWG,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(eps=1e-6)],
        error_inputs=[
            ErrorInput(dict(eps=0.0), InvalidArgumentError,
                       r"^DoWG: eps = 0\.0 is invalid; allowed: 0 < eps \(recommended: 0\.0001\)$"),
            ErrorInput(dict(lr=-0.5), InvalidArgumentError,
                       r"^DoWG: lr = -0\.5 is invalid; allowed: 0 <= lr \(recommended: 1\.0\)$"),
            ErrorInput(dict(weight_decay=True), InvalidArgumentError,
                       r"^DoWG: weight_decay = True is invalid; allowed: 0 <= weight_decay \(recommended: 0\.0\)$"),
        ],
        misspelt="epsilon",
    ),
]
