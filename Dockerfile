# GPU image: CUDA runtime, torch for CUDA (the version the Makefile pins), StreamDiff. It builds
# on a stock Docker host: nothing here compiles CUDA code (the runtime base has no nvcc). The
# [gpu] extra is left out: flash-attn from the package index is a source build that needs nvcc,
# and on CUDA the default attention backend is the Triton
# kernel (triton comes with torch), so neither is needed.
# Weights are not baked in. The presets name them as models/... from the working directory,
# /models here, so mount the folder that holds them at /models/models, e.g.
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/models/models:ro streamdiff \
#     serve --host 0.0.0.0 --config wan-1.3b
# Without arguments it serves the demo on port 8000 (a small trained model; its weights are in configs/demo).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1001 streamdiff
WORKDIR /app
RUN python3 -m venv /opt/venv && chown -R streamdiff /opt/venv /app
ENV PATH=/opt/venv/bin:$PATH
USER streamdiff

# torch first, from the CUDA index, so the package's torch>=2.4 range is already satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --chown=streamdiff pyproject.toml README.md ./
COPY --chown=streamdiff streamdiff ./streamdiff
COPY --chown=streamdiff kernels ./kernels
COPY --chown=streamdiff server ./server
COPY --chown=streamdiff client ./client
COPY --chown=streamdiff configs ./configs
RUN pip install .

VOLUME ["/models"]
WORKDIR /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5).status != 200)"
ENTRYPOINT ["streamdiff"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--config", "demo"]
