#!/usr/bin/env bash
# The GPU check on the device machine, in one call: the payload benchmarks/gpu_payload.py packed
# here (carry .gpu/wheels and .gpu/minilm), installed into .gpu/site, a preflight that fails in
# seconds, then benchmarks/gpu_check.py with its record and log under $OUT.
#   bash benchmarks/gpu_device.sh [gpu_check.py flags]      # GPU_CHECK_SECONDS (default 480) bounds it
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi here"
python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl
export PYTHONPATH="$PWD/.gpu/site:$PWD/.gpu/minilm:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'EOF'
import ray, torch, transformers
import emotions.tagging, emotions.training  # noqa: F401  what the check runs
print(f"python3 torch {torch.__version__} ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}), "
      f"transformers {transformers.__version__}, ray {ray.__version__}")
EOF
set -o pipefail
timeout "${GPU_CHECK_SECONDS:-480}" python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
