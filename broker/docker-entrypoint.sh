#!/bin/sh
# fedmq-broker's entrypoint: install the mounted credentials where mosquitto.conf reads them,
# owned by the user mosquitto runs as (uid 1883) and private, whoever owns them on the host.
# So no chown is needed on the host, and make-credentials.sh can rewrite them at any time:
# `docker compose restart broker` installs the new ones.
#   /run/fedmq/passwd                     -> /mosquitto/config/passwd             (0600)
#   /run/fedmq/acl                        -> /mosquitto/config/acl                (0600; the image's
#                                            own acl has no agents: make-credentials.sh writes theirs)
#   /run/fedmq/certs/ca.crt, server.crt   -> /mosquitto/config/certs/             (0644)
#   /run/fedmq/certs/server.key           -> /mosquitto/config/certs/server.key   (0600)
set -eu
src=${FEDMQ_BROKER_CREDENTIALS:-/run/fedmq}
dst=/mosquitto/config
owner=mosquitto
if [ "$(id -u)" != 0 ]; then owner=$(id -u); fi  # started as a user: mosquitto stays that user

for file in passwd acl certs/ca.crt certs/server.crt certs/server.key; do
  if [ ! -r "$src/$file" ]; then
    echo "fedmq-broker: cannot read $src/$file: mount it (deploy/README.md, broker/README.md)" >&2
    exit 1
  fi
done
if [ -e "$src/certs/ca.key" ]; then
  echo "fedmq-broker: refusing to start with the CA's private key in $src/certs: mount ca.crt, server.crt and server.key only" >&2
  exit 1
fi
install -d -m 0755 "$dst/certs"
install -m 0600 "$src/passwd" "$dst/passwd"
install -m 0600 "$src/acl" "$dst/acl"
install -m 0644 "$src/certs/ca.crt" "$dst/certs/ca.crt"
install -m 0644 "$src/certs/server.crt" "$dst/certs/server.crt"
install -m 0600 "$src/certs/server.key" "$dst/certs/server.key"
if [ "$(id -u)" = 0 ]; then
  chown "$owner:$owner" "$dst/passwd" "$dst/acl" "$dst/certs/server.key" "$dst/certs/ca.crt" "$dst/certs/server.crt"
  chown -R "$owner:$owner" /mosquitto/data /mosquitto/log 2>/dev/null || true
fi
exec "$@"
