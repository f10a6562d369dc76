"""Row of MoMo-Adam (the anchor ``momo_adam``)."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, MomoAdam

ROWS = [
    OptimizerInfo(
        MomoAdam,
        # A cap this large leaves the Polyak step in charge, so that the loss matters (with the
        # default 1e-2 the cap binds at every step of the short tests: the loss is not used).
        kwargs=dict(cap=1.0),
        extra_kwargs=[
            dict(cap=1e-2),  # the default
            dict(cap=1.0, weight_decay=0.01),
            dict(cap=0.5, estimate_lower_bound=True, lower_bound=-1.0, betas=(0.8, 0.99)),
        ],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                       r"^MomoAdam: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
            ErrorInput(dict(cap=0.0), InvalidArgumentError,
                       r"^MomoAdam: cap = 0.0 is invalid; allowed: 0 < cap \(recommended: 0.01\)$"),
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError,
                       r"^MomoAdam: betas\[1\] = 1.0 is invalid; allowed: 0 <= betas\[1\] and betas\[1\] < 1 \(recommended: 0.999\)$"),
            ErrorInput(dict(betas=0.9), InvalidArgumentError, r"^MomoAdam: betas = 0.9 is invalid"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"^MomoAdam: eps = 0.0 is invalid; allowed: 0 < eps"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError, r"^MomoAdam: weight_decay = -0.1 is invalid"),
            ErrorInput(dict(lower_bound=float("nan")), InvalidArgumentError, r"^MomoAdam: lower_bound = nan is invalid"),
            ErrorInput(dict(estimate_lower_bound=1), InvalidArgumentError,
                       r"^MomoAdam: estimate_lower_bound = 1 is invalid; allowed: True or False$"),
        ],
        misspelt="lowerbound",
        lr_is_multiplier=False,  # lr multiplies the cap, which binds only when the Polyak step is larger
    ),
]
