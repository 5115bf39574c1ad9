// tidings.js: the browser client of the Tidings real-time gateway (wire contract v1).
//
// One dependency-free ES module: no build step. It connects with a token or an async
// token provider, subscribes to channels (async iterator or callbacks), reconnects with
// exponential backoff and full jitter as the close code says, resubscribes with
// `recover`, never delivers an offset twice, signals `recovered: false` explicitly,
// refreshes the token before it expires, detects dead connections from the heartbeat
// interval and reconnects at once when the browser reports it is back online.
//
// The pure rules (backoff, close-code decisions, refresh timing, offset bookkeeping) are
// exported so that they can be tested on their own.

export const VERSION = "0.1.0";

/** Default options; durations are milliseconds. */
export const DEFAULTS = Object.freeze({
  initialDelay: 500,
  maxDelay: 20000,
  resetAfter: 10000,
  slowFloor: 5000,
  heartbeatTimeout: 10000,
  connectTimeout: 10000,
  ssePath: "/sse",
});

/** What each close code means (protocol section 7), for logs and user interfaces. */
export const CLOSE_CODES = Object.freeze({
  1000: "normal closure",
  1001: "server going away",
  1005: "closed without a code",
  1006: "connection lost",
  1009: "message too big",
  1011: "unexpected server error",
  1013: "try again later",
  4401: "unauthorized: token missing, invalid or expired",
  4403: "forbidden: disconnected by the application",
  4408: "heartbeat timeout",
  4429: "too many connections or commands",
});

/** A short description of a close code. */
export function describeClose(code) {
  return CLOSE_CODES[code] ?? (code >= 4000 ? "application close code" : "unknown close code");
}

/**
 * What a client does after a close code: "stop", "reconnect", "reconnect_slowly" or
 * "new_token". Unknown and abnormal closes reconnect.
 */
export function closeAction(code) {
  switch (code) {
    case 1000:
    case 4403:
      return "stop";
    case 4401:
      return "new_token";
    case 4429:
      return "reconnect_slowly";
    default:
      return "reconnect";
  }
}

/**
 * Full-jitter exponential backoff: a uniform delay in [0, min(maxDelay, initialDelay *
 * 2^attempt)). `attempt` counts the failed attempts since the last good connection.
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const initial = options.initialDelay ?? DEFAULTS.initialDelay;
  const max = options.maxDelay ?? DEFAULTS.maxDelay;
  const ceiling = Math.min(max, initial * 2 ** Math.min(attempt, 52));
  return random() * ceiling;
}

/**
 * Reconnection delays. `next(action, upForMs)` returns the wait before the next attempt
 * and counts the attempt; a connection that stayed up for `resetAfter` starts again from
 * the initial delay. "reconnect_slowly" (4429) adds the `slowFloor`.
 */
export class Backoff {
  constructor(options = {}, random = Math.random) {
    this.options = { ...DEFAULTS, ...options };
    this.random = random;
    this.attempt = 0;
  }

  next(action = "reconnect", upForMs = 0) {
    if (upForMs >= this.options.resetAfter) this.attempt = 0;
    let delay = backoffDelay(this.attempt, this.options, this.random);
    if (action === "reconnect_slowly") {
      const floor = this.options.slowFloor;
      delay = Math.min(Math.max(this.options.maxDelay, floor), floor + delay);
    }
    this.attempt += 1;
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * Milliseconds to wait before refreshing a token that expires in `remainingMs`: a lead of
 * a fifth of the remaining lifetime, at least one second and at most one minute.
 */
export function refreshDelay(remainingMs) {
  if (!Number.isFinite(remainingMs)) return Infinity;
  const lead = Math.min(60000, Math.max(1000, remainingMs * 0.2));
  return Math.max(0, remainingMs - lead);
}

/**
 * Offset bookkeeping of one channel, without I/O.
 *
 * It remembers the last delivered offset and the epoch, builds the `recover` argument of
 * a resubscription, holds events that arrive before the `subscribed` reply, and hands out
 * events in increasing offset order with no offset twice.
 */
export class ChannelTracker {
  constructor() {
    this.offset = null;
    this.epoch = null;
    /** idle | subscribing | replaying | live */
    this.phase = "idle";
    this.replayUntil = 0;
    this.held = [];
    this.sent = null;
    this.silent = false;
    this.confirming = false;
    this.announced = false;
  }

  /** Where this channel left off, or null when nothing is known yet. */
  recoverPoint() {
    return this.offset !== null && this.epoch !== null
      ? { offset: this.offset, epoch: this.epoch }
      : null;
  }

  /**
   * Take a position as the starting point of a channel that has none yet: the next
   * subscribe recovers from it. Returns false (and changes nothing) when the channel
   * already has a position or the position is not an integer offset >= 0 and a
   * non-empty epoch.
   *
   * With `announced` (the default) the position is the one a `connected` message gave
   * for an automatic channel (`positions`): the point at which that connection's
   * subscription went live. The first reply on that connection then only confirms it:
   * a `recovered: true` is not reported. If the connection drops before the reply, the
   * next one recovers from this point and reports like any other reconnect. Without it
   * (a position saved from an earlier client, see the `resumeFrom` option), the first
   * reply is reported.
   */
  startAt(offset, epoch, { announced = true } = {}) {
    if (this.offset !== null || this.epoch !== null) return false;
    if (!Number.isInteger(offset) || offset < 0 || typeof epoch !== "string" || !epoch) {
      return false;
    }
    this.offset = offset;
    this.epoch = epoch;
    this.announced = announced;
    return true;
  }

  /**
   * A subscribe is being sent: returns its `recover` argument (or null). With
   * `unknownRecover`, a channel with no position asks for recovery from an unknown
   * epoch: the reply is then `recovered: false` and its offset is exactly where this
   * connection's live stream began (used for the automatic personal channel, whose
   * events may arrive before the reply); that first answer is not a loss to report.
   */
  beginSubscribe({ unknownRecover = false } = {}) {
    this.phase = "subscribing";
    this.held = [];
    this.silent = false;
    // The first subscribe after an announced position: its reply confirms it.
    this.confirming = this.announced;
    this.announced = false;
    let recover = this.recoverPoint();
    if (recover === null && unknownRecover) {
      recover = { offset: 0, epoch: "" };
      this.silent = true;
    }
    this.sent = recover;
    return recover;
  }

  /**
   * The `subscribed` reply's data arrived. Returns `{recovery, events}`: a recovery
   * notice (or null) and the held events now to deliver, in order.
   *
   * `recovered: false` with `since` (the epoch changed and history still holds the new
   * one from its start): the notice marks the loss, then the new epoch's events after
   * `since` are replayed. Their offsets may be lower than the old epoch's, so the count
   * restarts at `since`, not at the reply's offset, or they would be dropped as repeats.
   */
  onSubscribed(data) {
    const from = this.sent;
    const silent = this.silent;
    const confirming = this.confirming;
    this.sent = null;
    this.silent = false;
    this.confirming = false;
    const offset = Number.isInteger(data.offset) ? data.offset : 0;
    const epoch = typeof data.epoch === "string" ? data.epoch : "";
    const since = Number.isInteger(data.since) && data.since >= 0 && data.since <= offset
      ? data.since : null;
    let recovery = null;
    if (from === null || typeof data.recovered !== "boolean") {
      this.offset = offset;
      this.epoch = epoch;
      this.phase = "live";
      return { recovery, events: this._flush() };
    }
    if (data.recovered) {
      if (!silent && !confirming) {
        recovery = { recovered: true, epoch, offset, missed: Math.max(0, offset - from.offset), from };
      }
      this.epoch = epoch;
      // No position of ours (the unknown-epoch first recover): the reply is the baseline.
      if (this.offset === null) this.offset = offset;
      this.replayUntil = offset;
      this.phase = "replaying";
      // Held events that continue the stream (live ones the server sent before its reply,
      // when there is nothing to replay) are delivered now; the others wait for the replay.
      const events = this._flushContiguous();
      if (this.offset >= offset) events.push(...this._goLive());
      return { recovery, events };
    }
    // A `recovered: false` is reported even on the connection that announced the
    // position: the server could not vouch for it (the epoch changed meanwhile).
    if (!silent) recovery = { recovered: false, epoch, offset, from };
    this.epoch = epoch;
    if (since !== null && data.recovered === false) {
      if (recovery) recovery.since = since;
      this.offset = since;
      this.replayUntil = offset;
      this.phase = "replaying";
      return { recovery, events: since >= offset ? this._goLive() : [] };
    }
    this.offset = offset;
    this.phase = "live";
    return { recovery, events: this._flush() };
  }

  /** An event of this channel arrived: returns the events to deliver now, in order. */
  onEvent(event) {
    switch (this.phase) {
      case "subscribing":
        this.held.push(event);
        return [];
      case "replaying": {
        if (event.offset <= this.replayUntil) {
          const out = this._accept(event);
          if (this.offset !== null && this.offset >= this.replayUntil) out.push(...this._goLive());
          return out;
        }
        // The server writes the whole replay before any live event: the replay is over.
        const out = this._goLive();
        out.push(...this._accept(event));
        return out;
      }
      case "live":
        return this._accept(event);
      default:
        return [];
    }
  }

  /** The connection closed: forget what was held; the position is kept for recovery. */
  onDisconnect() {
    this.phase = "idle";
    this.held = [];
    this.sent = null;
    this.silent = false;
    this.confirming = false;
    this.announced = false;
  }

  _goLive() {
    this.phase = "live";
    return this._flush();
  }

  _accept(event) {
    if (this.offset !== null && event.offset <= this.offset) return [];
    this.offset = event.offset;
    return [event];
  }

  /** Deliver the held events that follow the last offset without a hole; keep the rest. */
  _flushContiguous() {
    this.held.sort((a, b) => a.offset - b.offset);
    const out = [];
    while (this.held.length && this.offset !== null && this.held[0].offset <= this.offset + 1) {
      out.push(...this._accept(this.held.shift()));
    }
    return out;
  }

  _flush() {
    const held = this.held.sort((a, b) => a.offset - b.offset);
    this.held = [];
    const out = [];
    for (const event of held) out.push(...this._accept(event));
    return out;
  }
}

/** An error of the client or one reported by the server (`code` is the wire code). */
export class TidingsError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "TidingsError";
    this.code = code;
    Object.assign(this, details);
  }
}

/** The WebSocket URL with `token` set; http(s) URLs are turned into ws(s). */
export function socketUrl(url, token) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const parsed = new URL(url, base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}

/** The SSE URL of the server of `url` (a WebSocket or http URL), with `token` set. */
export function sseUrl(url, token, path = "/sse") {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const parsed = new URL(url, base);
  if (parsed.protocol === "ws:") parsed.protocol = "http:";
  else if (parsed.protocol === "wss:") parsed.protocol = "https:";
  parsed.pathname = path;
  parsed.search = "";
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}

/**
 * The Server-Sent Events transport behind the part of the WebSocket interface the
 * client uses (`readyState`, `send`, `close`, `onmessage`, `onclose`): every SSE
 * message is a text message, the `close` event is the close code, and `send` POSTs the
 * command to `<path>/commands` with the session id from `connected` and the current
 * token. The EventSource's own reconnection is turned off (closed on the first error):
 * the client reconnects with its backoff and recovers as over the WebSocket.
 */
export class SseSocket {
  constructor(url, token, { EventSource = globalThis.EventSource, fetch = globalThis.fetch } = {}) {
    this.readyState = 0;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._token = token;
    this._session = null;
    this._fetch = fetch;
    const parsed = new URL(url);
    this._commands = `${parsed.origin}${parsed.pathname}/commands`;
    const source = (this._source = new EventSource(url));
    source.onopen = () => {
      if (this.readyState === 0) this.readyState = 1;
    };
    source.onmessage = (message) => {
      if (this._session === null && message.data.startsWith('{"type":"connected"')) {
        try {
          this._session = JSON.parse(message.data).data.connection_id;
        } catch {
          // not for us to judge: the client reports the protocol violation
        }
      }
      this.onmessage?.({ data: message.data });
    };
    source.addEventListener("close", (message) => {
      let ended = {};
      try {
        ended = JSON.parse(message.data);
      } catch {
        // a close event without a body: connection lost
      }
      this._end(ended.code || 1006, ended.reason || "");
    });
    source.onerror = () => this._end(1006, "event stream failed");
  }

  send(text) {
    if (this.readyState !== 1 || this._session === null) throw new Error("tidings: SSE not open");
    const command = JSON.parse(text);
    if (command.type === "refresh" && command.data?.token) this._token = command.data.token;
    this._fetch(this._commands, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${this._token}` },
      body: JSON.stringify({ session: this._session, command }),
    }).then((response) => {
      // Refused (session gone, wrong token, busy): this stream is no good any more.
      if (!response.ok) this._end(1006, `command refused (HTTP ${response.status})`);
    }, () => this._end(1006, "command failed"));
  }

  close(code = 1000, reason = "") {
    this._end(code, reason);
  }

  _end(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._source.close();
    this.onclose?.({ code, reason });
  }
}

function defaultUrl() {
  if (typeof location === "undefined") throw new TypeError("tidings: a WebSocket URL is required");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

function noop() {}

/** `{offset, epoch}` with an integer offset >= 0 and a non-empty string epoch. */
function wellFormedPosition(point) {
  return point !== null && typeof point === "object" && Number.isInteger(point.offset)
    && point.offset >= 0 && typeof point.epoch === "string" && point.epoch !== "";
}

const REPLIES = new Set(["subscribed", "unsubscribed", "pong", "refreshed", "error"]);

const systemClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
};

class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  /** Call `listener` for each `name` event; returns a function that removes it. */
  on(name, listener) {
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => this.off(name, listener);
  }

  off(name, listener) {
    this._listeners.get(name)?.delete(listener);
  }

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (error) {
        report(error);
      }
    }
  }
}

/** One channel's subscription: events in offset order, recovery notices, errors. */
export class Subscription extends Emitter {
  constructor(client, channel, auto = false) {
    super();
    this.client = client;
    this.channel = channel;
    /** pending | subscribed | failed | unsubscribed */
    this.state = "pending";
    this.auto = auto;
    this.error = null;
    this._tracker = new ChannelTracker();
    this._everSubscribed = false;
    this._retry = new Backoff(client.options, client._random);
    this._retryTimer = null;
    this._queues = new Set();
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(noop);
  }

  /**
   * The last delivered offset (or the starting one: the reply's, or a position announced
   * by `connected` or given in `resumeFrom`); null while nothing is known.
   */
  get offset() {
    return this._tracker.offset;
  }

  get epoch() {
    return this._tracker.epoch;
  }

  get active() {
    return this.state === "pending" || this.state === "subscribed";
  }

  /** Stop receiving this channel. */
  unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }

  /**
   * Iterate events; a `{kind: "recovery", recovered: false}` item marks a gap (reload the
   * state from the application). Ends when the subscription ends.
   */
  [Symbol.asyncIterator]() {
    const queue = { items: [], waiters: [], done: false, error: null };
    if (!this.active) {
      queue.done = true;
      queue.error = this.error;
    } else {
      this._queues.add(queue);
    }
    const finish = () => {
      this._queues.delete(queue);
      queue.done = true;
      queue.items = [];
      for (const waiter of queue.waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
      return Promise.resolve({ value: undefined, done: true });
    };
    return {
      next: () => {
        if (queue.items.length) return Promise.resolve({ value: queue.items.shift(), done: false });
        if (queue.done) {
          const error = queue.error;
          queue.error = null;
          return error ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => queue.waiters.push({ resolve, reject }));
      },
      return: finish,
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  _push(item) {
    for (const queue of this._queues) {
      const waiter = queue.waiters.shift();
      if (waiter) waiter.resolve({ value: item, done: false });
      else queue.items.push(item);
    }
  }

  _deliver(event) {
    this._emit("event", event);
    this._push(event);
  }

  _recovery(notice) {
    this._emit("recovery", notice);
    if (!notice.recovered) this._push(notice);
  }

  _subscribed(info) {
    this.state = "subscribed";
    this._everSubscribed = true;
    this._retry.reset();
    this._resolveReady(info);
    this._emit("subscribed", info);
  }

  _end(state, error = null) {
    if (!this.active) return;
    this.state = state;
    this.error = error;
    this.client._clock.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._rejectReady(error ?? new TidingsError("unsubscribed", `${this.channel}: unsubscribed`));
    if (error) this._emit("error", error);
    this._emit("unsubscribed", { channel: this.channel, state, error });
    for (const queue of this._queues) {
      // Items already queued are still handed out; then the iterator ends (or throws).
      queue.done = true;
      queue.error = error;
      for (const waiter of queue.waiters.splice(0)) {
        if (queue.error) {
          waiter.reject(queue.error);
          queue.error = null;
        } else {
          waiter.resolve({ value: undefined, done: true });
        }
      }
    }
    this._queues.clear();
  }
}

/**
 * A connection to a Tidings server that reconnects on its own. Create it with
 * `connect(url, options)`; it starts connecting right away.
 */
export class TidingsClient extends Emitter {
  constructor(url, options = {}) {
    super();
    if (!options.token && typeof options.tokenProvider !== "function") {
      throw new TypeError("tidings: give a token or a tokenProvider");
    }
    this.url = url || defaultUrl();
    this.options = { ...DEFAULTS, ...options };
    this._clock = options.clock ?? systemClock;
    this._random = options.random ?? Math.random;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._EventSource = options.EventSource ?? globalThis.EventSource;
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    // options.sse: "auto" (default) falls back to SSE when the WebSocket cannot connect;
    // true uses SSE only; false never.
    const sse = options.sse ?? "auto";
    const sseAvailable = typeof this._EventSource === "function" && typeof this._fetch === "function";
    this._sseAllowed = sse !== false && sseAvailable;
    this._useSse = sse === true && sseAvailable;
    if (typeof this._WebSocket !== "function" && !this._sseAllowed) {
      throw new TypeError("tidings: no WebSocket implementation; pass options.WebSocket");
    }
    if (typeof this._WebSocket !== "function") this._useSse = true;
    /** "websocket" | "sse": the transport of the current (or next) connection attempt. */
    this.transport = this._useSse ? "sse" : "websocket";
    this._provider = typeof options.tokenProvider === "function" ? options.tokenProvider : null;
    this._token = options.token || null;
    this._needToken = false;
    this._tokenPromise = null;
    this._backoff = new Backoff(this.options, this._random);

    /** idle (until the first attempt, in the next microtask) | connecting | connected |
     * disconnected | closed */
    this.state = "idle";
    this.connectionId = null;
    this.userId = null;
    this.expiresAt = null;
    this.heartbeatInterval = null;
    this.channels = [];
    this.closeCode = null;
    this.closeReason = "";

    this._subs = new Map();
    this._optOut = new Set();
    // Positions to resume channels from (options.resumeFrom), each used once.
    this._resume = new Map();
    const resume = options.resumeFrom;
    if (resume && typeof resume === "object") {
      for (const [channel, point] of Object.entries(resume)) {
        if (wellFormedPosition(point)) {
          this._resume.set(channel, { offset: point.offset, epoch: point.epoch });
        }
      }
    }
    this._pending = new Map();
    this._nextId = 1;
    this._ws = null;
    this._gen = 0;
    this._closed = false;
    this._connectedAt = null;
    this._lastSeen = 0;
    this._probing = false;
    this._expiresLocal = null;
    this._timers = { reconnect: null, connect: null, live: null, refresh: null, probe: null };

    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(noop);

    this._onOnline = () => this._online();
    const target = options.onlineTarget ?? (typeof window !== "undefined" ? window : null);
    this._onlineTarget = target && typeof target.addEventListener === "function" ? target : null;
    this._onlineTarget?.addEventListener("online", this._onOnline);

    queueMicrotask(() => this._open());
  }

  // -- public API ------------------------------------------------------------------------

  /**
   * Subscribe to `channel`. `handler` is an event callback or `{onEvent, onRecovery,
   * onError}`. Subscribing to a channel twice returns the same subscription.
   */
  subscribe(channel, handler) {
    if (typeof channel !== "string" || !channel) {
      throw new TypeError("tidings: channel must be a non-empty string");
    }
    if (this._closed) throw new TidingsError("closed", "tidings: the client is closed");
    let sub = this._subs.get(channel);
    const fresh = !sub;
    if (fresh) {
      sub = this._newSubscription(channel, false);
      this._optOut.delete(channel);
    }
    if (typeof handler === "function") sub.on("event", handler);
    else if (handler && typeof handler === "object") {
      if (handler.onEvent) sub.on("event", handler.onEvent);
      if (handler.onRecovery) sub.on("recovery", handler.onRecovery);
      if (handler.onError) sub.on("error", handler.onError);
    }
    if (fresh && this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  /** Stop receiving `channel`; resolves when the server confirmed (or at once offline). */
  unsubscribe(channel) {
    const sub = this._subs.get(channel);
    if (sub) {
      this._subs.delete(channel);
      sub._end("unsubscribed");
    }
    if (this.channels.includes(channel)) this._optOut.add(channel);
    if (this.state !== "connected") return Promise.resolve();
    return this._command("unsubscribe", { channel }).then(noop);
  }

  /** The subscription of `channel`, or undefined. */
  subscription(channel) {
    return this._subs.get(channel);
  }

  /** Every subscription this client holds (after `close()`, the ended ones). */
  get subscriptions() {
    return [...this._subs.values()];
  }

  /**
   * `{[channel]: {offset, epoch}}`: where each channel with a known position stands (also
   * after `close()`). Pass it as `resumeFrom` to a new client to recover from there.
   */
  get positions() {
    const out = {};
    for (const sub of this._subs.values()) {
      const point = sub._tracker.recoverPoint();
      if (point) out[sub.channel] = point;
    }
    return out;
  }

  /** Round trip of an application `ping`, in milliseconds. */
  async ping() {
    if (this.state !== "connected") throw new TidingsError("not_connected", "tidings: not connected");
    const started = this._clock.now();
    await this._command("ping", {});
    return this._clock.now() - started;
  }

  /** Drop the current connection (if any) and connect again now. */
  reconnect() {
    if (this._closed) return;
    this._backoff.reset();
    if (this._ws) this._lost(this._gen, 1000, "reconnect requested", { immediate: true });
    else this._connectNow();
  }

  /** Close for good (code 1000); subscriptions end. */
  close() {
    if (this._closed) return;
    this._finish(1000, "closed by the client", null, true);
  }

  // -- connection ------------------------------------------------------------------------

  _setState(state, details = {}) {
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous, ...details });
  }

  _timer(name, fn, ms) {
    this._clock.clearTimeout(this._timers[name]);
    this._timers[name] = this._clock.setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _clear(...names) {
    for (const name of names) {
      this._clock.clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _connectNow() {
    this._clear("reconnect");
    this._open();
  }

  async _open() {
    if (this._closed) return;
    const gen = ++this._gen;
    this._connectedAt = null;
    this._setState("connecting", { attempt: this._backoff.attempt });
    let token;
    try {
      token = await this._currentToken();
    } catch (error) {
      if (gen === this._gen && !this._closed) {
        this._finish(4401, error.message, error instanceof TidingsError ? error
          : new TidingsError("token_provider", `tidings: the token provider failed: ${error}`));
      }
      return;
    }
    if (gen !== this._gen || this._closed) return;
    let ws;
    let opened = false;
    // A WebSocket that never opened (blocked, refused, timed out) makes the client
    // fall back to SSE from the next attempt on (options.sse "auto").
    const fallBack = () => {
      if (!opened && !this._useSse && this._sseAllowed) {
        this._useSse = true;
        this._emit("transport", "sse");
      }
    };
    try {
      ws = this._useSse
        ? new SseSocket(sseUrl(this.url, token, this.options.ssePath), token,
          { EventSource: this._EventSource, fetch: this._fetch })
        : new this._WebSocket(socketUrl(this.url, token));
    } catch (error) {
      if (!this._useSse && this._sseAllowed) {
        fallBack();
        this._setState("disconnected", { code: 1006, reason: String(error), action: "reconnect",
          delay: 0, willReconnect: true });
        this._connectNow();
        return;
      }
      this._finish(1006, String(error), new TidingsError("bad_url", `tidings: ${error.message}`));
      return;
    }
    this._ws = ws;
    this.transport = this._useSse ? "sse" : "websocket";
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (message) => {
      if (gen === this._gen) this._onMessage(message.data);
    };
    ws.onclose = (event) => {
      if (gen !== this._gen) return;
      fallBack();
      this._lost(gen, event.code || 1006, event.reason || "");
    };
    ws.onerror = noop;
    this._timer("connect", () => {
      fallBack();
      this._lost(gen, 1006, "handshake timed out", { drop: true });
    }, this.options.connectTimeout);
  }

  async _currentToken() {
    if (this._provider) {
      // A cached token about to expire is not worth a connection: ask for a new one.
      const stale = this._expiresLocal !== null && this._clock.now() >= this._expiresLocal - 1000;
      if (this._needToken || !this._token || stale) {
        this._token = await this._askProvider();
        this._needToken = false;
      }
      return this._token;
    }
    if (this._needToken) {
      throw new TidingsError("unauthorized",
        "tidings: the server refused the token (4401) and there is no token provider");
    }
    return this._token;
  }

  _askProvider() {
    if (!this._tokenPromise) {
      this._tokenPromise = Promise.resolve()
        .then(() => this._provider())
        .then((token) => {
          if (typeof token !== "string" || !token) {
            throw new TidingsError("token_provider", "tidings: the token provider gave no token");
          }
          return token;
        })
        .finally(() => {
          this._tokenPromise = null;
        });
    }
    return this._tokenPromise;
  }

  /** The connection `gen` ended with `code` (or is treated as dead). */
  _lost(gen, code, reason, { drop = false, immediate = false } = {}) {
    if (gen !== this._gen || this._closed) return;
    const ws = this._ws;
    this._detach();
    if (drop && ws) {
      try {
        ws.close();
      } catch {
        // already closing
      }
    } else if (immediate && ws) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    const upFor = this._connectedAt === null ? 0 : this._clock.now() - this._connectedAt;
    this._connectedAt = null;
    this.closeCode = code;
    this.closeReason = reason;
    const action = immediate ? "reconnect" : closeAction(code);
    if (action === "stop") {
      this._finish(code, reason, code === 1000 ? null
        : new TidingsError("forbidden", `tidings: closed by the server (${code} ${reason})`.trim()));
      return;
    }
    if (action === "new_token") {
      if (!this._provider) {
        this._finish(code, reason, new TidingsError("unauthorized",
          "tidings: the server refused the token (4401) and there is no token provider"));
        return;
      }
      this._needToken = true;
    }
    const delay = immediate ? 0 : this._backoff.next(action, upFor);
    this._setState("disconnected", { code, reason, action, delay, willReconnect: true });
    if (immediate) this._connectNow();
    else this._timer("reconnect", () => this._open(), delay);
  }

  /** Forget the current socket: its later events are ignored, pending commands fail. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    this._gen += 1;
    this._clear("connect", "live", "refresh", "probe");
    this._probing = false;
    if (ws) {
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) {
      if (entry.kind === "unsubscribe") entry.resolve();
      else entry.reject?.(new TidingsError("disconnected", "tidings: the connection closed"));
    }
    for (const sub of this._subs.values()) sub._tracker.onDisconnect();
  }

  _finish(code, reason, error, byClient = false) {
    const ws = this._ws;
    this._detach();
    this._closed = true;
    this._clear("reconnect");
    if (ws && byClient) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    this._onlineTarget?.removeEventListener("online", this._onOnline);
    this.closeCode = code;
    this.closeReason = reason;
    const ended = error ?? null;
    this._rejectReady(ended ?? new TidingsError("closed", "tidings: the client was closed"));
    for (const sub of [...this._subs.values()]) sub._end(ended ? "failed" : "unsubscribed", ended);
    this._setState("closed", { code, reason, error: ended, willReconnect: false });
    if (ended) this._emit("error", ended);
  }

  _online() {
    if (this._closed) return;
    if (this.state === "disconnected" && this._timers.reconnect !== null) this._connectNow();
    else if (this.state === "connected") this._probe();
  }

  /** Ask the server for a sign of life now; no answer within the timeout is a dead link. */
  _probe() {
    const gen = this._gen;
    const sentAt = this._clock.now();
    this._send({ type: "ping" });
    this._timer("probe", () => {
      if (this._lastSeen < sentAt) this._lost(gen, 1006, "no answer from the server", { drop: true });
    }, this.options.heartbeatTimeout);
  }

  _armLiveness() {
    const gen = this._gen;
    const interval = this.heartbeatInterval;
    const timeout = this.options.heartbeatTimeout;
    const tick = () => {
      if (gen !== this._gen) return;
      const idle = this._clock.now() - this._lastSeen;
      if (idle >= interval + timeout) {
        this._lost(gen, 1006, `no message from the server for ${Math.round(idle / 1000)} s`,
          { drop: true });
        return;
      }
      if (idle >= interval && !this._probing) {
        this._probing = true;
        this._send({ type: "ping" });
      }
      this._timer("live", tick, idle < interval ? interval - idle : interval + timeout - idle);
    };
    this._timer("live", tick, interval);
  }

  _send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(message));
      return true;
    } catch {
      return false;
    }
  }

  _command(type, data, extra = {}) {
    const id = String(this._nextId++);
    return new Promise((resolve, reject) => {
      this._pending.set(id, { kind: type, resolve, reject, ...extra });
      if (!this._send({ type, id, data })) {
        this._pending.delete(id);
        if (type === "unsubscribe") resolve();
        else reject(new TidingsError("not_connected", "tidings: not connected"));
      }
    });
  }

  // -- subscriptions ---------------------------------------------------------------------

  _newSubscription(channel, auto) {
    const sub = new Subscription(this, channel, auto);
    this._subs.set(channel, sub);
    const point = this._resume.get(channel);
    if (point) {
      this._resume.delete(channel);
      sub._tracker.startAt(point.offset, point.epoch, { announced: false });
    }
    return sub;
  }

  _sendSubscribe(sub) {
    this._clock.clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    const auto = this.channels.includes(sub.channel);
    const recover = sub._tracker.beginSubscribe({ unknownRecover: auto });
    const data = recover ? { channel: sub.channel, recover } : { channel: sub.channel };
    this._command("subscribe", data, { sub }).catch(noop);
  }

  _onSubscribed(message, entry) {
    const sub = entry?.sub ?? this._subs.get(message.data?.channel);
    if (!sub || this._subs.get(sub.channel) !== sub || !sub.active) return;
    const { recovery, events } = sub._tracker.onSubscribed(message.data);
    const info = { channel: sub.channel, offset: sub.offset, epoch: sub.epoch };
    if (recovery) info.recovered = recovery.recovered;
    sub._subscribed(info);
    this._emit("subscribed", info);
    if (recovery) {
      const notice = { kind: "recovery", channel: sub.channel, ...recovery };
      sub._recovery(notice);
      this._emit("recovery", notice);
    }
    for (const event of events) this._deliver(sub, event);
  }

  _onServerUnsubscribed(message) {
    const data = message.data ?? {};
    const sub = this._subs.get(data.channel);
    if (!sub) return;
    this._emit("unsubscribed", { channel: data.channel, reason: data.reason,
      resubscribe: data.resubscribe === true });
    if (data.resubscribe === true) {
      this._sendSubscribe(sub);
      return;
    }
    this._subs.delete(data.channel);
    sub._end("unsubscribed", new TidingsError("unsubscribed",
      `${data.channel}: unsubscribed by the server (${data.reason ?? "no reason"})`,
      { channel: data.channel, reason: data.reason }));
  }

  _subscribeFailed(sub, error) {
    if (this._subs.get(sub.channel) !== sub || !sub.active) return;
    sub._tracker.onDisconnect();
    // A channel that never worked, or one that is no longer allowed, fails for good;
    // anything else (broker unavailable, rate limited) is retried with backoff.
    if (!sub._everSubscribed || error.code === "unauthorized" || error.code === "invalid_request") {
      this._subs.delete(sub.channel);
      sub._end("failed", error);
      return;
    }
    sub._emit("error", error);
    const delay = sub._retry.next("reconnect");
    sub._retryTimer = this._clock.setTimeout(() => {
      sub._retryTimer = null;
      if (this.state === "connected" && this._subs.get(sub.channel) === sub) this._sendSubscribe(sub);
    }, delay);
  }

  _deliver(sub, raw) {
    const event = {
      kind: "event",
      type: raw.type,
      channel: raw.channel,
      offset: raw.offset,
      id: raw.id,
      timestamp: raw.timestamp,
      data: raw.data ?? {},
    };
    sub._deliver(event);
    this._emit("event", event);
  }

  // -- messages --------------------------------------------------------------------------

  _onMessage(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (!message || typeof message !== "object" || typeof message.type !== "string") return;
    this._lastSeen = this._clock.now();
    this._probing = false;
    this._emit("message", message);
    // Replies and errors carry the id of the command they answer (events carry their own).
    const reply = REPLIES.has(message.type) && message.id !== undefined;
    const entry = reply ? this._pending.get(message.id) : undefined;
    if (entry) this._pending.delete(message.id);
    switch (message.type) {
      case "connected":
        this._onConnected(message);
        return;
      case "subscribed":
        this._onSubscribed(message, entry);
        return;
      case "unsubscribed":
        if (entry) entry.resolve(message.data);
        else this._onServerUnsubscribed(message);
        return;
      case "pong":
        entry?.resolve(message.data);
        return;
      case "refreshed":
        this._onRefreshed(message);
        entry?.resolve(message.data);
        return;
      case "error":
        this._onError(message, entry);
        return;
      case "join":
      case "leave":
        this._onPresence(message);
        return;
      default:
        if (typeof message.channel === "string" && Number.isInteger(message.offset)) {
          const sub = this._subs.get(message.channel);
          if (!sub || !sub.active) return;
          for (const event of sub._tracker.onEvent(message)) this._deliver(sub, event);
        }
    }
  }

  /**
   * A user joined or left a channel with presence events: not an event (no offset, not
   * recovered), emitted as `join`/`leave` on the subscription and `presence` here.
   */
  _onPresence(message) {
    const userId = message.data?.user_id;
    if (typeof message.channel !== "string" || typeof userId !== "string") return;
    const sub = this._subs.get(message.channel);
    if (!sub || !sub.active) return;
    const presence = { kind: message.type, channel: message.channel, userId };
    sub._emit(message.type, presence);
    this._emit("presence", presence);
  }

  _onConnected(message) {
    const data = message.data ?? {};
    this._clear("connect");
    const now = this._clock.now();
    this._connectedAt = now;
    this.connectionId = data.connection_id ?? null;
    this.userId = data.user_id ?? null;
    // The wire says seconds; the client keeps milliseconds like every other duration.
    this.heartbeatInterval = (Number(data.heartbeat_interval) || 25) * 1000;
    this.channels = Array.isArray(data.channels) ? data.channels.slice() : [];
    const positions = data.positions !== null && typeof data.positions === "object"
      && !Array.isArray(data.positions) ? data.positions : {};
    this._setExpiry(data.expires_at, message.timestamp);
    this._setState("connected", { connectionId: this.connectionId, userId: this.userId });
    const info = { connectionId: this.connectionId, userId: this.userId,
      expiresAt: this.expiresAt, heartbeatInterval: this.heartbeatInterval,
      channels: this.channels.slice() };
    this._resolveReady(info);
    this._emit("connected", info);
    this._armLiveness();
    for (const channel of this.channels) {
      if (this._optOut.has(channel)) {
        this._command("unsubscribe", { channel }).catch(noop);
      } else {
        const sub = this._subs.get(channel) ?? this._newSubscription(channel, true);
        // Where this connection's subscription went live: the channel's first position,
        // so that losing this connection before the reply still recovers from there.
        const point = Object.hasOwn(positions, channel) ? positions[channel] : null;
        if (wellFormedPosition(point)) sub._tracker.startAt(point.offset, point.epoch);
      }
    }
    for (const sub of this._subs.values()) if (sub.active) this._sendSubscribe(sub);
  }

  _setExpiry(expiresAt, serverTimestamp, { refreshed = false } = {}) {
    const expires = Date.parse(expiresAt ?? "");
    if (!Number.isFinite(expires)) return;
    const previous = this._expiresLocal;
    const serverNow = Date.parse(serverTimestamp ?? "");
    // Count the lifetime on the server's clock, then on ours: no clock skew.
    const remaining = expires - (Number.isFinite(serverNow) ? serverNow : Date.now());
    this.expiresAt = new Date(expires);
    this._expiresLocal = this._clock.now() + remaining;
    if (!this._provider) return;
    // A refresh that did not extend the lifetime (the provider gave the same token) is
    // not repeated: the server closes with 4401 at expiry and the provider is asked then.
    if (refreshed && previous !== null && this._expiresLocal <= previous + 1000) return;
    const gen = this._gen;
    this._timer("refresh", () => this._refresh(gen), refreshDelay(remaining));
  }

  async _refresh(gen) {
    let token;
    try {
      token = await this._askProvider();
    } catch (error) {
      this._emit("error", error instanceof TidingsError ? error
        : new TidingsError("token_provider", `tidings: the token provider failed: ${error}`));
      return;
    }
    this._token = token;
    if (gen !== this._gen || this.state !== "connected") return;
    this._command("refresh", { token }).catch(noop);
  }

  _onRefreshed(message) {
    this._setExpiry(message.data?.expires_at, message.timestamp, { refreshed: true });
  }

  _onError(message, entry) {
    const data = message.data ?? {};
    const error = new TidingsError(data.code ?? "error", data.message ?? "error",
      { channel: data.channel, command: entry?.kind });
    if (entry?.kind === "subscribe") this._subscribeFailed(entry.sub, error);
    else if (entry) entry.reject(error);
    this._emit("error", error);
  }
}

/** Create a client and start connecting (see `TidingsClient`). */
export function connect(url, options) {
  return new TidingsClient(url, options);
}

export default connect;
