// The SSE fallback against a fake EventSource and fetch: WebSocket blocked, commands POSTed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { TidingsClient, sseUrl } from "../tidings.js";

function fakeSse() {
  const sources = [];
  const posts = [];
  class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.listeners = {};
      this.closed = false;
      sources.push(this);
    }
    addEventListener(name, fn) {
      this.listeners[name] = fn;
    }
    close() {
      this.closed = true;
    }
    emit(message) {
      this.onmessage({ data: JSON.stringify(message) });
    }
  }
  const fetch = (url, init) => {
    posts.push({ url, body: JSON.parse(init.body), auth: init.headers.Authorization });
    return Promise.resolve({ ok: true, status: 202 });
  };
  return { FakeEventSource, fetch, sources, posts };
}

class BlockedWebSocket {
  constructor() {
    throw new Error("WebSockets are blocked");
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

test("sseUrl turns a WebSocket URL into the SSE endpoint with the token", () => {
  assert.equal(sseUrl("wss://h.example/ws?x=1", "t"), "https://h.example/sse?token=t");
});

test("a blocked WebSocket falls back to SSE; subscribe goes as POST /sse/commands", async () => {
  const { FakeEventSource, fetch, sources, posts } = fakeSse();
  const client = new TidingsClient("ws://h.example/ws", {
    token: "tok", WebSocket: BlockedWebSocket, EventSource: FakeEventSource, fetch,
    onlineTarget: null,
  });
  for (let i = 0; i < 5 && sources.length === 0; i++) await tick();
  assert.equal(sources.length, 1);
  assert.equal(sources[0].url, "http://h.example/sse?token=tok");
  assert.equal(client.transport, "sse");
  const source = sources[0];
  source.onopen();
  source.emit({ type: "connected", data: { connection_id: "c_1", user_id: "u", channels: [],
    heartbeat_interval: 25, expires_at: "2099-01-01T00:00:00Z" } });
  const events = [];
  client.subscribe("news:a", (event) => events.push(event.offset));
  await tick();
  assert.equal(posts.length, 1);
  assert.equal(posts[0].url, "http://h.example/sse/commands");
  assert.equal(posts[0].body.session, "c_1");
  assert.equal(posts[0].auth, "Bearer tok");
  const { id } = posts[0].body.command;
  assert.equal(posts[0].body.command.type, "subscribe");
  source.emit({ type: "subscribed", id, data: { channel: "news:a", offset: 0, epoch: "e" } });
  source.emit({ type: "notification", channel: "news:a", offset: 1, id: "evt",
    data: { message: "hi", level: "info" } });
  await tick();
  assert.deepEqual(events, [1]);
  source.listeners.close({ data: JSON.stringify({ code: 4403, reason: "bye" }) });
  assert.ok(source.closed);
  assert.equal(client.state, "closed");
});

test("sse: false keeps to the WebSocket: a blocked one is not replaced by SSE", async () => {
  const { FakeEventSource, fetch, sources } = fakeSse();
  const client = new TidingsClient("ws://h/ws", { token: "t", WebSocket: BlockedWebSocket,
    EventSource: FakeEventSource, fetch, sse: false, onlineTarget: null });
  for (let i = 0; i < 5 && client.state !== "closed"; i++) await tick();
  assert.equal(client.state, "closed");
  assert.equal(sources.length, 0);
});
