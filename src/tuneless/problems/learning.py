"""Small real learning tasks for the benchmark: seconds each on a 2-core CPU, offline data only.

Every task trains a small torch model on data that ships with the installed packages (no
download at run time), with minibatch noise, a fixed step budget and a seed that fixes the
initialization and the order of the minibatches (the train/held-out split is the same for
every seed). ``evaluate()`` reports the full training loss (``loss``), the held-out loss
(``test_loss``) and, for classifiers, held-out accuracy (``test_accuracy``).

======================== ================================================================
name                     task
======================== ================================================================
``logreg_digits``        logistic regression, scikit-learn digits (64 -> 10)
``logreg_wine``          same, wine (13 -> 3)
``logreg_breast_cancer`` same, breast cancer (30 -> 2)
``mlp_digits``           two-layer MLP (64 hidden units, GELU), digits
``mlp_wine``             same, wine
``mlp_breast_cancer``    same, breast cancer
``cnn_digits``           two conv layers and a linear head on the 8x8 digit images
``char_lm``              character-level language model (a window of 16 characters, an
                         embedding and an MLP) on the text of ``pydoc_data.topics``
``least_squares``        consistent least squares, columns scaled over 2 decades: minimum 0
``matrix_factorization`` rank-5 completion of a 60x40 matrix from half its entries: minimum 0
``mlp_digits_long``      ``mlp_digits`` at 10 times its budget (5000 steps)
``mlp_digits_smooth``    ``mlp_digits`` with label smoothing 0.1 (an unknown positive minimum)
======================== ================================================================

Further learning problems live in their own modules: ``transformer_lm``
(:mod:`.transformer_lm`), ``resnet_digits`` and ``finetune_digits`` (:mod:`.vision`).

The classifiers' objectives carry an L2 penalty on their weights (1e-3 for logistic
regression, 5e-4 for the MLPs and the CNN): the small models here would otherwise interpolate
their training sets and drive the loss towards 0, where a ratio of losses measures noise.
The two problems whose minimum is exactly 0 (``min_value = 0``) are scored on a log scale.
Features are standardized with the training split's statistics. The scikit-learn datasets are
read from the CSV files scikit-learn ships (``sklearn/datasets/data``) without importing
scikit-learn, which takes longer than a whole run here. The char-level text is the
one shipped with the running Python, so its numbers are comparable within one Python version.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as v
from .base import Problem, ProblemInstance

__all__ = [
    "LearningProblem", "LearningInstance", "LEARNING_PROBLEMS",
    "LogRegDigits", "LogRegWine", "LogRegBreastCancer", "MLPDigits", "MLPWine", "MLPBreastCancer",
    "CNNDigits", "CharLM", "LeastSquares", "MatrixFactorization", "MLPDigitsLong", "MLPDigitsSmooth",
]

#: the split of every dataset is drawn with this seed, the same for every run seed
SPLIT_SEED = 1234
TEST_FRACTION = 0.25


# ---------------------------------------------------------------------------- data (cached per process)


_SKLEARN_FILES = {"digits": "digits.csv.gz", "wine": "wine_data.csv", "breast_cancer": "breast_cancer.csv"}


def _sklearn_data_file(name: str) -> Path:
    """The CSV file scikit-learn ships for ``name``, found without importing scikit-learn (seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the learning problems read scikit-learn's bundled datasets: pip install 'tuneless[bench]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _SKLEARN_FILES[name]
    if not path.exists():  # pragma: no cover - a scikit-learn that moved its data
        raise FileNotFoundError(f"scikit-learn's {name} dataset is not at {path}")
    return path


@functools.lru_cache(maxsize=None)
def _raw_dataset(name: str) -> tuple[Tensor, Tensor]:
    """(features float64, labels int64) as ``sklearn.datasets.load_<name>`` returns them."""
    import numpy as np

    path = _sklearn_data_file(name)
    if name == "digits":  # no header; 64 pixels then the label
        data = np.loadtxt(path, delimiter=",")
    else:  # a header line "n_samples,n_features,class names..."; features then the label
        data = np.loadtxt(path, delimiter=",", skiprows=1)
    return torch.as_tensor(data[:, :-1], dtype=torch.float64), torch.as_tensor(data[:, -1], dtype=torch.int64)


def _split(n: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * n))
    return perm[n_test:], perm[:n_test]


@functools.lru_cache(maxsize=None)
def _sklearn_dataset(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) in float64/int64, standardized with train statistics."""
    x, y = _raw_dataset(name)
    train, test = _split(len(y))
    mean = x[train].mean(0)
    std = x[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    return x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous()


@functools.lru_cache(maxsize=None)
def _digit_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (N, 1, 8, 8) images scaled to [0, 1], same split as :func:`_sklearn_dataset`."""
    x, y = _raw_dataset("digits")
    x = x.reshape(-1, 1, 8, 8) / 16.0
    train, test = _split(len(y))
    return x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous()


#: the characters the language model distinguishes (after lower-casing); anything else is one id
_CHARSET = "\n abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()[]{}<>=+-*/\\_#%&|~^@`$"
CHAR_CONTEXT = 16
CHAR_TEXT_CHARS = 200_000


@functools.lru_cache(maxsize=None)
def _char_corpus() -> tuple[Tensor, Tensor, int]:
    """(train ids, test ids, vocabulary size) from ``pydoc_data.topics`` (first 200k characters)."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).lower()[:CHAR_TEXT_CHARS]
    index = {c: i for i, c in enumerate(_CHARSET)}
    unknown = len(_CHARSET)
    ids = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)
    cut = int(len(ids) * (1 - 0.1))
    return ids[:cut].contiguous(), ids[cut:].contiguous(), unknown + 1


# ---------------------------------------------------------------------------- the instance


class Batches:
    """Minibatch indices as a pure function of the step: one seeded permutation per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def __call__(self, step: int) -> Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class LearningInstance(ProblemInstance):
    """A model, a training set sampled in minibatches, and a held-out set."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], batches: Batches,
                 *, classify: bool, regularizer: Callable[[], Tensor] | None = None,
                 train_eval: tuple[Any, Any] | None = None, eval_chunk: int = 4096) -> None:
        self.model = model
        self.params = [p for p in model.parameters()]
        self.loss_fn = loss_fn
        self.x_train, self.y_train = train
        self.x_test, self.y_test = test
        self.batches = batches
        self.classify = classify
        self.regularizer = regularizer
        self.eval_chunk = eval_chunk
        #: the data on which the reported training loss is measured (default: the whole training set)
        self.train_eval = train if train_eval is None else train_eval

    def loss(self, step: int) -> Tensor:
        idx = self.batches(step)
        value = self.loss_fn(self.model(self.x_train[idx]), self.y_train[idx])
        if self.regularizer is not None:
            value = value + self.regularizer()
        return value

    def _full(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        total, correct = 0.0, 0
        for i in range(0, len(y), self.eval_chunk):
            out = self.model(x[i:i + self.eval_chunk])
            yi = y[i:i + self.eval_chunk]
            total += float(self.loss_fn(out, yi)) * len(yi)
            if self.classify:
                correct += int((out.argmax(-1) == yi).sum())
        return total / len(y), correct / len(y)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        train_loss, train_acc = self._full(*self.train_eval)
        test_loss, test_acc = self._full(self.x_test, self.y_test)
        if self.regularizer is not None:
            reg = float(self.regularizer())
            train_loss += reg
            test_loss += reg
        out = {"loss": train_loss, "test_loss": test_loss}
        if self.classify:
            out["train_accuracy"] = train_acc
            out["test_accuracy"] = test_acc
        return out


# ---------------------------------------------------------------------------- problems


class LearningProblem(Problem):
    """A small learning task; see the module docstring."""

    kind = "learning"
    #: the held-out loss scores learning problems (training loss stays available as ``loss``)
    target_metric: ClassVar[str] = "test_loss"
    #: minibatch size
    default_batch_size: ClassVar[int] = 64
    #: the dtype the benchmark runs it in
    bench_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, batch_size: int | None = None) -> None:
        bs = self.default_batch_size if batch_size is None else batch_size
        v.check_range(self.name, "batch_size", bs, 1, None, integer=True)
        self.batch_size = int(bs)

    def spec(self) -> str:
        return self.name if self.batch_size == self.default_batch_size else f"{self.name}:batch_size={self.batch_size}"

    @staticmethod
    def _generator(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed))

    @staticmethod
    def _init_module(module: nn.Module, gen: torch.Generator) -> nn.Module:
        """Re-initialize every Linear/Conv layer from ``gen`` (torch's default scheme, seeded)."""
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    fan_in = m.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    m.weight.uniform_(-bound, bound, generator=gen)
                    if m.bias is not None:
                        m.bias.uniform_(-bound, bound, generator=gen)
                elif isinstance(m, nn.Embedding):
                    m.weight.normal_(0.0, 1.0, generator=gen)
        return module


def _l2_penalty(model: nn.Module, l2: float) -> Callable[[], Tensor] | None:
    """1/2 l2 sum ||W||^2 over the weight matrices and kernels (not the biases), or None if l2 = 0."""
    if l2 == 0:
        return None
    weights = [p for p in model.parameters() if p.dim() >= 2]
    return lambda: 0.5 * l2 * torch.stack([w.square().sum() for w in weights]).sum()


class _SklearnClassifier(LearningProblem):
    dataset: ClassVar[str]
    #: strength of the L2 penalty on the weights: it keeps the minimum of the training objective
    #: positive (an interpolating model would drive it to 0), so that the gap ratio is meaningful
    l2: ClassVar[float] = 5e-4

    def _model(self, d: int, c: int) -> nn.Module:
        raise NotImplementedError

    def _regularizer(self, model: nn.Module) -> Callable[[], Tensor] | None:
        return _l2_penalty(model, self.l2)

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        xtr, ytr, xte, yte = _sklearn_dataset(self.dataset)
        c = int(torch.cat([ytr, yte]).max()) + 1
        model = self._init_module(self._model(xtr.shape[1], c), self._generator(seed)).to(device=device, dtype=dtype)
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return LearningInstance(model, F.cross_entropy, (cast(xtr), ytr.to(device)), (cast(xte), yte.to(device)),
                                Batches(len(ytr), self.batch_size, seed), classify=True,
                                regularizer=self._regularizer(model))


class _LogReg(_SklearnClassifier):
    l2 = 1e-3
    default_steps = 500

    def _model(self, d: int, c: int) -> nn.Module:
        return nn.Linear(d, c)


class LogRegDigits(_LogReg):
    name = "logreg_digits"
    dataset = "digits"
    description = "L2-regularized logistic regression on scikit-learn's digits (64 features, 10 classes)"


class LogRegWine(_LogReg):
    name = "logreg_wine"
    dataset = "wine"
    default_batch_size = 16
    description = "L2-regularized logistic regression on scikit-learn's wine (13 features, 3 classes)"


class LogRegBreastCancer(_LogReg):
    name = "logreg_breast_cancer"
    dataset = "breast_cancer"
    default_batch_size = 32
    description = "L2-regularized logistic regression on scikit-learn's breast cancer (30 features, 2 classes)"


class _MLP(_SklearnClassifier):
    hidden: ClassVar[int] = 64
    default_steps = 500

    def _model(self, d: int, c: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Linear(self.hidden, c))


class MLPDigits(_MLP):
    name = "mlp_digits"
    dataset = "digits"
    description = "two-layer MLP (64 hidden units, GELU) on scikit-learn's digits"


class MLPWine(_MLP):
    name = "mlp_wine"
    dataset = "wine"
    default_batch_size = 16
    description = "two-layer MLP (64 hidden units, GELU) on scikit-learn's wine"


class MLPBreastCancer(_MLP):
    name = "mlp_breast_cancer"
    dataset = "breast_cancer"
    default_batch_size = 32
    description = "two-layer MLP (64 hidden units, GELU) on scikit-learn's breast cancer"


class _DigitCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.head(x.flatten(1))


class CNNDigits(LearningProblem):
    name = "cnn_digits"
    description = "small CNN (two 3x3 conv layers, a linear head) on the 8x8 digit images"
    default_steps = 400
    l2: ClassVar[float] = 5e-4

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        xtr, ytr, xte, yte = _digit_images()
        model = self._init_module(_DigitCNN(), self._generator(seed)).to(device=device, dtype=dtype)
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return LearningInstance(model, F.cross_entropy, (cast(xtr), ytr.to(device)), (cast(xte), yte.to(device)),
                                Batches(len(ytr), self.batch_size, seed), classify=True,
                                regularizer=_l2_penalty(model, self.l2))


class _CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int, embed: int = 12, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.hidden = nn.Linear(context * embed, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, windows: Tensor) -> Tensor:
        e = self.embed(windows).flatten(1)
        return self.out(torch.tanh(self.hidden(e)))


class _Windows:
    """``text[i : i + context]`` for a batch of start indices, built on the fly (no copy of the corpus)."""

    def __init__(self, ids: Tensor, context: int) -> None:
        self.ids, self.context = ids, context
        self.offsets = torch.arange(context)

    def __len__(self) -> int:
        return len(self.ids) - self.context

    def __getitem__(self, idx: Any) -> Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(*idx.indices(len(self)))
        return self.ids[idx.unsqueeze(-1) + self.offsets]


class _Targets:
    def __init__(self, ids: Tensor, context: int) -> None:
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return len(self.ids) - self.context

    def __getitem__(self, idx: Any) -> Tensor:
        if isinstance(idx, slice):
            idx = torch.arange(*idx.indices(len(self)))
        return self.ids[idx + self.context]


class CharLM(LearningProblem):
    name = "char_lm"
    description = "character-level language model (16-character window, embedding + MLP) on pydoc_data.topics"
    default_steps = 1000
    default_batch_size = 128
    #: held-out evaluation on this many windows (evenly spaced) to keep evaluation fast
    eval_windows: ClassVar[int] = 8192

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        train_ids, test_ids, vocab = _char_corpus()
        model = self._init_module(_CharMLP(vocab, CHAR_CONTEXT), self._generator(seed)).to(device=device, dtype=dtype)
        xtr, ytr = _Windows(train_ids.to(device), CHAR_CONTEXT), _Targets(train_ids.to(device), CHAR_CONTEXT)
        # the full training loss is measured on a fixed, evenly spaced subset (as big as the test set)
        sub = torch.linspace(0, len(xtr) - 1, self.eval_windows).long()
        tsub = torch.linspace(0, len(test_ids) - CHAR_CONTEXT - 1, self.eval_windows).long()
        xte, yte = _Windows(test_ids.to(device), CHAR_CONTEXT), _Targets(test_ids.to(device), CHAR_CONTEXT)
        return LearningInstance(model, F.cross_entropy, (xtr, ytr), (xte[tsub], yte[tsub]),
                                Batches(len(xtr), self.batch_size, seed), classify=True,
                                train_eval=(xtr[sub], ytr[sub]))


class _MSE:
    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (pred - target).square().mean()


class _LinearModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(d))

    def forward(self, a: Tensor) -> Tensor:
        return a @ self.x


class LeastSquares(LearningProblem):
    name = "least_squares"
    #: an optimization problem with a known minimum: scored on its training objective
    target_metric: ClassVar[str] = "loss"
    description = "consistent least squares 1/2 mean (a_i.x - b_i)^2, 512 rows, 64 columns scaled over 2 decades: minimum 0"
    default_steps = 1000
    default_batch_size = 32
    min_value = 0.0
    bench_dtype = torch.float64
    rows: ClassVar[int] = 512
    cols: ClassVar[int] = 64

    @functools.cached_property
    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(SPLIT_SEED)
        n = self.rows + self.rows // 4
        scale = torch.logspace(0, -2, self.cols, dtype=torch.float64)
        a = torch.randn(n, self.cols, generator=gen, dtype=torch.float64) * scale
        x_star = torch.randn(self.cols, generator=gen, dtype=torch.float64)
        b = a @ x_star
        return a[:self.rows], b[:self.rows], a[self.rows:], b[self.rows:]

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        atr, btr, ate, bte = (t.to(device=device, dtype=dtype) for t in self._data)
        model = _LinearModel(self.cols).to(device=device, dtype=dtype)
        with torch.no_grad():
            model.x.normal_(0.0, 0.1, generator=self._generator(seed))
        return LearningInstance(model, _MSE(), (atr, btr), (ate, bte), Batches(self.rows, self.batch_size, seed),
                                classify=False)


class _Factors(nn.Module):
    def __init__(self, m: int, n: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(m, rank))
        self.v = nn.Parameter(torch.zeros(n, rank))

    def forward(self, entries: Tensor) -> Tensor:
        return (self.u[entries[:, 0]] * self.v[entries[:, 1]]).sum(-1)


class MatrixFactorization(LearningProblem):
    name = "matrix_factorization"
    #: an optimization problem with a known minimum: scored on its training objective
    target_metric: ClassVar[str] = "loss"
    description = "rank-5 completion of a 60x40 matrix from half its entries (U V^T fit, nonconvex): minimum 0"
    default_steps = 1500
    default_batch_size = 128
    min_value = 0.0
    bench_dtype = torch.float64
    shape: ClassVar[tuple[int, int]] = (60, 40)
    rank: ClassVar[int] = 5

    @functools.cached_property
    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(SPLIT_SEED)
        m, n = self.shape
        u = torch.randn(m, self.rank, generator=gen, dtype=torch.float64)
        w = torch.randn(n, self.rank, generator=gen, dtype=torch.float64)
        target = u @ w.T / math.sqrt(self.rank)
        entries = torch.cartesian_prod(torch.arange(m), torch.arange(n))
        perm = torch.randperm(len(entries), generator=gen)
        half = len(entries) // 2
        train, test = entries[perm[:half]], entries[perm[half:]]
        return train, target[train[:, 0], train[:, 1]], test, target[test[:, 0], test[:, 1]]

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        etr, ytr, ete, yte = self._data
        model = _Factors(*self.shape, self.rank)
        gen = self._generator(seed)
        with torch.no_grad():
            model.u.normal_(0.0, 0.3, generator=gen)
            model.v.normal_(0.0, 0.3, generator=gen)
        model = model.to(device=device, dtype=dtype)
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return LearningInstance(model, _MSE(), (etr.to(device), cast(ytr)), (ete.to(device), cast(yte)),
                                Batches(len(ytr), self.batch_size, seed), classify=False)


class MLPDigitsLong(MLPDigits):
    """``mlp_digits`` at 10 times its budget: the same data, model and seeds, only a longer run."""

    name = "mlp_digits_long"
    description = "mlp_digits at 10x its budget (5000 steps): exposes late-training growth of learned step sizes"
    default_steps = 10 * MLPDigits.default_steps


#: the label smoothing of ``mlp_digits_smooth``
LABEL_SMOOTHING = 0.1


class MLPDigitsSmooth(MLPDigits):
    """``mlp_digits`` with label smoothing 0.1 in the training and held-out losses.

    The smoothed cross-entropy of a 10-class problem is at least the entropy of the smoothed
    target (0.50 nats at 0.1), and the L2 penalty adds to it: the minimum is positive and unknown.
    """

    name = "mlp_digits_smooth"
    description = "two-layer MLP on scikit-learn's digits, label smoothing 0.1: a loss with an unknown positive minimum"

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LearningInstance:
        instance = super().instantiate(seed, dtype=dtype, device=device, start=start)
        instance.loss_fn = functools.partial(F.cross_entropy, label_smoothing=LABEL_SMOOTHING)
        return instance


#: every learning problem, in the order the benchmark lists them
LEARNING_PROBLEMS: tuple[type[LearningProblem], ...] = (
    LogRegDigits, LogRegWine, LogRegBreastCancer, MLPDigits, MLPWine, MLPBreastCancer,
    CNNDigits, CharLM, LeastSquares, MatrixFactorization, MLPDigitsLong, MLPDigitsSmooth,
)
