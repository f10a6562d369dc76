"""tuneless optimizers. :data:`OPTIMIZERS` is the single source the registry is built from."""

from .base import STEP_SIZE_KEY, TunelessOptimizer, effective_lrs
from .cocob import COCOB
from .default import Tuneless
from .dadapt import DAdaptAdaGrad, DAdaptAdam, DAdaptSGD
from .dog import DoG, DoWG, LDoG
from .hypergradient import SGDHD, AdamHD
from .mechanic import Mechanic
from .momo_adam import MomoAdam
from .polyak import SPS, Momo, MomoStar, Polyak, SPSMax
from .prodigy import Prodigy
from .schedule_free_plus import ScheduleFreePlus
from .schedule_free import (ScheduleFree, ScheduleFreeAdamW, ScheduleFreeProdigy, ScheduleFreeSGD,
                            recompute_batchnorm_statistics)

#: Every tuneless optimizer class, in the order listed by ``tuneless list``.
OPTIMIZERS: tuple[type[TunelessOptimizer], ...] = (Tuneless, Polyak, SPS, SPSMax, Momo, MomoStar, MomoAdam, DAdaptSGD, DAdaptAdam, DAdaptAdaGrad, Prodigy, DoG, LDoG, DoWG,
                                                ScheduleFreeSGD, ScheduleFreeAdamW, ScheduleFreeProdigy, ScheduleFreePlus,
                                                COCOB, Mechanic, SGDHD, AdamHD)

__all__ = ["TunelessOptimizer", "STEP_SIZE_KEY", "effective_lrs", "OPTIMIZERS", "Tuneless",
           "Polyak", "SPS", "SPSMax", "Momo", "MomoStar", "MomoAdam", "DAdaptSGD", "DAdaptAdam", "DAdaptAdaGrad", "Prodigy", "DoG", "LDoG", "DoWG",
           "ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreeProdigy", "ScheduleFreePlus", "ScheduleFree",
           "recompute_batchnorm_statistics", "COCOB", "Mechanic", "SGDHD", "AdamHD"]
