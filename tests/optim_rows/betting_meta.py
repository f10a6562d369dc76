"""Rows of the betting and meta-adaptation families: COCOB, Mechanic, hypergradient descent."""

import torch

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import COCOB, SGDHD, AdamHD, InvalidArgumentError, Mechanic, Polyak


def mechanic_over_sgd(params, lr=1.0, **kwargs):
    return Mechanic(torch.optim.SGD(params, lr=lr, momentum=0.9), **kwargs)


def mechanic_over_adam(params, lr=1.0, **kwargs):
    # fused: torch's other CPU Adam paths read their step counter with .item() (a CPU tensor,
    # so no device sync, but the contract's counter counts it)
    return Mechanic(torch.optim.Adam(params, lr=lr, fused=True), **kwargs)


def mechanic_over_polyak(params, lr=1.0, **kwargs):
    """A loss-based base: Mechanic passes the loss on, so it needs it too."""
    return Mechanic(Polyak(params, lr=lr, max_step=1.0), **kwargs)


ROWS = [
    OptimizerInfo(
        COCOB,
        kwargs=dict(alpha=100.0),
        extra_kwargs=[dict(weight_decay=0.01), dict(alpha=10.0, lr=0.5)],
        error_inputs=[
            ErrorInput(dict(alpha=0.0), InvalidArgumentError,
                       r"COCOB: alpha = 0.0 is invalid; allowed: 0 < alpha \(recommended: 100.0\)"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"COCOB: eps = 0.0 is invalid; allowed: 0 < eps"),
            ErrorInput(dict(lr=-1.0), InvalidArgumentError, r"COCOB: lr = -1.0 is invalid; allowed: 0 <= lr"),
            ErrorInput(dict(weight_decay=-0.1), InvalidArgumentError, r"weight_decay = -0.1 is invalid"),
        ],
        misspelt="alpah",
        global_step_size=False,
    ),
    OptimizerInfo(
        Mechanic,
        factory=mechanic_over_sgd,
        extra_kwargs=[dict(s_decay=0.0), dict(betas=(0.9, 0.999), s_init=1e-6)],
        error_inputs=[
            ErrorInput(dict(s_decay=-0.1), InvalidArgumentError,
                       r"Mechanic: s_decay = -0.1 is invalid; allowed: 0 <= s_decay \(recommended: 0.01\)"),
            ErrorInput(dict(betas=()), InvalidArgumentError,
                       r"Mechanic: betas = \(\) is invalid; allowed: a non-empty tuple of numbers in \[0, 1\)"),
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError, r"Mechanic: betas\[1\] = 1.0 is invalid"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"Mechanic: eps = 0.0 is invalid; allowed: 0 < eps"),
            ErrorInput(dict(base="sgd"), InvalidArgumentError,
                       r"Mechanic: base = 'sgd' is invalid; allowed: None when an optimizer is given"),
        ],
        misspelt="s_dacay",
        id="Mechanic-SGD",
    ),
    OptimizerInfo(
        Mechanic,
        factory=mechanic_over_adam,
        kwargs=dict(reuse_buffer=False),  # the other placement of the copy of x_t (per step)
        error_inputs=[
            ErrorInput(dict(s_init=0.0), InvalidArgumentError,
                       r"Mechanic: s_init = 0.0 is invalid; allowed: 0 < s_init \(recommended: 1e-08\)"),
            ErrorInput(dict(reuse_buffer="yes"), InvalidArgumentError,
                       r"Mechanic: reuse_buffer = 'yes' is invalid; allowed: True or False"),
        ],
        misspelt="s_ini",
        id="Mechanic-Adam",
    ),
    OptimizerInfo(
        Mechanic,
        factory=mechanic_over_polyak,
        error_inputs=[
            ErrorInput(dict(s_decay=float("nan")), InvalidArgumentError, r"^Mechanic: s_decay = nan is invalid"),
        ],
        misspelt="s_dacay",
        loss_based=True,
        statistics_collectives=2,  # Mechanic's four statistics (before the base step), then Polyak's ||g||^2
        # (the loss is averaged first: Mechanic's non-finite decision takes the ranks' mean)
        id="Mechanic-Polyak",
    ),
    OptimizerInfo(
        SGDHD,
        kwargs=dict(init_lr=0.01, hypergrad_lr=0.01),
        extra_kwargs=[dict(init_lr=0.01, hypergrad_lr=0.01, momentum=0.9),
                      dict(init_lr=0.01, hypergrad_lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)],
        error_inputs=[
            ErrorInput(dict(init_lr=-1.0), InvalidArgumentError,
                       r"SGDHD: init_lr = -1.0 is invalid; allowed: 0 <= init_lr \(recommended: 0.001\)"),
            ErrorInput(dict(hypergrad_lr=-1e-3), InvalidArgumentError, r"SGDHD: hypergrad_lr = -0.001 is invalid"),
            ErrorInput(dict(nesterov=True), InvalidArgumentError,
                       r"SGDHD: nesterov = True is invalid; allowed: False when momentum = 0"),
            ErrorInput(dict(momentum=1.0), InvalidArgumentError, r"SGDHD: momentum = 1.0 is invalid"),
        ],
        misspelt="hypergrad_rl",
    ),
    OptimizerInfo(
        AdamHD,
        kwargs=dict(init_lr=0.01, hypergrad_lr=1e-4),
        extra_kwargs=[dict(init_lr=0.01, hypergrad_lr=1e-4, weight_decay=0.01, betas=(0.8, 0.99))],
        error_inputs=[
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError, r"AdamHD: betas\[1\] = 1.0 is invalid"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"AdamHD: eps = 0.0 is invalid"),
            ErrorInput(dict(hypergrad_lr=float("nan")), InvalidArgumentError, r"AdamHD: hypergrad_lr = nan is invalid"),
        ],
        misspelt="init_rl",
    ),
]
