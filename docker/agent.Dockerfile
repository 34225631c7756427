# fedmq-agent: train on this device's data, publish updates over MQTT.
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 \
#               -f docker/agent.Dockerfile -t REGISTRY/fedmq-agent:TAG --push .
# One step depends on the architecture: PyPI has no linux/arm/v7 wheels of numpy, scipy
# and scikit-learn, so on that platform alone pip also looks at piwheels (Raspberry Pi
# wheels); the runtime libraries below are what those wheels link against (tiny on
# amd64/arm64, where the PyPI wheels bundle their own). --build-arg PIWHEELS= : PyPI alone.
FROM python:3.11-slim

# The container user's uid/gid. docker-compose.yml sets them to the host user's so the
# mounted 0600 secret files (compose bind-mounts them unchanged) stay readable.
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
COPY edge_agent/ edge_agent/
COPY coordinator/ coordinator/
COPY simulation/ simulation/
COPY monitor/ monitor/
COPY tier/ tier/
RUN case "${TARGETPLATFORM:-linux/$(uname -m)}" in \
      linux/arm/v7|linux/armv7l|linux/armv8l) [ -z "$PIWHEELS" ] || export PIP_EXTRA_INDEX_URL="$PIWHEELS" ;; \
    esac \
 && pip install --no-cache-dir . \
 && rm -rf /src

RUN if [ "${FEDMQ_UID}" = 0 ]; then echo "FEDMQ_UID=0: the fedmq images never run as root; run python deploy/check_host.py" >&2; exit 1; fi \
 && groupadd --non-unique --gid "${FEDMQ_GID}" fedmq \
 && useradd --non-unique --uid "${FEDMQ_UID}" --gid "${FEDMQ_GID}" --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin fedmq \
 && mkdir -p /data && chown fedmq:fedmq /data
USER fedmq
WORKDIR /data

# The agent keeps no files, so "healthy" means: PID 1 is still the agent and not a zombie.
# (Broker trouble shows in its retained status on fedmq/<fleet>/agent/<id>/status.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys; c = open('/proc/1/cmdline', 'rb').read(); s = open('/proc/1/stat').read().rsplit(')', 1)[1].split()[0]; sys.exit(0 if b'fedmq-agent' in c and s != 'Z' else 1)"]

ENTRYPOINT ["fedmq-agent"]
