/* iii.h - version, protocol constants and every tunable limit of the iii engine.
 *
 * Each limit can be overridden at build time (cc -DIII_MAX_X=...); most are also config keys
 * of the `iii-worker-manager` entry (see README.md). The comment on each says why that value.
 */
#ifndef III_H
#define III_H

#define III_VERSION "0.23.0-c.1"
#define III_PROTOCOL_VERSION "0.23" /* the reference engine's wire protocol we speak */
#define III_XSTR(x)          #x
#define III_STR(x)           III_XSTR(x) /* a limit's value as a string literal, for messages */

/* ---- the embedded profile --------------------------------------------------------------------
 * cc -Os -DIII_SMALL (make small): the same engine with desktop-sized limits scaled down for a
 * router with tens of megabytes of RAM. Every value can still be overridden (-D, or config). */
#ifdef III_SMALL
#ifndef III_DEFAULT_MAX_MESSAGE_BYTES
#define III_DEFAULT_MAX_MESSAGE_BYTES (4u << 20)
#endif
#ifndef III_DEFAULT_MAX_FRAME_BYTES
#define III_DEFAULT_MAX_FRAME_BYTES (4u << 20)
#endif
#ifndef III_DEFAULT_MAX_CONNECTIONS
#define III_DEFAULT_MAX_CONNECTIONS 1000
#endif
#ifndef III_DEFAULT_MAX_OUTBOUND_BYTES
#define III_DEFAULT_MAX_OUTBOUND_BYTES (8u << 20)
#endif
#ifndef III_DEFAULT_MAX_PENDING_BYTES
#define III_DEFAULT_MAX_PENDING_BYTES (1u << 20)
#endif
#ifndef III_DEFAULT_MAX_INFLIGHT_PER_CONN
#define III_DEFAULT_MAX_INFLIGHT_PER_CONN 1024
#endif
#ifndef III_DEFAULT_MAX_INFLIGHT_TOTAL
#define III_DEFAULT_MAX_INFLIGHT_TOTAL 16384
#endif
#ifndef III_DEFAULT_MAX_FUNCTIONS_PER_CONN
#define III_DEFAULT_MAX_FUNCTIONS_PER_CONN 1000
#endif
#ifndef III_DEFAULT_MAX_TRIGGERS
#define III_DEFAULT_MAX_TRIGGERS 10000
#endif
#ifndef III_DEFAULT_MAX_MEMORY_BYTES
#define III_DEFAULT_MAX_MEMORY_BYTES (48u << 20)
#endif
#ifndef III_READ_CHUNK
#define III_READ_CHUNK 16384
#endif
#ifndef III_BUF_SHRINK
#define III_BUF_SHRINK (256u << 10)
#endif
#ifndef III_BUF_CACHE
#define III_BUF_CACHE (2u << 20)
#endif
#endif

/* ---- listener defaults (DECISIONS.md item 7) ---------------------------------------------- */
#ifndef III_DEFAULT_HOST
#define III_DEFAULT_HOST "127.0.0.1" /* loopback unless the config says otherwise */
#endif
#ifndef III_DEFAULT_PORT
#define III_DEFAULT_PORT 49134 /* the port every iii SDK dials by default */
#endif
#ifndef III_DEFAULT_HANDSHAKE_TIMEOUT_MS
#define III_DEFAULT_HANDSHAKE_TIMEOUT_MS 10000 /* same as the SDK's own handshake timeout */
#endif
#ifndef III_DEFAULT_MAX_MESSAGE_BYTES
#define III_DEFAULT_MAX_MESSAGE_BYTES (64u << 20) /* tungstenite's default; SDK payloads fit */
#endif
#ifndef III_DEFAULT_MAX_FRAME_BYTES
#define III_DEFAULT_MAX_FRAME_BYTES (64u << 20) /* SDK OTLP frames can exceed 16 MiB */
#endif
#ifndef III_DEFAULT_MAX_HEADER_BYTES
#define III_DEFAULT_MAX_HEADER_BYTES 16384 /* an upgrade request is < 1 KiB; 16 KiB is generous */
#endif
#ifndef III_DEFAULT_MAX_CONNECTIONS
#define III_DEFAULT_MAX_CONNECTIONS 10000 /* accept is paused above this */
#endif
#ifndef III_DEFAULT_MAX_OUTBOUND_BYTES
#define III_DEFAULT_MAX_OUTBOUND_BYTES (256u << 20) /* 4 max messages queued: then a slow reader goes */
#endif
#ifndef III_DEFAULT_MAX_PENDING_BYTES
#define III_DEFAULT_MAX_PENDING_BYTES (4u << 20) /* registrations buffered before the announce */
#endif
#ifndef III_DEFAULT_MAX_PENDING_FRAMES
#define III_DEFAULT_MAX_PENDING_FRAMES 10000 /* ... and as frames: an SDK sends tens */
#endif
#ifndef III_DEFAULT_MAX_INFLIGHT_PER_CONN
#define III_DEFAULT_MAX_INFLIGHT_PER_CONN 16384 /* calls one connection has out, or has in */
#endif
#ifndef III_DEFAULT_MAX_INFLIGHT_TOTAL
#define III_DEFAULT_MAX_INFLIGHT_TOTAL 262144 /* call records in all: about 110 MB at most */
#endif
#ifndef III_DEFAULT_MAX_FUNCTIONS_PER_CONN
#define III_DEFAULT_MAX_FUNCTIONS_PER_CONN 10000 /* functions one worker may own */
#endif
#ifndef III_DEFAULT_MAX_TRIGGERS_PER_CONN
#define III_DEFAULT_MAX_TRIGGERS_PER_CONN 10000 /* bindings one connection made (live + durable) */
#endif
#ifndef III_DEFAULT_MAX_TRIGGERS_PER_FUNCTION
#define III_DEFAULT_MAX_TRIGGERS_PER_FUNCTION 256 /* bindings aimed at one function: no fan-out */
#endif
#ifndef III_DEFAULT_MAX_TRIGGERS
#define III_DEFAULT_MAX_TRIGGERS 100000 /* bindings in all, durable ones included */
#endif
#ifndef III_DEFAULT_MAX_MEMORY_BYTES
#define III_DEFAULT_MAX_MEMORY_BYTES (1024u << 20) /* every buffer and record together */
#endif
#ifndef III_DEFAULT_DRAIN_TIMEOUT_MS
#define III_DEFAULT_DRAIN_TIMEOUT_MS 5000 /* SIGTERM: in-flight calls get this long to finish */
#endif
#ifndef III_DEFAULT_PING_INTERVAL_MS
#define III_DEFAULT_PING_INTERVAL_MS 20000 /* matches the SDK's own ping cadence */
#endif
#ifndef III_DEFAULT_IDLE_TIMEOUT_MS
#define III_DEFAULT_IDLE_TIMEOUT_MS 60000 /* matches the SDK's idle timeout */
#endif
#ifndef III_DEFAULT_GRACE_MS
#define III_DEFAULT_GRACE_MS 5000 /* registration buffering before engine::workers::register */
#endif
#ifndef III_DEFAULT_STOP_TIMEOUT_MS
#define III_DEFAULT_STOP_TIMEOUT_MS 3000 /* SIGTERM, then SIGKILL after this long */
#endif

/* ---- hard limits (not config keys) -------------------------------------------------------- */
#ifndef III_JSON_MAX_DEPTH
#define III_JSON_MAX_DEPTH 128 /* nesting cap of the JSON parser (the reference: 128) */
#endif
#ifndef III_JSON_MAX_TOKENS
#define III_JSON_MAX_TOKENS 65536 /* tokens in one engine::* input (data is relayed untokenized) */
#endif
#ifndef III_YAML_MAX_DEPTH
#define III_YAML_MAX_DEPTH 64 /* nesting cap of the config reader */
#endif
#ifndef III_CLOSE_FLUSH_MS
#define III_CLOSE_FLUSH_MS 2000 /* how long a closing socket may take to flush its Close frame */
#endif
#ifndef III_READ_CHUNK
#define III_READ_CHUNK 65536 /* bytes asked of one read(): many frames per call */
#endif
#ifndef III_READ_SHARED
#define III_READ_SHARED (4 * III_READ_CHUNK) /* ... into the shared buffer: 64 KiB messages whole */
#endif
#ifndef III_SCAN_NOTE_MIN
#define III_SCAN_NOTE_MIN 4096 /* a message this large to a worker: the unmask notes clean blocks */
#endif
#ifndef III_SCAN_NOTE_MAX
#define III_SCAN_NOTE_MAX (4u << 20) /* ... of its first this many bytes (a static 8 KiB bitmap) */
#endif
#if III_SCAN_NOTE_MIN < 128 || III_SCAN_NOTE_MAX < 128
#error "III_SCAN_NOTE_MIN and III_SCAN_NOTE_MAX must be at least 128: the note's blocks start up to 63 bytes in"
#endif
#ifndef III_SPLICE_MIN
#define III_SPLICE_MIN 32768 /* a payload this large is written from the input, not copied */
#endif
#ifndef III_MAX_ID
#define III_MAX_ID 1024 /* bytes of an id or namespace: routing keys, not documents */
#endif
#ifndef III_MAX_SEARCH
#define III_MAX_SEARCH 1024 /* bytes of a listing's search needle (longer matches no id) */
#endif
#ifndef III_MAX_NAME
#define III_MAX_NAME 280 /* worker name/description cap, as the reference engine sanitises */
#endif
#ifndef III_BUF_SHRINK
#define III_BUF_SHRINK (1u << 20) /* a buffer grown past this is released once drained ... */
#endif
#ifndef III_BUF_CACHE
#define III_BUF_CACHE (16u << 20) /* ... its block kept for the next large message, this much */
#endif
#ifndef III_BUF_CACHE_N
#define III_BUF_CACHE_N 8 /* ... in at most this many blocks (and an 8th of max_memory_bytes) */
#endif
#ifndef III_BUF_CACHE_MS
#define III_BUF_CACHE_MS 1000 /* ... and freed after this long unused */
#endif
#ifndef III_OUT_PARK_MAX
#define III_OUT_PARK_MAX 4096 /* a drained output block this small leaves its connection ... */
#endif
#ifndef III_OUT_PARK_N
#define III_OUT_PARK_N 256 /* ... parked for the next connection's output, at most this many */
#endif
#ifndef III_CHANNEL_TTL_MS
#define III_CHANNEL_TTL_MS 300000 /* a channel not fully connected after 5 min is swept */
#endif
#ifndef III_FD_RESERVE
#define III_FD_RESERVE 64 /* descriptors not given to connections: reload, pipes, sentinel */
#endif
#ifndef III_DRAIN_FRAMES
#define III_DRAIN_FRAMES 256 /* queued frames applied per connection per loop turn ... */
#endif
#ifndef III_DRAIN_BYTES
#define III_DRAIN_BYTES (1u << 20) /* ... or this many bytes: no turn does unbounded work */
#endif
#ifndef III_CHANNEL_TTL_SHORT_MS
#define III_CHANNEL_TTL_SHORT_MS 10000 /* ... or after 10 s when memory is short */
#endif
#ifndef III_WORKER_LINE_MAX
#define III_WORKER_LINE_MAX 8192 /* a captured worker output line longer than this is split */
#endif
#ifndef III_LOG_BURST
#define III_LOG_BURST 10 /* log lines about one connection per window ... */
#endif
#ifndef III_LOG_WINDOW_MS
#define III_LOG_WINDOW_MS 10000 /* ... of this long; the rest are counted, not written */
#endif
#ifndef III_DISCOVERY_BYTES_PER_S
#define III_DISCOVERY_BYTES_PER_S (4u << 20) /* functions_changed pacing: a 1 MB snapshot per 250 ms */
#endif
#ifndef III_OUTQ_HIGH
#define III_OUTQ_HIGH (1u << 20) /* queued output past which workers' pipes are not read */
#endif
#ifndef III_OUTQ_MAX
#define III_OUTQ_MAX (4u << 20) /* ... and past which the engine's own log lines are counted */
#endif
#ifndef III_AUTH_TIMEOUT_MS
#define III_AUTH_TIMEOUT_MS 10000 /* the auth function's answer to a new connection */
#endif
#ifndef III_AUTH_HOLD_BYTES
#define III_AUTH_HOLD_BYTES 65536 /* input held from a connection the auth function decides on */
#endif
#ifndef III_METRIC_FUNCTIONS
#define III_METRIC_FUNCTIONS 1000 /* functions with their own /metrics series; the rest: _other */
#endif
#ifndef III_MAX_INSTANCES
#define III_MAX_INSTANCES 64 /* processes one worker entry may ask for (instances:) */
#endif
#ifndef III_BACKOFF_MIN_MS
#define III_BACKOFF_MIN_MS 1000 /* restart backoff: 1 s doubling ... */
#endif
#ifndef III_BACKOFF_MAX_MS
#define III_BACKOFF_MAX_MS 30000 /* ... to 30 s */
#endif
#ifndef III_BACKOFF_RESET_MS
#define III_BACKOFF_RESET_MS 60000 /* reset after 60 s of uptime */
#endif
#ifndef III_RELOAD_DEBOUNCE_MS
#define III_RELOAD_DEBOUNCE_MS 500 /* config watch debounce, as the reference engine */
#endif
#ifndef III_WATCH_INTERVAL_MS
#define III_WATCH_INTERVAL_MS 250 /* how often config.yaml's stat is compared */
#endif

/* ---- cluster over NATS (README "Cluster", docs/CLUSTER.md) ---- */
#ifndef NATS_MAX_LINE
#define NATS_MAX_LINE 4096 /* a server control line longer than this is a protocol error */
#endif
#ifndef NATS_HB_MS
#define NATS_HB_MS 1000 /* heartbeat period */
#endif
#ifndef NATS_NODE_TTL_MS
#define NATS_NODE_TTL_MS 3000 /* a node not heard from for this long has left */
#endif
#ifndef NATS_SNAP_GAP_MS
#define NATS_SNAP_GAP_MS 100 /* snapshots of this node at most this often */
#endif
#ifndef NATS_MAX_NODES
#define NATS_MAX_NODES 1024 /* other nodes tracked; more are ignored (and logged) */
#endif
#ifndef NATS_MAX_CHUNKED
#define NATS_MAX_CHUNKED 256 /* large messages reassembled at once; more are dropped */
#endif
#ifndef NATS_CHUNK_TTL_MS
#define NATS_CHUNK_TTL_MS 10000 /* a reassembly not completed in this long is dropped */
#endif
#ifndef NATS_MAX_SUBJECT
#define NATS_MAX_SUBJECT 512 /* a function subject longer than this is a hash of the id */
#endif

#endif /* III_H */
