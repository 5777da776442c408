// zpar's dashboard: one page, fed by the broker's event stream (/api/events, a snapshot a second).
// Every value shown came from a peer (node names, function names, tracebacks): it goes in as text
// (textContent), never as HTML.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const WINDOW_S = 300;        // the throughput chart's span
const STREAM_S = 60;         // the task stream's span
const MAX_FAILURES = 20;
const rates = [];            // [time, tasks finished per second]
let last = null;             // the previous snapshot's [time, finished]
const seen = new Map();      // task key -> task, for the stream (the latest STREAM_S seconds)
const failures = new Map();  // task key -> task that did not end well (the latest MAX_FAILURES)

function $(id) { return document.getElementById(id); }

function text(el, value) { el.textContent = value === undefined || value === null ? "-" : String(value); }

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

function cell(row, value) { const td = row.insertCell(); text(td, value); return td; }

function hue(name) {  // a stable colour per function name
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function header(status) {
  text($("broker"), `broker ${status.broker.host}:${status.broker.pid}  epoch ${String(status.epoch).slice(0, 8)}` +
       `  up ${Math.round(status.uptime_s)} s  producers ${status.producers}`);
  const sec = $("security");
  text(sec, status.security);
  sec.className = String(status.security).startsWith("INSECURE") ? "insecure" : "";
}

function cards(status, metrics, now) {
  text($("nodes-count"), status.nodes.length);
  text($("workers"), `${status.busy} / ${status.workers - status.busy}`);
  text($("queued"), status.queued);
  text($("running"), status.running);
  text($("done"), status.done);
  text($("failed"), status.failed);
  $("failed").className = status.failed ? "value nonzero" : "value";
  const finished = Object.values(metrics.finished).reduce((a, b) => a + b, 0);
  if (last !== null && now > last[0]) {
    const rate = Math.max(0, (finished - last[1]) / (now - last[0]));
    rates.push([now, rate]);
    text($("rate"), rate < 10 ? rate.toFixed(1) : Math.round(rate).toLocaleString());
  }
  last = [now, finished];
  while (rates.length && rates[0][0] < now - WINDOW_S) rates.shift();
}

// A table's rows by name, kept from one snapshot to the next (a control being typed in is not redrawn): the rows
// of names gone are removed, new ones made by ``create(row, name)``; returns [row, item] for each item.
function keyedRows(table, kept, items, attribute, create) {
  const body = $(table).tBodies[0], present = new Set(items.map(item => item.name));
  for (const [name, row] of kept) if (!present.has(name)) { row.remove(); kept.delete(name); }
  return items.map(item => {
    let row = kept.get(item.name);
    if (!row) {
      row = body.insertRow();
      row.dataset[attribute] = item.name;
      create(row, item.name);
      kept.set(item.name, row);
    }
    return [row, item];
  });
}

const nodeRows = new Map(), producerRows = new Map();

function nodes(status) {
  const rows = keyedRows("nodes-table", nodeRows, status.nodes, "node", (row, name) => {
    for (let i = 0; i < 11; i++) row.insertCell();
    controls(row.insertCell(), name);
  });
  for (const [row, n] of rows) {
    ["name", "host", "pid", "workers", "busy", "idle", "running"].forEach((key, i) => text(row.cells[i], n[key]));
    text(row.cells[7], n.cpu_percent);
    text(row.cells[8], n.memory_total ? `${bytes(n.memory_used)} of ${bytes(n.memory_total)}` : undefined);
    text(row.cells[9], (n.worker_load || []).map(w => `${w.pid}: ${bytes(w.rss)}, ${w.cpu_percent}%`).join("; "));
    text(row.cells[10], n.last_seen_s);
  }
}

function controls(td, node) {
  const drain = document.createElement("button"), size = document.createElement("input"),
        set = document.createElement("button");
  drain.textContent = "drain";
  drain.className = "drain";
  drain.title = "take no more tasks, finish those held, then leave";
  drain.onclick = () => act("api/nodes/drain", { node }, `drain ${node}`);
  size.type = "number";
  size.min = "1";
  size.className = "size";
  size.setAttribute("aria-label", `workers for ${node}`);
  set.textContent = "set workers";
  set.className = "resize";
  set.onclick = () => act("api/nodes/workers", { node, workers: Number(size.value) }, `${size.value} workers on ${node}`);
  const stop = document.createElement("button");
  stop.textContent = "stop";
  stop.className = "stop";
  stop.title = "leave now: the tasks held run elsewhere";
  stop.onclick = () => { if (confirm(`Stop ${node} now?`)) act("api/nodes/stop", { node }, `stop ${node}`); };
  td.append(drain, " ", stop, " ", size, set);
}

async function act(path, body, what) {
  const note = $("action");
  try {
    const reply = await fetch(path, { method: "POST", body: JSON.stringify(body),
      headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" } });
    const answer = await reply.json();
    note.textContent = reply.ok && answer.ok !== false ? `${what}: done` : `${what}: ${answer.error || answer.result}`;
  } catch (err) {
    note.textContent = `${what}: ${err}`;
  }
}

function producers(status) {
  const rows = keyedRows("producers-table", producerRows, status.producer_list || [], "producer", (row, name) => {
    for (let i = 0; i < 8; i++) row.insertCell();
    const cancel = document.createElement("button");
    cancel.textContent = "cancel all";
    cancel.className = "cancel";
    cancel.title = "cancel every task of this producer not ended yet";
    cancel.onclick = () => act("api/tasks/cancel", { producer: name }, `cancel the tasks of ${name}`);
    row.insertCell().append(cancel);
  });
  for (const [row, p] of rows) {
    ["name", "host", "queued", "running", "submitted", "ended", "failed"].forEach((key, i) => text(row.cells[i], p[key]));
    const bars = [{ function: "all", submitted: p.submitted, ended: p.ended, failed: p.failed },
                  ...(p.functions || [])];
    row.cells[7].replaceChildren(...bars.map(progressLine));
  }
}

function progressLine(f) {  // a function's tasks ended of those submitted: a bar and its numbers
  const line = document.createElement("div"), bar = document.createElement("progress"),
        label = document.createElement("span");
  line.className = "progress";
  line.dataset.function = f.function;
  bar.max = 1;
  bar.value = f.submitted ? f.ended / f.submitted : 0;
  label.textContent = ` ${f.function}: ${f.ended}/${f.submitted}${f.failed ? `, ${f.failed} failed` : ""}`;
  line.append(bar, label);
  return line;
}

function throughput(now) {
  const canvas = $("throughput"), g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...rates.map(r => r[1]));
  g.fillStyle = "#687085";
  g.font = "11px system-ui";
  g.fillText(`${Math.round(top).toLocaleString()}/s`, 4, 12);
  g.fillText(`-${WINDOW_S} s`, 4, h - 4);
  g.fillText("now", w - 26, h - 4);
  g.strokeStyle = "#1c64d6";
  g.lineWidth = 2;
  g.beginPath();
  rates.forEach(([t, r], i) => {
    const x = w - (now - t) / WINDOW_S * w, y = h - 16 - r / top * (h - 32);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
}

function stream(tasks, now) {
  for (const t of tasks) seen.set(taskKey(t), t);
  for (const [key, t] of seen) if (t.time < now - STREAM_S) seen.delete(key);
  const rows = [...new Set([...seen.values()].map(t => `${t.node} pid ${t.worker}`))].sort();
  const canvas = $("stream"), g = canvas.getContext("2d"), w = canvas.width;
  canvas.height = Math.max(60, rows.length * 18 + 20);
  const h = canvas.height, label = 150;
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui";
  const names = new Set();
  rows.forEach((row, i) => { g.fillStyle = "#687085"; g.fillText(row, 4, 14 + i * 18); });
  for (const t of seen.values()) {
    const i = rows.indexOf(`${t.node} pid ${t.worker}`);
    const x0 = label + (1 - (now - (t.time - t.duration_s)) / STREAM_S) * (w - label);
    const x1 = label + (1 - (now - t.time) / STREAM_S) * (w - label);
    names.add(t.function);
    g.fillStyle = t.outcome === "ok" ? `hsl(${hue(t.function)} 65% 55%)` : "#c92a2a";
    g.fillRect(Math.max(label, x0), 4 + i * 18, Math.max(1.5, x1 - Math.max(label, x0)), 14);
  }
  const legend = $("legend");
  legend.replaceChildren();
  for (const name of [...names].sort()) {
    const item = document.createElement("span"), swatch = document.createElement("i");
    swatch.style.background = `hsl(${hue(name)} 65% 55%)`;
    item.append(swatch, document.createTextNode(name || "(unnamed)"));
    legend.append(item);
  }
}

function failed(tasks) {
  for (const t of tasks) if (t.outcome !== "ok") failures.set(taskKey(t), t);
  const latest = [...failures.values()].sort((a, b) => b.time - a.time).slice(0, MAX_FAILURES);
  failures.clear();
  for (const t of latest) failures.set(taskKey(t), t);
  const list = $("failures");
  list.replaceChildren();
  if (!latest.length) {
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = "none";
    list.append(li);
  }
  for (const t of latest) {
    const li = document.createElement("li"), line = document.createElement("div");
    li.className = "failure";
    line.textContent = `${new Date(t.time * 1000).toLocaleTimeString()}  ${t.function || "(unnamed)"}  ` +
      `${t.outcome}  on ${t.node || "?"} (worker ${t.worker || "?"})  after ${t.duration_s.toFixed(3)} s  ` +
      `task ${t.task} of ${t.producer}`;
    const pre = document.createElement("pre");
    pre.textContent = t.error || "";
    li.append(line, pre);
    list.append(li);
  }
}

function security(status, metrics) {
  const body = $("security-table").tBodies[0], c = status.counters || {};
  body.replaceChildren();
  for (const [name, value] of [["authentication", status.security],
                               ["handshakes refused", metrics.handshakes_refused],
                               ["keys revoked", c.peers_revoked || 0],
                               ["bad messages dropped", metrics.protocol_errors],
                               ["loop lag (s)", metrics.loop_lag.toFixed(4)]]) {
    const row = body.insertRow();
    cell(row, name);
    const td = cell(row, value);
    if (name === "authentication" && String(value).startsWith("INSECURE")) td.style.color = "#c92a2a";
  }
}

// One ended task of the history, whatever list it is in.
const taskKey = (t) => `${t.producer}/${t.task}/${t.time}`;

// Tasks that ask for resources no connected node offers (zpar_broker.resources): a warning line each, above the
// cards, while they wait.
function unplaceable(status) {
  const list = $("unplaceable");
  list.replaceChildren();
  for (const item of status.unplaceable || []) {
    const asked = Object.entries(item.resources).map(([name, n]) => `${name}=${n}`).join(", ");
    const offered = Object.entries(item.offered || {}).map(
      ([node, res]) => `${node}: ${Object.entries(res).map(([name, n]) => `${name}=${n}`).join(", ")}`);
    const li = document.createElement("li");
    li.textContent = `warning: ${item.tasks} task(s) ask for ${asked}, which no connected node offers ` +
      `(nodes offer: ${offered.join("; ") || "none"}); they wait for an agent started with --resources`;
    list.append(li);
  }
  list.hidden = !list.children.length;
}

function show(snapshot) {
  const { status, metrics, tasks, time } = snapshot;
  header(status);
  unplaceable(status);
  cards(status, metrics, time);
  nodes(status);
  producers(status);
  throughput(time);
  stream(tasks, time);
  failed(tasks);
  security(status, metrics);
}

function connect() {
  const events = new EventSource(`api/events?token=${encodeURIComponent(token)}`);
  events.onopen = () => { $("live").className = ""; $("live").textContent = "\u25cf live"; };
  events.onerror = () => { $("live").className = "stale"; $("live").textContent = "\u25cf offline"; };
  events.onmessage = message => {
    const snapshot = JSON.parse(message.data);
    if (snapshot.error) { text($("broker"), snapshot.error); return; }
    show(snapshot);
  };
}

connect();
