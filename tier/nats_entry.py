"""A compose NATS node's entry point: fill the tier and auth passwords into its config, then become nats-server.

deploy/tier/nats-<i>.conf names the passwords, never holds them: `$FEDMQ_TIER_PASSWORD` where it is a whole value
(the users' and the cluster port's password; likewise `$FEDMQ_TIER_AUTH_PASSWORD`, the auth user's, which reads
the devices' logins) and `${FEDMQ_TIER_PASSWORD}` inside the route URLs, where a listed
route's credentials must be (tier/cluster.py `route_url`). nats-server resolves neither safely by itself: it
substitutes nothing inside a string, and parses a whole-value variable's text as config (a password with a
space does not start; one with `#` is cut at it). So this writes the filled config (a quoted string, a
URL-quoted one in the routes; mode 0600, beside the node's store) and execs the server on it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from pathlib import Path

from tier.cluster import (AUTH_PASSWORD_ENV, AUTH_PASSWORD_REF, PASSWORD_ENV, PASSWORD_REF, ROUTE_PASSWORD_REF,
                          nats_server_binary)


def fill(config: str, password: str, auth_password: str | None = None) -> str:
    """`config` with the passwords in: URL-quoted inside route URLs, a JSON string where it is a whole value."""
    config = config.replace(ROUTE_PASSWORD_REF, urllib.parse.quote(password, safe=""))
    if auth_password is not None:
        config = config.replace(AUTH_PASSWORD_REF, json.dumps(auth_password))
    return config.replace(PASSWORD_REF, json.dumps(password))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tier.nats_entry CONFIG OUT  (fills the route credentials, execs nats-server -c OUT)",
              file=sys.stderr)
        return 2
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        print(f"tier nats node: {PASSWORD_ENV} is not set (the tier user's and the routes' password)", file=sys.stderr)
        return 2
    try:
        config = Path(args[0]).read_text()
        auth_password = os.environ.get(AUTH_PASSWORD_ENV)
        if AUTH_PASSWORD_REF in config and not auth_password:
            print(f"tier nats node: {AUTH_PASSWORD_ENV} is not set (the auth user's password: the device authorization "
                  "service's)", file=sys.stderr)
            return 2
        out = Path(args[1])
        out.touch(mode=0o600)
        out.write_text(fill(config, password, auth_password))
    except OSError as exc:
        print(f"tier nats node: {exc}", file=sys.stderr)
        return 2
    binary = nats_server_binary()
    os.execv(binary, [binary, "-c", str(out)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
