// Tests of the client's behaviour against a scripted fake WebSocket and a manual clock.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { TidingsClient, TidingsError, connect } from "../tidings.js";

/** A clock whose timers run only when the test advances it. */
class FakeClock {
  constructor() {
    this.time = 1_000_000;
    this.timers = new Map();
    this.nextHandle = 1;
  }

  now() {
    return this.time;
  }

  setTimeout(fn, ms) {
    const handle = this.nextHandle++;
    this.timers.set(handle, { at: this.time + Math.max(0, ms), fn });
    return handle;
  }

  clearTimeout(handle) {
    this.timers.delete(handle);
  }

  /** Move time forward by `ms`, running every timer that falls due, in order. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let next = null;
      for (const [handle, timer] of this.timers) {
        if (timer.at <= end && (next === null || timer.at < next[1].at)) next = [handle, timer];
      }
      if (next === null) break;
      this.timers.delete(next[0]);
      this.time = Math.max(this.time, next[1].at);
      next[1].fn();
      await settle();
    }
    this.time = end;
    await settle();
  }

  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

/** A WebSocket double: the test plays the server. */
function fakeSocketClass() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 1;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
    }

    close(code) {
      this.closedWith = code ?? 1005;
      this.readyState = 3;
    }

    get token() {
      return new URL(this.url).searchParams.get("token");
    }

    receive(message) {
      this.onmessage?.({ data: JSON.stringify(message) });
    }

    welcome(data = {}) {
      this.receive({
        type: "connected",
        timestamp: new Date(Date.now()).toISOString(),
        data: { connection_id: `c_${sockets.length}`, user_id: "u1", heartbeat_interval: 25,
          expires_at: new Date(Date.now() + 3600_000).toISOString(), channels: [], ...data },
      });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    /** The last command of `type` the client sent. */
    last(type) {
      return this.sent.filter((m) => m.type === type).at(-1);
    }

    replySubscribed(channel, offset, epoch, recovered, extra = {}) {
      const command = this.sent.filter((m) => m.type === "subscribe" && m.data.channel === channel).at(-1);
      const data = { channel, offset, epoch, ...extra };
      if (recovered !== undefined) data.recovered = recovered;
      this.receive({ type: "subscribed", id: command.id, data });
    }

    event(channel, offset, type = "notification") {
      this.receive({ type, channel, offset, id: `evt_${offset}`, timestamp: "2026-01-01T00:00:00.000Z",
        data: { n: offset } });
    }
  }
  return { FakeSocket, sockets };
}

function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeSocket, sockets } = fakeSocketClass();
  const online = new EventTarget();
  const client = new TidingsClient("ws://server.test/ws", {
    token: "tok-1", clock, random: () => 0.5, WebSocket: FakeSocket, onlineTarget: online, ...options,
  });
  const states = [];
  client.on("state", (s) => states.push(s));
  return { clock, sockets, client, states, online };
}

async function connected(env, data) {
  await settle();
  const ws = env.sockets.at(-1);
  ws.welcome(data);
  await settle();
  return ws;
}

describe("connecting", () => {
  test("connects with the token in the query and reports the connected state", async () => {
    const env = setup();
    const ws = await connected(env);
    assert.equal(ws.token, "tok-1");
    assert.equal(env.client.state, "connected");
    const info = await env.client.ready;
    assert.equal(info.connectionId, "c_1");
    assert.deepEqual(env.states.map((s) => s.state), ["connecting", "connected"]);
    env.client.close();
  });

  test("the first state change reports the real previous state", async () => {
    const env = setup();
    assert.equal(env.client.state, "idle");
    const ws = await connected(env);
    assert.deepEqual(env.states.map((s) => [s.previous, s.state]),
      [["idle", "connecting"], ["connecting", "connected"]]);
    ws.serverClose(1001);
    await env.clock.advance(env.states.at(-1).delay);
    assert.deepEqual(env.states.slice(2).map((s) => [s.previous, s.state]),
      [["connected", "disconnected"], ["disconnected", "connecting"]]);
    env.client.close();
    assert.deepEqual(env.states.at(-1).previous, "connecting");
  });

  test("a client closed before its first attempt goes from idle to closed", async () => {
    const env = setup();
    env.client.close();
    await settle();
    assert.deepEqual(env.states.map((s) => [s.previous, s.state]), [["idle", "closed"]]);
    assert.equal(env.sockets.length, 0);
  });

  test("heartbeatInterval is in milliseconds while the wire says seconds", async () => {
    const env = setup();
    await connected(env, { heartbeat_interval: 7 });
    assert.equal(env.client.heartbeatInterval, 7000);
    assert.equal((await env.client.ready).heartbeatInterval, 7000);
    env.client.close();
  });

  test("needs a token or a token provider", () => {
    assert.throws(() => connect("ws://x/ws", { WebSocket: class {} }), TypeError);
  });

  test("a token provider gives the first token", async () => {
    let calls = 0;
    const env = setup({ token: undefined, tokenProvider: async () => `p${++calls}` });
    const ws = await connected(env);
    assert.equal(ws.token, "p1");
    env.client.close();
  });
});

describe("subscriptions", () => {
  test("the async iterator yields events in order without duplicates", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    assert.deepEqual(ws.last("subscribe").data, { channel: "news:a" });
    ws.replySubscribed("news:a", 3, "e1");
    assert.deepEqual(await sub.ready, { channel: "news:a", offset: 3, epoch: "e1" });
    const iterator = sub[Symbol.asyncIterator](); // an iterator sees events from its creation on
    for (const offset of [4, 4, 3, 5]) ws.event("news:a", offset);
    const seen = [];
    for await (const item of iterator) {
      seen.push(item.offset);
      if (seen.length === 2) break;
    }
    assert.deepEqual(seen, [4, 5]);
    env.client.close();
  });

  test("the callback form and the client-wide event stream see the same events", async () => {
    const env = setup();
    const ws = await connected(env);
    const mine = [];
    const all = [];
    env.client.on("event", (e) => all.push(`${e.channel}#${e.offset}`));
    env.client.subscribe("news:a", (e) => mine.push(e.offset));
    ws.replySubscribed("news:a", 0, "e1");
    ws.event("news:a", 1);
    ws.event("other:b", 1); // not subscribed: ignored
    assert.deepEqual(mine, [1]);
    assert.deepEqual(all, ["news:a#1"]);
    env.client.close();
  });

  test("a refused subscription fails its ready promise and its iterator", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("secret:x");
    const command = ws.last("subscribe");
    ws.receive({ type: "error", id: command.id,
      data: { code: "unauthorized", message: "not allowed", channel: "secret:x" } });
    await assert.rejects(sub.ready, (e) => e instanceof TidingsError && e.code === "unauthorized");
    assert.equal(sub.state, "failed");
    await assert.rejects(sub[Symbol.asyncIterator]().next(), /not allowed/);
    assert.equal(env.client.subscription("secret:x"), undefined);
    env.client.close();
  });

  test("subscriptions made before the connection are sent once it is up", async () => {
    const env = setup();
    env.client.subscribe("news:a");
    const ws = await connected(env);
    assert.deepEqual(ws.last("subscribe").data, { channel: "news:a" });
    env.client.close();
  });

  test("unsubscribe resolves on the reply and ends the iterator", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    ws.replySubscribed("news:a", 0, "e");
    const iterator = sub[Symbol.asyncIterator]();
    const waiting = iterator.next();
    const done = env.client.unsubscribe("news:a");
    const command = ws.last("unsubscribe");
    ws.receive({ type: "unsubscribed", id: command.id, data: { channel: "news:a" } });
    await done;
    assert.deepEqual(await waiting, { value: undefined, done: true });
    env.client.close();
  });

  test("a server unsubscribe with resubscribe true resubscribes with recover", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    ws.replySubscribed("news:a", 2, "e1");
    ws.event("news:a", 3);
    const notices = [];
    sub.on("recovery", (n) => notices.push(n));
    ws.receive({ type: "unsubscribed",
      data: { channel: "news:a", reason: "insufficient_state", resubscribe: true } });
    assert.deepEqual(ws.last("subscribe").data,
      { channel: "news:a", recover: { offset: 3, epoch: "e1" } });
    ws.replySubscribed("news:a", 9, "e2", false);
    assert.equal(notices.length, 1);
    assert.equal(notices[0].recovered, false);
    assert.equal(sub.state, "subscribed");
    env.client.close();
  });

  test("a server unsubscribe without resubscribe ends the subscription", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    ws.replySubscribed("news:a", 0, "e1");
    ws.receive({ type: "unsubscribed", data: { channel: "news:a", reason: "revoked", resubscribe: false } });
    assert.equal(sub.state, "unsubscribed");
    assert.equal(sub.error.reason, "revoked");
    env.client.close();
  });

  test("the iterator yields an explicit recovered-false item when continuity is lost", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    const iterator = sub[Symbol.asyncIterator]();
    ws.replySubscribed("news:a", 4, "e1");
    ws.event("news:a", 5);
    ws.serverClose(1001);
    await env.clock.advance(env.states.at(-1).delay);
    const ws2 = await connected(env);
    ws2.replySubscribed("news:a", 2, "e2", false);
    ws2.event("news:a", 3);
    const items = [];
    for (let i = 0; i < 3; i += 1) items.push((await iterator.next()).value);
    assert.deepEqual(items.map((i) => [i.kind, i.offset]), [["event", 5], ["recovery", 2], ["event", 3]]);
    assert.equal(items[1].recovered, false);
    assert.deepEqual(items[1].from, { offset: 5, epoch: "e1" });
    env.client.close();
  });

  test("after a recovered-false item, the new epoch's replayed events are delivered", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    const iterator = sub[Symbol.asyncIterator]();
    const seen = [];
    sub.on("event", (e) => seen.push(e.offset));
    ws.replySubscribed("news:a", 40, "e1");
    ws.event("news:a", 41);
    ws.serverClose(1001);
    await env.clock.advance(env.states.at(-1).delay);
    const ws2 = await connected(env);
    assert.deepEqual(ws2.last("subscribe").data,
      { channel: "news:a", recover: { offset: 41, epoch: "e1" } });
    ws2.replySubscribed("news:a", 2, "e2", false, { since: 0 });
    for (const offset of [1, 2, 3]) ws2.event("news:a", offset);
    assert.deepEqual(seen, [41, 1, 2, 3]); // delivered synchronously: the iterator has them
    const items = [];
    for (let i = 0; i < 5; i += 1) items.push((await iterator.next()).value);
    assert.deepEqual(items.map((i) => [i.kind, i.offset]),
      [["event", 41], ["recovery", 2], ["event", 1], ["event", 2], ["event", 3]]);
    assert.equal(items[1].recovered, false);
    assert.equal(items[1].since, 0);
    assert.deepEqual(items[1].from, { offset: 41, epoch: "e1" });
    assert.deepEqual([sub.offset, sub.epoch], [3, "e2"]);
    env.client.close();
  });

  test("ping resolves with the round-trip time", async () => {
    const env = setup();
    const ws = await connected(env);
    const rtt = env.client.ping();
    await env.clock.advance(7);
    ws.receive({ type: "pong", id: ws.last("ping").id, data: {} });
    assert.equal(await rtt, 7);
    env.client.close();
  });
});

// connected.positions: where this connection's personal-channel subscription went live
// (mirrors tests/unit/test_client_session.py for the Python client).
describe("the personal channel's announced position", () => {
  const PERSONAL = "user:u1";
  const announced = (offset, epoch = "e1") => ({ channels: [PERSONAL],
    positions: { [PERSONAL]: { offset, epoch } } });

  function watch(client) {
    const seen = { events: [], notices: [] };
    client.on("event", (e) => seen.events.push(e.offset));
    client.on("recovery", (n) => seen.notices.push(n));
    return seen;
  }

  test("first connection lost before the personal reply misses nothing", async () => {
    const env = setup();
    const seen = watch(env.client);
    const ws = await connected(env, announced(3));
    const recover = { channel: PERSONAL, recover: { offset: 3, epoch: "e1" } };
    assert.deepEqual(ws.last("subscribe").data, recover);
    ws.event(PERSONAL, 4); // held until the reply, which never comes
    ws.serverClose(1006);
    await env.clock.advance(env.states.at(-1).delay);
    const ws2 = await connected(env, announced(6));
    assert.deepEqual(ws2.last("subscribe").data, recover);
    ws2.replySubscribed(PERSONAL, 6, "e1", true);
    for (const offset of [4, 5, 6]) ws2.event(PERSONAL, offset);
    assert.deepEqual(seen.events, [4, 5, 6]);
    assert.equal(seen.notices.length, 1); // reported like any reconnect
    assert.deepEqual(seen.notices[0].from, { offset: 3, epoch: "e1" });
    assert.equal(seen.notices[0].recovered, true);
    assert.equal(seen.notices[0].missed, 3);
    env.client.close();
  });

  test("personal position in connected is the first baseline", async () => {
    const env = setup();
    const seen = watch(env.client);
    const ws = await connected(env, announced(3));
    const sub = env.client.subscription(PERSONAL);
    assert.deepEqual([sub.offset, sub.epoch, sub.auto], [3, "e1", true]);
    ws.event(PERSONAL, 4);
    assert.deepEqual(seen.events, []);
    ws.replySubscribed(PERSONAL, 4, "e1", true);
    assert.deepEqual(seen.events, [4]);
    assert.deepEqual(seen.notices, []); // the reply confirms: no recovery notice
    assert.equal(sub.state, "subscribed");
    // A later connection's announcement does not move a position the client already has.
    ws.serverClose(1006);
    await env.clock.advance(env.states.at(-1).delay);
    const ws2 = await connected(env, announced(9));
    assert.deepEqual(ws2.last("subscribe").data.recover, { offset: 4, epoch: "e1" });
    ws2.replySubscribed(PERSONAL, 9, "e1", true);
    assert.equal(seen.notices.length, 1);
    assert.equal(seen.notices[0].missed, 5);
    env.client.close();
  });

  test("malformed positions fall back to the first recover", async () => {
    for (const positions of ["garbage", { [PERSONAL]: { offset: "3", epoch: "e1" } },
      { [PERSONAL]: { offset: -1, epoch: "e1" } }, { [PERSONAL]: { offset: true, epoch: "e1" } },
      { [PERSONAL]: { offset: 3, epoch: "" } }, { [PERSONAL]: [3, "e1"] },
      { "user:other": { offset: 3, epoch: "e1" } }, [{ offset: 3, epoch: "e1" }], null]) {
      const env = setup();
      const seen = watch(env.client);
      const ws = await connected(env, { channels: [PERSONAL], positions });
      const label = JSON.stringify(positions);
      assert.deepEqual(ws.last("subscribe").data,
        { channel: PERSONAL, recover: { offset: 0, epoch: "" } }, label);
      ws.replySubscribed(PERSONAL, 5, "e1", false);
      assert.deepEqual(seen.notices, [], label);
      assert.equal(env.client.subscription(PERSONAL).offset, 5, label);
      env.client.close();
    }
  });

  test("a channel subscribed by the application takes the announced position too", async () => {
    const env = setup();
    const sub = env.client.subscribe(PERSONAL);
    const ws = await connected(env, announced(2));
    assert.deepEqual(ws.last("subscribe").data.recover, { offset: 2, epoch: "e1" });
    ws.replySubscribed(PERSONAL, 2, "e1", true);
    assert.equal(sub.state, "subscribed");
    env.client.close();
  });
});

describe("resuming from an earlier client", () => {
  test("resumeFrom recovers from the positions of a closed client and reports it", async () => {
    const env = setup();
    const ws = await connected(env, { channels: ["user:u1"],
      positions: { "user:u1": { offset: 1, epoch: "p1" } } });
    env.client.subscribe("news:a");
    ws.replySubscribed("user:u1", 1, "p1", true);
    ws.replySubscribed("news:a", 3, "e1");
    ws.event("news:a", 4);
    env.client.close();
    const positions = env.client.positions;
    assert.deepEqual(positions, { "user:u1": { offset: 1, epoch: "p1" },
      "news:a": { offset: 4, epoch: "e1" } });

    const next = setup({ resumeFrom: { ...positions, "bad:x": { offset: -1, epoch: "e" } } });
    const notices = [];
    next.client.on("recovery", (n) => notices.push(n));
    const news = next.client.subscribe("news:a");
    assert.deepEqual([news.offset, news.epoch], [4, "e1"]);
    assert.equal(next.client.subscribe("bad:x").offset, null); // a malformed entry is ignored
    const ws2 = await connected(next, { channels: ["user:u1"],
      positions: { "user:u1": { offset: 2, epoch: "p1" } } });
    const recovers = Object.fromEntries(ws2.sent.filter((m) => m.type === "subscribe")
      .map((m) => [m.data.channel, m.data.recover]));
    assert.deepEqual(recovers, { "news:a": { offset: 4, epoch: "e1" }, "bad:x": undefined,
      "user:u1": { offset: 1, epoch: "p1" } });
    ws2.replySubscribed("news:a", 5, "e1", true);
    ws2.replySubscribed("user:u1", 2, "p1", true);
    assert.deepEqual(notices.map((n) => [n.channel, n.recovered, n.missed]),
      [["news:a", true, 1], ["user:u1", true, 1]]);
    // A position is used once: a channel subscribed again later starts afresh.
    next.client.unsubscribe("news:a").catch(() => {});
    next.client.subscribe("news:a");
    assert.deepEqual(ws2.last("subscribe").data, { channel: "news:a" });
    next.client.close();
  });
});

describe("reconnection", () => {
  test("an abnormal close reconnects after a jittered delay and recovers every channel", async () => {
    const env = setup();
    const ws = await connected(env, { channels: ["user:u1"] });
    assert.deepEqual(ws.last("subscribe").data, { channel: "user:u1", recover: { offset: 0, epoch: "" } });
    ws.replySubscribed("user:u1", 5, "p1", false);
    const sub = env.client.subscribe("news:a");
    ws.replySubscribed("news:a", 10, "e1");
    ws.event("news:a", 11);
    const notices = [];
    env.client.on("recovery", (n) => notices.push(n));
    const seen = [];
    env.client.on("event", (e) => seen.push(`${e.channel}#${e.offset}`));

    ws.serverClose(1006);
    const down = env.states.at(-1);
    assert.equal(down.state, "disconnected");
    assert.equal(down.code, 1006);
    assert.equal(down.delay, 250); // random 0.5 of the 500 ms ceiling
    assert.equal(env.sockets.length, 1);
    await env.clock.advance(250);
    assert.equal(env.sockets.length, 2);
    const ws2 = await connected(env, { channels: ["user:u1"] });
    const subscribes = ws2.sent.filter((m) => m.type === "subscribe").map((m) => m.data);
    assert.deepEqual(subscribes, [
      { channel: "user:u1", recover: { offset: 5, epoch: "p1" } },
      { channel: "news:a", recover: { offset: 11, epoch: "e1" } },
    ]);
    ws2.event("user:u1", 8); // live on the personal channel before the reply
    ws2.replySubscribed("user:u1", 7, "p1", true);
    ws2.event("user:u1", 6);
    ws2.event("user:u1", 7);
    ws2.replySubscribed("news:a", 13, "e1", true);
    ws2.event("news:a", 12);
    ws2.event("news:a", 13);
    ws2.event("news:a", 13);
    assert.deepEqual(seen, ["user:u1#6", "user:u1#7", "user:u1#8", "news:a#12", "news:a#13"]);
    assert.deepEqual(notices.map((n) => [n.channel, n.recovered, n.missed]),
      [["user:u1", true, 2], ["news:a", true, 2]]);
    assert.equal(sub.offset, 13);
    env.client.close();
  });

  test("delays grow exponentially and reset once a connection stayed up 10 s", async () => {
    const env = setup({ random: () => 0.999999 });
    let ws = await connected(env);
    const delays = [];
    for (let i = 0; i < 4; i += 1) {
      ws.serverClose(1011);
      delays.push(Math.round(env.states.at(-1).delay));
      await env.clock.advance(env.states.at(-1).delay);
      ws = env.sockets.at(-1);
    }
    assert.deepEqual(delays, [500, 1000, 2000, 4000]);
    ws.welcome();
    await env.clock.advance(10_000);
    ws.receive({ type: "pong", data: {} });
    ws.serverClose(1001);
    assert.equal(Math.round(env.states.at(-1).delay), 500);
    env.client.close();
  });

  test("4429 reconnects after the longer floor", async () => {
    const env = setup();
    const ws = await connected(env);
    ws.serverClose(4429, "too many");
    const down = env.states.at(-1);
    assert.equal(down.action, "reconnect_slowly");
    assert.ok(down.delay >= 5000);
    env.client.close();
  });

  for (const code of [1000, 4403]) {
    test(`close code ${code} stops for good`, async () => {
      const env = setup();
      const ws = await connected(env);
      const sub = env.client.subscribe("news:a");
      ws.replySubscribed("news:a", 0, "e");
      ws.serverClose(code, "bye");
      assert.equal(env.client.state, "closed");
      assert.equal(env.states.at(-1).code, code);
      assert.equal(env.states.at(-1).willReconnect, false);
      assert.deepEqual(env.clock.pending(), []);
      assert.equal(sub.active, false);
      await env.clock.advance(60_000);
      assert.equal(env.sockets.length, 1);
    });
  }

  test("4401 asks the token provider again and reconnects with the new token", async () => {
    const tokens = ["t1", "t2"];
    const env = setup({ token: undefined, tokenProvider: async () => tokens.shift() });
    const ws = await connected(env);
    ws.receive({ type: "error", data: { code: "unauthorized", message: "token expired" } });
    ws.serverClose(4401, "unauthorized");
    assert.equal(env.states.at(-1).action, "new_token");
    await env.clock.advance(env.states.at(-1).delay);
    assert.equal(env.sockets.length, 2);
    assert.equal(env.sockets[1].token, "t2");
    env.client.close();
  });

  test("4401 without a token provider stops with a clear error", async () => {
    const env = setup();
    const ws = await connected(env);
    const errors = [];
    env.client.on("error", (e) => errors.push(e));
    ws.serverClose(4401, "unauthorized");
    assert.equal(env.client.state, "closed");
    assert.equal(errors.at(-1).code, "unauthorized");
    assert.match(errors.at(-1).message, /no token provider/);
    assert.deepEqual(env.clock.pending(), []);
  });

  test("the browser's online event reconnects at once instead of waiting", async () => {
    const env = setup();
    const ws = await connected(env);
    ws.serverClose(1006);
    assert.equal(env.sockets.length, 1);
    env.online.dispatchEvent(new Event("online"));
    await settle();
    assert.equal(env.sockets.length, 2);
    assert.deepEqual(env.clock.pending().filter((ms) => ms === env.states.at(-1).delay), []);
    env.client.close();
  });

  test("a silent connection is pinged after the heartbeat interval and dropped after the timeout", async () => {
    const env = setup({ heartbeatTimeout: 2000 });
    const ws = await connected(env, { heartbeat_interval: 5 });
    await env.clock.advance(4999);
    assert.equal(ws.last("ping"), undefined);
    await env.clock.advance(1);
    assert.deepEqual(ws.last("ping"), { type: "ping" });
    assert.equal(env.client.state, "connected");
    await env.clock.advance(2000);
    assert.equal(env.client.state, "disconnected");
    assert.equal(ws.closedWith, 1005);
    assert.match(env.states.at(-1).reason, /no message from the server/);
    env.client.close();
  });

  test("any message keeps the connection alive", async () => {
    const env = setup({ heartbeatTimeout: 2000 });
    const ws = await connected(env, { heartbeat_interval: 5 });
    for (let i = 0; i < 5; i += 1) {
      await env.clock.advance(4000);
      ws.receive({ type: "pong", data: {} });
    }
    assert.equal(env.client.state, "connected");
    assert.equal(ws.last("ping"), undefined);
    env.client.close();
  });

  test("a handshake that never completes is abandoned and retried", async () => {
    const env = setup({ connectTimeout: 3000 });
    await settle();
    await env.clock.advance(3000);
    assert.equal(env.states.at(-1).state, "disconnected");
    assert.match(env.states.at(-1).reason, /handshake/);
    env.client.close();
  });
});

describe("token refresh", () => {
  test("refreshes before the token expires using the provider", async () => {
    const tokens = ["t1", "t2"];
    const env = setup({ token: undefined, tokenProvider: async () => tokens.shift() });
    await settle();
    const ws = env.sockets.at(-1);
    const now = Date.now();
    ws.receive({ type: "connected", timestamp: new Date(now).toISOString(),
      data: { connection_id: "c", user_id: "u1", heartbeat_interval: 25, channels: [],
        expires_at: new Date(now + 10_000).toISOString() } });
    await env.clock.advance(7999);
    assert.equal(ws.last("refresh"), undefined);
    await env.clock.advance(1);
    assert.deepEqual(ws.last("refresh").data, { token: "t2" });
    ws.receive({ type: "refreshed", id: ws.last("refresh").id, timestamp: new Date(now + 8000).toISOString(),
      data: { expires_at: new Date(now + 3_600_000).toISOString() } });
    assert.equal(env.client.expiresAt.getTime(), now + 3_600_000);
    assert.equal(env.client.state, "connected");
    env.client.close();
  });

  test("a static token is never refreshed", async () => {
    const env = setup();
    const ws = await connected(env);
    await env.clock.advance(3_600_000);
    assert.equal(ws.last("refresh"), undefined);
    env.client.close();
  });
});

describe("close", () => {
  test("close() ends subscriptions and cancels every timer", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("news:a");
    ws.replySubscribed("news:a", 0, "e");
    const next = sub[Symbol.asyncIterator]().next();
    env.client.close();
    assert.deepEqual(await next, { value: undefined, done: true });
    assert.equal(ws.closedWith, 1000);
    assert.equal(env.client.state, "closed");
    assert.deepEqual(env.clock.pending(), []);
  });
});

describe("presence", () => {
  test("join and leave are emitted on the subscription, outside the event stream", async () => {
    const env = setup();
    const ws = await connected(env);
    const sub = env.client.subscribe("room:a");
    const seen = [];
    const events = [];
    sub.on("join", (p) => seen.push(["join", p.userId, p.channel]));
    sub.on("leave", (p) => seen.push(["leave", p.userId, p.channel]));
    sub.on("event", (e) => events.push(e.offset));
    env.client.on("presence", (p) => seen.push(["client", p.kind, p.userId]));
    ws.replySubscribed("room:a", 0, "e1");
    const stamp = "2026-01-01T00:00:00.000Z";
    ws.receive({ type: "join", channel: "room:a", timestamp: stamp, data: { user_id: "bob" } });
    ws.receive({ type: "leave", channel: "room:a", timestamp: stamp, data: { user_id: "bob" } });
    ws.receive({ type: "join", channel: "room:other", timestamp: stamp, data: { user_id: "x" } });
    ws.receive({ type: "join", channel: "room:a", timestamp: stamp, data: {} });
    ws.event("room:a", 1);
    assert.deepEqual(seen, [["join", "bob", "room:a"], ["client", "join", "bob"],
      ["leave", "bob", "room:a"], ["client", "leave", "bob"]]);
    assert.deepEqual(events, [1]);
    assert.equal(sub.offset, 1);
    env.client.close();
  });
});
