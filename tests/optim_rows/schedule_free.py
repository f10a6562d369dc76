"""Rows of the Schedule-Free family: SF-SGD, SF-AdamW, the wrapper around torch SGD, and SF-Prodigy.

The downhill test evaluates at the optimizer's evaluation point (``evaluation_point()``: x).
"""

import torch

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, Polyak, ScheduleFree, ScheduleFreeAdamW, ScheduleFreeProdigy, ScheduleFreeSGD


def _wrapped_sgd(params, lr=0.1, **kwargs):
    """ScheduleFree around torch SGD without momentum (the interpolation provides it)."""
    return ScheduleFree(torch.optim.SGD(params, lr=lr, momentum=0.0), **kwargs)


def _wrapped_polyak(params, lr=1.0, **kwargs):
    """ScheduleFree around Polyak (a loss-based base: the wrapper needs the loss too)."""
    return ScheduleFree(Polyak(params, lr=lr, max_step=1.0), **kwargs)


ROWS = [
    OptimizerInfo(
        ScheduleFreeSGD,
        kwargs=dict(lr=0.5),
        extra_kwargs=[dict(lr=0.5, weight_decay=0.01, warmup_steps=3), dict(lr=0.5, momentum=0.5, r=1.0, weight_lr_power=0.0)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                       r"^ScheduleFreeSGD: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
            ErrorInput(dict(momentum=1.0), InvalidArgumentError,
                       r"^ScheduleFreeSGD: momentum = 1.0 is invalid; allowed: 0 < momentum and momentum < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(momentum=0.0), InvalidArgumentError, r"^ScheduleFreeSGD: momentum = 0.0 is invalid"),
            ErrorInput(dict(warmup_steps=2.5), InvalidArgumentError,
                       r"^ScheduleFreeSGD: warmup_steps = 2.5 is invalid; allowed: an integer with 0 <= warmup_steps \(recommended: 0\)$"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError,
                       r"^ScheduleFreeSGD: weight_decay = -0.1 is invalid; allowed: 0 <= weight_decay$"),
        ],
        misspelt="momentun",
        tensor_lr_exact=False,  # a tensor lr: tensor operands where a number lr takes alpha= (1e-12)
        id="ScheduleFreeSGD",
    ),
    OptimizerInfo(
        ScheduleFreeAdamW,
        kwargs=dict(lr=0.05),
        extra_kwargs=[dict(lr=0.05, weight_decay=0.01, warmup_steps=3), dict(lr=0.05, betas=(0.5, 0.99), r=0.5)],
        error_inputs=[
            ErrorInput(dict(betas=(1.0, 0.999)), InvalidArgumentError,
                       r"^ScheduleFreeAdamW: betas\[0\] = 1.0 is invalid; allowed: 0 < betas\[0\] and betas\[0\] < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(betas=(0.0, 0.999)), InvalidArgumentError,
                       r"^ScheduleFreeAdamW: betas\[0\] = 0.0 is invalid; allowed: 0 < betas\[0\] and betas\[0\] < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError,
                       r"^ScheduleFreeAdamW: betas\[1\] = 1.0 is invalid; allowed: 0 <= betas\[1\] and betas\[1\] < 1 \(recommended: 0.999\)$"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError,
                       r"^ScheduleFreeAdamW: eps = 0.0 is invalid; allowed: 0 < eps \(recommended: 1e-08\)$"),
            ErrorInput(dict(weight_lr_power=-1.0), InvalidArgumentError,
                       r"^ScheduleFreeAdamW: weight_lr_power = -1.0 is invalid; allowed: 0 <= weight_lr_power \(recommended: 2.0\)$"),
        ],
        misspelt="weight_decy",
        tensor_lr_exact=False,  # a tensor lr: tensor operands where a number lr takes alpha= (1e-12)
        id="ScheduleFreeAdamW",
    ),
    OptimizerInfo(
        ScheduleFree,
        kwargs=dict(momentum=0.9),
        extra_kwargs=[dict(momentum=0.9, weight_decay_at_y=0.01), dict(momentum=0.5, r=1.0)],
        error_inputs=[
            ErrorInput(dict(momentum=1.5), InvalidArgumentError,
                       r"^ScheduleFree: momentum = 1.5 is invalid; allowed: 0 < momentum and momentum < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(weight_decay_at_y=-1.0), InvalidArgumentError,
                       r"^ScheduleFree: weight_decay_at_y = -1.0 is invalid; allowed: 0 <= weight_decay_at_y$"),
            ErrorInput(dict(foreach="yes"), InvalidArgumentError,
                       r"^ScheduleFree: foreach = 'yes' is invalid; allowed: True or False$"),
        ],
        factory=_wrapped_sgd,
        misspelt="weight_decay_at",
        id="ScheduleFree(torch.optim.SGD)",
    ),
    OptimizerInfo(
        ScheduleFreeProdigy,
        kwargs=dict(),
        extra_kwargs=[dict(weight_decay=0.01), dict(betas=(0.5, 0.99), weight_lr_power=0.0)],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                       r"^ScheduleFreeProdigy: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
            ErrorInput(dict(betas=(1.0, 0.999)), InvalidArgumentError,
                       r"^ScheduleFreeProdigy: betas\[0\] = 1.0 is invalid; allowed: 0 < betas\[0\] and betas\[0\] < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(betas=(0.0, 0.999)), InvalidArgumentError,
                       r"^ScheduleFreeProdigy: betas\[0\] = 0.0 is invalid; allowed: 0 < betas\[0\] and betas\[0\] < 1 \(recommended: 0.9\)$"),
        ],
        misspelt="d_0",
        downhill_steps=40,
        # The wrapper's two paths agree exactly; Prodigy's own two paths differ by ~7e-8 after 12
        # steps with betas[0] = 0 (near-zero gradients under sqrt(v) + d eps), measured.
        foreach_rtol=1e-6,
        id="ScheduleFreeProdigy",
    ),
    OptimizerInfo(
        ScheduleFree,
        kwargs=dict(momentum=0.9),
        extra_kwargs=[dict(momentum=0.5, weight_decay_at_y=0.01)],
        factory=_wrapped_polyak,
        error_inputs=[
            ErrorInput(dict(r=-1.0), InvalidArgumentError, r"^ScheduleFree: r = -1.0 is invalid"),
        ],
        misspelt="momentun",
        loss_based=True,
        id="ScheduleFree(Polyak)",
    ),
]
