"""Image problems with the parts users' models have: BatchNorm, and a pretrained body to fine-tune.

======================== ================================================================
name                     task
======================== ================================================================
``resnet_digits``        a small residual CNN with BatchNorm on the 8x8 digit images
``finetune_digits``      fine-tuning: a CNN pretrained on digits 0-4 (a fixed recipe,
                         cached on disk) is trained whole on digits 5-9 with a new head
======================== ================================================================

Both read scikit-learn's digits with the train/held-out split of :mod:`.learning` (the same
for every run seed) and report ``loss`` (the full training objective), ``test_loss`` and
``test_accuracy`` on the held-out images; the run seed fixes the initialization (for
fine-tuning, the new head's) and the order of the minibatches.

**BatchNorm and the evaluation point.** ``resnet_digits`` is evaluated like users must
evaluate a BatchNorm model trained with a method that evaluates elsewhere than it trains
(Schedule-Free's averaged point x): :meth:`BatchNormInstance.prepare_evaluation`, called at
the evaluation point just before ``evaluate()``, recomputes every BatchNorm layer's running
statistics at the current parameters from a fixed set of training batches (a cumulative
average, in train mode, without gradients: :func:`tuneless.recompute_batchnorm_statistics`);
``evaluate()`` then runs the model in eval mode and puts it back in train mode. Every method
is scored this way alike, so recalibration is no advantage to one of them.

**The fine-tuning checkpoint** is pretrained once (Adam, fixed learning rate, step count and
seed: :data:`PRETRAIN_RECIPE`, single-threaded so that it is the same bits on every machine
with the same torch) and cached in ``$TUNELESS_CACHE_DIR`` (default ``~/.cache/tuneless``; the
benchmark's sweep points it at its store's folder) under a name holding a hash of the recipe
and the torch version. It is written atomically (a temporary file, then ``os.replace``), so
concurrent workers are safe, and loaded with ``torch.load(weights_only=True)``; a file that
cannot be read back into the model is rebuilt.

Sizes (``size=`` of ``resnet_digits``): ``"small"`` (the default: width 16, one residual block
per stage, 600 steps) and ``"medium"`` (width 32, two blocks per stage, 1500 steps; meant for a
GPU or a larger machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as v
from ..optim.schedule_free import recompute_batchnorm_statistics
from .learning import SPLIT_SEED, Batches, LearningInstance, LearningProblem, _digit_images, _DigitCNN, _l2_penalty

__all__ = ["ResNetDigits", "FinetuneDigits", "BatchNormInstance", "ResNetSize", "RESNET_SIZES", "PRETRAIN_RECIPE",
           "PretrainRecipe", "FINETUNE_CLASSES", "cache_dir", "checkpoint_path", "pretrain", "pretrained_checkpoint"]


# ---------------------------------------------------------------------------- the residual CNN


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a strided 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """A stem (conv-BN-ReLU), a stage at 8x8, a stage at 4x4 with twice the width, global pooling, a head."""

    def __init__(self, width: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stage1 = [_ResidualBlock(width, width, 1) for _ in range(blocks)]
        stage2 = [_ResidualBlock(width, 2 * width, 2)] + [_ResidualBlock(2 * width, 2 * width, 1)
                                                           for _ in range(blocks - 1)]
        self.stages = nn.Sequential(*stage1, *stage2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class BatchNormInstance(LearningInstance):
    """A :class:`LearningInstance` whose model has BatchNorm: statistics recomputed before evaluation.

    :meth:`prepare_evaluation` recomputes the running statistics at the current parameters from
    ``calibration`` (a fixed list of training inputs); :meth:`evaluate` runs in eval mode and
    restores the model's mode afterwards.
    """

    def __init__(self, *args: Any, calibration: list[Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calibration = calibration

    def prepare_evaluation(self) -> None:
        recompute_batchnorm_statistics(self.model, self.calibration)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            return super().evaluate()
        finally:
            self.model.train(was_training)


@dataclass(frozen=True)
class ResNetSize:
    width: int
    blocks: int
    steps: int


RESNET_SIZES: dict[str, ResNetSize] = {
    "small": ResNetSize(width=16, blocks=1, steps=600),
    "medium": ResNetSize(width=32, blocks=2, steps=1500),
}

#: BatchNorm statistics are recomputed from this many training batches of this size (fixed, the first
#: images of the training split, whose order is already a seeded shuffle)
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 128


def _sized_spec(problem: LearningProblem, size: str) -> str:
    kwargs = []
    if size != "small":
        kwargs.append(f"size={size}")
    if problem.batch_size != problem.default_batch_size:
        kwargs.append(f"batch_size={problem.batch_size}")
    return problem.name + (":" + ",".join(kwargs) if kwargs else "")


class ResNetDigits(LearningProblem):
    name = "resnet_digits"
    description = ("small residual CNN with BatchNorm on the 8x8 digit images (BatchNorm statistics "
                   "recomputed at the evaluation point)")
    default_steps = RESNET_SIZES["small"].steps
    l2: ClassVar[float] = 5e-4

    def __init__(self, size: str = "small", batch_size: int | None = None) -> None:
        v.check_choice(self.name, "size", size, tuple(RESNET_SIZES))
        self.size = size
        self.config = RESNET_SIZES[size]
        self.default_steps = self.config.steps
        super().__init__(batch_size)

    def spec(self) -> str:
        return _sized_spec(self, self.size)

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> BatchNormInstance:
        xtr, ytr, xte, yte = _digit_images()
        model = self._init_module(_ResNet(self.config.width, self.config.blocks), self._generator(seed))
        model = model.to(device=device, dtype=dtype).train()
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        x_train = cast(xtr)
        calibration = [x_train[i * CALIBRATION_BATCH_SIZE:(i + 1) * CALIBRATION_BATCH_SIZE]
                       for i in range(CALIBRATION_BATCHES)]
        return BatchNormInstance(model, F.cross_entropy, (x_train, ytr.to(device)), (cast(xte), yte.to(device)),
                                 Batches(len(ytr), self.batch_size, seed), classify=True,
                                 regularizer=_l2_penalty(model, self.l2), calibration=calibration)


# ---------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class PretrainRecipe:
    """How the fine-tuning checkpoint is made; every field is part of the cache key."""

    model: str = "cnn_digits body (conv 1->8, conv 8->16 stride 2, GELU) + linear head"
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    optimizer: str = "adam"
    lr: float = 3e-3
    steps: int = 300
    batch_size: int = 64
    seed: int = 0
    l2: float = 5e-4
    split_seed: int = SPLIT_SEED
    #: bump when the file's contents change meaning
    format: int = 1


PRETRAIN_RECIPE = PretrainRecipe()
#: the fine-tuning task: the other half of the classes (relabelled 0-4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


def cache_dir() -> Path:
    """``$TUNELESS_CACHE_DIR``, default ``~/.cache/tuneless``."""
    return Path(os.path.expanduser(os.environ.get("TUNELESS_CACHE_DIR", "~/.cache/tuneless")))


def _recipe_key(recipe: PretrainRecipe) -> str:
    payload = json.dumps({**asdict(recipe), "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_path(recipe: PretrainRecipe = PRETRAIN_RECIPE) -> Path:
    """Where the checkpoint of ``recipe`` is cached (the name holds the hash of the recipe and torch's version)."""
    return cache_dir() / f"finetune_digits-{_recipe_key(recipe)}.pt"


def _classes_subset(x: Tensor, y: Tensor, classes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The images of ``classes``, labelled by their position in ``classes``."""
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return x[keep].contiguous(), relabel[y[keep]]


def _pretrain_model(recipe: PretrainRecipe) -> nn.Module:
    model = _DigitCNN()
    model.head = nn.Linear(model.head.in_features, len(recipe.classes))
    return model


def pretrain(recipe: PretrainRecipe = PRETRAIN_RECIPE) -> dict[str, Tensor]:
    """Run ``recipe`` (single-threaded, float32, CPU) and return the model's state dict."""
    xtr, ytr, _, _ = _digit_images()
    x, y = _classes_subset(xtr.float(), ytr, recipe.classes)
    model = LearningProblem._init_module(_pretrain_model(recipe), LearningProblem._generator(recipe.seed))
    penalty = _l2_penalty(model, recipe.l2)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    batches = Batches(len(y), recipe.batch_size, recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits whatever the caller's thread count
    try:
        for step in range(recipe.steps):
            idx = batches(step)
            loss = F.cross_entropy(model(x[idx]), y[idx]) + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def _write_atomically(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: Path, recipe: PretrainRecipe) -> dict[str, Tensor] | None:
    """The cached state dict, or None when the file is missing or does not load into the model."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        _pretrain_model(recipe).load_state_dict(state)  # raises on missing keys or wrong shapes
        return state
    except Exception:  # a truncated or corrupt file (any unpickling or zip error): rebuilt by the caller
        return None


def pretrained_checkpoint(recipe: PretrainRecipe = PRETRAIN_RECIPE,
                          train: Callable[[PretrainRecipe], dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """The pretrained state dict of ``recipe``: read from the cache, else trained and cached."""
    path = checkpoint_path(recipe)
    state = _read(path, recipe)
    if state is None:
        state = (pretrain if train is None else train)(recipe)
        _write_atomically(state, path)
    return state


class FinetuneDigits(LearningProblem):
    name = "finetune_digits"
    description = ("fine-tuning: a CNN pretrained on digits 0-4 (cached checkpoint) trained whole on digits 5-9 "
                   "with a new head")
    default_steps = 200
    default_batch_size = 32

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        state = pretrained_checkpoint()
        model = _pretrain_model(PRETRAIN_RECIPE)
        model.load_state_dict(state)
        # a new head for the new classes, from the run seed; the body stays as pretrained
        model.head = self._init_module(nn.Linear(model.head.in_features, len(FINETUNE_CLASSES)),
                                       self._generator(seed))
        model = model.to(device=device, dtype=dtype)
        xtr, ytr, xte, yte = _digit_images()
        xtr, ytr = _classes_subset(xtr, ytr, FINETUNE_CLASSES)
        xte, yte = _classes_subset(xte, yte, FINETUNE_CLASSES)
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return LearningInstance(model, F.cross_entropy, (cast(xtr), ytr.to(device)), (cast(xte), yte.to(device)),
                                Batches(len(ytr), self.batch_size, seed), classify=True)
