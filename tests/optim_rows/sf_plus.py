"""Row of ScheduleFree+ (``sf_plus``). The downhill test evaluates at its evaluation point (x)."""

from tests.optim_db import ErrorInput, OptimizerInfo
from tuneless import InvalidArgumentError, ScheduleFreePlus

ROWS = [
    OptimizerInfo(
        ScheduleFreePlus,
        kwargs=dict(),
        extra_kwargs=[
            dict(weight_decay=0.5, polyak_beta=0.9, r=2.0),  # lr_k ~ 1 on this model: 20 would flip z
            dict(sf_beta1_anneal_steps=5, c_warmup=2, betas=(0.8, 0.99), weight_lr_power=1.0),
        ],
        error_inputs=[
            ErrorInput(dict(lr=-1.0), InvalidArgumentError,
                       r"^ScheduleFreePlus: lr = -1.0 is invalid; allowed: 0 <= lr \(recommended: 1.0\)$"),
            ErrorInput(dict(sf_beta1=0.0), InvalidArgumentError,
                       r"^ScheduleFreePlus: sf_beta1 = 0.0 is invalid; allowed: 0 < sf_beta1 and sf_beta1 < 1 \(recommended: 0.9\)$"),
            ErrorInput(dict(betas=(0.9, 1.0)), InvalidArgumentError,
                       r"^ScheduleFreePlus: betas\[1\] = 1.0 is invalid; allowed: 0 <= betas\[1\] and betas\[1\] < 1 \(recommended: 0.95\)$"),
            ErrorInput(dict(polyak_beta=1.0), InvalidArgumentError,
                       r"^ScheduleFreePlus: polyak_beta = 1.0 is invalid; allowed: 0 <= polyak_beta and polyak_beta < 1 \(recommended: 0.0\)$"),
            ErrorInput(dict(c_warmup=1.5), InvalidArgumentError,
                       r"^ScheduleFreePlus: c_warmup = 1.5 is invalid; allowed: an integer with 0 <= c_warmup \(recommended: 0\)$"),
            ErrorInput(dict(sf_beta1_anneal_steps=-1), InvalidArgumentError,
                       r"^ScheduleFreePlus: sf_beta1_anneal_steps = -1 is invalid"),
            ErrorInput(dict(sf_beta1_max=1.0), InvalidArgumentError, r"^ScheduleFreePlus: sf_beta1_max = 1.0 is invalid"),
            ErrorInput(dict(weight_decay=-1.0), InvalidArgumentError, r"^ScheduleFreePlus: weight_decay = -1.0 is invalid"),
            ErrorInput(dict(eps=0.0), InvalidArgumentError, r"^ScheduleFreePlus: eps = 0.0 is invalid"),
            ErrorInput(dict(foreach="yes"), InvalidArgumentError,
                       r"^ScheduleFreePlus: foreach = 'yes' is invalid; allowed: True or False$"),
        ],
        misspelt="sf_beta",
    ),
]
