"""The pieces of the tier's per-device identity without a server: nkey, xkey and JWT encoding (tier/nkey.py,
tier/xkey.py) against nats-server's own test keys, the device store (tier/devices.py) and its CLI, and what
tier/auth.py answers (permissions of one agent, refusals, sealed requests). tests/test_tier_device_auth.py runs
them against real nodes."""

from __future__ import annotations

import base64
import json
import logging
import stat

import pytest

from tier import auth, devices
from tier.cluster import partition_of
from tier.nkey import (PREFIX_ACCOUNT, PREFIX_CURVE, PREFIX_SERVER, PREFIX_USER, KeyPair, decode_jwt, encode_jwt,
                       encode_public)
from tier.xkey import BOXES, SERVER_XKEY_HEADER, VERSION, XKey

# nats-server's server/auth_callout_test.go: an account seed and its public key, a user seed and its public key
ISSUER_SEED = "SAANDLKMXL6CUS3CP52WIXBEDN6YJ545GDKC65U5JZPPV6WH6ESWUA6YAI"
ISSUER_PUB = "ABJHLOVMPA4CI6R5KLNGOB4GSLNIY7IOUPAJC4YFNDLQVIOBYQGUWVLA"
USER_SEED = "SUAP277QP7U4JMFFPVZHLJYEQJ2UHOTYVEIZJYAWRJXQLP4FRSEHYZJJOU"
USER_PUB = "UBO2MQV67TQTVIRV3XFTEZOACM4WLOCMCDMAWN5QVN5PI2N6JHTVDRON"
# ... and the xkey (curve25519) seed and public key of its encryption tests
CURVE_SEED = "SXAAXMRAEP6JWWHNB6IKFL554IE6LZVT6EY5MBRICPILTLOPHAG73I3YX4"
CURVE_PUB = "XAB3NANV3M6N7AHSQP2U5FRWKKUT7EG2ZXXABV4XVXYQRJGM4S2CZGHT"


def test_nkeys_match_nats_servers_own_test_keys():
    issuer, user = KeyPair.from_seed(ISSUER_SEED), KeyPair.from_seed(USER_SEED)
    assert (issuer.public, issuer.prefix, issuer.seed) == (ISSUER_PUB, PREFIX_ACCOUNT, ISSUER_SEED)
    assert (user.public, user.prefix) == (USER_PUB, PREFIX_USER)
    fresh = KeyPair.create()
    assert fresh.public.startswith("A") and KeyPair.from_seed(fresh.seed).public == fresh.public
    for bad in (ISSUER_SEED[:-1] + ("A" if ISSUER_SEED[-1] != "A" else "B"), "not-a-seed", ISSUER_PUB):
        with pytest.raises(ValueError):
            KeyPair.from_seed(bad)


def test_xkeys_match_nats_servers_own_test_key_and_seal_in_the_nkeys_framing():
    """`xkv1`, a 24-byte nonce, then the box (16-byte tag and the ciphertext), as nkeys' Seal writes it; a test
    against a real node's sealing is tests/test_tier_device_auth.py."""
    key = XKey.from_seed(CURVE_SEED)
    assert (key.public, key.seed) == (CURVE_PUB, CURVE_SEED)
    fresh = XKey.create()
    assert fresh.public.startswith("X") and fresh.seed.startswith("SX")
    assert XKey.from_seed(fresh.seed).public == fresh.public
    sealed = fresh.seal(b"a device's password", CURVE_PUB)
    assert sealed[:4] == VERSION and len(sealed) == 4 + 24 + 16 + len(b"a device's password")
    assert key.open(sealed, fresh.public) == b"a device's password"
    assert fresh.seal(b"x", CURVE_PUB)[4:28] != fresh.seal(b"x", CURVE_PUB)[4:28]  # a fresh nonce each time
    peers = [XKey.create() for _ in range(BOXES + 8)]  # each peer's box is kept, a bounded number of them
    assert [p.open(fresh.seal(b"x", p.public), fresh.public) for p in peers] == [b"x"] * len(peers)
    assert 0 < len(fresh._boxes) <= BOXES
    for bad in (ISSUER_SEED, "not-a-seed", CURVE_PUB):
        with pytest.raises(ValueError):
            XKey.from_seed(bad)
    with pytest.raises(ValueError):  # an xkey seed is not a signing key's
        KeyPair.from_seed(CURVE_SEED)


def test_a_jwt_verifies_with_its_issuer_and_a_changed_one_does_not():
    issuer = KeyPair.from_seed(ISSUER_SEED)
    token = encode_jwt({"sub": USER_PUB, "nats": {"type": "user"}}, issuer)
    claims = decode_jwt(token, PREFIX_ACCOUNT)
    assert claims["iss"] == ISSUER_PUB and claims["sub"] == USER_PUB and len(claims["jti"]) == 52
    head, body, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged["sub"] = "U" + USER_PUB[1:-1] + "A"
    forged_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    for bad in (f"{head}.{forged_body}.{sig}", "a.b", token + "x"):
        with pytest.raises(ValueError):
            decode_jwt(bad, PREFIX_ACCOUNT)
    with pytest.raises(ValueError):  # signed by an account: not a server's request
        decode_jwt(token, PREFIX_SERVER)


def test_the_store_holds_salted_hashes_and_its_cli_adds_and_removes(tmp_path, capsys):
    store, secrets = tmp_path / "devices", tmp_path / "secrets"
    assert devices.main(["add", "--store", str(store), "--secrets", str(secrets), "--fleet", "f1", "a1", "a2"]) == 0
    text = store.read_text()
    pw = (secrets / "a1.password").read_text().strip()
    assert len(pw) == 48 and pw not in text and stat.S_IMODE((secrets / "a1.password").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    parsed = devices.parse_store(text)
    assert set(parsed) == {"a1", "a2"} and parsed["a1"].fleet == "f1" and parsed["a1"].hash != parsed["a2"].hash
    live = devices.Store(store)
    assert live.check("a1", pw) is not None and live.check("a1", pw + "x") is None and live.check("a2", pw) is None
    # again: the password kept, the agent stays in its fleet
    assert devices.main(["add", "--store", str(store), "--secrets", str(secrets), "--fleet", "f1", "a1"]) == 0
    assert (secrets / "a1.password").read_text().strip() == pw
    assert devices.main(["add", "--store", str(store), "--secrets", str(secrets), "--fleet", "f2", "a1"]) == 2
    for bad in ("tier", "a.b", "a/b", "+", ""):
        assert devices.main(["add", "--store", str(store), "--secrets", str(secrets), "--fleet", "f1", bad]) == 2
    assert "tier.devices: " in capsys.readouterr().err
    assert devices.main(["remove", "--store", str(store), "a1"]) == 0
    live.refresh()
    assert live.check("a1", pw) is None and "a2" in live.devices
    store.write_text(text + "garbage line\n")  # a broken edit keeps the last good contents
    live.refresh()
    assert live.error and "line" in live.error and "a2" in live.devices


def test_add_creates_the_stores_directory(tmp_path):
    """docs/security.md's own example names a store in deploy/tier-auth/, which a fresh clone does not have; seen
    red without the mkdir: `tier.devices: [Errno 2] No such file or directory: '.../devices.tmp'`, exit 2."""
    store = tmp_path / "tier-auth" / "devices"
    assert devices.main(["add", "--store", str(store), "--secrets", str(tmp_path / "s"), "--fleet", "f1", "a1"]) == 0
    assert set(devices.parse_store(store.read_text())) == {"a1"}


@pytest.mark.parametrize("stored", ["", "md5$1$x$y", "pbkdf2-sha256$0$AA==$AA==", "pbkdf2-sha256$10$!!$AA==",
                                    "pbkdf2-sha256$x$AA==$AA=="])
def test_a_malformed_hash_matches_no_password(stored):
    assert devices.check_password("", stored) is False


def test_an_agents_permissions_name_its_own_subjects_and_partition_only():
    device = devices.Device("dev-7", "f.x", "h")
    perms = auth.device_permissions(device, partitions=32)
    p = partition_of("dev-7", 32)
    pub, sub = perms["pub"]["allow"], perms["sub"]["allow"]
    assert f"fedmq.f//x.upd.{p}.dev-7" in pub and f"fedmq.f//x.psecagg.{p}.share.dev-7" in pub
    assert all("dev-7" in s for s in pub) and not any("*" in s or ">" in s for s in pub)
    assert "fedmq.f//x.ack.dev-7" in sub and "fedmq.f//x.secagg.inbox.dev-7" in sub
    assert not any(s.endswith(".ack.*") or s.endswith("inbox.*") for s in sub)


def _request(user="a1", password="pw", mqtt_id="a1", kind="mqtt", server=None, server_xkey=None):
    server = server or KeyPair.create(PREFIX_SERVER)
    server_id = {"id": server.public, "name": "n1", **({"xkey": server_xkey} if server_xkey else {})}
    claims = {"sub": ISSUER_PUB, "aud": "nats-authorization-request",
              "nats": {"server_id": server_id, "user_nkey": USER_PUB,
                       "client_info": {"type": kind, "mqtt_id": mqtt_id, "kind": "Client"},
                       "connect_opts": {"user": user, "pass": password}, "type": "authorization_request", "version": 2}}
    return encode_jwt(claims, server).encode(), server


@pytest.mark.parametrize("case, reason", [
    ({}, None),
    ({"password": "nope"}, "unknown device or wrong password"),
    ({"user": "ghost"}, "unknown device or wrong password"),
    ({"user": ""}, "gave no username"),
    ({"mqtt_id": "a2"}, "client id 'a2'"),
    ({"kind": "nats"}, "not an MQTT client"),
])
def test_the_service_answers_a_request_with_a_user_jwt_or_an_error(tmp_path, case, reason):
    store = tmp_path / "devices"
    store.write_text(f"a1:f1:{devices.hash_password('pw')}\n")
    issuer = KeyPair.from_seed(ISSUER_SEED)
    service = auth.Service(devices.Store(store), issuer, prefix="fedmq", partitions=4)
    data, server = _request(**case)
    response = decode_jwt(service.answer(data).decode(), PREFIX_ACCOUNT)
    assert response["iss"] == ISSUER_PUB and response["sub"] == USER_PUB and response["aud"] == server.public
    body = response["nats"]
    assert body["type"] == "authorization_response"
    if reason is None:
        user = decode_jwt(body["jwt"], PREFIX_ACCOUNT)
        assert user["sub"] == USER_PUB and user["aud"] == "$G" and user["name"] == "a1"
        assert user["nats"]["allowed_connection_types"] == ["MQTT"] and "error" not in body
        assert user["nats"]["pub"] == auth.device_permissions(devices.Device("a1", "f1", ""), partitions=4)["pub"]
    else:
        assert reason in body["error"] and "jwt" not in body
    assert service.answer(b"not a jwt") is None  # no node's request: no answer (the node refuses at its timeout)


def test_a_session_limit_is_the_user_jwts_expiry(tmp_path, capsys):
    store = tmp_path / "devices"
    store.write_text(f"a1:f1:{devices.hash_password('pw')}\n")
    issuer = KeyPair.from_seed(ISSUER_SEED)
    for session, expiry in ((0, False), (60, True)):
        service = auth.Service(devices.Store(store), issuer, prefix="fedmq", partitions=4, session_s=session)
        user = decode_jwt(decode_jwt(service.answer(_request()[0]).decode(), PREFIX_ACCOUNT)["nats"]["jwt"],
                          PREFIX_ACCOUNT)
        assert ("exp" in user) == expiry and (not expiry or 55 <= user["exp"] - user["iat"] <= 61), user
    seed = tmp_path / "issuer.seed"
    seed.write_text(ISSUER_SEED + "\n")
    assert auth.main(["--nats", "nats://127.0.0.1:1", "--devices", str(store), "--issuer-seed-file", str(seed),
                      "--no-xkey", "--session-s", "-1"]) == 2
    assert "tier.auth: --session-s must be 0 (no limit) or more" in capsys.readouterr().err


@pytest.mark.parametrize("nats", [[], {"client_info": [1], "connect_opts": "x", "server_id": 3, "user_nkey": USER_PUB},
                                  {"user_nkey": 5}, "text"])
def test_a_request_of_any_shape_is_refused_or_ignored_never_a_crash(tmp_path, nats):
    store = tmp_path / "devices"
    store.write_text(f"a1:f1:{devices.hash_password('pw')}\n")
    service = auth.Service(devices.Store(store), KeyPair.from_seed(ISSUER_SEED), prefix="fedmq", partitions=4)
    server = KeyPair.create(PREFIX_SERVER)
    out = service.answer(encode_jwt({"sub": ISSUER_PUB, "nats": nats}, server).encode())
    assert out is None or "jwt" not in decode_jwt(out.decode(), PREFIX_ACCOUNT)["nats"]


def test_a_device_authorization_service_that_cannot_start_is_retried_with_back_off_not_in_a_loop(tmp_path, monkeypatch):
    """NatsCluster.keep_auth (the launchers call it every 0.5 s): a service that fails to start, or exits within a
    minute of its start, is started again after 1, 2, 4 ... 60 s; one that ran longer is started again at once.
    Seen red with the back-off removed (a start on every call)."""
    from tier import cluster as cluster_module

    clock = [1000.0]
    monkeypatch.setattr(cluster_module.time, "monotonic", lambda: clock[0])
    nats = cluster_module.NatsCluster(tmp_path / "nats", nodes_count=1, partitions=4, devices=tmp_path / "devices")
    starts = []

    def failing_start(timeout: float = 30.0) -> None:
        starts.append(clock[0])
        raise RuntimeError("the device authorization service did not start")

    monkeypatch.setattr(nats, "start_auth", failing_start)
    for _ in range(int(200 / 0.5)):  # 200 s of the launchers' loop
        nats.keep_auth()
        clock[0] += 0.5
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 1000.0 and gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0], gaps

    class Exited:
        returncode = 1

        def poll(self):
            return 1

    started = []
    monkeypatch.setattr(nats, "start_auth", lambda timeout=30.0: started.append(clock[0]))
    nats._auth_retry, nats._auth_started, nats.auth_proc = (0, None), clock[0] - 3600, Exited()
    nats.keep_auth()
    assert started == [clock[0]]  # it had run an hour: at once


def test_with_an_xkey_the_service_answers_sealed_requests_only_and_seals_its_answer(tmp_path, caplog):
    """tier.auth --xkey-seed-file: a request sealed to the service's xkey by the node whose xkey its header names (and
    its server signed) is answered, sealed to that node's xkey; anything else, a request in the clear, garbage, one
    sealed to another key, from another sender than the header's, changed on the way or whose header is not its
    server's xkey, is ignored with one log line each, and the service answers the next good request as before."""
    store = tmp_path / "devices"
    store.write_text(f"a1:f1:{devices.hash_password('pw')}\n")
    service_xkey, node_xkey, other = XKey.create(), XKey.create(), XKey.create()
    service = auth.Service(devices.Store(store), KeyPair.from_seed(ISSUER_SEED), prefix="fedmq", partitions=4,
                           xkey=service_xkey)

    def answer(data: bytes, header: str | None = node_xkey.public):
        caplog.clear()
        out = service.answer(data, {SERVER_XKEY_HEADER: header} if header else None)
        return out, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    def good() -> None:
        data, server = _request(server_xkey=node_xkey.public)
        out, logged = answer(node_xkey.seal(data, service_xkey.public))
        assert logged == [] and out.startswith(VERSION) and b"eyJ" not in out
        response = decode_jwt(node_xkey.open(out, service_xkey.public).decode(), PREFIX_ACCOUNT)
        assert response["aud"] == server.public and "jwt" in response["nats"], response

    caplog.set_level(logging.WARNING, logger="tier.auth")
    good()
    request = _request(server_xkey=node_xkey.public)[0]
    sealed = node_xkey.seal(request, service_xkey.public)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for data, header, reason in (
            (request, None, "in the clear"),
            (b"\x00garbage" * 9, node_xkey.public, "not a sealed xkv1 message"),
            (b"xkv1" + bytes(60), node_xkey.public, "does not open"),
            (node_xkey.seal(request, other.public), node_xkey.public, "does not open"),
            (other.seal(request, service_xkey.public), node_xkey.public, "does not open"),
            (flipped, node_xkey.public, "does not open"),
            (sealed, "not-an-xkey", "not an nkey"),
            (sealed, encode_public(PREFIX_CURVE, bytes(32)), "does not open"),  # a low-order point: no box
            (other.seal(request, service_xkey.public), other.public, "not the xkey its server signed")):
        out, logged = answer(data, header)
        assert out is None and len(logged) == 1 and "\n" not in logged[0] and reason in logged[0], (reason, logged)
        good()
    plain = auth.Service(devices.Store(store), KeyPair.from_seed(ISSUER_SEED), prefix="fedmq", partitions=4)
    caplog.clear()
    assert plain.answer(sealed, {SERVER_XKEY_HEADER: node_xkey.public}) is None
    assert "--xkey-seed-file" in caplog.records[-1].getMessage()
