"use strict";
// The web fleet view: connects to the broker over MQTT over WebSockets (MQTT.js, MQTT 5) with a
// read-only login, feeds every message of <prefix>/<fleet>/# into a FleetState (fleet.js) and
// redraws. Everything shown comes from the broker; text from devices goes in with textContent only.
(function () {
  const $ = (id) => document.getElementById(id);
  const REDRAW_MS = 250;
  // CONNACK reason codes of a refused login (MQTT 5; 4 and 5 in 3.1.1): the page says so and stops
  // reconnecting. mosquitto 2 answers a wrong password with 135 (not authorized).
  const BAD_LOGIN = "wrong username or password (or the user may not log in)";
  const AUTH_CODES = { 134: BAD_LOGIN, 135: BAD_LOGIN, 4: BAD_LOGIN, 5: BAD_LOGIN };
  const TAKEN_OVER = 142;  // MQTT 5 "session taken over", where the broker says it (mosquitto 2.0 just closes)
  const FLAP = { drops: 3, seconds: 30 };  // closed this often right after logging in: someone else has the session

  let config = null, state = null, client = null, everConnected = false, stopped = false, attempts = 0, dirty = false;
  let drops = [];  // times (ms) the broker closed a session this page had logged in

  function setConn(kind, text) {
    const el = $("conn");
    el.className = `conn ${kind}`;
    el.textContent = text;
    el.dataset.kind = kind;
  }

  function fmt(v, digits = 3) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(digits);
    return String(v);
  }

  function ago(t) {
    if (!t) return "–";
    const s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    return n < 10000 ? `${n} B` : n < 1e7 ? `${(n / 1e3).toFixed(1)} kB` : `${(n / 1e6).toFixed(1)} MB`;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function fillTable(id, rows, emptyId) {  // rows: [[text, ...], ...]
    const body = $(id).tBodies[0];
    body.replaceChildren();
    for (const row of rows) {
      const tr = document.createElement("tr");
      row.forEach((v) => cell(tr, v));
      body.appendChild(tr);
    }
    if (emptyId) $(emptyId).hidden = rows.length > 0;
  }

  function fillList(id, pairs) {  // pairs: [[term, value], ...]
    const dl = $(id);
    dl.replaceChildren();
    for (const [k, v] of pairs) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      dl.append(dt, dd);
    }
    return pairs.length;
  }

  // A line chart of points [{x, y}] into an <svg viewBox="0 0 480 160">: hand-written, no library.
  function chart(svg, points, label) {
    const NS = "http://www.w3.org/2000/svg", W = 480, H = 160, L = 44, R = 8, T = 10, B = 22;
    svg.replaceChildren();
    const el = (name, attrs, text) => {
      const e = document.createElementNS(NS, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    const pts = points.filter((p) => p.y !== null && p.y !== undefined);
    svg.dataset.points = String(pts.length);
    if (pts.length === 0) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, `no ${label} yet`); return; }
    const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" });
      el("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", class: "axis" }, fmt(y, Math.abs(y1 - y0) < 5 ? 3 : 0));
    }
    el("text", { x: L, y: H - 6, class: "axis" }, "0 s");
    el("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "axis" }, `${(x1 - x0).toFixed(0)} s`);
    el("polyline", { class: "series", points: pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") });
  }

  // A generic table of the coordinator's `partitions` field, whatever its shape (the scale-out tier's).
  function partitions(container, value) {
    container.replaceChildren();
    const rows = Array.isArray(value) ? value.map((v, i) => [String(i), v])
      : value && typeof value === "object" ? Object.entries(value) : null;
    if (!rows || !rows.every(([, v]) => v && typeof v === "object" && !Array.isArray(v))) {
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify(value, null, 1).slice(0, 4000);
      container.appendChild(pre);
      return;
    }
    const keys = [...new Set(rows.flatMap(([, v]) => Object.keys(v)))].slice(0, 12);
    const table = document.createElement("table"), head = document.createElement("tr");
    ["partition", ...keys].forEach((k) => { const th = document.createElement("th"); th.textContent = k; head.appendChild(th); });
    table.createTHead().appendChild(head);
    const body = table.createTBody();
    for (const [name, v] of rows.slice(0, 500)) {
      const tr = document.createElement("tr");
      cell(tr, name);
      keys.forEach((k) => cell(tr, typeof v[k] === "object" && v[k] !== null ? JSON.stringify(v[k]).slice(0, 80) : fmt(v[k])));
      body.appendChild(tr);
    }
    container.appendChild(table);
  }

  function render() {
    dirty = false;
    const c = state.coordinator || {}, m = state.model;
    const isRegressor = c.accuracy === null && typeof c.r2 === "number";
    const scoreName = isRegressor ? "r2" : "accuracy";
    $("version").textContent = fmt(state.version);
    $("published").textContent = c.published_version !== undefined ? `published ${fmt(c.published_version)} · ${c.strategy || ""}` : "";
    $("score-label").textContent = `held-out ${scoreName}`;
    $("chart-score-label").textContent = `held-out ${scoreName}`;
    $("score").textContent = fmt(isRegressor ? c.r2 : c.accuracy);
    const fe = c.fleet_eval && typeof c.fleet_eval === "object" ? Object.entries(c.fleet_eval) : [];
    $("fleet-eval").textContent = fe.length ? `fleet-evaluated: ${fe.map(([k, v]) => `${k} ${fmt(v)}`).join(", ")}` : "";
    $("accepted").textContent = fmt(c.accepted);
    const rejected = c.rejected && typeof c.rejected === "object" ? Object.entries(c.rejected) : [];
    const rejectedTotal = rejected.reduce((s, [, n]) => s + (Number(n) || 0), 0);
    $("rejected-total").textContent = c.accepted !== undefined ? `${fmt(rejectedTotal)} rejected · ${fmt(c.pending)} pending · ${fmt(c.clipped)} clipped` : "";
    const st = c.staleness || {};
    $("staleness").textContent = c.staleness ? `${fmt(st.mean, 2)} / ${fmt(st.max)}` : "–";
    $("gaps").textContent = c.gaps !== undefined ? `${fmt(c.gaps)} gaps · ${fmt(c.buffer_timeouts)} buffer timeouts` : "";
    const counts = state.stateCounts();
    $("agent-count").textContent = fmt(state.agents.size);
    $("agent-states").textContent = [...counts].filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(" · ");
    $("model-size").textContent = m ? bytes(m.bytes) : "–";
    $("model").textContent = m ? `v${m.version} · ${m.codec}${m.chunks ? ` · ${m.chunks} chunks` : ""}` +
      `${m.estimator ? ` · ${m.estimator}` : ""}${m.nParams ? ` · ${fmt(m.nParams)} params` : ""}${m.scaled ? " · scaled" : ""}` : "no model published";
    if (state.modelRefused) $("model").textContent = `${m ? `v${m.version} kept; ` : ""}newest model message refused (${state.modelRefused})`;

    const t0 = state.history.length ? state.history[0].t : 0;
    chart($("chart-version"), state.history.map((p) => ({ x: p.t - t0, y: p.version })), "version");
    chart($("chart-score"), state.history.map((p) => ({ x: p.t - t0, y: p.score })), scoreName);

    const body = $("agents").tBodies[0];
    body.replaceChildren();
    for (const a of [...state.agents.values()].sort((x, y) => (x.id < y.id ? -1 : 1))) {
      const tr = document.createElement("tr");
      tr.dataset.agent = a.id;
      cell(tr, a.id);
      const s = cell(tr, "");
      const badge = document.createElement("span");
      badge.className = `state state-${a.state || "unknown"}`;
      badge.textContent = a.state || "no status";
      s.appendChild(badge);
      cell(tr, ago(a.since));
      cell(tr, a.reason || (a.state === "budget_spent" ? "privacy budget spent" : ""), "reason");
      cell(tr, fmt(a.modelVersion));
      cell(tr, fmt(a.base));
      cell(tr, fmt(state.staleness(a)), "staleness");
      cell(tr, `${a.updatesSeen} seen${a.updatesSent !== null ? ` / ${a.updatesSent} sent` : ""}`, "updates");
      cell(tr, fmt(a.samples));
      cell(tr, a.codec || "–");
      cell(tr, a.epsilon !== null ? fmt(a.epsilon, 2) + (a.statsEpsilon !== null ? ` (stats ${fmt(a.statsEpsilon, 2)})` : "")
        : a.statsEpsilon !== null ? `stats ${fmt(a.statsEpsilon, 2)}` : "–");
      cell(tr, ago(a.lastSeen));
      body.appendChild(tr);
    }
    $("agents-empty").hidden = state.agents.size > 0;

    fillTable("rejected", rejected.sort((x, y) => y[1] - x[1]).map(([r, n]) => [r, fmt(n)]), "rejected-empty");
    fillList("coordinator", state.coordinator ? [
      ["strategy", c.strategy || "–"], ["agents counted", fmt(c.agents)], ["uptime", c.uptime_s !== undefined ? `${fmt(c.uptime_s, 0)} s` : "–"],
      ["status", ago(c.updated_at)], ["checkpoint", c.checkpoint_failing ? `failing: ${JSON.stringify(c.checkpoint_failing).slice(0, 160)}` : "ok"],
      ...(typeof c.roc_auc === "number" ? [["roc auc", fmt(c.roc_auc)]] : []),
    ] : [["status", "no coordinator status yet"]]);
    const p = c.privacy && typeof c.privacy === "object" ? c.privacy : null;
    const privacyRows = p ? (p.error ? [["account", p.error]] : [
      ["mode", p.mode || "–"], ["fleet epsilon (worst agent)", fmt(p.epsilon, 3)], ["median agent epsilon", fmt(p.epsilon_median, 3)],
      ["delta", fmt(p.delta, 8)], ["noise multiplier", fmt(p.noise_multiplier)], ["clip", fmt(p.clip)],
      ["agents accounted", fmt(p.agents)], ...(p.epsilon_budget !== undefined ? [["epsilon budget", fmt(p.epsilon_budget)]] : []),
    ]) : [];
    const local = [...state.agents.values()].filter((a) => a.epsilon !== null);
    if (local.length) privacyRows.push(["agents' own epsilon (max)", fmt(Math.max(...local.map((a) => a.epsilon)), 3)]);
    fillList("privacy", privacyRows);
    $("privacy-empty").hidden = privacyRows.length > 0;

    const sa = c.secure_aggregation && typeof c.secure_aggregation === "object" ? c.secure_aggregation : null;
    $("secagg-card").hidden = !sa && state.secagg.size === 0;
    if (sa || state.secagg.size) {
      const aborted = sa && sa.aborted && typeof sa.aborted === "object" ? Object.entries(sa.aborted) : [];
      fillList("secagg", [
        ...(sa ? [["rounds completed", fmt(sa.completed)], ["rounds aborted", aborted.length ? aborted.map(([r, n]) => `${r} ${n}`).join(", ") : "0"],
          ["cohort K / threshold", `${fmt(sa.k)} / ${fmt(sa.threshold)}`], ["stage", sa.stage || "between rounds"],
          ["agents ready", fmt(sa.ready)], ["last round", sa.last_round_seconds ? `${fmt(sa.last_round_seconds, 2)} s` : "–"]] : []),
        ["messages seen", [...state.secagg].map(([k, n]) => `${k} ${n}`).join(", ") || "–"],
      ]);
    }
    $("partitions-card").hidden = c.partitions === undefined || c.partitions === null;
    if (!$("partitions-card").hidden) partitions($("partitions"), c.partitions);

    fillTable("bad", [...state.bad].map(([k, n]) => [k, fmt(n)]), "bad-empty");
    $("bad-last").textContent = state.lastBad ? `last: ${state.lastBad}` : "";
    document.body.dataset.messages = String(state.messages);
  }

  function scheduleRender() {
    if (!dirty) { dirty = true; setTimeout(render, REDRAW_MS); }
  }

  function wsUrl() {
    if (config.ws_url) return config.ws_url;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.hostname || "127.0.0.1"}:${config.ws_port}/`;
  }

  function stop(kind, text) {
    stopped = true;
    setConn(kind, text);
    if (client) client.end(true);
    $("login").hidden = false;
  }

  function connect(url, username, password) {
    if (client) client.end(true);
    state = new FleetState(config, MessagePack.decode);
    everConnected = false; stopped = false; attempts = 0; drops = [];
    setConn("warn", `connecting to ${url} as ${username}…`);
    client = mqtt.connect(url, {
      protocolVersion: 5, username, password, clean: true, keepalive: 30,
      clientId: `fedmq-web-${Math.random().toString(16).slice(2, 10)}`,  // the broker names the session after the user
      reconnectPeriod: 2000, connectTimeout: 8000,
    });
    client.on("connect", () => {
      everConnected = true; attempts = 0;
      setConn("ok", `connected to ${url} as ${username}`);
      $("login").hidden = true;
      client.subscribe(config.subscribe, { qos: 0 }, (err, granted) => {
        if (err || (granted && granted.some((g) => g.qos >= 128))) {
          stop("error", `the broker does not let ${username} read ${config.subscribe}: give the page a read-only login such as web or monitor (broker/acl)`);
        }
      });
    });
    client.on("message", (topic, payload) => { state.feed(topic, payload, Date.now() / 1000); scheduleRender(); });
    client.on("error", (err) => {
      const reason = AUTH_CODES[err && err.code];
      if (reason) stop("error", `the broker at ${url} refused the login of ${username}: ${reason} (MQTT reason ${err.code})`);
      else if (!stopped) setConn(everConnected ? "warn" : "error", `broker ${url}: ${err && err.message ? err.message : err}`);
    });
    const takenOver = (how) => stop("error", `another client logged in as ${username} and took this session over (${how}): ` +
      "the broker keeps one session per user, so give each viewer its own read-only user");
    let live = false;
    client.on("connect", () => { live = true; });
    client.on("disconnect", (packet) => {
      if (packet && packet.reasonCode === TAKEN_OVER) takenOver("MQTT reason 142");
    });
    client.on("close", () => {
      if (stopped) return;
      attempts += 1;
      if (live) {  // a session that had logged in was closed: a takeover looks like this, again and again
        live = false;
        const now = Date.now();
        drops = drops.filter((t) => now - t < FLAP.seconds * 1000).concat([now]);
        if (drops.length >= FLAP.drops) { takenOver(`closed ${drops.length} times in ${FLAP.seconds} s right after logging in`); return; }
      }
      if (everConnected) setConn("warn", `lost the broker at ${url}; reconnecting (attempt ${attempts})…`);
      else setConn("error", `cannot open a WebSocket to ${url} (attempt ${attempts}): the broker refused it or is not ` +
                            "listening there; mosquitto needs a listener with protocol websockets (broker/mosquitto.conf)");
    });
    scheduleRender();
  }

  async function start() {
    try {
      const res = await fetch("config.json", { cache: "no-store" });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      config = await res.json();
    } catch (e) {
      setConn("error", `cannot load config.json from the server that served this page: ${e.message}`);
      return;
    }
    if (typeof mqtt === "undefined" || typeof MessagePack === "undefined") {
      setConn("error", "the page's scripts vendor/mqtt.min.js or vendor/msgpack.min.js did not load");
      return;
    }
    $("fleet").textContent = config.fleet;
    document.title = `fedmq fleet ${config.fleet}`;
    $("login-url").value = wsUrl();
    $("login-user").value = config.username;
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      connect($("login-url").value.trim(), $("login-user").value.trim(), $("login-password").value);
    });
    state = new FleetState(config, MessagePack.decode);
    render();
    if (config.password) connect(wsUrl(), config.username, config.password);
    else { $("login").hidden = false; setConn("warn", `log in to the broker to watch fleet ${config.fleet}`); $("login-password").focus(); }
  }

  start();
})();
