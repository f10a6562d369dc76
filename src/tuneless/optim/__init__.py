"""tuneless optimizers. :data:`OPTIMIZERS` is the single source the registry is built from."""

from .base import STEP_SIZE_KEY, TunelessOptimizer, effective_lrs
from .polyak import SPS, Momo, MomoStar, Polyak, SPSMax

#: Every tuneless optimizer class, in the order listed by ``tuneless list``.
OPTIMIZERS: tuple[type[TunelessOptimizer], ...] = (Polyak, SPS, SPSMax, Momo, MomoStar)

__all__ = ["TunelessOptimizer", "STEP_SIZE_KEY", "effective_lrs", "OPTIMIZERS",
           "Polyak", "SPS", "SPSMax", "Momo", "MomoStar"]
