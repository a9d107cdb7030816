#!/usr/bin/env bash
# perf_analyzer sweep of the `segloop` ensemble on a local `segloop triton serve`.
#
#   bash benchmarks/triton/perf_analyzer.sh [--window 608] [--batch 4] [--max-concurrency 8]
#
# Sets up the working perf_analyzer with `make perf-analyzer` (the PyPI `perf-analyzer`
# package is a placeholder on this glibc; the binary inside the tritonclient 2.51 wheel
# works with Debian's libb64 and libcudart from the nvidia-cuda-runtime-cu12 wheel, in its
# own venv, as it pins numpy<2), starts the server from the project venv, sweeps client concurrency over gRPC with random
# uint8 windows, and writes CSV + a throughput/latency PNG to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
WINDOW=608 BATCH=4 MAXC=8
while [ $# -gt 0 ]; do
    case "$1" in
        --window) WINDOW=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --max-concurrency) MAXC=$2; shift 2 ;;
        *) echo "perf_analyzer.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
PV=.venv-perf
make -s perf-analyzer
CUDART=$("$PV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')
make -s install
free_port() { .venv/bin/python -c 'from segloop.triton.server import free_port; print(free_port())'; }
HTTP=$(free_port) GRPC=$(free_port) METRICS=$(free_port)
LOG=$(mktemp -t segloop-triton-XXXX.log)
.venv/bin/segloop triton serve --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 240); do
    curl -sf "localhost:$HTTP/v2/models/segloop/ready" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.5
done
mkdir -p benchmarks/results
NAME="benchmarks/results/triton_perf_analyzer_w${WINDOW}_b${BATCH}_cpu$(nproc)"
LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PV/bin/perf_analyzer" \
    -m segloop -u "localhost:$GRPC" -i grpc -b "$BATCH" --shape "TILES:$WINDOW,$WINDOW,3" \
    --concurrency-range "1:$MAXC:1" --measurement-mode count_windows --measurement-request-count 8 --stability-percentage 30 \
    -f "$NAME.csv" | tee "$NAME.txt"
"$PV/bin/python" - "$NAME" "$WINDOW" "$BATCH" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
name, window, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = sorted(csv.DictReader(open(f"{name}.csv")), key=lambda r: int(r["Concurrency"]))
conc = [int(r["Concurrency"]) for r in rows]
ips = [float(r["Inferences/Second"]) for r in rows]  # windows per second
core = window - 96  # output pixels per window (halo 48 cropped on each side)
mpx = [v * core * core / 1e6 for v in ips]
p50 = [float(r["p50 latency"]) / 1000 for r in rows]
p99 = [float(r["p99 latency"]) / 1000 for r in rows]
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(conc, mpx, "o-", label="throughput (output Mpx/s)")
ax.set_xlabel("client concurrency (requests in flight)")
ax.set_ylabel("Mpx/s")
ax.set_ylim(bottom=0)
ax2 = ax.twinx()
ax2.plot(conc, p50, "s--", color="tab:orange", label="p50 latency")
ax2.plot(conc, p99, "^--", color="tab:red", label="p99 latency")
ax2.set_ylabel("latency per request (ms)")
fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
ax.set_title(f"segloop ensemble, batch {batch} × {window}² uint8 windows")
fig.tight_layout()
fig.savefig(f"{name}.png", dpi=120)
print(f"wrote {name}.csv and {name}.png")
PY
