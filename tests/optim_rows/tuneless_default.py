"""Rows of the default optimizer, Tuneless."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, Tuneless

ROWS = [
    OptimizerInfo(
        Tuneless,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(lower_bound=-1.0)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError, r"Tuneless: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError, r"weight_decay = -0.1 is invalid"),
            ErrorInput(dict(lower_bound=float("nan")), InvalidArgumentError, r"^Tuneless: lower_bound = nan is invalid"),
        ],
        misspelt="weight_decy",
    ),
]
