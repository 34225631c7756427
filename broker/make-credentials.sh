#!/usr/bin/env bash
# Create broker credentials for a fedmq fleet:
#   OUTDIR/passwd                       mosquitto password file (coordinator, monitor, each agent)
#   OUTDIR/secrets/<user>.password      each user's random password (mode 600), for --password-file
#   OUTDIR/certs/ca.{crt,key}           a development CA
#   OUTDIR/certs/server.{crt,key}       the broker's certificate (localhost, broker, 127.0.0.1)
#   OUTDIR/certs/client-<user>.{crt,key} client certificates for optional mutual TLS
# Usage: make-credentials.sh OUTDIR AGENT_ID [AGENT_ID ...]
# Existing passwords and certificates are kept; run again to add agents.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
out=$1; shift
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl not found (apt-get install openssl)" >&2; exit 2; }
mkdir -p "$out/secrets" "$out/certs"
chmod 700 "$out/secrets"
umask 077

users=(coordinator monitor "$@")
for user in "${users[@]}"; do
  [[ "$user" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { echo "invalid user/agent id: $user" >&2; exit 2; }
  secret="$out/secrets/$user.password"
  [[ -s "$secret" ]] || openssl rand -hex 24 > "$secret"
done
rm -f "$out/passwd"
touch "$out/passwd"
for user in "${users[@]}"; do
  mosquitto_passwd -b "$out/passwd" "$user" "$(cat "$out/secrets/$user.password")"
done
chmod 644 "$out/passwd"

certs="$out/certs"
if [[ ! -s "$certs/ca.crt" ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fedmq dev CA" \
    -keyout "$certs/ca.key" -out "$certs/ca.crt" 2>/dev/null
fi
sign() {  # sign NAME SUBJECT [SAN]
  local name=$1 subject=$2 san=${3:-}
  [[ -s "$certs/$name.crt" ]] && return
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$certs/$name.key" -out "$certs/$name.csr" 2>/dev/null
  local ext; ext=$(mktemp)
  if [[ -n "$san" ]]; then printf 'subjectAltName=%s\n' "$san" > "$ext"; else : > "$ext"; fi
  openssl x509 -req -in "$certs/$name.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
    -days 825 -extfile "$ext" -out "$certs/$name.crt" 2>/dev/null
  rm -f "$certs/$name.csr" "$ext"
}
sign server "/CN=broker" "DNS:localhost,DNS:broker,IP:127.0.0.1"
for user in "${users[@]}"; do sign "client-$user" "/CN=$user"; done
chmod 644 "$certs"/*.crt
echo "credentials for ${#users[@]} users in $out (passwords in $out/secrets/)"
