"""Rows of the default optimizer, Tuneless."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, Tuneless

ROWS = [
    OptimizerInfo(
        Tuneless,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(betas=(0.8, 0.99), lower_bound=-1.0)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError, r"Tuneless: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)"),
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError, r"Tuneless: betas\[1\] = 1.0 is invalid"),
            ErrorInput(dict(betas=0.9), InvalidArgumentError, r"Tuneless: betas = 0.9 is invalid"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError, r"weight_decay = -0.1 is invalid"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"eps = 0.0 is invalid"),
            ErrorInput(dict(lower_bound=float("nan")), InvalidArgumentError, r"lower_bound = nan is invalid"),
        ],
        misspelt="weight_decy",
    ),
]
