#!/usr/bin/env python
"""Step-speed benchmark: how fast is one optimizer step, and how close to the physical limit.

For every optimizer in the tuneless registry (discovered at run time, torch's own entries
included) and for the authors' reference packages that are installed, on two parameter sets
(many small tensors of transformer shapes; a few large tensors), this measures:

* the step time as a ratio to ``torch.optim.Adam(foreach=True)`` and to
  ``torch.optim.Adam(fused=True)``, timed in the same interleaved repetitions;
* the step time as a ratio to the optimizer's own memory-bandwidth bound
  ``bytes moved per parameter x parameters / bandwidth``, the bandwidth measured in the same
  repetitions with an in-place ``a.add_(b)`` over a large buffer (12 bytes per element), and
  the bytes per parameter taken from :data:`BOUND_BYTES` (documented per optimizer);
* the optimizer's state memory per parameter (bytes of every tensor in ``optimizer.state``
  and ``param_groups``, nested optimizers included, divided by the number of parameters);
* the device-to-host synchronizations per step: reads of tensor values on the host, from
  Python and inside torch ops (:class:`tuneless._host_reads.HostReadCounter`, as the contract
  suite counts them; torch.optim's own CPU step counters exempted).

Method (``../shared/PERFORMANCE.md``): one thread, medians of interleaved repetitions, and
ratios against baselines timed in the same block, never lone absolute times. Each candidate is
timed in its own block together with the two Adam baselines and the bandwidth probe, in an
order rotated at every repetition, so that every ratio in a row compares numbers taken at the
same moment of a noisy shared machine. Gradients are fixed random tensors (the step is timed,
not the backward pass); the loss passed to optimizers that need one is a constant 0-d tensor.
Denormal floats are flushed to zero so that a slowly decaying buffer cannot make one
optimizer look slow for a reason that has nothing to do with its code.

This is a benchmark, not a test: it asserts nothing about time. Examples::

    python benchmarks/step_speed.py --quick                      # smoke run, a minute
    python benchmarks/step_speed.py --markdown --out benchmarks/results/step_speed.md
    python benchmarks/step_speed.py --only prodigy,dog --markdown
    python benchmarks/step_speed.py --spec "prodigy:slice_p=11" --only prodigy
    python benchmarks/step_speed.py --env THP_MEM_ALLOC_ENABLE=1 --only mechanic   # huge pages

Progress goes to stderr; the table to stdout (plain text, or markdown with ``--markdown``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Container, Iterable, Sequence

import torch
from torch import Tensor

import tuneless
from tuneless import registry
from tuneless._host_reads import HostReadCounter
from tuneless.optim.base import TunelessOptimizer
from tuneless.spec import parse_spec

Shapes = list[tuple[int, ...]]
StepFn = Callable[[], Any]

# ----------------------------------------------------------------------------- parameter sets


def transformer_shapes(d_model: int = 256, layers: int = 12, ffn_mult: int = 4) -> Shapes:
    """16 tensors per layer, as in a pre-norm transformer block: q, k, v, o weights and biases,
    two layer norms (weight, bias), and the two feed-forward matrices with their biases.

    The default (d_model 256, 12 layers) gives 192 tensors and 9.48 M floats.
    """
    d, f = d_model, ffn_mult * d_model
    layer: Shapes = [(d, d)] * 4 + [(d,)] * 4 + [(d,)] * 4 + [(d, f), (f,), (f, d), (d,)]
    return layer * layers


def large_shapes(scale: int = 1) -> Shapes:
    """4 large tensors: an embedding table and three dense matrices (21.1 M floats at scale 1)."""
    return [(32000 // scale, 512), (2048 // scale, 1024), (1024 // scale, 2048), (1024 // scale, 512)]


def param_sets(quick: bool) -> dict[str, Shapes]:
    if quick:
        return {"many-small": transformer_shapes(d_model=64), "few-large": large_shapes(scale=32)}
    return {"many-small": transformer_shapes(), "few-large": large_shapes()}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


# ----------------------------------------------------------------------------- bytes per parameter
#
# The bound of a step is (minimum bytes moved per parameter) x (parameters) / bandwidth, each
# necessary read or write of a parameter-sized fp32 buffer counted once (4 bytes). Values
# marked "PERFORMANCE.md" are that document's table (the lower end where it gives a range:
# the bound is a minimum); "derived" ones are counted here from the algorithm's reads and
# writes, in the fewest passes the algorithm allows (a global reduction whose result the
# update needs forces one more read pass over what it reduces). The entry is chosen by the
# optimizer's name, normalized (lowercase, letters and digits only); its function reads the
# optimizer's own settings (momentum, slice, base optimizer) where they change the count.


def norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class BoundEntry:
    names: tuple[str, ...]
    bytes: Callable[[torch.optim.Optimizer], float]
    note: str
    wrapper: bool = False  # the count includes a base optimizer's (named in the note)


def _d(opt: torch.optim.Optimizer, key: str, default: Any = None) -> Any:
    return opt.defaults.get(key, default)


def _first_beta(opt: torch.optim.Optimizer, default: float = 0.9) -> float:
    betas = _d(opt, "betas")
    if isinstance(betas, (tuple, list)) and betas:
        return float(betas[0])
    return float(_d(opt, "beta1", default))


def _slice(opt: torch.optim.Optimizer) -> int:
    for key in ("slice_p", "slice", "slice_factor", "stride"):
        value = _d(opt, key)
        if isinstance(value, int) and value >= 1:
            return value
    return 1


def _wrapper_base_bytes(opt: torch.optim.Optimizer) -> tuple[float, str]:
    base = base_optimizer(opt)
    if base is None:
        return 28.0, "adam (base not found; Adam assumed)"
    name = optimizer_name(base)
    return bound_bytes(name, base)[0], name


#: Mechanic's own two passes, over its base's (see its entry below).
MECHANIC_PASS_BYTES = 36.0


BOUND_BYTES: tuple[BoundEntry, ...] = (
    BoundEntry(("sgd",), lambda o: 20.0 if _d(o, "momentum", 0) else 12.0,
               "momentum 0: read p, g; write p (derived). With momentum: 20, PERFORMANCE.md"),
    BoundEntry(("adam", "adamw"), lambda o: 36.0 if _d(o, "amsgrad", False) else 28.0,
               "read p, g, m, v; write p, m, v (PERFORMANCE.md); +8 with amsgrad"),
    BoundEntry(("adagrad",), lambda o: 20.0, "read p, g, sum; write p, sum (PERFORMANCE.md)"),
    BoundEntry(("rmsprop",), lambda o: 20.0 + 8.0 * bool(_d(o, "momentum", 0)) + 8.0 * bool(_d(o, "centered", False)),
               "read p, g, square average; write p, square average (PERFORMANCE.md); +8 per momentum / centered buffer"),
    BoundEntry(("polyak", "sps", "spsmax"), lambda o: 16.0,
               "derived: read g for ||g||^2 (4), then read p, g and write p (12)"),
    BoundEntry(("momo", "momostar"), lambda o: 28.0,
               "derived: pass 1 reads p, g, d, writes d and reduces <g,x>, <d,x>, ||d||^2 (16); "
               "pass 2 reads p, d, writes p (12)"),
    BoundEntry(("dadaptsgd",), lambda o: 24.0 if _d(o, "momentum", 0) else 20.0,
               "derived: read g, s, x0; write s, p (x = x0 - s; the step uses the previous d) = 20; "
               "with momentum x = b x + (1-b) z also reads p: 24"),
    BoundEntry(("dadaptadam",), lambda o: 36.0,
               "read p, g, s, m, v; write p, s, m, v, the step using the previous d (PERFORMANCE.md)"),
    BoundEntry(("dadaptadagrad",), lambda o: 28.0,
               "derived: read g, alpha, s, x0; write alpha, s, p (x = x0 - s/sqrt(alpha); previous d)"),
    BoundEntry(("prodigy",), lambda o: (28.0 if _first_beta(o) else 20.0) + 12.0 / _slice(o),
               "read p, g, m, v, p0, s; write p, m, v, s = 40 (PERFORMANCE.md, lower end of 40-52); "
               "p0 and s sliced: 28 + 12/slice; beta1 = 0 drops m (-8)"),
    BoundEntry(("dog", "ldog"), lambda o: 20.0,
               "read g for ||g||^2 (4), then read p, x0, g and write p with the distance folded "
               "into the write pass (16) (PERFORMANCE.md, lower end of 20-24)"),
    BoundEntry(("dowg",), lambda o: 20.0,
               "derived, as DoG: read g for ||g||^2 (4); read p, x0, g, write p, distance folded (16)"),
    BoundEntry(("cocob", "cocobbackprop"), lambda o: 48.0,
               "derived: read p, g, x0, theta, G, L, reward (28); write p, theta, G, L, reward (20)"),
    BoundEntry(("sgdschedulefree", "schedulefreesgd", "sfsgd"), lambda o: 20.0,
               "read p, g, z; write p, z (PERFORMANCE.md)"),
    BoundEntry(("adamwschedulefree", "schedulefreeadamw", "sfadamw", "adamschedulefree", "schedulefreeadam"),
               lambda o: 28.0, "read p, g, z, v; write p, z, v (PERFORMANCE.md)"),
    BoundEntry(("mechanic", "mechanize"), lambda o: _wrapper_base_bytes(o)[0] + MECHANIC_PASS_BYTES,
               "derived: base optimizer; before it, the statistics pass reads Delta, g, x (12) and writes the "
               "copy of x_t (4); after it, the update reads x, the copy, Delta and writes Delta, x (20): 36 over "
               "the base (PERFORMANCE.md's 44 over Adam, 16 over the base, counts neither the copy nor an exact "
               "Delta, see mechanic.py)", wrapper=True),
    BoundEntry(("schedulefreewrapper", "schedulefreewrap", "sfwrapper", "wrapschedulefree", "schedulefree",
                "sfprodigy", "schedulefreeprodigy"),
               lambda o: _wrapper_base_bytes(o)[0] + 8.0,
               "derived: base optimizer (stepping z) plus one more read and write of a parameter-sized buffer",
               wrapper=True),
    BoundEntry(("tuneless",), lambda o: 52.0,
               "derived: its step needs global sums before the update, so two passes over z (the parameters "
               "while stepping): statistics read g, z, x0, v, s and write v, s (28); the update reads z, g, v and "
               "writes z (16); Schedule-Free's swap reads and writes one more buffer (8)"),
    BoundEntry(("sgdhd", "hdsgd", "hypergradientsgd", "sgdhypergradient"),
               lambda o: 24.0 + 8.0 * bool(_d(o, "momentum", 0)),
               "derived: read g, previous g for <g, g_prev> (8); read p, g, write p, g_prev (16); +8 with momentum"),
    BoundEntry(("adamhd", "hdadam", "hypergradientadam", "adamhypergradient"), lambda o: 40.0,
               "derived: read g, m, v for <g, previous Adam direction> (12), then the Adam pass (28)"),
)


def _entry_for(name: str) -> BoundEntry | None:
    key = norm_name(name)
    for e in BOUND_BYTES:
        if key in e.names:
            return e
    return None


def bound_bytes(name: str, opt: torch.optim.Optimizer) -> tuple[float, str]:
    """Minimum bytes moved per fp32 parameter by one step of ``opt`` (registered as ``name``),
    and where the number comes from. An optimizer without an entry gets the generic estimate
    12 + 8 x (parameter-sized state buffers): read p, g and each buffer, write p and each buffer.
    """
    e = _entry_for(name)
    if e is not None:
        note = e.note
        if e.wrapper:
            note = f"{note} [base: {_wrapper_base_bytes(opt)[1]}]"
        return float(e.bytes(opt)), note
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    copies = round(state_bytes(opt) / max(n, 1) / 4)
    return 12.0 + 8.0 * copies, (f"generic estimate (no entry for {name!r}): read p, g and each of the "
                                 f"{copies} state buffers, write p and each buffer")


# ----------------------------------------------------------------------------- introspection


def nested_optimizers(opt: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """Optimizers held by ``opt`` (the base of a wrapper such as Mechanic), recursively."""
    out: list[torch.optim.Optimizer] = []
    for value in vars(opt).values():
        if isinstance(value, torch.optim.Optimizer) and value is not opt:
            out.append(value)
            out.extend(nested_optimizers(value))
    return out


def base_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The base of a wrapper: a held optimizer, or ``opt`` itself when the wrapper subclasses
    a torch optimizer (``mechanic_pytorch.mechanize(Adam)``)."""
    held = nested_optimizers(opt)
    if held:
        return held[0]
    for cls in type(opt).__mro__[1:]:
        if cls.__module__.startswith("torch.optim.") and cls is not torch.optim.Optimizer:
            return opt
    return None


def optimizer_name(opt: torch.optim.Optimizer) -> str:
    """The registry name of ``opt``: a tuneless ``registry_name``, or the torch class name."""
    name = getattr(opt, "registry_name", "") or ""
    if name:
        return name
    for cls in type(opt).__mro__:
        if cls.__module__.startswith("torch.optim.") and cls is not torch.optim.Optimizer:
            return cls.__name__.lower()
    return type(opt).__name__.lower()


def _tensors(obj: Any, seen: set[int]) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``opt.state`` and ``opt.param_groups`` (the parameters
    themselves excluded), nested optimizers included; storages shared by several tensors are
    counted once."""
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    param_storages = {p.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]}
    seen: set[int] = set(params)
    held = []
    for o in [opt, *nested_optimizers(opt)]:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
        held += [*_tensors(dict(o.state), seen), *_tensors(groups, seen)]
    return _storage_bytes(held, skip=param_storages)


def _storage_bytes(tensors: Iterable[Tensor], skip: Container[int] = ()) -> int:
    """Bytes of the storages behind ``tensors``, each counted once, those at the addresses in
    ``skip`` left out."""
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
    return sum(storages.values())


def checkpoint_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state_dict()`` and in its nested optimizers' (what a
    checkpoint of the optimizer carries; the parameters are not in it), storages shared by
    several tensors counted once. What :func:`state_bytes` counts beyond this is workspace:
    buffers held from step to step but never saved, because the next step needs nothing in them."""
    seen: set[int] = set()
    return _storage_bytes(t for o in [opt, *nested_optimizers(opt)] for t in _tensors(o.state_dict(), seen))


# ----------------------------------------------------------------------------- sync counting


class SyncCounter(HostReadCounter):
    """Counts host reads of tensor values, each a device-to-host synchronization on a GPU: the
    contract suite's counter (tests/test_contract.py), Python-level reads (item, bool, float,
    ...) and those torch makes inside an op (``aten._local_scalar_dense``: a 0-d tensor given to
    a Scalar overload; ``equal``, ``nonzero``, ...). torch.optim's own reads of its CPU step
    counters are exempted by where they come from (``exempted``), not by which tensor they read;
    see :mod:`tuneless._host_reads`."""


def count_syncs(step: StepFn, steps: int = 1) -> float:
    """Device-to-host reads per step, over ``steps`` steps (state already initialized)."""
    with SyncCounter() as counter:
        for _ in range(steps):
            step()
    return counter.count / steps


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One optimizer to time: ``build(params)`` makes it."""

    label: str                  # shown in the table
    key: str                    # name used for the bytes table and for matching references
    source: str                 # "tuneless", "torch" or "reference"
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    counterpart: tuple[str, ...] = ()  # references: normalized tuneless names it corresponds to


def registry_candidates(only: Sequence[str] | None = None, specs: Sequence[str] = ()) -> list[Candidate]:
    """Every registered optimizer (or those named in ``only``), built with its defaults through
    :func:`tuneless.create`, plus one candidate per spec string in ``specs``."""
    names = list(only) if only else registry.available()
    out = []
    for name in names:
        e = registry.entry(name)  # raises UnknownNameError with close matches
        out.append(Candidate(e.name, e.name, e.source, lambda ps, _n=e.name: tuneless.create(_n, ps)))
    for spec in specs:
        parsed = parse_spec(spec)
        e = registry.entry(parsed.name)
        out.append(Candidate(spec, e.name, e.source, lambda ps, _s=spec: tuneless.create(_s, ps)))
    return out


def _ref(module: str, attr: str, counterpart: tuple[str, ...], key: str,
         make: Callable[[Any, list[Tensor]], torch.optim.Optimizer] | None = None,
         label: str | None = None) -> Candidate | None:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    obj = getattr(mod, attr, None)
    if obj is None:
        return None

    def build(ps: list[Tensor]) -> torch.optim.Optimizer:
        opt = make(obj, ps) if make is not None else obj(ps)
        if hasattr(opt, "train") and callable(opt.train):
            opt.train()  # schedule-free: step() refuses to run in eval mode
        return opt

    return Candidate(label or f"{module}.{attr}", key, "reference", build, counterpart)


def reference_candidates() -> list[Candidate]:
    """The authors' packages that are installed, each with its defaults (Mechanic over
    ``torch.optim.Adam(lr=1.0)``, tuneless Mechanic's default base ``"adam:lr=1.0"``)."""
    specs = [
        _ref("dadaptation", "DAdaptSGD", ("dadaptsgd",), "dadaptsgd"),
        _ref("dadaptation", "DAdaptAdam", ("dadaptadam",), "dadaptadam"),
        _ref("dadaptation", "DAdaptAdaGrad", ("dadaptadagrad",), "dadaptadagrad"),
        _ref("prodigyopt", "Prodigy", ("prodigy",), "prodigy"),
        _ref("dog", "DoG", ("dog",), "dog"),
        _ref("dog", "LDoG", ("ldog",), "ldog"),
        _ref("dowg", "DoWG", ("dowg",), "dowg"),
        _ref("parameterfree", "COCOB", ("cocob", "cocobbackprop"), "cocob"),
        _ref("schedulefree", "SGDScheduleFree", ("sgdschedulefree", "schedulefreesgd", "sfsgd"), "sgdschedulefree"),
        _ref("schedulefree", "AdamWScheduleFree",
             ("adamwschedulefree", "schedulefreeadamw", "sfadamw"), "adamwschedulefree"),
        _ref("mechanic_pytorch", "mechanize", ("mechanic",), "mechanic",
             make=lambda mechanize, ps: mechanize(torch.optim.Adam)(ps, lr=1.0),
             label="mechanic_pytorch.mechanize(Adam)"),
    ]
    return [c for c in specs if c is not None]


def step_function(opt: torch.optim.Optimizer) -> StepFn:
    """``opt.step`` with a constant loss for optimizers that accept one (Polyak needs it)."""
    try:
        takes_loss = isinstance(opt, TunelessOptimizer) or "loss" in inspect.signature(opt.step).parameters
    except (TypeError, ValueError):
        takes_loss = False
    if takes_loss:
        first = next(p for g in opt.param_groups for p in g["params"])
        loss = torch.tensor(1.0, device=first.device)
        return lambda: opt.step(loss=loss)
    return opt.step


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # untested here: no GPU on the development machine
        torch.cuda.synchronize(device)


def make_params(shapes: Shapes, device: torch.device, seed: int = 0) -> list[Tensor]:
    """Parameters with fixed random gradients (no autograd: only the step is timed)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device))
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
        params.append(p)
    return params


@dataclass
class Timed:
    """Per-step times (seconds) of each subject of one block, one value per repetition."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])


def time_interleaved(subjects: dict[str, StepFn], reps: int, steps_per_rep: int,
                     device: torch.device) -> Timed:
    """Time each subject for ``steps_per_rep`` calls per repetition, all subjects in every
    repetition, in an order rotated each time; per-step times are kept per repetition."""
    labels = list(subjects)
    out = Timed({label: [] for label in labels})
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(labels)
            for label in labels[k:] + labels[:k]:
                fn = subjects[label]
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(steps_per_rep):
                    fn()
                synchronize(device)
                out.times[label].append((time.perf_counter() - t0) / steps_per_rep)
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


class BandwidthProbe:
    """In-place ``a.add_(b)`` over ``n`` floats: 12 bytes per element (read a, b; write a)."""

    def __init__(self, n: int, device: torch.device) -> None:
        # full, not zeros: calloc'd zero pages would be read from one shared page
        self.a = torch.full((n,), 1e-3, device=device)
        self.b = torch.full((n,), 1e-9, device=device)
        self.bytes = 12 * n

    def __call__(self) -> None:
        self.a.add_(self.b)

    def bandwidth(self, seconds: float) -> float:
        return self.bytes / seconds


def measure_bandwidth(n: int, reps: int = 5, device: torch.device | str = "cpu") -> float:
    """Bytes per second of the in-place add, median of ``reps`` (after one warm-up)."""
    device = torch.device(device)
    probe = BandwidthProbe(n, device)
    probe()
    timed = time_interleaved({"probe": probe}, reps, 1, device)
    return probe.bandwidth(timed.median("probe"))


# ----------------------------------------------------------------------------- one block


BASE_FOREACH, BASE_FUSED, PROBE, SUBJECT, BASE = "adam-foreach", "adam-fused", "probe", "subject", "base"


@dataclass
class Row:
    set: str
    label: str
    key: str
    source: str
    x_adam_foreach: float = math.nan
    x_adam_fused: float = math.nan
    x_bound: float = math.nan
    bound_bytes: float = math.nan
    bound_note: str = ""
    state_bytes_per_param: float = math.nan      # what a checkpoint carries (checkpoint_bytes)
    workspace_bytes_per_param: float = math.nan  # held between steps beyond that (state_bytes - checkpoint_bytes)
    syncs_per_step: float = math.nan
    median_step_ms: float = math.nan
    bandwidth_gbs: float = math.nan
    error: str | None = None
    reference: str | None = None          # for tuneless rows: the matching reference's label
    speedup_vs_reference: float = math.nan  # reference time / this time (via the Adam ratios)
    ref_state_bytes_per_param: float = math.nan
    # wrappers (an optimizer holding a base optimizer), the base timed alone in the same block:
    base_label: str | None = None
    base_bound_bytes: float = math.nan
    x_base: float = math.nan              # wrapper time / base time
    overhead_bytes: float = math.nan      # (wrapper time - base time) x bandwidth / parameters


def fill_memory(row: Row, opt: torch.optim.Optimizer, n: int) -> None:
    """The row's state and workspace per parameter (see :func:`checkpoint_bytes`)."""
    held, saved = state_bytes(opt), checkpoint_bytes(opt)
    row.state_bytes_per_param = saved / n
    row.workspace_bytes_per_param = max(held - saved, 0) / n


class Baselines:
    """The two Adam baselines over their own copy of a parameter set, kept across blocks."""

    def __init__(self, shapes: Shapes, device: torch.device) -> None:
        self.opts = {
            BASE_FOREACH: torch.optim.Adam(make_params(shapes, device, 1), foreach=True),
            BASE_FUSED: torch.optim.Adam(make_params(shapes, device, 2), fused=True),
        }
        self.steps = {k: o.step for k, o in self.opts.items()}
        for s in self.steps.values():
            s()
            s()
        self.n = numel(shapes)


def measure_block(candidate: Candidate, set_name: str, shapes: Shapes, baselines: Baselines,
                  probe: BandwidthProbe, reps: int, steps_per_rep: int,
                  device: torch.device) -> tuple[Row, Timed | None]:
    """Build ``candidate`` over a fresh copy of ``shapes`` and time it against the baselines
    and the bandwidth probe; fill one row (an ``error`` instead when it cannot run)."""
    row = Row(set_name, candidate.label, candidate.key, candidate.source)
    n = numel(shapes)
    try:
        params = make_params(shapes, device, 3)
        opt = candidate.build(params)
        step = step_function(opt)
        step()  # state initialization
        step()
        row.syncs_per_step = count_syncs(step)
        fill_memory(row, opt, n)
        row.bound_bytes, row.bound_note = bound_bytes(candidate.key, opt)
        subjects = {PROBE: probe, **baselines.steps, SUBJECT: step}
        base = held_base(opt)
        if base is not None:  # a wrapper: time its base alone too, in the same block
            row.base_label = optimizer_name(base)
            try:
                base_opt = rebuild(base, make_params(shapes, device, 4))
                subjects[BASE] = step_function(base_opt)
                subjects[BASE]()
                subjects[BASE]()
                row.base_bound_bytes = bound_bytes(row.base_label, base_opt)[0]
            except Exception as exc:
                row.base_label += f" (not timed: {type(exc).__name__}: {exc})".splitlines()[0][:160]
        timed = time_interleaved(subjects, reps, steps_per_rep, device)
    except Exception as exc:  # a row says what failed; the benchmark goes on
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return row, None
    finally:
        opt = params = step = base = base_opt = subjects = None  # free memory before the next block
        gc.collect()
    fill_ratios(row, timed, n, SUBJECT, probe)
    if BASE in timed.times:
        t, t_base = timed.median(SUBJECT), timed.median(BASE)
        row.x_base = t / t_base
        row.overhead_bytes = (t - t_base) * probe.bandwidth(timed.median(PROBE)) / n
    return row, timed


def held_base(opt: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The base optimizer a wrapper holds (Mechanic, Schedule-Free wrapper), or None."""
    held = nested_optimizers(opt)
    return held[0] if held else None


def rebuild(opt: torch.optim.Optimizer, params: list[Tensor]) -> torch.optim.Optimizer:
    """A new optimizer of ``opt``'s class and settings (its ``defaults`` that the class takes)."""
    cls = type(opt)
    sig = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in sig and k not in ("self", "params")}
    return cls(params, **kwargs)


def fill_ratios(row: Row, timed: Timed, n: int, label: str, probe: BandwidthProbe) -> None:
    t = timed.median(label)
    bw = probe.bandwidth(timed.median(PROBE))
    row.median_step_ms = 1e3 * t
    row.bandwidth_gbs = bw / 1e9
    row.x_adam_foreach = t / timed.median(BASE_FOREACH)
    row.x_adam_fused = t / timed.median(BASE_FUSED)
    row.x_bound = t / (row.bound_bytes * n / bw)


def baseline_rows(set_name: str, blocks: list[Timed], baselines: Baselines, probe: BandwidthProbe) -> list[Row]:
    """Rows of the two baselines: per-block ratios, median over the blocks."""
    rows = []
    for label, title in ((BASE_FOREACH, "torch.optim.Adam(foreach=True)"), (BASE_FUSED, "torch.optim.Adam(fused=True)")):
        opt = baselines.opts[label]
        row = Row(set_name, title, "adam", "baseline")
        row.bound_bytes, row.bound_note = bound_bytes("adam", opt)
        fill_memory(row, opt, baselines.n)
        row.syncs_per_step = count_syncs(baselines.steps[label])
        per_block = []
        for timed in blocks:
            r = Row(set_name, title, "adam", "baseline", bound_bytes=row.bound_bytes)
            fill_ratios(r, timed, baselines.n, label, probe)
            per_block.append(r)
        for attr in ("x_adam_foreach", "x_adam_fused", "x_bound", "median_step_ms", "bandwidth_gbs"):
            values = [getattr(r, attr) for r in per_block]
            setattr(row, attr, statistics.median(values) if values else math.nan)
        rows.append(row)
    return rows


def link_references(rows: list[Row], candidates: list[Candidate]) -> None:
    """For each tuneless row with a reference counterpart in the same set: the speed-up
    (reference time / tuneless time, each through its own block's Adam-foreach ratio) and the
    reference's state memory."""
    counterpart = {c.label: c.counterpart for c in candidates if c.source == "reference"}
    refs = [r for r in rows if r.source == "reference" and r.error is None]
    for row in rows:
        if row.source != "tuneless" or row.error is not None:
            continue
        row.reference, row.speedup_vs_reference, row.ref_state_bytes_per_param = None, math.nan, math.nan
        for ref in refs:
            if ref.set == row.set and norm_name(row.key) in counterpart.get(ref.label, ()):
                row.reference = ref.label
                row.speedup_vs_reference = ref.x_adam_foreach / row.x_adam_foreach
                row.ref_state_bytes_per_param = ref.state_bytes_per_param


def run_set(set_name: str, shapes: Shapes, candidates: list[Candidate], *, reps: int, steps_per_rep: int,
            probe_numel: int, device: torch.device | str = "cpu",
            progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Measure every candidate on one parameter set; the two baseline rows come first."""
    device = torch.device(device)
    probe = BandwidthProbe(probe_numel, device)
    probe()
    baselines = Baselines(shapes, device)
    rows, blocks = [], []
    interrupted = False
    try:
        for i, cand in enumerate(candidates, 1):
            t0 = time.perf_counter()
            row, timed = measure_block(cand, set_name, shapes, baselines, probe, reps, steps_per_rep, device)
            rows.append(row)
            if timed is not None:
                blocks.append(timed)
            status = row.error or (f"x{row.x_adam_foreach:.2f} Adam-foreach, x{row.x_bound:.2f} bound, "
                                   f"state {row.state_bytes_per_param:.1f} + workspace "
                                   f"{row.workspace_bytes_per_param:.1f} B/param, {row.syncs_per_step:g} syncs")
            progress(f"[{set_name} {i}/{len(candidates)}] {cand.label}: {status} ({time.perf_counter() - t0:.1f}s)")
    except KeyboardInterrupt:
        interrupted = True
    out = baseline_rows(set_name, blocks, baselines, probe) + rows
    del baselines, probe
    gc.collect()
    if interrupted:
        raise Interrupted(out)
    return out


class Interrupted(Exception):
    """Raised by :func:`run_set` when stopped (Ctrl-C, SIGTERM): carries the rows measured so far."""

    def __init__(self, rows: list[Row]) -> None:
        super().__init__(f"interrupted after {len(rows)} rows")
        self.rows = rows


# ----------------------------------------------------------------------------- targets


ISSUE3 = {"dadaptsgd", "dadaptadam", "dadaptadagrad", "prodigy", "dog", "ldog", "dowg"}
MAX_X_BOUND = 4.0
ISSUE3_MIN_SPEEDUP = 1.3
#: Mechanic's target (issue 4): its base optimizer's time plus at most two passes over the
#: parameters. Its two passes (see BOUND_BYTES: the row's bound minus its base's) move
#: MECHANIC_PASS_BYTES per parameter; like every step, they may take up to MAX_X_BOUND times their
#: bound. (Two passes of the bandwidth probe's in-place add, 24 bytes per parameter, would be
#: below that bound: no exact Mechanic meets it.)
TARGET_BY_BASE = {"mechanic"}


def check_targets(rows: list[Row]) -> list[str]:
    """Tuneless optimizers missing a target: at most 4x their own bound on every set (Mechanic:
    its base's time plus its two passes over the parameters, at most 4x their bound); on the
    many-small set at least 1.3x faster than the authors' package (issue 3's methods) or faster
    at all (the others); state per parameter (what a checkpoint carries, workspace aside) no
    larger than the reference's. A miss that the ``fused=True`` variant of the same settings
    meets says so."""
    per_row = {id(r): _row_misses(r) for r in rows if r.source == "tuneless"}
    met_fused = {(_unfused(r.label)[0], r.set) for r in rows
                 if r.source == "tuneless" and _unfused(r.label)[1] and not per_row[id(r)]}
    misses = []
    for r in rows:
        if r.source != "tuneless":
            continue
        label, fused = _unfused(r.label)
        note = " (met with fused=True)" if (label, r.set) in met_fused and not fused else ""
        misses += [m + note for m in per_row[id(r)]]
    return misses


def _unfused(label: str) -> tuple[str, bool]:
    """A row's label without ``fused=True`` among its settings, and whether it had it."""
    name, _, settings = label.partition(":")
    parts = [p for p in settings.split(",") if p]
    rest = [p for p in parts if p.replace(" ", "") != "fused=True"]
    return name + (":" + ",".join(rest) if rest else ""), len(rest) < len(parts)


def _row_misses(r: Row) -> list[str]:
    """The targets one tuneless row misses (see :func:`check_targets`)."""
    misses = []
    if r.error is not None:
        return [f"{r.label} [{r.set}]: did not run ({r.error})"]
    if norm_name(r.key) in TARGET_BY_BASE:  # instead of its own bound, which counts its base's at 1x
        limit = MAX_X_BOUND * (r.bound_bytes - r.base_bound_bytes)
        if not r.overhead_bytes <= limit:
            misses.append(f"{r.label} [{r.set}]: costs its base ({r.base_label}) plus {_f(r.overhead_bytes, '.0f')} "
                          f"B/param of bandwidth time > {MAX_X_BOUND:g}x its two passes' bound "
                          f"({_f(limit, 'g')} B/param)")
    elif not r.x_bound <= MAX_X_BOUND:
        misses.append(f"{r.label} [{r.set}]: {r.x_bound:.2f}x its bound ({r.bound_bytes:g} B/param) > {MAX_X_BOUND:g}x")
    if r.reference and r.set == "many-small":
        need = ISSUE3_MIN_SPEEDUP if norm_name(r.key) in ISSUE3 else 1.0
        if not r.speedup_vs_reference >= need:
            misses.append(f"{r.label} [{r.set}]: {r.speedup_vs_reference:.2f}x faster than {r.reference} "
                          f"(target >= {need:g}x)")
    if r.reference and r.state_bytes_per_param > r.ref_state_bytes_per_param + 0.01:
        misses.append(f"{r.label} [{r.set}]: state {r.state_bytes_per_param:.1f} B/param > "
                      f"reference's {r.ref_state_bytes_per_param:.1f}")
    return misses


# ----------------------------------------------------------------------------- output


def _f(x: float, fmt: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


COLUMNS = ("optimizer", "source", "x Adam foreach", "x Adam fused", "x own bound", "bound B/param",
           "state B/param", "workspace B/param", "syncs/step", "x faster than reference")


def _cells(r: Row) -> list[str]:
    if r.error is not None:
        return [r.label, r.source, f"error: {r.error}"] + [""] * (len(COLUMNS) - 3)
    ref = f"{_f(r.speedup_vs_reference)} ({r.reference})" if r.reference else ""
    return [r.label, r.source, _f(r.x_adam_foreach), _f(r.x_adam_fused), _f(r.x_bound), _f(r.bound_bytes, "g"),
            _f(r.state_bytes_per_param, ".1f"), _f(r.workspace_bytes_per_param, ".1f"), _f(r.syncs_per_step, "g"), ref]


def _set_title(set_name: str, sets: dict[str, Shapes]) -> str:
    shapes = sets[set_name]
    return f"{set_name}: {len(shapes)} tensors, {numel(shapes) / 1e6:.2f} M floats"


def format_text(rows: list[Row], sets: dict[str, Shapes]) -> str:
    out = []
    for set_name in sets:
        cells = [list(COLUMNS)] + [_cells(r) for r in rows if r.set == set_name]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        out.append(_set_title(set_name, sets))
        out += ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
        out.append("")
    return "\n".join(out)


def format_markdown(rows: list[Row], sets: dict[str, Shapes], meta: dict[str, Any]) -> str:
    out = ["# Optimizer step speed", ""]
    for k, v in meta.items():
        out += [f"- {k}:"] + [f"  - {item}" for item in v] if isinstance(v, list) else [f"- {k}: {v}"]
    out += ["", "Ratios are medians over interleaved repetitions, against baselines timed in the same block; "
            "'x own bound' divides the step time by (bytes per parameter x parameters / bandwidth), the "
            "bandwidth measured in the same block with an in-place add. 'x faster than reference' is the "
            "reference's step time over tuneless' (above 1: tuneless is faster). State: the tensors a checkpoint "
            "(`state_dict()`) carries; workspace: the other tensors the optimizer holds from step to step "
            "(reused buffers, never saved); per parameter, the parameters themselves excluded. Syncs: "
            "Python-level reads of "
            "tensor values per step (each a device-to-host synchronization on a GPU; torch's host-side step "
            "counters excluded).", ""]
    for set_name in sets:
        out += [f"## {_set_title(set_name, sets)}", ""]
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for r in rows:
            if r.set == set_name:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
        bws = [r.bandwidth_gbs for r in rows if r.set == set_name and not math.isnan(r.bandwidth_gbs)]
        if bws:
            out += ["", f"In-place add bandwidth over the blocks: median {statistics.median(bws):.1f} GB/s "
                    f"(min {min(bws):.1f}, max {max(bws):.1f})."]
        out.append("")
    wrappers = [r for r in rows if r.error is None and r.base_label]
    if wrappers:
        out += ["## Wrappers over their base", "",
                "Each wrapper's base optimizer, rebuilt with the same settings, timed alone in the same block. "
                "'overhead' is the extra time converted to bytes per parameter at the block's bandwidth "
                "(one in-place add over the parameters is 12).", "",
                "| optimizer | set | base | x base | overhead B/param | base's bound B/param |", "|---|---|---|---|---|---|"]
        out += [f"| {r.label} | {r.set} | {r.base_label} | {_f(r.x_base)} | {_f(r.overhead_bytes, '.0f')} | "
                f"{_f(r.base_bound_bytes, 'g')} |" for r in wrappers]
        out.append("")
    misses = check_targets(rows)
    out += ["## Targets", "",
            f"Issues 3 and 4, applied to every tuneless optimizer: each step at most {MAX_X_BOUND:g}x its own bound "
            f"on both sets (Mechanic: its base's time plus its two passes at most {MAX_X_BOUND:g}x their bound, "
            f"{MAX_X_BOUND * MECHANIC_PASS_BYTES:g} B/param); on the many-small set at least {ISSUE3_MIN_SPEEDUP:g}x faster than the authors' package "
            "(issue 3's methods) or faster (the others); state per parameter (what a checkpoint carries) no larger "
            "than the reference's.", ""]
    out += [f"- MISSED: {m}" for m in misses] or ["- every tuneless optimizer measured meets them"]
    out += ["", "## Bytes per parameter used for the bound", "", "| optimizer | bytes | counted |", "|---|---|---|"]
    seen = set()
    for r in rows:
        if r.error is None and (r.key, r.bound_bytes) not in seen:
            seen.add((r.key, r.bound_bytes))
            out.append(f"| {r.key} | {r.bound_bytes:g} | {r.bound_note} |")
    out.append("")
    return "\n".join(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small parameter sets and few repetitions (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated registry names (default: every registered optimizer)")
    ap.add_argument("--spec", action="append", default=[],
                    help="also time this spec string, e.g. 'prodigy:slice_p=11' (repeatable)")
    ap.add_argument("--references", choices=("auto", "all", "none"), default="auto",
                    help="authors' packages to time: all, none, or auto (all, or those matching --only/--spec)")
    ap.add_argument("--sets", default="", help="comma-separated parameter sets (default: many-small,few-large)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per block (default 9; 3 with --quick)")
    ap.add_argument("--steps-per-rep", type=int, default=None, help="steps per repetition (default 2; 1 with --quick)")
    ap.add_argument("--probe-floats", type=int, default=None,
                    help="floats in the bandwidth probe (default 100M; 8M with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", help="device (default cpu; cuda: not measured yet, see docs/gpu.md)")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--json", default=None, help="also write the raw rows as JSON to this file")
    ap.add_argument("--update", default=None, metavar="JSON",
                    help="merge into an earlier run's --json file: its rows for the optimizers measured now are "
                         "replaced (or added), the file is rewritten, and the tables show the merged rows")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="run the measurement in a child process with this environment variable set (read by "
                         "torch or the C library at start, e.g. THP_MEM_ALLOC_ENABLE=1 for huge-page CPU "
                         "allocations); recorded in the file's header; repeatable")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="measure nothing: print (and with --out, write) the tables of an earlier run's --json "
                         "file, with the targets as this version states them")
    return ap.parse_args(argv)


def select_candidates(args: argparse.Namespace) -> list[Candidate]:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    cands = registry_candidates(only or None, args.spec)
    order = {"tuneless": 0, "torch": 1}
    cands.sort(key=lambda c: order.get(c.source, 2))  # stable: alphabetical within a source
    if args.references == "none":
        return cands
    refs = reference_candidates()
    if args.references == "auto" and (only or args.spec):
        wanted = {norm_name(c.key) for c in cands}
        refs = [r for r in refs if wanted & set(r.counterpart) or norm_name(r.key) in wanted]
    return cands + refs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = parse_env(args.env)
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        # set before torch (or the C library) reads them: in a child process of its own
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                               env={**os.environ, **wanted}, check=False)
        return child.returncode
    threads = torch.get_num_threads()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # `timeout` sends SIGTERM: report what was measured anyway
        sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    try:
        return _run(args, argv)
    finally:  # leave the process as found (main is also called from the smoke test)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        if in_main_thread:
            signal.signal(signal.SIGTERM, sigterm)


def render(path: str) -> tuple[str, list[Row]]:
    """The markdown of an earlier run's ``--json`` file (nothing measured) and its rows."""
    with open(path) as f:
        saved = json.load(f)
    meta = saved.get("meta", {})
    titles = str(meta.get("parameter sets")).split("; ")
    matching = []
    for quick in (False, True):
        known = param_sets(quick)
        sets = {name: known[name] for name in known if _set_title(name, known) in titles}
        if [_set_title(name, sets) for name in sets] == titles:
            matching.append(sets)
    if not matching:
        raise SystemExit(f"{path}: its parameter sets ({meta.get('parameter sets')!r}) are none this version knows")
    rows = rows_from_json(saved["rows"])
    link_references(rows, reference_candidates())
    return format_markdown(rows, matching[0], meta), rows


def rows_from_json(items: Iterable[dict[str, Any]]) -> list[Row]:
    """Rows as a ``--json`` file stores them (fields this version no longer has are dropped)."""
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in items]


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` items as a dict (a clear error for anything else)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SystemExit(f"--env {item!r} is invalid; allowed: NAME=VALUE, e.g. THP_MEM_ALLOC_ENABLE=1")
        out[name] = value
    return out


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.render:
        text, rows = render(args.render)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        for m in check_targets(rows):
            print(f"target missed: {m}", file=sys.stderr)
        return 0
    sets = param_sets(args.quick)
    if args.sets:
        chosen = [s.strip() for s in args.sets.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in sets]
        if unknown:
            raise SystemExit(f"unknown parameter set(s) {unknown}; choose from {list(sets)}")
        sets = {s: sets[s] for s in chosen}
    reps = args.reps or (3 if args.quick else 9)
    steps = args.steps_per_rep or (1 if args.quick else 2)
    probe_numel = args.probe_floats or (8_000_000 if args.quick else 100_000_000)
    candidates = select_candidates(args)
    sets_desc = "; ".join(_set_title(name, sets) for name in sets)
    if args.update:  # refuse a mismatched file before spending minutes measuring
        _check_update_file(args.update, sets_desc)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    progress(f"{len(candidates)} optimizers x {len(sets)} parameter sets, {reps} reps x {steps} steps, "
             f"{args.threads} thread(s), device {args.device}")
    started, load_start = time.perf_counter(), _load_average()
    rows: list[Row] = []
    interrupted = False
    for set_name, shapes in sets.items():
        try:
            rows += run_set(set_name, shapes, candidates, reps=reps, steps_per_rep=steps, probe_numel=probe_numel,
                            device=args.device, progress=progress)
        except Interrupted as stop:  # report what was measured
            rows += stop.rows
            interrupted = True
            progress("interrupted: reporting the rows measured so far")
            break
    meta = {
        "parameter sets": sets_desc,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "tuneless": tuneless.__version__,
        "CPU": f"{cpu_model()} ({torch.get_num_threads()} torch thread(s) of {_cpu_count()} CPUs)",
        "device": args.device,
        "repetitions": f"{reps} per block x {steps} steps, medians",
        "machine load (1-min load average at start, end)": f"{load_start}, {_load_average()}",
        **({"environment": " ".join(f"{k}={v}" for k, v in parse_env(args.env).items())} if args.env else {}),
        "run time": f"{time.perf_counter() - started:.0f} s",
        "command": "python benchmarks/step_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if interrupted:
        meta["INTERRUPTED"] = "the run was stopped; the tables are incomplete"
    if args.update:
        rows, meta = merge_into(args.update, rows, meta)
    link_references(rows, candidates + reference_candidates())
    text = format_markdown(rows, sets, meta)
    print(text if args.markdown else format_text(rows, sets))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    for path in {p for p in (args.json, args.update) if p}:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    for m in check_targets(rows):
        progress(f"target missed: {m}")
    progress(f"done in {time.perf_counter() - started:.0f}s")
    return 130 if interrupted else 0


SOURCE_ORDER = {"baseline": 0, "tuneless": 1, "torch": 2, "reference": 3}


def merge_into(path: str, new_rows: list[Row], new_meta: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    """The rows of an earlier run (``--json`` file at ``path``) with ``new_rows`` replacing or
    adding the optimizers measured now (every row is normalized by its own block's baselines,
    so rows of two runs compare; the earlier run's baseline rows are kept)."""
    old = _check_update_file(path, new_meta["parameter sets"])
    meta = dict(old["meta"])
    rows = rows_from_json(old["rows"])
    fresh = {(r.set, r.label): r for r in new_rows if r.source != "baseline"}
    rows = [fresh.pop((r.set, r.label), r) for r in rows] + list(fresh.values())
    position = {(r.set, r.label): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (SOURCE_ORDER.get(r.source, 9),
                             r.label if r.source in ("tuneless", "torch") else "",
                             position[(r.set, r.label)]))
    labels = sorted({r.label for r in new_rows if r.source != "baseline"})
    update = (f"{new_meta['date']}: re-measured {', '.join(labels)} ({new_meta['repetitions']}; "
              f"load {new_meta['machine load (1-min load average at start, end)']}; {new_meta['command']})")
    meta["updates"] = [*meta.get("updates", []), update] if isinstance(meta.get("updates"), list) else [update]
    return rows, meta


def _check_update_file(path: str, sets_desc: str) -> dict[str, Any]:
    with open(path) as f:
        old = json.load(f)
    theirs = old.get("meta", {}).get("parameter sets")
    if theirs != sets_desc:
        raise SystemExit(f"--update {path}: its parameter sets ({theirs}) differ from this run's ({sets_desc}); "
                         "run with the same --quick/--sets options")
    return old


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _load_average() -> str:
    import os

    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
