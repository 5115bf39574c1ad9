// The Tidings live console: connect with a token, watch events, publish test events.
// Built on the same tidings.js that applications use.
import { connect, describeClose } from "../client/tidings.js";

const $ = (id) => document.getElementById(id);
const config = JSON.parse($("tidings-console-config").textContent || "{}");
const MAX_ROWS = 1000;
const TOKEN_KEY = "tidings-console-token";

const els = {
  state: $("state"), stateText: $("state-text"), who: $("who"), devBadge: $("dev-badge"),
  wsUrl: $("ws-url"), token: $("token"), prompt: $("token-prompt"),
  connect: $("connect"), disconnect: $("disconnect"), ping: $("ping"),
  infoUser: $("info-user"), infoConn: $("info-conn"), infoExpires: $("info-expires"),
  infoClose: $("info-close"),
  subForm: $("subscribe-form"), channel: $("channel"), subs: $("subs"), subsEmpty: $("subs-empty"),
  pubForm: $("publish-form"), apiKey: $("api-key"), pubChannel: $("pub-channel"),
  pubType: $("pub-type"), pubData: $("pub-data"), pubResult: $("pub-result"),
  rows: $("rows"), empty: $("empty"), count: $("count"), filter: $("filter"), clear: $("clear"),
};

// -- start-up parameters: #token=...&ws=...&channels=a,b (the query works too) ------------

const params = new URLSearchParams(location.search);
for (const [key, value] of new URLSearchParams(location.hash.slice(1))) params.set(key, value);
if (params.has("token") || location.hash) {
  // Keep the token out of the address bar, the history and screen shares.
  history.replaceState(null, "", location.pathname);
}
const backoff = {};
for (const [param, option] of [["delay", "initialDelay"], ["maxDelay", "maxDelay"]]) {
  const value = Number(params.get(param));
  if (params.has(param) && Number.isFinite(value) && value >= 0) backoff[option] = value;
}

const defaultWs = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${config.wsPath || "/ws"}`;
els.wsUrl.value = params.get("ws") || defaultWs;
els.token.value = params.get("token") || sessionStorage.getItem(TOKEN_KEY) || "";
if (config.devApiKey) els.apiKey.value = config.devApiKey;
els.devBadge.hidden = !config.devMode;

// -- state -------------------------------------------------------------------------------

let client = null;
// Where the last client's channels stood when it was stopped, and its URL: the next
// client of the same server resumes from there, so Disconnect then Connect recovers the
// missed events and shows the recovery marker instead of jumping ahead silently.
let carried = null;
let lastToken = null;
let tokenWaiter = null;
let shown = 0;
const wanted = new Set(
  (params.get("channels") || "").split(",").map((c) => c.trim()).filter(Boolean),
);

const fmtTime = (date) => date.toLocaleTimeString([], { hour12: false }) + "." + String(date.getMilliseconds()).padStart(3, "0");
const closeText = (code, reason) => `${code} ${describeClose(code)}${reason && reason !== describeClose(code) ? ` (${reason})` : ""}`;

function setState(state, text) {
  els.state.dataset.state = state;
  els.stateText.textContent = text;
  const live = client !== null && state !== "closed";
  els.disconnect.disabled = !live;
  els.ping.disabled = state !== "connected";
}

function showPrompt(message) {
  els.prompt.textContent = message;
  els.prompt.hidden = !message;
  els.connect.textContent = message ? "Use token" : "Connect";
}

// -- the event table ---------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function addRow(tr) {
  els.rows.prepend(tr);
  while (els.rows.childElementCount > MAX_ROWS) els.rows.lastElementChild.remove();
  els.empty.hidden = true;
  applyFilter(tr);
}

function addEvent(event) {
  const tr = document.createElement("tr");
  tr.className = "event fresh";
  tr.dataset.channel = event.channel;
  tr.dataset.offset = String(event.offset);
  tr.dataset.type = event.type;
  const time = event.timestamp ? new Date(event.timestamp) : new Date();
  const compact = JSON.stringify(event.data);
  const type = document.createElement("td");
  type.className = "type";
  const badge = document.createElement("span");
  badge.textContent = event.type;
  type.append(badge);
  const data = cell(compact, "data");
  tr.append(cell(fmtTime(time), "time"), cell(event.channel, "channel"),
    cell(String(event.offset), "num offset"), type, data);
  tr.title = `${event.id ?? ""}  ${event.timestamp ?? ""}`.trim();
  tr.addEventListener("click", () => {
    const open = tr.classList.toggle("open");
    data.textContent = open ? JSON.stringify(event.data, null, 2) : compact;
  });
  addRow(tr);
  shown += 1;
  els.count.textContent = String(shown);
}

function addMarker(kind, title, text, channel = "") {
  const tr = document.createElement("tr");
  tr.className = "marker";
  tr.dataset.kind = kind;
  if (channel) tr.dataset.channel = channel;
  const msg = cell("", "msg");
  msg.colSpan = 4;
  const strong = document.createElement("span");
  strong.className = "mk";
  strong.textContent = title;
  msg.append(strong, document.createTextNode(text));
  tr.append(cell(fmtTime(new Date()), "time"), msg);
  addRow(tr);
}

function applyFilter(tr) {
  const needle = els.filter.value.trim().toLowerCase();
  const hay = `${tr.dataset.channel ?? ""} ${tr.dataset.type ?? ""}`.toLowerCase();
  tr.classList.toggle("filtered", Boolean(needle) && tr.classList.contains("event") && !hay.includes(needle));
}

els.filter.addEventListener("input", () => {
  for (const tr of els.rows.children) applyFilter(tr);
});
els.clear.addEventListener("click", () => {
  els.rows.replaceChildren();
  shown = 0;
  els.count.textContent = "0";
  els.empty.hidden = false;
});

// -- subscriptions list ------------------------------------------------------------------

function renderSubs() {
  const subs = client ? client.subscriptions : [];
  const names = new Set(subs.map((s) => s.channel));
  const items = subs.map((sub) => ({ channel: sub.channel, state: sub.state, offset: sub.offset,
    epoch: sub.epoch, auto: sub.auto }));
  for (const channel of wanted) {
    if (!names.has(channel)) items.push({ channel, state: "pending", offset: null, epoch: null });
  }
  els.subs.replaceChildren(...items.map((item) => {
    const li = document.createElement("li");
    li.dataset.channel = item.channel;
    const title = document.createElement("div");
    title.className = "sub-title";
    const name = document.createElement("span");
    name.className = "sub-name";
    name.textContent = item.channel;
    name.title = "Use this channel in the publish form";
    name.addEventListener("click", () => { els.pubChannel.value = item.channel; });
    title.append(name);
    if (item.auto) {
      const auto = document.createElement("span");
      auto.className = "sub-auto";
      auto.textContent = "personal";
      title.append(auto);
    }
    const meta = document.createElement("span");
    meta.className = "sub-meta";
    meta.textContent = item.offset === null ? "" : `@${item.offset}`;
    if (item.epoch) meta.title = `epoch ${item.epoch}`;
    const state = document.createElement("span");
    state.className = "sub-state";
    const stopped = !client || client.state === "closed";
    state.dataset.state = stopped ? "stopped" : item.state;
    state.textContent = stopped ? "stopped" : item.state === "subscribed" ? "live" : item.state;
    const right = document.createElement("span");
    right.className = "row";
    right.append(meta, state);
    const x = document.createElement("button");
    x.type = "button";
    x.className = "sub-x";
    x.textContent = "×";
    x.title = `Unsubscribe from ${item.channel}`;
    x.setAttribute("aria-label", x.title);
    x.addEventListener("click", () => unsubscribe(item.channel));
    li.append(title, right, x);
    return li;
  }));
  els.subsEmpty.hidden = items.length > 0;
  if (!els.pubChannel.value && items.length) els.pubChannel.value = items[0].channel;
}

let subsFrame = 0;
/** Re-render the subscription list (with its offsets) at most once per frame. */
function scheduleSubs() {
  if (!subsFrame) subsFrame = requestAnimationFrame(() => { subsFrame = 0; renderSubs(); });
}

function subscribe(channel) {
  wanted.add(channel);
  if (client && client.state !== "closed") {
    const sub = client.subscribe(channel);
    sub.ready.then(renderSubs, (error) => {
      wanted.delete(channel);
      addMarker("error", "subscribe failed", `${channel}: ${error.message}`, channel);
      renderSubs();
    });
  }
  renderSubs();
}

function unsubscribe(channel) {
  wanted.delete(channel);
  if (carried) delete carried.positions[channel];
  if (client) client.unsubscribe(channel).catch(() => {}).finally(renderSubs);
  renderSubs();
}

els.subForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const channel = els.channel.value.trim();
  if (!channel) return;
  els.channel.value = "";
  subscribe(channel);
});

// -- the connection ----------------------------------------------------------------------

/** The console's token provider: a new token from the field, or wait for the user. */
function tokenProvider() {
  const token = els.token.value.trim();
  if (token && token !== lastToken) {
    lastToken = token;
    return token;
  }
  const code = client?.closeCode;
  const why = code === 4401
    ? "The server refused the token (4401). Paste a new token and press Use token."
    : "The token is about to expire. Paste a new token and press Use token.";
  showPrompt(why);
  if (code === 4401) setState("waiting-token", "waiting for a new token");
  addMarker("token", "token needed", why);
  return new Promise((resolve) => { tokenWaiter = resolve; });
}

function onState(change) {
  switch (change.state) {
    case "connecting":
      setState("connecting", change.attempt ? `reconnecting (attempt ${change.attempt + 1})` : "connecting");
      break;
    case "connected":
      setState("connected", "connected");
      break;
    case "disconnected": {
      const seconds = (change.delay / 1000).toFixed(1);
      const what = closeText(change.code, change.reason);
      els.infoClose.textContent = what;
      setState("disconnected", `disconnected: ${what}; retry in ${seconds} s`);
      addMarker("disconnected", "disconnected", `${what}; ${change.action === "new_token"
        ? "asking for a new token" : `reconnecting in ${seconds} s`}`);
      break;
    }
    case "closed": {
      const what = closeText(change.code, change.reason);
      els.infoClose.textContent = what;
      setState("closed", `closed: ${what}`);
      const detail = change.code === 4403 ? "not reconnecting" : change.error?.message;
      addMarker("closed", "closed", detail ? `${what}; ${detail}` : what);
      break;
    }
    default:
  }
  renderSubs();
}

function start() {
  const token = els.token.value.trim();
  if (!token) {
    showPrompt("Paste a token first (for example from `tidings token --sub alice --channel 'demo:*'`).");
    els.token.focus();
    return;
  }
  stop();
  sessionStorage.setItem(TOKEN_KEY, token);
  lastToken = null;
  showPrompt("");
  const url = els.wsUrl.value.trim() || defaultWs;
  const resumeFrom = carried?.url === url ? carried.positions : undefined;
  const current = connect(url, { tokenProvider, ...backoff, resumeFrom });
  client = current;
  const mine = (fn) => (value) => { if (client === current) fn(value); };
  current.on("state", mine(onState));
  current.on("connected", mine((info) => {
    showPrompt("");
    els.who.textContent = info.userId ?? "";
    els.infoUser.textContent = info.userId ?? "—";
    els.infoConn.textContent = info.connectionId ?? "—";
    els.infoExpires.textContent = info.expiresAt ? info.expiresAt.toLocaleString() : "—";
    addMarker("connected", "connected", `as ${info.userId} (${info.connectionId})`);
  }));
  current.on("event", mine((event) => { addEvent(event); scheduleSubs(); }));
  // Presence (namespaces with presence_events): ephemeral, shown as markers, no offset.
  current.on("presence", mine((p) => {
    addMarker(p.kind, p.kind === "join" ? "joined" : "left", `${p.channel}: ${p.userId}`, p.channel);
  }));
  current.on("recovery", mine((notice) => {
    if (notice.recovered) {
      const missed = notice.missed === 0 ? "nothing missed"
        : `${notice.missed} missed event${notice.missed === 1 ? "" : "s"} replayed`;
      addMarker("recovered", "recovered", `${notice.channel}: ${missed}`, notice.channel);
    } else {
      addMarker("unrecovered", "could not recover", `${notice.channel}: events may have been missed (history lost or too old); reload state from the application`, notice.channel);
    }
  }));
  current.on("subscribed", mine(renderSubs));
  current.on("unsubscribed", mine((info) => {
    if (info.reason) addMarker("info", "unsubscribed by the server", `${info.channel}: ${info.reason}`, info.channel);
    renderSubs();
  }));
  current.on("error", mine((error) => {
    // Failed subscriptions are shown by subscribe(), a final error by the closed marker.
    if (error.command === "subscribe" || current.state === "closed") return;
    addMarker("error", error.code, error.message, error.channel ?? "");
  }));
  for (const channel of wanted) subscribe(channel);
  setState("connecting", "connecting");
}

function stop() {
  const old = client;
  client = null;
  tokenWaiter = null;
  if (old) {
    old.close();
    carried = { url: old.url, positions: old.positions };
  }
  els.who.textContent = "";
}

els.connect.addEventListener("click", () => {
  const token = els.token.value.trim();
  if (tokenWaiter && client && token && token !== lastToken) {
    // The client is waiting on its token provider: hand it the new token.
    const resolve = tokenWaiter;
    tokenWaiter = null;
    lastToken = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    showPrompt("");
    resolve(token);
    return;
  }
  start();
});

els.disconnect.addEventListener("click", () => {
  const old = client;
  stop();
  if (old) {
    setState("closed", "disconnected by you");
    addMarker("closed", "closed", "disconnected by you");
  }
  renderSubs();
});

els.ping.addEventListener("click", async () => {
  try {
    const rtt = await client.ping();
    addMarker("info", "pong", `round trip ${rtt.toFixed(0)} ms`);
  } catch (error) {
    addMarker("error", "ping failed", error.message);
  }
});

// -- publishing --------------------------------------------------------------------------

els.pubForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = els.pubResult;
  result.className = "result";
  let data;
  try {
    data = JSON.parse(els.pubData.value || "{}");
    if (!data || typeof data !== "object" || Array.isArray(data)) throw new Error("not an object");
  } catch (error) {
    result.className = "result bad";
    result.textContent = `Data must be a JSON object (${error.message})`;
    return;
  }
  const channel = els.pubChannel.value.trim();
  const body = { channel, type: els.pubType.value.trim(), data };
  result.textContent = "publishing…";
  try {
    const response = await fetch(new URL("api/publish", location.href), {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${els.apiKey.value.trim()}` },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      result.className = "result bad";
      result.textContent = `${response.status}: ${answer.error?.message ?? response.statusText}`;
      return;
    }
    const first = answer.results?.[0];
    result.className = "result ok";
    result.textContent = `published to ${first?.channel ?? channel} at offset ${first?.offset}`;
  } catch (error) {
    result.className = "result bad";
    result.textContent = `cannot reach the server: ${error.message}`;
  }
});

// -- go ----------------------------------------------------------------------------------

window.tidingsConsole = {
  get client() { return client; },
  connect: start,
  disconnect: stop,
  subscribe,
  unsubscribe,
};

renderSubs();
if (els.token.value.trim()) start();
else setState("idle", "not connected");
