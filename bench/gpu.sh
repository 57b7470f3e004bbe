#!/usr/bin/env bash
# medfed on a machine with an NVIDIA GPU, where medfed is installed (`pip install -e .` on the
# CUDA build of torch): the CUDA tests, the DP-SGD step on the GPU against the CPU, and a
# deployed federation (TLS SuperLink, three SuperNodes) whose sites train on the GPU, then the
# same run with the sites on the CPU. Everything listens on 127.0.0.1 and is stopped at the end.
#
#   bench/gpu.sh [OUT_DIR]        # default: bench/out/gpu; ROUNDS=N (default 5) per run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench/out/gpu}")
PY=${PYTHON:-python3}
BIN=$(dirname "$(command -v "$PY")")
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 60); do  # medfed stops its Flower processes on TERM; give it 30 s
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.5
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU: nothing to measure"; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

echo "== CUDA tests"
tests_ok=0
"$PY" -m pytest -q -p no:cacheprovider tests/training/test_cuda.py >"$OUT/test_cuda.log" 2>&1 || tests_ok=$?
tail -3 "$OUT/test_cuda.log"

echo "== DP-SGD step: CNN 64 px, batch 32 (median of 5)"
"$PY" - "$OUT/dp_step.json" <<'EOF'
import json, sys
import torch
from bench.run import QUICK, dp_overhead

rows = {}
for name, threads in (("cuda", 1), ("cpu", torch.get_num_threads())):
    torch.set_num_threads(threads)
    rows[name] = dp_overhead(QUICK, name)
    rows[name]["threads"] = threads
    print(f"{name:5s} ({threads:2d} threads) plain {rows[name]['plain_median_s']*1e3:7.2f} ms  "
          f"DP {rows[name]['dp_median_s']*1e3:7.2f} ms  ratio {rows[name]['ratio']:.2f}")
print(f"GPU speed-up of a DP step: {rows['cpu']['dp_median_s'] / rows['cuda']['dp_median_s']:.1f}x")
json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF

echo "== deployed federation: 3 hospitals, 1,000 images each, CNN 64 px, DP epsilon 8"
SITES=(hospital-01 hospital-02 hospital-03)
"$BIN/medfed" synth --sites 3 --images-per-site 1000 --test-images 400 --seed 0 \
    --out "$WORK/data" >/dev/null
"$BIN/medfed" provision --project gpu --server-host 127.0.0.1 --port 19092 \
    --sites "$(IFS=,; echo "${SITES[*]}")" --out "$WORK/kits" >/dev/null
# the app as one clean copy (the bundle `flwr run` builds from this folder, nothing else)
"$PY" -c 'import sys; from pathlib import Path; from bench.federation import snapshot_app; print(snapshot_app(Path(sys.argv[1]))[1])' "$WORK/app" > "$WORK/fab"
for s in "${SITES[@]}"; do
    "$BIN/medfed" site approve --kit "$WORK/kits/sites/$s" --fab-hash "$(cat "$WORK/fab")" >/dev/null
done
"$BIN/medfed" server --kit "$WORK/kits/server" --state "$WORK/server" --host 127.0.0.1 \
    --port 19092 --health-port 19098 --metrics-port 19400 >"$OUT/server.log" 2>&1 &
PIDS+=($!)
timeout 120 bash -c "until grep -q 'medfed server ready' '$OUT/server.log'; do sleep 1; done"
i=0
for s in "${SITES[@]}"; do
    i=$((i + 1))
    "$BIN/medfed" site --kit "$WORK/kits/sites/$s" --data "$WORK/data/sites/$s" \
        --state "$WORK/state-$s" --runtime-port $((19100 + i)) --metrics-port $((19410 + i)) \
        >"$OUT/site-$s.log" 2>&1 &
    PIDS+=($!)
done
for s in "${SITES[@]}"; do
    timeout 120 bash -c "until grep -q 'SuperNode ID' '$OUT/site-$s.log'; do sleep 1; done"
    # the site's warm worker (client.worker) holds torch, the data and the CUDA context
    timeout 300 bash -c "until grep -q 'site worker ready' '$OUT/site-$s.log'; do sleep 1; done"
done

for device in cuda cpu; do
    start=$SECONDS
    "$BIN/medfed" run --kit "$WORK/kits/operator" --app "$WORK/app" --out "$WORK/run-$device" \
        --test-data "$WORK/data/test" --rounds "${ROUNDS:-5}" --local-epochs 2 --batch-size 64 --lr 0.001 \
        --image-size 64 --target-epsilon 8 --min-sites 3 --device "$device" \
        >"$OUT/run-$device.log" 2>&1
    cp "$WORK/run-$device/results.json" "$OUT/results-$device.json"
    "$PY" - "$OUT/results-$device.json" "$device" $((SECONDS - start)) <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
rounds = [entry["duration_s"] for entry in r["rounds"]]
# the deployed round overhead (bench/deploy.py's figure): wall time beyond the slowest training
beyond = [e["duration_s"] - max(s["train"]["train-seconds"]
                                for s in e["federated"]["sites"].values() if s.get("train"))
          for e in r["rounds"]]
eps = ", ".join(f"{s} {p['epsilon']:.2f}" for s, p in sorted(r["privacy"].items()))
print(f"sites on {sys.argv[2]}: {sys.argv[3]} s for the run, median round "
      f"{statistics.median(rounds):.1f} s (rounds {', '.join(f'{d:.1f}' for d in rounds)}), "
      f"median round beyond the slowest site's training {statistics.median(beyond):.2f} s, "
      f"central AUC {r['final']['auc']:.3f}; epsilon {eps}")
EOF
done
exit "$tests_ok"
