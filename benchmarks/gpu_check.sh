#!/usr/bin/env bash
# GPU check for the EM3 model: bf16 train-step throughput, then the quality run at a
# larger scale (all 100k MovieLens events, batch 256, i.e. twice the optimizer steps
# of the CPU default). Needs a CUDA machine where the repo is installed with
# `pip install -e .` (plus `pip install --no-deps recbole==1.2.1` for MovieLens).
# `--device cuda` makes the learner use bf16 autocast. Prints one JSON object last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
python3 benchmarks/train_step.py --device cuda --threads 8 --batch-size 256 --catalog 2000 \
    --seq-lens 50,200,1000 --modes lora,full --steps 5 2> "$OUT/train_step.log" | tail -1 > "$OUT/train_step.json"
python3 benchmarks/quality.py --dataset ml100k --device cuda --threads 8 --batch-size 256 --max-events 0 \
    --variants em3,id_only,content_frozen,no_cic 2> "$OUT/quality.log" | tail -1 > "$OUT/quality.json"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(json.dumps({"gpu": out.joinpath("gpu.txt").read_text().strip(),
                  "train_step": json.loads(out.joinpath("train_step.json").read_text()),
                  "quality": json.loads(out.joinpath("quality.json").read_text())}))
PY
