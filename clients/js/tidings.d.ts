// Type declarations for tidings.js, the browser client of the Tidings gateway.

export declare const VERSION: string;

/** Option defaults; durations are milliseconds. */
export declare const DEFAULTS: Readonly<{
  initialDelay: number;
  maxDelay: number;
  resetAfter: number;
  slowFloor: number;
  heartbeatTimeout: number;
  connectTimeout: number;
  ssePath: string;
}>;

/** Close codes of the protocol and what they mean. */
export declare const CLOSE_CODES: Readonly<Record<number, string>>;

/** What the client does after a close code. */
export type CloseAction = "stop" | "reconnect" | "reconnect_slowly" | "new_token";

/**
 * `idle` only between `connect()` and the first attempt (the next microtask): the first
 * `state` event reports `previous: "idle"`.
 */
export type ConnectionState = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export type SubscriptionState = "pending" | "subscribed" | "failed" | "unsubscribed";

/** Returns a fresh token (a JWT); called on the first connect, after a 4401 and to refresh. */
export type TokenProvider = () => string | Promise<string>;

/** A timer source; tests pass a fake one. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface ClientOptions {
  /** A token to connect with. Without a `tokenProvider` a 4401 stops the client. */
  token?: string;
  /** Gives tokens: for the first connect, after a 4401 and for `refresh` before expiry. */
  tokenProvider?: TokenProvider;
  /** First reconnection delay ceiling (ms, default 500). */
  initialDelay?: number;
  /** Largest reconnection delay (ms, default 20000). */
  maxDelay?: number;
  /** A connection up this long resets the backoff (ms, default 10000). */
  resetAfter?: number;
  /** Least wait after a 4429 close (ms, default 5000). */
  slowFloor?: number;
  /** Silence beyond the server's heartbeat interval that marks a connection dead (ms, default 10000). */
  heartbeatTimeout?: number;
  /** Time allowed from opening the socket to the `connected` message (ms, default 10000). */
  connectTimeout?: number;
  /** WebSocket implementation (default: `globalThis.WebSocket`; in Node < 22 pass `ws`). */
  WebSocket?: new (url: string) => WebSocket;
  /** "auto" (default): fall back to Server-Sent Events when the WebSocket cannot
   * connect; true: SSE only; false: never. */
  sse?: "auto" | boolean;
  /** The server's `server.sse_path` (default "/sse"). */
  ssePath?: string;
  /** EventSource implementation for SSE (default: `globalThis.EventSource`). */
  EventSource?: new (url: string) => EventSource;
  /** fetch implementation for SSE commands (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Where `online` events come from (default: `window` in a browser). */
  onlineTarget?: EventTarget | null;
  /** Random source for the jitter (default `Math.random`). */
  random?: () => number;
  clock?: Clock;
  /**
   * Where to resume channels from, e.g. `positions` of an earlier client: the first
   * subscribe of each listed channel recovers from there, and its outcome is reported as
   * after any reconnect (a `recovery` notice). Malformed entries are ignored.
   */
  resumeFrom?: Record<string, RecoverPoint>;
}

/** An event published to a channel, as the application receives it. */
export interface TidingsEvent<T = Record<string, unknown>> {
  kind: "event";
  type: string;
  channel: string;
  offset: number;
  id?: string;
  timestamp?: string;
  data: T;
}

export interface RecoverPoint {
  offset: number;
  epoch: string;
}

/**
 * The outcome of resubscribing with `recover`. `recovered: false` means events may have
 * been missed: reload the channel's state from the application.
 */
export interface RecoveryNotice {
  kind: "recovery";
  channel: string;
  recovered: boolean;
  epoch: string;
  /** The channel's offset the server answered with. */
  offset: number;
  /** Number of replayed events (when recovered). */
  missed?: number;
  /**
   * With `recovered: false` after an epoch change, when history still holds the new epoch
   * from its start: the events that follow this notice are the new epoch's from
   * `since + 1` (0: from its first offset). Absent when only live events follow.
   */
  since?: number;
  /** Where the client left off. */
  from: RecoverPoint;
}

/** What an async iterator over a subscription yields. */
export type SubscriptionItem<T = Record<string, unknown>> =
  | TidingsEvent<T>
  | (RecoveryNotice & { recovered: false });

export interface StateChange {
  state: ConnectionState;
  /** The state before this change (`"idle"` for the first one). */
  previous: ConnectionState;
  code?: number;
  reason?: string;
  action?: CloseAction;
  /** Milliseconds until the next attempt. */
  delay?: number;
  attempt?: number;
  willReconnect?: boolean;
  error?: TidingsError | null;
  connectionId?: string | null;
  userId?: string | null;
}

export interface ConnectedInfo {
  connectionId: string | null;
  userId: string | null;
  expiresAt: Date | null;
  /**
   * Milliseconds (the `connected` message's `heartbeat_interval` is in seconds: 25 on the
   * wire is 25000 here).
   */
  heartbeatInterval: number;
  /** Channels the server subscribed automatically (the personal channel). */
  channels: string[];
}

export interface SubscribedInfo {
  channel: string;
  offset: number | null;
  epoch: string | null;
  recovered?: boolean;
}

export interface ServerUnsubscribe {
  channel: string;
  reason?: string;
  resubscribe: boolean;
}

export interface SubscriptionEnd {
  channel: string;
  state: SubscriptionState;
  error: TidingsError | null;
}

export interface SubscribeHandlers<T = Record<string, unknown>> {
  onEvent?: (event: TidingsEvent<T>) => void;
  onRecovery?: (notice: RecoveryNotice) => void;
  onError?: (error: TidingsError) => void;
}

export declare class TidingsError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  /** A wire error code (`unauthorized`, `subscription_failed`, ...) or a client one. */
  code: string;
  channel?: string;
  command?: string;
  reason?: string;
}

/**
 * A user joined or left a channel whose namespace has presence events. Ephemeral: no
 * offset, not in history, not replayed by recovery; after a reconnect reload presence.
 */
export interface PresenceNotice {
  kind: "join" | "leave";
  channel: string;
  userId: string;
}

interface SubscriptionEvents<T> {
  event: TidingsEvent<T>;
  join: PresenceNotice;
  leave: PresenceNotice;
  recovery: RecoveryNotice;
  subscribed: SubscribedInfo;
  unsubscribed: SubscriptionEnd;
  error: TidingsError;
}

export declare class Subscription<T = Record<string, unknown>> implements AsyncIterable<SubscriptionItem<T>> {
  readonly client: TidingsClient;
  readonly channel: string;
  readonly state: SubscriptionState;
  /** True for a channel the server subscribed automatically (the personal channel). */
  readonly auto: boolean;
  readonly error: TidingsError | null;
  /** Resolves at the first `subscribed` reply; rejects if the subscription fails first. */
  readonly ready: Promise<SubscribedInfo>;
  /**
   * The last delivered offset (or the starting one: the reply's, or a position announced
   * by `connected` or given in `resumeFrom`); null while nothing is known.
   */
  readonly offset: number | null;
  readonly epoch: string | null;
  readonly active: boolean;
  on<K extends keyof SubscriptionEvents<T>>(name: K, listener: (value: SubscriptionEvents<T>[K]) => void): () => void;
  off<K extends keyof SubscriptionEvents<T>>(name: K, listener: (value: SubscriptionEvents<T>[K]) => void): void;
  unsubscribe(): Promise<void>;
  /** Events from the moment the iterator is created, plus `recovered: false` notices. */
  [Symbol.asyncIterator](): AsyncIterator<SubscriptionItem<T>>;
}

interface ClientEvents {
  state: StateChange;
  connected: ConnectedInfo;
  event: TidingsEvent;
  presence: PresenceNotice;
  recovery: RecoveryNotice;
  subscribed: SubscribedInfo;
  unsubscribed: ServerUnsubscribe;
  error: TidingsError;
  /** Every message from the server, as parsed JSON. */
  message: Record<string, unknown>;
  /** The client switched to Server-Sent Events (options.sse "auto"). */
  transport: "sse";
}

export declare class TidingsClient {
  constructor(url?: string | null, options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly connectionId: string | null;
  /** The transport of the current connection attempt. */
  readonly transport: "websocket" | "sse";
  readonly userId: string | null;
  readonly expiresAt: Date | null;
  /**
   * Milliseconds, from the `connected` message's `heartbeat_interval` (which is in
   * seconds: 25 on the wire is 25000 here).
   */
  readonly heartbeatInterval: number | null;
  /** Channels subscribed automatically on the current connection. */
  readonly channels: string[];
  readonly closeCode: number | null;
  readonly closeReason: string;
  /** Resolves at the first connection; rejects if the client stops before connecting. */
  readonly ready: Promise<ConnectedInfo>;
  readonly subscriptions: Subscription[];
  /** Where each channel with a known position stands; pass it as `resumeFrom`. */
  readonly positions: Record<string, RecoverPoint>;
  on<K extends keyof ClientEvents>(name: K, listener: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(name: K, listener: (value: ClientEvents[K]) => void): void;
  subscribe<T = Record<string, unknown>>(
    channel: string,
    handler?: ((event: TidingsEvent<T>) => void) | SubscribeHandlers<T>,
  ): Subscription<T>;
  unsubscribe(channel: string): Promise<void>;
  subscription(channel: string): Subscription | undefined;
  /** Round trip of an application ping, in milliseconds. */
  ping(): Promise<number>;
  /** Drop the current connection and connect again at once. */
  reconnect(): void;
  /** Close for good (code 1000). */
  close(): void;
}

/** Create a client and start connecting. The URL defaults to `/ws` on the page's host. */
export declare function connect(url?: string | null, options?: ClientOptions): TidingsClient;
export default connect;

export declare function describeClose(code: number): string;
export declare function closeAction(code: number | undefined): CloseAction;
export declare function backoffDelay(
  attempt: number,
  options?: { initialDelay?: number; maxDelay?: number },
  random?: () => number,
): number;
export declare function refreshDelay(remainingMs: number): number;
export declare function socketUrl(url: string, token?: string | null): string;
/** The SSE endpoint of the server of `url`, with `token` set. */
export declare function sseUrl(url: string, token?: string | null, path?: string): string;

export declare class Backoff {
  constructor(options?: Partial<typeof DEFAULTS>, random?: () => number);
  attempt: number;
  next(action?: CloseAction, upForMs?: number): number;
  reset(): void;
}

export declare class ChannelTracker {
  offset: number | null;
  epoch: string | null;
  phase: "idle" | "subscribing" | "replaying" | "live";
  recoverPoint(): RecoverPoint | null;
  /**
   * A starting position for a channel with none: an announced one (`connected`'s
   * `positions`, the default) makes the first reply on that connection a silent
   * confirmation; `announced: false` (a `resumeFrom` entry) is reported. False when
   * ignored (a position is already known, or this one is malformed).
   */
  startAt(offset: number, epoch: string, options?: { announced?: boolean }): boolean;
  beginSubscribe(options?: { unknownRecover?: boolean }): RecoverPoint | null;
  onSubscribed(data: { offset?: number; epoch?: string; recovered?: boolean; since?: number }): {
    recovery: Omit<RecoveryNotice, "kind" | "channel"> | null;
    events: Array<{ offset: number }>;
  };
  onEvent<E extends { offset: number }>(event: E): E[];
  onDisconnect(): void;
}

/** The SSE transport behind the WebSocket interface the client uses (internal). */
export declare class SseSocket {
  constructor(url: string, token: string,
    options?: { EventSource?: new (url: string) => EventSource; fetch?: typeof fetch });
  readyState: number;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}
