"""A compose NATS node's entry point: fill the tier password into its config, then become nats-server.

deploy/tier/nats-<i>.conf names the password, never holds it: `$FEDMQ_TIER_PASSWORD` where it is a whole value
(the users' and the cluster port's password) and `${FEDMQ_TIER_PASSWORD}` inside the route URLs, where a listed
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

from tier.cluster import PASSWORD_ENV, PASSWORD_REF, ROUTE_PASSWORD_REF, nats_server_binary


def fill(config: str, password: str) -> str:
    """`config` with the password in: URL-quoted inside route URLs, a JSON string where it is a whole value."""
    config = config.replace(ROUTE_PASSWORD_REF, urllib.parse.quote(password, safe=""))
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
        out = Path(args[1])
        out.touch(mode=0o600)
        out.write_text(fill(config, password))
    except OSError as exc:
        print(f"tier nats node: {exc}", file=sys.stderr)
        return 2
    binary = nats_server_binary()
    os.execv(binary, [binary, "-c", str(out)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
