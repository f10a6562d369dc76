"""Does a fused step compiled on small tensors run at full speed on large ones?

On the one GPU check on record (docs/gpu.md), the first fused step timed on 144 M floats
(AdamHD, after its kernels had been compiled on a small problem) did not finish in minutes.
This script separates the suspects. Each case runs in a child process of its own, with an
Inductor cache of its own (so that no compiled kernel is shared) and a time limit:

* ``small first``: two steps on a tiny model (the kernels compile there, with dynamic sizes),
  then the large set;
* ``large first``: the large set only (the kernels compile at its sizes);
* ``vectorized``: the large set, ``fused=False``.

A reference row times ``torch.optim.AdamW(fused=True)`` (``foreach`` on the CPU) on the same
set, in a process of its own, and every cell gives its ratio to that row.

For each, the median step time over the timed steps (CUDA events on a GPU, the wall clock on
the CPU), or ``timeout``. A case that times out prints where it was (``faulthandler``) and the
last step it reached (each step is logged on the child's stderr). Usage::

    python benchmarks/fused_at_scale.py                       # the GPU, 12 tensors of 4 M floats
    python benchmarks/fused_at_scale.py --device cpu --numel 200000 --tensors 4   # a dry run

The output is a markdown table (``--out`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("small first", "large first", "vectorized")
REFERENCE = "torch AdamW"


def child(name: str, case: str, device: str, numel: int, tensors: int, steps: int) -> dict:
    """One case, in this process: the median step time in milliseconds."""
    import torch

    import tuneless

    dev = torch.device(device)
    loss = torch.tensor(1.0, device=dev)

    def build(sizes):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dev)) for n in sizes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        if name == REFERENCE:
            opt = torch.optim.AdamW(ps, lr=1e-3, **({"fused": True} if dev.type == "cuda" else {"foreach": True}))
            return ps, lambda: opt.step()
        opt = tuneless.create(name, ps, fused=case != "vectorized")
        return ps, lambda: opt.step(loss=loss)

    def log(what):
        print(f"[{time.perf_counter() - began:.1f}s] {what}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    if case == "small first":
        _, step = build([6, 9, 12])
        for _ in range(2):
            step()
        log("two steps on the small model")
    _, step = build([numel + 7 * i for i in range(tensors)])
    log("large set built")
    for i in range(3):  # compiles (large first) or reuses (small first); a second compile may follow
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        log(f"untimed large step {i + 1} done")
    times = []
    for i in range(steps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        log(f"timed step {i + 1}")
    return {"ms": statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default="adam_hd,tuneless,prodigy", help="comma-separated registry names")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--numel", type=int, default=4 * 2**20, help="floats per tensor of the large set")
    ap.add_argument("--tensors", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import faulthandler

        faulthandler.dump_traceback_later(max(args.timeout - 5, 1), exit=False)
        name, case = args.child.split("|")
        print(json.dumps(child(name, case, args.device, args.numel, args.tensors, args.steps)))
        return 0
    for name in args.optimizers.split(","):
        if name.strip() == "":
            ap.error(f"--optimizers = {args.optimizers!r}: an empty name")
    cases = [c.strip() for c in args.cases.split(",")]
    for c in cases:
        if c not in CASES:
            ap.error(f"--cases = {args.cases!r}: {c!r} is not one of {', '.join(CASES)}")
    if args.timeout <= 10:
        ap.error(f"--timeout = {args.timeout}: must be more than 10 seconds (the child dumps its stack 5 s before)")

    def run(name: str, case: str) -> float | None:
        """One case in a child process with its own Inductor cache: the median ms, or None."""
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            command = [sys.executable, __file__, "--child", f"{name}|{case}", "--device", args.device,
                       "--numel", str(args.numel), "--tensors", str(args.tensors), "--steps", str(args.steps),
                       "--timeout", str(args.timeout)]
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired as stopped:
                err = stopped.stderr.decode() if isinstance(stopped.stderr, bytes) else (stopped.stderr or "")
                print(f"{name} [{case}]: timeout after {args.timeout:.0f} s\n{err[-3000:]}", flush=True)
                return None
        if done.returncode != 0:
            print(f"{name} [{case}]: error\n{done.stderr[-2000:]}", flush=True)
            return None
        ms = json.loads(done.stdout.strip().splitlines()[-1])["ms"]
        print(f"{name} [{case}]: {ms:.2f} ms", flush=True)
        return ms

    reference = run(REFERENCE, "vectorized")
    ref_name = "AdamW(fused=True)" if args.device.startswith("cuda") else "AdamW(foreach=True)"

    def cell(ms: float | None, ratio: bool = True) -> str:
        if ms is None:
            return "timeout or error"
        return f"{ms:.2f} ms" + (f" ({ms / reference:.2f}x)" if reference and ratio else "")

    lines = [f"# Fused steps at scale ({args.device}; {args.tensors} tensors of about {args.numel:,} floats, "
             f"median of {args.steps} steps, {args.timeout:.0f} s per case)", "",
             f"Reference: torch.optim.{ref_name}, {cell(reference, ratio=False)}; the ratios are to it.", "",
             "| optimizer | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for name in args.optimizers.split(","):
        lines.append(f"| {name} | " + " | ".join(cell(run(name, case)) for case in cases) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
