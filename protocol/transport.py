"""How both sides reach the broker: URL parsing, TLS, credentials and the paho client life cycle.

Kept in `protocol` because agent and coordinator must speak to the broker the same way
and may not import each other (see docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from protocol import mqtt_receive
from protocol.tls_errors import CERTIFICATE_HINT, plain_to_tls_hint, speaks_tls, ssl_text, tls_refusal, tls_to_plain_hint

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: keep a persistent session a week


class BrokerError(RuntimeError):
    """The broker cannot be reached or refused us; the message is one readable line."""


@dataclass(frozen=True)
class BrokerSettings:
    """Everything needed to open an MQTT connection."""

    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    mqtt_version: str = "3.1.1"
    keepalive: int = 30
    port_given: bool = True  # False: the URL named no port and the MQTT default is used (said at connect)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password_file: str | None = None,
        mqtt_version: str = "3.1.1",
        keepalive: int = 30,
    ) -> "BrokerSettings":
        """Build settings from ``mqtt://host[:port]`` or ``mqtts://host[:port]``.

        The password comes from `password_file` or the FEDMQ_PASSWORD environment
        variable, never from the URL or a flag (it would show in `ps`).
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {url!r} must look like mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if parts.password:
            raise ValueError("put the broker password in --password-file or FEDMQ_PASSWORD, not in the URL")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r}: {exc}") from None
        if mqtt_version not in ("3.1.1", "5"):
            raise ValueError(f"MQTT version must be 3.1.1 or 5, got {mqtt_version!r}")
        for label, path in (("CA file", ca_file), ("client certificate", cert_file), ("client key", key_file)):
            if path and not Path(path).is_file():
                raise ValueError(f"{label} not found: {path}")
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs its key and the other way round")
        password = read_password(password_file)
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username or parts.username,
            password=password,
            mqtt_version=mqtt_version,
            keepalive=keepalive,
            port_given=parts.port is not None,
        )


def add_broker_options(parser) -> None:
    """The connection flags both CLIs share."""
    group = parser.add_argument_group("broker connection")
    group.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)")
    group.add_argument("--ca-file", metavar="PEM", help="CA certificate that signed the broker's (mqtts://)")
    group.add_argument("--cert-file", metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--key-file", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument("--username", help="broker username (agents: usually their id)")
    group.add_argument(
        "--password-file", metavar="FILE", help="file holding the broker password (or set FEDMQ_PASSWORD)"
    )
    group.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1", help="MQTT protocol version (default: 3.1.1)")
    group.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive in seconds (default: 30)")
    group.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the first connection before giving up (default: 10)"
    )


def read_password(password_file: str | None) -> str | None:
    """The password from `password_file`, else FEDMQ_PASSWORD, else None; ValueError if the file is unreadable."""
    if password_file:
        try:
            return Path(password_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read password file {password_file}: {exc.strerror}") from None
    return os.environ.get("FEDMQ_PASSWORD") or None


def settings_from_args(args) -> BrokerSettings:
    return BrokerSettings.from_url(
        args.broker,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        username=args.username,
        password_file=args.password_file,
        mqtt_version=args.mqtt_version,
        keepalive=args.keepalive,
    )


def make_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    persistent: bool = True,
    will: tuple[str, bytes] | None = None,
    own_client_id: bool = False,
) -> mqtt.Client:
    """A paho client configured for `settings`; not yet connected.

    With a username the client id is the username and `client_id` is not used: the
    production broker (`use_username_as_clientid`) names every session after its user,
    so that no credential can take over another client's session, and our clients ask
    for the name they get. Without one (anonymous test brokers), or with `own_client_id`
    (the scale-out tier's processes share one user, each with its own session), it is `client_id`.
    `persistent` asks the broker to keep the session (subscriptions and queued QoS 1
    messages) across disconnects. `will` is (topic, payload), sent QoS 1 retained.
    """
    v5 = settings.mqtt_version == "5"
    mqtt_receive.install()  # one copy of each received payload, not three (protocol/mqtt_receive.py)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id if own_client_id else (settings.username or client_id),
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    if settings.tls:
        client.tls_set(
            ca_certs=settings.ca_file,
            certfile=settings.cert_file,
            keyfile=settings.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client._fedmq_persistent = persistent  # read by connect()
    return client


def connect(client: mqtt.Client, settings: BrokerSettings, *, timeout: float = 10.0, start_loop: bool = True) -> None:
    """Connect and wait for the broker's CONNACK; raise BrokerError with one clear line.

    With `start_loop` paho's network thread is started and reconnects with backoff
    on its own afterwards.

    A TLS error inside paho's network thread never reaches us as an exception: paho
    catches it in `_packet_read`/`_packet_write`, logs it at MQTT_LOG_ERR ("failed to
    receive on socket: ..."), closes the socket, calls on_disconnect with "Unspecified
    error" and reconnects. A broker that requires a client certificate (TLS 1.3) is only
    seen that way. So while waiting for the first CONNACK we also listen to on_log (and
    on_connect_fail, for a failed handshake on a reconnection); paho calls both from the
    `except` block that caught the error, where `sys.exc_info()` holds the exception.
    An alert from the broker ends the wait at once; any other TLS error (the first
    attempt usually sees only an EOF while sending CONNECT, the alert comes with the
    retry) is reported at the timeout instead of "no answer".
    """
    done = threading.Event()
    outcome: dict = {}
    previous = client.on_connect
    previous_log = client.on_log
    previous_connect_fail = client.on_connect_fail
    previous_disconnect = client.on_disconnect

    def on_connect(c, userdata, flags, reason_code, properties):
        outcome["rc"] = reason_code
        done.set()
        if previous:
            previous(c, userdata, flags, reason_code, properties)

    def note_tls_error() -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError):
            outcome["tls"] = exc
            refusal = tls_refusal(settings.url, settings.cert_file, exc)
            if refusal:
                outcome["refusal"] = refusal
                done.set()

    def on_log(c, userdata, level, buf):
        if level == mqtt.MQTT_LOG_ERR:
            note_tls_error()
        if previous_log:
            previous_log(c, userdata, level, buf)

    def on_connect_fail(c, userdata):
        note_tls_error()
        if previous_connect_fail:
            previous_connect_fail(c, userdata)

    def on_disconnect(c, userdata, flags, reason_code, properties):
        # closed before any CONNACK: a broker that speaks only MQTT 3.1.1 does that to an
        # MQTT 5 CONNECT (amqtt, old mosquitto); over plain TCP nothing else explains it at
        # once, over TLS a handshake failure looks the same, so that waits for the timeout
        if "rc" not in outcome and "tls" not in outcome:
            outcome["closed"] = True
            if not settings.tls:  # MQTT 5 to a 3.1.1 broker, or plain MQTT to a TLS port: asked below
                done.set()
        if previous_disconnect:
            previous_disconnect(c, userdata, flags, reason_code, properties)

    if not settings.port_given:
        log.warning("the broker URL names no port: connecting to %s (the %s default)", settings.url,
                    "mqtts://" if settings.tls else "mqtt://")
    kwargs = {}
    if settings.mqtt_version == "5":
        persistent = getattr(client, "_fedmq_persistent", True)
        kwargs["clean_start"] = not persistent
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs["properties"] = props
    # hooked before client.connect: it sends CONNECT itself, and that send can already fail
    client.on_connect = on_connect
    client.on_log = on_log
    client.on_connect_fail = on_connect_fail
    client.on_disconnect = on_disconnect
    try:
        try:
            client.connect(settings.host, settings.port, settings.keepalive, **kwargs)
        except ssl.SSLError as exc:
            refusal = tls_refusal(settings.url, settings.cert_file, exc)
            if refusal is None and not speaks_tls(settings.host, settings.port):
                refusal = tls_to_plain_hint(settings.url, settings.host, settings.port)
            raise BrokerError(refusal or f"TLS handshake with {settings.url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            if settings.tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError)) \
                    and not speaks_tls(settings.host, settings.port):  # a plain listener dropping our ClientHello
                raise BrokerError(tls_to_plain_hint(settings.url, settings.host, settings.port)) from None
            raise BrokerError(f"cannot reach broker at {settings.url}: {exc.strerror or exc}") from None
        if not start_loop:
            return
        client.loop_start()
        try:
            deadline = time.monotonic() + timeout
            done.wait(timeout)
            if outcome.get("closed") and "rc" not in outcome and not settings.tls:
                if speaks_tls(settings.host, settings.port):  # our CONNECT was garbage to a TLS listener
                    raise BrokerError(plain_to_tls_hint(settings.url, settings.host, settings.port))
                if settings.mqtt_version != "5":  # not that: wait out the timeout as before
                    done.clear()
                    done.wait(max(0.0, deadline - time.monotonic()))
            if "rc" in outcome:
                rc = outcome["rc"]
                if rc.is_failure and settings.mqtt_version == "5" and rc.value in (0x01, 0x84):
                    # 0x01: a 3.1.1 broker's "unacceptable protocol version"; 0x84: MQTT 5's own
                    raise BrokerError(f"broker at {settings.url} refused the MQTT 5 CONNECT (unsupported protocol "
                                      "version): it speaks only MQTT 3.1.1; use --mqtt-version 3.1.1")
                if rc.is_failure:
                    raise BrokerError(f"broker at {settings.url} refused the connection: {rc}")
            elif "refusal" in outcome:
                raise BrokerError(outcome["refusal"])
            elif "tls" in outcome:
                raise BrokerError(
                    f"TLS error from broker {settings.url}: the broker closed the connection after the TLS handshake "
                    f"without answering within {timeout:g} s: {ssl_text(outcome['tls'])}; "
                    f"if it requires a client certificate, {CERTIFICATE_HINT}"
                )
            elif outcome.get("closed") and settings.mqtt_version == "5":
                raise BrokerError(
                    f"broker at {settings.url} closed the connection on an MQTT 5 CONNECT without answering: "
                    "it may speak only MQTT 3.1.1; try --mqtt-version 3.1.1"
                )
            elif outcome.get("closed"):
                raise BrokerError(f"broker at {settings.url} closed the connection without answering the CONNECT "
                                  f"(within {timeout:g} s)")
            elif settings.mqtt_version == "5":
                raise BrokerError(f"no answer from broker at {settings.url} within {timeout:g} s to an MQTT 5 CONNECT "
                                  "(a broker that speaks only MQTT 3.1.1 may ignore it: try --mqtt-version 3.1.1)")
            else:
                raise BrokerError(f"no answer from broker at {settings.url} within {timeout:g} s")
        except BrokerError:
            client.loop_stop()
            client.disconnect()
            raise
    finally:
        client.on_connect = previous
        client.on_log = previous_log
        client.on_connect_fail = previous_connect_fail
        client.on_disconnect = previous_disconnect
