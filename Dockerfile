# GPU image: CUDA runtime, torch for CUDA, StreamDiff with the [gpu] extra (flash-attn, the kernel bench's baseline).
# Weights are not baked in: mount them at /models and point a config at them, e.g.
#   docker run --gpus all -v $PWD/models:/models:ro streamdiff \
#     render --config /app/configs/wan-1.3b.yaml --input /models/in.mp4 --prompt "..." --output /tmp/out.mp4
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 STREAMDIFF_CONFIG_DIR=/app/configs
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 streamdiff
WORKDIR /app
RUN python3 -m venv /opt/venv && chown -R streamdiff /opt/venv /app
ENV PATH=/opt/venv/bin:$PATH
USER streamdiff

# torch first, from the CUDA index, so the package's torch>=2.4 range is already satisfied.
RUN pip install torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128
COPY --chown=streamdiff pyproject.toml README.md ./
COPY --chown=streamdiff streamdiff ./streamdiff
COPY --chown=streamdiff kernels ./kernels
COPY --chown=streamdiff server ./server
COPY --chown=streamdiff client ./client
COPY --chown=streamdiff configs ./configs
RUN pip install ".[gpu]"

VOLUME ["/models"]
WORKDIR /models
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -c "import torch, streamdiff.model.causal_wan; assert torch.cuda.is_available()" || exit 1
ENTRYPOINT ["streamdiff"]
CMD ["--help"]
