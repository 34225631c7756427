# fedmq-coordinator: aggregate the fleet's updates and republish the global model.
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 \
#               -f docker/coordinator.Dockerfile -t REGISTRY/fedmq-coordinator:TAG --push .
# Only the pip index depends on the architecture; see docker/agent.Dockerfile for why piwheels
# (linux/arm/v7 only) and the runtime libraries are there.
FROM python:3.11-slim

# The container user's uid/gid (docker-compose.yml: the host user's, for the secret files).
ARG FEDMQ_UID=10001
ARG FEDMQ_GID=10001
# piwheels (Raspberry Pi wheels) for linux/arm/v7 only, where PyPI has no numpy/scipy/scikit-learn
# wheels; elsewhere PyPI alone (piwheels only slows other platforms down). PIWHEELS= turns it off.
ARG PIWHEELS=https://www.piwheels.org/simple
# set by buildx/BuildKit for each --platform; the classic builder leaves it empty (then uname -m)
ARG TARGETPLATFORM

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0 libgfortran5 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# setuptools needs every package listed in pyproject.toml to build, so all six are copied.
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY coordinator/ coordinator/
COPY edge_agent/ edge_agent/
COPY simulation/ simulation/
COPY monitor/ monitor/
COPY tier/ tier/
RUN case "${TARGETPLATFORM:-linux/$(uname -m)}" in \
      linux/arm/v7|linux/armv7l|linux/armv8l) [ -z "$PIWHEELS" ] || export PIP_EXTRA_INDEX_URL="$PIWHEELS" ;; \
    esac \
 && pip install --no-cache-dir ".[coordinator]" \
 && rm -rf /src

RUN if [ "${FEDMQ_UID}" = 0 ]; then echo "FEDMQ_UID=0: the fedmq images never run as root; run python deploy/check_host.py" >&2; exit 1; fi \
 && groupadd --non-unique --gid "${FEDMQ_GID}" fedmq \
 && useradd --non-unique --uid "${FEDMQ_UID}" --gid "${FEDMQ_GID}" --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin fedmq \
 && mkdir -p /data/checkpoints && chown -R fedmq:fedmq /data
USER fedmq
WORKDIR /data

# Default checkpoint directory (the same as --checkpoint-dir; a flag overrides it). Mount a
# volume on /data so the model, its version and the replay state survive the container.
ENV FEDMQ_CHECKPOINT_DIR=/data/checkpoints
EXPOSE 9100

# Healthy: PID 1 is still the coordinator and its checkpoint (written at start-up and before
# every publish) exists and loads. Not a freshness check: an idle fleet publishes nothing.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys; from coordinator.store import load_checkpoint; sys.exit(0 if b'fedmq-coordinator' in open('/proc/1/cmdline', 'rb').read() and load_checkpoint(os.environ.get('FEDMQ_CHECKPOINT_DIR', '/data/checkpoints')) else 1)"]

ENTRYPOINT ["fedmq-coordinator"]
