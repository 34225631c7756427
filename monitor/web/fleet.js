"use strict";
// What a watcher of <prefix>/<fleet>/# has learnt about the fleet, as pure state: the page's twin
// of monitor/fleet_view.py. No MQTT and no DOM here. FleetState.feed(topic, bytes, now) takes every
// message; nothing fed to it throws: a payload it cannot read is counted under "<kind>: <reason>".
// The topic layout and the agent states come from the server's /config.json (protocol/topics.py,
// protocol/agent_states.py), and so do the Python decoders' bounds (config.limits, protocol/messages.py): every
// msgpack payload is walked against them before the decoder passed in (@msgpack/msgpack's decode) builds anything.
(function (root) {
  const MAX_HISTORY = 2000;  // chart points kept (one per coordinator status)
  const MAX_JSON_BYTES = 64 * 1024;  // as monitor/fleet_view.py
  const MAX_AGENTS = 10000;

  // config.topics keys of the tier's topics -> the kind of message on them
  const TIER_KINDS = [["tier_update", "update"], ["tier_update_chunk", "update_chunk"], ["tier_secagg", "secagg"],
                      ["tier_partial", "partial"], ["tier_partial_counts", "partial"]];

  // The scale-out tier root's status (tier/root.py) under the coordinator's names, as monitor/fleet_view.py reads it.
  function rootAsCoordinator(doc) {
    const pace = obj(doc.pace) || {};
    return { ...doc, published_version: doc.version, accepted: doc.folded, rejected: obj(doc.updates_rejected) || {},
             agents: pace.agents_online, strategy: `tier root ${str(doc.root, 64) || "?"}`, updated_at: doc.time };
  }

  class Bad extends Error {
    constructor(reason, message) { super(message); this.reason = reason; }
  }

  // The value of the single "+" level of `pattern` in `topic` ("#" at the end matches the rest), or null.
  function plusLevel(pattern, topic) {
    const p = pattern.split("/"), t = topic.split("/");
    let found = "";
    for (let i = 0; i < p.length; i++) {
      if (p[i] === "#") return i === p.length - 1 ? (found || t.slice(i).join("/")) : null;
      if (i >= t.length) return null;
      if (p[i] === "+") { if (!t[i]) return null; found = t[i]; continue; }
      if (p[i] !== t[i]) return null;
    }
    return p.length === t.length ? found : null;
  }

  const isInt = (v) => Number.isInteger(v);
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const str = (v, limit = 200) => (typeof v === "string" ? v.slice(0, limit) : null);
  const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : null);
  const toInt = (v) => (typeof v === "bigint" ? Number(v) : v);  // msgpack may give a BigInt for uint64

  // msgpack first bytes with a fixed-size body: the body's length; the sized ones: [width of the length, kind]
  const FIXED = { 0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8 };
  const SIZED = { 0xd9: [1, "str"], 0xda: [2, "str"], 0xdb: [4, "str"], 0xc4: [1, "bin"], 0xc5: [2, "bin"], 0xc6: [4, "bin"],
                  0xdc: [2, "array"], 0xdd: [4, "array"], 0xde: [2, "map"], 0xdf: [4, "map"] };

  // Walk a msgpack document without building it, as protocol/messages.py scan does: Bad("decode") past any of
  // `limits` (max_objects, max_depth, max_array, max_map, max_str, max_bin), in at most max_objects steps. The
  // decoder allocates every declared array and nests without bound: 8 MB of nested arrays was 6 s and ~640 MB.
  function scan(bytes, limits) {
    const end = bytes.length, pending = [1];  // values still to read at each open level; the document is one
    let pos = 0, objects = 0;
    while (pending.length) {
      const top = pending.length - 1;
      if (pending[top] === 0) { pending.pop(); continue; }
      pending[top] -= 1;
      if (++objects > limits.max_objects) throw new Bad("decode", `more than ${limits.max_objects} msgpack values`);
      if (pos >= end) throw new Bad("decode", "not valid msgpack: truncated");
      const b = bytes[pos++];
      let length = 0, kind;
      if (b <= 0x7f || b >= 0xe0) continue;
      if (b <= 0x8f) [length, kind] = [b & 0x0f, "map"];
      else if (b <= 0x9f) [length, kind] = [b & 0x0f, "array"];
      else if (b <= 0xbf) [length, kind] = [b & 0x1f, "str"];
      else if (b in FIXED) { pos += FIXED[b]; continue; }
      else if (b in SIZED) {
        const [width, k] = SIZED[b];
        if (pos + width > end) throw new Bad("decode", "not valid msgpack: truncated");
        for (let i = 0; i < width; i++) length = length * 256 + bytes[pos + i];
        pos += width;
        kind = k;
      } else throw new Bad("decode", `not valid msgpack: type byte 0x${b.toString(16)} at ${pos - 1} is not allowed`);
      if (kind === "str" || kind === "bin") {
        const limit = kind === "str" ? limits.max_str : limits.max_bin;
        if (length > limit) throw new Bad("decode", `a ${kind} of ${length} bytes exceeds the limit of ${limit}`);
        pos += length;
        continue;
      }
      const limit = kind === "array" ? limits.max_array : limits.max_map;
      if (length > limit) throw new Bad("decode", `a ${kind} of ${length} entries exceeds the limit of ${limit}`);
      if (pending.length > limits.max_depth) throw new Bad("decode", `msgpack nested deeper than ${limits.max_depth}`);
      pending.push(kind === "map" ? length * 2 : length);
    }
    if (pos > end) throw new Bad("decode", "not valid msgpack: truncated");
    if (pos < end) throw new Bad("decode", `not valid msgpack: ${end - pos} bytes after the message`);
  }

  function jsonObject(bytes) {
    if (bytes.length > MAX_JSON_BYTES) throw new Bad("oversize", `${bytes.length} bytes of JSON`);
    let doc;
    try { doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes)); }
    catch (e) { throw new Bad("json", `not JSON: ${e.message}`); }
    if (!obj(doc)) throw new Bad("schema", "expected a JSON object");
    return doc;
  }

  // A model message's spec {estimator, n_features, classes: their count}: from the positional [estimator, n_features,
  // classes (or their count n: 0..n-1), hyperparameters(, columns)] (protocol/messages.py spec_wire), or an older
  // coordinator's map. No class is built; counts past the Python side's bounds (`limits`) are refused as there.
  function specOf(wire, limits) {
    const spec = Array.isArray(wire) ? { estimator: wire[0], n_features: wire[1], classes: wire[2] } : obj(wire) || {};
    const n = toInt(spec.n_features), count = toInt(spec.classes);
    const classes = isInt(count) ? count : Array.isArray(count) ? count.length : 0;
    if (!(classes >= 0 && classes <= limits.max_classes)) throw new Bad("decode", `${classes} classes outside [0, ${limits.max_classes}]`);
    if (!isInt(n) || n < 1 || n > limits.max_features) throw new Bad("schema", `spec n_features must be an integer in [1, ${limits.max_features}]`);
    return { estimator: spec.estimator, n_features: n, classes };
  }

  // Parameters of a model spec (protocol/model_spec.py ModelSpec.n_params): rows x (features + 1).
  function nParams(spec) {
    const rows = spec.estimator === "sgd-classifier" ? (spec.classes === 2 ? 1 : spec.classes) : 1;
    return rows * spec.n_features + rows;
  }

  class FleetState {
    constructor(config, decode) {
      this.config = config;
      this.decode = decode;
      this.agents = new Map();
      this.model = null;
      this.coordinator = null;
      this.history = [];  // [{t, version, score}] one per coordinator status seen
      this.bad = new Map();
      this.lastBad = null;
      this.messages = 0;
      this.secagg = new Map();  // secure-aggregation messages seen, by kind
      this.modelRefused = null;  // why the newest model message was refused, if it was
    }

    // A msgpack payload decoded once its size and structure are within `limits` (config.limits.model or .update).
    msgpack(bytes, limits) {
      const max = this.config.limits.max_bytes;
      if (bytes.length > max) throw new Bad("oversize", `${bytes.length} bytes exceeds the limit of ${max}`);
      scan(bytes, limits);
      try { return this.decode(bytes); } catch (e) { throw new Bad("msgpack", `not msgpack: ${e.message}`); }
    }

    classify(topic) {
      const t = this.config.topics;
      if (topic === t.model) return ["model", null];
      if (topic === t.coordinator) return ["coordinator", null];
      // the scale-out tier's own topics (protocol/topics.py Topics.tier_topic): an agent's update on its partition's
      // topic is an update; a secure-aggregation message keeps "<kind>/<agent>"; a worker's partial sum is known, no more
      for (const [key, kind] of TIER_KINDS) {
        const level = plusLevel(t[key] || "", topic);
        if (level !== null) return [kind, kind === "secagg" ? topic.split("/").slice(-2).join("/") : level];
      }
      for (const kind of ["update_chunk", "update", "status", "stats", "schema", "model_chunk", "secagg"]) {
        const level = plusLevel(t[kind], topic);
        if (level !== null) return [kind, level];
      }
      return ["topic", null];
    }

    feed(topic, bytes, now) {
      this.messages += 1;
      const [kind, agent] = this.classify(topic);
      try {
        if (kind === "topic") throw new Bad("unknown", `not a topic of fleet ${this.config.fleet}`);
        if (kind === "model") this.modelRefused = null;
        if (bytes.length === 0) { this.clear(kind, agent); return null; }
        if (kind === "model") this.onModel(bytes, now);
        else if (kind === "coordinator") this.onCoordinator(bytes, now);
        else if (kind === "update") this.onUpdate(agent, bytes, now);
        else if (kind === "status") this.onStatus(agent, bytes, now);
        else if (kind === "secagg") this.secagg.set(agent.split("/")[0], (this.secagg.get(agent.split("/")[0]) || 0) + 1);
        else if (kind === "update_chunk" && this.agents.has(agent)) this.agents.get(agent).lastSeen = now;
        // stats, schema, model chunks and the tier's partials: their presence is enough (their contents are the
        // coordinator's or the root's, whose status counts them)
        return null;
      } catch (e) {
        const reason = e instanceof Bad ? e.reason : "internal";
        const key = `${kind}: ${reason}`;
        this.bad.set(key, (this.bad.get(key) || 0) + 1);
        this.lastBad = `${topic}: ${e.message}`.slice(0, 200);
        if (kind === "model") this.modelRefused = `${reason}: ${e.message}`.slice(0, 160);
        if (this.agents.has(agent)) this.agents.get(agent).bad += 1;
        return key;
      }
    }

    clear(kind, agent) {
      if (kind === "model") this.model = null;
      else if (kind === "coordinator") this.coordinator = null;
      else if (kind === "status") this.agents.delete(agent);
      else if (kind === "update") throw new Bad("empty", "empty update payload");
    }

    onModel(bytes, now) {
      const msg = this.msgpack(bytes, this.config.limits.model);
      if (!obj(msg)) throw new Bad("schema", "the model message is not a map");
      const version = toInt(msg.version);
      if (!isInt(version)) throw new Bad("schema", "model without an integer version");
      if (msg.type === "manifest") {  // a chunked model (protocol/chunking.py): the manifest is retained last
        this.model = { version, bytes: isInt(toInt(msg.bytes)) ? toInt(msg.bytes) : bytes.length, codec: "chunked",
                       chunks: toInt(msg.chunks), estimator: null, nParams: null, receivedAt: now };
        return;
      }
      if (msg.type !== "model") throw new Bad("schema", `unexpected message type ${String(msg.type).slice(0, 32)}`);
      const spec = specOf(msg.spec, this.config.limits);
      this.model = { version, bytes: bytes.length, codec: str(msg.codec, 32) || "float32", chunks: null,
                     estimator: str(spec.estimator, 64), nParams: nParams(spec),
                     nFeatures: spec.n_features,
                     scaled: obj(msg.scaling) !== null, time: num(msg.time), receivedAt: now };
    }

    onCoordinator(bytes, now) {
      let doc = jsonObject(bytes);
      if (doc.role === "root") doc = rootAsCoordinator(doc);
      if (!isInt(doc.version)) throw new Bad("schema", "coordinator status without an integer version");
      this.coordinator = doc;
      const score = num(doc.accuracy) !== null ? num(doc.accuracy) : num(doc.r2);
      const t = num(doc.updated_at) || now;
      const last = this.history[this.history.length - 1];
      if (!last || last.t !== t) {
        this.history.push({ t, version: doc.version, score });
        if (this.history.length > MAX_HISTORY) this.history.splice(0, this.history.length - MAX_HISTORY);
      }
    }

    agent(id) {
      if (!this.agents.has(id)) {
        if (this.agents.size >= MAX_AGENTS) throw new Bad("too_many_agents", `more than ${MAX_AGENTS} agents`);
        this.agents.set(id, { id, state: null, since: null, reason: null, modelVersion: null, base: null,
                              updatesSeen: 0, updatesSent: null, lastSeq: null, samples: null, codec: null,
                              epsilon: null, statsEpsilon: null, lastSeen: null, lastUpdateBytes: null, bad: 0 });
      }
      return this.agents.get(id);
    }

    onUpdate(id, bytes, now) {
      const msg = this.msgpack(bytes, this.config.limits.update);
      // [format, "update", seq, base, samples, delta, metrics] (protocol/messages.py)
      if (!Array.isArray(msg) || msg.length !== 7 || msg[1] !== "update") throw new Bad("schema", "not an update array");
      const seq = toInt(msg[2]), base = toInt(msg[3]), samples = toInt(msg[4]);
      if (!isInt(base) || !isInt(seq)) throw new Bad("schema", "update without integer seq and base");
      const a = this.agent(id);
      a.updatesSeen += 1;
      a.base = base;
      a.lastSeq = seq;
      if (isInt(samples)) a.samples = samples;
      a.lastUpdateBytes = bytes.length;
      a.lastSeen = now;
    }

    onStatus(id, bytes, now) {
      const doc = jsonObject(bytes);
      if (doc.agent !== id) throw new Bad("agent_mismatch", `status of ${String(doc.agent).slice(0, 64)} on the topic of ${id}`);
      if (!this.config.states.includes(doc.state)) throw new Bad("schema", `unknown agent state ${String(doc.state).slice(0, 32)}`);
      const a = this.agent(id);
      a.state = doc.state;  // the last will says only offline: the other fields keep what was known
      a.reason = str(doc[this.config.reason_fields[doc.state] || "reason"], 300);  // why, in the field its state uses
      if (num(doc.since) !== null) a.since = doc.since;
      if (isInt(doc.version)) a.base = a.updatesSeen ? a.base : doc.version;
      if (isInt(doc.model_version)) a.modelVersion = doc.model_version;
      if (isInt(doc.updates_sent)) a.updatesSent = doc.updates_sent;
      if (isInt(doc.samples)) a.samples = doc.samples;
      if (str(doc.codec, 32)) a.codec = str(doc.codec, 32);
      const privacy = obj(doc.privacy), statsPrivacy = obj(doc.stats_privacy);
      if (privacy && num(privacy.epsilon) !== null) a.epsilon = privacy.epsilon;
      if (statsPrivacy && num(statsPrivacy.epsilon) !== null) a.statsEpsilon = statsPrivacy.epsilon;
      const t = num(doc.time);
      a.lastSeen = Math.max(a.lastSeen || 0, t || now);
    }

    // The newest version known: the coordinator's status may be ahead of the published model.
    get version() {
      const v = [this.model && this.model.version, this.coordinator && this.coordinator.version].filter(isInt);
      return v.length ? Math.max(...v) : null;
    }

    staleness(a) {
      return this.version === null || a.base === null ? null : this.version - a.base;
    }

    // Agents per state, in the order of config.states, and "unknown" for those with no status yet.
    stateCounts() {
      const counts = new Map(this.config.states.map((s) => [s, 0]));
      for (const a of this.agents.values()) {
        const s = a.state || "unknown";
        counts.set(s, (counts.get(s) || 0) + 1);
      }
      return counts;
    }
  }

  root.FleetState = FleetState;
  root.plusLevel = plusLevel;
})(typeof window !== "undefined" ? window : globalThis);
