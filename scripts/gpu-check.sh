#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, PyTorch and Triton, and nothing else:
# no vLLM, pytest or pydantic, no network, no install. It runs the Triton kernel compiled
# for the GPU against the PyTorch oracle (both vLLM runners' layouts; fp32, bf16, fp16;
# the entropy-driven schedules too), then the kernel micro-benchmark and the entropy
# steps beside the EAD step, and prints one summary line. Results are written into OUT as
# they come (correctness.json, target_stats.json, benchmark.txt/json, entropy.txt/json,
# summary.txt, log.txt).
#
#   scripts/gpu-check.sh OUT [--quick]      # under 4 minutes on one H200; --quick: < 1 min
set -euo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT [--quick]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
# kernels/ installs as the package ead_kernels; without an install, a link makes it importable.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
ln -s "$repo/kernels" "$site/ead_kernels"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    "${PYTHON:-python3}" -m ead_kernels.gpu_check "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
