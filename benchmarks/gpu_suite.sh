#!/usr/bin/env bash
# The whole GPU check in one command (benchmarks/gpu_suite.py); on the device machine:
#
#     bash benchmarks/gpu_suite.sh [gpu_suite.py options]       # e.g. --budget 420, --only peak,ours_vs_diffusers
#
# Installs the wheels carried in .whl/ (diffusers, PyAV, sageattention: not in that machine's image) into
# /tmp/site, prints the GPU and the versions, then runs the suite with its log tee'd to $OUT. Results:
# $OUT/gpu_suite.json (rewritten after every row), $OUT/gpu_suite.log, $OUT/gpu_tests.log, $OUT/env.txt.
# One device call: run(command="bash benchmarks/gpu_suite.sh --budget 420", carry=[".whl"], timeout_s=560).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_suite_out}"
mkdir -p "$OUT"
export OUT
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit
fi
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}" HF_HUB_OFFLINE=1
{
    date -u +"%Y-%m-%dT%H:%M:%SZ $(uname -srm)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
names = ("torch", "triton", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors", "av",
         "sageattention", "numpy")
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), "|", " ".join(f"{n} {version(n)}" for n in names))
print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else "-",
      "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PYEOF
    free -g | head -2
} 2>&1 | tee "$OUT/env.txt"
# The CUDA-only tests first (marker gpu: the block streamer's streams and events, every attention backend vs
# SDPA, fp8 compute vs its emulation), capped at 75 s so the suite keeps its budget.
timeout 75 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_quant.py tests/test_attention.py \
    2>&1 | tail -n 25 | tee "$OUT/gpu_tests.log"
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"
