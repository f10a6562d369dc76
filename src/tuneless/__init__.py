"""tuneless: training without choosing a learning rate.

Learning-rate-free optimizers as drop-in ``torch.optim.Optimizer``s, a benchmark against an
oracle-tuned baseline, and the Rosenbrock race. Re-exports only.
"""

from .errors import (InvalidArgumentError, LossRequiredError, SparseGradientError, SpecError,
                     UnknownArgumentError, UnknownNameError, WrongModeError)
from .optim import DoG, DoWG, LDoG
from .optim import COCOB, SGDHD, AdamHD, Mechanic
from .optim import OPTIMIZERS, STEP_SIZE_KEY, SPS, Momo, MomoStar, Polyak, SPSMax, TunelessOptimizer, effective_lrs
from .optim import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD
from .optim import Prodigy, Tuneless
from .optim import MomoAdam, ScheduleFreePlus
from .optim import (ScheduleFree, ScheduleFreeAdamW, ScheduleFreeProdigy, ScheduleFreeSGD,
                    recompute_batchnorm_statistics)
from .registry import available, available_schedulers, create, create_scheduler, learning_rate_free
from .schedules import LossProportionalLR

__version__ = "0.1.0"

__all__ = [
    "Tuneless",
    "TunelessOptimizer", "STEP_SIZE_KEY", "effective_lrs", "OPTIMIZERS",
    "Polyak", "SPS", "SPSMax", "Momo", "MomoStar", "MomoAdam",
    "DoG", "LDoG", "DoWG",
    "DAdaptSGD", "DAdaptAdam", "DAdaptAdaGrad",
    "Prodigy",
    "COCOB", "Mechanic", "SGDHD", "AdamHD",
    "ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreeProdigy", "ScheduleFreePlus", "ScheduleFree", "recompute_batchnorm_statistics",
    "LossProportionalLR",
    "create", "available", "learning_rate_free", "create_scheduler", "available_schedulers",
    "InvalidArgumentError", "UnknownArgumentError", "UnknownNameError", "SpecError",
    "LossRequiredError", "SparseGradientError", "WrongModeError",
]
