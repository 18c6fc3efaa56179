// A small Perth producer in Node, written from docs/protocol.md: it builds batches of versioned
// operations and enqueues each with EVALSHA of perth_pipeline/lua/enqueue.lua.
//
//   node producer.js <scenario> [json-argument]    (environment: REDIS_URL, PERTH_QUEUE, PERTH_ENQUEUE_LUA)
//
// Scenarios (each prints what it wrote as one JSON document on stdout):
//   session          a session with two tabs and three panes, scrollback, then an update and a delete
//   tab '<record>'   one tab.upsert of the whole tab record given (JSON), e.g. a rename
//   bad              batches that break the contract: the workers must refuse them
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { deflateSync } from "node:zlib";
import { createClient } from "redis";

const APPLY_BATCH = "workers.jobs.apply_batch";
const FORMAT = 2;

// --- versions: a hybrid logical clock, max(now_ns, last + 1) -------------------------------------

class HybridClock {
  constructor() {
    // nanoseconds since the epoch: the wall clock once, then the monotonic clock's progress
    this.base = BigInt(Date.now()) * 1_000_000n - process.hrtime.bigint();
    this.last = 0n;
  }
  next() {
    const now = this.base + process.hrtime.bigint();
    this.last = now > this.last ? now : this.last + 1n;
    return this.last;
  }
  observe(version) {
    // a version read back from the database: never issue one at or below it, unless it is more
    // than 12 hours ahead of this clock (a broken clock wrote it; the workers refuse > 24 hours)
    const limit = this.base + process.hrtime.bigint() + 12n * 3_600n * 10n ** 9n;
    if (version > this.last && version <= limit) this.last = version;
  }
}

// JSON with BigInt versions written as plain integers (they exceed 2^53)
function toJson(value) {
  if (typeof value === "bigint") return value.toString();
  if (Array.isArray(value)) return `[${value.map(toJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}:${toJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

// --- the producer ----------------------------------------------------------------------------------

export class Producer {
  constructor({ redisUrl, queue, scriptPath, origin = `node-${process.pid}-${randomUUID().slice(0, 8)}` }) {
    this.client = createClient({ url: redisUrl });
    this.queue = queue;
    this.origin = origin;
    this.script = readFileSync(scriptPath, "utf8");
    this.clock = new HybridClock();
    this.ops = [];
    // the workers' defaults (PERTH_JOB_TIMEOUT, PERTH_RESULT_TTL, PERTH_FAILED_TTL, retries)
    this.jobOptions = { timeout: 120, resultTtl: 900, failureTtl: 604800, retries: [1, 2, 5, 10, 20, 30, 60] };
  }

  async connect() {
    await this.client.connect();
    this.sha = await this.client.scriptLoad(this.script);
  }

  close() {
    return this.client.close();
  }

  // each write takes its version when it is made
  upsertSession(record) {
    this.ops.push({ op: "session.upsert", version: this.clock.next(), record, _session: record.id });
  }
  deleteSession(id) {
    this.ops.push({ op: "session.delete", version: this.clock.next(), id, _session: id });
  }
  touchSession(id, lastActive) {
    this.ops.push({ op: "session.touch", version: this.clock.next(), id, last_active: lastActive, _session: id });
  }
  upsertTab(record) {
    this.ops.push({ op: "tab.upsert", version: this.clock.next(), record, _session: record.session_id });
  }
  deleteTab(id, sessionId) {
    this.ops.push({ op: "tab.delete", version: this.clock.next(), id, session_id: sessionId, _session: sessionId });
  }
  upsertPane(sessionId, record) {
    this.ops.push({ op: "pane.upsert", version: this.clock.next(), session_id: sessionId, record, _session: sessionId });
  }
  deletePane(id, tabId, sessionId) {
    const op = { op: "pane.delete", version: this.clock.next(), id, tab_id: tabId, session_id: sessionId };
    this.ops.push({ ...op, _session: sessionId });
  }
  appendHistory({ paneId, tabId, sessionId, chunkIndex, bytes }) {
    // encoding "identity": content is base64 of the bytes themselves (zstd would need a zstd library)
    this.ops.push({
      op: "history.append", version: this.clock.next(), pane_id: paneId, tab_id: tabId, session_id: sessionId,
      chunk_index: chunkIndex, encoding: "identity", raw_size: bytes.length, content: bytes.toString("base64"),
      _session: sessionId,
    });
  }

  // one batch of everything written since the last send, enqueued as one RQ job
  async send({ format = FORMAT } = {}) {
    if (this.ops.length === 0) return null;
    const ops = this.ops.splice(0);
    const sessions = [...new Set(ops.map((op) => op._session))].sort();
    const id = randomUUID();
    const batch = {
      format, id, origin: this.origin, created_at: new Date().toISOString(),
      ops: ops.map(({ _session, ...op }) => op),
    };
    const data = deflateSync(Buffer.from(`["${APPLY_BATCH}",null,[${toJson(batch)}],{}]`, "utf8"), { level: 1 });
    const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
    const shown = sessions.map((s) => s.slice(0, 8)).join(", ");
    const description = `apply_batch: ${count(ops.length, "op")} for ${count(sessions.length, "session")} [${shown}]`;
    const keys = [`rq:queue:${this.queue}`, `rq:job:${id}`, "rq:queues",
      ...sessions.map((s) => `perth:${this.queue}:outstanding:${s}`)];
    const o = this.jobOptions;
    const args = [id, this.queue, data, description, String(o.timeout), String(o.resultTtl),
      String(o.failureTtl), JSON.stringify(o.retries)];
    try {
      await this.client.evalSha(this.sha, { keys, arguments: args });
    } catch (err) {
      if (!String(err?.message).startsWith("NOSCRIPT")) throw err;
      this.sha = await this.client.scriptLoad(this.script); // the server restarted: load it again
      await this.client.evalSha(this.sha, { keys, arguments: args });
    }
    return { id, versions: ops.map((op) => op.version.toString()) };
  }
}

// --- scenarios -------------------------------------------------------------------------------------

const isoSeconds = () => new Date(Math.floor(Date.now() / 1000) * 1000).toISOString();

async function session(p) {
  const s = { id: randomUUID(), name: "node session", template_name: null, created_at: isoSeconds(), last_active: isoSeconds() };
  const tabs = [0, 1].map((position) => ({
    id: randomUUID(), session_id: s.id, position, name: `tab ${position}`, layout_blob: { direction: "vertical", sizes: [50, 50] },
  }));
  const pane = (tab, n, extra = {}) => ({
    id: randomUUID(), tab_id: tab.id, pane_id: `terminal_${n}`, pane_type: "terminal",
    component_state: { scroll: n }, title: `zsh ${n}`, cwd: "/home/perth", command: null, ...extra,
  });
  const panes = [pane(tabs[0], 1), pane(tabs[0], 2, { command: "htop" }), pane(tabs[1], 1, { cwd: null, title: "tail ✓" })];
  p.upsertSession(s);
  tabs.forEach((t) => p.upsertTab(t));
  panes.forEach((x) => p.upsertPane(s.id, x));
  const chunks = [Buffer.from("$ make\n".repeat(40)), Buffer.from([0, 1, 2, 255, 254, 10])];
  chunks.forEach((bytes, chunkIndex) => p.appendHistory({ paneId: panes[0].id, tabId: tabs[0].id, sessionId: s.id, chunkIndex, bytes }));
  const first = await p.send();
  // an update (the whole record again, a new version) and a delete, in a second batch
  tabs[0] = { ...tabs[0], name: "editor", layout_blob: { direction: "horizontal" } };
  p.upsertTab(tabs[0]);
  panes[0] = { ...panes[0], title: "vim", command: "vim ." };
  p.upsertPane(s.id, panes[0]);
  p.deletePane(panes[1].id, tabs[0].id, s.id);
  const second = await p.send();
  return {
    batches: [first, second], session: s, deleted_panes: [panes[1].id],
    tabs: tabs.map((t) => ({ ...t, panes: panes.filter((x) => x.tab_id === t.id && x.id !== panes[1].id) })),
    history: { [panes[0].id]: Buffer.concat(chunks).toString("base64") },
  };
}

async function tab(p, record) {
  p.upsertTab(record);
  return { batches: [await p.send()] };
}

async function bad(p) {
  const s = { id: randomUUID(), name: "half bad", template_name: null, created_at: isoSeconds(), last_active: isoSeconds() };
  const t = { id: randomUUID(), session_id: s.id, position: -1, name: "negative position", layout_blob: {} };
  const pane = { id: randomUUID(), tab_id: t.id, pane_id: "terminal_1", pane_type: "terminal", component_state: {}, title: "", cwd: null, command: null };
  p.upsertSession(s);
  p.upsertTab(t);
  p.ops.push({ op: "pane.upsert", version: p.clock.next() + 2n * 86_400n * 10n ** 9n, session_id: s.id, record: pane, _session: s.id });
  const mixed = await p.send();
  const other = { ...s, id: randomUUID(), name: "unknown format" };
  p.upsertSession(other);
  const unknownFormat = await p.send({ format: 9 });
  return { batches: [mixed, unknownFormat], session: s, tab: t, pane, other_session: other };
}

async function main() {
  const [scenario = "session", argument] = process.argv.slice(2);
  const p = new Producer({
    redisUrl: process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0",
    queue: process.env.PERTH_QUEUE ?? "perth",
    scriptPath: process.env.PERTH_ENQUEUE_LUA ?? new URL("../../perth_pipeline/lua/enqueue.lua", import.meta.url),
  });
  if (process.env.PERTH_OBSERVE_VERSION) p.clock.observe(BigInt(process.env.PERTH_OBSERVE_VERSION));
  await p.connect();
  try {
    const scenarios = { session, tab: (x) => tab(x, JSON.parse(argument)), bad };
    if (!(scenario in scenarios)) throw new Error(`unknown scenario ${scenario}`);
    const written = await scenarios[scenario](p);
    process.stdout.write(`${toJson({ origin: p.origin, ...written })}\n`);
  } finally {
    await p.close();
  }
}

await main();
