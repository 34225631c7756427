"""One clear line for a TLS failure, from the OpenSSL error paho or the handshake raised.

Kept apart from the connection code (protocol/transport.py), which decides when to ask.
"""

from __future__ import annotations

import re
import ssl

# Alerts by which a broker turns down the client's certificate (or its absence). OpenSSL
# names a received alert SSLV3_ALERT_*, TLSV1_ALERT_* or TLSV13_ALERT_*; HANDSHAKE_FAILURE is
# what a TLS 1.2 broker sends when a required client certificate is missing.
_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                       "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE",
                       "ACCESS_DENIED", "HANDSHAKE_FAILURE")
CERTIFICATE_HINT = "give --cert-file and --key-file signed by the broker's CA"


def ssl_text(exc: ssl.SSLError) -> str:
    """The OpenSSL message without Python's source position: '[SSL: X] x'."""
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)


def tls_refusal(url: str, cert_file: str | None, exc: ssl.SSLError) -> str | None:
    """One line for a TLS alert the broker sent (it refused us), None for other TLS errors.

    With TLS 1.2 the alert ends the handshake in `client.connect`; with TLS 1.3 the
    handshake completes on our side and the broker's verdict on our certificate arrives
    on the first read, inside paho's network loop.
    """
    reason = exc.reason or ""
    if "_ALERT_" not in reason:
        return None
    head = f"TLS error from broker {url}: the broker refused the connection during the TLS handshake"
    if not any(name in reason for name in _CERTIFICATE_ALERTS):
        return f"{head}: {ssl_text(exc)}"
    if cert_file:
        why = f"it did not accept the client certificate {cert_file}"
    elif "HANDSHAKE_FAILURE" in reason:
        why = "no client certificate given; the broker may require one"
    else:
        why = "certificate required: no client certificate given"
    return f"{head} ({why}): {ssl_text(exc)}; {CERTIFICATE_HINT}"


def speaks_tls(host: str, port: int, timeout: float = 1.5) -> bool:
    """Does the listener on host:port answer a TLS ClientHello with a ServerHello? (certificate not checked).

    Asked only after a connection failed in a way a TLS/plain mismatch explains, so the one
    line can say which port or scheme to use instead of waiting for the connect timeout.
    """
    import socket

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True  # handshake done: it speaks TLS
    except ssl.SSLError as exc:  # an alert (e.g. a client certificate required) is TLS too; garbage is not
        return "_ALERT_" in (exc.reason or "")
    except OSError:  # reset, EOF, timeout: a plain listener closing on bytes it cannot parse
        return False


def plain_to_tls_hint(url: str, host: str, port: int) -> str:
    return (f"broker at {url} speaks TLS on port {port}, not plain MQTT: use mqtts://{host}:{port} with --ca-file "
            "(the broker's plain port is usually 1883)")


def tls_to_plain_hint(url: str, host: str, port: int) -> str:
    return (f"broker at {url} does not speak TLS on port {port}: use mqtt://{host}:{port} there, or the broker's "
            "TLS port (usually 8883)")
