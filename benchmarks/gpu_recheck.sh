#!/usr/bin/env bash
# The second GPU check: what the first (benchmarks/gpu_check.sh, docs/gpu.md) left unmeasured.
#
#     OUT=out/gpu bash benchmarks/gpu_recheck.sh
#
# Stage 1, timed, alone on the machine: benchmarks/fused_at_scale.py, the fused step on a large
# set after a compile on a tiny model and after a compile at the large sizes (CASES; add
# "vectorized" for the default path), each against torch.optim.AdamW(fused=True) timed on the
# same set. The first check hung in a fused step at that size; the second found why (a kernel
# compiled on a toy, reused at 10^5 times the size). Since size classes are part of a variant's
# key, "small first" should take the time of "large first": that is what this stage checks next.
# Stage 2, until the deadline: the device-aware test files on CUDA (TUNELESS_TEST_DEVICE=cuda),
# with more workers than the first check had, which ran a third of them; among them the tests of
# the fixes made after the first check's time was spent (a CPU tensor lr with CUDA parameters).
# Files are packed into $OUT/recheck.tar.gz. DEVICE=cpu TOTAL=120 makes a dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
OUT=${OUT:-out/gpu}
WORK=${WORK:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TOTAL=${TOTAL:-530}           # seconds for the whole script
CASE=${CASE:-75}              # seconds per fused_at_scale case (a compile on the H200 machine: 20-40 s)
CASES=${CASES:-small first,large first}
SCALE_OPTIMIZERS=${SCALE_OPTIMIZERS:-adam_hd,tuneless}
SCALE_ARGS=${SCALE_ARGS:-}    # e.g. "--numel 200000 --tensors 4" for a dry run
WORKERS=${WORKERS:-14}
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
pack() { tar czf "$OUT/recheck.tar.gz" -C "$WORK" .; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  echo "cpus: $(nproc)"; } > "$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt"

stamp "stage 1: fused_at_scale"
"$PYTHON" benchmarks/fused_at_scale.py --device "$DEVICE" --optimizers "$SCALE_OPTIMIZERS" --timeout "$CASE" --cases "$CASES" \
  $SCALE_ARGS --out "$WORK/fused_at_scale.md" > "$WORK/fused_at_scale.log" 2>&1
echo "fused_at_scale exit status: $?"
cat "$WORK/fused_at_scale.md" 2>/dev/null
pack

left=$(( TOTAL - ($(date +%s) - start) - 25 ))
stamp "stage 2: the device-aware tests on $DEVICE, ${left}s"
TUNELESS_TEST_DEVICE=$DEVICE timeout -k 15 -s INT "$left" "$PYTHON" -m pytest -q -n "$WORKERS" --dist load \
  -p no:cacheprovider --timeout 150 -rfEs --junitxml "$WORK/pytest_cuda.xml" tests/test_fused.py tests/test_contract.py tests/test_resume.py \
  tests/test_nonfinite.py tests/test_low_precision.py > "$WORK/pytest_cuda.log" 2>&1
echo "pytest exit status: $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/pytest_cuda.log" | cut -c1-300 | tail -n 40
pack
stamp "done"
