#!/usr/bin/env bash
# Create the broker credentials of a fedmq fleet. See README.md in this directory.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: make-credentials.sh OUTDIR [--fleet FLEET AGENT_ID ...]

Creates, for the users coordinator, monitor, health (the Docker healthcheck), web (the web fleet view) and each AGENT_ID (username = agent id) of FLEET:
  OUTDIR/passwd                          mosquitto password file, rebuilt from secrets/ on every run
  OUTDIR/secrets/<user>.password         each user's random password, mode 600; clients read it
                                         with --password-file, never from a command-line flag
  OUTDIR/certs/ca.crt, ca.key            a development CA (10 years)
  OUTDIR/certs/server.crt, server.key    the broker's certificate: DNS:localhost, DNS:broker, IP:127.0.0.1
  OUTDIR/certs/client-<user>.crt, .key   a client certificate per user, for optional mutual TLS
  OUTDIR/fleets/<agent>                  the agent's fleet, kept across runs
  OUTDIR/acl                             the broker's ACL: broker/acl, then one block per agent
                                         confining it to its own topics in its own fleet

Existing passwords and certificates are kept: run it again with new ids to add agents.
To revoke an agent or change a password, delete OUTDIR/secrets/<user>.password and run it again
(then reload the broker: kill -HUP). Delete OUTDIR/certs to make a new CA.
Agent ids and fleets: 1-64 characters from A-Z a-z 0-9 _ . - ; "coordinator", "monitor",
"health" and "web" are reserved. An agent belongs to one fleet: to move it, delete OUTDIR/fleets/<agent> first.
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi
out=$1; shift
fleet=
if [[ "${1:-}" == "--fleet" ]]; then
  [[ $# -ge 2 ]] || { echo "--fleet needs a fleet name" >&2; exit 2; }
  fleet=$2; shift 2
  [[ "$fleet" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "invalid fleet: '$fleet' (1-64 of A-Z a-z 0-9 _ . -)" >&2; exit 2; }
fi
[[ $# -eq 0 || -n "$fleet" ]] || { echo "name the agents' fleet: make-credentials.sh OUTDIR --fleet FLEET $*" >&2; exit 2; }
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl not found (apt-get install openssl)" >&2; exit 2; }

for agent in "$@"; do
  [[ "$agent" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "invalid agent id: '$agent' (1-64 of A-Z a-z 0-9 _ . -)" >&2; exit 2; }
  # the ACL gives these two names their own rights: an agent must never share them
  [[ "$agent" != coordinator && "$agent" != monitor && "$agent" != health && "$agent" != web ]] || { echo "agent id '$agent' is reserved" >&2; exit 2; }
done
mkdir -p "$out/secrets" "$out/certs" "$out/fleets"
for agent in "$@"; do  # before any file is written: an agent stays in its fleet
  was=$(cat "$out/fleets/$agent" 2>/dev/null || true)
  [[ -z "$was" || "$was" == "$fleet" ]] || { echo "agent '$agent' is in fleet '$was' (delete $out/fleets/$agent to move it)" >&2; exit 2; }
done
chmod 700 "$out/secrets"
umask 077  # keys and secrets readable by their owner only; certificates are opened up below

# Passwords: random, one file each, for coordinator, monitor, health, web and the agents named now.
for user in coordinator monitor health web "$@"; do
  secret="$out/secrets/$user.password"
  [[ -s "$secret" ]] || openssl rand -hex 24 > "$secret"
done
# secrets/ is the list of users: agents added by earlier runs stay in passwd.
users=()
for secret in "$out"/secrets/*.password; do
  user=$(basename "$secret" .password)
  [[ "$user" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "unexpected file $secret" >&2; exit 2; }
  users+=("$user")
done
# mosquitto_passwd -b takes the password as an argument, so it is visible in `ps` on this
# machine while the script runs: run it somewhere trusted.
passwd="$out/passwd.tmp"
rm -f "$passwd"
first=-c
for user in "${users[@]}"; do
  mosquitto_passwd $first -b "$passwd" "$user" "$(cat "$out/secrets/$user.password")"
  first=
done
# mode 600: mosquitto >= 2.0.18 warns about a password file others can read, and about one it
# does not own (the broker image's entrypoint installs a copy owned by its uid 1883: no chown here)
chmod 600 "$passwd"
mv -f "$passwd" "$out/passwd"

# The ACL: broker/acl (coordinator, monitor, health, web), then each agent's own topics in its own fleet only.
for agent in "$@"; do
  echo "$fleet" > "$out/fleets/$agent"
done
acl="$out/acl.tmp"
{
  cat "$(dirname "$0")/acl"
  echo
  echo "# Agents (written by make-credentials.sh from $out/fleets/): each its own topics in its own fleet."
  for user in "${users[@]}"; do
    [[ "$user" != coordinator && "$user" != monitor && "$user" != health && "$user" != web ]] || continue
    agent_fleet=$(cat "$out/fleets/$user" 2>/dev/null || true)
    [[ -n "$agent_fleet" ]] || { echo "agent '$user' has no fleet: run again with --fleet FLEET $user" >&2; rm -f "$acl"; exit 2; }
    echo "user $user"
    echo "topic write fedmq/$agent_fleet/update/$user"
    echo "topic write fedmq/$agent_fleet/update/$user/chunk"
    echo "topic write fedmq/$agent_fleet/stats/$user"
    echo "topic write fedmq/$agent_fleet/schema/$user"
    echo "topic write fedmq/$agent_fleet/agent/$user/status"
    echo "topic read fedmq/$agent_fleet/model"
    echo "topic read fedmq/$agent_fleet/model/chunk/+"
    echo "topic read fedmq/$agent_fleet/ack/$user"  # the coordinator's acks of its own updates (protocol/acks.py)
    for kind in key share masked reveal; do  # secure aggregation: its own messages only
      echo "topic write fedmq/$agent_fleet/secagg/$kind/$user"
    done
    echo "topic read fedmq/$agent_fleet/secagg/inbox/$user"
    echo "topic read fedmq/$agent_fleet/secagg/cohort"
    echo "topic read fedmq/$agent_fleet/secagg/unmask"
    echo "topic read fedmq/$agent_fleet/secagg/key/+"  # every peer's announced keys, to check the cohort's
  done
} > "$acl"
chmod 644 "$acl"  # no secret in it; mosquitto must read it
mv -f "$acl" "$out/acl"

# Development CA. keyUsage and basicConstraints are required by strict X.509 verification
# (OpenSSL -x509_strict, Python 3.13's default SSL context).
certs="$out/certs"
if [[ ! -s "$certs/ca.crt" || ! -s "$certs/ca.key" ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fedmq development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
fi

sign() {  # sign NAME SUBJECT USAGE [SAN]: a key and a certificate signed by the CA, unless present
  local name=$1 subject=$2 usage=$3 san=${4:-} ext
  [[ -s "$certs/$name.crt" && -s "$certs/$name.key" ]] && return 0
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    [[ -z "$san" ]] || echo "subjectAltName=$san"
  } > "$ext"
  openssl req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$certs/$name.key" -out "$certs/$name.csr" 2>/dev/null
  openssl x509 -req -in "$certs/$name.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
    -days 825 -extfile "$ext" -out "$certs/$name.crt" 2>/dev/null
  rm -f "$certs/$name.csr" "$ext"
}
sign server "/CN=broker" serverAuth "DNS:localhost,DNS:broker,IP:127.0.0.1"
for user in "${users[@]}"; do
  sign "client-$user" "/CN=$user" clientAuth
done
chmod 755 "$certs"
chmod 644 "$certs"/*.crt

echo "credentials for ${#users[@]} users in $out: passwd, secrets/<user>.password, certs/"
