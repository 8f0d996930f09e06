#!/usr/bin/env bash
# One run on a GPU machine (under 8 minutes): the CUDA tests, then the offload and format
# benchmarks on CUDA. Results go to $OUT (the device tool's folder) or ./device-results.
#
#   bash benchmarks/device_check.sh
#
# The GPU machine has torch but may lack small packages: wheels found in .whl/ are installed
# first (see the README's "GPU check" section for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/test_runtime_moe.py -k "cuda or every_budget" 2>&1 | tee "$out/tests.log"
rc=${PIPESTATUS[0]}
# decode speed of the tiny-model path on CUDA vs CPU, per format, and offload at tight budgets
timeout 180 python3 benchmarks/offload.py --synthetic /tmp/moe-synth --device cuda --reps 2 \
  --out "$out/offload" 2>&1 | tee "$out/offload.log"
echo "tests exit code: $rc" | tee -a "$out/gpu.txt"
exit "$rc"
