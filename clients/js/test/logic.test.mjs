// Unit tests of the pure rules: backoff, close codes, refresh timing, offset bookkeeping.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  Backoff,
  ChannelTracker,
  DEFAULTS,
  backoffDelay,
  closeAction,
  describeClose,
  refreshDelay,
  socketUrl,
} from "../tidings.js";

const ev = (offset, extra = {}) => ({ type: "notification", channel: "c:1", offset, data: {}, ...extra });
const offsets = (events) => events.map((e) => e.offset);

describe("backoff", () => {
  test("full jitter stays below the exponential ceiling", () => {
    const top = () => 0.999999;
    assert.ok(backoffDelay(0, {}, top) < 500);
    assert.ok(backoffDelay(0, {}, top) > 499);
    assert.ok(backoffDelay(3, {}, top) < 4000);
    assert.ok(backoffDelay(3, {}, top) > 3999);
    assert.equal(backoffDelay(5, {}, () => 0), 0);
  });

  test("the delay never exceeds the cap, even after many attempts", () => {
    for (const attempt of [6, 10, 60, 1000]) {
      assert.ok(backoffDelay(attempt, {}, () => 0.999999) <= DEFAULTS.maxDelay);
    }
    assert.ok(backoffDelay(10, { maxDelay: 1000 }, () => 0.5) === 500);
  });

  test("defaults are 0.5 s initial, 20 s cap, reset after 10 s up", () => {
    assert.equal(DEFAULTS.initialDelay, 500);
    assert.equal(DEFAULTS.maxDelay, 20000);
    assert.equal(DEFAULTS.resetAfter, 10000);
  });

  test("attempts grow and reset once a connection stayed up long enough", () => {
    const backoff = new Backoff({}, () => 0.999999);
    const ceilings = [500, 1000, 2000, 4000].map(() => Math.ceil(backoff.next("reconnect", 0)));
    assert.deepEqual(ceilings, [500, 1000, 2000, 4000]);
    assert.equal(backoff.attempt, 4);
    assert.ok(backoff.next("reconnect", 9999) > 4000); // up less than 10 s: keeps growing
    assert.ok(backoff.next("reconnect", 10000) < 500); // up 10 s: starts again
    assert.equal(backoff.attempt, 1);
  });

  test("4429 waits at least the slow floor", () => {
    const backoff = new Backoff({}, () => 0);
    assert.equal(backoff.next("reconnect_slowly"), DEFAULTS.slowFloor);
    const high = new Backoff({}, () => 0.999999);
    for (let i = 0; i < 20; i += 1) {
      const delay = high.next("reconnect_slowly");
      assert.ok(delay >= DEFAULTS.slowFloor && delay <= DEFAULTS.maxDelay);
    }
  });
});

describe("close codes", () => {
  test("each code maps to the protocol's advice", () => {
    const table = {
      1000: "stop",
      4403: "stop",
      4401: "new_token",
      4429: "reconnect_slowly",
      1001: "reconnect",
      1006: "reconnect",
      1009: "reconnect",
      1011: "reconnect",
      1013: "reconnect",
      4408: "reconnect",
      4999: "reconnect",
    };
    for (const [code, action] of Object.entries(table)) {
      assert.equal(closeAction(Number(code)), action, `code ${code}`);
    }
    assert.equal(closeAction(undefined), "reconnect");
  });

  test("descriptions name the known codes", () => {
    assert.match(describeClose(4403), /forbidden/);
    assert.match(describeClose(1006), /lost/);
    assert.match(describeClose(4123), /application/);
  });
});

describe("refresh timing", () => {
  test("refreshes a minute early for long tokens and a fifth early for short ones", () => {
    assert.equal(refreshDelay(3600_000), 3540_000);
    assert.equal(refreshDelay(10_000), 8000);
    assert.equal(refreshDelay(2000), 1000);
    assert.equal(refreshDelay(500), 0);
    assert.equal(refreshDelay(-5), 0);
    assert.equal(refreshDelay(Number.NaN), Infinity);
  });
});

describe("socket URL", () => {
  test("http becomes ws and the token is encoded in the query", () => {
    assert.equal(socketUrl("http://h:1/ws", "a.b+c"), "ws://h:1/ws?token=a.b%2Bc");
    assert.equal(socketUrl("https://h/ws?x=1", "t"), "wss://h/ws?x=1&token=t");
    assert.equal(socketUrl("ws://h/ws?token=old", "new"), "ws://h/ws?token=new");
  });
});

describe("ChannelTracker", () => {
  test("a plain subscribe starts at the reply's offset and drops duplicates", () => {
    const t = new ChannelTracker();
    assert.equal(t.beginSubscribe(), null);
    const { recovery, events } = t.onSubscribed({ channel: "c:1", offset: 4, epoch: "e1" });
    assert.equal(recovery, null);
    assert.deepEqual(events, []);
    assert.deepEqual(offsets(t.onEvent(ev(5))), [5]);
    assert.deepEqual(offsets(t.onEvent(ev(5))), []);
    assert.deepEqual(offsets(t.onEvent(ev(4))), []);
    assert.deepEqual(offsets(t.onEvent(ev(6))), [6]);
    assert.deepEqual(t.recoverPoint(), { offset: 6, epoch: "e1" });
  });

  test("resubscribe sends the last offset and epoch and replays the missed events once", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 2, epoch: "e1" });
    t.onEvent(ev(3));
    t.onDisconnect();
    assert.deepEqual(t.beginSubscribe(), { offset: 3, epoch: "e1" });
    const { recovery, events } = t.onSubscribed({ offset: 6, epoch: "e1", recovered: true });
    assert.deepEqual(recovery, { recovered: true, epoch: "e1", offset: 6, missed: 3,
      from: { offset: 3, epoch: "e1" } });
    assert.deepEqual(events, []);
    const delivered = [3, 4, 5, 6, 7, 7].flatMap((o) => offsets(t.onEvent(ev(o))));
    assert.deepEqual(delivered, [4, 5, 6, 7]);
    assert.equal(t.phase, "live");
  });

  test("events that arrive before the reply are held and come after the replay, in order", () => {
    // The personal channel is live from the connect on, so its new events can overtake
    // the reply to the recovering subscribe, while the replay follows the reply.
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 10, epoch: "e1" });
    t.onDisconnect();
    t.beginSubscribe({ unknownRecover: true });
    assert.deepEqual(offsets(t.onEvent(ev(14))), []);
    assert.deepEqual(offsets(t.onEvent(ev(13))), []);
    const { events } = t.onSubscribed({ offset: 12, epoch: "e1", recovered: true });
    assert.deepEqual(events, []);
    assert.deepEqual(offsets(t.onEvent(ev(11))), [11]);
    assert.deepEqual(offsets(t.onEvent(ev(12))), [12, 13, 14]);
    assert.deepEqual(offsets(t.onEvent(ev(15))), [15]);
  });

  test("a live event after the reply ends the replay and flushes what was held", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 1, epoch: "e" });
    t.onDisconnect();
    t.beginSubscribe();
    t.onEvent(ev(5));
    t.onSubscribed({ offset: 3, epoch: "e", recovered: true });
    assert.deepEqual(offsets(t.onEvent(ev(2))), [2]);
    assert.deepEqual(offsets(t.onEvent(ev(6))), [5, 6]);
  });

  test("nothing missed: recovered with the same offset goes live at once", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 7, epoch: "e" });
    t.onDisconnect();
    t.beginSubscribe();
    t.onEvent(ev(8));
    const { recovery, events } = t.onSubscribed({ offset: 7, epoch: "e", recovered: true });
    assert.equal(recovery.missed, 0);
    assert.deepEqual(offsets(events), [8]);
  });

  test("recovered false is reported and restarts the count from the new epoch", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 40, epoch: "old" });
    t.onEvent(ev(41));
    t.onDisconnect();
    assert.deepEqual(t.beginSubscribe(), { offset: 41, epoch: "old" });
    const { recovery, events } = t.onSubscribed({ offset: 0, epoch: "new", recovered: false });
    assert.deepEqual(recovery, { recovered: false, epoch: "new", offset: 0,
      from: { offset: 41, epoch: "old" } });
    assert.deepEqual(events, []);
    assert.deepEqual(offsets(t.onEvent(ev(1))), [1]);
    assert.deepEqual(t.recoverPoint(), { offset: 1, epoch: "new" });
  });

  test("recovered false with since reports the loss, then delivers the new epoch's replay", () => {
    // The epoch changed (e.g. a Redis restart without persistence) and history still holds
    // the new epoch from offset 1: those events have lower offsets than the old epoch's.
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 40, epoch: "old" });
    t.onEvent(ev(41));
    t.onDisconnect();
    t.beginSubscribe();
    const { recovery, events } = t.onSubscribed({ offset: 3, epoch: "new", recovered: false, since: 0 });
    assert.deepEqual(recovery, { recovered: false, epoch: "new", offset: 3, since: 0,
      from: { offset: 41, epoch: "old" } });
    assert.deepEqual(events, []);
    const delivered = [1, 2, 2, 3, 4].flatMap((o) => offsets(t.onEvent(ev(o))));
    assert.deepEqual(delivered, [1, 2, 3, 4]);
    assert.equal(t.phase, "live");
    assert.deepEqual(t.recoverPoint(), { offset: 4, epoch: "new" });
  });

  test("events held before a reply with since come after the replay", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 9, epoch: "old" });
    t.onDisconnect();
    t.beginSubscribe();
    t.onEvent(ev(3));
    const { events } = t.onSubscribed({ offset: 2, epoch: "new", recovered: false, since: 0 });
    assert.deepEqual(events, []);
    assert.deepEqual(offsets(t.onEvent(ev(1))), [1]);
    assert.deepEqual(offsets(t.onEvent(ev(2))), [2, 3]);
  });

  test("a since outside 0..offset is ignored: live from the reply's offset", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 9, epoch: "old" });
    t.onDisconnect();
    t.beginSubscribe();
    const { recovery } = t.onSubscribed({ offset: 2, epoch: "new", recovered: false, since: 5 });
    assert.equal(recovery.since, undefined);
    assert.deepEqual(offsets(t.onEvent(ev(1))), []);
    assert.deepEqual(offsets(t.onEvent(ev(3))), [3]);
  });

  test("the first subscribe of the personal channel asks from an unknown epoch, silently", () => {
    const t = new ChannelTracker();
    assert.deepEqual(t.beginSubscribe({ unknownRecover: true }), { offset: 0, epoch: "" });
    t.onEvent(ev(6));
    const { recovery, events } = t.onSubscribed({ offset: 5, epoch: "e9", recovered: false });
    assert.equal(recovery, null);
    assert.deepEqual(offsets(events), [6]);
    assert.deepEqual(t.recoverPoint(), { offset: 6, epoch: "e9" });
  });

  test("a disconnect during the replay keeps what was delivered as the recovery point", () => {
    const t = new ChannelTracker();
    t.beginSubscribe();
    t.onSubscribed({ offset: 0, epoch: "e" });
    t.onDisconnect();
    t.beginSubscribe();
    t.onSubscribed({ offset: 5, epoch: "e", recovered: true });
    t.onEvent(ev(1));
    t.onEvent(ev(2));
    t.onDisconnect();
    assert.deepEqual(t.beginSubscribe(), { offset: 2, epoch: "e" });
    assert.deepEqual(t.onEvent(ev(3)), []);
    // The held 3 follows offset 2 without a hole: it comes with the reply, the replay's
    // copy of it is dropped.
    const { events } = t.onSubscribed({ offset: 5, epoch: "e", recovered: true });
    const delivered = [3, 3, 4, 5].flatMap((o) => offsets(t.onEvent(ev(o))));
    assert.deepEqual([...offsets(events), ...delivered], [3, 4, 5]);
  });

  test("events while not subscribed are ignored", () => {
    const t = new ChannelTracker();
    assert.deepEqual(t.onEvent(ev(1)), []);
  });
});

// The position `connected` announces for the personal channel (`positions`), as in
// tests/unit/test_client_session.py for the Python client.
describe("ChannelTracker with an announced position", () => {
  test("first connection lost before the personal reply misses nothing", () => {
    const t = new ChannelTracker();
    assert.equal(t.startAt(3, "e1"), true);
    assert.deepEqual(t.beginSubscribe({ unknownRecover: true }), { offset: 3, epoch: "e1" });
    assert.deepEqual(t.onEvent(ev(4)), []); // held until the reply, then lost with the connection
    t.onDisconnect();
    // The next connection announces its own position: the first one is kept.
    assert.equal(t.startAt(6, "e1"), false);
    assert.deepEqual(t.beginSubscribe({ unknownRecover: true }), { offset: 3, epoch: "e1" });
    const { recovery, events } = t.onSubscribed({ offset: 6, epoch: "e1", recovered: true });
    // Reported as after any reconnect: three events were missed, and are replayed.
    assert.deepEqual(recovery, { recovered: true, epoch: "e1", offset: 6, missed: 3,
      from: { offset: 3, epoch: "e1" } });
    assert.deepEqual(events, []);
    assert.deepEqual([4, 5, 6].flatMap((o) => offsets(t.onEvent(ev(o)))), [4, 5, 6]);
    assert.equal(t.phase, "live");
  });

  test("personal position in connected is the first baseline", () => {
    const t = new ChannelTracker();
    t.startAt(3, "e1");
    t.beginSubscribe({ unknownRecover: true });
    assert.deepEqual(t.onEvent(ev(4)), []);
    const { recovery, events } = t.onSubscribed({ offset: 3, epoch: "e1", recovered: true });
    assert.equal(recovery, null); // the reply only confirms the announced point
    assert.deepEqual(offsets(events), [4]);
    assert.deepEqual(offsets(t.onEvent(ev(5))), [5]);
    // A later connection's announcement does not move a position the client already has.
    t.onDisconnect();
    assert.equal(t.startAt(9, "e1"), false);
    assert.deepEqual(t.beginSubscribe({ unknownRecover: true }), { offset: 5, epoch: "e1" });
  });

  test("live events sent before the confirming reply are delivered with it", () => {
    // The server answers with its live point when it already sent events past the
    // announced offset: nothing is replayed, the held events are the stream.
    const t = new ChannelTracker();
    t.startAt(3, "e1");
    t.beginSubscribe({ unknownRecover: true });
    t.onEvent(ev(5));
    t.onEvent(ev(4));
    const { recovery, events } = t.onSubscribed({ offset: 5, epoch: "e1", recovered: true });
    assert.equal(recovery, null);
    assert.deepEqual(offsets(events), [4, 5]);
    assert.equal(t.phase, "live");
    assert.deepEqual(offsets(t.onEvent(ev(6))), [6]);
  });

  test("only the first reply on the announcing connection is silent", () => {
    const t = new ChannelTracker();
    t.startAt(3, "e1");
    t.beginSubscribe({ unknownRecover: true });
    t.onSubscribed({ offset: 3, epoch: "e1", recovered: true });
    // A resubscribe on the same connection (unsubscribed with resubscribe: true) reports.
    t.beginSubscribe({ unknownRecover: true });
    const { recovery } = t.onSubscribed({ offset: 3, epoch: "e1", recovered: true });
    assert.equal(recovery.recovered, true);
    assert.equal(recovery.missed, 0);
  });

  test("recovered false on the announcing connection is still reported", () => {
    // The epoch changed between `connected` and the reply: events may be lost.
    const t = new ChannelTracker();
    t.startAt(3, "e1");
    t.beginSubscribe({ unknownRecover: true });
    const { recovery } = t.onSubscribed({ offset: 2, epoch: "e2", recovered: false });
    assert.deepEqual(recovery, { recovered: false, epoch: "e2", offset: 2,
      from: { offset: 3, epoch: "e1" } });
  });

  test("malformed positions fall back to the first recover", () => {
    for (const [offset, epoch] of [["3", "e1"], [-1, "e1"], [true, "e1"], [1.5, "e1"],
      [3, ""], [3, 7], [null, "e1"], [undefined, undefined]]) {
      const t = new ChannelTracker();
      assert.equal(t.startAt(offset, epoch), false, `${offset} ${epoch}`);
      assert.deepEqual(t.beginSubscribe({ unknownRecover: true }), { offset: 0, epoch: "" });
      const { recovery } = t.onSubscribed({ offset: 5, epoch: "e1", recovered: false });
      assert.equal(recovery, null);
    }
  });

  test("a position not announced (resumed from an earlier client) is reported", () => {
    const t = new ChannelTracker();
    assert.equal(t.startAt(4, "e1", { announced: false }), true);
    assert.deepEqual(t.beginSubscribe(), { offset: 4, epoch: "e1" });
    const { recovery } = t.onSubscribed({ offset: 5, epoch: "e1", recovered: true });
    assert.deepEqual(recovery, { recovered: true, epoch: "e1", offset: 5, missed: 1,
      from: { offset: 4, epoch: "e1" } });
    assert.deepEqual(offsets(t.onEvent(ev(5))), [5]);
  });

  test("the unknown-epoch first recover is silent also when answered recovered true", () => {
    const t = new ChannelTracker();
    t.beginSubscribe({ unknownRecover: true });
    t.onEvent(ev(3));
    const { recovery, events } = t.onSubscribed({ offset: 2, epoch: "e1", recovered: true });
    assert.equal(recovery, null);
    assert.deepEqual(offsets(events), [3]);
    assert.deepEqual(t.recoverPoint(), { offset: 3, epoch: "e1" });
  });
});
