"""``transformer_lm``: a Hugging Face ``transformers`` decoder trained on the standard library's source.

======================== ================================================================
name                     task
======================== ================================================================
``transformer_lm``       a byte-level Llama (``transformers.LlamaForCausalLM``, random
                         initialization) trained on the Python standard library's ``.py``
                         files, validated on held-out files
======================== ================================================================

The model is a real model class users train (``LlamaForCausalLM``: RMSNorm, rotary
positions, SwiGLU), built from a ``LlamaConfig`` with random weights drawn from the run seed:
nothing is downloaded and nothing is read from a hub (``HF_HUB_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` are set before ``transformers`` is imported, if not set already).
The vocabulary is the 256 byte values.

The corpus is the running Python's own standard library (``sysconfig.get_paths()["stdlib"]``,
for example Python 3.11's ``lib/python3.11``), so **numbers are comparable within one Python
version only**. Its ``.py`` files are listed in sorted order, leaving out ``site-packages``,
``__pycache__`` and the test suites (``test``, ``tests``, ``idle_test`` folders); each file is
placed in validation (about 1 in 10) or training by a hash of its relative path salted with a
fixed split seed, independent of the run seed, and the files are read in an order fixed by
another hash until :data:`CORPUS_BYTES` bytes are read (at most :data:`FILE_BYTES` from one
file). The corpus is cached per process. Files are joined with a NUL byte.

A training step is a minibatch of random windows of the training text, drawn from the run seed
and the step (a pure function of both). ``evaluate()`` reports ``loss`` (mean next-byte
cross-entropy, in nats, on a fixed set of training windows), ``test_loss`` (the same on a
fixed set of validation windows) and ``test_accuracy`` (next-byte accuracy there): small
fixed subsets, so that evaluation is cheap.

Sizes (``size=``): ``"small"`` (the default: 2 layers of width 64, 117k parameters, context 64,
16 windows a step, 250 steps; about 10 s single-threaded on the development machine's CPU,
20 evaluations included) and ``"medium"`` (4 layers of width 96, context 128, 16 windows a step,
400 steps; about a minute on 2 CPU cores, meant for a GPU or a larger machine). Attention is
transformers' ``"eager"`` implementation on the CPU (the faster one at these sizes there) and
``"sdpa"`` on other devices.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as v
from .base import ProblemInstance
from .learning import LearningProblem

__all__ = ["TransformerLM", "LMInstance", "LMSize", "LM_SIZES", "stdlib_corpus", "stdlib_files", "is_validation_file"]

#: the train/validation split of the files is drawn with this seed, the same for every run seed
LM_SPLIT_SEED = 1234
#: about this fraction of the files goes to validation
VALIDATION_FRACTION = 0.1
#: bytes read from the standard library in all (training and validation together)
CORPUS_BYTES = 4_000_000
#: at most this many bytes are read from one file (so that no single file dominates)
FILE_BYTES = 100_000
#: folders left out of the corpus
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def _file_hash(kind: str, relpath: str) -> int:
    digest = hashlib.sha256(f"{LM_SPLIT_SEED}:{kind}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def is_validation_file(relpath: str) -> bool:
    """Whether the standard-library file at ``relpath`` (POSIX, relative to the stdlib root) is held out."""
    return _file_hash("split", relpath) % 1000 < VALIDATION_FRACTION * 1000


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """The relative paths of the standard library's ``.py`` files, sorted, tests and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


@functools.lru_cache(maxsize=None)
def stdlib_corpus(total_bytes: int = CORPUS_BYTES) -> tuple[Tensor, Tensor, tuple[str, ...], tuple[str, ...]]:
    """(training bytes, validation bytes, training files, validation files), cached per process.

    The bytes are uint8 tensors of the files' contents joined by a NUL byte; see the module docstring.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib_files(root), key=lambda rel: (_file_hash("order", rel), rel))
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    read = 0
    for rel in files:
        if read >= total_bytes:
            break
        with open(root / rel, "rb") as f:
            data = f.read(FILE_BYTES)
        if not data:
            continue
        held_out = is_validation_file(rel)
        parts[held_out].append(data)
        names[held_out].append(rel)
        read += len(data)
    if not parts[False] or not parts[True]:  # pragma: no cover - a stdlib with a handful of files
        raise RuntimeError(f"the standard library at {root} has too few .py files for a train/validation split")

    def join(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"\0".join(chunks)), dtype=torch.uint8).clone()

    return join(parts[False]), join(parts[True]), tuple(names[False]), tuple(names[True])


@dataclass(frozen=True)
class LMSize:
    """The model and the run of one ``size`` of :class:`TransformerLM`."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    batch_size: int
    steps: int
    #: fixed evaluation windows: from the training text (``loss``) and the validation text (``test_loss``)
    eval_train_windows: int
    eval_test_windows: int


LM_SIZES: dict[str, LMSize] = {
    "small": LMSize(hidden=64, layers=2, heads=2, intermediate=176, context=64, batch_size=16, steps=250,
                    eval_train_windows=32, eval_test_windows=64),
    "medium": LMSize(hidden=96, layers=4, heads=3, intermediate=256, context=128, batch_size=16, steps=400,
                     eval_train_windows=32, eval_test_windows=64),
}


def _import_llama() -> tuple[type, type]:
    """``(LlamaConfig, LlamaForCausalLM)``, imported offline and with transformers' messages quieted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the bench extra is missing
        raise ImportError("the transformer_lm problem needs Hugging Face transformers: "
                          "pip install 'tuneless[bench]'") from exc
    transformers.logging.set_verbosity_error()
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def _windows(text: Tensor, starts: Tensor, length: int) -> Tensor:
    """``text[s : s + length]`` for each start, as int64 ids, shape (len(starts), length)."""
    return text[starts.unsqueeze(-1) + torch.arange(length, device=text.device)].long()


def _evenly_spaced(text: Tensor, count: int, length: int) -> Tensor:
    return torch.linspace(0, len(text) - length - 1, count).long()


class LMInstance(ProblemInstance):
    """A causal LM, the training text sampled in random windows, and fixed evaluation windows."""

    def __init__(self, model: torch.nn.Module, train_text: Tensor, test_text: Tensor, size: LMSize,
                 batch_size: int, seed: int) -> None:
        self.model = model
        self.params = [p for p in model.parameters()]
        self.train_text, self.test_text = train_text, test_text
        self.size, self.batch_size, self.seed = size, batch_size, int(seed)
        length = size.context + 1
        self.eval_train = _windows(train_text, _evenly_spaced(train_text, size.eval_train_windows, length).to(
            train_text.device), length)
        self.eval_test = _windows(test_text, _evenly_spaced(test_text, size.eval_test_windows, length).to(
            test_text.device), length)

    def batch(self, step: int) -> Tensor:
        """The windows of ``step``: a pure function of the run seed and the step."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        starts = torch.randint(0, len(self.train_text) - self.size.context - 1, (self.batch_size,), generator=gen)
        return _windows(self.train_text, starts.to(self.train_text.device), self.size.context + 1)

    def _logits_and_targets(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(input_ids=windows[:, :-1]).logits
        return logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)

    def loss(self, step: int) -> Tensor:
        logits, targets = self._logits_and_targets(self.batch(step))
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        train_logits, train_targets = self._logits_and_targets(self.eval_train)
        test_logits, test_targets = self._logits_and_targets(self.eval_test)
        return {
            "loss": float(F.cross_entropy(train_logits.float(), train_targets)),
            "test_loss": float(F.cross_entropy(test_logits.float(), test_targets)),
            "test_accuracy": float((test_logits.argmax(-1) == test_targets).double().mean()),
        }


class TransformerLM(LearningProblem):
    """A byte-level ``LlamaForCausalLM`` on the standard library's source; see the module docstring."""

    name = "transformer_lm"
    description = ("byte-level Llama decoder (Hugging Face transformers, random init) on the Python standard "
                   "library's source, validated on held-out files")
    default_steps = LM_SIZES["small"].steps
    default_batch_size = LM_SIZES["small"].batch_size

    def __init__(self, size: str = "small", batch_size: int | None = None) -> None:
        v.check_choice(self.name, "size", size, tuple(LM_SIZES))
        self.size = size
        self.config = LM_SIZES[size]
        self.default_steps = self.config.steps
        self.default_batch_size = self.config.batch_size
        super().__init__(batch_size)

    def spec(self) -> str:
        kwargs = []
        if self.size != "small":
            kwargs.append(f"size={self.size}")
        if self.batch_size != self.default_batch_size:
            kwargs.append(f"batch_size={self.batch_size}")
        return self.name + (":" + ",".join(kwargs) if kwargs else "")

    def model(self, seed: int, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with its random initialization drawn from ``seed`` (built on the CPU in float32;
        ``device`` chooses the attention implementation)."""
        LlamaConfig, LlamaForCausalLM = _import_llama()
        c = self.config
        config = LlamaConfig(vocab_size=256, hidden_size=c.hidden, intermediate_size=c.intermediate,
                             num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
                             max_position_embeddings=c.context, tie_word_embeddings=True, attention_dropout=0.0,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)
        config._attn_implementation = "eager" if torch.device(device).type == "cpu" else "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = LlamaForCausalLM(config)
        return model.train()

    def instantiate(self, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", start: Any = None) -> LMInstance:
        train_text, test_text, _, _ = stdlib_corpus()
        model = self.model(seed, device).to(device=device, dtype=dtype)
        return LMInstance(model, train_text.to(device), test_text.to(device), self.config, self.batch_size, seed)
