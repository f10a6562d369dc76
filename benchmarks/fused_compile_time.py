"""How long the first fused step takes (the compile), and how many variants it compiles.

Each optimizer runs in a process of its own with an empty Inductor cache (the cost a user pays
in a fresh environment; torch's on-disk cache shortens later processes), on a transformer-shaped
list of tensors (``benchmarks/step_speed.py``'s many-small set by default), one thread:

    python benchmarks/fused_compile_time.py [--optimizers tuneless,prodigy] [--set few-large]

For each: the first step (compile and run), the second step, and the compiled variants of each
kernel: one per dtype, device, constant and size-class signature (``tuneless.optim._fused``).
Wall-clock seconds on this machine; they vary with its load, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = ("many-small", "few-large")


def child(name: str, which: str) -> dict:
    import torch

    import tuneless
    from tuneless.optim import _fused

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import step_speed

    torch.set_num_threads(1)
    shapes = step_speed.transformer_shapes() if which == "many-small" else step_speed.large_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    before = {id(k): len(k._variants) for k in _fused.KERNELS}
    opt = tuneless.create(name, params, fused=True)
    loss = torch.tensor(1.0)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        opt.step(loss=loss)
        times.append(time.perf_counter() - start)
    variants = {getattr(k.per_tensor, "__name__", "kernel"): len(k._variants) - before.get(id(k), 0)
                for k in _fused.KERNELS if len(k._variants) > before.get(id(k), 0)}
    failed = [getattr(k.per_tensor, "__name__", "kernel") for k in _fused.KERNELS if k.failed]
    return {"tensors": len(params), "first_s": times[0], "second_ms": times[1] * 1e3, "variants": variants,
            "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="tuneless", help="comma-separated registry names (fused=True)")
    parser.add_argument("--set", default="many-small", choices=SETS, help="the list of tensors")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per optimizer")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.set)))
        return 0
    names = [n.strip() for n in args.optimizers.split(",")]
    if "" in names:
        parser.error(f"--optimizers = {args.optimizers!r}: an empty name")
    print("| optimizer | tensors | first step (compile) | second step | variants compiled |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            try:
                done = subprocess.run([sys.executable, __file__, "--child", name, "--set", args.set], env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"| {name} | | timeout after {args.timeout:.0f} s | | |", flush=True)
                continue
        if done.returncode != 0:
            print(f"| {name} | | error: {done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else '?'} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        kernels = ", ".join(f"{k}: {n}" for k, n in r["variants"].items()) or "none"
        note = f" (fell back uncompiled: {', '.join(r['failed'])})" if r["failed"] else ""
        print(f"| {name} | {r['tensors']} | {r['first_s']:.1f} s | {r['second_ms']:.1f} ms | {kernels}{note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
