#!/usr/bin/env bash
# The GPU benchmark in one command (issue 15), from any folder:
#
#   bash benchmarks/gpu/run_all.sh              # on the lent GPU machine (≤ 8 min)
#   bash benchmarks/gpu/run_all.sh --rehearse   # here, on the CPU: every phase, tiny sizes
#
# Phases, each writing its JSON into $OUT as it ends (a run cut short keeps what it did):
#   env       python/torch/numba/cupy versions, nvidia-smi (if any), wheels installed
#   ceilings  device copy GB/s, pinned H2D/D2H, fp16 matmul TFLOP/s          (torch)
#   kernels   pre/post/uncertainty CUDA kernels in GB/s vs a device copy     (numba-cuda)
#   model     model-only fp16 channels_last, eager + CUDA graph, batch 8/16/32
#   e2e       `segloop segment --runtime torch --device cuda --stats --json`: one 2048²
#             warm-up, then 20480²; GPU busy fraction and stage breakdown
#   monai     MONAI sliding_window_inference, same GPU, same fp16 weights (8192²)
#   summary   gpu_<device>.json (+ .md): end_to_end_mpx_s, model_only_mpx_s, efficiency,
#             gpu_busy, kernel_pre/post_fraction_of_copy, vs_monai; on a GPU also copied
#             to benchmarks/results/
# $OUT holds exactly 8 files (the device tool returns at most 8).
#
# The GPU machine has python3 (3.12) with torch + CUDA, cupy, numba-cuda and no registry:
# modules it lacks (zarr, zarrs, numcodecs, donfig, google-crc32c, msgspec, monai) come from
# benchmarks/gpu/wheels/ (made by wheels.sh where PyPI is reachable, ~19 MB, carried),
# installed only when they do not import, with `pip --target` into a scratch folder on
# PYTHONPATH, never over the image's packages. segloop itself is put on PYTHONPATH as a
# folder of links to this checkout (server/segloop/ → segloop, kernels/segloop/kernels/ →
# segloop.kernels).
#
# --rehearse: CPU torch (float32), numba's CUDA simulator for the kernels, a 512² end to
# end after a 256² warm-up, a 256² MONAI run; OUT defaults to a new temporary folder and
# nothing is copied to benchmarks/results/. Its numbers are CPU numbers (files say
# "rehearsal": true, device "cpu-rehearsal"). tests/test_gpu_rehearsal.py runs it in CI.
# Exit status: 0 when every phase succeeded, 1 when one failed (the summary still written).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
REHEARSE=0
case "${1:-}" in
    --rehearse) REHEARSE=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu/run_all.sh [--rehearse]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "run_all.sh: no $PY on PATH (set PYTHON)" >&2; exit 2; }
SCRATCH=$(mktemp -d -t segloop-gpu.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
if [ "$REHEARSE" = 1 ]; then
    OUT=${OUT:-$(mktemp -d -t segloop-gpu-rehearse.XXXXXX)}
    export SEGLOOP_GPU_REHEARSE=1
    DEVICE=cpu SIZE=${SIZE:-512} WARM=${WARM_SIZE:-256} MONAI_SIZE=${MONAI_SIZE:-256}
    TILE=64 BATCH=2 RESULTS="" SIM=1
    T_ENV=120 T_CEIL=300 T_KERN=300 T_MODEL=300 T_E2E=300 T_MONAI=300 T_SUM=120
else
    OUT=${OUT:-benchmarks/results/gpu_run}
    DEVICE=cuda SIZE=${SIZE:-20480} WARM=${WARM_SIZE:-2048} MONAI_SIZE=${MONAI_SIZE:-8192}
    TILE=512 BATCH=16 RESULTS=benchmarks/results SIM=0
    # per-phase limits, 470 s in all: the whole run stays under 8 min even if each
    # phase ran to its limit (expected: well under)
    T_ENV=30 T_CEIL=40 T_KERN=60 T_MODEL=60 T_E2E=170 T_MONAI=90 T_SUM=20
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$SCRATCH/numba_cache}
export SEGLOOP_MODEL_REPOSITORY=${SEGLOOP_MODEL_REPOSITORY:-$ROOT/model_repository}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

# --- environment: missing wheels, segloop on PYTHONPATH ---------------------------------
SITE=$SCRATCH/site
WHEELS=${WHEELS:-$ROOT/benchmarks/gpu/wheels}
mkdir -p "$SITE/segloop"
installed=()
for pair in google_crc32c:google_crc32c donfig:donfig numcodecs:numcodecs zarr:zarr zarrs:zarrs \
    msgspec:msgspec monai:monai; do
    mod=${pair%%:*} whl=${pair#*:}
    PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "import $mod" 2>/dev/null && continue
    f=$(ls "$WHEELS"/"$whl"-*.whl 2>/dev/null | head -1)
    if [ -z "$f" ]; then
        echo "run_all.sh: $mod does not import and $WHEELS has no $whl wheel;" \
            "run benchmarks/gpu/wheels.sh where PyPI is reachable and carry that folder" >&2
        exit 2
    fi
    installed+=("$f")
done
if [ ${#installed[@]} -gt 0 ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "${installed[@]}" || exit 2
fi
for entry in "$ROOT"/server/segloop/*; do ln -s "$entry" "$SITE/segloop/$(basename "$entry")"; done
ln -s "$ROOT/kernels/segloop/kernels" "$SITE/segloop/kernels"
export PYTHONPATH=$SITE:$ROOT/benchmarks/gpu${PYTHONPATH:+:$PYTHONPATH}
export SEGLOOP_WHEELS_INSTALLED="${installed[*]##*/}"

failed=()
phase() {  # phase NAME LIMIT_S COMMAND…: run it, note a failure, carry on
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s)" >&2
    if timeout --signal=TERM --kill-after=10 "$limit" "$@"; then
        echo "== $name done in $((SECONDS - t0)) s" >&2
    else
        echo "== $name FAILED (exit $?) after $((SECONDS - t0)) s" >&2
        failed+=("$name")
    fi
}

phase env "$T_ENV" "$PY" - "$OUT" <<'EOF'
import importlib, os, shutil, subprocess, sys
from pathlib import Path
from common import write_phase
versions = {}
for m in ("numpy", "torch", "numba", "numba_cuda", "cupy", "zarr", "monai", "onnxruntime"):
    try:
        versions[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as exc:  # absent on one machine or the other: recorded, not fatal
        versions[m] = f"absent ({type(exc).__name__})"
smi = None
if shutil.which("nvidia-smi"):
    q = "name,driver_version,memory.total,clocks.max.sm"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() or None
try:
    import torch
    cuda = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
except ImportError:
    cuda = {"torch_cuda": None, "cuda_available": None}
write_phase(Path(sys.argv[1]), "env", {
    "python": sys.version.split()[0], "versions": versions, "nvidia_smi": smi, **cuda,
    "cpus": os.cpu_count(),
    "wheels_installed": os.environ.get("SEGLOOP_WHEELS_INSTALLED", "").split(),
})
EOF

if [ "$REHEARSE" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    2>/dev/null; then
    echo "run_all.sh: torch sees no CUDA GPU here (env.json written to $OUT); on a machine" \
        "without one, run: bash benchmarks/gpu/run_all.sh --rehearse" >&2
    exit 2
fi
phase ceilings "$T_CEIL" "$PY" benchmarks/gpu/ceilings.py --out "$OUT"
if [ "$SIM" = 1 ]; then
    phase kernels "$T_KERN" env NUMBA_ENABLE_CUDASIM=1 "$PY" benchmarks/gpu/kernels.py --out "$OUT"
else
    phase kernels "$T_KERN" "$PY" benchmarks/gpu/kernels.py --out "$OUT"
fi
phase model "$T_MODEL" "$PY" benchmarks/gpu/model.py --out "$OUT"
phase e2e "$T_E2E" "$PY" benchmarks/gpu/e2e.py --out "$OUT" --size "$SIZE" --warm-size "$WARM" \
    --tile "$TILE" --batch "$BATCH" --device "$DEVICE" --work "$SCRATCH"
phase monai "$T_MONAI" "$PY" benchmarks/gpu/monai_peer.py --out "$OUT" --size "$MONAI_SIZE" \
    --tile "$TILE" --batch "$BATCH" --work "$SCRATCH"
phase summary "$T_SUM" "$PY" benchmarks/gpu/summary.py --out "$OUT" ${RESULTS:+--results "$RESULTS"}
echo "run_all.sh: results in $OUT (${SECONDS} s)${failed[*]:+; failed: ${failed[*]}}" >&2
[ ${#failed[@]} -eq 0 ]
