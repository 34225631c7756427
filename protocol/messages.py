"""The two msgpack messages of fedmq, their encoders and strict decoders.

Model (coordinator -> agents, retained, sent rarely: a self-describing map)::

    {"format": 2, "type": "model", "fleet": str, "version": int, "time": float,
     "spec": [estimator, n_features, classes, {hyperparameters}] (+ [columns] when named; classes is
             the count n for the classes 0..n-1, else their list; an older coordinator's map form
             {...ModelSpec.to_wire...} is read too),
     "params": bytes (spec.n_params values, little-endian float32 unless "codec" says otherwise),
     "codec": "float16" | "int8" | "int4" (optional, see codec.encode_params; int8 and int4 have "scales": bytes,
              one float16 (or float32) per block of spec.n_features parameters),
     "started_at": float (optional: when the publishing coordinator started),
     "scaling": {"mean": bin, "scale": bin} (optional: the fleet's feature scaling, see
                protocol/stats_message.py; params are for features standardized with it),
     "pace": {"interval": float, "jitter": float} (optional: how often each device should train
             and report, see protocol/pace.py; older agents ignore it),
     "acks": true (optional: the publisher acknowledges each agent's accepted updates on
             ``<prefix>/<fleet>/ack/<agent>``, protocol/acks.py; agents expect acks only then)}

An agent that sees the same version again with another `started_at` knows the coordinator
restarted (its last update may have been lost with a broker's state) and sends afresh.

Update (agent -> coordinator, the hot path: a positional array, floats as float32)::

    [2, "update", seq, base, samples, delta (see codec.Encoded), metrics {str: float}]

The federated evaluation's metrics travel under short names (`METRIC_WIRE_NAMES`: "el" for
eval_loss, "ea" eval_accuracy, "er2" eval_r2; 18 of an int4 top-k update's ~210 bytes); the
decoder gives the long names back, and reads the long names of an older agent too.

The update carries no fleet, agent id or timestamp: the topic ``<prefix>/<fleet>/update/<agent>``
names the first two (and the broker's ACL authenticates it), and the coordinator stamps
arrival with its own clock. Decoders raise `ProtocolError` for anything that is not exactly this.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np

from protocol import codec, pace as pacing
from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec

FORMAT_VERSION = 2
# Positions of the update array's fields (names used in errors and by tests).
UPDATE_FIELDS = ("format", "type", "seq", "base", "samples", "delta", "metrics")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SEQ = 2**63 - 1
MAX_SAMPLES = 10**12
MAX_METRICS = 16
# The metrics every update carries, and their names on the wire (reserved: a sender's "ea" is eval_accuracy).
METRIC_WIRE_NAMES = {"eval_loss": "el", "eval_accuracy": "ea", "eval_r2": "er2"}
_METRIC_NAMES = {short: name for name, short in METRIC_WIRE_NAMES.items()}
# The most classes a model message may carry (ModelSpec's own ceiling); agents accept fewer
# (fedmq-agent --max-classes).
MAX_CLASSES = 100_000
# Longest string in either message: codec and metric names, spec fields, string class labels.
MAX_STR = 256


@dataclass(frozen=True)
class WireLimits:
    """Bounds on a msgpack document, checked before anything is built from it.

    `max_objects` counts every value (containers, keys and scalars), `max_depth` the
    nesting of containers (a scalar at the top is depth 0). msgpack's own unpacker limits
    each container's length but not their number: 4 MiB of empty arrays, nested 16 to an
    array, is 4 million Python lists (300 MB), hence the object count.
    """

    max_objects: int
    max_depth: int
    max_array: int
    max_map: int
    max_str: int = MAX_STR
    max_bin: int = MAX_MESSAGE_BYTES


# [fmt, "update", seq, base, samples, [delta: 4 or 7], {metrics}]: 7 + 7 + 2 * MAX_METRICS values.
UPDATE_LIMITS = WireLimits(max_objects=1 + 7 + 7 + 2 * MAX_METRICS, max_depth=2, max_array=7, max_map=MAX_METRICS)


# The most named feature columns a model spec may carry (protocol/schema.py MAX_COLUMNS).
MAX_COLUMNS = 10_000


def model_limits(max_classes: int = MAX_CLASSES) -> WireLimits:
    """Bounds of a model message carrying at most `max_classes` classes (and `MAX_COLUMNS` column names)."""
    return WireLimits(max_objects=64 + max_classes + MAX_COLUMNS, max_depth=3,
                      max_array=max(max_classes, MAX_COLUMNS), max_map=16)


def _nesting_refused(limits_of):
    """The decoder refuses what nests too deep as the structural scan names it (ProtocolError, reason decode).

    Below SCAN_ABOVE_BYTES msgpack builds a payload before any depth check, up to ~1,000 nested arrays (its
    own stack): the repr of one in an error (a quantizer, format, codec or hyperparameter nested 1,020 deep,
    ~1 KB) raised RecursionError, which the tier worker's and an agent's `except ProtocolError` let through.
    """
    def wrap(decode):
        @functools.wraps(decode)
        def decoded(payload, *args, **kwargs):
            try:
                return decode(payload, *args, **kwargs)
            except RecursionError:
                pass
            scan(payload, limits_of(*args, **kwargs))
            raise ProtocolError("decode", "msgpack nested too deep")
        return decoded
    return wrap


@dataclass(frozen=True)
class ModelMessage:
    """The global model at one version."""

    fleet: str
    version: int
    spec: ModelSpec
    params: np.ndarray  # float64 in memory, float32 on the wire
    time: float = field(default_factory=time.time)
    started_at: float | None = None  # the publishing coordinator's start (wall clock)
    scaling: object | None = None  # protocol.statistics.Scaling the params are expressed for, if any
    codec: str = "float32"  # how params travel (codec.MODEL_CODECS); decoded params are what was sent
    # local SGD steps (rows trained) of a typical agent so far: a device that (re)starts from this
    # model starts its learning-rate schedule there instead of at step 1 (edge_agent/trainer.py)
    steps: int = 0
    pace: pacing.Pace | None = None  # the report interval asked of every device (protocol/pace.py), if steered
    acks: bool = False  # the publisher acknowledges accepted updates on Topics.ack (protocol/acks.py)


@dataclass(frozen=True)
class UpdateMessage:
    """One agent's contribution: an encoded delta from the model at `base_version`.

    `agent_id` travels in the topic, not the payload; decoding takes it from the caller.
    """

    agent_id: str | None
    seq: int
    base_version: int
    n_samples: int
    delta: codec.Encoded
    metrics: dict = field(default_factory=dict)


def encode_model(msg: ModelMessage) -> bytes:
    """The model's payload for `Topics.model`, its params encoded with `msg.codec`."""
    params, scales = codec.encode_params(msg.params, msg.codec, msg.spec.n_features)
    return msgpack.packb(
        {
            "format": FORMAT_VERSION,
            "type": "model",
            "fleet": msg.fleet,
            "version": msg.version,
            "time": msg.time,
            "spec": spec_wire(msg.spec),
            "params": params,
            **({} if msg.codec == "float32" else {"codec": msg.codec}),
            **({} if scales is None else {"scales": scales}),
            **({} if msg.started_at is None else {"started_at": msg.started_at}),
            **({} if msg.scaling is None else {"scaling": _scaling_wire(msg.scaling)}),
            **({"steps": int(msg.steps)} if msg.steps else {}),
            **({} if msg.pace is None else {"pace": msg.pace.to_wire()}),
            **({"acks": True} if msg.acks else {}),
        },
        use_bin_type=True,
    )


@_nesting_refused(lambda max_classes=MAX_CLASSES, **_: model_limits(max_classes))
def decode_model(payload: bytes, *, fleet: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES,
                 max_classes: int = MAX_CLASSES, check_spec: Callable[[ModelSpec], None] | None = None,
                 check_classes: Callable[[int], None] | None = None) -> ModelMessage:
    """Strictly decode a model message (optionally checking it is for `fleet`).

    At most `max_bytes` of payload and `max_classes` classes, and a spec `check_spec(spec)` (if given) does not
    refuse with ValueError (ProtocolError "limits"), nor its class count `check_classes(n)` (if given; asked before
    the spec is built, for a count before its classes are: 100,000 of them are ~11 MB from a ~150-byte model); the
    structure is bounded (`model_limits`) before msgpack builds any object.
    """
    wire = _unpack(payload, max_bytes, model_limits(max_classes))
    if not isinstance(wire, dict):
        raise ProtocolError("schema", f"a model message must be a map, got {type(wire).__name__}")
    _check_header(wire, "model")
    got_fleet = _typed(wire, "fleet", str)
    if fleet is not None and got_fleet != fleet:
        raise ProtocolError("fleet", f"message for fleet {got_fleet!r}, expected {fleet!r}")
    spec = spec_from_wire(wire.get("spec"), max_classes, check_classes)
    if check_spec is not None:  # the reader's limits, before the params are decoded (int4: ~26x its bytes traced)
        _limits(check_spec, spec)
    raw = _typed(wire, "params", bytes)
    model_codec = wire.get("codec", "float32")
    scales = wire.get("scales")
    if model_codec not in ("int8", "int4") and scales is not None:
        raise ProtocolError("schema", f"scales travel only with an int8 or int4 model, not {model_codec!r}")
    params = codec.decode_params(raw, scales, model_codec, spec.n_params, spec.n_features).astype(np.float64)
    return ModelMessage(
        fleet=got_fleet,
        version=_int(wire, "version", 0, MAX_SEQ),
        spec=spec,
        params=params,
        time=_number(wire, "time"),
        started_at=_number(wire, "started_at") if "started_at" in wire else None,
        scaling=_scaling(wire["scaling"], spec.n_features) if "scaling" in wire else None,
        steps=_steps(wire.get("steps", 0)),
        codec=model_codec,
        pace=_pace(wire["pace"]) if "pace" in wire else None,
        acks=_typed(wire, "acks", bool) if "acks" in wire else False,
    )


# The model message's spec: [estimator, n_features, classes, hyperparameters] and, when named, columns.
SPEC_FIELDS = ("estimator", "n_features", "classes", "hyperparameters", "columns")


def spec_wire(spec: ModelSpec) -> list:
    """The spec as a model message carries it: positional, the classes 0..n-1 as their count n.

    A map with the field names and twenty class labels was ~95 of an int4 model's ~700 bytes,
    and every device downloads every model; this is ~20 (docs/architecture.md, "The model's bytes").
    """
    classes = spec.classes
    wire = [spec.estimator, spec.n_features, len(classes) if classes == tuple(range(len(classes))) else list(classes),
            dict(spec.hyperparameters)]
    return wire + [list(spec.columns)] if spec.columns else wire


def spec_from_wire(wire: object, max_classes: int = MAX_CLASSES,
                   check_classes: Callable[[int], None] | None = None) -> ModelSpec:
    """Strictly read a model message's spec (`spec_wire`, or the map of an older coordinator) with at most
    `max_classes` classes and a class count `check_classes` (if given) does not refuse with ValueError
    (ProtocolError "limits"); a count is bounded before any class is built, a list of labels before the spec is."""
    if isinstance(wire, list):
        if len(wire) not in (len(SPEC_FIELDS) - 1, len(SPEC_FIELDS)):
            raise ProtocolError("schema", f"spec must be an array of {len(SPEC_FIELDS) - 1} or {len(SPEC_FIELDS)} "
                                f"fields ({', '.join(SPEC_FIELDS)}), got {len(wire)}")
        wire = dict(zip(SPEC_FIELDS, wire))
        count = wire["classes"]
        if isinstance(count, int) and not isinstance(count, bool):
            if not 0 <= count <= max_classes:
                raise ProtocolError("decode", f"{count} classes outside [0, {max_classes}]")
            if check_classes is not None:
                _limits(check_classes, count)
            wire["classes"] = list(range(count))
    classes = wire.get("classes") if isinstance(wire, dict) else None
    if isinstance(classes, list) and len(classes) > max_classes:  # the array bound admits column names too
        raise ProtocolError("decode", f"{len(classes)} classes exceed the limit of {max_classes}")
    if isinstance(classes, list) and check_classes is not None:  # labels: the spec's tuple and set are ~6 MB at 100,000
        _limits(check_classes, len(classes))
    return ModelSpec.from_wire(wire)


def only_spec(spec: ModelSpec) -> dict[str, Callable]:
    """decode_model's checks for a reader taking models of `spec` alone (the tier's root and workers): another spec,
    or another class count, is refused before its classes are built and its params decoded."""
    def same(held: object, what: str, got: object) -> None:
        if got != held:
            raise ValueError(f"its {what} is not the one held here ({held!r:.60})")
    return {"check_classes": lambda count: same(len(spec.classes), "class count", count),
            "check_spec": lambda got: same(spec, "spec", got)}


def _limits(check: Callable, value: object) -> None:
    """The reader's `check(value)`; its ValueError is a ProtocolError "limits"."""
    try:
        check(value)
    except ValueError as exc:
        raise ProtocolError("limits", str(exc)) from None


def _pace(wire: object) -> pacing.Pace:
    try:
        return pacing.from_wire(wire)
    except ValueError as exc:
        raise ProtocolError("schema", str(exc)) from None


def _steps(value: object) -> int:
    """The model's `steps`: a non-negative int below 2^53 (optional: 0 when absent)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ProtocolError("schema", f"model steps must be a non-negative integer, got {value!r}")
    return value


def _scaling_wire(scaling) -> dict:
    from protocol.stats_message import scaling_to_wire  # it imports this module

    return scaling_to_wire(scaling)


def _scaling(wire: object, n_features: int):
    from protocol.stats_message import scaling_from_wire

    return scaling_from_wire(wire, n_features)


def encode_update(msg: UpdateMessage) -> bytes:
    """The update's payload; publish it on ``Topics.update(msg.agent_id)``."""
    return msgpack.packb(
        [
            FORMAT_VERSION,
            "update",
            msg.seq,
            msg.base_version,
            msg.n_samples,
            msg.delta.to_wire(),
            {METRIC_WIRE_NAMES.get(k, k): float(v) for k, v in msg.metrics.items()},
        ],
        use_bin_type=True,
        use_single_float=True,
    )


@_nesting_refused(lambda *_, **__: UPDATE_LIMITS)
def decode_update(payload: bytes, agent_id: str | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES) -> UpdateMessage:
    """Strictly decode an update payload from agent `agent_id` (known from its topic).

    The delta stays encoded (see `codec.decode`).
    """
    wire = _unpack(payload, max_bytes, UPDATE_LIMITS)
    if not isinstance(wire, list) or len(wire) != len(UPDATE_FIELDS):
        got = f"{len(wire)} fields" if isinstance(wire, list) else type(wire).__name__
        raise ProtocolError("schema", f"an update must be an array of {len(UPDATE_FIELDS)} fields, got {got}")
    wire = dict(zip(UPDATE_FIELDS, wire))
    _check_header(wire, "update")
    metrics = wire["metrics"]
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ProtocolError("schema", f"metrics must be a map of at most {MAX_METRICS} entries")
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError("schema", "metrics must map names to numbers")
        if not math.isfinite(value):
            raise ProtocolError("non_finite", f"metric {key} is not finite")
    return UpdateMessage(
        agent_id=agent_id,
        seq=_int(wire, "seq", 0, MAX_SEQ),
        base_version=_int(wire, "base", 0, MAX_SEQ),
        n_samples=_int(wire, "samples", 1, MAX_SAMPLES),
        delta=codec.Encoded.from_wire(wire["delta"]),
        metrics={_METRIC_NAMES.get(k, k): float(v) for k, v in metrics.items()},
    )


# Below this size no payload can make msgpack build much (at most one object per byte, a few
# MB, with msgpack's own length limits), so the structural walk, ~10 us of Python per update,
# runs first only above it; below, it runs only to name what is wrong with a refused payload.
SCAN_ABOVE_BYTES = 64 * 1024


def _unpack(payload: bytes, max_bytes: int, limits: WireLimits) -> object:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("decode", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError("oversize", f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    small = len(payload) <= SCAN_ABOVE_BYTES
    if not small:
        scan(payload, limits)
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_str_len=limits.max_str, max_bin_len=limits.max_bin,
            max_array_len=limits.max_array, max_map_len=limits.max_map, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input
        if small:
            scan(payload, limits)  # the precise reason, when the structure is what is wrong
        raise ProtocolError("decode", f"not valid msgpack: {type(exc).__name__}: {exc}") from None


# msgpack first bytes with a fixed-size body: the body's length in bytes.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# str8/16/32, bin8/16/32: (width of the length field, kind); array16/32, map16/32: width.
_SIZED = {0xD9: (1, "str"), 0xDA: (2, "str"), 0xDB: (4, "str"), 0xC4: (1, "bin"), 0xC5: (2, "bin"), 0xC6: (4, "bin")}
_CONTAINERS = {0xDC: (2, "array"), 0xDD: (4, "array"), 0xDE: (2, "map"), 0xDF: (4, "map")}


def scan(payload: bytes, limits: WireLimits) -> None:
    """Walk the msgpack structure without building it; ProtocolError past any of `limits`.

    Costs at most `limits.max_objects` steps whatever the payload's size (bins and strings
    are skipped by their length), so it runs before msgpack allocates anything.
    """
    data = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    end, pos, objects = len(data), 0, 0
    pending = [1]  # values still to read at each open container level; the document is one value
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > limits.max_objects:
            raise ProtocolError("decode", f"more than {limits.max_objects} msgpack values")
        if pos >= end:
            raise ProtocolError("decode", "not valid msgpack: truncated")
        b = data[pos]
        pos += 1
        length, kind = 0, None
        if b <= 0x7F or b >= 0xE0:
            continue
        if 0x80 <= b <= 0x8F:
            length, kind = b & 0x0F, "map"
        elif 0x90 <= b <= 0x9F:
            length, kind = b & 0x0F, "array"
        elif 0xA0 <= b <= 0xBF:
            length, kind = b & 0x1F, "str"
        elif b in _FIXED:
            pos += _FIXED[b]
            continue
        elif b in _SIZED or b in _CONTAINERS:
            width, kind = _SIZED.get(b) or _CONTAINERS[b]
            if pos + width > end:
                raise ProtocolError("decode", "not valid msgpack: truncated")
            length = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        else:  # 0xC1 (never used) and the ext types, which fedmq never sends
            raise ProtocolError("decode", f"not valid msgpack: type byte 0x{b:02x} at {pos - 1} is not allowed")
        if kind in ("str", "bin"):
            limit = limits.max_str if kind == "str" else limits.max_bin
            if length > limit:
                raise ProtocolError("decode", f"a {kind} of {length} bytes exceeds the limit of {limit}")
            pos += length
            continue
        limit = limits.max_array if kind == "array" else limits.max_map
        if length > limit:
            raise ProtocolError("decode", f"a {kind} of {length} entries exceeds the limit of {limit}")
        if len(pending) > limits.max_depth:
            raise ProtocolError("decode", f"msgpack nested deeper than {limits.max_depth}")
        pending.append(length * 2 if kind == "map" else length)
    if pos > end:
        raise ProtocolError("decode", "not valid msgpack: truncated")
    if pos < end:
        raise ProtocolError("decode", f"not valid msgpack: {end - pos} bytes after the message")


def _check_header(wire: dict, kind: str) -> None:
    fmt = wire.get("format")
    if fmt != FORMAT_VERSION:
        raise ProtocolError("format", f"unsupported format {fmt!r}, this side speaks {FORMAT_VERSION}")
    if wire.get("type") != kind:
        raise ProtocolError("schema", f"expected a {kind} message, got type {wire.get('type')!r}")


def _typed(wire: dict, key: str, kind: type):
    value = wire.get(key)
    if not isinstance(value, kind):
        raise ProtocolError("schema", f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(wire: dict, key: str, low: int, high: int) -> int:
    value = wire.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError("schema", f"{key}={value} outside [{low}, {high}]")
    return value


def _number(wire: dict, key: str) -> float:
    value = wire.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError("schema", f"{key} must be a finite number")
    return float(value)
