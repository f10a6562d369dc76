#!/usr/bin/env bash
# The GPU check: everything tuneless checks on CUDA, in one call of a lent GPU machine.
#
# Run from the repository root, on a machine with CUDA, torch, triton, pytest, pytest-xdist and
# scikit-learn (the device machine's image has them), with the prepared checker copied into
# .gpu/ (see ../shared/gpu/README.md):
#
#     OUT=out/gpu bash benchmarks/gpu_check.sh
#
# Stage 1 runs in parallel (correctness; nothing in it is timed):
#   - check_gpu.py --skip-timing, in three shards: no host sync after the first step (under
#     torch.cuda.set_sync_debug_mode("error")), CUDA against the CPU in float64, the fused
#     (Triton) kernels against the vectorized path;
#   - the device-aware test files on CUDA (TUNELESS_TEST_DEVICE=cuda): the contract, exact
#     resume, the non-finite skip, the fused kernels, bfloat16 progress;
#   - a compile probe: Tuneless(fused=True) on CUDA must compile, not fall back;
#   - `tuneless bench` on CUDA: the GPU-sized workloads in float32, and the transformer under
#     bfloat16 autocast, stored in SQLite (whatever finishes in the stage's time).
# Stage 2 runs alone (timed): first benchmarks/fused_at_scale.py (does a fused step compiled on
# small tensors run at speed on large ones? The first GPU check hung there), then check_gpu.py in
# full, step time against torch's fused AdamW.
#
# Every stage has a time limit, so the whole script ends in about 8 minutes. Each stage's files
# are packed into $OUT/stage1.tar.gz and $OUT/stage2.tar.gz as it ends (the device tool brings
# back few files). docs/gpu.md has the results of the run on record. DEVICE=cpu STAGE1=60
# STAGE2=30 makes a dry run of the plumbing on a machine without a GPU.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
OUT=${OUT:-out/gpu}
WORK=${WORK:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
CHECK=${CHECK:-.gpu/check_gpu.py}
PYTHON=${PYTHON:-python3}
STAGE1=${STAGE1:-240}
STAGE2=${STAGE2:-200}
SCALE=${SCALE:-150}  # seconds for fused_at_scale.py (AdamHD's three cases), part of stage 2
# stores of an earlier call to resume (the oracle's runs are kept; failed runs are run again)
BENCH_STORES=${BENCH_STORES:-}
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  echo "cpus: $(nproc)"
} > "$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt"

stamp "stage 1"
mapfile -t shards < <("$PYTHON" -c "
import tuneless
names = tuneless.available()
for i in range(3):
    print(','.join(names[i::3]))")
for i in 0 1 2; do
  timeout -k 20 "$STAGE1" "$PYTHON" "$CHECK" --device "$DEVICE" --skip-timing --only "${shards[$i]}" --out "$WORK/shard$i.md" > "$WORK/shard$i.log" 2>&1 &
done

TUNELESS_TEST_DEVICE=$DEVICE timeout -k 30 -s INT "$STAGE1" "$PYTHON" -m pytest -q -n 8 --dist load -p no:cacheprovider \
  --timeout 150 -rfEs tests/test_contract.py tests/test_resume.py tests/test_nonfinite.py tests/test_fused.py \
  tests/test_low_precision.py > "$WORK/pytest_cuda.log" 2>&1 &

DEVICE=$DEVICE timeout -k 20 "$STAGE1" "$PYTHON" - > "$WORK/compile_probe.log" 2>&1 <<'EOF' &
import os
import warnings
import torch
import tuneless
device = torch.device(os.environ["DEVICE"])
ps = [torch.nn.Parameter(torch.randn(64, 32, device=device)) for _ in range(20)]
opt = tuneless.Tuneless(ps, fused=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        opt.zero_grad()
        loss = sum(((p - 1) ** 2).sum() for p in ps)
        loss.backward()
        opt.step(loss=loss.detach())
fallbacks = [str(w.message) for w in caught if "fused step" in str(w.message)]
for text in fallbacks:
    print("WARNING:", text[:300])
print("Tuneless(fused=True) on", device, "compiled" if not fallbacks else "FELL BACK (see the warnings)",
      "and stepped; step size", float(opt.param_groups[0][tuneless.STEP_SIZE_KEY]))
EOF

if [ -n "$BENCH_STORES" ]; then cp "$BENCH_STORES"/bench_cuda*.sqlite "$WORK"/; fi
bench() { timeout -k 20 "$STAGE1" "$PYTHON" -c "import sys; from tuneless.cli import main; sys.exit(main())" bench "$@"; }
bench --problems transformer_lm:size=medium resnet_digits:size=medium finetune_digits --optimizers tuneless prodigy \
  --seeds 0 --device "$DEVICE" --workers 3 --retry-failed --db "$WORK/bench_cuda.sqlite" --no-report --quiet > "$WORK/bench_cuda.log" 2>&1 &
bench --problems transformer_lm:size=medium --optimizers tuneless prodigy --seeds 0 --device "$DEVICE" --dtype bfloat16 \
  --workers 3 --retry-failed --db "$WORK/bench_cuda_bf16.sqlite" --no-report --quiet > "$WORK/bench_cuda_bf16.log" 2>&1 &
wait
stamp "stage 1 done"
tar czf "$OUT/stage1.tar.gz" -C "$WORK" .
tail -n 3 "$WORK/pytest_cuda.log" "$WORK/compile_probe.log"

stamp "stage 2"
timeout -k 20 "$SCALE" "$PYTHON" benchmarks/fused_at_scale.py --device "$DEVICE" --optimizers adam_hd \
  --timeout $(( SCALE / 3 - 5 )) --out "$WORK/fused_at_scale.md" > "$WORK/fused_at_scale.log" 2>&1
echo "fused_at_scale exit status: $?"
cp "$WORK/fused_at_scale.md" "$OUT/fused_at_scale.md" 2>/dev/null
# faulthandler: where the run is, should it be near its limit
timeout -k 20 "$STAGE2" "$PYTHON" -c "
import faulthandler, runpy, sys
faulthandler.dump_traceback_later($STAGE2 - 15, exit=False)
sys.argv = ['check_gpu.py', '--device', '$DEVICE', '--out', '$WORK/gpu.md']
runpy.run_path('$CHECK', run_name='__main__')" > "$WORK/gpu.log" 2>&1
echo "check_gpu exit status: $?"
cp "$WORK/gpu.md" "$OUT/gpu.md" 2>/dev/null
tar czf "$OUT/stage2.tar.gz" -C "$WORK" gpu.md gpu.log fused_at_scale.md fused_at_scale.log 2>/dev/null
stamp "done"
cat "$WORK"/shard*.md "$WORK/gpu.md" 2>/dev/null | grep -v "^$" | head -80
