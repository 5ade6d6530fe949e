/* iii.c - the iii engine in one C file.
 *
 * WHAT IT DOES
 * Workers written in any language connect over WebSocket, register functions, trigger types
 * and triggers; the engine keeps the live registry and routes every invocation to the worker
 * that provides the target function, then routes the result back. It speaks the wire protocol
 * of the reference iii engine (docs/PROTOCOL.md) so the official SDKs work unchanged. Marks
 * like "§3.2" cite the reference protocol's section numbers; docs/PROTOCOL.md, appendix A, says
 * where each is described in this repository.
 *
 * PROCESS MODEL
 * One thread, one poll() loop. Sockets are non-blocking; signals arrive through a self-pipe;
 * timers are monotonic-clock deadlines, scanned when the earliest is due. On Linux the
 * connections sit in an epoll set whose descriptor is one entry of that poll() (so a turn
 * costs what is ready, not what is connected); elsewhere, or built with -DIII_USE_POLL, every
 * connection is a poll() entry. Declared workers are child processes (fork/exec) in their own
 * process groups, their output captured through pipes that are part of the same poll set.
 *
 * MESSAGE FLOW
 *   caller --invokefunction--> engine: parse the envelope (data is validated, not tokenized),
 *   look up (namespace, function_id), record the pending call on both connections, append one
 *   invokefunction frame to the target's output buffer with data copied once as raw bytes
 *   --> target --invocationresult--> engine: find the call by id, append one invocationresult
 *   frame to the caller's output --> caller. Output is written once per connection per turn,
 *   except a large payload (III_SPLICE_MIN) into an empty output: that frame is written at once
 *   from the input the payload arrived in (one writev), and only what the socket does not take
 *   is copied into the output buffer (conn_put_big).
 *
 * MEMORY AND LIMITS
 * All allocation goes through xmalloc/xrealloc/xfree (counted, fail-injectable in tests). Every
 * buffer has a cap enforced when bytes are appended and a sticky error checked once per frame;
 * an allocation failure closes one connection, never the engine, and teardown allocates
 * nothing. Calls in flight, queued registrations, bindings, functions and all memory together
 * are bounded; a bound that is hit is answered (BUSY, 1008, 503), never queued without limit.
 * No scratch buffer is global across anything that can re-enter the router. An idle connection
 * holds no buffer memory: whole frames are read from one shared block (loop_read), and drained
 * output blocks are parked for the next connection that writes (opark, bcache). Limits live in
 * iii.h and in the `iii-worker-manager` config block; README "Limits" explains each.
 *
 * TRUST
 * Every connection has a session (NULL: full access, the loopback default); with auth_tokens
 * or rbac a client presents a token or is admitted by an auth function, and sees and calls only
 * what its session allows (README "Security").
 *
 * CONTENTS (grep -n '^/\* ====' iii.c)
 *   Utilities, Buffer, SHA-1 and base64, UTF-8, JSON, YAML subset, Config, Hash map, Types and
 *   the global state, Sockets, WebSocket frames, Connections, HTTP, Registry, Sessions and
 *   authorization, Router, Triggers and discovery, Worker protocol, Engine functions, Channels,
 *   NATS client (the cluster), Health and metrics, Event loop, Supervisor, Configuration and
 *   hot reload, CLI client, CLI worker (iii serve and iii watch), main.
 */
/* Feature macros: each only if the includer (tests/unit.c, a -D flag) has not set it already */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64 /* 32-bit glibc: stat() of 64-bit inode numbers and sizes */
#endif
#ifndef _TIME_BITS
#define _TIME_BITS 64 /* 32-bit glibc >= 2.34: time_t past 2038 (needs the line above) */
#endif
#include "iii.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netdb.h>
#include <poll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
/* SSE2 (every x86_64) unmasks frames and scans JSON strings 16 bytes a step; elsewhere the
 * portable word loops */
#if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__)) && !defined(III_NO_SIMD)
#include <emmintrin.h>
#define III_SSE2 1
#endif
/* AVX2 on x86_64 with gcc or clang: the pass that unmasks a large message and notes its clean
 * blocks (ws_unmask_note) takes 32 bytes a step when the CPU has AVX2, checked once at run time;
 * that one function is compiled for AVX2 by an attribute, so the binary still runs on any
 * x86_64. -DIII_NO_AVX2 (or -DIII_NO_SIMD) leaves it out. */
#if defined(III_SSE2) && defined(__x86_64__) && !defined(III_NO_AVX2) &&                           \
    ((defined(__GNUC__) && __GNUC__ >= 5) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define III_AVX2 1
#endif
/* Connections in an epoll set on Linux; -DIII_USE_POLL keeps plain poll(). Not with a non-GNU
 * compiler on x86_64: there the kernel's struct epoll_event is packed (12 bytes, data at offset
 * 4), but glibc's sys/cdefs.h drops __attribute__ for compilers without __GNUC__ (tcc), which
 * then lay it out in 16 bytes and read data.ptr from the wrong place. Those get plain poll(). */
#if defined(__linux__) && !defined(III_USE_POLL) && \
    !(defined(__x86_64__) && !defined(__GNUC__) && !defined(__clang__))
#include <sys/epoll.h>
#define III_EPOLL 1
#endif

/* ==== Utilities =============================================================================
 * Logging through one macro that checks the level before formatting; die() only before the
 * loop starts; allocation wrappers that count live bytes and can be told to fail (tests);
 * clocks in int64 milliseconds; SipHash; random ids from /dev/urandom (opened once).
 */
/* Levels in increasing verbosity: LOG(l) prints when l <= log_level. The default (info) logs
 * connection and worker lifecycle events only, never one line per message. */
enum { LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG, LOG_TRACE };
static int log_level = LOG_INFO;
static const char *log_names[] = {"error", "warn", "info", "debug", "trace"};

#ifdef __GNUC__
#define III_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define III_NORETURN     __attribute__((noreturn))
#define III_NOINLINE     __attribute__((noinline)) /* a rarer path, kept out of its callers */
#else
#define III_PRINTF(a, b)
#define III_NORETURN
#define III_NOINLINE
#endif

static void log_write(int level, const char *fmt, ...) III_PRINTF(2, 3);
#define LOG(level, ...)                                                                            \
    do {                                                                                           \
        if ((level) <= log_level) log_write((level), __VA_ARGS__);                                 \
    } while (0)

/* Where log lines go once the loop runs (out_log: a queue drained when stderr is writable, so a
 * stderr nobody reads never blocks the loop); NULL before that and in the CLI: write(2). */
static void (*log_sink)(const char *line, size_t n);

/* III_LOG_FORMAT=json: one JSON object per line instead of text (set in main). */
static int log_json;

/* Writes one log line in a single write() (lines do not interleave), or hands it to log_sink:
 * "2026-12-06T23:59:59.123Z iii: level: text" (RFC 3339, UTC, milliseconds), or with
 * III_LOG_FORMAT=json {"ts":"...","level":"...","msg":"..."}. A longer message is cut at
 * 1 KiB, never split across two writes. */
static void log_write(int level, const char *fmt, ...)
{
    char msg[1024], line[1200], ts[32];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    time_t secs = now.tv_sec;
    gmtime_r(&secs, &tm);
    size_t tl = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + tl, sizeof ts - tl, ".%03ldZ", (long)(now.tv_nsec / 1000000));
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (m < 0) msg[0] = 0;
    size_t len;
    if (!log_json) {
        int n = snprintf(line, sizeof line - 1, "%s iii: %s: %s", ts, log_names[level], msg);
        len = n < 0 ? 0 : (size_t)n < sizeof line - 1 ? (size_t)n : sizeof line - 2;
    } else {
        /* the message as a JSON string: quote, backslash and control characters escaped */
        len = (size_t)snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"", ts,
                               log_names[level]);
        for (const unsigned char *p = (const unsigned char *)msg; *p && len < sizeof line - 10; p++)
            if (*p == '"' || *p == '\\') line[len++] = '\\', line[len++] = (char)*p;
            else if (*p < 0x20) len += (size_t)snprintf(line + len, 7, "\\u%04x", *p);
            else line[len++] = (char)*p;
        line[len++] = '"', line[len++] = '}';
    }
    line[len++] = '\n';
    if (log_sink) {
        log_sink(line, len);
        return;
    }
    ssize_t w = write(2, line, len);
    (void)w;
}

static void die(const char *fmt, ...) III_PRINTF(1, 2) III_NORETURN;
/* Prints "iii: message" and exits 1. Only for start-up errors, before the loop runs. */
static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("iii: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Allocation accounting: a size header in front of every block keeps live-byte counts exact. */
static size_t mem_live_bytes, mem_allocs_total;
static long mem_fail_after = -1; /* tests: fail the k-th allocation from now (-1 = never) */
#define MEM_HDR 16               /* keeps the user pointer aligned for any type */

/* malloc that counts live bytes for /metrics and honours mem_fail_after. NULL on OOM (or an
 * injected failure); the caller must handle it, usually by closing one connection. */
static void *xmalloc(size_t n)
{
    if (mem_fail_after >= 0 && mem_fail_after-- == 0) return NULL;
    if (n > SIZE_MAX - MEM_HDR) return NULL;
    unsigned char *p = malloc(n + MEM_HDR);
    if (!p) return NULL;
    memcpy(p, &n, sizeof n);
    mem_live_bytes += n;
    mem_allocs_total++;
    return p + MEM_HDR;
}

/* Frees a block from xmalloc/xrealloc (NULL is a no-op) and subtracts its size from the count. */
static void xfree(void *q)
{
    if (!q) return;
    unsigned char *p = (unsigned char *)q - MEM_HDR;
    size_t n;
    memcpy(&n, p, sizeof n);
    mem_live_bytes -= n;
    free(p);
}

/* realloc with the same accounting. On NULL the old block is untouched and still owned by the
 * caller (standard realloc contract), so `p = xrealloc(p, n)` would leak: assign to a temp. */
static void *xrealloc(void *q, size_t n)
{
    if (!q) return xmalloc(n);
    if (mem_fail_after >= 0 && mem_fail_after-- == 0) return NULL;
    if (n > SIZE_MAX - MEM_HDR) return NULL;
    unsigned char *p = (unsigned char *)q - MEM_HDR;
    size_t old;
    memcpy(&old, p, sizeof old);
    p = realloc(p, n + MEM_HDR);
    if (!p) return NULL;
    memcpy(p, &n, sizeof n);
    mem_live_bytes = mem_live_bytes - old + n;
    mem_allocs_total++;
    return p + MEM_HDR;
}

/* Zero-filled xmalloc (one size argument: callers multiply after their own overflow check). */
static void *xcalloc(size_t n)
{
    void *p = xmalloc(n);
    if (p) memset(p, 0, n);
    return p;
}

/* Copies s[0..n) into a new NUL-terminated string; the caller frees with xfree. NULL on OOM. */
static char *xstrndup(const char *s, size_t n)
{
    char *d = xmalloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static char *xstrdup(const char *s) { return s ? xstrndup(s, strlen(s)) : NULL; }

/* Milliseconds from CLOCK_MONOTONIC: immune to wall-clock jumps. */
static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Microseconds from CLOCK_MONOTONIC (call durations for /metrics). */
static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Wall-clock milliseconds since the epoch, for connected_at_ms. */
static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* SipHash-1-3 (Aumasson and Bernstein; the variant Rust and Python use for their hash tables):
 * a keyed 64-bit PRF. With a per-process random key, an attacker cannot precompute keys that
 * collide in the engine's hash maps, nor predict the fallback random stream below. Words are
 * assembled little-endian with shifts, so the value is the same on any host. */
#define SIP_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND(v0, v1, v2, v3)                                                                  \
    do {                                                                                           \
        v0 += v1, v1 = SIP_ROTL(v1, 13), v1 ^= v0, v0 = SIP_ROTL(v0, 32);                          \
        v2 += v3, v3 = SIP_ROTL(v3, 16), v3 ^= v2;                                                 \
        v0 += v3, v3 = SIP_ROTL(v3, 21), v3 ^= v0;                                                 \
        v2 += v1, v1 = SIP_ROTL(v1, 17), v1 ^= v2, v2 = SIP_ROTL(v2, 32);                          \
    } while (0)

/* SipHash-c-d of data[0..n) under key (k0, k1): c rounds per word, d to finish. The engine
 * uses 1-3; the unit tests check 2-4 against the paper's test vector. */
static uint64_t siphash(uint64_t k0, uint64_t k1, const void *data, size_t n, int c, int d)
{
    const unsigned char *m = data;
    uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575), v1 = k1 ^ UINT64_C(0x646f72616e646f6d);
    uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261), v3 = k1 ^ UINT64_C(0x7465646279746573);
    uint64_t b = (uint64_t)n << 56, w;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) &&                              \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(&w, m + i, 8); /* the host's order is the word's: one load */
#else
        w = (uint64_t)m[i] | (uint64_t)m[i + 1] << 8 | (uint64_t)m[i + 2] << 16 |
            (uint64_t)m[i + 3] << 24 | (uint64_t)m[i + 4] << 32 | (uint64_t)m[i + 5] << 40 |
            (uint64_t)m[i + 6] << 48 | (uint64_t)m[i + 7] << 56;
#endif
        v3 ^= w;
        for (int r = 0; r < c; r++) SIP_ROUND(v0, v1, v2, v3);
        v0 ^= w;
    }
    switch (n - i) { /* the last 0..7 bytes, low byte first, under the length byte */
    case 7: b |= (uint64_t)m[i + 6] << 48; /* fall through */
    case 6: b |= (uint64_t)m[i + 5] << 40; /* fall through */
    case 5: b |= (uint64_t)m[i + 4] << 32; /* fall through */
    case 4: b |= (uint64_t)m[i + 3] << 24; /* fall through */
    case 3: b |= (uint64_t)m[i + 2] << 16; /* fall through */
    case 2: b |= (uint64_t)m[i + 1] << 8;  /* fall through */
    case 1: b |= (uint64_t)m[i]; break;
    default: break;
    }
    v3 ^= b;
    for (int r = 0; r < c; r++) SIP_ROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    for (int r = 0; r < d; r++) SIP_ROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* The hash maps' key function (several per routed call). */
static uint64_t siphash13(uint64_t k0, uint64_t k1, const void *data, size_t n)
{
    return siphash(k0, k1, data, n, 1, 3);
}

/* Random bytes for ids and tokens (worker ids, reattach tokens, channel keys: they must be
 * unguessable). /dev/urandom is opened once at start-up (rnd_init, close-on-exec) and read 512
 * bytes at a time through that descriptor, so running out of descriptors later cannot take it
 * away. Should a read ever fail, the pool is refilled from SipHash in counter mode under a key
 * that itself came from /dev/urandom. With no strong source at all the engine refuses to start
 * unless III_ALLOW_WEAK_RANDOM=1, and then says so loudly. hm_k0/hm_k1 key the hash maps. */
static unsigned char rnd_pool[512];
static size_t rnd_left;
static uint64_t rnd_state;        /* counter of the SipHash fallback stream */
static uint64_t rnd_k0, rnd_k1;   /* its key */
static uint64_t hm_k0, hm_k1;     /* the hash maps' key */
static int rnd_fd = -1;           /* /dev/urandom, kept open */

/* Fills out[0..n) from the pool, refilling it 512 bytes at a time. Never fails. */
static void rnd_bytes(unsigned char *out, size_t n)
{
    while (n) {
        if (!rnd_left) {
            ssize_t r = rnd_fd >= 0 ? read(rnd_fd, rnd_pool, sizeof rnd_pool) : -1;
            if (r != (ssize_t)sizeof rnd_pool)
                for (size_t i = 0; i < sizeof rnd_pool; i += 8) {
                    uint64_t ctr = rnd_state++, v = siphash13(rnd_k0, rnd_k1, &ctr, sizeof ctr);
                    for (int k = 0; k < 8; k++) rnd_pool[i + (size_t)k] = (unsigned char)(v >> (8 * k));
                }
            rnd_left = sizeof rnd_pool;
        }
        *out++ = rnd_pool[--rnd_left];
        n--;
    }
}

/* Start-up: opens the random source and draws the keys. 0 ok; -1 when no strong source exists
 * (the caller refuses to start unless weak randomness was allowed, and then the keys come
 * from the clock, the pid and an address: unique, not secret). */
static int rnd_init(void)
{
    unsigned char k[32];
    size_t got = 0;
    rnd_fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    while (rnd_fd >= 0 && got < sizeof k) {
        ssize_t r = read(rnd_fd, k + got, sizeof k - got);
        if (r <= 0 && !(r < 0 && errno == EINTR)) break;
        if (r > 0) got += (size_t)r;
    }
    if (got < sizeof k) {
        uint64_t t = (uint64_t)now_ms() ^ (uint64_t)wall_ms() << 20 ^ (uint64_t)getpid() << 40 ^
                     (uint64_t)(uintptr_t)&got;
        rnd_k0 = hm_k0 = siphash13(t, ~t, "iii-weak", 8);
        rnd_k1 = hm_k1 = siphash13(~t, t, "iii-weak", 8);
        return -1;
    }
    for (int i = 0; i < 8; i++) {
        hm_k0 = hm_k0 << 8 | k[i], hm_k1 = hm_k1 << 8 | k[8 + i];
        rnd_k0 = rnd_k0 << 8 | k[16 + i], rnd_k1 = rnd_k1 << 8 | k[24 + i];
    }
    return 0;
}

/* Writes a lowercase hyphenated UUIDv4 (36 chars + NUL) into out. */
static void uuid_new(char out[37])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    rnd_bytes(b, 16);
    /* RFC 4122 §4.4: version 4 in the high nibble of byte 6, variant 10xx in byte 8 */
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    int j = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[j++] = '-';
        out[j++] = hex[b[i] >> 4];
        out[j++] = hex[b[i] & 15];
    }
    out[36] = 0;
}

/* Eight bytes at a time, one bit per byte (0x80 in a byte's position, the same in memory order
 * on any host, as every step is bytewise without carries): SWAR_GE(w, c) marks bytes >= c of
 * w's low seven bits (c in 1..0x80), ASCII bytes only being meaningful; the caller masks out
 * bytes with the high bit set. */
#define SWAR_ONES UINT64_C(0x0101010101010101)
#define SWAR_HIGH UINT64_C(0x8080808080808080)
#define SWAR_GE(w7, c) (((w7) + SWAR_ONES * (0x80 - (c))) & SWAR_HIGH)

/* The bytes of w that are ASCII hex digits (0-9, a-f, A-F), marked 0x80. */
static uint64_t swar_hex(uint64_t w)
{
    uint64_t h = w & ~SWAR_HIGH, l = h | SWAR_ONES * 0x20; /* low seven bits; letters folded */
    uint64_t digit = SWAR_GE(h, '0') & ~SWAR_GE(h, '9' + 1);
    uint64_t alpha = SWAR_GE(l, 'a') & ~SWAR_GE(l, 'f' + 1);
    return (digit | alpha) & ~w & SWAR_HIGH;
}

/* 1 if s[0..n) is a hyphenated UUID (8-4-4-4-12 hex digits, any case): the four hyphens, then
 * the 32 digits as five (overlapping) words checked against the positions that must be hex. */
static int uuid_valid(const char *s, size_t n)
{
    /* 0x80 where a hex digit must be: every position but 8, 13, 18 and 23 */
    static const unsigned char want[36] = {
        0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0,    0x80, 0x80, 0x80,
        0x80, 0,    0x80, 0x80, 0x80, 0x80, 0,    0x80, 0x80, 0x80, 0x80, 0,
        0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80};
    static const unsigned char at[5] = {0, 8, 16, 24, 28};
    if (n != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') return 0;
    for (int k = 0; k < 5; k++) {
        uint64_t w, m;
        memcpy(&w, s + at[k], 8);
        memcpy(&m, want + at[k], 8);
        if ((swar_hex(w) & m) != m) return 0;
    }
    return 1;
}

/* 1 if a[0..n) equals b[0..n) ignoring ASCII case (no locale involved). */
static int str_ncaseeq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)a[i]) != tolower((unsigned char)b[i])) return 0;
    return 1;
}

/* 1 if s[0..n) may be an id or a namespace: 1..III_MAX_ID bytes and no control character (a
 * NUL would cut it short wherever it is used as a C string, a newline would forge log lines).
 * The bytes are valid UTF-8 already: every string the engine accepts went through the parser. */
static int id_ok(const char *s, size_t n)
{
    if (!n || n > III_MAX_ID) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7F) return 0;
    return 1;
}

/* Levenshtein distance of a and b (ASCII, for near-miss suggestions), capped at 99. */
static int str_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 200 || lb > 200) return 99;
    int row[201];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up, row[j] = best;
        }
    }
    return row[lb] > 99 ? 99 : row[lb];
}

/* 1 if s[0..n) is empty or only ASCII white space (a "blank" namespace). */
static int str_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i])) return 0;
    return 1;
}

/* ==== Buffer ================================================================================
 * One growable byte buffer for everything: append at len, consume by advancing off, compact
 * lazily. Sizes are checked for overflow before any arithmetic (32-bit matters). A buffer may
 * carry a cap (lim): its live bytes never exceed it, and the block never grows far past it, so a
 * capped queue costs at most its cap however it is fed. A failed append (OOM or over the cap)
 * returns -1 and also sets a sticky error (err), so a frame built from many appends is checked
 * once, at its end (ws_end), and a half-built frame is rolled back, never sent.
 */
enum { BUF_OK, BUF_ENOMEM, BUF_ELIMIT };
struct buf {
    unsigned char *p;     /* heap block of cap bytes (NULL when cap is 0), owned by the buf */
    size_t len, cap, off; /* data is p[off..len) */
    size_t lim;           /* 0: no cap; else buf_used() never exceeds it (appends fail) */
    int err;              /* sticky BUF_ENOMEM / BUF_ELIMIT since the last check, else BUF_OK */
    unsigned char park;   /* a connection's output: its small block is parked when drained */
};

/* Large blocks (above III_BUF_SHRINK) are not given back to malloc the moment a buffer drains:
 * a message of a megabyte would otherwise free and regrow its blocks, and fault their pages in
 * again, on every message. A drained buffer parks its block here instead, and the next buffer
 * that grows past III_BUF_SHRINK takes a parked block that fits. The blocks stay in
 * mem_live_bytes. Bounds: at most III_BUF_CACHE_N blocks and bcache.limit bytes (set each loop
 * turn from the memory budget, 0 under memory pressure: then nothing is parked and everything
 * parked is freed), and a block unused for III_BUF_CACHE_MS is freed (buf_cache_trim). So
 * connections themselves still hold no memory while idle. */
static struct {
    unsigned char *p[III_BUF_CACHE_N];
    size_t cap[III_BUF_CACHE_N];
    int n;
    size_t bytes, limit; /* parked now; most that may be parked (0: parking off) */
    unsigned stamp;      /* counts parks and takes: buf_cache_tick tells an unused cache by it */
} bcache;

/* Small output blocks (at most III_OUT_PARK_MAX bytes) are not kept by idle connections either:
 * a connection's output buffer (park set) gives its block up to this stack once everything is
 * written (buf_out_park, from conn_flush), and such a buffer's next first block is a parked one
 * that fits (buf_out_take). So an idle worker holds no output memory, while busy connections
 * hand the same few blocks round without calling malloc (unless more than III_OUT_PARK_N of
 * them drain in one turn: with the stack full a drained block is freed). Bounds: the stack;
 * under memory pressure (bcache.limit 0) a drained block is freed and the stack emptied, and
 * the stack is freed after III_BUF_CACHE_MS without a park or a take (its own stamp). */
static struct {
    unsigned char *p[III_OUT_PARK_N];
    size_t cap[III_OUT_PARK_N];
    int n;
    unsigned stamp; /* counts parks and takes (buf_cache_tick) */
} opark;

/* Frees parked large blocks until at most `keep` bytes are parked. */
static void buf_cache_trim(size_t keep)
{
    while (bcache.n && bcache.bytes > keep) {
        bcache.n--;
        bcache.bytes -= bcache.cap[bcache.n];
        xfree(bcache.p[bcache.n]);
    }
}

/* Frees every parked output block. */
static void buf_out_trim(void)
{
    while (opark.n) xfree(opark.p[--opark.n]);
}

/* Gives up a drained output buffer's small block (see opark): parked, or freed when the stack
 * is full or parking is off; a larger block stays. */
static void buf_out_park(struct buf *b)
{
    if (!b->park || !b->p || b->len != b->off || b->cap > III_OUT_PARK_MAX) return;
    if (bcache.limit && opark.n < III_OUT_PARK_N) {
        opark.p[opark.n] = b->p, opark.cap[opark.n++] = b->cap;
        opark.stamp++;
    } else {
        xfree(b->p);
    }
    b->p = NULL;
    b->len = b->cap = b->off = 0;
}

/* buf_grow's first block for an output buffer: the parked block nearest the top of the stack
 * with room for n bytes, among the top eight. 1 taken, 0 none fits. */
static int buf_out_take(struct buf *b, size_t n)
{
    for (int i = opark.n - 1; i >= 0 && i >= opark.n - 8; i--) {
        if (opark.cap[i] < n) continue;
        b->p = opark.p[i], b->cap = opark.cap[i], b->len = b->off = 0;
        opark.n--;
        opark.p[i] = opark.p[opark.n], opark.cap[i] = opark.cap[opark.n];
        opark.stamp++;
        return 1;
    }
    return 0;
}

/* Releases b's storage: a large block is parked when there is room, else freed. */
static void buf_drop(struct buf *b)
{
    if (b->cap > III_BUF_SHRINK && bcache.n < III_BUF_CACHE_N &&
        b->cap <= bcache.limit - (bcache.bytes < bcache.limit ? bcache.bytes : bcache.limit)) {
        bcache.p[bcache.n] = b->p, bcache.cap[bcache.n++] = b->cap;
        bcache.bytes += b->cap;
        bcache.stamp++;
    } else {
        xfree(b->p);
    }
    b->p = NULL;
    b->len = b->cap = b->off = 0;
}

/* Moves b's live bytes into a parked block of at least need and at most max bytes, if one is
 * there. 1 done, 0 none fits. */
static int buf_cache_take(struct buf *b, size_t need, size_t max)
{
    for (int i = bcache.n - 1; i >= 0; i--) {
        if (bcache.cap[i] < need || bcache.cap[i] > max) continue;
        unsigned char *p = bcache.p[i];
        size_t cap = bcache.cap[i];
        bcache.bytes -= cap;
        bcache.n--;
        bcache.stamp++;
        bcache.p[i] = bcache.p[bcache.n], bcache.cap[i] = bcache.cap[bcache.n];
        if (b->len > b->off) memcpy(p, b->p + b->off, b->len - b->off);
        xfree(b->p);
        b->p = p, b->cap = cap, b->len -= b->off, b->off = 0;
        return 1;
    }
    return 0;
}

/* buf_reserve's slow path: the cap check, compaction and growth (below). */
static int buf_grow(struct buf *b, size_t n);

/* Ensures room for n more bytes after len. 0 ok, -1 OOM, overflow or over the cap (err set), or
 * an earlier failure not yet checked. Inline: nearly every append finds room already (a few
 * dozen per routed call), so that test costs no call; the rest is out of line. */
static inline int buf_reserve(struct buf *b, size_t n)
{
    if (b->err) return -1; /* sticky: after one failure nothing more is appended until checked */
    if (b->cap - b->len >= n && (!b->lim || b->len - b->off + n <= b->lim)) return 0;
    return buf_grow(b, n);
}

static int buf_grow(struct buf *b, size_t n)
{
    if (b->lim && (n > b->lim || b->len - b->off > b->lim - n)) {
        b->err = BUF_ELIMIT;
        return -1;
    }
    if (b->cap - b->len >= n) return 0;
    if (!b->p && b->park && opark.n && buf_out_take(b, n)) return 0;
    if (b->off && b->off == b->len) b->off = b->len = 0;
    /* compact instead of growing when over half the block is consumed, or when moving the live
     * bytes down alone makes room: a memmove is cheaper than a bigger block */
    if (b->p && (b->off > b->cap / 2 || (b->off && b->cap - (b->len - b->off) >= n))) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n) return 0;
    }
    if (n > SIZE_MAX - b->len) {
        b->err = BUF_ENOMEM;
        return -1;
    }
    /* doubling keeps appends amortised O(1); near SIZE_MAX take exactly what is needed; a
     * capped buffer never grows past what its cap can use */
    size_t need = b->len + n, cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    if (b->lim && cap > b->off + b->lim) cap = need > b->off + b->lim ? need : b->off + b->lim;
    /* a parked block up to twice the size we would grow to (a capped buffer: no bigger) */
    if (cap > III_BUF_SHRINK && bcache.n &&
        buf_cache_take(b, need - b->off, b->lim || cap > SIZE_MAX / 2 ? cap : 2 * cap))
        return 0;
    unsigned char *p = xrealloc(b->p, cap);
    if (!p) {
        b->err = BUF_ENOMEM;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* Appends d[0..n). 0 ok, -1 OOM (b unchanged). The "check a cap" rule is the caller's: it
 * compares buf_used() with its limit before appending. */
static int buf_append(struct buf *b, const void *d, size_t n)
{
    if (!n) return 0;
    /* (p is never NULL once n > 0 bytes fit; the test says so to the static analyzer) */
    if (buf_reserve(b, n) < 0 || !b->p) return -1;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

/* buf_append inline, for buf_puts (mostly literals): the copy of a known length becomes a few
 * moves and the room test is inline; a frame builder appends half a dozen of them per call. */
static inline int buf_put_lit(struct buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, n) < 0) return -1;
    if (n) memcpy(b->p + b->len, s, n), b->len += n; /* n is 0: p may still be NULL */
    return 0;
}

/* a macro, so that appending a literal costs no strlen at run time */
#define buf_puts(b, s) buf_put_lit((b), (s), strlen(s))

static int buf_putc(struct buf *b, int c)
{
    if (buf_reserve(b, 1) < 0) return -1;
    b->p[b->len++] = (unsigned char)c;
    return 0;
}

/* printf-appends; short results go through a stack buffer (no reserve), long ones are formatted
 * straight into the buffer after one reserve. 0 ok, -1 OOM or encoding error. */
static int buf_printf(struct buf *b, const char *fmt, ...) III_PRINTF(2, 3);
static int buf_printf(struct buf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->err = BUF_ENOMEM;
        return -1;
    }
    if ((size_t)n < sizeof tmp) return buf_append(b, tmp, (size_t)n);
    if (buf_reserve(b, (size_t)n + 1) < 0) return -1;
    va_start(ap, fmt);
    vsnprintf((char *)b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

static size_t buf_used(const struct buf *b) { return b->len - b->off; }
static unsigned char *buf_data(const struct buf *b) { return b->p ? b->p + b->off : b->p; }

/* Marks n bytes consumed. Memory goes back after a burst: a large buffer is released once it is
 * drained (its block parked for reuse, see bcache), and one that is mostly drained moves its
 * rest down into a block a quarter the size (at most one move per halving, so the cost stays
 * amortised O(1) per byte). */
static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len) {
        b->off = b->len = 0;
        if (b->cap > III_BUF_SHRINK) buf_drop(b);
    } else if (b->cap > III_BUF_SHRINK && b->len - b->off <= b->cap / 8) {
        size_t used = b->len - b->off, cap = b->cap / 4;
        memmove(b->p, b->p + b->off, used);
        b->off = 0, b->len = used;
        unsigned char *p = xrealloc(b->p, cap);
        if (p) b->p = p, b->cap = cap; /* a failed shrink keeps the bigger block: still valid */
    }
}

/* Releases the storage and resets b to the empty state; b itself stays usable (its cap too). */
static void buf_free(struct buf *b)
{
    xfree(b->p);
    b->p = NULL;
    b->len = b->cap = b->off = 0;
    b->err = BUF_OK;
}

/* Empties b for reuse, keeping its block (scratch buffers). */
static void buf_reset(struct buf *b)
{
    b->len = b->off = 0;
    b->err = BUF_OK;
}

/* The sticky error of b (BUF_OK when every append since the last call succeeded), cleared. */
static int buf_check(struct buf *b)
{
    int e = b->err;
    b->err = BUF_OK;
    return e;
}

/* Makes the buffer's data a NUL-terminated C string (NUL not counted). NULL on OOM. */
static char *buf_cstr(struct buf *b)
{
    if (buf_reserve(b, 1) < 0) return NULL;
    b->p[b->len] = 0;
    return (char *)b->p + b->off;
}

/* ==== SHA-1 and base64 ======================================================================
 * SHA-1 (FIPS 180-4 / RFC 3174) only for the Sec-WebSocket-Accept value; base64 (RFC 4648 §4)
 * for the same, and for validating Sec-WebSocket-Key. Byte order is explicit (big-endian words
 * assembled with shifts), so the code is right on any host.
 */
struct sha1 {
    uint32_t h[5];         /* chaining state H0..H4 (FIPS 180-4 §5.3.1) */
    uint64_t n;            /* bytes hashed so far */
    unsigned char blk[64]; /* current 512-bit block being filled */
    size_t fill;           /* bytes of blk in use */
};

#define SHA1_ROL(x, k) (((x) << (k)) | ((x) >> (32 - (k))))

/* Compresses one 64-byte block p into s->h (FIPS 180-4 §6.1.2: 80 rounds, four stages). */
static void sha1_block(struct sha1 *s, const unsigned char *p)
{
    uint32_t w[80], a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = SHA1_ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        uint32_t t = SHA1_ROL(a, 5) + f + e + k + w[i];
        e = d, d = c, c = SHA1_ROL(b, 30), b = a, a = t;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d, s->h[4] += e;
}

static void sha1_init(struct sha1 *s)
{
    static const uint32_t h0[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(s->h, h0, sizeof h0);
    s->n = 0;
    s->fill = 0;
}

/* Hashes len more bytes; buffers a partial block in s->blk. */
static void sha1_update(struct sha1 *s, const void *data, size_t len)
{
    const unsigned char *p = data;
    s->n += len;
    while (len) {
        size_t k = 64 - s->fill < len ? 64 - s->fill : len;
        memcpy(s->blk + s->fill, p, k);
        s->fill += k, p += k, len -= k;
        if (s->fill == 64) sha1_block(s, s->blk), s->fill = 0;
    }
}

/* Pads (0x80, zeros, 64-bit big-endian bit length; FIPS 180-4 §5.1.1) and writes the 20-byte
 * digest. s must be re-initialised before reuse. */
static void sha1_final(struct sha1 *s, unsigned char out[20])
{
    uint64_t bits = s->n * 8;
    unsigned char pad = 0x80, zero = 0, len[8];
    sha1_update(s, &pad, 1);
    while (s->fill != 56) sha1_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha1_update(s, len, 8);
    for (int i = 0; i < 20; i++) out[i] = (unsigned char)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}

static const char b64_tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Encodes n bytes to out (4*ceil(n/3)+1 bytes of room), NUL-terminated. Returns the length. */
static size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[j++] = b64_tab[v >> 18 & 63];
        out[j++] = b64_tab[v >> 12 & 63];
        out[j++] = i + 1 < n ? b64_tab[v >> 6 & 63] : '=';
        out[j++] = i + 2 < n ? b64_tab[v & 63] : '=';
    }
    out[j] = 0;
    return j;
}

/* Decodes canonical padded base64; returns the decoded length or -1 if malformed. */
static long b64_decode(const char *in, size_t n, unsigned char *out, size_t cap)
{
    if (n % 4) return -1;
    size_t j = 0;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t v = 0;
        int pad = 0;
        for (int k = 0; k < 4; k++) {
            char c = in[i + k];
            /* strchr would also "find" the terminating NUL, hence the c test */
            const char *q = c ? strchr(b64_tab, c) : NULL;
            if (c == '=' && i + 4 == n && k >= 2) {
                pad++;
                v <<= 6;
                continue;
            }
            if (!q || pad) return -1;
            v = v << 6 | (uint32_t)(q - b64_tab);
        }
        for (int k = 0; k < 3 - pad; k++) {
            if (j >= cap) return -1;
            out[j++] = (unsigned char)(v >> (16 - 8 * k));
        }
    }
    return (long)j;
}

/* ==== UTF-8 =================================================================================
 * A streaming validator (RFC 3629): the state survives between fragments, so a text message is
 * rejected at its first invalid byte even when the message is not complete (RFC 6455 §8.1
 * "fail fast"). Overlongs, surrogates and code points above U+10FFFF are invalid.
 */
struct utf8 {
    unsigned char need, lo, hi; /* continuation bytes still expected; allowed range of next */
};

/* Feeds n bytes. 0 while valid so far, -1 at the first invalid byte. */
static int utf8_feed(struct utf8 *u, const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (!u->need) {
            /* fast path: skip ASCII eight bytes at a time */
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, p + i, 8);
                if (w & UINT64_C(0x8080808080808080)) break;
                i += 8;
            }
            if (i >= n) break;
            unsigned char c = p[i++];
            if (c < 0x80) continue;
            u->lo = 0x80, u->hi = 0xBF;
            /* RFC 3629 §4: C0/C1 would be overlong; after E0 the next byte is A0..BF (no
             * overlongs), after ED 80..9F (no surrogates), after F0 90..BF, after F4 80..8F
             * (nothing above U+10FFFF) */
            if (c >= 0xC2 && c <= 0xDF) u->need = 1;
            else if (c == 0xE0) u->need = 2, u->lo = 0xA0;
            else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) u->need = 2;
            else if (c == 0xED) u->need = 2, u->hi = 0x9F;
            else if (c == 0xF0) u->need = 3, u->lo = 0x90;
            else if (c >= 0xF1 && c <= 0xF3) u->need = 3;
            else if (c == 0xF4) u->need = 3, u->hi = 0x8F;
            else return -1;
        } else {
            unsigned char c = p[i++];
            if (c < u->lo || c > u->hi) return -1;
            u->need--;
            u->lo = 0x80, u->hi = 0xBF;
        }
    }
    return 0;
}

/* 1 if the whole of p[0..n) is valid UTF-8. */
static int utf8_valid(const unsigned char *p, size_t n)
{
    struct utf8 u = {0, 0, 0};
    return utf8_feed(&u, p, n) == 0 && u.need == 0;
}

/* Appends code point cp as UTF-8. */
static int utf8_put(struct buf *b, uint32_t cp)
{
    unsigned char t[4];
    size_t n;
    if (cp < 0x80) t[0] = (unsigned char)cp, n = 1;
    else if (cp < 0x800)
        t[0] = (unsigned char)(0xC0 | cp >> 6), t[1] = (unsigned char)(0x80 | (cp & 63)), n = 2;
    else if (cp < 0x10000)
        t[0] = (unsigned char)(0xE0 | cp >> 12), t[1] = (unsigned char)(0x80 | (cp >> 6 & 63)),
        t[2] = (unsigned char)(0x80 | (cp & 63)), n = 3;
    else
        t[0] = (unsigned char)(0xF0 | cp >> 18), t[1] = (unsigned char)(0x80 | (cp >> 12 & 63)),
        t[2] = (unsigned char)(0x80 | (cp >> 6 & 63)), t[3] = (unsigned char)(0x80 | (cp & 63)),
        n = 4;
    return buf_append(b, t, n);
}

/* ==== JSON ==================================================================================
 * A strict RFC 8259 parser that produces a flat token array (jsmn style) without recursion:
 * an explicit stack of at most III_JSON_MAX_DEPTH containers. Each token records the byte span
 * of its value in the source, so any sub-value can be relayed as the exact bytes that arrived
 * (numbers keep their spelling, duplicate keys stay). Containers deeper than `tokdepth` are
 * validated but not tokenized: routing only needs the envelope, never the payload's inside.
 *
 * Tokens: an object token is followed by its members as key (string) token, value token(s);
 * an array token by its elements. `next` is the index just past a value's subtree, so walking
 * siblings is `i = t[i].next`.
 *
 * The writer side is a handful of buf helpers that escape strings (json_put_str) and splice raw
 * slices (json_put_raw).
 */
enum { J_NULL = 1, J_FALSE, J_TRUE, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT };

struct jtok {
    unsigned char type;   /* J_* kind */
    unsigned char esc;    /* string: contains a backslash escape */
    unsigned char opaque; /* container deeper than tokdepth: children not tokenized */
    uint32_t start, end;  /* value's bytes: src[start..end), strings include their quotes */
    uint32_t next;        /* token index after this value's subtree */
    uint32_t n;           /* children: array elements or object members */
};

struct jdoc {
    const unsigned char *src; /* the parsed text, borrowed from the caller (tokens point into it) */
    size_t len;               /* bytes of src */
    struct jtok *t;           /* token array, grown by json_push; owned by the jdoc's owner */
    uint32_t nt, cap;         /* tokens in use / allocated */
    uint32_t max;             /* token cap for this parse */
    int cwid_key;             /* a "_caller_worker_id" key was seen at depth 2 (rt_put_data) */
    /* Index of the top-level object's keys, built by json_parse so that json_get on token 0 (the
     * envelope: a dozen lookups per routed frame) is one probe instead of a walk of the members.
     * Invariant when kidx is 1: every top-level key is unescaped and kslot[JKEY_HASH(key)] holds
     * its key token, bit JKEY_HASH(key) of kmask set; so a key whose slot is empty or holds
     * another key is absent. Two keys sharing a slot (a duplicate key included) or any escaped
     * key clear kidx, and json_get_n walks the members as before (first match wins). */
    int kidx;
    uint32_t kmask;
    uint32_t kslot[32];
};

/* Slot of key k[0..n) (raw, unescaped bytes) in jdoc's key index: the common envelope keys
 * (type, invocation_id, function_id, data, result, error, action, namespace, traceparent,
 * baggage, metadata, timeout_ms, id, code, message, stacktrace) all land in distinct slots. */
#define JKEY_HASH(k, n)                                                                            \
    ((n) ? (uint32_t)((n) + (unsigned char)(k)[0] + 7u * (unsigned char)(k)[(n) - 1]) & 31u : 0u)

static int json_scan_str_from(const unsigned char *s, size_t n, size_t *pos, size_t i,
                              int check_utf8, int *esc);

/* Nonzero when one of the eight bytes of w may be '"', '\\' or a control (< 0x20): the classic
 * "has a zero byte" test on w XORed with each. A borrow can flag a byte after the first real
 * one, never miss one, so callers go byte by byte through a flagged word. Bytes >= 0x80 are
 * not flagged. */
static inline uint64_t json_word_special(uint64_t w)
{
    const uint64_t ones = UINT64_C(0x0101010101010101), high = UINT64_C(0x8080808080808080);
    uint64_t q = w ^ (ones * '"'), b = w ^ (ones * '\\');
    return (((q - ones) & ~q) | ((b - ones) & ~b) | ((w - ones * 0x20) & ~w)) & high;
}

/* A note on the text being parsed, made by the pass that unmasked it (ws_unmask_note): bit k of
 * bits clear means bytes [h + 64k, h + 64k + 64) of s hold no '"', '\\' or control byte (nor,
 * when ascii, a byte >= 0x80: then it holds for the validating scan as well). json_scan_str uses
 * it to step over a long string's clean blocks without reading them again. Invariants: s is set
 * only around the delivery of that one message (ws_on_data), whose bytes nothing changes
 * meanwhile, and the note is used only for that exact text (s and n); the bits past nb are 0. */
static struct {
    const unsigned char *s; /* NULL: no note */
    size_t n, h, nb;        /* the text's length; nb blocks noted, the first at byte h */
    int ascii;
#ifdef III_SSE2
    uint64_t bits[(III_SCAN_NOTE_MAX / 64 + 63) / 64];
#endif
} jnote;

#ifdef III_SSE2
/* json_scan_str's test of sixteen bytes: 0xFF where a byte is '"', '\\' or a control (and, with
 * flip 0x02 / lim 0x21, also where it is non-ASCII; with 0x82 / 0xA1 not). One signed compare
 * finds '"' and the controls: x = v ^ 0x02 maps '"' to 0x20 and keeps the controls below it, so
 * they are the bytes with x <= 0x20 unsigned, i.e. (x ^ 0x80) < (signed char)0xA1; left without
 * the ^ 0x80, the signed compare takes every byte >= 0x80 as well. */
static inline __m128i json_special16(__m128i v, __m128i flip, __m128i lim)
{
    return _mm_or_si128(_mm_cmplt_epi8(_mm_xor_si128(v, flip), lim),
                        _mm_cmpeq_epi8(v, _mm_set1_epi8('\\')));
}

/* The bit mask of those bytes among p[0..16), and whether there is one among p[0..64). */
static inline unsigned json_special_mask(const unsigned char *p, __m128i flip, __m128i lim)
{
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    return (unsigned)_mm_movemask_epi8(json_special16(v, flip, lim));
}
static inline int json_special_mask64(const unsigned char *p, __m128i flip, __m128i lim)
{
    const __m128i *q = (const __m128i *)(const void *)p;
    __m128i a = _mm_or_si128(json_special16(_mm_loadu_si128(q), flip, lim),
                             json_special16(_mm_loadu_si128(q + 1), flip, lim));
    __m128i b = _mm_or_si128(json_special16(_mm_loadu_si128(q + 2), flip, lim),
                             json_special16(_mm_loadu_si128(q + 3), flip, lim));
    return _mm_movemask_epi8(_mm_or_si128(a, b)) != 0;
}

/* The first position at or after i (in the noted text) that is not inside a clean block. */
static size_t json_note_skip(size_t i)
{
    if (i < jnote.h) return i;
    size_t b = (i - jnote.h) / 64;
    while (b < jnote.nb) {
        uint64_t w = jnote.bits[b / 64] >> (b % 64);
        if (w) {
            b += (size_t)__builtin_ctzll(w);
            break;
        }
        b = (b / 64 + 1) * 64;
    }
    if (b > jnote.nb) b = jnote.nb;
    return jnote.h + 64 * b > i ? jnote.h + 64 * b : i;
}
#endif

/* Validates one string starting at the opening quote s[*pos]; advances *pos past the closing
 * quote. Control characters are rejected, escapes checked (\uXXXX needs four hex digits; lone
 * surrogates are syntactically valid JSON and accepted), raw bytes must be valid UTF-8 unless
 * the caller already validated the whole input. Sets *esc when a backslash was seen.
 * Inline, the common short string (every key and id of an envelope) costs one SSE2 step when
 * its closing quote is the first special byte among the next sixteen; anything else (longer,
 * escaped, non-ASCII to validate, near the end of the input) takes the full scan
 * (json_scan_str_from), which resumes at the first byte this step did not pass. */
static inline int json_scan_str(const unsigned char *s, size_t n, size_t *pos, int check_utf8,
                                int *esc)
{
#ifdef III_SSE2
    size_t i = *pos + 1;
    if (i + 16 <= n) {
        /* json_special16's two settings: with and without the non-ASCII bytes */
        unsigned hit = check_utf8
                           ? json_special_mask(s + i, _mm_set1_epi8(0x02), _mm_set1_epi8(0x21))
                           : json_special_mask(s + i, _mm_set1_epi8((char)0x82),
                                               _mm_set1_epi8((char)0xA1));
        if (hit) {
            i += (size_t)__builtin_ctz(hit);
            if (s[i] == '"') {
                *esc = 0;
                *pos = i + 1;
                return 0;
            }
        } else {
            i += 16;
        }
    }
    return json_scan_str_from(s, n, pos, i, check_utf8, esc);
#else
    return json_scan_str_from(s, n, pos, *pos + 1, check_utf8, esc);
#endif
}

/* The full scan; s[*pos + 1 .. i) are already known to hold no '"', '\\' or control (and, when
 * validating, no byte >= 0x80), so the UTF-8 validator's state is clean at i. */
static int json_scan_str_from(const unsigned char *s, size_t n, size_t *pos, size_t i,
                              int check_utf8, int *esc)
{
    struct utf8 u = {0, 0, 0};
    *esc = 0;
    for (;;) {
        size_t st = i;
#ifdef III_SSE2
        /* sixteen bytes a step while none is '"', '\\' or a control (or, when validating, a
         * non-ASCII byte: json_special16): the first 64 bytes sixteen at a time (most strings
         * of an envelope end there), then sixty-four a step (a payload), the rest sixteen; then
         * straight to the first such byte */
        if (i + 16 <= n) { /* (shorter strings need no set-up) */
            const __m128i flip = check_utf8 ? _mm_set1_epi8(0x02) : _mm_set1_epi8((char)0x82),
                          lim = check_utf8 ? _mm_set1_epi8(0x21) : _mm_set1_epi8((char)0xA1);
            unsigned hit = json_special_mask(s + i, flip, lim);
            for (int k = 1; !hit && k < 4 && i + 32 <= n; k++)
                hit = json_special_mask(s + (i += 16), flip, lim);
            if (!hit) {
                i += 16;
                if (s == jnote.s && n == jnote.n && (!check_utf8 || jnote.ascii))
                    i = json_note_skip(i); /* past the clean blocks the unmask noted */
                while (i + 64 <= n && !json_special_mask64(s + i, flip, lim)) i += 64;
                while (i + 16 <= n && !(hit = json_special_mask(s + i, flip, lim))) i += 16;
            }
            if (hit) {
                i += (size_t)__builtin_ctz(hit);
                /* without validation it is '"', '\\' or a control: the loops below would stop on
                 * it at once, so skip them; a non-ASCII byte goes through them */
                if (!check_utf8) goto special;
            }
        }
#endif
        /* eight bytes at a time while none is '"', '\\' or a control (or, when validating, a
         * non-ASCII byte): the classic "has a zero byte" test on the word XORed with each */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (json_word_special(w) || (check_utf8 && (w & UINT64_C(0x8080808080808080)))) break;
            i += 8;
        }
        /* RFC 8259 §7: U+0000..U+001F must be escaped, so a raw one ends the scan as an error */
        while (i < n && s[i] != '"' && s[i] != '\\' && s[i] >= 0x20) i++;
#ifdef III_SSE2
    special: /* s[i] (i < n) is '"', '\\' or a control, or i == n */
#endif
        if (check_utf8 && utf8_feed(&u, s + st, i - st) < 0) return -1;
        if (i >= n || s[i] < 0x20) return -1;
        if (s[i] == '"') break;
        /* an escape between the bytes of one UTF-8 sequence would let invalid UTF-8 through
         * (F0 9B \\ BF BF): the validator's state must be clean at every escape */
        if (u.need) return -1;
        *esc = 1;
        if (++i >= n) return -1;
        switch (s[i]) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
            i++;
            break;
        case 'u':
            if (i + 4 >= n) return -1;
            for (int k = 1; k <= 4; k++)
                if (!isxdigit(s[i + k])) return -1;
            i += 5;
            break;
        default:
            return -1;
        }
    }
    if (u.need) return -1;
    *pos = i + 1;
    return 0;
}

/* Validates a number per the RFC 8259 grammar; advances *pos. */
static int json_scan_num(const unsigned char *s, size_t n, size_t *pos)
{
    size_t i = *pos;
    if (i < n && s[i] == '-') i++;
    if (i >= n) return -1;
    /* RFC 8259 §6: no leading zeros, no '+', digits required after '.' and in the exponent */
    if (s[i] == '0') i++;
    else if (s[i] >= '1' && s[i] <= '9')
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    else return -1;
    if (i < n && s[i] == '.') {
        i++;
        if (i >= n || s[i] < '0' || s[i] > '9') return -1;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= n || s[i] < '0' || s[i] > '9') return -1;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    *pos = i;
    return 0;
}

/* Grows d->t geometrically up to d->max. 0 ok, -1 OOM. */
static int json_grow(struct jdoc *d)
{
    uint32_t nc = d->cap ? d->cap * 2 : 64;
    if (nc > d->max) nc = d->max;
    struct jtok *t = xrealloc(d->t, (size_t)nc * sizeof *t);
    if (!t) return -1;
    d->t = t, d->cap = nc;
    return 0;
}

/* Appends a token of `type` starting at byte `start`, growing d->t when full. Returns its
 * index, or -1 when the token cap is reached or on OOM. */
static inline int json_push(struct jdoc *d, int type, size_t start)
{
    if (d->nt >= d->max) return -1;
    /* the array is reused between parses: growth (json_grow, out of line) is rare */
    if (d->nt == d->cap && json_grow(d) < 0) return -1;
    struct jtok *t = &d->t[d->nt];
    t->type = (unsigned char)type, t->esc = 0, t->opaque = 0;
    t->start = (uint32_t)start, t->end = (uint32_t)start, t->next = d->nt + 1, t->n = 0;
    return (int)d->nt++;
}

#define JSON_WS(c) ((c) == ' ' || (c) == '\t' || (c) == '\n' || (c) == '\r')

/* Skips the one JSON value that starts at s[i] (no white space before it) in text that
 * json_parse has already accepted: strings by their escapes, containers by counting brackets
 * outside strings, so no stack is needed. Returns the index just past the value. */
static size_t json_skip(const unsigned char *s, size_t n, size_t i)
{
    size_t depth = 0;
    do {
        unsigned char c = s[i];
        if (c == '"') {
            for (i++; i < n && s[i] != '"'; i++)
                if (s[i] == '\\') i++;
            i++;
        } else if (c == '{' || c == '[') {
            depth++, i++;
        } else if (c == '}' || c == ']') {
            depth--, i++;
        } else if (!depth) { /* a scalar on its own: up to the next delimiter */
            while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && !JSON_WS(s[i])) i++;
        } else {
            i++;
        }
    } while (depth && i < n);
    return i;
}

/* 1 if the object key s[0..n) (a validated JSON string, quotes included) decodes to
 * "_caller_worker_id", however it is spelt: plain, or with escapes such as \u0064. */
static int json_key_is_cwid(const unsigned char *s, size_t n)
{
    static const char k[] = "_caller_worker_id";
    static const char from[] = "bfnrt", to[] = "\b\f\n\r\t";
    size_t j = 0;
    if (n < 2 || n > 2 + 6 * (sizeof k - 1)) return 0; /* longer cannot decode to 17 chars */
    for (size_t i = 1; i + 1 < n; j++) {
        unsigned c = s[i];
        if (c == '\\' && s[i + 1] == 'u') {
            c = 0;
            for (int h = 2; h < 6; h++) {
                unsigned d = s[i + h];
                c = c << 4 | (d <= '9' ? d - '0' : (d | 0x20) - 'a' + 10);
            }
            i += 6;
        } else if (c == '\\') {
            const char *m = memchr(from, s[i + 1], sizeof from - 1);
            c = m ? (unsigned char)to[m - from] : s[i + 1];
            i += 2;
        } else {
            i++;
        }
        if (j >= sizeof k - 1 || c != (unsigned char)k[j]) return 0;
    }
    return j == sizeof k - 1;
}


/* Parses s[0..n) as one JSON text into d (tokens reused between calls; the caller owns d and
 * frees d->t). Containers nested deeper than tokdepth (1 = only the top value) are validated
 * but kept as one opaque token. check_utf8: 0 when the input was already validated.
 * Returns 0; -2 when nesting goes deeper than III_JSON_MAX_DEPTH (the text before that point
 * was valid); -1 on a syntax error, more than d->max tokens, or OOM. */
static int json_parse(struct jdoc *d, const unsigned char *s, size_t n, int tokdepth,
                      int check_utf8)
{
    int stack[III_JSON_MAX_DEPTH]; /* token index per open container, -1 when untokenized */
    unsigned char kind[III_JSON_MAX_DEPTH]; /* '{' or '[' */
    int depth = 0;
    size_t i = 0;
    int expect_key = 0; /* inside an object, a key (string) comes next */
    d->src = s, d->len = n, d->nt = 0, d->cwid_key = 0;
    d->kidx = 1, d->kmask = 0;
    if (!d->max) d->max = III_JSON_MAX_TOKENS;
    /* token offsets are 32-bit (half the token size); frame limits keep real input far below */
    if (n > UINT32_MAX - 1) return -1;
    for (;;) {
        while (i < n && JSON_WS(s[i])) i++;
        if (i >= n) return -1;
        /* a value (or an object key) starts at s[i] */
        int tokenize = depth < tokdepth;
        int ti = -1;
        unsigned char c = s[i];
        if (expect_key && c != '"') return -1;
        if (c == '{' || c == '[') {
            if (depth >= III_JSON_MAX_DEPTH) return -2;
            if (tokenize) {
                if ((ti = json_push(d, c == '{' ? J_OBJECT : J_ARRAY, i)) < 0) return -1;
                /* its children sit at tokdepth: validated, not tokenized */
                if (depth + 1 >= tokdepth) d->t[ti].opaque = 1;
                if (depth > 0 && kind[depth - 1] == '[') d->t[stack[depth - 1]].n++;
            }
            stack[depth] = ti;
            kind[depth] = c;
            depth++;
            i++;
            while (i < n && JSON_WS(s[i])) i++;
            if (i < n && (s[i] == '}' || s[i] == ']')) {
                if (s[i] != (c == '{' ? '}' : ']')) return -1;
                i++;
                depth--;
                if (ti >= 0) d->t[ti].end = (uint32_t)i, d->t[ti].next = d->nt;
                goto after_value;
            }
            expect_key = c == '{';
            continue;
        }
        if (c == '"') {
            size_t st = i;
            int esc;
            if (json_scan_str(s, n, &i, check_utf8, &esc) < 0) return -1;
            if (tokenize) {
                if ((ti = json_push(d, J_STRING, st)) < 0) return -1;
                d->t[ti].end = (uint32_t)i, d->t[ti].esc = (unsigned char)esc;
            }
            if (expect_key) {
                /* object key: count the member, then expect ':' and the value */
                if (tokenize) d->t[stack[depth - 1]].n++;
                /* a member of the top-level object (token 0): into the key index */
                if (tokenize && depth == 1 && d->kidx) {
                    uint32_t h = JKEY_HASH(s + st + 1, i - st - 2);
                    if (esc || (d->kmask >> h & 1)) d->kidx = 0;
                    else d->kmask |= UINT32_C(1) << h, d->kslot[h] = (uint32_t)ti;
                }
                /* the one key of a payload the router cares about, noted on the way past: a
                 * routed `data` object is then never scanned again for it (rt_put_data) */
                if (depth == 2 && (esc ? json_key_is_cwid(s + st, i - st)
                                       : i - st == 19 && !memcmp(s + st, "\"_caller_worker_id\"", 19)))
                    d->cwid_key = 1;
                while (i < n && JSON_WS(s[i])) i++;
                if (i >= n || s[i] != ':') return -1;
                i++;
                expect_key = 0;
                continue;
            }
        } else {
            size_t st = i;
            int type;
            if (c == '-' || (c >= '0' && c <= '9')) {
                if (json_scan_num(s, n, &i) < 0) return -1;
                type = J_NUMBER;
            } else if (n - i >= 4 && !memcmp(s + i, "true", 4)) i += 4, type = J_TRUE;
            else if (n - i >= 5 && !memcmp(s + i, "false", 5)) i += 5, type = J_FALSE;
            else if (n - i >= 4 && !memcmp(s + i, "null", 4)) i += 4, type = J_NULL;
            else return -1;
            if (tokenize) {
                if ((ti = json_push(d, type, st)) < 0) return -1;
                d->t[ti].end = (uint32_t)i;
            }
        }
        if (tokenize && depth > 0 && kind[depth - 1] == '[') d->t[stack[depth - 1]].n++;
    after_value:
        /* after a complete value: close containers or expect a separator */
        for (;;) {
            while (i < n && JSON_WS(s[i])) i++;
            /* RFC 8259 §2: exactly one value, with only white space after it */
            if (depth == 0) return i == n ? 0 : -1;
            if (i >= n) return -1;
            char close = kind[depth - 1] == '{' ? '}' : ']';
            if (s[i] == ',') {
                i++;
                expect_key = kind[depth - 1] == '{';
                break;
            }
            if (s[i] != close) return -1;
            i++;
            depth--;
            int ct = stack[depth];
            if (ct >= 0) d->t[ct].end = (uint32_t)i, d->t[ct].next = d->nt;
        }
    }
}

/* Finds member `key` of object token obj. Returns the value's token index or -1. Keys with
 * escapes are compared after decoding (rare; the common path is a memcmp). */
static int json_get_walk(const struct jdoc *d, int obj, const char *key, size_t klen);

/* json_get_walk with the envelope's case inline: on token 0 with the key index on, one probe.
 * A routed call makes two dozen such lookups with literal keys, whose slot and compare the
 * compiler then folds. The index holds only keys of a top-level object (an array or an opaque
 * top value has none), so an absent slot is an absent key. */
static inline int json_get_n(const struct jdoc *d, int obj, const char *key, size_t klen)
{
    if (obj == 0 && d->kidx) {
        uint32_t h = JKEY_HASH(key, klen);
        if (!(d->kmask >> h & 1)) return -1;
        const struct jtok *kt = &d->t[d->kslot[h]];
        return kt->end - kt->start - 2 == klen && !memcmp(d->src + kt->start + 1, key, klen)
                   ? (int)d->kslot[h] + 1
                   : -1;
    }
    return json_get_walk(d, obj, key, klen);
}
/* a macro, so that the length of a literal key is known at compile time */
#define json_get(d, obj, key) json_get_n((d), (obj), (key), strlen(key))

/* Decodes string token ti (escapes resolved, lone surrogates become U+FFFD) and appends the
 * UTF-8 bytes to out. 0 ok, -1 OOM or not a string. */
static int json_unescape(const struct jdoc *d, int ti, struct buf *out)
{
    const struct jtok *t = &d->t[ti];
    if (t->type != J_STRING) return -1;
    const unsigned char *s = d->src + t->start + 1, *e = d->src + t->end - 1;
    if (!t->esc) return buf_append(out, s, (size_t)(e - s));
    while (s < e) {
        const unsigned char *q = s;
        while (q < e && *q != '\\') q++;
        if (buf_append(out, s, (size_t)(q - s)) < 0) return -1;
        if (q >= e) break;
        q++;
        int c = *q++;
        switch (c) {
        case 'b':
            c = '\b';
            break;
        case 'f':
            c = '\f';
            break;
        case 'n':
            c = '\n';
            break;
        case 'r':
            c = '\r';
            break;
        case 't':
            c = '\t';
            break;
        case 'u': {
            /* json_scan_str already checked the four hex digits; a UTF-16 pair combines (RFC 8259
             * §7) */
            uint32_t cp = (uint32_t)strtoul(
                (char[]){(char)q[0], (char)q[1], (char)q[2], (char)q[3], 0}, NULL, 16);
            q += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && e - q >= 6 && q[0] == '\\' && q[1] == 'u') {
                uint32_t lo = (uint32_t)strtoul(
                    (char[]){(char)q[2], (char)q[3], (char)q[4], (char)q[5], 0}, NULL, 16);
                if (lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    q += 6;
                }
            }
            if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
            if (utf8_put(out, cp) < 0) return -1;
            s = q;
            continue;
        }
        default:
            break; /* '"', '\\', '/' stand for themselves */
        }
        if (buf_putc(out, c) < 0) return -1;
        s = q;
    }
    return 0;
}

/* json_get without the index: a walk of obj's members. Returns the first match: with duplicate
 * keys the first one wins (RFC 8259 §4 leaves it to the implementation). Opaque objects never
 * match. */
static int json_get_walk(const struct jdoc *d, int obj, const char *key, size_t klen)
{
    if (obj < 0 || d->t[obj].type != J_OBJECT || d->t[obj].opaque) return -1;
    uint32_t i = (uint32_t)obj + 1;
    for (uint32_t k = 0; k < d->t[obj].n; k++) {
        const struct jtok *kt = &d->t[i];
        if (!kt->esc) {
            if (kt->end - kt->start - 2 == klen && !memcmp(d->src + kt->start + 1, key, klen))
                return (int)i + 1;
        } else {
            struct buf tmp = {0};
            int eq = json_unescape(d, (int)i, &tmp) == 0 && buf_used(&tmp) == klen &&
                     !memcmp(buf_data(&tmp), key, klen);
            buf_free(&tmp);
            if (eq) return (int)i + 1;
        }
        i = d->t[i + 1].next;
    }
    return -1;
}

/* Length and pointer of token ti's raw bytes. */
#define JRAW(d, ti)  ((d)->src + (d)->t[ti].start)
#define JLEN(d, ti)  ((size_t)((d)->t[ti].end - (d)->t[ti].start))
#define JTYPE(d, ti) ((ti) < 0 ? 0 : (d)->t[ti].type)

/* 1 if token ti is a string equal to lit (exact bytes; escaped strings are decoded first). */
static int json_streq(const struct jdoc *d, int ti, const char *lit)
{
    if (JTYPE(d, ti) != J_STRING) return 0;
    size_t n = strlen(lit);
    if (!d->t[ti].esc) return JLEN(d, ti) - 2 == n && !memcmp(JRAW(d, ti) + 1, lit, n);
    struct buf tmp = {0};
    int eq =
        json_unescape(d, ti, &tmp) == 0 && buf_used(&tmp) == n && !memcmp(buf_data(&tmp), lit, n);
    buf_free(&tmp);
    return eq;
}

/* Returns a newly allocated decoded copy of string token ti (caller frees), NULL if not a
 * string or OOM. The copy may contain NUL bytes from \u0000; *len gets the true length.
 * Decoding never lengthens a string (an escape takes at least as many bytes as the UTF-8 it
 * stands for), so the block is sized once from the raw text plus the NUL: copies that are kept
 * (a worker's runtime, version, os...) hold no growth slack (a buf's first block is 256 bytes). */
static char *json_strdup(const struct jdoc *d, int ti, size_t *len)
{
    if (JTYPE(d, ti) != J_STRING) return NULL;
    struct buf tmp = {0};
    tmp.cap = JLEN(d, ti) - 1; /* the text between the quotes, and the NUL */
    if (!(tmp.p = xmalloc(tmp.cap))) return NULL;
    if (json_unescape(d, ti, &tmp) < 0 || !buf_cstr(&tmp)) {
        buf_free(&tmp);
        return NULL;
    }
    if (len) *len = buf_used(&tmp);
    return (char *)tmp.p;
}

/* Points *s and *n at string token ti's decoded text: the raw bytes when there is no escape, else
 * a decoded copy in scratch (caller frees scratch). -1 if not a string or OOM. */
static int jstr(const struct jdoc *d, int ti, struct buf *scratch, const char **s, size_t *n)
{
    if (JTYPE(d, ti) != J_STRING) return -1;
    if (!d->t[ti].esc) {
        *s = (const char *)JRAW(d, ti) + 1;
        *n = JLEN(d, ti) - 2;
        return 0;
    }
    buf_reset(scratch);
    if (json_unescape(d, ti, scratch) < 0 || !buf_cstr(scratch)) return -1;
    *s = (const char *)buf_data(scratch);
    *n = buf_used(scratch);
    return 0;
}

/* Reads an integer token (no fraction or exponent) into *v. 0 ok, -1 otherwise. */
static int json_int(const struct jdoc *d, int ti, int64_t *v)
{
    if (JTYPE(d, ti) != J_NUMBER) return -1;
    const unsigned char *p = JRAW(d, ti);
    size_t n = JLEN(d, ti), i = 0;
    int neg = 0;
    uint64_t acc = 0;
    if (p[0] == '-') neg = 1, i = 1;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        /* checked before the multiply: no wrap-around on 20-digit input */
        if (acc > (UINT64_MAX - 9) / 10) return -1;
        acc = acc * 10 + (uint64_t)(p[i] - '0');
    }
    if (acc > (uint64_t)INT64_MAX) return -1;
    *v = neg ? -(int64_t)acc : (int64_t)acc;
    return 0;
}

/* 1 when the key is absent or null (the spec reads null as absent for optional fields). */
#define JABSENT(d, ti) ((ti) < 0 || (d)->t[ti].type == J_NULL)

/* Appends s[0..n) as a JSON string literal with quotes; control characters, '"' and '\\'
 * escaped. The input must be valid UTF-8 (all engine strings are). */
static int json_put_str(struct buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    if (buf_reserve(b, n + 2) < 0) return -1;
    b->p[b->len++] = '"';
    size_t st = 0;
    for (size_t i = 0; i < n; i++) {
        /* eight bytes at a time while none needs an escape (an id, a name: all of them) */
        uint64_t w;
        if (i + 8 <= n && (memcpy(&w, s + i, 8), !json_word_special(w))) {
            i += 7;
            continue;
        }
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        if (buf_append(b, s + st, i - st) < 0) return -1;
        /* two-character escapes where JSON has them, \u00XX for the other controls */
        static const char from[] = "\"\\\n\r\t\b\f", to[] = "\"\\nrtbf";
        const char *k = memchr(from, c, sizeof from - 1);
        char e[6] = {'\\', k ? to[k - from] : 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        size_t el = k ? 2 : 6;
        if (buf_append(b, e, el) < 0) return -1;
        st = i + 1;
    }
    if (buf_append(b, s + st, n - st) < 0) return -1;
    return buf_putc(b, '"');
}

/* Appends s[0..n) as a JSON string, invalid UTF-8 replaced by U+FFFD (a command may print
 * anything; a frame must be valid UTF-8). */
static void json_put_lossy(struct buf *b, const unsigned char *s, size_t n)
{
    struct buf t = {0};
    for (size_t i = 0; i < n;) {
        size_t l = s[i] < 0x80 ? 1 : s[i] >= 0xC2 && s[i] < 0xE0 ? 2 : s[i] >= 0xE0 && s[i] < 0xF0 ? 3
                                  : s[i] >= 0xF0 && s[i] < 0xF5 ? 4 : 0;
        if (l && l <= n - i && utf8_valid(s + i, l)) buf_append(&t, s + i, l), i += l;
        else buf_puts(&t, "\xEF\xBF\xBD"), i++;
    }
    json_put_str(b, t.p ? (const char *)buf_data(&t) : "", buf_used(&t));
    buf_free(&t);
}

/* json_put_str for a C string; NULL becomes the literal null. */
static int json_put_cstr(struct buf *b, const char *s)
{
    return s ? json_put_str(b, s, strlen(s)) : buf_append(b, "null", 4);
}

/* Appends token ti's raw bytes exactly as they arrived. */
static int json_put_raw(struct buf *b, const struct jdoc *d, int ti)
{
    return buf_append(b, JRAW(d, ti), JLEN(d, ti));
}

/* ==== YAML subset ===========================================================================
 * A reader for the YAML that people write by hand in config files: block mappings and
 * sequences (including `- key: v` compact forms and sequences indented like their key), flow
 * [..] and {..} spanning lines, plain / 'single' / "double" scalars (all escapes of YAML 1.2,
 * \x \u \U included), | and > block scalars with chomping and indentation indicators,
 * comments, a leading `---` / trailing `...`, and the YAML 1.2 core schema for plain scalars
 * (null ~, true/false, decimal / 0x / 0o integers, floats, .inf, .nan). What it does not
 * implement is refused with a message, never guessed at: anchors, aliases, tags, `? ` complex
 * keys, flow collections as keys, %TAG, and a second document.
 *
 * Approach: a prepass validates UTF-8, refuses control characters and turns CRLF / CR into LF,
 * so the scanner only ever sees LF and can use the NUL padding as its end sentinel. Then a
 * recursive-descent parser walks the text with one cursor (byte offset, line, column in code
 * points). Block structure is decided by indentation: every block-level parse function returns
 * with the cursor on the first character of the next content line and its indentation in
 * p->indent (-1 at the end of the document), and the caller compares that with its own
 * indentation. Recursion happens only when a collection nests, and p->depth caps it at
 * III_YAML_MAX_DEPTH, so hostile input cannot exhaust the stack. The first error wins and is
 * reported as "FILE:LINE:COL: message"; columns count characters, not bytes.
 */
#ifndef III_YAML_MAX_BYTES
#define III_YAML_MAX_BYTES (4u << 20) /* a hand-written config is a few KiB; refuse silly input */
#endif

enum yaml_kind { YAML_NULL, YAML_BOOL, YAML_INT, YAML_FLOAT, YAML_STR, YAML_SEQ, YAML_MAP };

/* One parsed node. A tree is owned by its root; yaml_free releases all of it. */
struct yaml_node {
    int kind;                  /* enum yaml_kind */
    int line, col;             /* 1-based position where the node starts */
    char *str;                 /* scalars: STR decoded, others as written; NUL-terminated */
    size_t len;                /* bytes in str (a STR may contain NUL from an escape) */
    int64_t i;                 /* YAML_INT value */
    double d;                  /* YAML_FLOAT value */
    int b;                     /* YAML_BOOL value */
    struct yaml_node **items;  /* SEQ items or MAP values (n of them) */
    char **keys;               /* MAP keys, decoded, NUL-free; unique */
    int *key_lines, *key_cols; /* MAP key positions */
    size_t n;                  /* items in a collection */
    size_t cap;                /* allocated slots (internal) */
};

/* A saved cursor: the parser backtracks only through these. */
struct yaml_mark {
    size_t pos;    /* byte offset in the normalized text */
    int line, col; /* 1-based; col counts code points */
};

/* The parser state: the text, one cursor, and where the first error goes. */
struct yaml_parser {
    const char *s;    /* normalized text: LF line ends, no BOM, 8 NUL bytes of padding */
    size_t len;       /* bytes of text before the padding */
    size_t pos;       /* the cursor */
    int line, col;    /* 1-based position of the cursor */
    int indent;       /* after yaml_next_content: indentation of the cursor line, -1 = end */
    int depth;        /* collections open around the cursor */
    const char *file; /* name used in messages */
    char *err;        /* message out-buffer */
    size_t errlen;    /* its size */
    int failed;       /* a message has been written: later ones are dropped */
    struct buf sb;    /* text of the scalar being scanned */
};

/* Parse modes of a block node: where its first character sits relative to its parent. */
enum { YM_SAME, YM_COMPACT, YM_NEXT };

#define YC(p, k) ((unsigned char)(p)->s[(p)->pos + (k)]) /* k <= 7: the padding covers it */

static struct yaml_node *yaml_block_node(struct yaml_parser *p, int n, int mode);
static struct yaml_node *yaml_block_content(struct yaml_parser *p, int n, int mode);
static struct yaml_node *yaml_flow_node(struct yaml_parser *p);
static void yaml_free(struct yaml_node *n);

static int yaml_fail(struct yaml_parser *p, int line, int col, const char *fmt, ...)
    III_PRINTF(4, 5);
/* Records "FILE:LINE:COL: message" unless an error is already recorded. Always returns -1. */
static int yaml_fail(struct yaml_parser *p, int line, int col, const char *fmt, ...)
{
    va_list ap;
    size_t k;
    if (p->failed) return -1;
    p->failed = 1;
    if (!p->err || p->errlen == 0) return -1;
    snprintf(p->err, p->errlen, "%s:%d:%d: ", p->file, line, col);
    k = strlen(p->err);
    va_start(ap, fmt);
    vsnprintf(p->err + k, p->errlen - k, fmt, ap);
    va_end(ap);
    return -1;
}

/* The out-of-memory error, placed at the cursor. Always returns -1. */
static int yaml_oom(struct yaml_parser *p)
{
    return yaml_fail(p, p->line, p->col, "out of memory");
}

/* Character classes of YAML 1.2 §5: s-white, s-white or a break or the end, c-flow-indicator. */
static int yaml_blank(int c) { return c == ' ' || c == '\t'; }
static int yaml_blankz(int c) { return c == ' ' || c == '\t' || c == '\n' || c == 0; }
static int yaml_flowind(int c) { return c == ',' || c == '[' || c == ']' || c == '{' || c == '}'; }

/* Bytes in the UTF-8 sequence that starts with c (the text is validated, so this is exact). */
static int yaml_seqlen(int c) { return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* Moves the cursor one byte, keeping line and column (in code points) up to date. */
static void yaml_adv(struct yaml_parser *p)
{
    int c = YC(p, 0);
    if (c == 0) return;
    p->pos++;
    if (c == '\n') {
        p->line++;
        p->col = 1;
    } else if ((c & 0xC0) != 0x80) {
        p->col++;
    }
}

/* Saves the cursor, for lookahead or for the position of a later message. */
static struct yaml_mark yaml_here(const struct yaml_parser *p)
{
    struct yaml_mark m;
    m.pos = p->pos;
    m.line = p->line;
    m.col = p->col;
    return m;
}

/* Moves the cursor back (or forward) to a saved mark. */
static void yaml_reset(struct yaml_parser *p, const struct yaml_mark *m)
{
    p->pos = m->pos;
    p->line = m->line;
    p->col = m->col;
}

/* Skips spaces and tabs on the current line; returns how many. */
static int yaml_skip_blanks(struct yaml_parser *p)
{
    int k = 0;
    while (yaml_blank(YC(p, 0))) {
        yaml_adv(p);
        k++;
    }
    return k;
}

/* 1 at a `---` or `...` marker: column 1, then a blank, a line end or the end of text. */
static int yaml_at_marker(const struct yaml_parser *p)
{
    int c = YC(p, 0);
    if (p->col != 1 || (c != '-' && c != '.')) return 0;
    return YC(p, 1) == c && YC(p, 2) == c && yaml_blankz(YC(p, 3));
}

/* Decodes one UTF-8 sequence of at most n bytes; returns its length, or 0 when it is invalid
 * (overlong, surrogate, above U+10FFFF or truncated). */
static int yaml_utf8(const unsigned char *s, size_t n, uint32_t *cp)
{
    uint32_t c = s[0];
    int k, i;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) k = 2, c &= 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, c &= 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, c &= 0x07;
    else return 0;
    if (n < (size_t)k) return 0;
    for (i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    if ((k == 3 && c < 0x800) || (k == 4 && (c < 0x10000 || c > 0x10FFFF))) return 0;
    if (c >= 0xD800 && c <= 0xDFFF) return 0;
    *cp = c;
    return k;
}

/* Appends code point cp as UTF-8 to the scalar text. */
static int yaml_put_utf8(struct yaml_parser *p, uint32_t cp)
{
    unsigned char u[4];
    size_t k;
    if (cp < 0x80) u[0] = (unsigned char)cp, k = 1;
    else if (cp < 0x800) {
        u[0] = (unsigned char)(0xC0 | (cp >> 6));
        u[1] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xE0 | (cp >> 12));
        u[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        u[0] = (unsigned char)(0xF0 | (cp >> 18));
        u[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    return buf_append(&p->sb, u, k) < 0 ? yaml_oom(p) : 0;
}

/* Appends one byte to the scalar text. 0 ok, -1 out of memory (recorded). */
static int yaml_putc(struct yaml_parser *p, int c)
{
    return buf_putc(&p->sb, c) < 0 ? yaml_oom(p) : 0;
}

/* Appends k line feeds (the folding of k empty lines), or one space when k is 0 and sp. */
static int yaml_put_breaks(struct yaml_parser *p, int k, int sp)
{
    if (k == 0 && sp) return yaml_putc(p, ' ');
    while (k-- > 0)
        if (yaml_putc(p, '\n') < 0) return -1;
    return 0;
}

/* The prepass: copies text into p->s with a BOM removed and CRLF / CR turned into LF,
 * refusing invalid UTF-8 and characters YAML does not allow in a stream (C0 controls other
 * than TAB and LF, DEL, C1 controls other than NEL, U+FFFE, U+FFFF). */
static int yaml_prepare(struct yaml_parser *p, const char *text, size_t len)
{
    const unsigned char *t = (const unsigned char *)text;
    size_t i = 0, n = 0;
    int line = 1, col = 1;
    char *o;
    if (len > III_YAML_MAX_BYTES)
        return yaml_fail(p, 1, 1, "document too large (%lu bytes; the limit is %lu)",
                         (unsigned long)len, (unsigned long)III_YAML_MAX_BYTES);
    o = xmalloc(len + 8); /* never longer than the input: CRLF only shrinks */
    if (!o) return yaml_fail(p, 1, 1, "out of memory");
    if (len >= 3 && t[0] == 0xEF && t[1] == 0xBB && t[2] == 0xBF) i = 3;
    while (i < len) {
        uint32_t cp;
        int k;
        if (t[i] == '\r' || t[i] == '\n') { /* LF, CRLF and a lone CR all end a line */
            i += (t[i] == '\r' && i + 1 < len && t[i + 1] == '\n') ? 2 : 1;
            o[n++] = '\n';
            line++;
            col = 1;
            continue;
        }
        k = yaml_utf8(t + i, len - i, &cp);
        if (k == 0) {
            xfree(o);
            return yaml_fail(p, line, col, "invalid UTF-8 (byte 0x%02X)", (unsigned)t[i]);
        }
        if ((cp < 0x20 && cp != '\t') || (cp >= 0x7F && cp <= 0x9F && cp != 0x85) || cp == 0xFFFE ||
            cp == 0xFFFF) {
            xfree(o);
            return yaml_fail(p, line, col,
                             "character U+%04lX is not allowed (write it as an escape such as "
                             "\\u%04lX inside double quotes)",
                             (unsigned long)cp, (unsigned long)cp);
        }
        memcpy(o + n, t + i, (size_t)k);
        n += (size_t)k;
        i += (size_t)k;
        col++; /* one character, however many bytes */
    }
    memset(o + n, 0, 8); /* the end sentinel, and room for YC(p, k) lookahead */
    p->s = o;
    p->len = n;
    return 0;
}

/* ---- nodes -------------------------------------------------------------------------------- */

/* A new node of the given kind at mark m, or NULL (error recorded) when out of memory. */
static struct yaml_node *yaml_new(struct yaml_parser *p, int kind, const struct yaml_mark *m)
{
    struct yaml_node *n = xmalloc(sizeof *n);
    if (!n) {
        yaml_oom(p);
        return NULL;
    }
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->line = m->line;
    n->col = m->col;
    return n;
}

/* A scalar node at m whose text is the scratch buffer (copied). */
static struct yaml_node *yaml_new_scalar(struct yaml_parser *p, int kind, const struct yaml_mark *m)
{
    struct yaml_node *n = yaml_new(p, kind, m);
    if (!n) return NULL;
    n->str = xmalloc(p->sb.len + 1);
    if (!n->str) {
        xfree(n);
        yaml_oom(p);
        return NULL;
    }
    if (p->sb.len) memcpy(n->str, p->sb.p, p->sb.len);
    n->str[p->sb.len] = 0;
    n->len = p->sb.len;
    return n;
}

/* The null of an empty value (`key:` with nothing after it), placed at m. */
static struct yaml_node *yaml_null_at(struct yaml_parser *p, const struct yaml_mark *m)
{
    p->sb.len = 0;
    return yaml_new_scalar(p, YAML_NULL, m);
}

/* Appends item (with key and its position for a MAP) to collection c. Takes ownership of key
 * and item: on failure both are freed and -1 is returned. */
static int yaml_push(struct yaml_parser *p, struct yaml_node *c, char *key, int kl, int kc,
                     struct yaml_node *item)
{
    if (c->n == c->cap) { /* grow by doubling; the arrays of a MAP grow together */
        size_t cap = c->cap ? c->cap * 2 : 4;
        void *t;
        if (cap > SIZE_MAX / sizeof(struct yaml_node *)) goto oom;
        if (!(t = xrealloc(c->items, cap * sizeof *c->items))) goto oom;
        c->items = t;
        if (c->kind == YAML_MAP) {
            if (!(t = xrealloc(c->keys, cap * sizeof *c->keys))) goto oom;
            c->keys = t;
            if (!(t = xrealloc(c->key_lines, cap * sizeof *c->key_lines))) goto oom;
            c->key_lines = t;
            if (!(t = xrealloc(c->key_cols, cap * sizeof *c->key_cols))) goto oom;
            c->key_cols = t;
        }
        c->cap = cap; /* only once every array has grown */
    }
    c->items[c->n] = item;
    if (c->kind == YAML_MAP) {
        c->keys[c->n] = key;
        c->key_lines[c->n] = kl;
        c->key_cols[c->n] = kc;
    }
    c->n++;
    return 0;
oom:
    xfree(key);
    yaml_free(item);
    return yaml_oom(p);
}

/* Frees a node tree. Recursion is bounded: trees come from yaml_parse, which caps nesting at
 * III_YAML_MAX_DEPTH; the extra guard only stops a runaway on a hand-built cycle. */
static void yaml_free_at(struct yaml_node *n, int depth)
{
    size_t i;
    if (!n) return;
    for (i = 0; i < n->n; i++) {
        if (depth <= III_YAML_MAX_DEPTH + 2) yaml_free_at(n->items[i], depth + 1);
        if (n->keys) xfree(n->keys[i]);
    }
    xfree(n->items);
    xfree(n->keys);
    xfree(n->key_lines);
    xfree(n->key_cols);
    xfree(n->str);
    xfree(n);
}

/* Frees a tree from yaml_parse (NULL is fine). */
static void yaml_free(struct yaml_node *n) { yaml_free_at(n, 0); }

/* Key/value pairs of a MAP sorted by key (bytewise), for canonical output and comparison. */
struct yaml_kv {
    const char *k;             /* the key (borrowed from the MAP) */
    const struct yaml_node *v; /* its value (borrowed) */
    size_t i;                  /* index in the MAP: reports the first of two duplicates */
};

/* qsort order: by key bytes (strcmp compares as unsigned char), then by position. */
static int yaml_kv_cmp(const void *a, const void *b)
{
    const struct yaml_kv *x = a, *y = b;
    int c = strcmp(x->k, y->k);
    if (c) return c;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* A sorted copy of m's pairs (caller frees with xfree), or NULL when out of memory. */
static struct yaml_kv *yaml_sorted(const struct yaml_node *m)
{
    struct yaml_kv *kv;
    size_t i;
    if (m->n > SIZE_MAX / sizeof *kv) return NULL;
    kv = xmalloc((m->n ? m->n : 1) * sizeof *kv);
    if (!kv) return NULL;
    for (i = 0; i < m->n; i++) {
        kv[i].k = m->keys[i];
        kv[i].v = m->items[i];
        kv[i].i = i;
    }
    qsort(kv, m->n, sizeof *kv, yaml_kv_cmp);
    return kv;
}

/* Refuses a MAP with a repeated key, naming the earliest repetition in the text. Small maps
 * are checked pairwise; large ones through a sorted copy, so hostile input stays O(n log n). */
static int yaml_dup_check(struct yaml_parser *p, const struct yaml_node *m)
{
    size_t i, j, first = 0, dup = SIZE_MAX;
    if (m->n < 2) return 0;
    /* Either way the reported pair is (first occurrence, earliest repeat in the text). */
    if (m->n <= 16) {
        for (j = 1; j < m->n && dup == SIZE_MAX; j++)
            for (i = 0; i < j; i++)
                if (!strcmp(m->keys[i], m->keys[j])) {
                    first = i, dup = j;
                    break;
                }
    } else {
        struct yaml_kv *kv = yaml_sorted(m);
        size_t run = 0;
        if (!kv) return yaml_oom(p);
        for (i = 1; i < m->n; i++) {
            if (strcmp(kv[i].k, kv[i - 1].k)) {
                run = i;
                continue;
            }
            if (i == run + 1 && kv[i].i < dup) first = kv[run].i, dup = kv[i].i;
        }
        xfree(kv);
    }
    if (dup == SIZE_MAX) return 0;
    return yaml_fail(p, m->key_lines[dup], m->key_cols[dup],
                     "duplicate key `%s` (first defined at line %d, column %d)", m->keys[dup],
                     m->key_lines[first], m->key_cols[first]);
}

/* ---- lines -------------------------------------------------------------------------------- */

/* Accepts the rest of the line as blanks and an optional comment, then moves past the line
 * break. `what` names the thing just parsed, for the message about anything else found. */
static int yaml_end_line(struct yaml_parser *p, const char *what)
{
    int c;
    yaml_skip_blanks(p);
    c = YC(p, 0);
    if (c == '#') {
        if (p->col != 1 && !yaml_blank((unsigned char)p->s[p->pos - 1]))
            return yaml_fail(p, p->line, p->col, "a comment needs a space before `#`");
        while (YC(p, 0) != '\n' && YC(p, 0) != 0) yaml_adv(p);
        c = YC(p, 0);
    }
    if (c == '\n') {
        yaml_adv(p);
        return 0;
    }
    if (c == 0) return 0;
    return yaml_fail(p, p->line, p->col, "unexpected `%.*s` after %s", yaml_seqlen(c),
                     p->s + p->pos, what);
}

/* From the start of a line, skips blank and comment-only lines. Leaves the cursor on the first
 * character of the next content line with p->indent = its indentation, or p->indent = -1 at
 * the end of the text or at a `---` / `...` marker. A tab used as indentation is an error. */
static int yaml_next_content(struct yaml_parser *p)
{
    for (;;) {
        int sp = 0, c;
        while (YC(p, 0) == ' ') {
            yaml_adv(p);
            sp++;
        }
        if (YC(p, 0) == '\t') {
            struct yaml_mark tab = yaml_here(p);
            yaml_skip_blanks(p);
            c = YC(p, 0);
            if (c != '#' && c != '\n' && c != 0)
                return yaml_fail(p, tab.line, tab.col,
                                 "tab character in indentation (YAML indents with spaces only)");
        }
        if (YC(p, 0) == '#')
            while (YC(p, 0) != '\n' && YC(p, 0) != 0) yaml_adv(p);
        c = YC(p, 0);
        if (c == '\n') {
            yaml_adv(p);
            continue;
        }
        p->indent = (c == 0 || yaml_at_marker(p)) ? -1 : sp;
        return 0;
    }
}

/* ---- scalars ------------------------------------------------------------------------------ */

/* Refuses what cannot start a scalar here, with a message that says why: the YAML features
 * this reader does not implement, block syntax inside a flow collection, and indicators that
 * YAML reserves. 0 when the cursor may start a plain or quoted scalar. */
static int yaml_bad_start(struct yaml_parser *p, int flow)
{
    int c = YC(p, 0), c1 = YC(p, 1);
    int ends = yaml_blankz(c1) || (flow && yaml_flowind(c1)); /* c is a lone indicator */
    const char *m = NULL;
    switch (c) {
    case '&':
        m = "anchors (&) are not supported";
        break;
    case '*':
        m = "aliases (*) are not supported";
        break;
    case '!':
        m = "tags (!) are not supported";
        break;
    case '?':
        if (ends) m = "complex keys (`? `) are not supported";
        break;
    case ':':
        if (ends) m = "a key is missing before `:`";
        break;
    case '-':
        if (flow && yaml_blankz(c1))
            m = "block sequence entries (`- `) cannot be used inside [ ] or { }";
        else if (flow && ends) m = "a lone `-` must be put in quotes inside [ ] or { }";
        break;
    case '|':
    case '>':
        if (flow) m = "block scalars (| and >) cannot be used inside [ ] or { }";
        break;
    case ',':
    case ']':
    case '}':
    case '[':
    case '{':
        if (flow) return yaml_fail(p, p->line, p->col, "unexpected `%c`", c);
        /* fall through */
    case '%':
    case '@':
    case '`':
    case '#':
        return yaml_fail(p, p->line, p->col,
                         "a plain scalar cannot start with `%c` (put the value in quotes)", c);
    default:
        break;
    }
    return m ? yaml_fail(p, p->line, p->col, "%s", m) : 0;
}

/* Resolves a plain scalar's type by the YAML 1.2 core schema. Decimal integers beyond 64 bits
 * become floats (as in most YAML libraries), hex and octal ones too. */
static void yaml_resolve(struct yaml_node *nd)
{
    const char *s = nd->str;
    size_t n = nd->len, k = 0, dig = 0;
    int neg = 0, base = 10, over = 0, dot = 0;
    uint64_t v = 0, lim;
    double d = 0;
    if (n == 0 || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
        !strcmp(s, "NULL")) {
        nd->kind = YAML_NULL;
        return;
    }
    if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "TRUE") || !strcmp(s, "false") ||
        !strcmp(s, "False") || !strcmp(s, "FALSE")) {
        nd->kind = YAML_BOOL;
        nd->b = s[0] == 't' || s[0] == 'T';
        return;
    }
    /* Integers: [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+ (no sign on the last two). The value is
     * accumulated exactly in v (with an overflow check before each step) and, for the float
     * fallback, approximately in d. */
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'o') && n > 2) base = s[1] == 'x' ? 16 : 8, k = 2;
    else if (s[0] == '-' || s[0] == '+') neg = s[0] == '-', k = 1;
    lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX; /* |INT64_MIN| = MAX + 1 */
    for (; k < n; k++) {
        int c = (unsigned char)s[k], x;
        if (c >= '0' && c <= '9') x = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f') x = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F') x = c - 'A' + 10;
        else break;
        if (x >= base) break;
        d = d * base + x;
        if (v > (lim - (uint64_t)x) / (uint64_t)base) over = 1;
        else v = v * (uint64_t)base + (uint64_t)x;
        dig++;
    }
    if (k == n && dig > 0) {
        if (!over) {
            nd->kind = YAML_INT;
            nd->i = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
        } else {
            nd->kind = YAML_FLOAT;
            nd->d = base == 10 ? strtod(s, NULL) : d;
        }
        return;
    }
    /* [-+]? ( \.[0-9]+ | [0-9]+ ( \.[0-9]* )? ) ( [eE][-+]?[0-9]+ )?  and .inf / .nan */
    k = (s[0] == '-' || s[0] == '+');
    if (!strcmp(s + k, ".inf") || !strcmp(s + k, ".Inf") || !strcmp(s + k, ".INF")) {
        nd->kind = YAML_FLOAT;
        nd->d = strtod(s[0] == '-' ? "-inf" : "inf", NULL);
        return;
    }
    if (!strcmp(s, ".nan") || !strcmp(s, ".NaN") || !strcmp(s, ".NAN")) {
        nd->kind = YAML_FLOAT;
        nd->d = strtod("nan", NULL);
        return;
    }
    /* Mantissa: digits with at most one '.', at least one digit; then an optional exponent. */
    for (dig = 0; k < n && ((s[k] >= '0' && s[k] <= '9') || (s[k] == '.' && !dot)); k++) {
        if (s[k] == '.') dot = 1;
        else dig++;
    }
    if (dig == 0) return;
    if (k < n && (s[k] == 'e' || s[k] == 'E')) {
        size_t e0;
        k++;
        if (k < n && (s[k] == '-' || s[k] == '+')) k++;
        for (e0 = k; k < n && s[k] >= '0' && s[k] <= '9'; k++) continue;
        if (k == e0) return;
    }
    if (k != n) return;
    nd->kind = YAML_FLOAT;
    nd->d = strtod(s, NULL); /* the syntax is a subset of strtod's; no locale is ever set */
}

/* Scans a plain scalar into p->sb. Lines after the first continue it when they are indented
 * more than n (block context; n = INT_MAX keeps a key on one line) or, in flow context, when
 * they do not start with an indicator. Line breaks fold: one becomes a space, k empty lines
 * become k LFs. The cursor ends right after the last non-blank character. */
static int yaml_scan_plain(struct yaml_parser *p, int n, int flow)
{
    for (;;) {
        size_t start = p->pos;
        struct yaml_mark end = yaml_here(p);
        int c, sp, breaks = 0;
        /* One line's worth: stop at ": " (a key ends), " #" (a comment) or, in flow context,
         * at , [ ] { }. `end` trails the last non-blank byte: trailing blanks are not content. */
        while ((c = YC(p, 0)) != 0 && c != '\n') {
            if (c == ':' && (yaml_blankz(YC(p, 1)) || (flow && yaml_flowind(YC(p, 1))))) break;
            if (c == '#' && p->pos > start && yaml_blank((unsigned char)p->s[p->pos - 1])) break;
            if (flow && yaml_flowind(c)) break;
            yaml_adv(p);
            if (!yaml_blank(c)) end = yaml_here(p);
        }
        if (buf_append(&p->sb, p->s + start, end.pos - start) < 0) return yaml_oom(p);
        if (c != '\n') {
            yaml_reset(p, &end);
            return 0;
        }
        /* Look past the line break (and empty lines) for a continuation line. */
        yaml_adv(p);
        for (;;) {
            for (sp = 0; YC(p, 0) == ' '; sp++) yaml_adv(p);
            yaml_skip_blanks(p);
            c = YC(p, 0);
            if (c != '\n') break;
            breaks++;
            yaml_adv(p);
        }
        /* Not a continuation: the end, a comment line, a document marker, a line not indented
         * more than the parent (block), or one that starts with an indicator that ends the
         * scalar. The cursor goes back to the end of the text already taken. */
        if (c == 0 || c == '#' || yaml_at_marker(p) || (!flow && sp <= n) ||
            (c == ':' && (yaml_blankz(YC(p, 1)) || (flow && yaml_flowind(YC(p, 1))))) ||
            (flow && yaml_flowind(c))) {
            yaml_reset(p, &end);
            return 0;
        }
        if (yaml_put_breaks(p, breaks, 1) < 0) return -1; /* then scan the next line */
    }
}

/* Folds the line break at the cursor inside a quoted scalar: skips it and any empty lines
 * and the next line's leading blanks, appending a space (none after an escaped break) or one
 * LF per empty line. In block context a continuation line must be indented more than n. */
static int yaml_quoted_fold(struct yaml_parser *p, int n, int flow, const struct yaml_mark *open,
                            int escaped)
{
    int breaks = 0, sp, c, q = (unsigned char)p->s[open->pos];
    yaml_adv(p);
    for (;;) {
        for (sp = 0; YC(p, 0) == ' '; sp++) yaml_adv(p);
        yaml_skip_blanks(p);
        c = YC(p, 0);
        if (c != '\n') break;
        breaks++;
        yaml_adv(p);
    }
    if (c == 0 || yaml_at_marker(p) || (!flow && sp <= n && c != q))
        return yaml_fail(p, open->line, open->col, "unterminated %s scalar",
                         q == '"' ? "double-quoted" : "single-quoted");
    return yaml_put_breaks(p, breaks, !escaped);
}

/* Reads k hex digits at the cursor into *cp. -1 (no message) when a digit is missing. */
static int yaml_hex(struct yaml_parser *p, int k, uint32_t *cp)
{
    uint32_t v = 0;
    while (k-- > 0) {
        int c = YC(p, 0), x;
        if (c >= '0' && c <= '9') x = c - '0';
        else if (c >= 'a' && c <= 'f') x = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') x = c - 'A' + 10;
        else return -1;
        v = (v << 4) | (uint32_t)x;
        yaml_adv(p);
    }
    *cp = v;
    return 0;
}

/* The one-character escapes of YAML 1.2 §5.7 and the code points they stand for. */
static const char yaml_esc_from[] = "0abt\tnvfre \"/\\N_LP";
static const uint32_t yaml_esc_to[] = {0,  7,  8,  9,  9,  10,   11,   12,     13,
                                       27, 32, 34, 47, 92, 0x85, 0xA0, 0x2028, 0x2029};

/* Decodes the escape sequence at the cursor (on the backslash) of a double-quoted scalar:
 * a one-character escape, \xXX, \uXXXX (a UTF-16 surrogate pair as JSON writes it is
 * combined), \UXXXXXXXX, or an escaped line break (the break and the next line's leading
 * blanks vanish). The text is appended to p->sb as UTF-8. */
static int yaml_escape(struct yaml_parser *p, int n, int flow, const struct yaml_mark *open)
{
    struct yaml_mark at = yaml_here(p);
    uint32_t cp = 0, lo;
    int e, digits = 0;
    const char *q;
    yaml_adv(p);
    e = YC(p, 0);
    if (e == 0) return yaml_fail(p, open->line, open->col, "unterminated double-quoted scalar");
    if (e == '\n') return yaml_quoted_fold(p, n, flow, open, 1);
    if ((q = strchr(yaml_esc_from, e)) != NULL) cp = yaml_esc_to[q - yaml_esc_from];
    else if (e == 'x' || e == 'u' || e == 'U') digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
    else
        return yaml_fail(p, at.line, at.col, "unknown escape `\\%.*s` in a double-quoted scalar",
                         yaml_seqlen(e), p->s + p->pos);
    yaml_adv(p);
    if (digits) {
        if (yaml_hex(p, digits, &cp) < 0)
            return yaml_fail(p, at.line, at.col, "`\\%c` must be followed by %d hex digits", e,
                             digits);
        if (e == 'u' && cp >= 0xD800 && cp <= 0xDBFF) { /* UTF-16 pair, as JSON writes it */
            if (YC(p, 0) != '\\' || YC(p, 1) != 'u')
                return yaml_fail(p, at.line, at.col, "unpaired UTF-16 surrogate `\\u%04lX`",
                                 (unsigned long)cp);
            yaml_adv(p);
            yaml_adv(p);
            if (yaml_hex(p, 4, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                return yaml_fail(p, at.line, at.col, "unpaired UTF-16 surrogate `\\u%04lX`",
                                 (unsigned long)cp);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
            return yaml_fail(p, at.line, at.col, "`\\%c` escape of an invalid code point", e);
        }
    }
    return yaml_put_utf8(p, cp);
}

/* Scans a single- or double-quoted scalar into p->sb (decoded). Sets *multiline when the
 * scalar spans lines. n is the parent's indentation (block context). */
static int yaml_scan_quoted(struct yaml_parser *p, int n, int flow, int *multiline)
{
    struct yaml_mark open = yaml_here(p);
    int q = YC(p, 0);
    size_t ws = SIZE_MAX; /* start of literal blanks not yet copied: dropped before a break */
    yaml_adv(p);
    for (;;) {
        int c = YC(p, 0);
        if (c == 0)
            return yaml_fail(p, open.line, open.col, "unterminated %s scalar",
                             q == '"' ? "double-quoted" : "single-quoted");
        if (yaml_blank(c)) {
            if (ws == SIZE_MAX) ws = p->pos;
            yaml_adv(p);
            continue;
        }
        if (c == '\n') {
            ws = SIZE_MAX;
            *multiline = 1;
            if (yaml_quoted_fold(p, n, flow, &open, 0) < 0) return -1;
            continue;
        }
        if (ws != SIZE_MAX) {
            if (buf_append(&p->sb, p->s + ws, p->pos - ws) < 0) return yaml_oom(p);
            ws = SIZE_MAX;
        }
        if (c == q) {
            yaml_adv(p);
            if (q == '"' || YC(p, 0) != '\'') return 0;
            yaml_adv(p); /* '' is an escaped ' */
            if (yaml_putc(p, '\'') < 0) return -1;
            continue;
        }
        if (q == '"' && c == '\\') {
            if (yaml_escape(p, n, flow, &open) < 0) return -1;
            continue;
        }
        if (yaml_putc(p, c) < 0) return -1;
        yaml_adv(p);
    }
}

/* A scalar node (quoted, or plain with its type resolved) at the cursor. */
static struct yaml_node *yaml_scalar(struct yaml_parser *p, int n, int flow)
{
    struct yaml_mark at = yaml_here(p);
    struct yaml_node *nd;
    int c = YC(p, 0), ml = 0;
    p->sb.len = 0;
    if (c == '"' || c == '\'') {
        if (yaml_scan_quoted(p, n, flow, &ml) < 0) return NULL;
        return yaml_new_scalar(p, YAML_STR, &at);
    }
    if (yaml_scan_plain(p, n, flow) < 0) return NULL;
    nd = yaml_new_scalar(p, YAML_STR, &at);
    if (nd) yaml_resolve(nd);
    return nd;
}

/* Scans a mapping key (one line, plain or quoted) and returns it as a new string. */
static char *yaml_scan_key(struct yaml_parser *p, int flow)
{
    struct yaml_mark at = yaml_here(p);
    int c = YC(p, 0), ml = 0;
    char *k;
    p->sb.len = 0;
    /* An implicit key is one line in block context (YAML 1.2 §7.4.2); flow allows more. */
    if (c == '"' || c == '\'') {
        if (yaml_scan_quoted(p, -1, flow, &ml) < 0) return NULL;
        if (ml && !flow) {
            yaml_fail(p, at.line, at.col, "a mapping key must be on a single line");
            return NULL;
        }
    } else if (yaml_scan_plain(p, flow ? -1 : INT_MAX, flow) < 0) {
        return NULL;
    }
    /* Keys are C strings (and JSON object names downstream): an escaped NUL cannot be one. */
    if (p->sb.len && memchr(p->sb.p, 0, p->sb.len)) {
        yaml_fail(p, at.line, at.col, "a NUL character in a mapping key is not supported");
        return NULL;
    }
    k = xmalloc(p->sb.len + 1);
    if (!k) {
        yaml_oom(p);
        return NULL;
    }
    if (p->sb.len) memcpy(k, p->sb.p, p->sb.len);
    k[p->sb.len] = 0;
    return k;
}

/* 1 when the cursor starts `key:` (an implicit key on this line followed by `: `). Looks
 * ahead without consuming anything and without reporting errors: the real parse does that. */
static int yaml_key_ahead(struct yaml_parser *p)
{
    struct yaml_mark m = yaml_here(p);
    int q = YC(p, 0), c, r = 0;
    if (q == '"' || q == '\'') { /* skip to the closing quote; a key never spans lines */
        yaml_adv(p);
        for (;;) {
            c = YC(p, 0);
            if (c == 0 || c == '\n') goto out;
            yaml_adv(p);
            if (q == '"' && c == '\\' && YC(p, 0) != '\n') yaml_adv(p);
            else if (c == q && !(q == '\'' && YC(p, 0) == '\'')) break;
            else if (c == q) yaml_adv(p);
        }
    } else { /* the same stops as yaml_scan_plain in block context */
        int prev = ' ';
        while ((c = YC(p, 0)) != 0 && c != '\n') {
            if (c == ':' && yaml_blankz(YC(p, 1))) break;
            if (c == '#' && yaml_blank(prev)) break;
            prev = c;
            yaml_adv(p);
        }
    }
    yaml_skip_blanks(p);
    r = YC(p, 0) == ':' && yaml_blankz(YC(p, 1));
out:
    yaml_reset(p, &m);
    return r;
}

/* A | or > block scalar; the cursor is on the indicator, n is the parent's indentation.
 * Follows YAML 1.2 §8.1: content indentation from the indicator digit or the first non-empty
 * line, folding of "normal" lines for >, and strip (-), clip or keep (+) of trailing breaks. */
static struct yaml_node *yaml_block_scalar(struct yaml_parser *p, int n)
{
    struct yaml_mark at = yaml_here(p);
    int folded = YC(p, 0) == '>', chomp = 0, incr = 0, ind, c;
    int leading_break = 0, leading_blank = 0, breaks = 0;
    p->sb.len = 0;
    yaml_adv(p);
    for (;;) { /* header: chomping and indentation indicators, in either order */
        c = YC(p, 0);
        if ((c == '-' || c == '+') && !chomp) chomp = c == '-' ? -1 : 1;
        else if (c >= '1' && c <= '9' && !incr) incr = c - '0';
        else if (c == '0')
            return yaml_fail(p, p->line, p->col, "the indentation indicator must be 1 to 9"), NULL;
        else break;
        yaml_adv(p);
    }
    if (yaml_end_line(p, "the block scalar indicator") < 0) return NULL;
    /* Content indentation: the parent's plus the indicator digit, else detected; never less
     * than one more than the parent (as libyaml does). */
    if (incr) {
        ind = (n >= 0 ? n : 0) + incr;
    } else { /* the most-indented of the leading empty lines and the first content line */
        struct yaml_mark m = yaml_here(p);
        int sp;
        ind = 0;
        for (;;) {
            for (sp = 0; YC(p, sp) == ' '; sp++) continue;
            if (sp > ind) ind = sp;
            if (YC(p, sp) != '\n') break;
            p->pos += (size_t)sp;
            yaml_adv(p);
        }
        yaml_reset(p, &m);
        if (ind < n + 1) ind = n + 1;
        if (ind < 1) ind = 1;
    }
    /* One line per turn (libyaml's algorithm): `breaks` counts empty lines since the last
     * content line, leading_break says that content line ended in a line break. Folding joins
     * two "normal" lines (neither starts with a blank) with a space, unless empty lines sat
     * between them, which then stand for themselves. */
    for (;;) {
        struct yaml_mark line = yaml_here(p);
        int sp = 0, trailing_blank;
        while (sp < ind && YC(p, 0) == ' ') {
            yaml_adv(p);
            sp++;
        }
        c = YC(p, 0);
        if (c == '\n') { /* an empty line */
            breaks++;
            yaml_adv(p);
            continue;
        }
        if (c == 0) break;
        if (sp < ind) { /* a less-indented line ends the scalar */
            yaml_reset(p, &line);
            break;
        }
        trailing_blank = yaml_blank(c);
        if (folded && leading_break && !leading_blank && !trailing_blank) {
            if (breaks == 0 && yaml_putc(p, ' ') < 0) return NULL;
            leading_break = 0;
        }
        if (leading_break && yaml_putc(p, '\n') < 0) return NULL;
        if (yaml_put_breaks(p, breaks, 0) < 0) return NULL;
        breaks = 0;
        leading_blank = trailing_blank;
        {
            size_t s0 = p->pos;
            while (YC(p, 0) != '\n' && YC(p, 0) != 0) yaml_adv(p);
            if (buf_append(&p->sb, p->s + s0, p->pos - s0) < 0) return yaml_oom(p), NULL;
        }
        leading_break = YC(p, 0) == '\n';
        if (!leading_break) break;
        yaml_adv(p);
    }
    /* Chomping: strip drops the final break, clip keeps it, keep also keeps the empty lines. */
    if (chomp != -1 && leading_break && yaml_putc(p, '\n') < 0) return NULL;
    if (chomp == 1 && yaml_put_breaks(p, breaks, 0) < 0) return NULL;
    if (yaml_next_content(p) < 0) return NULL;
    return yaml_new_scalar(p, YAML_STR, &at);
}

/* ---- flow collections --------------------------------------------------------------------- */

/* Skips blanks, line breaks and comments inside the flow collection opened at `open`. The end
 * of the text or a document marker means the collection was never closed. */
static int yaml_flow_ws(struct yaml_parser *p, const struct yaml_mark *open)
{
    int sp = 0; /* a blank or a line start precedes the cursor */
    for (;;) {
        int c = YC(p, 0);
        if (yaml_blank(c) || c == '\n') {
            yaml_adv(p);
            sp = 1;
            if (c == '\n' && yaml_at_marker(p)) c = 0;
            else continue;
        }
        if (c == '#') { /* a comment: `#` after a blank or at a line start, to the line end */
            if (!sp) return yaml_fail(p, p->line, p->col, "a comment needs a space before `#`");
            while (YC(p, 0) != '\n' && YC(p, 0) != 0) yaml_adv(p);
            continue;
        }
        if (c == 0) {
            int br = p->s[open->pos];
            return yaml_fail(p, open->line, open->col,
                             "unterminated flow %s (`%c` has no matching `%c`)",
                             br == '[' ? "sequence" : "mapping", br, br == '[' ? ']' : '}');
        }
        return 0;
    }
}

/* One `key: value`, `key:` or `key` entry of the flow mapping m opened at `open`. */
static int yaml_flow_pair(struct yaml_parser *p, struct yaml_node *m, const struct yaml_mark *open)
{
    struct yaml_mark kat = yaml_here(p), vat;
    struct yaml_node *v;
    char *key;
    int c = YC(p, 0);
    if (c == '[' || c == '{')
        return yaml_fail(p, p->line, p->col,
                         "flow collections cannot be used as mapping keys (complex keys are not "
                         "supported)");
    if (yaml_bad_start(p, 1) < 0) return -1;
    if (!(key = yaml_scan_key(p, 1))) return -1;
    /* The key may be followed by `:` (possibly on a later line, as YAML allows in flow, and
     * right after a quoted key as in JSON), or directly by `,` / `}`: then its value is null. */
    if (yaml_flow_ws(p, open) < 0) goto fail;
    c = YC(p, 0);
    vat = kat;
    if (c == ':') {
        yaml_adv(p);
        vat = yaml_here(p);
        if (yaml_flow_ws(p, open) < 0) goto fail;
        c = YC(p, 0);
    } else if (c != ',' && c != '}') {
        yaml_fail(p, p->line, p->col,
                  "expected `:`, `,` or `}` after the key `%s` in the flow "
                  "mapping opened at line %d, column %d",
                  key, open->line, open->col);
        goto fail;
    }
    v = (c == ',' || c == '}') ? yaml_null_at(p, &vat) : yaml_flow_node(p);
    if (!v) goto fail;
    return yaml_push(p, m, key, kat.line, kat.col, v);
fail:
    xfree(key);
    return -1;
}

/* A [..] or {..} collection; the cursor is on the bracket. */
static struct yaml_node *yaml_flow_coll(struct yaml_parser *p)
{
    struct yaml_mark open = yaml_here(p);
    int map = YC(p, 0) == '{', close = map ? '}' : ']', c;
    const char *what = map ? "mapping" : "sequence";
    struct yaml_node *nd, *item;
    if (p->depth >= III_YAML_MAX_DEPTH)
        return yaml_fail(p, open.line, open.col, "nesting is too deep (the limit is %d levels)",
                         III_YAML_MAX_DEPTH),
               NULL;
    if (!(nd = yaml_new(p, map ? YAML_MAP : YAML_SEQ, &open))) return NULL;
    p->depth++;
    yaml_adv(p);
    /* entry := (close | entry-content (',' | close)); a trailing ',' before close is allowed. */
    for (;;) {
        if (yaml_flow_ws(p, &open) < 0) goto fail;
        c = YC(p, 0);
        if (c == close) break;
        if (c == ',') {
            yaml_fail(p, p->line, p->col, "empty entry in a flow %s (a `,` with nothing before it)",
                      what);
            goto fail;
        }
        if (map) {
            if (yaml_flow_pair(p, nd, &open) < 0) goto fail;
        } else {
            if (!(item = yaml_flow_node(p)) || yaml_push(p, nd, NULL, 0, 0, item) < 0) goto fail;
        }
        if (yaml_flow_ws(p, &open) < 0) goto fail;
        c = YC(p, 0);
        if (c == ',') {
            yaml_adv(p);
            continue;
        }
        if (c == close) break;
        /* YAML's single-pair `[a: 1]` is refused: it is rare and easily a missing `]`. */
        if (!map && c == ':')
            yaml_fail(p, p->line, p->col,
                      "`key: value` inside [ ] is not supported (use { } "
                      "for a mapping, or is a `]` missing?)");
        else
            yaml_fail(p, p->line, p->col,
                      "expected `,` or `%c` in the flow %s opened at line %d, column %d", close,
                      what, open.line, open.col);
        goto fail;
    }
    yaml_adv(p); /* the closing bracket */
    p->depth--;
    if (map && yaml_dup_check(p, nd) < 0) {
        yaml_free(nd);
        return NULL;
    }
    return nd;
fail:
    p->depth--;
    yaml_free(nd);
    return NULL;
}

/* Any node inside a flow collection. */
static struct yaml_node *yaml_flow_node(struct yaml_parser *p)
{
    int c = YC(p, 0);
    if (c == '[' || c == '{') return yaml_flow_coll(p);
    if (yaml_bad_start(p, 1) < 0) return NULL;
    return yaml_scalar(p, -1, 1);
}

/* ---- block collections -------------------------------------------------------------------- */

/* A block mapping whose keys sit at indentation m; the cursor is on the first key. */
static struct yaml_node *yaml_block_map(struct yaml_parser *p, int m)
{
    struct yaml_mark at = yaml_here(p);
    struct yaml_node *nd, *v;
    if (p->depth >= III_YAML_MAX_DEPTH)
        return yaml_fail(p, at.line, at.col, "nesting is too deep (the limit is %d levels)",
                         III_YAML_MAX_DEPTH),
               NULL;
    if (!(nd = yaml_new(p, YAML_MAP, &at))) return NULL;
    p->depth++;
    /* Invariant at the top of the loop: the cursor is on the first character of a line
     * indented exactly m. Each turn reads `key:` and a value, which leaves the cursor on the
     * next content line; a less-indented line (or the end) closes the mapping. */
    for (;;) {
        struct yaml_mark kat = yaml_here(p);
        int c = YC(p, 0);
        char *key;
        if (c == '-' && yaml_blankz(YC(p, 1))) {
            yaml_fail(p, kat.line, kat.col,
                      "a sequence entry `- ` cannot appear among the keys "
                      "of a mapping (check the indentation)");
            goto fail;
        }
        if (c == '[' || c == '{' || c == '|' || c == '>') {
            yaml_fail(p, kat.line, kat.col, "expected a mapping key, found `%c` (%s)", c,
                      c == '[' || c == '{' ? "complex keys are not supported"
                                           : "a block scalar goes after its key's `:`, or on "
                                             "the next line indented more than the key");
            goto fail;
        }
        if (yaml_bad_start(p, 0) < 0 || !(key = yaml_scan_key(p, 0))) goto fail;
        yaml_skip_blanks(p); /* `key :` is allowed, `key:value` is a plain scalar */
        if (YC(p, 0) != ':' || !yaml_blankz(YC(p, 1))) {
            yaml_fail(p, kat.line, kat.col, "expected `:` after the key `%s`", key);
            xfree(key);
            goto fail;
        }
        yaml_adv(p); /* the ':' */
        if (!(v = yaml_block_node(p, m, YM_SAME))) {
            xfree(key);
            goto fail;
        }
        if (yaml_push(p, nd, key, kat.line, kat.col, v) < 0) goto fail;
        if (p->indent < m) break;
        if (p->indent > m) {
            yaml_fail(p, p->line, p->col,
                      "bad indentation (this line starts at column %d, but "
                      "the keys of its mapping are at column %d)",
                      p->col, m + 1);
            goto fail;
        }
    }
    p->depth--;
    if (yaml_dup_check(p, nd) < 0) { /* checked once complete: the first repeat is reported */
        yaml_free(nd);
        return NULL;
    }
    return nd;
fail:
    p->depth--;
    yaml_free(nd);
    return NULL;
}

/* A block sequence whose `- ` sit at indentation m; the cursor is on the first `-`. An
 * indentless sequence (the value of a key at the same indentation) ends at the next key. */
static struct yaml_node *yaml_block_seq(struct yaml_parser *p, int m, int indentless)
{
    struct yaml_mark at = yaml_here(p);
    struct yaml_node *nd, *item;
    if (p->depth >= III_YAML_MAX_DEPTH)
        return yaml_fail(p, at.line, at.col, "nesting is too deep (the limit is %d levels)",
                         III_YAML_MAX_DEPTH),
               NULL;
    /* The same depth cap as flow collections: block nesting recurses just the same. */
    if (!(nd = yaml_new(p, YAML_SEQ, &at))) return NULL;
    p->depth++;
    /* Invariant: the cursor is on a `-` indented m. The entry's node may share the line
     * (YM_COMPACT: `- a: 1` opens a mapping at the column of `a`) or start below it. */
    for (;;) {
        yaml_adv(p); /* the '-' */
        if (!(item = yaml_block_node(p, m, YM_COMPACT))) goto fail;
        if (yaml_push(p, nd, NULL, 0, 0, item) < 0) goto fail;
        if (p->indent == m && YC(p, 0) == '-' && yaml_blankz(YC(p, 1))) continue;
        /* An indentless sequence (`key:` then `- x` at the key's column) ends at the next
         * key; any other sequence must not be followed by a non-entry at its own column. */
        if (p->indent < m || (p->indent == m && indentless)) break;
        if (p->indent == m)
            yaml_fail(p, p->line, p->col,
                      "expected `- ` (the entries of this sequence are at column %d)", m + 1);
        else
            yaml_fail(p, p->line, p->col,
                      "bad indentation (this line starts at column %d, but "
                      "the entries of its sequence are at column %d)",
                      p->col, m + 1);
        goto fail;
    }
    p->depth--;
    return nd;
fail:
    p->depth--;
    yaml_free(nd);
    return NULL;
}

/* A block node whose first character is at the cursor. n is the parent's indentation (-1 for
 * the document); mode says whether the node shares its line with a parent key (YM_SAME), with
 * a `- ` (YM_COMPACT), or starts its own line (YM_NEXT). */
static struct yaml_node *yaml_block_content(struct yaml_parser *p, int n, int mode)
{
    int c = YC(p, 0), ind = p->col - 1;
    struct yaml_node *nd;
    /* The first character decides: `- ` a sequence, | or > a block scalar, [ or { a flow
     * collection, `key:` a mapping (not on a key's own line), anything else a scalar. */
    if (c == '-' && yaml_blankz(YC(p, 1))) {
        if (mode == YM_SAME)
            return yaml_fail(p, p->line, p->col,
                             "a block sequence cannot start on the same "
                             "line as its key (start it on the next line)"),
                   NULL;
        return yaml_block_seq(p, ind, ind == n);
    }
    if (c == '|' || c == '>') return yaml_block_scalar(p, n);
    if (c == '[' || c == '{') {
        if (!(nd = yaml_flow_coll(p))) return NULL;
        yaml_skip_blanks(p);
        if (YC(p, 0) == ':') {
            yaml_free(nd);
            return yaml_fail(p, p->line, p->col,
                             "flow collections cannot be used as mapping "
                             "keys (complex keys are not supported)"),
                   NULL;
        }
    } else {
        if (yaml_bad_start(p, 0) < 0) return NULL;
        if (mode != YM_SAME && yaml_key_ahead(p)) return yaml_block_map(p, ind);
        if (!(nd = yaml_scalar(p, n, 0))) return NULL;
        yaml_skip_blanks(p);
        /* `a: b: c`, or a multi-line scalar that ends in `:`: YAML has no reading of it. */
        if (YC(p, 0) == ':' && yaml_blankz(YC(p, 1))) {
            yaml_free(nd);
            return yaml_fail(p, p->line, p->col,
                             "a mapping cannot start here (a nested mapping "
                             "goes on its own line, indented under its key)"),
                   NULL;
        }
    }
    /* Only a comment may follow on the line; then move to the next content line. */
    if (yaml_end_line(p, c == '[' || c == '{' ? "a flow collection" : "a scalar") < 0 ||
        yaml_next_content(p) < 0) {
        yaml_free(nd);
        return NULL;
    }
    return nd;
}

/* A block node after a key's `:` (YM_SAME) or a `- ` (YM_COMPACT), or at a line start
 * (YM_NEXT). When nothing follows on the line the node is on the next, more indented line
 * (or is a sequence indented like its key), else it is an empty value: null. */
static struct yaml_node *yaml_block_node(struct yaml_parser *p, int n, int mode)
{
    if (mode != YM_NEXT) {
        struct yaml_mark at = yaml_here(p);
        int sp = yaml_skip_blanks(p), c = YC(p, 0);
        if (c == '\n' || c == 0 || (c == '#' && sp)) {
            if (yaml_end_line(p, "") < 0 || yaml_next_content(p) < 0) return NULL;
            /* The value continues below when more indented than the parent; a map value may
             * also be a sequence at the key's own column (YAML's "indentless" sequence). */
            if (p->indent <= n && !(p->indent == n && mode == YM_SAME && n >= 0 &&
                                    YC(p, 0) == '-' && yaml_blankz(YC(p, 1))))
                return yaml_null_at(p, &at);
            mode = YM_NEXT;
        }
    }
    return yaml_block_content(p, n, mode);
}

/* The whole stream: directives, an optional `---`, one root node, an optional `...`. */
static struct yaml_node *yaml_document(struct yaml_parser *p)
{
    struct yaml_mark start = yaml_here(p);
    struct yaml_node *root;
    int dir = 0;
    if (yaml_next_content(p) < 0) return NULL;
    /* %YAML is accepted and ignored (this is YAML 1.2 either way); %TAG would need tags. */
    while (p->indent == 0 && YC(p, 0) == '%') {
        if (strncmp(p->s + p->pos, "%TAG", 4) == 0)
            return yaml_fail(p, p->line, p->col, "tags (%%TAG) are not supported"), NULL;
        if (strncmp(p->s + p->pos, "%YAML", 5) != 0 || !yaml_blank(YC(p, 5)))
            return yaml_fail(p, p->line, p->col, "directives other than %%YAML are not supported"),
                   NULL;
        while (YC(p, 0) != '\n' && YC(p, 0) != 0) yaml_adv(p);
        if (yaml_end_line(p, "") < 0 || yaml_next_content(p) < 0) return NULL;
        dir = 1;
    }
    /* The root: after `---` (which may have a scalar or flow node on its own line), or the
     * first content line, or nothing at all (an empty document is null). */
    if (p->indent < 0 && YC(p, 0) == '-') {
        yaml_adv(p);
        yaml_adv(p);
        yaml_adv(p);
        root = yaml_block_node(p, -1, YM_SAME);
    } else if (dir) {
        return yaml_fail(p, p->line, p->col, "expected `---` after the %%YAML directive"), NULL;
    } else if (p->indent >= 0) {
        root = yaml_block_content(p, -1, YM_NEXT);
    } else {
        root = yaml_null_at(p, &start);
    }
    if (!root) return NULL;
    if (p->indent < 0 && YC(p, 0) == '.') { /* `...`: only comments may follow */
        yaml_adv(p);
        yaml_adv(p);
        yaml_adv(p);
        if (yaml_end_line(p, "`...`") < 0 || yaml_next_content(p) < 0) goto fail;
        if (p->indent >= 0) {
            yaml_fail(p, p->line, p->col, "unexpected content after the document end `...`");
            goto fail;
        }
    }
    /* What may not follow the root: another document, a stray `...`, less-indented content. */
    if (p->indent < 0 && YC(p, 0) == '-') {
        yaml_fail(p, p->line, p->col,
                  "multi-document streams are not supported (a second document starts here)");
        goto fail;
    }
    if (p->indent < 0 && YC(p, 0) == '.') {
        yaml_fail(p, p->line, p->col, "unexpected `...`");
        goto fail;
    }
    if (p->indent >= 0) {
        yaml_fail(p, p->line, p->col,
                  "bad indentation (this line starts at column %d, but the "
                  "document's top level is at column %d)",
                  p->col, root->col);
        goto fail;
    }
    return root;
fail:
    yaml_free(root);
    return NULL;
}

/* Parses text[0..len) (any bytes; need not be NUL-terminated). Returns the root node, owned by
 * the caller (yaml_free), or NULL with err = "FILE:LINE:COL: message". An empty document (or
 * one with only comments) yields a YAML_NULL node. file names the text in messages. */
static struct yaml_node *yaml_parse(const char *text, size_t len, const char *file, char *err,
                                    size_t errlen)
{
    struct yaml_parser p;
    struct yaml_node *root = NULL;
    memset(&p, 0, sizeof p);
    p.file = file ? file : "<yaml>";
    p.err = err;
    p.errlen = errlen;
    p.line = p.col = 1;
    if (err && errlen) err[0] = 0;
    if (yaml_prepare(&p, text, len) == 0) root = yaml_document(&p);
    buf_free(&p.sb);
    xfree((void *)p.s);
    return root;
}

/* The value of key in a MAP, or NULL when map is not a MAP or has no such key. */
static const struct yaml_node *yaml_get(const struct yaml_node *map, const char *key)
{
    size_t i;
    if (!map || map->kind != YAML_MAP) return NULL;
    for (i = 0; i < map->n; i++)
        if (!strcmp(map->keys[i], key)) return map->items[i];
    return NULL;
}

/* Appends v in decimal (portable: no PRId64). */
static int yaml_put_i64(struct buf *out, int64_t v)
{
    char t[24];
    size_t k = sizeof t;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        t[--k] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) t[--k] = '-';
    return buf_append(out, t + k, sizeof t - k);
}

/* Appends a double as the shortest digits that read back to the same value, laid out like
 * JavaScript's Number#toString (fixed notation for 1e-6 <= |d| < 1e21, else d.ddde+N), plus
 * ".0" on a whole number so that a float stays a float (1.0 vs 1). JSON has no inf / nan:
 * they become null. Deterministic, so equal values print equal text. */
static int yaml_put_double(struct buf *out, double d)
{
    char e[40], dig[24], t[64];
    int prec, k = 0, x, i, m = 0;
    const char *q;
    if (!(d - d == 0.0)) return buf_append(out, "null", 4);
    /* The fewest significant digits (1..17) that read back exactly: %.16e always does. */
    for (prec = 0; prec < 16; prec++) { /* %.{prec}e: 1 + prec significant digits */
        snprintf(e, sizeof e, "%.*e", prec, d);
        if (strtod(e, NULL) == d) break;
    }
    snprintf(e, sizeof e, "%.*e", prec, d);
    for (q = e; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9') dig[k++] = *q;
    x = atoi(q + 1) + 1; /* d = 0.DIGITS x 10^x */
    /* Lay the digits out: whole number, decimal point inside, leading "0.000", or exponent. */
    while (k > 1 && dig[k - 1] == '0') k--;
    dig[k] = 0;
    if (e[0] == '-') t[m++] = '-';
    if (dig[0] == '0') { /* zero */
        t[m++] = '0';
    } else if (x >= k && x <= 21) {
        for (i = 0; i < x; i++) t[m++] = i < k ? dig[i] : '0';
    } else if (x > 0 && x <= 21) {
        for (i = 0; i < k; i++) {
            if (i == x) t[m++] = '.';
            t[m++] = dig[i];
        }
    } else if (x > -6 && x <= 0) {
        t[m++] = '0';
        t[m++] = '.';
        for (i = 0; i < -x; i++) t[m++] = '0';
        for (i = 0; i < k; i++) t[m++] = dig[i];
    } else {
        t[m++] = dig[0];
        if (k > 1) t[m++] = '.';
        for (i = 1; i < k; i++) t[m++] = dig[i];
        m += snprintf(t + m, sizeof t - (size_t)m, "e%c%d", x - 1 < 0 ? '-' : '+',
                      x - 1 < 0 ? 1 - x : x - 1);
    }
    t[m] = 0;
    if (!strpbrk(t, ".e")) {
        t[m++] = '.';
        t[m++] = '0';
    }
    return buf_append(out, t, (size_t)m);
}

/* yaml_to_json below one level of nesting. depth guards a hand-built tree; parsed trees are
 * never deeper than III_YAML_MAX_DEPTH. A NULL node prints as null. */
static int yaml_json_at(const struct yaml_node *n, struct buf *out, int depth)
{
    size_t i;
    if (depth > III_YAML_MAX_DEPTH + 2) return -1;
    if (!n) return buf_append(out, "null", 4);
    switch (n->kind) {
    case YAML_BOOL:
        return n->b ? buf_append(out, "true", 4) : buf_append(out, "false", 5);
    case YAML_INT:
        return yaml_put_i64(out, n->i);
    case YAML_FLOAT:
        return yaml_put_double(out, n->d);
    case YAML_STR:
        return json_put_str(out, n->str, n->len);
    case YAML_SEQ:
        if (buf_putc(out, '[') < 0) return -1;
        for (i = 0; i < n->n; i++)
            if ((i && buf_putc(out, ',') < 0) || yaml_json_at(n->items[i], out, depth + 1) < 0)
                return -1;
        return buf_putc(out, ']');
    case YAML_MAP: { /* keys in sorted order: the point of "canonical" */
        struct yaml_kv *kv = yaml_sorted(n);
        int rc = kv ? buf_putc(out, '{') : -1;
        for (i = 0; rc == 0 && i < n->n; i++)
            if ((i && buf_putc(out, ',') < 0) || json_put_str(out, kv[i].k, strlen(kv[i].k)) < 0 ||
                buf_putc(out, ':') < 0 || yaml_json_at(kv[i].v, out, depth + 1) < 0)
                rc = -1;
        xfree(kv);
        return rc < 0 ? -1 : buf_putc(out, '}');
    }
    default:
        return buf_append(out, "null", 4);
    }
}

/* Appends n as canonical JSON: no spaces, map keys sorted bytewise, numbers normalized, so
 * that equal configs give equal strings. 0 ok, -1 out of memory. */
static int yaml_to_json(const struct yaml_node *n, struct buf *out)
{
    return yaml_json_at(n, out, 0);
}

/* yaml_equal below one level of nesting (depth capped as in yaml_json_at). Equality follows
 * the canonical JSON text: two trees are equal exactly when yaml_to_json prints them alike. */
static int yaml_equal_at(const struct yaml_node *a, const struct yaml_node *b, int depth)
{
    size_t i, j;
    int ka = a ? a->kind : YAML_NULL, kb = b ? b->kind : YAML_NULL;
    if (depth > III_YAML_MAX_DEPTH + 2 || ka != kb) return 0;
    if (a == b || ka == YAML_NULL) return 1;
    switch (ka) {
    case YAML_BOOL:
        return a->b == b->b;
    case YAML_INT:
        return a->i == b->i;
    case YAML_FLOAT: /* as their JSON: nan == nan (both null), -0.0 != 0.0 */
        if (a->d != a->d || b->d != b->d) return a->d != a->d && b->d != b->d;
        return a->d == b->d && (a->d != 0 || memcmp(&a->d, &b->d, sizeof a->d) == 0);
    case YAML_STR:
        return a->len == b->len && (a->len == 0 || !memcmp(a->str, b->str, a->len));
    case YAML_SEQ:
        if (a->n != b->n) return 0;
        for (i = 0; i < a->n; i++)
            if (!yaml_equal_at(a->items[i], b->items[i], depth + 1)) return 0;
        return 1;
    case YAML_MAP: {
        struct yaml_kv *x = NULL, *y = NULL;
        int eq = 1;
        if (a->n != b->n) return 0;
        if (a->n > 16 && (x = yaml_sorted(a)) && (y = yaml_sorted(b))) {
            for (i = 0; eq && i < a->n; i++)
                eq = !strcmp(x[i].k, y[i].k) && yaml_equal_at(x[i].v, y[i].v, depth + 1);
        } else { /* small, or no memory for the sorted copies: pairwise (keys are unique) */
            for (i = 0; eq && i < a->n; i++) {
                for (j = 0; j < b->n && strcmp(a->keys[i], b->keys[j]); j++) continue;
                eq = j < b->n && yaml_equal_at(a->items[i], b->items[j], depth + 1);
            }
        }
        xfree(x);
        xfree(y);
        return eq;
    }
    default:
        return 0;
    }
}

/* 1 when a and b are structurally equal (map key order ignored, INT 1 != FLOAT 1.0, a NULL
 * pointer equals a null node), else 0. Positions are not compared. */
static int yaml_equal(const struct yaml_node *a, const struct yaml_node *b)
{
    return yaml_equal_at(a, b, 0);
}

/* ==== Config ================================================================================
 * config.yaml → struct cfg, in three steps that each fail with a message naming the file (and
 * line:column where there is one): cfg_expand splices ${VAR} / ${VAR:default} into the raw
 * text (§8.3), yaml_parse reads it, and the checks below validate the schema.
 * Top level: registration_namespace_grace_ms, workers, modules (entries appended after
 * workers); anything else is refused. Each entry has a `name`; duplicates get instance ids
 * name#1, name#2 in order. A built-in name (cfg_builtins) runs inside the engine and takes only
 * `config`; `iii-worker-manager`'s config holds the listener settings (tests/CONTRACT.md), each
 * type-checked, unknown ones refused. Every other entry is a process the engine supervises and
 * must say how to start it with `command` (docs/§10 item 3). As in the reference engine
 * (§11.22), unknown keys in an entry are ignored; a misspelt `command` still fails
 * because `command` is then missing.
 * Strings in struct cfg are owned by it (cfg_free), except that lis.host and
 * lis.allowed_origins may point to static defaults, which cfg_free recognizes.
 */
#ifndef III_CFG_MAX_WORKERS
#define III_CFG_MAX_WORKERS 1024 /* entries per config: each may be a process */
#endif
#define CFG_MS_MAX 2147483647 /* timeouts end up as poll() ints */

/* The `restart` policies of a process worker (docs/§10 item 3). */
enum { CFG_RESTART_ALWAYS, CFG_RESTART_ON_FAILURE, CFG_RESTART_NEVER };

struct cfg_listener {
    char *host;                   /* bind address (IPv6 without brackets) */
    int port;                     /* 0 = any free port */
    int64_t handshake_timeout_ms; /* >= 1 */
    int64_t ping_interval_ms;     /* 0 = never ping */
    int64_t idle_timeout_ms;      /* 0 = never time out */
    size_t max_message_bytes, max_frame_bytes, max_header_bytes; /* all >= 1 */
    size_t max_connections, max_outbound_bytes;                  /* all >= 1 */
    size_t max_pending_bytes, max_pending_frames;                /* >= 1 */
    size_t max_inflight_per_connection, max_inflight_total;      /* >= 1 */
    size_t max_functions_per_connection;                         /* >= 1 */
    size_t max_triggers_per_connection, max_triggers_per_function, max_triggers; /* >= 1 */
    size_t max_memory_bytes;                                     /* 0 = no budget */
    int64_t drain_timeout_ms; /* SIGTERM: in-flight calls get this long (0: stop at once) */
    /* authentication (README "Security"): tokens as JSON texts (a string, or a session object
     * with its token), the rbac block as JSON, and the switches; NULL / 0 when absent */
    char **auth_tokens;
    size_t n_tokens;
    char *rbac_json, *middleware, *worker_token;
    int allow_unauth, metrics_public;
    char **allowed_hosts;
    size_t n_allowed_hosts;
    char **allowed_origins; /* browser origins; "*" = any; see cfg_default_origins */
    size_t n_origins;       /* entries in allowed_origins */
};

struct cfg_worker {
    char *name;              /* instance id: "math", "math#1", ... */
    char *base;              /* name without "#N": picks the implementation */
    int builtin;             /* runs inside the engine: no process, argv/env/cwd NULL */
    char *config_json;       /* canonical JSON of `config:`, or NULL when absent or null */
    char **argv;             /* NULL-terminated; a string command is {"/bin/sh","-c",cmd,NULL} */
    char **env;              /* NULL-terminated "K=V" added to the inherited environment */
    char *cwd;               /* absolute; relative paths are resolved against the config's dir */
    int restart;             /* CFG_RESTART_* */
    int64_t stop_timeout_ms; /* SIGTERM, then SIGKILL after this long */
    int instances;           /* processes of this entry (1: named as the entry, else name.k) */
    struct yaml_node *entry; /* the whole entry (owned), for yaml_equal in the reload diff */
};

/* One `routing:` rule (README "Routing"): which functions it covers and how their calls are
 * spread over providers, bounded and timed. The first rule that matches a function wins. */
enum { BAL_LEAST, BAL_RR, BAL_FIRST };
struct cfg_route {
    char *match, *ns;              /* glob over function ids; namespace (NULL: any) */
    int many, balance, retry;      /* providers: many; BAL_*; retry_on_disconnect */
    int64_t timeout_ms;            /* deadline of calls that carry none (0: none) */
    size_t max_inflight, max_queue; /* per provider, and the wait queue (0: unbounded) */
};

/* `cluster:` (README "Cluster"): the NATS servers and this engine's node name. */
struct cfg_cluster {
    char **urls;   /* nats://host:port, tried in turn */
    size_t nurls;  /* 0: no cluster */
    char *node, *user, *pass, *token, *prefix; /* node default: hostname:port; prefix "iii" */
};

struct cfg {
    struct cfg_cluster cluster;
    struct cfg_route *routes; /* `routing:`, in file order */
    size_t nroutes;
    int64_t grace_ms;        /* registration_namespace_grace_ms, III_DEFAULT_GRACE_MS when absent */
    int has_grace;           /* the file set it (an env override may still apply) */
    struct cfg_worker *w;    /* the entries, workers then modules, in file order */
    size_t nw;               /* entries in w */
    struct cfg_listener lis; /* from the iii-worker-manager entry, defaults otherwise */
    int keep_on_invalid;     /* on_invalid_reload: keep (default exit, as the seed requires) */
    struct buf warnings;     /* accepted but suspicious (unknown entry keys): one per line */
};

/* Static defaults: cfg_defaults cannot fail, so it points at these instead of allocating. An
 * origin without a port matches that scheme and host on any port (docs/§10 item 7). */
static char cfg_default_host[] = III_DEFAULT_HOST;
static char cfg_origin_localhost[] = "http://localhost";
static char cfg_origin_loopback[] = "http://127.0.0.1";
static char *cfg_default_origins[] = {cfg_origin_localhost, cfg_origin_loopback};

/* Names that run inside this engine and need no process. */
static const char *const cfg_builtins[] = {"iii-worker-manager", "iii-engine-functions",
                                           "iii-observability",  "iii-telemetry",
                                           "configuration",      NULL};

/* Modules of the reference engine that this engine does not include: without a `command` they
 * get a message that says so, rather than the generic one. */
static const char *const cfg_reference_only[] = {
    "iii-http",   "http",           "iii-http-functions",
    "iii-stream", "stream",         "iii-state",
    "state",      "iii-cron",       "cron",
    "iii-queue",  "queue",          "iii-pubsub",
    "pubsub",     "iii-worker-ops", "iii-sandbox",
    NULL};

/* The keys an entry may have. From index 3 on they are the process keys, which a built-in
 * entry may not use (cfg_entry relies on this order). */
static const char *const cfg_entry_keys[] = {
    "name", "config", "image", "command", "env", "cwd", "restart", "stop_timeout_ms", "instances",
    NULL};

/* Validation context: where messages go and what they are relative to. */
struct cfg_ctx {
    const char *file; /* config path as given, for messages */
    char *dir;        /* absolute directory of the config file (owned) */
    char *err;        /* message out-buffer (caller's) */
    size_t errlen;    /* its size */
};

/* 1 when s is one of the NULL-terminated list. */
static int cfg_in(const char *s, const char *const *list)
{
    for (; *list; list++)
        if (!strcmp(s, *list)) return 1;
    return 0;
}

/* Fills c with the built-in defaults; allocates nothing, so it cannot fail. */
static void cfg_defaults(struct cfg *c)
{
    memset(c, 0, sizeof *c);
    c->grace_ms = III_DEFAULT_GRACE_MS;
    c->lis.host = cfg_default_host;
    c->lis.port = III_DEFAULT_PORT;
    c->lis.handshake_timeout_ms = III_DEFAULT_HANDSHAKE_TIMEOUT_MS;
    c->lis.ping_interval_ms = III_DEFAULT_PING_INTERVAL_MS;
    c->lis.idle_timeout_ms = III_DEFAULT_IDLE_TIMEOUT_MS;
    c->lis.max_message_bytes = III_DEFAULT_MAX_MESSAGE_BYTES;
    c->lis.max_frame_bytes = III_DEFAULT_MAX_FRAME_BYTES;
    c->lis.max_header_bytes = III_DEFAULT_MAX_HEADER_BYTES;
    c->lis.max_connections = III_DEFAULT_MAX_CONNECTIONS;
    c->lis.max_outbound_bytes = III_DEFAULT_MAX_OUTBOUND_BYTES;
    c->lis.max_pending_bytes = III_DEFAULT_MAX_PENDING_BYTES;
    c->lis.max_pending_frames = III_DEFAULT_MAX_PENDING_FRAMES;
    c->lis.max_inflight_per_connection = III_DEFAULT_MAX_INFLIGHT_PER_CONN;
    c->lis.max_inflight_total = III_DEFAULT_MAX_INFLIGHT_TOTAL;
    c->lis.max_functions_per_connection = III_DEFAULT_MAX_FUNCTIONS_PER_CONN;
    c->lis.max_triggers_per_connection = III_DEFAULT_MAX_TRIGGERS_PER_CONN;
    c->lis.max_triggers_per_function = III_DEFAULT_MAX_TRIGGERS_PER_FUNCTION;
    c->lis.max_triggers = III_DEFAULT_MAX_TRIGGERS;
    c->lis.max_memory_bytes = III_DEFAULT_MAX_MEMORY_BYTES;
    c->lis.drain_timeout_ms = III_DEFAULT_DRAIN_TIMEOUT_MS;
    c->lis.allowed_origins = cfg_default_origins;
    c->lis.n_origins = sizeof cfg_default_origins / sizeof cfg_default_origins[0];
}

/* Frees a NULL-terminated list of strings and the list itself (NULL is fine). */
static void cfg_free_list(char **v)
{
    char **q;
    if (!v) return;
    for (q = v; *q; q++) xfree(*q);
    xfree(v);
}

/* Frees everything c owns and leaves c holding the defaults (a second cfg_free is harmless). */
static void cfg_free(struct cfg *c)
{
    size_t i;
    for (i = 0; i < c->nw; i++) {
        struct cfg_worker *w = &c->w[i];
        xfree(w->name);
        xfree(w->base);
        xfree(w->config_json);
        cfg_free_list(w->argv);
        cfg_free_list(w->env);
        xfree(w->cwd);
        yaml_free(w->entry);
    }
    xfree(c->w);
    for (i = 0; i < c->nroutes; i++) xfree(c->routes[i].match), xfree(c->routes[i].ns);
    cfg_free_list(c->cluster.urls);
    xfree(c->cluster.node), xfree(c->cluster.user), xfree(c->cluster.pass);
    xfree(c->cluster.token), xfree(c->cluster.prefix);
    xfree(c->routes);
    buf_free(&c->warnings);
    cfg_free_list(c->lis.auth_tokens);
    cfg_free_list(c->lis.allowed_hosts);
    xfree(c->lis.rbac_json), xfree(c->lis.middleware), xfree(c->lis.worker_token);
    if (c->lis.host != cfg_default_host) xfree(c->lis.host);
    if (c->lis.allowed_origins != cfg_default_origins) {
        for (i = 0; i < c->lis.n_origins; i++) xfree(c->lis.allowed_origins[i]);
        xfree(c->lis.allowed_origins);
    }
    cfg_defaults(c);
}

static int cfg_fail(struct cfg_ctx *x, const char *who, int line, int col, const char *fmt, ...)
    III_PRINTF(5, 6);
/* Writes "FILE[:LINE:COL]: [worker 'WHO': ]message" to the error buffer. Returns -1. */
static int cfg_fail(struct cfg_ctx *x, const char *who, int line, int col, const char *fmt, ...)
{
    va_list ap;
    size_t k;
    if (!x->err || !x->errlen) return -1;
    if (line > 0) snprintf(x->err, x->errlen, "%s:%d:%d: ", x->file, line, col);
    else snprintf(x->err, x->errlen, "%s: ", x->file);
    k = strlen(x->err);
    if (who && k < x->errlen) snprintf(x->err + k, x->errlen - k, "worker '%s': ", who);
    k = strlen(x->err);
    va_start(ap, fmt);
    vsnprintf(x->err + k, x->errlen - k, fmt, ap);
    va_end(ap);
    return -1;
}

/* Describes a value for "(got ...)" in messages: its text for a scalar, its kind otherwise. */
static const char *cfg_got(const struct yaml_node *v, char *t, size_t tn)
{
    if (!v || v->kind == YAML_NULL) return "nothing (null)";
    if (v->kind == YAML_SEQ) return "a list";
    if (v->kind == YAML_MAP) return "a mapping";
    if (v->kind == YAML_STR) snprintf(t, tn, "the string \"%.40s\"", v->str);
    else snprintf(t, tn, "%.40s", v->str);
    return t;
}

/* Position of key in map m (its key, which is where the reader looks). */
static void cfg_pos(const struct yaml_node *m, const char *key, int *line, int *col)
{
    size_t i;
    *line = m->line;
    *col = m->col;
    for (i = 0; i < m->n; i++)
        if (!strcmp(m->keys[i], key)) {
            *line = m->key_lines[i];
            *col = m->key_cols[i];
        }
}

/* A value present and not null (YAML `key:` or `key: null` is the same as leaving it out). */
static const struct yaml_node *cfg_opt(const struct yaml_node *m, const char *key)
{
    const struct yaml_node *v = yaml_get(m, key);
    return v && v->kind != YAML_NULL ? v : NULL;
}

/* Checks that v is an integer in [min, max]; `what` names it in the message. */
static int cfg_int(struct cfg_ctx *x, const char *who, const char *what, const struct yaml_node *v,
                   int line, int col, int64_t min, int64_t max, int64_t *out)
{
    char t[64], range[64];
    if (v && v->kind == YAML_INT && v->i >= min && v->i <= max) {
        *out = v->i;
        return 0;
    }
    if (max > CFG_MS_MAX) /* byte counts: the upper bound is the platform's */
        snprintf(range, sizeof range, min ? "a positive integer" : "an integer >= 0");
    else
        snprintf(range, sizeof range, "an integer from %lld to %lld", (long long)min,
                 (long long)max);
    return cfg_fail(x, who, line, col, "%s must be %s (got %s)", what, range,
                    cfg_got(v, t, sizeof t));
}

/* The text of a scalar for argv / env: a string decoded, a number or boolean as written.
 * NULL for null, collections, and strings with a NUL (which C strings cannot carry). */
static const char *cfg_text(const struct yaml_node *v)
{
    if (!v || v->kind == YAML_NULL || v->kind == YAML_SEQ || v->kind == YAML_MAP) return NULL;
    if (strlen(v->str) != v->len) return NULL;
    return v->str;
}

/* The current directory as a new string, or NULL with errno set. */
static char *cfg_getcwd(void)
{
    size_t n = 256; /* heap, doubled on ERANGE: PATH_MAX is not a bound POSIX guarantees */
    for (;;) {
        char *d = xmalloc(n);
        if (!d) return NULL;
        if (getcwd(d, n)) return d;
        xfree(d);
        if (errno != ERANGE || n > 65536) return NULL;
        n *= 2;
    }
}

/* Joins an absolute base and a path (used as is when absolute), dropping empty and "."
 * segments. ".." is kept: resolving it lexically would be wrong across symlinks. */
static char *cfg_path_join(const char *base, const char *rel)
{
    size_t nb = rel[0] == '/' ? 0 : strlen(base), nr = strlen(rel), i = 0, k = 0;
    char *s, *o;
    if (nb > SIZE_MAX / 2 - 4 || nr > SIZE_MAX / 2 - 4) return NULL;
    if (!(s = xmalloc(nb + nr + 2))) return NULL; /* base "/" rel, then the cleaned copy */
    if (!(o = xmalloc(nb + nr + 3))) {
        xfree(s);
        return NULL;
    }
    memcpy(s, base, nb);
    s[nb] = '/';
    memcpy(s + nb + 1, rel, nr + 1);
    while (s[i]) { /* copy each segment s[i..j) except "" and "." as "/segment" */
        size_t j = i;
        while (s[j] && s[j] != '/') j++;
        if (j > i && !(j - i == 1 && s[i] == '.')) {
            o[k++] = '/';
            memcpy(o + k, s + i, j - i);
            k += j - i;
        }
        i = s[j] ? j + 1 : j;
    }
    if (k == 0) o[k++] = '/';
    o[k] = 0;
    xfree(s);
    return o;
}

/* Sets x->dir to the absolute directory that holds the config file at path. */
static int cfg_dir(struct cfg_ctx *x, const char *path)
{
    /* Without a path, or with a relative one, the directory is taken from getcwd() once, at
     * load time: a worker's cwd must not change meaning if the engine ever changes its own. */
    const char *slash = path ? strrchr(path, '/') : NULL;
    char *cwd = NULL, *dir;
    if (!slash || path[0] != '/') {
        if (!(cwd = cfg_getcwd()))
            return cfg_fail(x, NULL, 0, 0, "cannot determine the current directory: %s",
                            errno ? strerror(errno) : "out of memory");
    }
    if (!slash) { /* "config.yaml": the current directory */
        x->dir = cwd;
        return 0;
    }
    dir = xmalloc((size_t)(slash - path) + 2);
    if (dir) {
        memcpy(dir, path, (size_t)(slash - path));
        dir[slash - path] = 0;
        if (slash == path) strcpy(dir, "/");
        x->dir = cfg_path_join(cwd ? cwd : "/", dir);
        xfree(dir);
    }
    xfree(cwd);
    return x->dir ? 0 : cfg_fail(x, NULL, 0, 0, "out of memory");
}

/* Expands ${VAR} and ${VAR:default} in text[0..len), appending the result to out
 * (§8.3): one pass, expanded values are not rescanned, a set-but-empty variable gives "", the
 * default may hold ':' but not '}', `__III_ENGINE_VERSION__` as a default gives the version,
 * `$VAR` and an unclosed `${X` stay as they are. An unset variable without a default is an
 * error "LINE:COL: environment variable ..." (cfg_parse adds the file name). 0 ok, -1 error (out
 * may hold partial output). */
static int cfg_expand(const char *text, size_t len, struct buf *out, char *err, size_t errlen)
{
    size_t i = 0, lit = 0, line_start = 0;
    int line = 1;
    while (i < len) {
        size_t j, name, name_end, def = 0, def_end = 0, end;
        const char *val;
        char *nm;
        if (text[i] == '\n') line++, line_start = i + 1;
        if (text[i] != '$' || i + 1 >= len || text[i + 1] != '{') {
            i++;
            continue;
        }
        /* \$\{([^}:]+)(?::([^}]*))?\} tried at i; on no match the text stays as it is. */
        for (name = j = i + 2; j < len && text[j] != '}' && text[j] != ':'; j++) continue;
        if (j == name || j >= len) {
            i++;
            continue;
        }
        name_end = j;
        if (text[j] == ':') {
            for (def = j + 1, j = def; j < len && text[j] != '}'; j++) continue;
            if (j >= len) {
                i++;
                continue;
            }
            def_end = j;
        }
        end = j + 1;
        /* A match: copy the literal text before it, then the value, the default or an error.
         * A name holding a NUL byte cannot be in the environment: it counts as unset. */
        if (!(nm = xmalloc(name_end - name + 1))) goto oom;
        memcpy(nm, text + name, name_end - name);
        nm[name_end - name] = 0;
        val = strlen(nm) == name_end - name ? getenv(nm) : NULL;
        xfree(nm);
        if (buf_append(out, text + lit, i - lit) < 0) goto oom;
        if (val) {
            if (buf_append(out, val, strlen(val)) < 0) goto oom;
        } else if (def) {
            if (def_end - def == 22 && !memcmp(text + def, "__III_ENGINE_VERSION__", 22)) {
                if (buf_append(out, III_VERSION, strlen(III_VERSION)) < 0) goto oom;
            } else if (buf_append(out, text + def, def_end - def) < 0) {
                goto oom;
            }
        } else { /* the position of the `$`, in characters, as the YAML reader counts them */
            int col = 1;
            for (j = line_start; j < i; j++) col += ((unsigned char)text[j] & 0xC0) != 0x80;
            if (err && errlen) {
                int nl = (int)(name_end - name > 64 ? 64 : name_end - name);
                const char *nt = text + name;
                snprintf(err, errlen, "%d:%d: ", line, col);
                j = strlen(err);
                snprintf(err + j, errlen - j,
                         "environment variable `%.*s` is not set and "
                         "`${%.*s}` has no default (set it, or write `${%.*s:default}`)",
                         nl, nt, nl, nt, nl, nt);
            }
            return -1;
        }
        for (j = i; j < end; j++) /* the name or default may span lines */
            if (text[j] == '\n') line++, line_start = j + 1;
        i = lit = end;
    }
    if (buf_append(out, text + lit, len - lit) < 0) goto oom;
    return 0;
oom:
    if (err && errlen) snprintf(err, errlen, "out of memory");
    return -1;
}

/* A new NULL-terminated array of n+1 slots, all NULL. */
static char **cfg_list(size_t n)
{
    char **v;
    if (n >= SIZE_MAX / sizeof *v) return NULL;
    v = xmalloc((n + 1) * sizeof *v);
    if (v) memset(v, 0, (n + 1) * sizeof *v);
    return v;
}

#define CFG_LOFF(f) offsetof(struct cfg_listener, f)

static int sess_check_json(const char *json, int with_token, char *why, size_t cap);
static int sess_check_rbac(const char *json, char *why, size_t cap);

/* The refusal when a listener is open beyond loopback with no authentication configured. */
#define LIS_OPEN_MSG                                                                               \
    "the listener binds a non-loopback address with no authentication: add `auth_tokens` "       \
    "(e.g. auth_tokens: [\"${III_TOKEN_SECRET}\"]) or `rbac` to the iii-worker-manager "          \
    "config, or set `allow_unauthenticated: true` to serve the network without it"

/* 1 if host names only this machine: localhost, 127.0.0.0/8 or ::1 (bracketed or not). A
 * wildcard (0.0.0.0, ::) is not loopback: it serves every interface. */
static int host_loopback(const char *h)
{
    size_t n = strlen(h);
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']') h++, n -= 2;
    if ((n == 9 && str_ncaseeq(h, "localhost", 9)) || (n == 3 && !memcmp(h, "::1", 3))) return 1;
    struct in_addr a;
    char t[64];
    if (n >= sizeof t) return 0;
    memcpy(t, h, n), t[n] = 0;
    return inet_pton(AF_INET, t, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

/* The listener settings in the iii-worker-manager entry's `config` (a mapping or null), each
 * type- and range-checked into l. Keys of the reference engine that this one does not
 * implement (rbac, middleware_function_id) are refused by name: ignoring an access rule
 * would be a silent security change. */
static int cfg_listener(struct cfg_ctx *x, const char *who, const struct yaml_node *conf,
                        struct cfg_listener *l)
{
    /* The integer settings: range, and where and how wide the field is ('i' int, 'l' int64_t,
     * 'z' size_t). Byte counts are capped by what size_t holds on this platform. */
    static const struct {
        const char *key;
        int64_t min, max;
        size_t off;
        char type;
    } ints[] = {
        {"port", 0, 65535, CFG_LOFF(port), 'i'},
        {"handshake_timeout_ms", 1, CFG_MS_MAX, CFG_LOFF(handshake_timeout_ms), 'l'},
        {"ping_interval_ms", 0, CFG_MS_MAX, CFG_LOFF(ping_interval_ms), 'l'},
        {"idle_timeout_ms", 0, CFG_MS_MAX, CFG_LOFF(idle_timeout_ms), 'l'},
        {"max_message_bytes", 1, INT64_MAX, CFG_LOFF(max_message_bytes), 'z'},
        {"max_frame_bytes", 1, INT64_MAX, CFG_LOFF(max_frame_bytes), 'z'},
        {"max_header_bytes", 1, INT64_MAX, CFG_LOFF(max_header_bytes), 'z'},
        {"max_connections", 1, CFG_MS_MAX, CFG_LOFF(max_connections), 'z'},
        {"max_outbound_bytes", 1, INT64_MAX, CFG_LOFF(max_outbound_bytes), 'z'},
        {"max_pending_registration_bytes", 1, INT64_MAX, CFG_LOFF(max_pending_bytes), 'z'},
        {"max_pending_registration_frames", 1, CFG_MS_MAX, CFG_LOFF(max_pending_frames), 'z'},
        {"max_inflight_per_connection", 1, CFG_MS_MAX, CFG_LOFF(max_inflight_per_connection),
         'z'},
        {"max_inflight_total", 1, CFG_MS_MAX, CFG_LOFF(max_inflight_total), 'z'},
        {"max_functions_per_connection", 1, CFG_MS_MAX, CFG_LOFF(max_functions_per_connection),
         'z'},
        {"max_triggers_per_connection", 1, CFG_MS_MAX, CFG_LOFF(max_triggers_per_connection),
         'z'},
        {"max_triggers_per_function", 1, CFG_MS_MAX, CFG_LOFF(max_triggers_per_function), 'z'},
        {"max_triggers", 1, CFG_MS_MAX, CFG_LOFF(max_triggers), 'z'},
        {"max_memory_bytes", 0, INT64_MAX, CFG_LOFF(max_memory_bytes), 'z'},
        {"drain_timeout_ms", 0, CFG_MS_MAX, CFG_LOFF(drain_timeout_ms), 'l'},
    };
    size_t i, k;
    char t[64], what[80];
    if (!conf || conf->kind == YAML_NULL) return 0;
    if (conf->kind != YAML_MAP)
        return cfg_fail(x, who, conf->line, conf->col,
                        "`config` must be a mapping of listener settings (got %s)",
                        cfg_got(conf, t, sizeof t));
    for (i = 0; i < conf->n; i++) {
        const char *key = conf->keys[i];
        const struct yaml_node *v = conf->items[i];
        int line = conf->key_lines[i], col = conf->key_cols[i];
        int64_t n = 0, max;
        snprintf(what, sizeof what, "`%.40s` in config", key);
        for (k = 0; k < sizeof ints / sizeof ints[0] && strcmp(key, ints[k].key); k++) continue;
        if (k < sizeof ints / sizeof ints[0]) {
            unsigned char *f = (unsigned char *)l + ints[k].off;
            int ni;
            size_t nz;
            max = ints[k].max;
            if (max == INT64_MAX && (uint64_t)SIZE_MAX < (uint64_t)INT64_MAX)
                max = (int64_t)SIZE_MAX; /* a 32-bit build cannot hold more */
            if (cfg_int(x, who, what, v, line, col, ints[k].min, max, &n) < 0) return -1;
            ni = (int)n;
            nz = (size_t)n;
            if (ints[k].type == 'i') memcpy(f, &ni, sizeof ni);
            if (ints[k].type == 'l') memcpy(f, &n, sizeof n);
            if (ints[k].type == 'z') memcpy(f, &nz, sizeof nz);
        } else if (!strcmp(key, "host")) { /* any name or address getaddrinfo takes */
            const char *h = v && v->kind == YAML_STR ? cfg_text(v) : NULL;
            size_t hn = h ? strlen(h) : 0;
            char *d;
            if (h && hn >= 2 && h[0] == '[' && h[hn - 1] == ']') h++, hn -= 2; /* [::1] */
            if (!h || hn == 0)
                return cfg_fail(x, who, line, col,
                                "%s must be a host name or address such as "
                                "\"127.0.0.1\" or \"::\" (got %s)",
                                what, cfg_got(v, t, sizeof t));
            if (!(d = xmalloc(hn + 1))) return cfg_fail(x, NULL, 0, 0, "out of memory");
            memcpy(d, h, hn);
            d[hn] = 0;
            if (l->host != cfg_default_host) xfree(l->host);
            l->host = d;
        } else if (!strcmp(key, "allowed_origins")) {
            /* Browsers send scheme://host[:port] and nothing more, or "null" from a file:
             * page. A trailing slash or path could never match, so it is refused. */
            char **o;
            if (!v || v->kind != YAML_SEQ)
                return cfg_fail(x, who, line, col,
                                "%s must be a list of origins such as "
                                "[\"http://localhost:3000\"] (or [\"*\"] for any) (got %s)",
                                what, cfg_got(v, t, sizeof t));
            if (!(o = cfg_list(v->n))) return cfg_fail(x, NULL, 0, 0, "out of memory");
            for (k = 0; k < v->n; k++) {
                const struct yaml_node *e = v->items[k];
                const char *s = e && e->kind == YAML_STR ? cfg_text(e) : NULL;
                const char *sep = s ? strstr(s, "://") : NULL;
                if (!s || (strcmp(s, "*") && strcmp(s, "null") &&
                           (!sep || sep == s || !sep[3] || strchr(sep + 3, '/')))) {
                    cfg_free_list(o);
                    return cfg_fail(x, who, e ? e->line : line, e ? e->col : col,
                                    "each of `allowed_origins` in config must be \"*\", "
                                    "\"null\" or an origin scheme://host[:port] without a "
                                    "path (got %s)",
                                    cfg_got(e, t, sizeof t));
                }
                if (!(o[k] = xstrdup(s))) {
                    cfg_free_list(o);
                    return cfg_fail(x, NULL, 0, 0, "out of memory");
                }
            }
            if (l->allowed_origins != cfg_default_origins) {
                for (k = 0; k < l->n_origins; k++) xfree(l->allowed_origins[k]);
                xfree(l->allowed_origins);
            }
            l->allowed_origins = o;
            l->n_origins = v->n;
        } else if (!strcmp(key, "auth_tokens") || !strcmp(key, "allowed_hosts")) {
            int tok = key[0] == 'a' && key[1] == 'u';
            if (!v || v->kind != YAML_SEQ)
                return cfg_fail(x, who, line, col, "%s must be a list (got %s)", what,
                                cfg_got(v, t, sizeof t));
            char **o = cfg_list(v->n);
            if (!o) return cfg_fail(x, NULL, 0, 0, "out of memory");
            for (k = 0; k < v->n; k++) {
                const struct yaml_node *e = v->items[k];
                struct buf j = {0};
                char why[200];
                const char *s = e && e->kind == YAML_STR ? cfg_text(e) : NULL;
                if (!tok && (!s || !*s)) {
                    cfg_free_list(o);
                    return cfg_fail(x, who, e ? e->line : line, e ? e->col : col,
                                    "each of `allowed_hosts` must be a host name (got %s)",
                                    cfg_got(e, t, sizeof t));
                }
                if (tok && ((s && !*s) || (!s && (!e || e->kind != YAML_MAP)))) {
                    cfg_free_list(o);
                    return cfg_fail(x, who, e ? e->line : line, e ? e->col : col,
                                    "each of `auth_tokens` must be a non-empty token string or "
                                    "a mapping with `token` and the session's limits (got %s)",
                                    cfg_got(e, t, sizeof t));
                }
                if (!tok) o[k] = xstrdup(s);
                else if (yaml_to_json(e, &j) == 0 && buf_cstr(&j)) o[k] = (char *)j.p, j.p = NULL;
                buf_free(&j);
                if (!o[k]) {
                    cfg_free_list(o);
                    return cfg_fail(x, NULL, 0, 0, "out of memory");
                }
                if (tok && !s && sess_check_json(o[k], 1, why, sizeof why) < 0) {
                    cfg_free_list(o);
                    return cfg_fail(x, who, e->line, e->col, "`auth_tokens` entry %lu: %s",
                                    (unsigned long)k + 1, why);
                }
            }
            if (tok) cfg_free_list(l->auth_tokens), l->auth_tokens = o, l->n_tokens = v->n;
            else cfg_free_list(l->allowed_hosts), l->allowed_hosts = o, l->n_allowed_hosts = v->n;
        } else if (!strcmp(key, "rbac")) {
            struct buf j = {0};
            char why[200];
            if (!v || v->kind != YAML_MAP)
                return cfg_fail(x, who, line, col,
                                "%s must be a mapping with auth_function_id, expose_functions "
                                "and/or forbidden_functions (got %s)",
                                what, cfg_got(v, t, sizeof t));
            if (yaml_to_json(v, &j) < 0 || !buf_cstr(&j)) {
                buf_free(&j);
                return cfg_fail(x, NULL, 0, 0, "out of memory");
            }
            xfree(l->rbac_json), l->rbac_json = (char *)j.p;
            if (sess_check_rbac(l->rbac_json, why, sizeof why) < 0)
                return cfg_fail(x, who, line, col, "`rbac` in config: %s", why);
        } else if (!strcmp(key, "middleware_function_id") || !strcmp(key, "worker_token")) {
            const char *s = v && v->kind == YAML_STR ? cfg_text(v) : NULL;
            if (!s || !*s || (key[0] == 'w' && strlen(s) > 64))
                return cfg_fail(x, who, line, col, "%s must be a non-empty string%s (got %s)",
                                what, key[0] == 'w' ? " of at most 64 bytes" : "",
                                cfg_got(v, t, sizeof t));
            char **dst = key[0] == 'm' ? &l->middleware : &l->worker_token;
            xfree(*dst);
            if (!(*dst = xstrdup(s))) return cfg_fail(x, NULL, 0, 0, "out of memory");
        } else if (!strcmp(key, "allow_unauthenticated") || !strcmp(key, "metrics_public")) {
            if (!v || v->kind != YAML_BOOL)
                return cfg_fail(x, who, line, col, "%s must be true or false (got %s)", what,
                                cfg_got(v, t, sizeof t));
            if (key[0] == 'a') l->allow_unauth = v->b;
            else l->metrics_public = v->b;
        } else {
            return cfg_fail(x, who, line, col,
                            "unknown key `%s` in config (expected host, port, "
                            "handshake_timeout_ms, ping_interval_ms, idle_timeout_ms, "
                            "max_message_bytes, max_frame_bytes, max_header_bytes, "
                            "max_connections, max_outbound_bytes, "
                            "max_pending_registration_bytes, max_pending_registration_frames, "
                            "max_inflight_per_connection, max_inflight_total, "
                            "max_functions_per_connection, max_triggers_per_connection, "
                            "max_triggers_per_function, max_triggers, max_memory_bytes, "
                            "drain_timeout_ms, allowed_origins, auth_tokens, rbac, "
                            "middleware_function_id, allow_unauthenticated, metrics_public, "
                            "allowed_hosts, worker_token)",
                            key);
        }
    }
    /* protected by default: a listener beyond loopback needs authentication, or an explicit
     * opt-out, or the engine does not start (and a reload does not apply) */
    if (!host_loopback(l->host) && !l->n_tokens && !l->rbac_json && !l->allow_unauth)
        return cfg_fail(x, who, conf->line, conf->col, "%s", LIS_OPEN_MSG);
    return 0;
}

/* `command`, `env`, `cwd`, `restart` and `stop_timeout_ms` of a process worker. */
static int cfg_process(struct cfg_ctx *x, struct cfg_worker *w, const struct yaml_node *e)
{
    const struct yaml_node *v;
    const char *who = w->name;
    char t[64];
    int line, col;
    size_t i;
    /* command: required. A list is the argv as is (numbers and booleans as written); a string
     * goes to /bin/sh -c, so pipes and redirections work as people expect. */
    v = cfg_opt(e, "command");
    cfg_pos(e, "command", &line, &col);
    if (!v) {
        if (cfg_in(w->base, cfg_reference_only))
            return cfg_fail(x, who, e->line, e->col,
                            "`%s` is a module of the reference iii "
                            "engine that this engine does not include; to run your own "
                            "implementation add `command:` (for example `command: [\"node\", "
                            "\"%s.mjs\"]`), or remove the entry",
                            w->base, w->base);
        return cfg_fail(x, who, e->line, e->col,
                        "`command` is required for a worker that is "
                        "not built in (add `command: [\"node\", \"%s.mjs\"]` or a shell string)",
                        w->base);
    }
    if (v->kind == YAML_STR) { /* a shell command line */
        const char *s = cfg_text(v);
        if (!s || !s[strspn(s, " \t\n")])
            return cfg_fail(x, who, line, col, "`command` must not be empty%s",
                            s ? "" : " or contain a NUL character");
        if (!(w->argv = cfg_list(3))) goto oom;
        if (!(w->argv[0] = xstrdup("/bin/sh")) || !(w->argv[1] = xstrdup("-c")) ||
            !(w->argv[2] = xstrdup(s)))
            goto oom;
    } else if (v->kind == YAML_SEQ && v->n > 0) { /* argv; argv[0] is looked up in PATH */
        if (!(w->argv = cfg_list(v->n))) goto oom;
        for (i = 0; i < v->n; i++) {
            const struct yaml_node *a = v->items[i];
            const char *s = cfg_text(a);
            if (!s || (i == 0 && !s[0]))
                return cfg_fail(
                    x, who, a->line, a->col, "item %lu of `command` must be a %sstring (got %s)",
                    (unsigned long)i + 1, i ? "" : "non-empty ", cfg_got(a, t, sizeof t));
            if (!(w->argv[i] = xstrdup(s))) goto oom;
        }
    } else {
        return cfg_fail(x, who, line, col,
                        "`command` must be a list such as [\"node\", "
                        "\"%s.mjs\"] or a shell string (got %s)",
                        w->base, v->kind == YAML_SEQ ? "an empty list" : cfg_got(v, t, sizeof t));
    }

    /* env: a mapping of names to scalars, in file order; always a (possibly empty) list. */
    v = cfg_opt(e, "env");
    cfg_pos(e, "env", &line, &col);
    if (v && v->kind != YAML_MAP)
        return cfg_fail(x, who, line, col,
                        "`env` must be a mapping such as { LOG_LEVEL: debug } (got %s)",
                        cfg_got(v, t, sizeof t));
    if (!(w->env = cfg_list(v ? v->n : 0))) goto oom;
    for (i = 0; v && i < v->n; i++) {
        const char *k = v->keys[i], *s = cfg_text(v->items[i]);
        size_t nk = strlen(k);
        if (!k[0] || strchr(k, '='))
            return cfg_fail(x, who, v->key_lines[i], v->key_cols[i],
                            "`env` name `%s` is not "
                            "valid (it must be non-empty and contain no `=`)",
                            k);
        if (!s)
            return cfg_fail(x, who, v->key_lines[i], v->key_cols[i],
                            "`env` value of `%s` must "
                            "be a string or a number (got %s; write \"\" for an empty value)",
                            k, cfg_got(v->items[i], t, sizeof t));
        if (!(w->env[i] = xmalloc(nk + strlen(s) + 2))) goto oom;
        memcpy(w->env[i], k, nk);
        w->env[i][nk] = '=';
        strcpy(w->env[i] + nk + 1, s);
    }

    /* cwd: resolved now, so a later chdir of the engine cannot change what it means. */
    v = cfg_opt(e, "cwd");
    cfg_pos(e, "cwd", &line, &col);
    if (v && (v->kind != YAML_STR || !cfg_text(v) || !v->str[0]))
        return cfg_fail(x, who, line, col, "`cwd` must be a directory path (got %s)",
                        cfg_got(v, t, sizeof t));
    if (!(w->cwd = v ? cfg_path_join(x->dir, v->str) : xstrdup(x->dir))) goto oom;

    /* restart: always (the default, as the reference engine supervises its daemons). */
    v = cfg_opt(e, "restart");
    cfg_pos(e, "restart", &line, &col);
    w->restart = CFG_RESTART_ALWAYS;
    if (v && v->kind == YAML_STR && !strcmp(v->str, "on-failure"))
        w->restart = CFG_RESTART_ON_FAILURE;
    else if (v && v->kind == YAML_STR && !strcmp(v->str, "never")) w->restart = CFG_RESTART_NEVER;
    else if (v && !(v->kind == YAML_STR && !strcmp(v->str, "always")))
        return cfg_fail(x, who, line, col, "`restart` must be always, on-failure or never (got %s)",
                        cfg_got(v, t, sizeof t));

    v = cfg_opt(e, "stop_timeout_ms");
    cfg_pos(e, "stop_timeout_ms", &line, &col);
    w->stop_timeout_ms = III_DEFAULT_STOP_TIMEOUT_MS;
    if (v &&
        cfg_int(x, who, "`stop_timeout_ms`", v, line, col, 0, CFG_MS_MAX, &w->stop_timeout_ms) < 0)
        return -1;
    /* instances: N processes of this entry (name.1 ... name.N; README "Routing") */
    v = cfg_opt(e, "instances");
    cfg_pos(e, "instances", &line, &col);
    int64_t ni = 1;
    if (v && cfg_int(x, who, "`instances`", v, line, col, 1, III_MAX_INSTANCES, &ni) < 0) return -1;
    w->instances = (int)ni;
    return 0;
oom:
    return cfg_fail(x, NULL, 0, 0, "out of memory");
}

/* Validates entry k of list `sect` and appends it to c->w, taking the entry node out of the
 * list (the worker owns it). *lis_seen tracks the single iii-worker-manager entry. */
static int cfg_entry(struct cfg_ctx *x, struct cfg *c, struct yaml_node *list, size_t k,
                     const char *sect, int *lis_seen)
{
    struct yaml_node *e = list->items[k];
    const struct yaml_node *nm, *v;
    struct cfg_worker *w;
    const char *who, *s;
    char t[64];
    size_t i, dup = 0;
    int line, col;
    /* The name comes first: every later message names the entry by its instance id. */
    if (!e || e->kind != YAML_MAP)
        return cfg_fail(x, NULL, e ? e->line : list->line, e ? e->col : list->col,
                        "entry %lu of `%s` must be a mapping with at least a `name` (got %s)",
                        (unsigned long)k + 1, sect, cfg_got(e, t, sizeof t));
    nm = cfg_opt(e, "name");
    cfg_pos(e, "name", &line, &col);
    if (!nm)
        return cfg_fail(x, NULL, e->line, e->col, "entry %lu of `%s` has no `name`",
                        (unsigned long)k + 1, sect);
    s = nm->kind == YAML_STR ? cfg_text(nm) : NULL;
    if (!s || !s[0])
        return cfg_fail(x, NULL, line, col,
                        "entry %lu of `%s`: `name` must be a non-empty string (got %s)",
                        (unsigned long)k + 1, sect, cfg_got(nm, t, sizeof t));
    for (i = 0; s[i]; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7F)
            return cfg_fail(x, NULL, line, col,
                            "entry %lu of `%s`: `name` must not contain control characters",
                            (unsigned long)k + 1, sect);
    if (strchr(s, '#'))
        return cfg_fail(x, NULL, line, col,
                        "entry %lu of `%s`: `name` must not contain `#` "
                        "(duplicate names get the instance ids name#1, name#2 automatically)",
                        (unsigned long)k + 1, sect);

    /* Take the entry (the reload diff compares it) and give it its instance id: the k-th
     * repeat of a name, counted over workers then modules, is name#k. */
    w = &c->w[c->nw++]; /* zeroed by the caller: cfg_free copes with a half-filled one */
    w->entry = e;
    list->items[k] = NULL;
    if (!(w->base = xstrdup(s))) goto oom;
    for (i = 0; i + 1 < c->nw; i++) dup += !strcmp(c->w[i].base, s);
    if (!(w->name = xmalloc(strlen(s) + 24))) goto oom;
    /* the 24 spare bytes hold '#', any unsigned long and the NUL */
    if (dup) sprintf(w->name, "%s#%lu", s, (unsigned long)dup);
    else strcpy(w->name, s);
    who = w->name;
    w->builtin = cfg_in(s, cfg_builtins);
    w->restart = CFG_RESTART_ALWAYS;
    w->stop_timeout_ms = III_DEFAULT_STOP_TIMEOUT_MS;

    /* Unknown entry keys are ignored, as in the reference engine (§11.22), but
     * each one is reported as a warning with the nearest known key (`evn` -> `env`); `image`
     * is the reference engine's OCI image, which this engine cannot run; `config` is kept as
     * JSON. A misspelt `command` still fails below ("`command` is required"). */
    for (i = 0; i < e->n; i++) {
        if (cfg_in(e->keys[i], cfg_entry_keys)) continue;
        const char *near = NULL;
        int best = 3;
        for (size_t q = 0; cfg_entry_keys[q]; q++) {
            int dd = str_distance(e->keys[i], cfg_entry_keys[q]);
            if (dd < best) best = dd, near = cfg_entry_keys[q];
        }
        buf_printf(&c->warnings, "%s:%d:%d: worker '%s': unknown key `%s` is ignored%s%s%s\n",
                   x->file, e->key_lines[i], e->key_cols[i], who, e->keys[i],
                   near ? " (did you mean `" : "", near ? near : "", near ? "`?)" : "");
    }
    if (cfg_opt(e, "image")) {
        cfg_pos(e, "image", &line, &col);
        return cfg_fail(
            x, who, line, col,
            w->builtin ? "`image` cannot be used on a built-in worker"
                       : "`image` (OCI images) is not supported by this engine; start the worker "
                         "as a process with `command`");
    }
    if ((v = cfg_opt(e, "config"))) {
        struct buf j = {0};
        if (yaml_to_json(v, &j) < 0 || buf_putc(&j, 0) < 0) {
            buf_free(&j);
            goto oom;
        }
        w->config_json = xstrdup((const char *)j.p);
        buf_free(&j);
        if (!w->config_json) goto oom;
    }
    if (!w->builtin) return cfg_process(x, w, e);
    /* A built-in runs inside the engine: process keys would be silently meaningless. */
    for (i = 3; cfg_entry_keys[i]; i++) /* command, env, cwd, restart, stop_timeout_ms */
        if (cfg_opt(e, cfg_entry_keys[i])) {
            cfg_pos(e, cfg_entry_keys[i], &line, &col);
            return cfg_fail(x, who, line, col,
                            "`%s` cannot be used on the built-in worker `%s`, "
                            "which runs inside the engine (give your own worker another name)",
                            cfg_entry_keys[i], s);
        }
    /* iii-worker-manager carries the listener. The reference engine opens one listener per
     * entry; this engine has one, so a second entry is refused rather than ignored. */
    if (strcmp(s, "iii-worker-manager")) return 0;
    if (*lis_seen)
        return cfg_fail(x, who, e->line, e->col,
                        "only one `iii-worker-manager` entry is "
                        "supported (this engine opens a single listener); merge its settings "
                        "into the first one");
    *lis_seen = 1;
    return cfg_listener(x, who, cfg_opt(e, "config"), &c->lis);
oom:
    return cfg_fail(x, NULL, 0, 0, "out of memory");
}

/* `cluster:` (README "Cluster"): nats (a list of nats://host:port URLs), node, user, password,
 * token, prefix. */
static int cfg_cluster(struct cfg_ctx *x, struct cfg *c, const struct yaml_node *v)
{
    char t[64];
    struct cfg_cluster *cl = &c->cluster;
    if (v->kind == YAML_NULL) return 0;
    if (v->kind != YAML_MAP)
        return cfg_fail(x, NULL, v->line, v->col, "`cluster` must be a mapping with `nats` (got %s)",
                        cfg_got(v, t, sizeof t));
    for (size_t i = 0; i < v->n; i++) {
        const char *key = v->keys[i];
        const struct yaml_node *e = v->items[i];
        int line = v->key_lines[i], col = v->key_cols[i];
        if (!strcmp(key, "nats")) {
            if (!e || e->kind != YAML_SEQ || !e->n)
                return cfg_fail(x, NULL, line, col,
                                "`cluster.nats` must be a non-empty list of nats://host:port URLs");
            if (!(cl->urls = cfg_list(e->n))) return cfg_fail(x, NULL, 0, 0, "out of memory");
            for (size_t k = 0; k < e->n; k++) {
                const struct yaml_node *u = e->items[k];
                const char *s = u && u->kind == YAML_STR ? cfg_text(u) : NULL;
                if (!s || strncmp(s, "nats://", 7) || !s[7])
                    return cfg_fail(x, NULL, u ? u->line : line, u ? u->col : col,
                                    "each of `cluster.nats` must be a nats://host:port URL (got %s)",
                                    cfg_got(u, t, sizeof t));
                if (!(cl->urls[k] = xstrdup(s))) return cfg_fail(x, NULL, 0, 0, "out of memory");
                cl->nurls++;
            }
        } else if (!strcmp(key, "node") || !strcmp(key, "user") || !strcmp(key, "password") ||
                   !strcmp(key, "token") || !strcmp(key, "prefix")) {
            const char *s = e && e->kind == YAML_STR ? cfg_text(e) : NULL;
            if (!s || !*s || strpbrk(s, " \t\r\n*>"))
                return cfg_fail(x, NULL, line, col,
                                "`cluster.%s` must be a non-empty string without spaces, * or >",
                                key);
            char **dst = key[0] == 'n' ? &cl->node : key[0] == 'u' ? &cl->user
                         : key[0] == 'p' && key[1] == 'a' ? &cl->pass : key[0] == 't' ? &cl->token
                                                                        : &cl->prefix;
            xfree(*dst);
            if (!(*dst = xstrdup(s))) return cfg_fail(x, NULL, 0, 0, "out of memory");
        } else {
            return cfg_fail(x, NULL, line, col,
                            "unknown key `%s` in `cluster` (expected nats, node, user, password, "
                            "token, prefix)",
                            key);
        }
    }
    if (!cl->nurls)
        return cfg_fail(x, NULL, v->line, v->col, "`cluster` needs `nats`: a list of server URLs");
    return 0;
}

/* `routing:`, a list of rules (README "Routing"), each checked key by key. */
static int cfg_routing(struct cfg_ctx *x, struct cfg *c, const struct yaml_node *v)
{
    char t[64];
    if (v->kind == YAML_NULL) return 0;
    if (v->kind != YAML_SEQ)
        return cfg_fail(x, NULL, v->line, v->col, "`routing` must be a list of rules (got %s)",
                        cfg_got(v, t, sizeof t));
    if (!(c->routes = xcalloc((v->n ? v->n : 1) * sizeof *c->routes)))
        return cfg_fail(x, NULL, 0, 0, "out of memory");
    for (size_t k = 0; k < v->n; k++) {
        const struct yaml_node *r = v->items[k];
        struct cfg_route *ro = &c->routes[c->nroutes++];
        ro->balance = BAL_LEAST;
        char who[48];
        snprintf(who, sizeof who, "routing rule %lu", (unsigned long)k + 1);
        if (!r || r->kind != YAML_MAP)
            return cfg_fail(x, NULL, r ? r->line : v->line, r ? r->col : v->col,
                            "%s must be a mapping with at least `match`", who);
        for (size_t i = 0; i < r->n; i++) {
            const char *key = r->keys[i];
            const struct yaml_node *e = r->items[i];
            int line = r->key_lines[i], col = r->key_cols[i];
            const char *s = e && e->kind == YAML_STR ? cfg_text(e) : NULL;
            int64_t n;
            if (!strcmp(key, "match") || !strcmp(key, "namespace")) {
                if (!s || !*s)
                    return cfg_fail(x, NULL, line, col, "%s: `%s` must be a non-empty string", who,
                                    key);
                char **dst = key[0] == 'm' ? &ro->match : &ro->ns;
                if (!(*dst = xstrdup(s))) return cfg_fail(x, NULL, 0, 0, "out of memory");
            } else if (!strcmp(key, "providers")) {
                if (!s || (strcmp(s, "one") && strcmp(s, "many")))
                    return cfg_fail(x, NULL, line, col, "%s: `providers` must be one or many", who);
                ro->many = !strcmp(s, "many");
            } else if (!strcmp(key, "balance")) {
                if (!s || (strcmp(s, "least-inflight") && strcmp(s, "round-robin") &&
                           strcmp(s, "first")))
                    return cfg_fail(x, NULL, line, col,
                                    "%s: `balance` must be least-inflight, round-robin or first",
                                    who);
                ro->balance = s[0] == 'l' ? BAL_LEAST : s[0] == 'r' ? BAL_RR : BAL_FIRST;
            } else if (!strcmp(key, "retry_on_disconnect")) {
                if (!e || e->kind != YAML_BOOL)
                    return cfg_fail(x, NULL, line, col, "%s: `retry_on_disconnect` must be true or "
                                    "false", who);
                ro->retry = e->b;
            } else if (!strcmp(key, "timeout_ms") || !strcmp(key, "max_inflight") ||
                       !strcmp(key, "max_queue")) {
                char what[64];
                snprintf(what, sizeof what, "%s: `%s`", who, key);
                n = 0;
                if (cfg_int(x, NULL, what, e, line, col, 0, CFG_MS_MAX, &n) < 0) return -1;
                if (key[0] == 't') ro->timeout_ms = n;
                else if (key[4] == 'i') ro->max_inflight = (size_t)n;
                else ro->max_queue = (size_t)n;
            } else {
                return cfg_fail(x, NULL, line, col,
                                "%s: unknown key `%s` (expected match, namespace, providers, "
                                "balance, timeout_ms, max_inflight, max_queue, "
                                "retry_on_disconnect)",
                                who, key);
            }
        }
        if (!ro->match)
            return cfg_fail(x, NULL, r->line, r->col, "%s needs `match` (a glob over function ids)",
                            who);
    }
    return 0;
}

/* Validates the parsed document root into c (which holds the defaults on entry). */
static int cfg_root(struct cfg_ctx *x, struct cfg *c, struct yaml_node *root)
{
    struct yaml_node *lists[2] = {NULL, NULL};
    static const char *const names[2] = {"workers", "modules"};
    size_t i, k, total = 0;
    int lis_seen = 0;
    char t[64];
    if (root->kind == YAML_NULL) return 0;
    if (root->kind != YAML_MAP)
        return cfg_fail(x, NULL, root->line, root->col,
                        "the top level must be a mapping with the "
                        "keys registration_namespace_grace_ms, workers, modules (got %s)",
                        cfg_got(root, t, sizeof t));
    /* Top-level keys, deny-unknown-fields as in the reference engine (§8.2). */
    for (i = 0; i < root->n; i++) {
        const char *key = root->keys[i];
        struct yaml_node *v = root->items[i];
        int line = root->key_lines[i], col = root->key_cols[i];
        if (!strcmp(key, "cluster")) {
            if (cfg_cluster(x, c, v) < 0) return -1;
        } else if (!strcmp(key, "routing")) {
            if (cfg_routing(x, c, v) < 0) return -1;
        } else if (!strcmp(key, "on_invalid_reload")) {
            /* exit (the default: the seed says an invalid config ends the engine) or keep */
            const char *s = v->kind == YAML_STR ? cfg_text(v) : NULL;
            if (!s || (strcmp(s, "exit") && strcmp(s, "keep")))
                return cfg_fail(x, NULL, line, col,
                                "`on_invalid_reload` must be exit or keep (got %s)",
                                cfg_got(v, t, sizeof t));
            c->keep_on_invalid = !strcmp(s, "keep");
        } else if (!strcmp(key, "registration_namespace_grace_ms")) {
            if (v->kind == YAML_NULL) continue;
            if (cfg_int(x, NULL, "`registration_namespace_grace_ms`", v, line, col, 0, CFG_MS_MAX,
                        &c->grace_ms) < 0)
                return -1;
            c->has_grace = 1;
        } else if (!strcmp(key, "workers") || !strcmp(key, "modules")) {
            if (v->kind != YAML_SEQ)
                return cfg_fail(x, NULL, line, col,
                                "`%s` must be a list (got %s; write `%s: []` for none)", key,
                                cfg_got(v, t, sizeof t), key);
            lists[key[0] == 'm'] = v;
            total += v->n;
        } else {
            return cfg_fail(x, NULL, line, col,
                            "unknown top-level key `%s` (expected "
                            "registration_namespace_grace_ms, on_invalid_reload, routing, "
                            "cluster, workers, modules)",
                            key);
        }
    }
    /* Entries: workers first, then modules (the reference engine's legacy alias). */
    if (total > III_CFG_MAX_WORKERS)
        return cfg_fail(x, NULL, 0, 0, "too many worker entries (%lu; the limit is %d)",
                        (unsigned long)total, III_CFG_MAX_WORKERS);
    if (total == 0) return 0;
    /* All slots up front and zeroed, so that a failure half-way leaves c freeable. */
    if (!(c->w = xmalloc(total * sizeof *c->w))) return cfg_fail(x, NULL, 0, 0, "out of memory");
    memset(c->w, 0, total * sizeof *c->w);
    for (k = 0; k < 2; k++)
        for (i = 0; lists[k] && i < lists[k]->n; i++)
            if (cfg_entry(x, c, lists[k], i, names[k], &lis_seen) < 0) return -1;
    return 0;
}

/* Puts "FILE:" (or "FILE: " before a message without a position) in front of err. */
static void cfg_prefix(char *err, size_t errlen, const char *file)
{
    size_t fl = strlen(file), sep, el;
    if (!err || !errlen) return;
    sep = isdigit((unsigned char)err[0]) ? 1 : 2;
    if (fl + sep >= errlen) return;
    el = strlen(err);
    if (el > errlen - 1 - fl - sep) el = errlen - 1 - fl - sep;
    memmove(err + fl + sep, err, el);
    memcpy(err, file, fl);
    memcpy(err + fl, ": ", sep);
    err[fl + sep + el] = 0;
}

/* Expands, parses and validates a config text. path is the file it came from (may be NULL):
 * it names the file in messages and relative `cwd`s are resolved against its directory.
 * On success *out owns the result (cfg_free); on failure *out holds the defaults and err
 * says why, e.g. "config.yaml:3:7: unterminated double-quoted scalar". */
static int cfg_parse(const char *text, size_t len, const char *path, struct cfg *out, char *err,
                     size_t errlen)
{
    struct cfg_ctx x;
    struct buf exp = {0};
    struct yaml_node *root;
    struct cfg c;
    int rc = -1;
    cfg_defaults(out);
    cfg_defaults(&c);
    x.file = path ? path : "config";
    x.dir = NULL;
    x.err = err;
    x.errlen = errlen;
    if (err && errlen) err[0] = 0;
    /* Expand, parse, validate. Positions in messages refer to the expanded text, as in the
     * reference engine; they differ from the file only on lines where a value was spliced. */
    if (cfg_dir(&x, path) < 0) return -1;
    if (cfg_expand(text, len, &exp, err, errlen) < 0) {
        cfg_prefix(err, errlen, x.file);
        buf_free(&exp);
        xfree(x.dir);
        return -1;
    }
    root = yaml_parse(exp.p ? (const char *)exp.p + exp.off : "", exp.len - exp.off, x.file, err,
                      errlen);
    buf_free(&exp);
    if (root && cfg_root(&x, &c, root) == 0) { /* c now owns the entries it took from root */
        *out = c;
        rc = 0;
    } else {
        cfg_free(&c);
    }
    yaml_free(root);
    xfree(x.dir);
    return rc;
}

/* Reads and parses the config file at path. A missing file is not an error (docs/§10
 * item 6): *missing = 1, *out = defaults, 0 is returned. Any other failure: -1 and err. */
static int cfg_load(const char *path, struct cfg *out, int *missing, char *err, size_t errlen)
{
    struct stat st;
    char *text = NULL, *t;
    size_t n = 0, cap = 0, got;
    FILE *f;
    int rc;
    *missing = 0;
    cfg_defaults(out);
    /* stdio, not open(2): the FILE is closed before this function returns, so no descriptor
     * can leak into a child. */
    if (!(f = fopen(path, "rb"))) {
        if (errno == ENOENT) {
            *missing = 1;
            return 0;
        }
        if (err && errlen) snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        if (err && errlen) snprintf(err, errlen, "%s: is a directory, not a config file", path);
        return -1;
    }
    for (;;) { /* read to the end, refusing anything over the size limit */
        if (n == cap) {
            if (cap > III_YAML_MAX_BYTES) {
                if (err && errlen)
                    snprintf(err, errlen, "%s: file too large (the limit is %lu bytes)", path,
                             (unsigned long)III_YAML_MAX_BYTES);
                goto fail;
            }
            if (!(t = xrealloc(text, cap ? cap * 2 : 4096))) {
                if (err && errlen) snprintf(err, errlen, "%s: out of memory", path);
                goto fail;
            }
            text = t;
            cap = cap ? cap * 2 : 4096;
        }
        got = fread(text + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        if (err && errlen) snprintf(err, errlen, "%s: read error: %s", path, strerror(errno));
        goto fail;
    }
    fclose(f);
    rc = cfg_parse(text, n, path, out, err, errlen);
    xfree(text);
    return rc;
fail:
    fclose(f);
    xfree(text);
    return -1;
}

/* ==== Hash map ==============================================================================
 * Intrusive chained hash map keyed by byte strings: the node lives inside the object, so an
 * insert allocates nothing but the (rarely grown) bucket array. Keyed SipHash-1-3 hashing, so
 * no client can choose colliding keys; the table doubles at load factor 1. Every keyed object
 * starts with a struct hnode.
 */
struct hnode {
    struct hnode *next; /* bucket chain */
    uint32_t hash;      /* hm_hash(key), cached: table growth never recomputes it */
    uint32_t klen;      /* key bytes (keys may contain NUL: "ns\0id") */
    const char *key;    /* points into the owning object */
};

struct hmap {
    struct hnode **b; /* bucket array, a power of two long (index = hash & (nb - 1)) */
    size_t nb, n;     /* buckets / nodes in the map */
};

/* SipHash-1-3 of the key under the per-process random key (rnd_init): colliding keys cannot be
 * computed in advance (65,536 ids with one FNV-1a hash made every lookup a list walk). */
static uint32_t hm_hash(const char *k, size_t n) { return (uint32_t)siphash13(hm_k0, hm_k1, k, n); }

/* Looks up key k[0..n) whose hm_hash is h (a caller about to insert the key it looked up
 * hashes it once: hm_put_h); returns the node (embedded in its object) or NULL. */
static struct hnode *hm_get_h(const struct hmap *m, const char *k, size_t n, uint32_t h)
{
    if (!m->nb) return NULL;
    for (struct hnode *e = m->b[h & (m->nb - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == n && !memcmp(e->key, k, n)) return e;
    return NULL;
}

/* Looks up key k[0..n); returns the node (embedded in its object) or NULL. */
static struct hnode *hm_get(const struct hmap *m, const char *k, size_t n)
{
    return m->nb ? hm_get_h(m, k, n, hm_hash(k, n)) : NULL;
}

/* Inserts e under key k[0..n), whose hm_hash is h (k must stay valid while e is in the map).
 * 0 ok, -1 OOM. */
static int hm_put_h(struct hmap *m, struct hnode *e, const char *k, size_t n, uint32_t h)
{
    if (m->n >= m->nb) {
        size_t nb = m->nb ? m->nb * 2 : 16;
        struct hnode **b = xcalloc(nb * sizeof *b);
        if (!b) return -1;
        for (size_t i = 0; i < m->nb; i++) {
            struct hnode *x = m->b[i], *nx;
            for (; x; x = nx) {
                nx = x->next;
                x->next = b[x->hash & (nb - 1)];
                b[x->hash & (nb - 1)] = x;
            }
        }
        xfree(m->b);
        m->b = b, m->nb = nb;
    }
    e->key = k, e->klen = (uint32_t)n, e->hash = h;
    e->next = m->b[e->hash & (m->nb - 1)];
    m->b[e->hash & (m->nb - 1)] = e;
    m->n++;
    return 0;
}

/* hm_put_h with the hash computed here. */
static int hm_put(struct hmap *m, struct hnode *e, const char *k, size_t n)
{
    return hm_put_h(m, e, k, n, hm_hash(k, n));
}

/* Unlinks e if it is in m (a node not in the map is a no-op). Frees nothing: the owner of the
 * object does that, after unlinking it from every map it is in. */
static void hm_del(struct hmap *m, struct hnode *e)
{
    if (!m->nb) return;
    struct hnode **pp = &m->b[e->hash & (m->nb - 1)];
    for (; *pp; pp = &(*pp)->next)
        if (*pp == e) {
            *pp = e->next;
            m->n--;
            return;
        }
}

/* Collects every node into a new array (caller frees); *n gets the count. For sorted output. */
static struct hnode **hm_list(const struct hmap *m, size_t *n)
{
    struct hnode **v = xmalloc((m->n ? m->n : 1) * sizeof *v);
    size_t k = 0;
    if (!v) return NULL;
    for (size_t i = 0; i < m->nb; i++)
        for (struct hnode *e = m->b[i]; e; e = e->next) v[k++] = e;
    *n = k;
    return v;
}

/* Frees the bucket array only; the objects belong to whoever put them in. */
static void hm_free(struct hmap *m)
{
    xfree(m->b);
    m->b = NULL, m->nb = m->n = 0;
}

/* ==== Types and the global state ============================================================
 * Connections, functions, calls in flight, trigger types, bindings, name leases and channels.
 * Registry strings are copied once when an object is created and freed with it.
 */
enum conn_kind {
    CK_HTTP,   /* accepted, request head not complete yet */
    CK_WORKER, /* "/" : the worker protocol */
    CK_OTEL,   /* "/otel": telemetry side socket, frames counted and dropped */
    CK_ECHO,   /* "/echo" (--echo only): conformance echo */
    CK_CHAN_W, /* "/ws/channels/<id>?dir=write" */
    CK_CHAN_R, /* "/ws/channels/<id>?dir=read" */
    CK_PLAIN,  /* plain HTTP answer being flushed, then closed */
    CK_CLUSTER /* no socket: the caller of calls that came from other nodes (README "Cluster") */
};
/* Namespace resolution of a worker connection (§1.4): registrations are buffered
 * while PENDING, applied directly once RESOLVED, swallowed once ABORTED (teardown started). */
enum ns_state { NS_PENDING, NS_RESOLVED, NS_ABORTED };

struct func;
struct inv;
struct chan;
struct session;

/* One per connection for its lifetime, the largest part of an idle worker's memory: flags are
 * bits of one word and 4-byte fields sit in pairs, so little of it is padding. */
struct conn {
    struct hnode h;           /* in S.workers, keyed by wid (worker connections only) */
    struct conn *prev, *next; /* S.conns list */
    struct conn *dnext;       /* S.dirty list (output pending) */
    /* fd: the socket (-1 once closed); kind: enum conn_kind. Flags: dirty = on S.dirty; closing =
     * Close queued, input ignored; dead = drop at reap; torn = role teardown done; ws = upgraded;
     * has_pid = pid reported. */
    int fd, kind;
    unsigned dirty : 1, closing : 1, dead : 1, torn : 1, ws : 1, has_pid : 1;
    unsigned in_borrowed : 1; /* c->in points at the shared read buffer (see loop_read) */
    unsigned ep_out : 1;      /* epoll: registered for EPOLLOUT too */
    unsigned reapq : 1;       /* on S.reap: closing or dead, looked at by the reap pass */
    unsigned draining : 1;    /* on S.drain: its queue is applied a slice per turn */
    unsigned retiring : 1;    /* a rolling reload drains it: no new calls */
    unsigned auth_wait : 1;   /* upgraded, waiting for the auth function: no frame is
                                 processed, input is held (bounded) */
    unsigned log_n;           /* log lines about this connection in the current window */
    unsigned log_dropped;     /* ... and those suppressed (LOG_LIMITED) */
    int64_t log_win;          /* start of the current rate-limit window (monotonic ms) */
    struct conn *rnext;       /* S.reap list */
    struct buf in, out, msg;  /* input, queued output, fragmented message being reassembled */
    int msg_op;               /* opcode of the message in msg, 0 when none */
    struct utf8 u8;           /* validator state of a fragmented text message */
    int64_t t_accept, t_rx, t_ping, t_close; /* monotonic ms */
    int64_t connected_wall;                  /* epoch ms, for connected_at_ms */
    char wid[37], token[37];                 /* worker_id and reattach_token */
    char ip[48]; /* peer address text, for logs and engine::workers::list */
    /* metadata from engine::workers::register (NULL = not reported) */
    char *name, *desc, *runtime, *version, *os, *isolation, *telemetry;
    uint32_t pid;                     /* worker's reported process id (valid when has_pid) */
    int ns_state;                     /* enum ns_state (next to pid: no padding after either) */
    char *ns;                         /* resolved namespace (NULL while pending) */
    int64_t grace_at;                 /* when buffered registrations land in default */
    struct buf pendq;                 /* queued frames: [u32 length][bytes]... (worker_queue) */
    size_t pend_frames;               /* records in pendq */
    struct conn *drnext;              /* S.drain list link */
    struct func *funcs;               /* functions this connection owns (f->cnext list) */
    size_t n_funcs;                   /* length of funcs */
    struct trig *trigs;               /* bindings counted against it (t->acct == c) */
    size_t n_trigs;                   /* length of trigs */
    struct ttype *ttypes;             /* trigger types it provides (tt->pnext list) */
    struct lease *lease;              /* its (namespace, name) lease, or NULL */
    char *refusal;                    /* its last registrationrejected, as JSON (workers::info) */
    struct qcall *queued;             /* its calls waiting in routing queues */
    const char *why;                  /* why it closes (static text), for the disconnect log */
    struct session *sess;             /* what it may do (NULL: everything); a reference */
    struct conn *rsnext;              /* S.resume list: its held input is processed next turn */
    struct inv *calls_out, *calls_in; /* calls it made / calls dispatched to it */
    size_t n_out, n_in;               /* lengths of calls_out / calls_in (bounded by limits) */
    struct rcall *rcalls;             /* its calls waiting on other nodes (README "Cluster") */
    struct chan *chan;                /* channel side */
    uint64_t otel_frames;             /* /otel frames received and dropped (docs/§10) */
};

struct func {
    struct hnode h;      /* S.funcs, key "ns\0id" */
    char *key;           /* ns '\0' id */
    size_t klen;         /* key bytes: strlen(ns) + 1 + strlen(id) */
    const char *ns, *id; /* into key */
    struct conn *owner;  /* NULL: in-process builtin */
    struct func *cnext, *cprev; /* owner's list */
    struct idgroup *ig;         /* the functions with the same id in any namespace */
    struct fstat *fst;          /* its /metrics entry (see struct fstat) */
    /* providers (routing: providers: many): the one in S.funcs is the primary; the others are
     * replicas on its rnext chain, in registration order, in no map (and not in the function
     * set's fingerprint: a replica coming or going is no change of the set) */
    struct func *rnext, *primary; /* next provider; a replica's primary (NULL: a primary) */
    size_t rr;                    /* primary: round-robin cursor */
    struct qcall *qhead, *qtail;  /* primary: calls waiting for a provider with room */
    size_t qn;                    /* ... how many */
    struct func *qnext;           /* S.qfuncs link while qn > 0 */
    struct func *inext, *iprev; /* links in ig */
    /* builtin handler (see BI_ARGS); NULL for worker-owned functions */
    void (*bi)(struct conn *caller, const struct jdoc *d, int data, struct buf *res,
               struct buf *err);
    char *desc_raw, *req_raw, *resp_raw, *meta_raw; /* raw JSON values as registered, or NULL */
    int internal;                                   /* metadata.internal == true */
};

/* A builtin's per-call result, owned by the router's stack frame for that one call: the result
 * or error body the builtin writes (res / err, handed to it as pointers), and a binding whose
 * reply must wait for its provider's ack (set by engine::register_trigger). Nothing of a call
 * lives in global state, so a builtin may re-enter the router safely. */
struct trig;
struct bi_res {
    struct buf res, err;
    struct trig *defer;
};

enum inv_kind {
    INV_CALL,    /* the caller waits for the target's result (§3.2) */
    INV_VOID,    /* §3.3: the target still answers; the result is discarded */
    INV_ENQUEUE, /* §3.4: a call to the queue worker on the caller's behalf */
    INV_FIRE,    /* engine-internal: trigger fires and discovery events */
    INV_ACK,     /* register_trigger awaiting its provider */
    INV_AUTH     /* the auth function deciding on a new connection (the caller) */
};

struct inv {
    struct hnode h; /* S.invs keyed by key */
    char id[37];    /* the id the target sees, spelt as the caller spelt it */
    char key[37];   /* id folded to lowercase: ids match whatever case a peer answers in */
    int kind;       /* enum inv_kind */
    struct conn *caller, *target;
    struct inv *cprev, *cnext, *tprev, *tnext; /* caller's / target's in-flight lists */
    char *fid;             /* function_id as requested (JSON string, raw), for the reply */
    size_t fid_len;        /* bytes of fid */
    char *ctx;             /* caller's raw ,"traceparent":..,"baggage":.. members, echoed back */
    size_t ctx_len;        /* bytes of ctx (0: none) */
    char receipt[37];      /* enqueue: the engine's messageReceiptId; ack: the binding id */
    int64_t deadline;      /* when the wait is given up (ack, auth) or the call times out */
    int64_t timeout_ms;    /* a call's deadline as asked (for the invocation_timeout message) */
    size_t hidx;               /* 1 + its index in the deadline heap S.timed, 0 when not in it */
    int notify;                /* tell the target when the call ends without its result
                                  (invocationcancelled): it has a deadline or a routing rule */
    struct fstat *fst;         /* the target function's /metrics entry (NULL: not counted) */
    int64_t t0_us;             /* when it was dispatched (monotonic us) */
    char fid_small[96];    /* inline storage: no allocation for ordinary ids */
    char ctx_small[160];   /* inline storage for ctx (typical traceparent + baggage) */
    struct inv *free_next; /* S.inv_free list link while recycled */
    struct qcall *retry;   /* retry_on_disconnect: the frame, to dispatch again elsewhere */
};

struct ttype {
    struct hnode h;                       /* S.ttypes, key "ns\0id" */
    char *key;                            /* "ns\0id", owned; ns and id point into it */
    size_t klen;                          /* key bytes */
    const char *ns, *id;                  /* into key */
    struct conn *provider;                /* NULL: in-process (the discovery events) */
    struct ttype *pnext;                  /* provider's list (c->ttypes) */
    char *desc_raw, *treq_raw, *creq_raw; /* raw JSON */
};

/* A call waiting in a routing queue (max_inflight reached everywhere), or kept for a retry
 * (retry_on_disconnect): the invokefunction frame as it arrived, and its caller (NULL once the
 * caller left: the entry is then dropped when reached). */
struct qcall {
    struct qcall *next;          /* the function's queue */
    struct qcall *cprev, *cnext; /* the caller's list (c->queued) */
    struct conn *caller;
    int64_t at;                  /* when it was first queued (monotonic ms): deadlines count it */
    size_t n;
    unsigned char frame[];       /* n bytes */
};

/* Per-function call statistics for /metrics, keyed "ns\0id" in S.fstats. An entry outlives
 * its function (a counter must not reset because a worker reconnected) and is never freed
 * before exit; there are at most III_METRIC_FUNCTIONS of them, calls of any further function
 * count under S.fstat_other (function="_other"), so a client registering ids cannot grow the
 * metrics without bound. A function points at its entry from registration on, so a call
 * costs no lookup and no allocation. */
#define FSTAT_BUCKETS 10
static const int64_t FSTAT_LE_US[FSTAT_BUCKETS - 1] = {1000,   5000,   10000,   50000,  100000,
                                                       500000, 1000000, 5000000, 10000000};
struct fstat {
    struct hnode h;
    char *key;                         /* "ns\0id", owned */
    size_t klen;
    uint64_t calls, errors;            /* calls dispatched; those that ended in an error */
    size_t inflight;                   /* calls now in flight */
    uint64_t bucket[FSTAT_BUCKETS];    /* durations: count per bucket (the last is +Inf) */
    uint64_t sum_us;                   /* total duration */
};

/* The functions that share one id across namespaces (S.fids, keyed by the id): what the
 * function_not_found hint and functions::info name, found without a walk over all functions.
 * The group owns no copy of the id: its key is its head's (g->h.key == g->head->id, moved by
 * ig_rekey whenever the head changes), as every member's id is the same bytes. */
struct idgroup {
    struct hnode h;
    struct func *head; /* f->inext chain */
    size_t n;
};

/* Bindings grouped by a key, so that what concerns one trigger type or one target function
 * costs what that group holds, never a walk over every binding: S.tgroups by trigger type id,
 * S.fgroups by "ns\0function_id". A group is freed with its last binding. */
struct tgroup {
    struct hnode h;   /* in S.tgroups or S.fgroups */
    char *key;        /* owned */
    struct trig *head; /* its bindings (t->type_next or t->fn_next chain) */
    size_t n;         /* how many */
};

struct trig {
    struct hnode h;        /* S.trigs keyed by id */
    char *id, *type, *fid; /* binding id, trigger type id, target function id (owned copies) */
    char *config_raw, *meta_raw; /* raw JSON as registered (meta may be NULL) */
    struct conn *owner;          /* NULL: durable (engine::register_trigger) */
    struct conn *acct;           /* the connection it counts against: its owner, or for a
                                    durable one its creator while that is connected */
    char *ns;                    /* target namespace */
    char *trigger_ns;            /* explicit provider namespace or NULL */
    char *home_ns;               /* registering connection's namespace */
    char *provider_ns;           /* where the provider was found (live only) */
    int live;                    /* 0: parked */
    struct tgroup *tg, *fg;      /* its type group and its target-function group */
    struct trig *type_prev, *type_next, *fn_prev, *fn_next; /* links in those groups */
    struct trig *acct_prev, *acct_next;                     /* link in acct->trigs */
    struct session *sess; /* the session it was made under (a reference; NULL: full access):
                             discovery events to it are filtered by what that session sees */
};

/* A (namespace, worker name) lease (§5.9): one live worker per name in a namespace. The lease
 * and the connection point at each other (c->lease), and teardown frees it through that
 * pointer, so a lease can never outlive or lose its owner. */
struct lease {
    struct hnode h;     /* S.leases key "ns\0name" */
    char *key;          /* "ns\0name", owned */
    size_t klen;        /* key bytes */
    struct conn *owner; /* the connection that claimed the name */
};

struct chan {
    struct hnode h;               /* S.chans keyed by channel id */
    char id[37], key[37];         /* channel id and its access key (both UUIDv4, §5.13) */
    struct conn *w, *r;           /* writer and reader connections (NULL until attached) */
    int w_taken, r_taken, w_done; /* each end attaches once; w_done: writer closed */
    struct buf pending;           /* frames written before the reader arrived */
    int64_t created; /* monotonic ms: swept if not fully connected within III_CHANNEL_TTL_MS */
};

struct settings {
    char *host; /* bind address */
    int port;   /* configured port (0 = any free port) */
    int64_t handshake_timeout_ms, ping_interval_ms, idle_timeout_ms;
    size_t max_message_bytes, max_frame_bytes, max_header_bytes, max_connections,
        max_outbound_bytes;
    size_t max_pending_bytes, max_pending_frames;       /* registration buffer before announce */
    size_t max_inflight_per_connection, max_inflight_total; /* calls in flight */
    size_t max_functions_per_connection;                /* functions one connection may own */
    size_t max_triggers_per_connection, max_triggers_per_function, max_triggers; /* bindings */
    size_t max_memory_bytes; /* all the engine's allocations together; 0 = no budget */
    char **origins;   /* allowed Origin values; "*" allows any (docs/§10 item 7) */
    size_t n_origins; /* entries in origins */
};

/* Sessions and the listener's authentication (see the section Sessions and authorization). */
struct session {
    unsigned refs;
    int full;       /* allows everything, never filtered (a plain token, or no auth) */
    int restricted; /* names namespaces or allowed_functions: what is not granted is denied */
    char *json;     /* the session object as JSON, owned */
    struct jdoc d;  /* tokens of json (d.t owned) */
    int ns, allowed, forbidden, prefix, ctx; /* members of d, -1 when absent */
    int fn_reg, tt_reg;                      /* allow_function/trigger_type_registration */
};

/* The listener's authentication, built from the config at start and on every reload. */
struct auth {
    int on;                /* unauthenticated upgrades are refused (tokens or an auth function) */
    char **tok;            /* the tokens (plain or from an entry), in config order */
    size_t *tok_len, ntok;
    struct session **tok_sess;
    char *auth_fn;         /* rbac.auth_function_id, or NULL */
    char *rbac_json;       /* the rbac block (owned), its tokens, and members of it */
    struct jdoc rbac;
    int expose, rforbid;   /* rbac.expose_functions / rbac.forbidden_functions, -1 absent */
    char *middleware;      /* middleware_function_id, or NULL */
    int metrics_public;
    struct session *anon;  /* the session of a connection with no token when `on` is 0 but rbac
                              is configured: nothing granted, rbac.expose_functions decides */
};
static struct auth *AUTH; /* NULL: no authentication configured */
static char worker_token[65]; /* III_TOKEN given to declared workers (full access) */

static struct {
    struct settings set;  /* listener settings in force */
    int64_t grace_ms;     /* namespace grace period (§1.4) */
    const char *cfg_path; /* config file (--config), or NULL for built-in defaults */
    int lfd;              /* listening socket */
    int bound_port;       /* actual port (differs from set.port when that is 0) */
    struct cfg cfg;       /* the configuration in force */
    char listen_url[80];  /* ws://host:port, for the listening line and logs */
    char worker_url[80];  /* the URL declared workers are given (III_URL): see listener_url */
    int echo;             /* --echo: serve /echo for conformance suites */
    int sigpipe[2];       /* self-pipe: the signal handler writes, the loop polls */
    volatile sig_atomic_t sig_term, sig_hup, sig_chld; /* set by the handler only */
    int stop;                                          /* shutdown requested */
    int exit_code;                                     /* returned by main after shutdown */
    struct conn *conns;                                /* every connection, doubly linked */
    size_t nconns;      /* length of conns, checked against max_connections */
    struct conn *dirty; /* connections with output to write this turn */
    struct hmap workers, funcs, invs, ttypes, trigs, leases, chans, tgroups, fgroups, fids, fstats;
    struct fstat fstat_other; /* calls of functions beyond III_METRIC_FUNCTIONS */
    struct inv *inv_free;         /* recycled call records (capped at 4096) */
    size_t inv_free_n;            /* length of inv_free */
    int64_t start_ms, start_wall; /* monotonic / epoch ms at start, for uptime */
    int64_t accept_pause_until;   /* accept() backs off after EMFILE */
    uint64_t fn_fp, fn_fp_sent;   /* discovery: fingerprint of the function id set */
    int64_t fn_event_at;          /* discovery: no functions_changed before this (pacing) */
    uint64_t cl_rver, cl_rver_sent; /* cluster: bumped when the remote view changes; announced */
    size_t cl_nrfn;               /* cluster: remote functions held, over all nodes */
    uint64_t reg_ver;             /* bumped when a worker or a trigger type comes, goes or changes */
    int64_t chan_sweep_at;        /* next sweep of unclaimed channels */
    size_t fn_n, fn_n_sent;       /* function count now / at the last event */
    struct jdoc jd;               /* scratch envelope tokens, reused: no allocation per message */
    struct buf tmp, tmp2;         /* scratch output */
    uint64_t n_invocations, n_inv_errors, n_spawns, n_deaths, n_msgs_in;
    size_t n_acks;      /* calls of kind INV_ACK in flight */
    struct inv **timed; /* min-heap on deadline: acks, auth calls, calls with a deadline */
    size_t ntimed, timed_cap;
    int draining;       /* SIGTERM seen: no new calls, in-flight ones get drain_timeout_ms */
    struct func *qfuncs; /* primaries with calls waiting in their routing queue */
    int64_t qwait_ms;    /* while route_tick dispatches a queued call: how long it waited */
    int64_t drain_until;
    struct conn *reap;  /* connections closing or dead: all the reap pass looks at */
    struct conn *drain; /* connections whose queue is being applied, a slice per turn */
    struct conn *resume; /* admitted by the auth function: their held input goes next turn */
    int64_t timer_at;   /* earliest connection deadline: the timer scan waits for it */
    int ep;             /* epoll descriptor, -1 when every connection is polled each turn */
    int reap_now;       /* a dead connection waits on S.reap: do not sleep before reaping it */
    uint64_t n_busy;    /* calls refused with BUSY (a bound or the memory budget) */
    int spare_fd;       /* a descriptor held in reserve for accept() at EMFILE, or -1 */
} S;

static const char NS_DEFAULT[] = "default";

/* ==== Sockets ===============================================================================
 * Non-blocking, close-on-exec sockets; TCP_NODELAY on every accepted connection (frames are
 * small and latency-bound). IPv4 and IPv6 through getaddrinfo.
 */
/* Makes fd non-blocking and close-on-exec (children must not inherit engine sockets). 0 ok,
 * -1 with errno from fcntl. */
static int net_flags(int fd)
{
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
    return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* Binds and listens on host:port. Returns the fd, or -1 with a message in err. */
static int net_listen(const char *host, int port, int *bound_port, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL, *ai;
    char ps[16];
    int fd = -1, e = 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "cannot resolve listen host '%s': %s", host, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 1024) == 0 &&
            net_flags(fd) == 0)
            break;
        e = errno;
        close(fd);
        fd = -1;
    }
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(e));
        freeaddrinfo(res);
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *bound_port = port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) *bound_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            *bound_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    freeaddrinfo(res);
    return fd;
}

/* Text form of a peer address, without port. */
static void net_peer(const struct sockaddr_storage *ss, char *out, size_t n)
{
    out[0] = 0;
    if (ss->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, out, (socklen_t)n);
    else if (ss->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, out, (socklen_t)n);
}

/* ==== WebSocket frames ======================================================================
 * RFC 6455 §5. Outgoing frames are built directly in the destination's output buffer: the
 * header is reserved from a size estimate and fixed up (memmove only when the estimate picked
 * the wrong header size). Server frames are never masked; the CLI client masks its own.
 */
enum { WS_CONT = 0, WS_TEXT = 1, WS_BIN = 2, WS_CLOSE = 8, WS_PING = 9, WS_PONG = 10 };

/* Header bytes for an unmasked payload of n bytes: 7-bit, 16-bit or 64-bit length (§5.2). */
static size_t ws_hdr_len(size_t n) { return n < 126 ? 2 : n < 65536 ? 4 : 10; }

/* The bulk of a frame being built that is not in its buffer (conn_put_big, conn_frame_end): n
 * bytes at p that belong at offset `at` (from b->off) of b's data. At most one exists, and only
 * inside one frame builder's call: from conn_put_big to the conn_frame_end of the same frame,
 * which writes or copies it; p is never kept past that. ws_end counts it in the frame length. */
static struct {
    struct buf *b; /* NULL: none */
    size_t at, n;
    const unsigned char *p;
} wsplice;

/* Starts a frame in b for a payload of about est bytes; returns a position token for ws_end,
 * or SIZE_MAX when even the estimate does not fit (b->err is then set). The token is relative
 * to b->off, so buffer compaction cannot break it. mask: room for a masking key (client frames).
 * The payload is then appended with any buf_* calls, unchecked: ws_end checks them all. */
static size_t ws_begin(struct buf *b, size_t est, int mask)
{
    size_t hl = ws_hdr_len(est) + (mask ? 4 : 0);
    if (est > SIZE_MAX - 16) {
        b->err = BUF_ENOMEM;
        return SIZE_MAX;
    }
    if (buf_reserve(b, hl + est) < 0) return SIZE_MAX;
    size_t at = b->len - b->off;
    /* the header's first byte remembers the reserved size until ws_end writes the real header */
    b->p[b->len] = (unsigned char)hl;
    b->len += hl;
    return at;
}

/* Finishes the frame started at `at`: writes FIN + opcode and the real length (mask bit from
 * `mask`: the CLI client masks with a zero key, which is legal and keeps the code simple).
 * If any append since ws_begin failed, the partial frame is removed again and the error
 * returned: 0 ok, -BUF_ENOMEM, or -BUF_ELIMIT (the buffer's cap). The sticky error is cleared. */
static int ws_end(struct buf *b, size_t at, int op, int mask)
{
    if (at == SIZE_MAX || b->err) {
        int e = buf_check(b);
        if (at != SIZE_MAX) b->len = b->off + at;
        if (wsplice.b == b) wsplice.b = NULL;
        return e == BUF_ELIMIT ? -BUF_ELIMIT : -BUF_ENOMEM;
    }
    /* out: bytes of the payload held outside b (wsplice), counted in the length only */
    size_t out = wsplice.b == b ? wsplice.n : 0;
    size_t pos = b->off + at, hl0 = b->p[pos], in = b->len - pos - hl0, n = in + out;
    size_t hl = ws_hdr_len(n) + (mask ? 4 : 0);
    /* the estimate chose another length encoding: slide the payload to fit the real header */
    if (hl != hl0) {
        if (hl > hl0 && buf_reserve(b, hl - hl0) < 0) {
            int e = buf_check(b);
            b->len = b->off + at;
            if (out) wsplice.b = NULL; /* (the frame is gone: so is its note) */
            return e == BUF_ELIMIT ? -BUF_ELIMIT : -BUF_ENOMEM;
        }
        pos = b->off + at;
        memmove(b->p + pos + hl, b->p + pos + hl0, in);
        b->len = pos + hl + in;
        if (out) wsplice.at = wsplice.at + hl - hl0;
    }
    unsigned char *h = b->p + pos;
    unsigned char mb = mask ? 0x80 : 0;
    h[0] = (unsigned char)(0x80 | op);
    if (n < 126) {
        h[1] = (unsigned char)(mb | n);
    } else if (n < 65536) {
        h[1] = mb | 126, h[2] = (unsigned char)(n >> 8), h[3] = (unsigned char)n;
    } else {
        h[1] = mb | 127;
        uint64_t v = n;
        for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)(v >> (56 - 8 * i));
    }
    if (mask) memset(h + hl - 4, 0, 4); /* zero masking key: payload unchanged */
    return 0;
}

/* Appends one complete frame. 0, or -BUF_ENOMEM / -BUF_ELIMIT (nothing appended). */
static int ws_frame(struct buf *b, int op, const void *p, size_t n, int mask)
{
    size_t at = ws_begin(b, n, mask);
    buf_append(b, p, n);
    return ws_end(b, at, op, mask);
}

/* Close codes a peer may send (RFC 6455 §7.4.1, IANA registry): 1000-1003, 1007-1014,
 * 3000-4999. 1004-1006 and 1015 are reserved for local use and never on the wire. */
static int ws_close_code_ok(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

/* Computes Sec-WebSocket-Accept for key (RFC 6455 §4.2.2). out: 29 bytes. */
static void ws_accept_key(const char *key, size_t klen, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    struct sha1 s;
    unsigned char dg[20];
    sha1_init(&s);
    sha1_update(&s, key, klen);
    sha1_update(&s, guid, sizeof guid - 1);
    sha1_final(&s, dg);
    b64_encode(dg, 20, out);
}

/* Incremental frame header parser. Given the bytes available, returns >0 = header length and
 * fills *op, *fin, *plen, mask; 0 = need more bytes; -1 = protocol error with *code set
 * (1002, or 1009 for a frame over max_frame). `server`: frames must be masked (and vice
 * versa for the client side). The 64-bit length is checked before any conversion. */
static int ws_parse_hdr(const unsigned char *p, size_t avail, int server, size_t max_frame, int *op,
                        int *fin, size_t *plen, unsigned char mask[4], int *code)
{
    if (avail < 2) return 0;
    int b0 = p[0], b1 = p[1];
    *fin = b0 >> 7;
    *op = b0 & 15;
    *code = 1002;
    if (b0 & 0x70) return -1;                        /* RSV without extension */
    if ((*op > 2 && *op < 8) || *op > 10) return -1; /* reserved opcodes */
    if (!!(b1 & 0x80) != !!server) return -1;        /* §5.1 masking rules */
    size_t hl = 2 + (server ? 4 : 0);
    uint64_t n = b1 & 127;
    if (n == 126) hl += 2;
    else if (n == 127) hl += 8;
    if (avail < hl) return 0;
    if (n == 126) {
        n = (uint64_t)p[2] << 8 | p[3];
    } else if (n == 127) {
        n = 0;
        for (int i = 0; i < 8; i++) n = n << 8 | p[2 + i];
        if (n >> 63) return -1; /* §5.2: MSB must be 0 */
    }
    if (*op >= 8 && (!*fin || n > 125)) return -1; /* §5.5 control frames */
    if (n > (uint64_t)max_frame) {
        *code = 1009;
        return -1;
    }
    *plen = (size_t)n;
    if (server) memcpy(mask, p + hl - 4, 4);
    return (int)hl;
}

/* Unmasks n bytes in place; the key phase starts at 0. Word-at-a-time for long payloads.
 * Returns 1 when every unmasked byte is ASCII, noted in the same pass: such a text payload is
 * valid UTF-8 without a second walk over it. */
static inline int ws_unmask(unsigned char *p, size_t n, const unsigned char k[4])
{
    size_t i = 0;
    uint64_t acc = 0;
    if (n >= 16) {
        uint32_t k32;
        memcpy(&k32, k, 4); /* host order is fine: the same bytes XOR the same bytes */
        uint64_t k64 = (uint64_t)k32 << 32 | k32;
#ifdef III_SSE2
        /* sixteen bytes a step (i stays a multiple of 4: the key phase is unchanged) */
        __m128i km = _mm_set1_epi32((int)k32), any = _mm_setzero_si128();
        for (; i + 16 <= n; i += 16) {
            __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(const void *)(p + i)), km);
            any = _mm_or_si128(any, v);
            _mm_storeu_si128((__m128i *)(void *)(p + i), v);
        }
        if (_mm_movemask_epi8(any)) acc = UINT64_C(0x80);
#endif
        for (; i + 8 <= n; i += 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            w ^= k64;
            acc |= w;
            memcpy(p + i, &w, 8);
        }
    }
    for (; i < n; i++) {
        p[i] ^= k[i & 3];
        acc |= p[i];
    }
    return !(acc & UINT64_C(0x8080808080808080));
}

#ifdef III_SSE2
/* ws_unmask_note's loop over nb 64-byte blocks at p (key k32, phase 0): unmasks them, sets
 * jnote.bits, and returns 1 when every byte is ASCII. */
static int ws_note_blocks(unsigned char *p, size_t nb, uint32_t k32)
{
    const __m128i km = _mm_set1_epi32((int)k32), flip = _mm_set1_epi8((char)0x82),
                  lim = _mm_set1_epi8((char)0xA1);
    __m128i any = _mm_setzero_si128();
    /* 64 blocks (4 KiB) a word of bits; each block: unmask, store, note (json_special16) */
    for (size_t b = 0; b < nb; b += 64) {
        size_t e = nb - b < 64 ? nb - b : 64;
        uint64_t w = 0;
        for (size_t j = 0; j < e; j++) {
            __m128i *q = (__m128i *)(void *)(p + 64 * (b + j));
            __m128i v0 = _mm_xor_si128(_mm_loadu_si128(q), km),
                    v1 = _mm_xor_si128(_mm_loadu_si128(q + 1), km),
                    v2 = _mm_xor_si128(_mm_loadu_si128(q + 2), km),
                    v3 = _mm_xor_si128(_mm_loadu_si128(q + 3), km);
            _mm_storeu_si128(q, v0), _mm_storeu_si128(q + 1, v1);
            _mm_storeu_si128(q + 2, v2), _mm_storeu_si128(q + 3, v3);
            any = _mm_or_si128(any, _mm_or_si128(_mm_or_si128(v0, v1), _mm_or_si128(v2, v3)));
            __m128i sp = _mm_or_si128(
                _mm_or_si128(json_special16(v0, flip, lim), json_special16(v1, flip, lim)),
                _mm_or_si128(json_special16(v2, flip, lim), json_special16(v3, flip, lim)));
            w |= (uint64_t)(_mm_movemask_epi8(sp) != 0) << j;
        }
        jnote.bits[b / 64] = w;
    }
    return !_mm_movemask_epi8(any);
}

#ifdef III_AVX2
/* ws_note_blocks 32 bytes a step (the same test as json_special16, on 32 bytes); the same bits
 * and result. Only called when the CPU has AVX2 (ws_avx2). */
__attribute__((target("avx2"))) static int ws_note_blocks_avx2(unsigned char *p, size_t nb,
                                                               uint32_t k32)
{
    const __m256i km = _mm256_set1_epi32((int)k32), flip = _mm256_set1_epi8((char)0x82),
                  lim = _mm256_set1_epi8((char)0xA1), bs = _mm256_set1_epi8('\\');
    __m256i any = _mm256_setzero_si256();
    for (size_t b = 0; b < nb; b += 64) {
        size_t e = nb - b < 64 ? nb - b : 64;
        uint64_t w = 0;
        for (size_t j = 0; j < e; j++) {
            __m256i *q = (__m256i *)(void *)(p + 64 * (b + j));
            __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256(q), km),
                    v1 = _mm256_xor_si256(_mm256_loadu_si256(q + 1), km);
            _mm256_storeu_si256(q, v0), _mm256_storeu_si256(q + 1, v1);
            any = _mm256_or_si256(any, _mm256_or_si256(v0, v1));
            __m256i s0 = _mm256_or_si256(_mm256_cmpgt_epi8(lim, _mm256_xor_si256(v0, flip)),
                                         _mm256_cmpeq_epi8(v0, bs)),
                    s1 = _mm256_or_si256(_mm256_cmpgt_epi8(lim, _mm256_xor_si256(v1, flip)),
                                         _mm256_cmpeq_epi8(v1, bs));
            w |= (uint64_t)(_mm256_movemask_epi8(_mm256_or_si256(s0, s1)) != 0) << j;
        }
        jnote.bits[b / 64] = w;
    }
    return !_mm256_movemask_epi8(any);
}

/* 1 when ws_note_blocks_avx2 may run (the CPU and the OS support AVX2), -1 until asked. */
static int ws_avx2 = -1;

/* Asks the CPU, once: AVX2 (CPUID leaf 7, EBX bit 5) is usable only when the OS saves the AVX
 * registers too (leaf 1: OSXSAVE and AVX, ECX bits 27 and 28; XCR0: the SSE and AVX state, bits
 * 1 and 2). cpuid.h's macros and one xgetbv, rather than __builtin_cpu_supports, which links
 * libgcc's 4.5 KB CPU-model table into the binary. */
static int ws_cpu_avx2(void)
{
    unsigned a, b, c, d, hi;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    if ((c & (3u << 27)) != 3u << 27) return 0;
    __asm__ volatile("xgetbv" : "=a"(a), "=d"(hi) : "c"(0));
    if ((a & 6) != 6) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (int)((b >> 5) & 1);
}
#endif

/* ws_unmask for a large message about to be parsed: the same pass notes its clean 64-byte blocks
 * (jnote's bits, nb and ascii; the caller sets jnote.s around the delivery), so the string scan
 * reads the payload's bytes once instead of twice. Returns what ws_unmask returns. */
static int ws_unmask_note(unsigned char *p, size_t n, const unsigned char k[4]) III_NOINLINE;
static int ws_unmask_note(unsigned char *p, size_t n, const unsigned char k[4])
{
    /* the blocks start at the first 64-byte boundary of memory, h bytes in: no load or store
     * splits a cache line; the h bytes before are unmasked on their own */
    size_t h = (size_t)(-(uintptr_t)p & 63),
           nb = ((n < III_SCAN_NOTE_MAX ? n : III_SCAN_NOTE_MAX) - h) / 64, t = h + 64 * nb;
    const unsigned char kh[4] = {k[h & 3], k[(h + 1) & 3], k[(h + 2) & 3], k[(h + 3) & 3]};
    uint32_t k32;
    memcpy(&k32, kh, 4); /* the key in its phase at byte h; host order is fine (XOR) */
    int ascii = ws_unmask(p, h, k);
#ifdef III_AVX2
    if (ws_avx2 < 0) ws_avx2 = ws_cpu_avx2();
    if (ws_avx2) ascii &= ws_note_blocks_avx2(p + h, nb, k32);
    else
#endif
        ascii &= ws_note_blocks(p + h, nb, k32);
    /* the tail, in the same key phase as byte h (64 * nb is a multiple of 4) */
    ascii &= ws_unmask(p + t, n - t, kh);
    jnote.h = h, jnote.nb = nb, jnote.ascii = ascii;
    return ascii;
}
#endif

/* Unmasks a data frame's payload: ws_unmask, or for a large whole message to a worker
 * ws_unmask_note (*noted set). */
static inline int ws_unmask_msg(const struct conn *c, int op, int fin, unsigned char *p,
                                size_t n, const unsigned char k[4], int *noted)
{
#ifdef III_SSE2
    if (n >= III_SCAN_NOTE_MIN && fin && (op == WS_TEXT || op == WS_BIN) && c->kind == CK_WORKER) {
        *noted = 1;
        return ws_unmask_note(p, n, k);
    }
#else
    (void)c, (void)op, (void)fin;
#endif
    *noted = 0;
    return ws_unmask(p, n, k);
}

/* ==== Connections ===========================================================================
 * A connection is never freed inside its own handler: handlers mark it (closing: a Close frame
 * is queued and being flushed; dead: drop now) and the loop's reap pass tears it down and frees
 * it after dispatch. Output is appended to c->out and the connection put on the dirty list; the
 * loop writes each dirty connection once per turn.
 */
static void worker_on_open(struct conn *c);
static void sess_unref(struct session *s);
static struct session *sess_ref(struct session *s);
static struct session *auth_token(const char *tok, size_t n);
static void auth_begin(struct conn *c, const struct buf *hq);
static void worker_on_message(struct conn *c, const unsigned char *p, size_t n, int check_utf8);
static void worker_teardown(struct conn *c);
static void chan_on_message(struct conn *c, int op, const unsigned char *p, size_t n);
static void chan_teardown(struct conn *c);
static void http_health(struct buf *b);
static void http_metrics(struct buf *b);
static struct chan *chan_lookup(const char *path, const char *query, int *dir, int *status);

/* Puts c on S.dirty (once) so the loop writes its output this turn (coalesced output). */
static void conn_dirty(struct conn *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        c->dnext = S.dirty;
        S.dirty = c;
    }
}

/* 1 if frames may still be queued to c. */
static int conn_open(const struct conn *c) { return !c->closing && !c->dead; }

/* Puts c on the reap list (once): closing and dead connections are all the reap pass visits,
 * so a turn costs nothing per idle connection. */
static void reap_push(struct conn *c)
{
    if (c->dead) S.reap_now = 1;
    if (c->reapq) return;
    c->reapq = 1;
    c->rnext = S.reap;
    S.reap = c;
}

/* A deadline at t exists: the next timer scan happens no later than t. */
static void timer_touch(int64_t t)
{
    if (t < S.timer_at) S.timer_at = t;
}

/* Drops c at once, without a Close frame (I/O error, EOF, slow reader, OOM). */
static void conn_abort(struct conn *c, const char *why)
{
    if (c->dead) return;
    if (c->kind == CK_WORKER) LOG(LOG_DEBUG, "worker %s: closing: %s", c->wid, why);
    if (!c->why) c->why = why;
    c->dead = 1;
    reap_push(c);
}

/* Drops c after an allocation failed on its behalf, logged at warn (an embedded engine near
 * its memory limit must be able to see why peers go away). */
static void conn_oom(struct conn *c)
{
    if (c->dead) return;
    LOG(LOG_WARN, "connection %s: out of memory; closing it",
        c->kind == CK_WORKER ? c->wid : c->ip);
    conn_abort(c, "out of memory");
}

/* Per-connection log rate limit (LOG_LIMITED): at most III_LOG_BURST lines per
 * III_LOG_WINDOW_MS about one connection, so a peer cannot turn its bytes into more bytes of
 * log; what was held back is counted in one line when the next window opens. */
static int log_allow(struct conn *c)
{
    int64_t now = now_ms();
    if (now - c->log_win >= III_LOG_WINDOW_MS) {
        if (c->log_dropped)
            LOG(LOG_WARN, "connection %s: %u more log lines about it were suppressed",
                c->kind == CK_WORKER ? c->wid : c->ip, c->log_dropped);
        c->log_win = now, c->log_n = 0, c->log_dropped = 0;
    }
    if (c->log_n < III_LOG_BURST) {
        c->log_n++;
        return 1;
    }
    c->log_dropped++;
    return 0;
}
#define LOG_LIMITED(c, level, ...)                                                                 \
    do {                                                                                           \
        if ((level) <= log_level && log_allow(c)) log_write((level), __VA_ARGS__);                 \
    } while (0)

/* 1 when the engine's allocations are over max_memory_bytes: new work (calls, connections) is
 * refused until memory comes back. */
static int mem_over_budget(void)
{
    return S.set.max_memory_bytes && mem_live_bytes > S.set.max_memory_bytes;
}

/* A frame could not be queued to c (rc from ws_end/ws_frame): over its outbound cap means a
 * reader that does not keep up, which is disconnected rather than allowed to grow the engine's
 * memory; anything else is out of memory. Either way only c goes. */
static void conn_fail(struct conn *c, int rc)
{
    if (rc == -BUF_ELIMIT) {
        LOG(LOG_WARN, "connection %s: outbound queue over %zu bytes, disconnecting a slow reader",
            c->kind == CK_WORKER ? c->wid : c->ip, c->out.lim);
        conn_abort(c, "slow reader");
    } else {
        conn_oom(c);
    }
}

/* Starts a close: queues a Close frame with code (0 = no code) on WebSocket connections and
 * stops processing input; the reap pass closes the socket once the frame is flushed. */
static void conn_close(struct conn *c, unsigned code, const char *reason)
{
    if (c->closing || c->dead) return;
    if (!c->why) c->why = reason && *reason ? reason : "closed by the engine";
    if (c->ws) {
        unsigned char p[125];
        size_t n = 0;
        if (code) {
            p[0] = (unsigned char)(code >> 8), p[1] = (unsigned char)code, n = 2;
            size_t rl = reason ? strlen(reason) : 0;
            /* RFC 6455 §5.5: a control frame payload is at most 125 bytes, 2 of them the code */
            if (rl > sizeof p - 2) rl = sizeof p - 2;
            if (rl) memcpy(p + 2, reason, rl), n += rl;
        }
        int rc = ws_frame(&c->out, WS_CLOSE, p, n, 0);
        if (rc < 0) {
            conn_fail(c, rc);
            return;
        }
    }
    c->closing = 1;
    c->t_close = now_ms();
    reap_push(c);
    timer_touch(c->t_close + III_CLOSE_FLUSH_MS);
    conn_dirty(c);
}

/* Queues a frame to c. Every engine-originated frame (results, pongs, rejections, events) goes
 * through c->out and so through its cap; a failure to queue drops c (conn_fail). */
static void conn_frame(struct conn *c, int op, const void *p, size_t n)
{
    if (!conn_open(c)) return;
    int rc = ws_frame(&c->out, op, p, n, 0);
    if (rc < 0) {
        conn_fail(c, rc);
        return;
    }
    conn_dirty(c);
}

/* Large payloads written from where they lie. A routed call's data, or a worker's result, is
 * nearly all of its frame, and it already sits (unmasked, validated) in the input of the
 * connection it came from. Copying it into the target's c->out to write it from there at the
 * end of the turn costs one more pass over every byte. Instead a frame builder hands such a
 * payload to conn_put_big, which only notes where it lies (wsplice), and conn_frame_end writes
 * the frame at once with one writev: c->out up to the payload, the payload, the rest of c->out.
 * Only what the socket does not take is copied into c->out, in order, and waits there as usual.
 * Invariants: the payload is referenced only until the conn_frame_end of its frame (inside one
 * builder call), so it never outlives the input it points into; the bytes that do not go out at
 * once are the ones that would have been queued anyway, and they go through c->out's cap (a
 * payload that could never fit in the cap is appended, and refused, as before); a payload is
 * only spliced when the frame is all c->out holds (queued output first means a full socket:
 * the copy it saves would be made anyway) and when it has III_SPLICE_MIN bytes or more (smaller
 * ones are cheap to copy, and coalesce with other frames into one write). */

/* conn_put_big's half for a large payload: notes it, unless the cap refuses it anyway. */
static int conn_splice_note(struct conn *c, const void *p, size_t n)
{
    struct buf *b = &c->out;
    if (b->err || (b->lim && (n > b->lim || buf_used(b) > b->lim - n))) return buf_append(b, p, n);
    wsplice.b = b, wsplice.at = buf_used(b), wsplice.p = p, wsplice.n = n;
    return 0;
}

/* Appends p[0..n) to the frame that ws_begin started at `at` in c->out, or notes it (above).
 * 0, or -1 with c->out's sticky error set, like buf_append. */
static inline int conn_put_big(struct conn *c, size_t at, const void *p, size_t n)
{
    if (n < III_SPLICE_MIN || at != 0 || wsplice.b) return buf_append(&c->out, p, n);
    return conn_splice_note(c, p, n);
}

/* conn_frame_end's half for a frame with a noted payload: one writev of the frame (c->out holds
 * nothing else), then whatever the socket did not take copied into c->out in order. 0, or -1
 * when c was dropped. */
static int conn_splice_write(struct conn *c) III_NOINLINE;
static int conn_splice_write(struct conn *c)
{
    struct buf *b = &c->out;
    const unsigned char *p = wsplice.p;
    size_t n = wsplice.n, at = wsplice.at, used = buf_used(b), w = 0;
    wsplice.b = NULL;
    if (conn_open(c) && c->fd >= 0 && c->kind != CK_CLUSTER) {
        struct iovec v[3];
        v[0].iov_base = buf_data(b), v[0].iov_len = at;
        v[1].iov_base = (void *)(uintptr_t)p, v[1].iov_len = n;
        v[2].iov_base = buf_data(b) + at, v[2].iov_len = used - at;
        ssize_t r;
        do r = writev(c->fd, v, 3);
        while (r < 0 && errno == EINTR);
        if (r > 0) w = (size_t)r;
        else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_abort(c, "write error");
            return -1;
        }
    }
    if (w >= at + n) {
        buf_consume(b, w - n);
        return 0;
    }
    /* the part of the payload not written goes where it belongs: between the two parts of c->out */
    size_t sent = w > at ? w - at : 0, left = n - sent;
    if (buf_reserve(b, left) < 0) {
        conn_fail(c, buf_check(b) == BUF_ELIMIT ? -BUF_ELIMIT : -BUF_ENOMEM);
        return -1;
    }
    unsigned char *q = b->p + b->off + at;
    memmove(q + left, q, used - at);
    memcpy(q, p + sent, left);
    b->len += left;
    buf_consume(b, w - sent);
    return 0;
}

/* Ends a frame built by hand in c->out since ws_begin returned `at`: checks every append at
 * once (the buffer's sticky error), rolls a failed frame back and drops c, else marks c dirty
 * (a frame with a payload noted by conn_put_big is written at once, the rest queued).
 * 0 ok, -1 when c was dropped. */
static int conn_frame_end(struct conn *c, size_t at)
{
    int rc = ws_end(&c->out, at, WS_TEXT, 0);
    if (rc < 0) {
        conn_fail(c, rc);
        return -1;
    }
    if (wsplice.b == &c->out) {
        if (conn_splice_write(c) < 0) return -1;
        if (!buf_used(&c->out)) { /* all written */
            buf_out_park(&c->out);
            return 0;
        }
    }
    conn_dirty(c);
    return 0;
}

/* A new connection in state CK_HTTP for an accepted fd, linked into S.conns. Takes ownership
 * of fd (closed by conn_free); ip is copied. NULL on OOM (the caller closes fd). */
static struct conn *conn_new(int fd, const char *ip)
{
    struct conn *c = xcalloc(sizeof *c);
    if (!c) return NULL;
    c->fd = fd;
    c->kind = CK_HTTP;
    c->out.lim = S.set.max_outbound_bytes, c->out.park = 1;
    c->t_accept = c->t_rx = now_ms();
    snprintf(c->ip, sizeof c->ip, "%s", ip);
#ifdef III_EPOLL
    if (S.ep >= 0 && fd >= 0) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.ptr = c;
        if (epoll_ctl(S.ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            xfree(c);
            return NULL;
        }
    }
#endif
    timer_touch(c->t_accept + S.set.handshake_timeout_ms);
    c->next = S.conns;
    if (S.conns) S.conns->prev = c;
    S.conns = c;
    S.nconns++;
    return c;
}

/* Unlinks c, closes its fd and frees it with its buffers and metadata strings. Only the reap
 * pass calls this, after the role's teardown: never from inside one of c's handlers. */
static void conn_free(struct conn *c)
{
    for (struct conn **pp = &S.resume; *pp; pp = &(*pp)->rsnext)
        if (*pp == c) {
            *pp = c->rsnext;
            break;
        }
    if (c->log_dropped)
        LOG(LOG_WARN, "connection %s: %u more log lines about it were suppressed",
            c->kind == CK_WORKER ? c->wid : c->ip, c->log_dropped);
    if (c->prev) c->prev->next = c->next;
    else S.conns = c->next;
    if (c->next) c->next->prev = c->prev;
    S.nconns--;
#ifdef III_EPOLL
    /* explicit: a forked child may still share the descriptor for a moment, and the epoll
     * registration lives as long as the open file description does */
    if (S.ep >= 0 && c->fd >= 0) epoll_ctl(S.ep, EPOLL_CTL_DEL, c->fd, NULL);
#endif
    if (c->fd >= 0) close(c->fd);
    buf_free(&c->in), buf_free(&c->out), buf_free(&c->msg), buf_free(&c->pendq);
    xfree(c->name), xfree(c->desc), xfree(c->runtime), xfree(c->version), xfree(c->os);
    xfree(c->isolation), xfree(c->telemetry), xfree(c->ns), xfree(c->refusal);
    sess_unref(c->sess);
    xfree(c);
}

/* Writes as much of c->out as the socket takes. */
static void conn_flush(struct conn *c)
{
    while (buf_used(&c->out) && !c->dead) {
        ssize_t w = write(c->fd, buf_data(&c->out), buf_used(&c->out));
        if (w > 0) {
            buf_consume(&c->out, (size_t)w);
        } else if (w < 0 && errno == EINTR) {
            continue;
            /* the socket is full: the rest waits for POLLOUT */
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            conn_abort(c, "write error");
        }
    }
    buf_out_park(&c->out);
}

/* ==== HTTP ==================================================================================
 * Just enough HTTP/1.1 (RFC 7230) for the WebSocket upgrade (RFC 6455 §4.2) and two plain
 * answers (/health, /metrics). The request head must arrive within handshake_timeout_ms and
 * max_header_bytes. Every plain answer closes the connection.
 */
/* Queues a complete plain HTTP/1.1 response and turns c into CK_PLAIN: the reap pass closes it
 * once flushed ("Connection: close", RFC 7230 §6.6), so no keep-alive state is ever kept. */
static void http_reply(struct conn *c, int status, const char *reason, const char *ctype,
                       const char *extra, const char *body, size_t blen)
{
    buf_printf(&c->out,
               "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
               "Connection: close\r\n\r\n",
               status, reason, ctype, blen, extra ? extra : "");
    buf_append(&c->out, body, blen);
    c->kind = CK_PLAIN;
    c->closing = 1;
    c->t_close = now_ms();
    reap_push(c);
    timer_touch(c->t_close + III_CLOSE_FLUSH_MS);
    conn_dirty(c);
}

/* A plain-text error answer "STATUS REASON\n"; extra: additional header lines or NULL. */
static void http_error(struct conn *c, int status, const char *reason, const char *extra)
{
    char body[160];
    int n = snprintf(body, sizeof body, "%d %s\n", status, reason);
    http_reply(c, status, reason, "text/plain", extra, body, (size_t)n);
}

/* Case-insensitive search for token tok in a comma-separated header value. */
static int http_has_token(const char *v, const char *tok)
{
    size_t tl = strlen(tok);
    while (v && *v) {
        while (*v == ' ' || *v == '\t' || *v == ',') v++;
        const char *e = v;
        while (*e && *e != ',') e++;
        const char *t = e;
        while (t > v && (t[-1] == ' ' || t[-1] == '\t')) t--;
        if ((size_t)(t - v) == tl && str_ncaseeq(v, tok, tl)) return 1;
        v = e;
    }
    return 0;
}

/* Origin policy (docs/§10 item 7): no Origin = not a browser, allowed. Otherwise the origin
 * must equal an allowed entry, or be that entry plus ":port". "*" allows every origin. */
static int http_origin_ok(const char *o)
{
    if (!o) return 1;
    size_t ol = strlen(o);
    for (size_t i = 0; i < S.set.n_origins; i++) {
        const char *a = S.set.origins[i];
        size_t al = strlen(a);
        if (!strcmp(a, "*")) return 1;
        if (ol == al && str_ncaseeq(o, a, al)) return 1;
        if (ol > al + 1 && str_ncaseeq(o, a, al) && o[al] == ':') {
            size_t k = al + 1;
            while (k < ol && isdigit((unsigned char)o[k])) k++;
            if (k == ol) return 1;
        }
    }
    return 0;
}

static void ws_on_data(struct conn *c);

/* Appends the percent-decoded s[0..n) ('+' is a space, as in forms) to out. */
static void url_decode(const char *s, size_t n, struct buf *out)
{
    for (size_t i = 0; i < n; i++) {
        unsigned a = i + 2 < n ? (unsigned char)s[i + 1] : 0, b = i + 2 < n ? (unsigned char)s[i + 2] : 0;
        if (s[i] == '%' && isxdigit((int)a) && isxdigit((int)b)) {
            unsigned hi = a <= '9' ? a - '0' : (a | 0x20) - 'a' + 10;
            unsigned lo = b <= '9' ? b - '0' : (b | 0x20) - 'a' + 10;
            buf_putc(out, (int)(hi << 4 | lo));
            i += 2;
        } else {
            buf_putc(out, s[i] == '+' ? ' ' : s[i]);
        }
    }
}

/* The token a request presents: "Authorization: Bearer T", else "token=T" in the query
 * (browsers cannot set headers on a WebSocket). Copied into out; returns its length, 0 none. */
static size_t http_token(const char *authz, const char *query, char *out, size_t cap)
{
    size_t n = 0;
    if (authz && str_ncaseeq(authz, "bearer ", 7)) {
        const char *t = authz + 7;
        while (*t == ' ') t++;
        n = strlen(t);
        if (n >= cap) return 0;
        memcpy(out, t, n);
        return n;
    }
    for (const char *q = query; q && *q;) {
        const char *e = strchr(q, '&');
        size_t l = e ? (size_t)(e - q) : strlen(q);
        if (l > 6 && !memcmp(q, "token=", 6)) {
            struct buf b = {0};
            url_decode(q + 6, l - 6, &b);
            n = buf_check(&b) || buf_used(&b) >= cap ? 0 : buf_used(&b);
            if (n) memcpy(out, buf_data(&b), n);
            buf_free(&b);
            return n;
        }
        q = e ? e + 1 : NULL;
    }
    return 0;
}

/* 1 if tok[0..n) is one of the listener's tokens (for /metrics). */
static int http_token_ok(const char *tok, size_t n)
{
    struct session *s = auth_token(tok, n);
    sess_unref(s);
    return s != NULL;
}

/* The query string as the auth function's query_params: {"key":["value",...],...}, decoded,
 * repeated keys gathered in order. */
static void http_query_json(struct buf *out, const char *query)
{
    const char *k[64], *v[64];
    size_t kl[64], vl[64], n = 0;
    for (const char *q = query; q && *q && n < 64;) {
        const char *e = strchr(q, '&'), *eq;
        size_t l = e ? (size_t)(e - q) : strlen(q);
        if (l) {
            eq = memchr(q, '=', l);
            k[n] = q, kl[n] = eq ? (size_t)(eq - q) : l;
            v[n] = eq ? eq + 1 : q + l, vl[n] = eq ? l - kl[n] - 1 : 0;
            n++;
        }
        q = e ? e + 1 : NULL;
    }
    buf_putc(out, '{');
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        int seen = 0;
        for (size_t j = 0; j < i; j++) seen |= kl[j] == kl[i] && !memcmp(k[j], k[i], kl[i]);
        if (seen) continue;
        struct buf t = {0};
        if (!first) buf_putc(out, ',');
        first = 0;
        url_decode(k[i], kl[i], &t);
        json_put_lossy(out, buf_data(&t) ? buf_data(&t) : (const unsigned char *)"", buf_used(&t));
        buf_puts(out, ":[");
        for (size_t j = i, f = 1; j < n; j++) {
            if (kl[j] != kl[i] || memcmp(k[j], k[i], kl[i])) continue;
            buf_reset(&t);
            url_decode(v[j], vl[j], &t);
            if (!f) buf_putc(out, ',');
            f = 0;
            json_put_lossy(out, buf_data(&t) ? buf_data(&t) : (const unsigned char *)"",
                           buf_used(&t));
        }
        buf_putc(out, ']');
        buf_free(&t);
    }
    buf_putc(out, '}');
}

/* The Host check (DNS rebinding): a name in allowed_hosts passes; otherwise on a loopback
 * listener only loopback names may be asked for (a page from another site that resolves its
 * name to 127.0.0.1 must not reach the engine), and on a wider one anything when allowed_hosts
 * is not set. No Host (HTTP/1.0) passes. */
static int http_host_ok(const char *host)
{
    if (!host) return 1;
    char h[256];
    size_t n = strlen(host);
    const char *e = host[0] == '[' ? strchr(host, ']') : strrchr(host, ':');
    if (host[0] == '[') n = e ? (size_t)(e - host) + 1 : n;
    else if (e) n = (size_t)(e - host);
    if (n >= sizeof h) return 0;
    memcpy(h, host, n), h[n] = 0;
    for (size_t i = 0; i < S.cfg.lis.n_allowed_hosts; i++)
        if (strlen(S.cfg.lis.allowed_hosts[i]) == n && str_ncaseeq(h, S.cfg.lis.allowed_hosts[i], n))
            return 1;
    if (host_loopback(S.set.host)) return host_loopback(h);
    return !S.cfg.lis.n_allowed_hosts;
}

/* Parses a complete request head in c->in and answers it: 101 and a WebSocket role, a plain
 * answer, or an error status. Returns without action while the head is incomplete. */
static void http_on_data(struct conn *c)
{
    unsigned char *p = buf_data(&c->in);
    size_t n = buf_used(&c->in), end = 0;
    /* the head ends at the first CRLF CRLF (RFC 7230 §3); bare-LF heads are not accepted */
    for (size_t i = 3; i < n; i++)
        if (p[i] == '\n' && p[i - 1] == '\r' && p[i - 2] == '\n' && p[i - 3] == '\r') {
            end = i + 1;
            break;
        }
    /* 431 (RFC 6585 §5) as soon as the cap is passed, so a slow client cannot make us buffer more
     */
    if (!end || end > S.set.max_header_bytes) {
        if ((!end && n > S.set.max_header_bytes) || end > S.set.max_header_bytes)
            http_error(c, 431, "Request Header Fields Too Large", NULL);
        return;
    }
    char *h = (char *)p;
    h[end - 2] = 0; /* head as one C string ending after the last header's CRLF */
    /* a NUL inside the head would truncate the C-string parsing below: refuse it */
    if (memchr(h, 0, end - 2)) {
        http_error(c, 400, "Bad Request", NULL);
        return;
    }
    /* request line */
    char *line = h, *eol = strstr(line, "\r\n");
    if (!eol) {
        http_error(c, 400, "Bad Request", NULL);
        return;
    }
    *eol = 0;
    char *meth = line, *target = strchr(line, ' ');
    char *ver = target ? strchr(target + 1, ' ') : NULL;
    if (!target || !ver || strchr(ver + 1, ' ')) {
        http_error(c, 400, "Bad Request", NULL);
        return;
    }
    *target++ = 0, *ver++ = 0;
    /* HTTP/1.0 may fetch /health and /metrics; the upgrade itself needs 1.1 (RFC 6455 §4.1) */
    if (strcmp(ver, "HTTP/1.1") && strcmp(ver, "HTTP/1.0")) {
        http_error(c, 400, "Bad Request", NULL);
        return;
    }
    const char *upgrade = NULL, *key = NULL, *version = NULL, *origin = NULL, *host = NULL;
    const char *authz = NULL;
    /* every Connection header value joined (cut at 255 bytes) */
    char connection[256] = "";
    /* the headers (names lowercased), for an auth function: at most 64 are passed on */
    const char *hn[64], *hv[64];
    size_t nh = 0;
    for (line = eol + 2; *line; line = eol + 2) {
        eol = strstr(line, "\r\n");
        if (!eol) break;
        *eol = 0;
        char *colon = strchr(line, ':');
        /* obs-fold (a line starting with white space) is refused, as RFC 7230 §3.2.4 allows */
        if (!colon || colon == line || line[0] == ' ' || line[0] == '\t') {
            http_error(c, 400, "Bad Request", NULL);
            return;
        }
        *colon = 0;
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t') v++;
        char *ve = v + strlen(v);
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) *--ve = 0;
        size_t nl = strlen(line);
#define HDR_IS(x) (nl == sizeof(x) - 1 && str_ncaseeq(line, x, nl))
        if (HDR_IS("upgrade")) upgrade = v;
        else if (HDR_IS("sec-websocket-key")) key = v;
        else if (HDR_IS("sec-websocket-version")) version = v;
        else if (HDR_IS("origin")) origin = v;
        else if (HDR_IS("host")) host = v;
        else if (HDR_IS("authorization")) authz = v;
        /* repeated Connection headers are joined with "," (RFC 7230 §3.2.2) */
        else if (HDR_IS("connection")) {
            size_t cl = strlen(connection);
            snprintf(connection + cl, sizeof connection - cl, "%s%s", cl ? "," : "", v);
        }
        if (nh < 64) { /* Authorization too: an auth function may check its own tokens */
            for (char *q = line; *q; q++) *q = (char)tolower((unsigned char)*q);
            hn[nh] = line, hv[nh++] = v;
        }
#undef HDR_IS
    }
    /* §1.1: a query string is allowed and ignored on / and /otel (but for auth: ?token=, and
     * the auth function's query_params); channels read key and dir */
    char *query = strchr(target, '?');
    if (query) *query++ = 0;
    /* DNS rebinding: a page served from another name must not reach a loopback engine through
     * the browser; a wider listener may name the hosts it answers to (allowed_hosts) */
    if (!http_host_ok(host)) {
        LOG_LIMITED(c, LOG_WARN, "refused request from %s: Host '%.100s' not allowed", c->ip,
                    host ? host : "");
        http_error(c, 403, "Forbidden", NULL);
        return;
    }
    char tok[512];
    size_t tokn = http_token(authz, query, tok, sizeof tok);
    int is_ws_path = !strcmp(target, "/") || !strcmp(target, "/otel") ||
                     (S.echo && !strcmp(target, "/echo")) || !strncmp(target, "/ws/channels/", 13);
    /* no Upgrade header: a plain request; only /health and /metrics have plain answers */
    if (!upgrade) {
        if (!strcmp(meth, "GET") && !strcmp(target, "/health")) {
            buf_reset(&S.tmp);
            http_health(&S.tmp);
            http_reply(c, 200, "OK", "application/json", NULL, (char *)buf_data(&S.tmp),
                       buf_used(&S.tmp));
        } else if (!strcmp(meth, "GET") && !strcmp(target, "/metrics") && AUTH && AUTH->on &&
                   !AUTH->metrics_public && !http_token_ok(tok, tokn)) {
            http_error(c, 401, "Unauthorized", "WWW-Authenticate: Bearer\r\n");
        } else if (!strcmp(meth, "GET") && !strcmp(target, "/metrics")) {
            buf_reset(&S.tmp);
            http_metrics(&S.tmp);
            http_reply(c, 200, "OK", "text/plain; version=0.0.4", NULL, (char *)buf_data(&S.tmp),
                       buf_used(&S.tmp));
        } else if (!strcmp(target, "/health") || !strcmp(target, "/metrics")) {
            http_error(c, 405, "Method Not Allowed", "Allow: GET\r\n");
        } else if (is_ws_path) {
            if (strcmp(meth, "GET")) http_error(c, 405, "Method Not Allowed", "Allow: GET\r\n");
            else http_error(c, 400, "Bad Request", NULL);
        } else {
            http_error(c, 404, "Not Found", NULL);
        }
        return;
    }
    if (strcmp(meth, "GET")) {
        http_error(c, 405, "Method Not Allowed", "Allow: GET\r\n");
        return;
    }
    if (!is_ws_path) {
        http_error(c, 404, "Not Found", NULL);
        return;
    }
    /* RFC 6455 §4.4: an unsupported version gets 426 with the versions we speak */
    if (!version || strcmp(version, "13")) {
        http_error(c, 426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\n");
        return;
    }
    /* RFC 6455 §4.2.1: HTTP/1.1, Host, Upgrade: websocket, Connection: upgrade, and a key that is
     * base64 of exactly 16 bytes */
    unsigned char kb[20];
    if (strcmp(ver, "HTTP/1.1") || !host || !http_has_token(upgrade, "websocket") ||
        !http_has_token(connection, "upgrade") || !key ||
        b64_decode(key, strlen(key), kb, sizeof kb) != 16) {
        http_error(c, 400, "Bad Request", NULL);
        return;
    }
    /* a browser page may only connect from an allowed origin: without this check any web page
     * could drive a local engine (cross-site WebSocket hijacking; RFC 6455 §10.2) */
    if (!http_origin_ok(origin)) {
        LOG(LOG_WARN, "refused upgrade from %s: origin '%s' not in allowed_origins", c->ip, origin);
        http_error(c, 403, "Forbidden", NULL);
        return;
    }
    /* over the memory budget no new session starts (503); /health and /metrics still answer */
    if (mem_over_budget()) {
        S.n_busy++;
        LOG_LIMITED(c, LOG_WARN, "refused upgrade from %s: memory budget reached (max_memory_bytes)",
                    c->ip);
        http_error(c, 503, "Service Unavailable", NULL);
        return;
    }
    int kind, dir = 0, status = 0;
    struct chan *ch = NULL;
    struct session *sess = NULL;
    if (!strcmp(target, "/")) kind = CK_WORKER;
    else if (!strcmp(target, "/otel")) kind = CK_OTEL;
    else if (!strcmp(target, "/echo")) kind = CK_ECHO;
    else {
        ch = chan_lookup(target, query, &dir, &status);
        if (!ch) {
            if (status == 404) http_error(c, 404, "Channel not found", NULL);
            else http_error(c, 400, "Bad Request", NULL);
            return;
        }
        kind = dir == 'w' ? CK_CHAN_W : CK_CHAN_R;
    }
    /* authentication: a token's session, else (on /) the auth function decides after the
     * upgrade; no token and no auth function: 401 before anything else (channels carry their
     * own key) */
    int ask = 0;
    if (AUTH && (kind == CK_WORKER || kind == CK_OTEL)) {
        sess = AUTH->on ? auth_token(tok, tokn) : sess_ref(AUTH->anon);
        ask = AUTH->on && !sess && AUTH->auth_fn && kind == CK_WORKER;
        if (AUTH->on && !sess && !ask) {
            /* the peer's address, never the token */
            LOG_LIMITED(c, LOG_WARN, "refused upgrade from %s: %s token", c->ip,
                        tokn ? "wrong" : "no");
            http_error(c, 401, "Unauthorized", "WWW-Authenticate: Bearer\r\n");
            return;
        }
    }
    /* RFC 6455 §4.2.2: 101 with Sec-WebSocket-Accept; no subprotocol or extension is negotiated
     * (§1.1), so neither header is sent */
    char acc[29];
    ws_accept_key(key, strlen(key), acc);
    buf_printf(&c->out,
               "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
               acc);
    buf_consume(&c->in, end);
    c->kind = kind;
    c->ws = 1;
    c->t_rx = now_ms();
    if (S.set.ping_interval_ms > 0) timer_touch(c->t_rx + S.set.ping_interval_ms);
    if (S.set.idle_timeout_ms > 0) timer_touch(c->t_rx + S.set.idle_timeout_ms);
    conn_dirty(c);
    if (kind == CK_WORKER && ask) {
        /* {headers, query_params} for the auth function, then its call; c processes nothing
         * until it answers */
        struct buf hq = {0};
        buf_puts(&hq, "\"headers\":{");
        for (size_t i = 0; i < nh; i++) {
            if (i) buf_putc(&hq, ',');
            json_put_lossy(&hq, (const unsigned char *)hn[i], strlen(hn[i]));
            buf_putc(&hq, ':');
            json_put_lossy(&hq, (const unsigned char *)hv[i], strlen(hv[i]));
        }
        buf_puts(&hq, "},\"query_params\":");
        http_query_json(&hq, query);
        auth_begin(c, &hq);
        buf_free(&hq);
    } else if (kind == CK_WORKER) {
        c->sess = sess, sess = NULL;
        worker_on_open(c);
    } else if (ch) {
        int taken = dir == 'w' ? ch->w_taken : ch->r_taken;
        /* §5.13: each side of a channel attaches once; a second taker gets 1008 (policy violation)
         */
        if (taken) {
            conn_close(c, 1008, "channel side already taken");
            return;
        }
        c->chan = ch;
        if (dir == 'w') ch->w = c, ch->w_taken = 1;
        else {
            ch->r = c, ch->r_taken = 1;
            /* what the writer sent before the reader arrived goes out first, in order */
            if (buf_used(&ch->pending)) {
                buf_append(&c->out, buf_data(&ch->pending), buf_used(&ch->pending));
                buf_free(&ch->pending);
            }
            if (ch->w_done) conn_close(c, 1000, NULL);
        }
    }
    sess_unref(sess); /* /otel keeps no session */
    /* frames pipelined right behind the head are handled now, not on the next readable event */
    if (buf_used(&c->in) && !c->auth_wait) ws_on_data(c);
}

/* Delivers one complete message to the connection's role. p points into c->in or c->msg and
 * is valid only during the call. */
static void ws_on_message(struct conn *c, int op, const unsigned char *p, size_t n)
{
    S.n_msgs_in++;
    switch (c->kind) {
    case CK_WORKER:
        /* §1.5: binary OTLP/MTRC/LOGS frames are telemetry; other binary frames are JSON */
        if (op == WS_BIN && n >= 4 &&
            (!memcmp(p, "OTLP", 4) || !memcmp(p, "MTRC", 4) || !memcmp(p, "LOGS", 4))) {
            c->otel_frames++;
            return;
        }
        worker_on_message(c, p, n, op == WS_BIN);
        break;
    case CK_OTEL:
        c->otel_frames++;
        break;
    case CK_ECHO:
        conn_frame(c, op, p, n);
        break;
    case CK_CHAN_W:
    case CK_CHAN_R:
        chan_on_message(c, op, p, n);
        break;
    default:
        break;
    }
}

/* The room ws_on_data asks for a partial frame it accepted while c->in was the shared read
 * buffer (only the connection being read has it: loop_read sets and clears in_borrowed around
 * one loop_process); loop_read reserves it when the frame moves out. 0: nothing asked. */
static size_t rd_keep;

/* Parses and handles every complete frame in c->in (RFC 6455 §5): control frames answered,
 * fragments reassembled, text validated as UTF-8 as it arrives (fail fast, §8.1), limits
 * enforced before payload bytes are awaited. Stops at the first incomplete frame. */
static void ws_on_data(struct conn *c)
{
    while (!c->closing && !c->dead) {
        unsigned char *p = buf_data(&c->in), mask[4];
        size_t avail = buf_used(&c->in), plen = 0;
        int op, fin, code;
        int hl = ws_parse_hdr(p, avail, 1, S.set.max_frame_bytes, &op, &fin, &plen, mask, &code);
        if (hl < 0) {
            conn_close(c, (unsigned)code, code == 1009 ? "frame too big" : "protocol error");
            return;
        }
        if (hl == 0) return;
        /* data frames: the fragmentation rules of §5.4; the size cap applies to the whole message
         */
        if (op < 8) {
            if (op == WS_CONT && !c->msg_op) {
                conn_close(c, 1002, "continuation without a message");
                return;
            }
            if (op != WS_CONT && c->msg_op) {
                conn_close(c, 1002, "new message inside a fragmented one");
                return;
            }
            size_t have = c->msg_op ? buf_used(&c->msg) : 0;
            /* 1009 "message too big" (RFC 6455 §7.4.1) before any payload is buffered; written so
             * that plen + have cannot overflow */
            if (plen > S.set.max_message_bytes - have || have > S.set.max_message_bytes) {
                conn_close(c, 1009, "message too big");
                return;
            }
        }
        if (avail - (size_t)hl < plen) {
            /* wait for the payload: memory follows the bytes that actually arrive (a header alone
             * must not make the engine commit the declared size), in steps of at most 1 MiB, plus
             * one read step, so that loop_read's own reserve never regrows (and copies) the block
             * before the frame is whole. In the shared buffer (borrowed) the room is only noted:
             * loop_read gives it when the partial frame moves out. */
            size_t want = (size_t)hl + plen - avail;
            if (want > III_BUF_SHRINK) want = III_BUF_SHRINK;
            if (c->in_borrowed) rd_keep = avail + want + III_READ_CHUNK;
            else if (buf_reserve(&c->in, want + III_READ_CHUNK) < 0) conn_oom(c);
            return;
        }
        unsigned char *pl = p + hl;
        /* §5.3: every client payload is masked; unmasked in place, inside the input buffer (and
         * an all-ASCII payload needs no UTF-8 pass: noted on the way, as are a large message's
         * clean blocks for its parser) */
        int noted, ascii = ws_unmask_msg(c, op, fin, pl, plen, mask, &noted);
        c->t_rx = now_ms();
        /* §5.5.2: a Ping is answered with a Pong carrying the same payload, even between fragments
         */
        if (op == WS_PING) {
            conn_frame(c, WS_PONG, pl, plen);
        } else if (op == WS_CLOSE) {
            unsigned cc = 0;
            /* §5.5.1: a close body is empty or a 2-byte code plus UTF-8 reason; we echo the peer's
             * code */
            if (plen == 1) {
                conn_close(c, 1002, "bad close payload");
                return;
            }
            if (plen >= 2) {
                cc = (unsigned)pl[0] << 8 | pl[1];
                if (!ws_close_code_ok(cc)) {
                    conn_close(c, 1002, "invalid close code");
                    return;
                }
                if (!utf8_valid(pl + 2, plen - 2)) {
                    conn_close(c, 1007, "invalid utf-8 in close reason");
                    return;
                }
            }
            if (!c->why) c->why = "closed by the peer";
            conn_close(c, cc ? cc : 1000, NULL);
            return;
        } else if (op == WS_PONG) {
            /* activity only (t_rx updated above) */
            /* an unfragmented message is delivered straight from the input buffer, with no copy */
        } else if (op != WS_CONT && fin) {
            if (op == WS_TEXT && !ascii && !utf8_valid(pl, plen)) {
                conn_close(c, 1007, "invalid utf-8");
                return;
            }
            if (noted) jnote.s = pl, jnote.n = plen;
            ws_on_message(c, op, pl, plen);
            jnote.s = NULL; /* the note was about these bytes only */
        } else {
            if (op != WS_CONT) {
                c->msg_op = op;
                memset(&c->u8, 0, sizeof c->u8);
                buf_reset(&c->msg);
            }
            /* §8.1: invalid UTF-8 fails the connection with 1007 as soon as it is seen */
            if (c->msg_op == WS_TEXT && (!ascii || c->u8.need) && utf8_feed(&c->u8, pl, plen) < 0) {
                conn_close(c, 1007, "invalid utf-8");
                return;
            }
            if (buf_append(&c->msg, pl, plen) < 0) {
                conn_oom(c);
                return;
            }
            if (fin) {
                if (c->msg_op == WS_TEXT && c->u8.need) {
                    conn_close(c, 1007, "truncated utf-8");
                    return;
                }
                int mop = c->msg_op;
                c->msg_op = 0;
                ws_on_message(c, mop, buf_data(&c->msg), buf_used(&c->msg));
                buf_consume(&c->msg, buf_used(&c->msg));
            }
        }
        buf_consume(&c->in, (size_t)hl + plen);
    }
}

/* ==== Registry ==============================================================================
 * Functions keyed (namespace, id) with at most one owner; worker-name leases keyed
 * (namespace, name); the connection map keyed by worker_id. Keys are "ns\0id" byte strings.
 * The set of function ids is summarised by an order-independent fingerprint (sum of 64-bit
 * hashes plus a count) so the loop can tell in O(1) whether functions-available must fire.
 */
/* One term of the function-set fingerprint: a keyed 64-bit hash, so no client can pick ids
 * whose terms cancel and hide a change from functions-available subscribers. */
static uint64_t reg_fp_hash(const char *k, size_t n) { return siphash13(hm_k1, hm_k0, k, n); }

/* Builds "ns\0id\0" in stackbuf when it fits, else in a new allocation (caller frees when the
 * result differs from stackbuf). NULL on OOM. */
static char *reg_key(char *stackbuf, size_t cap, const char *ns, size_t nl, const char *id,
                     size_t il, size_t *klen)
{
    char *k = nl + il + 2 <= cap ? stackbuf : xmalloc(nl + il + 2);
    if (!k) return NULL;
    memcpy(k, ns, nl);
    k[nl] = 0;
    memcpy(k + nl + 1, id, il);
    k[nl + il + 1] = 0; /* both halves are C strings */
    *klen = nl + il + 1;
    return k;
}

/* Looks up (ns, id) in a map keyed "ns\0id"; no allocation for keys under 256 bytes. */
static struct hnode *reg_find(struct hmap *m, const char *ns, size_t nl, const char *id, size_t il)
{
    char sb[256];
    size_t kl;
    char *k = reg_key(sb, sizeof sb, ns, nl, id, il, &kl);
    if (!k) return NULL;
    struct hnode *e = hm_get(m, k, kl);
    if (k != sb) xfree(k);
    return e;
}

/* The function registered as (ns, id), or NULL. Strict: no namespace fallback (§3.1). */
static struct func *func_find(const char *ns, size_t nl, const char *id, size_t il)
{
    return (struct func *)reg_find(&S.funcs, ns, nl, id, il);
}

/* func_find for C strings. */
static struct func *func_find_c(const char *ns, const char *id)
{
    return func_find(ns, strlen(ns), id, strlen(id));
}

/* The /metrics entry of function key k[0..kl) ("ns\0id"), created on first use; beyond
 * III_METRIC_FUNCTIONS entries (or out of memory) the shared "_other" entry. Never NULL. */
static struct fstat *fstat_get(const char *k, size_t kl)
{
    struct fstat *s = (struct fstat *)hm_get(&S.fstats, k, kl);
    if (s || S.fstats.n >= III_METRIC_FUNCTIONS) return s ? s : &S.fstat_other;
    if (!(s = xcalloc(sizeof *s))) return &S.fstat_other;
    if (!(s->key = xmalloc(kl)) || (memcpy(s->key, k, kl), hm_put(&S.fstats, &s->h, s->key, kl) < 0)) {
        xfree(s->key), xfree(s);
        return &S.fstat_other;
    }
    s->klen = kl;
    return s;
}

/* A call to s's function started (now, returned for fstat_end). */
static int64_t fstat_begin(struct fstat *s)
{
    s->calls++, s->inflight++;
    return now_us();
}

/* The call that fstat_begin returned t0 for ended (err: with an error). */
static void fstat_end(struct fstat *s, int64_t t0, int err)
{
    int64_t us = now_us() - t0;
    int b = 0;
    while (b < FSTAT_BUCKETS - 1 && us > FSTAT_LE_US[b]) b++;
    s->bucket[b]++, s->sum_us += (uint64_t)(us > 0 ? us : 0), s->errors += err != 0;
    s->inflight--;
}

/* Points g's key at its head's id (the invariant of struct idgroup); a group with no head left
 * is being freed. The hash and length stay: the bytes are the same. */
static void ig_rekey(struct idgroup *g)
{
    if (g->head) g->h.key = g->head->id;
}

/* Creates function (ns, id) owned by owner (NULL = builtin). Strings are copied. */
static struct func *func_add(struct conn *owner, const char *ns, size_t nl, const char *id,
                             size_t il)
{
    struct func *f = xcalloc(sizeof *f);
    size_t kl;
    if (!f) return NULL;
    f->key = reg_key(NULL, 0, ns, nl, id, il, &kl);
    struct idgroup *g = (struct idgroup *)hm_get(&S.fids, id, il);
    /* a new group is keyed by f's copy of the id: f becomes its head below */
    if (f->key && !g && (g = xcalloc(sizeof *g)) &&
        hm_put(&S.fids, &g->h, f->key + nl + 1, il) < 0)
        xfree(g), g = NULL;
    if (!f->key || !g || hm_put(&S.funcs, &f->h, f->key, kl) < 0) {
        if (g && !g->n) hm_del(&S.fids, &g->h), xfree(g);
        xfree(f->key);
        xfree(f);
        return NULL;
    }
    f->klen = kl;
    f->ns = f->key;
    f->id = f->key + nl + 1;
    f->owner = owner;
    f->fst = fstat_get(f->key, kl);
    f->ig = g, f->inext = g->head;
    if (g->head) g->head->iprev = f;
    g->head = f, g->n++;
    ig_rekey(g);
    if (owner) {
        f->cnext = owner->funcs;
        if (owner->funcs) owner->funcs->cprev = f;
        owner->funcs = f, owner->n_funcs++;
    }
    S.fn_fp += reg_fp_hash(f->key, kl);
    S.fn_n++;
    return f;
}

static void func_clear_meta(struct func *f);
static void rt_queue_handoff(struct func *f, struct func *r);

/* Unlinks f from its owner's list. */
static void func_unown(struct func *f)
{
    if (!f->owner) return;
    if (f->cprev) f->cprev->cnext = f->cnext;
    else f->owner->funcs = f->cnext;
    if (f->cnext) f->cnext->cprev = f->cprev;
    f->owner->n_funcs--;
}

/* Adds owner as one more provider of primary p (routing: providers: many): a replica, at the
 * end of p's chain. NULL on OOM. */
static struct func *func_add_replica(struct func *p, struct conn *owner)
{
    struct func *f = xcalloc(sizeof *f);
    if (!f || !(f->key = xmalloc(p->klen + 1))) {
        xfree(f);
        return NULL;
    }
    memcpy(f->key, p->key, p->klen + 1);
    f->klen = p->klen, f->ns = f->key, f->id = f->key + (p->id - p->ns);
    f->owner = owner, f->primary = p, f->fst = p->fst, f->ig = p->ig;
    struct func **pp = &p->rnext;
    while (*pp) pp = &(*pp)->rnext;
    *pp = f;
    f->cnext = owner->funcs;
    if (owner->funcs) owner->funcs->cprev = f;
    owner->funcs = f, owner->n_funcs++;
    return f;
}

/* The provider of f's (ns, id) that c owns, or NULL. */
static struct func *func_of(struct func *f, const struct conn *c)
{
    for (struct func *p = f; p; p = p->rnext)
        if (p->owner == c) return p;
    return NULL;
}

/* Removes one provider of a function that has several: a replica leaves its primary's chain;
 * a primary hands its place in S.funcs and the id group to the next provider. The set of ids
 * is unchanged (no functions-available event), and nothing is allocated: the map does not
 * grow, it gives one node up and takes one. */
static void func_remove_provider(struct func *f)
{
    func_unown(f);
    if (f->primary) {
        struct func **pp = &f->primary->rnext;
        while (*pp && *pp != f) pp = &(*pp)->rnext;
        if (*pp) *pp = f->rnext;
    } else {
        struct func *r = f->rnext;
        rt_queue_handoff(f, r);
        r->primary = NULL;
        for (struct func *x = r->rnext; x; x = x->rnext) x->primary = r;
        r->rr = f->rr;
        hm_del(&S.funcs, &f->h);
        hm_put(&S.funcs, &r->h, r->key, r->klen);
        struct idgroup *g = f->ig;
        r->ig = g, r->iprev = f->iprev, r->inext = f->inext;
        if (f->iprev) f->iprev->inext = r;
        else g->head = r;
        if (f->inext) f->inext->iprev = r;
        ig_rekey(g); /* f's id is freed below */
    }
    func_clear_meta(f);
    xfree(f->key);
    xfree(f);
}

/* Frees the registered description/schemas/metadata (a re-register replaces them). */
static void func_clear_meta(struct func *f)
{
    xfree(f->desc_raw), xfree(f->req_raw), xfree(f->resp_raw), xfree(f->meta_raw);
    f->desc_raw = f->req_raw = f->resp_raw = f->meta_raw = NULL;
    f->internal = 0;
}

/* Unregisters f: out of S.funcs and its owner's list, out of the fingerprint, then freed. The
 * caller has already dealt with calls in flight to it (they keep the connection, not f). */
static void func_remove_provider(struct func *f);
static void func_remove(struct func *f)
{
    if (f->primary || f->rnext) {
        func_remove_provider(f);
        return;
    }
    rt_queue_handoff(f, NULL); /* the last provider: waiting callers get invocation_stopped */
    hm_del(&S.funcs, &f->h);
    if (f->owner) {
        if (f->cprev) f->cprev->cnext = f->cnext;
        else f->owner->funcs = f->cnext;
        if (f->cnext) f->cnext->cprev = f->cprev;
        f->owner->n_funcs--;
    }
    struct idgroup *g = f->ig;
    if (f->iprev) f->iprev->inext = f->inext;
    else g->head = f->inext;
    if (f->inext) f->inext->iprev = f->iprev;
    if (!--g->n) hm_del(&S.fids, &g->h), xfree(g);
    else ig_rekey(g); /* f's id is freed below */
    S.fn_fp -= reg_fp_hash(f->key, f->klen);
    S.fn_n--;
    func_clear_meta(f);
    xfree(f->key);
    xfree(f);
}

/* The worker name reported for a function: the owner's name, "iii-engine-functions" for
 * builtins, else the id's first "::" segment. Writes a JSON string. */
static int func_put_worker_name(struct buf *b, const struct func *f)
{
    if (!f->owner) return buf_puts(b, "\"iii-engine-functions\"");
    if (f->owner->name) return json_put_cstr(b, f->owner->name);
    const char *sep = strstr(f->id, "::");
    return json_put_str(b, f->id, sep ? (size_t)(sep - f->id) : strlen(f->id));
}

/* A connection that is going away no longer holds its leases (§1.7, §11.15). */
static int conn_live(const struct conn *c) { return c && !c->torn && !c->closing && !c->dead; }

/* Gives up c's name lease, if it holds one: out of S.leases and freed. Allocates nothing. */
static void lease_drop(struct conn *c)
{
    struct lease *l = c->lease;
    if (!l) return;
    hm_del(&S.leases, &l->h);
    xfree(l->key);
    xfree(l);
    c->lease = NULL;
}

/* ==== Sessions and authorization ============================================================
 * Every worker connection has a session (c->sess): NULL means full access, which is what a
 * loopback listener without auth config gives everyone, as before. With `auth_tokens` or
 * `rbac.auth_function_id` an upgrade must present a token (Authorization: Bearer T, or ?token=T)
 * or be admitted by the auth function; its session is then the token's entry or the function's
 * result, in the reference's shape (§3.9): namespaces with grants, allowed and
 * forbidden functions, registration switches, a registration prefix and a context. A session
 * is kept as its JSON text with the tokens of that text (grants are read from them directly),
 * reference-counted: a token's session is shared by its connections and outlives a reload.
 * Invariants: tokens are compared in constant time and never logged; a connection waiting for
 * the auth function processes no frame; what a restricted session may not call it cannot see
 * (listings and discovery events are filtered with the same decision as a call).
 */
static void sess_unref(struct session *s)
{
    if (!s || --s->refs) return;
    xfree(s->d.t), xfree(s->json), xfree(s);
}

static struct session *sess_ref(struct session *s)
{
    if (s) s->refs++;
    return s;
}

/* 1 if every element of array token a of d is a string (NULL-safe: absent is fine). */
static int sess_strings(const struct jdoc *d, int a)
{
    if (JABSENT(d, a)) return 1;
    if (JTYPE(d, a) != J_ARRAY || d->t[a].opaque) return 0;
    for (uint32_t i = 0, e = (uint32_t)a + 1; i < d->t[a].n; i++, e = d->t[e].next)
        if (JTYPE(d, (int)e) != J_STRING) return 0;
    return 1;
}

/* Builds a session from its JSON object (a token entry when with_token, else an auth function's
 * result). NULL with the reason in why when the shape is wrong. */
static struct session *sess_new(const char *json, size_t n, int with_token, char *why, size_t cap)
{
    struct session *s = xcalloc(sizeof *s);
    if (!s || !(s->json = xstrndup(json, n))) {
        xfree(s);
        snprintf(why, cap, "out of memory");
        return NULL;
    }
    s->refs = 1;
    s->d.max = 4096;
    const struct jdoc *d = &s->d;
    if (json_parse(&s->d, (unsigned char *)s->json, n, 4, 1) < 0 || d->t[0].type != J_OBJECT) {
        snprintf(why, cap, "a session must be a JSON object");
        goto bad;
    }
    int tok = json_get(d, 0, "token"), fr = json_get(d, 0, "allow_function_registration");
    int tr = json_get(d, 0, "allow_trigger_type_registration");
    s->ns = json_get(d, 0, "namespaces"), s->allowed = json_get(d, 0, "allowed_functions");
    s->forbidden = json_get(d, 0, "forbidden_functions");
    s->prefix = json_get(d, 0, "function_registration_prefix"), s->ctx = json_get(d, 0, "context");
    if (with_token && (JTYPE(d, tok) != J_STRING || JLEN(d, tok) <= 2)) {
        snprintf(why, cap, "`token` must be a non-empty string");
        goto bad;
    }
    if (!JABSENT(d, s->ns)) {
        if (JTYPE(d, s->ns) != J_OBJECT || d->t[s->ns].opaque) goto shape;
        for (uint32_t i = 0, k = (uint32_t)s->ns + 1; i < d->t[s->ns].n; i++, k = d->t[k + 1].next)
            if (!sess_strings(d, (int)k + 1) || JABSENT(d, (int)k + 1)) goto shape;
    }
    if (!sess_strings(d, s->allowed) || !sess_strings(d, s->forbidden) ||
        !sess_strings(d, json_get(d, 0, "allowed_trigger_types")) ||
        (!JABSENT(d, s->prefix) && JTYPE(d, s->prefix) != J_STRING) ||
        (!JABSENT(d, fr) && JTYPE(d, fr) != J_TRUE && JTYPE(d, fr) != J_FALSE) ||
        (!JABSENT(d, tr) && JTYPE(d, tr) != J_TRUE && JTYPE(d, tr) != J_FALSE))
        goto shape;
    if (with_token)
        for (uint32_t i = 0, k = 1; i < d->t[0].n; i++, k = d->t[k + 1].next) {
            static const char *const known[] = {
                "token", "namespaces", "allowed_functions", "forbidden_functions",
                "allowed_trigger_types", "allow_function_registration",
                "allow_trigger_type_registration", "function_registration_prefix", "context", NULL};
            int ok = 0;
            for (const char *const *q = known; *q; q++) ok |= json_streq(d, (int)k, *q);
            if (!ok) {
                snprintf(why, cap, "unknown key %.*s (expected token, namespaces, "
                         "allowed_functions, forbidden_functions, allow_function_registration, "
                         "allow_trigger_type_registration, function_registration_prefix, context)",
                         (int)(JLEN(d, (int)k) > 60 ? 60 : JLEN(d, (int)k)), JRAW(d, (int)k));
                goto bad;
            }
        }
    s->fn_reg = JTYPE(d, fr) != J_FALSE; /* §3.9 defaults: functions yes, trigger types no */
    s->tt_reg = JTYPE(d, tr) == J_TRUE;
    s->restricted = !JABSENT(d, s->ns) || !JABSENT(d, s->allowed);
    return s;
shape:
    snprintf(why, cap, "wrong shape: namespaces is {ns: [grants]}, the *_functions are lists of "
                       "ids, the allow_* are true/false, function_registration_prefix a string");
bad:
    sess_unref(s);
    return NULL;
}

/* Config validation of one auth_tokens entry (JSON): 0, or -1 with why. */
static int sess_check_json(const char *json, int with_token, char *why, size_t cap)
{
    struct session *s = sess_new(json, strlen(json), with_token, why, cap);
    sess_unref(s);
    return s ? 0 : -1;
}

/* Config validation of the rbac block. */
static int sess_check_rbac(const char *json, char *why, size_t cap)
{
    struct jdoc d = {0};
    int rc = -1;
    d.max = 4096;
    if (json_parse(&d, (const unsigned char *)json, strlen(json), 4, 1) < 0) goto out;
    int af = json_get(&d, 0, "auth_function_id"), ex = json_get(&d, 0, "expose_functions");
    int fb = json_get(&d, 0, "forbidden_functions");
    for (uint32_t i = 0, k = 1; i < d.t[0].n; i++, k = d.t[k + 1].next)
        if (!json_streq(&d, (int)k, "auth_function_id") &&
            !json_streq(&d, (int)k, "expose_functions") &&
            !json_streq(&d, (int)k, "forbidden_functions")) {
            snprintf(why, cap, "unknown key %.*s (expected auth_function_id, expose_functions, "
                               "forbidden_functions)",
                     (int)(JLEN(&d, (int)k) > 60 ? 60 : JLEN(&d, (int)k)), JRAW(&d, (int)k));
            goto done;
        }
    if ((!JABSENT(&d, af) && JTYPE(&d, af) != J_STRING) ||
        (!JABSENT(&d, ex) && JTYPE(&d, ex) != J_ARRAY) || !sess_strings(&d, fb))
        goto out;
    rc = 0;
    goto done;
out:
    snprintf(why, cap, "auth_function_id is a function id, expose_functions a list of filters "
                       "(\"glob\", match(\"glob\"), {match, namespace}, {metadata, namespace}), "
                       "forbidden_functions a list of ids");
done:
    xfree(d.t);
    return rc;
}

/* Glob match of s[0..sn) against p[0..pn), where * matches any run (also ::); a pattern may be
 * written match("glob"). Backtracks to the last star only: O(pn * sn) at worst. */
static int glob_match(const char *p, size_t pn, const char *s, size_t sn)
{
    if (pn >= 9 && !memcmp(p, "match(\"", 7) && !memcmp(p + pn - 2, "\")", 2)) p += 7, pn -= 9;
    size_t i = 0, j = 0, star = SIZE_MAX, mark = 0;
    while (j < sn) {
        if (i < pn && p[i] == '*') star = i++, mark = j;
        else if (i < pn && p[i] == s[j]) i++, j++;
        else if (star != SIZE_MAX) i = star + 1, j = ++mark;
        else return 0;
    }
    while (i < pn && p[i] == '*') i++;
    return i == pn;
}

/* 1 if some string element of array token a of d matches id[0..il) (glob). */
static int sess_list_match(const struct jdoc *d, int a, const char *id, size_t il)
{
    if (JTYPE(d, a) != J_ARRAY) return 0;
    for (uint32_t i = 0, e = (uint32_t)a + 1; i < d->t[a].n; i++, e = d->t[e].next) {
        struct buf sc = {0};
        const char *p;
        size_t pn;
        int m = jstr(d, (int)e, &sc, &p, &pn) == 0 && glob_match(p, pn, id, il);
        buf_free(&sc);
        if (m) return 1;
    }
    return 0;
}

/* The grants token of namespace ns[0..nl) in session s, or -1. */
static int sess_ns(const struct session *s, const char *ns, size_t nl)
{
    if (JTYPE(&s->d, s->ns) != J_OBJECT) return -1;
    char k[256];
    if (nl >= sizeof k) return -1;
    memcpy(k, ns, nl), k[nl] = 0;
    return json_get_n(&s->d, s->ns, k, nl);
}

/* 1 if rbac.expose_functions has a filter that admits f (id in ns): "glob" / match("glob")
 * for default, {match, namespace?}, or {metadata: {k: value|match("glob")}, namespace?}. */
static int auth_exposed(const char *id, size_t il, const char *ns, size_t nl, const struct func *f)
{
    const struct jdoc *d = &AUTH->rbac;
    int a = AUTH->expose;
    if (JTYPE(d, a) != J_ARRAY) return 0;
    for (uint32_t i = 0, e = (uint32_t)a + 1; i < d->t[a].n; i++, e = d->t[e].next) {
        int fe = (int)e, fns = -1, m, md;
        if (JTYPE(d, fe) == J_STRING) {
            struct buf sc = {0};
            const char *p;
            size_t pn;
            int ok = jstr(d, fe, &sc, &p, &pn) == 0 && nl == 7 && !memcmp(ns, "default", 7) &&
                     glob_match(p, pn, id, il);
            buf_free(&sc);
            if (ok) return 1;
            continue;
        }
        if (JTYPE(d, fe) != J_OBJECT) continue;
        fns = json_get(d, fe, "namespace"), m = json_get(d, fe, "match");
        md = json_get(d, fe, "metadata");
        if (JABSENT(d, fns) ? !(nl == 7 && !memcmp(ns, "default", 7))
                            : !(JTYPE(d, fns) == J_STRING && JLEN(d, fns) - 2 == nl &&
                                !memcmp(JRAW(d, fns) + 1, ns, nl)))
            continue;
        if (JTYPE(d, m) == J_STRING) {
            struct buf sc = {0};
            const char *p;
            size_t pn;
            int ok = jstr(d, m, &sc, &p, &pn) == 0 && glob_match(p, pn, id, il);
            buf_free(&sc);
            if (ok) return 1;
        } else if (JTYPE(d, md) == J_OBJECT && f && f->meta_raw && !d->t[md].opaque) {
            /* every key of the filter must be in the function's metadata, equal or matching */
            struct jdoc fm = {0};
            fm.max = 4096;
            int all = json_parse(&fm, (unsigned char *)f->meta_raw, strlen(f->meta_raw), 2, 0) == 0 &&
                      fm.t[0].type == J_OBJECT;
            for (uint32_t q = 0, k = (uint32_t)md + 1; all && q < d->t[md].n; q++, k = d->t[k + 1].next) {
                struct buf ks = {0};
                const char *kp;
                size_t kn;
                int fv = jstr(d, (int)k, &ks, &kp, &kn) == 0 ? json_get_n(&fm, 0, kp, kn) : -1;
                int want = (int)k + 1;
                buf_free(&ks);
                if (fv < 0) all = 0;
                else if (JTYPE(d, want) == J_STRING && JTYPE(&fm, fv) == J_STRING) {
                    struct buf a1 = {0}, a2 = {0};
                    const char *p1, *p2;
                    size_t n1, n2;
                    all = jstr(d, want, &a1, &p1, &n1) == 0 && jstr(&fm, fv, &a2, &p2, &n2) == 0 &&
                          glob_match(p1, n1, p2, n2);
                    buf_free(&a1), buf_free(&a2);
                } else {
                    all = JLEN(d, want) == JLEN(&fm, fv) &&
                          !memcmp(JRAW(d, want), JRAW(&fm, fv), JLEN(d, want));
                }
            }
            xfree(fm.t);
            if (all) return 1;
        }
    }
    return 0;
}

/* The routing rule that covers id[0..il) in ns[0..nl): the first that matches, or NULL (no
 * rules: nothing to look at). */
static const struct cfg_route *route_for(const char *ns, size_t nl, const char *id, size_t il)
{
    for (size_t i = 0; i < S.cfg.nroutes; i++) {
        const struct cfg_route *r = &S.cfg.routes[i];
        if (r->ns && (strlen(r->ns) != nl || memcmp(r->ns, ns, nl))) continue;
        if (glob_match(r->match, strlen(r->match), id, il)) return r;
    }
    return NULL;
}

/* 1 when (ns, id) may have several providers. */
static int route_many(const char *ns, size_t nl, const char *id, size_t il)
{
    const struct cfg_route *r = route_for(ns, nl, id, il);
    return r && r->many;
}

/* The infrastructure functions every session may call (§3.9 step 4). */
static int auth_infra(const char *id, size_t il)
{
    static const char *const infra[] = {"engine::channels::create", "engine::workers::register",
                                        "engine::log::*", "engine::baggage::*", NULL};
    for (const char *const *q = infra; *q; q++)
        if (glob_match(*q, strlen(*q), id, il)) return 1;
    return 0;
}

/* The §3.9 decision for session s invoking id in ns (f: the function when it exists, for
 * metadata filters). 1 allow; 0 deny, with *forbidden set when it was explicitly forbidden. */
static int sess_allows(const struct session *s, const char *id, size_t il, const char *ns,
                       size_t nl, const struct func *f, int *forbidden)
{
    int rbac = AUTH && AUTH->rbac_json;
    if (forbidden) *forbidden = 0;
    if (!s || s->full) return 1;
    if (sess_list_match(&s->d, s->forbidden, id, il) ||
        (rbac && sess_list_match(&AUTH->rbac, AUTH->rforbid, id, il))) {
        if (forbidden) *forbidden = 1;
        return 0;
    }
    int g = sess_ns(s, ns, nl);
    if (g >= 0 && sess_list_match(&s->d, g, id, il)) return 1;
    if (nl == 7 && !memcmp(ns, "default", 7) && sess_list_match(&s->d, s->allowed, id, il)) return 1;
    if (auth_infra(id, il)) return 1;
    if (rbac) return auth_exposed(id, il, ns, nl, f);
    return !s->restricted;
}

/* 1 if session s may see function f in listings and events (it may call it). */
static int sess_sees_fn(const struct session *s, const struct func *f)
{
    return !s || s->full || sess_allows(s, f->id, strlen(f->id), f->ns, strlen(f->ns), f, NULL);
}

/* 1 if session s may see worker w: unrestricted, or w is in one of s's namespaces, or w owns a
 * function s may call. */
static int sess_sees_worker(const struct session *s, const struct conn *w)
{
    if (!s || s->full || !s->restricted) return 1;
    if (w->ns && sess_ns(s, w->ns, strlen(w->ns)) >= 0) return 1;
    for (const struct func *f = w->funcs; f; f = f->cnext)
        if (sess_sees_fn(s, f)) return 1;
    return 0;
}

/* 1 if session s may see trigger type tt: unrestricted, or tt is in one of its namespaces. */
static int sess_sees_tt(const struct session *s, const struct ttype *tt)
{
    return !s || s->full || !s->restricted || sess_ns(s, tt->ns, strlen(tt->ns)) >= 0;
}

/* 1 if session s may see binding t (its config included): it may call the bound function. */
static int sess_sees_trig(const struct session *s, const struct trig *t)
{
    if (!s || s->full) return 1;
    struct func *f = func_find_c(t->ns, t->fid);
    return sess_allows(s, t->fid, strlen(t->fid), t->ns, strlen(t->ns), f, NULL);
}

/* Constant-time equality of a[0..an) and b[0..bn): the time depends on the lengths only. */
static int ct_eq(const char *a, size_t an, const char *b, size_t bn)
{
    unsigned char x = an != bn;
    for (size_t i = 0; i < an; i++) x |= (unsigned char)(a[i] ^ b[i < bn ? i : 0]);
    return !x && an == bn;
}

/* The session of token tok[0..n): every configured token is compared (none is skipped on an
 * early match), so the time says nothing of which one, if any, matched. A new reference. */
static struct session *auth_token(const char *tok, size_t n)
{
    struct session *hit = NULL;
    if (!AUTH || !n) return NULL;
    for (size_t i = 0; i < AUTH->ntok; i++)
        if (ct_eq(tok, n, AUTH->tok[i], AUTH->tok_len[i]) && !hit) hit = AUTH->tok_sess[i];
    if (!hit && worker_token[0] && ct_eq(tok, n, worker_token, strlen(worker_token)))
        hit = AUTH->tok_sess[AUTH->ntok]; /* the declared workers' token: full access */
    return sess_ref(hit);
}

static void auth_free(struct auth *a)
{
    if (!a) return;
    for (size_t i = 0; a->tok_sess && i <= a->ntok; i++) sess_unref(a->tok_sess[i]);
    for (size_t i = 0; a->tok && i < a->ntok; i++) xfree(a->tok[i]);
    sess_unref(a->anon);
    xfree(a->tok), xfree(a->tok_len), xfree(a->tok_sess), xfree(a->auth_fn);
    xfree(a->rbac_json), xfree(a->rbac.t), xfree(a->middleware);
    xfree(a);
}

/* Builds AUTH from the listener config l (start-up and reload; the config was validated).
 * Sessions of connections already open are kept (they hold references). -1 on OOM. */
static int auth_load(const struct cfg_listener *l)
{
    if (!l->n_tokens && !l->rbac_json && !l->middleware) {
        auth_free(AUTH), AUTH = NULL;
        return 0;
    }
    struct auth *a = xcalloc(sizeof *a);
    char why[200];
    if (!a) return -1;
    a->ntok = l->n_tokens;
    a->tok = xcalloc((a->ntok + 1) * sizeof *a->tok);
    a->tok_len = xcalloc((a->ntok + 1) * sizeof *a->tok_len);
    a->tok_sess = xcalloc((a->ntok + 1) * sizeof *a->tok_sess);
    if (!a->tok || !a->tok_len || !a->tok_sess) goto oom;
    /* the last slot: the full-access session of plain tokens and of the workers' token */
    const char full[] = "{}";
    if (!(a->tok_sess[a->ntok] = sess_new(full, 2, 0, why, sizeof why))) goto oom;
    a->tok_sess[a->ntok]->full = 1;
    for (size_t i = 0; i < a->ntok; i++) {
        const char *j = l->auth_tokens[i];
        struct jdoc d = {0};
        d.max = 16;
        if (j[0] == '"') { /* a plain token: full access */
            if (json_parse(&d, (unsigned char *)j, strlen(j), 1, 1) < 0 ||
                !(a->tok[i] = json_strdup(&d, 0, &a->tok_len[i])))
                goto oom_d;
            a->tok_sess[i] = sess_ref(a->tok_sess[a->ntok]);
        } else {
            if (!(a->tok_sess[i] = sess_new(j, strlen(j), 1, why, sizeof why))) goto oom_d;
            const struct jdoc *sd = &a->tok_sess[i]->d;
            if (!(a->tok[i] = json_strdup(sd, json_get(sd, 0, "token"), &a->tok_len[i]))) goto oom_d;
        }
        xfree(d.t);
        continue;
    oom_d:
        xfree(d.t);
        goto oom;
    }
    if (l->rbac_json) {
        if (!(a->rbac_json = xstrdup(l->rbac_json))) goto oom;
        a->rbac.max = 4096;
        if (json_parse(&a->rbac, (unsigned char *)a->rbac_json, strlen(a->rbac_json), 4, 1) < 0)
            goto oom;
        a->expose = json_get(&a->rbac, 0, "expose_functions");
        a->rforbid = json_get(&a->rbac, 0, "forbidden_functions");
        int af = json_get(&a->rbac, 0, "auth_function_id");
        if (JTYPE(&a->rbac, af) == J_STRING && !(a->auth_fn = json_strdup(&a->rbac, af, NULL)))
            goto oom;
    } else {
        a->expose = a->rforbid = -1;
    }
    if (l->middleware && !(a->middleware = xstrdup(l->middleware))) goto oom;
    a->on = a->ntok || a->auth_fn;
    if (a->rbac_json && !(a->anon = sess_new(full, 2, 0, why, sizeof why))) goto oom;
    a->metrics_public = l->metrics_public;
    auth_free(AUTH);
    AUTH = a;
    return 0;
oom:
    auth_free(a);
    return -1;
}

/* ==== Router ================================================================================
 * invokefunction → resolve (namespace, id) strictly → builtin: run inline; worker: record the
 * call on both connections and append one invokefunction frame to the target. A call record
 * (struct inv) comes from a free list and keeps the caller's id, the requested function_id and
 * the caller's trace context in inline storage, so a routed call allocates nothing once warm.
 * Before routing: the caller's session decides (FORBIDDEN), the middleware may take the call,
 * and the bounds (BUSY). A `routing:` rule may give a function several providers (picked by
 * its balance), a per-provider bound with a queue, a deadline and retries; without rules the
 * one owner gets every call. Invariants: a call record is on its caller's and target's
 * lists and, when it has a deadline, in the deadline heap; a queued call is on its function's
 * queue and its caller's list; a result settles only the call of the connection it was sent to.
 */
/* Folds a 36-character UUID to lowercase into out (37 bytes): invocation ids are compared
 * case-insensitively, as UUIDs are (RFC 4122 §3), so "A1..." answered as "a1..." still matches. */
static void inv_fold(const char *id, char out[37])
{
    /* eight bytes at a time (the last word overlaps the one before: folding is idempotent);
     * 0x20 is added to the bytes in A..Z, ASCII only */
    static const unsigned char at[5] = {0, 8, 16, 24, 28};
    for (int k = 0; k < 5; k++) {
        uint64_t w, h;
        memcpy(&w, id + at[k], 8);
        h = w & ~SWAR_HIGH;
        w |= (SWAR_GE(h, 'A') & ~SWAR_GE(h, 'Z' + 1) & ~w) >> 2;
        memcpy(out + at[k], &w, 8);
    }
    out[36] = 0;
}

/* The call in flight under id (36 characters, any case), or NULL; *h gets the hash of its
 * key, for inv_new_h when the id is free and about to be used. */
static struct inv *inv_find_h(const char *id, uint32_t *h)
{
    char k[37];
    inv_fold(id, k);
    *h = hm_hash(k, 36);
    return (struct inv *)hm_get_h(&S.invs, k, 36, *h);
}

/* The call in flight under id (36 characters, any case), or NULL. */
static struct inv *inv_find(const char *id)
{
    uint32_t h;
    return inv_find_h(id, &h);
}

/* The deadline heap (S.timed): every call record with a deadline, earliest first, so the
 * timer pass looks at what is due and nothing else. v->hidx is 1 + v's index (0: not in). */
static void timed_swap(size_t a, size_t b)
{
    struct inv *t = S.timed[a];
    S.timed[a] = S.timed[b], S.timed[b] = t;
    S.timed[a]->hidx = a + 1, S.timed[b]->hidx = b + 1;
}

static void timed_fix(size_t i)
{
    while (i && S.timed[(i - 1) / 2]->deadline > S.timed[i]->deadline)
        timed_swap(i, (i - 1) / 2), i = (i - 1) / 2;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        if (l < S.ntimed && S.timed[l]->deadline < S.timed[m]->deadline) m = l;
        if (l + 1 < S.ntimed && S.timed[l + 1]->deadline < S.timed[m]->deadline) m = l + 1;
        if (m == i) return;
        timed_swap(i, m), i = m;
    }
}

/* Puts v (deadline set) in the heap. -1 on OOM (v stays out). */
static int timed_add(struct inv *v)
{
    if (S.ntimed == S.timed_cap) {
        size_t nc = S.timed_cap ? S.timed_cap * 2 : 64;
        struct inv **h = xrealloc(S.timed, nc * sizeof *h);
        if (!h) return -1;
        S.timed = h, S.timed_cap = nc;
    }
    S.timed[S.ntimed] = v, v->hidx = ++S.ntimed;
    timed_fix(S.ntimed - 1);
    timer_touch(v->deadline);
    return 0;
}

/* Takes v out of the heap (a no-op when it is not in it). Allocates nothing. */
static void timed_del(struct inv *v)
{
    if (!v->hidx) return;
    size_t i = v->hidx - 1;
    v->hidx = 0;
    if (i != --S.ntimed) {
        S.timed[i] = S.timed[S.ntimed], S.timed[i]->hidx = i + 1;
        timed_fix(i);
    }
}

/* A call record for id (36 chars, copied) of the given kind, from the free list when possible,
 * inserted into S.invs. Fields up to fid_small are zeroed. NULL on OOM. The caller checks that
 * id is not already in flight. Release with inv_free. h: the hash of id's key from that
 * check (inv_find_h), or NULL to compute it here. */
static struct inv *inv_new_h(const char *id, int kind, const uint32_t *h)
{
    struct inv *v = S.inv_free;
    if (v) {
        S.inv_free = v->free_next;
        S.inv_free_n--;
    } else if (!(v = xmalloc(sizeof *v))) {
        return NULL;
    }
    memset(v, 0, offsetof(struct inv, fid_small));
    v->retry = NULL;
    memcpy(v->id, id, 36);
    v->id[36] = 0;
    inv_fold(id, v->key);
    v->kind = kind;
    if (hm_put_h(&S.invs, &v->h, v->key, 36, h ? *h : hm_hash(v->key, 36)) < 0) {
        v->free_next = S.inv_free, S.inv_free = v, S.inv_free_n++;
        return NULL;
    }
    return v;
}

static struct inv *inv_new(const char *id, int kind)
{
    return inv_new_h(id, kind, NULL);
}

/* Stores a copy of s[0..n) in inline storage when it fits, else allocates. */
static char *inv_store(char *small, size_t cap, const unsigned char *s, size_t n)
{
    char *d = n <= cap ? small : xmalloc(n ? n : 1);
    if (d && n) memcpy(d, s, n);
    return d;
}

/* Adds v to caller's calls_out and target's calls_in (either may be NULL): the in-flight sets
 * of §3.8, walked at disconnect (§7) to fail or forget the calls. */
static void inv_link(struct inv *v, struct conn *caller, struct conn *target)
{
    if (caller) {
        v->caller = caller;
        v->cnext = caller->calls_out;
        if (caller->calls_out) caller->calls_out->cprev = v;
        caller->calls_out = v;
        caller->n_out++;
    }
    if (target) {
        v->target = target;
        v->tnext = target->calls_in;
        if (target->calls_in) target->calls_in->tprev = v;
        target->calls_in = v;
        target->n_in++;
    }
}

/* Removes v from both in-flight lists and clears its connection pointers. */
static void inv_unlink(struct inv *v)
{
    if (v->caller) {
        if (v->cprev) v->cprev->cnext = v->cnext;
        else v->caller->calls_out = v->cnext;
        if (v->cnext) v->cnext->cprev = v->cprev;
        v->caller->n_out--;
        v->caller = NULL;
    }
    if (v->target) {
        if (v->tprev) v->tprev->tnext = v->tnext;
        else v->target->calls_in = v->tnext;
        if (v->tnext) v->tnext->tprev = v->tprev;
        v->target->n_in--;
        v->target = NULL;
    }
}

/* Unlinks and unmaps v, frees out-of-line fid/ctx, and recycles the record (the free list is
 * capped at 4096 so a burst does not pin memory forever). */
static void inv_free(struct inv *v)
{
    if (v->fst) fstat_end(v->fst, v->t0_us, 1); /* ended without a result: stopped */
    if (v->kind == INV_ACK) S.n_acks--;
    timed_del(v);
    inv_unlink(v);
    hm_del(&S.invs, &v->h);
    if (v->fid && v->fid != v->fid_small) xfree(v->fid);
    if (v->ctx && v->ctx != v->ctx_small) xfree(v->ctx);
    xfree(v->retry);
    if (S.inv_free_n < 4096) {
        v->free_next = S.inv_free, S.inv_free = v, S.inv_free_n++;
    } else {
        xfree(v);
    }
}

/* Appends an invocationresult frame to c: fid is the raw JSON string of the function id, res
 * and err raw JSON values (NULL/0 = omitted), ctx raw ",k:v" members echoed back. */
static void rt_send_result(struct conn *c, const char *id, size_t idlen, const char *fid,
                           size_t fidlen, const unsigned char *res, size_t rlen,
                           const unsigned char *err, size_t elen, const char *ctx, size_t ctxlen)
{
    if (!conn_open(c)) return;
    struct buf *b = &c->out;
    /* 80 covers the fixed JSON text, so the header size is usually right the first time; the
     * appends are checked once, by conn_frame_end (sticky buffer error) */
    size_t at = ws_begin(b, 80 + idlen + fidlen + rlen + elen + ctxlen, 0);
    buf_puts(b, "{\"type\":\"invocationresult\",\"invocation_id\":");
    json_put_str(b, id, idlen);
    buf_puts(b, ",\"function_id\":");
    buf_append(b, fid, fidlen);
    if (res) buf_puts(b, ",\"result\":"), conn_put_big(c, at, res, rlen);
    if (err) buf_puts(b, ",\"error\":"), buf_append(b, err, elen);
    buf_append(b, ctx, ctxlen);
    buf_putc(b, '}');
    conn_frame_end(c, at);
}

/* Writes an error body {"code":..,"message":..} into e. */
static void rt_err(struct buf *e, const char *code, const char *fmt, ...) III_PRINTF(3, 4);
static void rt_err(struct buf *e, const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    buf_reset(e);
    buf_puts(e, "{\"code\":");
    json_put_cstr(e, code);
    buf_puts(e, ",\"message\":");
    json_put_cstr(e, msg);
    buf_putc(e, '}');
}

/* Sorts names[0..k) (insertion sort: k is small) and writes them to out as "a, b, c",
 * truncated to cap. Error messages list namespaces this way, sorted as the reference does. */
static void names_join(const char **names, size_t k, char *out, size_t cap)
{
    for (size_t i = 1; i < k; i++)
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            const char *t = names[j];
            names[j] = names[j - 1], names[j - 1] = t;
        }
    size_t o = 0;
    out[0] = 0;
    for (size_t i = 0; i < k && o < cap; i++) {
        int w = snprintf(out + o, cap - o, "%s%s", i ? ", " : "", names[i]);
        if (w < 0) break;
        o += (size_t)w;
    }
}

/* The namespaces in which id[0..il) is registered, sorted, as "a, b" (empty when none).
 * *count gets how many there are and *only the last match (meaningful when *count is 1). At
 * most 64 names are collected: the list is for people, not a full index. */
static void fn_namespaces(const char *id, size_t il, char *out, size_t cap, int *count,
                          struct func **only)
{
    size_t k = 0;
    const char *names[64];
    struct idgroup *g = (struct idgroup *)hm_get(&S.fids, id, il);
    for (struct func *f = g ? g->head : NULL; f && k < 64; f = f->inext) names[k++] = f->ns, *only = f;
    names_join(names, k, out, cap);
    *count = (int)k;
}

/* Namespace hint of function_not_found: ". It is registered in namespace(s): a, b." */
static void rt_ns_hint(const char *id, size_t il, char *out, size_t cap)
{
    char list[400];
    int cnt;
    struct func *only = NULL;
    fn_namespaces(id, il, list, sizeof list, &cnt, &only);
    out[0] = 0;
    if (cnt) snprintf(out, cap, " It is registered in namespace(s): %s.", list);
}

/* Appends data to the frame started at `at` in t->out with "_caller_worker_id" set (§3.2 step
 * 3): objects get the member added last (replacing any caller-supplied one), anything else
 * passes unchanged. Fast path: the payload is not copied at all when large (conn_put_big), else
 * once, into the target's buffer. */
/* Returns 0, or -1 on OOM. data must be a complete valid JSON value (it came through the
 * parser). The byte search for the key may give a false positive (the text appears inside a
 * nested value or a string); the slow path then rebuilds and gets it right. */
static int rt_put_data(struct conn *t, size_t at, const unsigned char *data, size_t dl,
                       const char *wid, int maybe_key)
{
    struct buf *b = &t->out;
    if (!wid || dl < 2 || data[0] != '{') return conn_put_big(t, at, data, dl);
    size_t close = dl - 1; /* the parser guarantees data[dl-1] == '}' for objects */
    size_t i = 1;
    while (i < close && JSON_WS(data[i])) i++;
    int empty = i == close;
    /* maybe_key: the envelope parse saw the key (in any spelling, escapes decoded) as a member
     * of some object at that depth; only then is the object rebuilt without it */
    if (maybe_key && !empty) {
        /* rare: copy the members one by one, leaving out every one whose key decodes to
         * _caller_worker_id; a scan over bytes already validated, so nothing is allocated */
        int first = 1;
        buf_putc(b, '{');
        while (i < close) {
            size_t ks = i, ke = json_skip(data, close, i), vs = ke;
            while (data[vs] != ':') vs++;
            vs++;
            while (JSON_WS(data[vs])) vs++;
            size_t ve = json_skip(data, close, vs);
            if (!json_key_is_cwid(data + ks, ke - ks)) {
                if (!first) buf_putc(b, ',');
                buf_append(b, data + ks, ke - ks), buf_putc(b, ':');
                buf_append(b, data + vs, ve - vs);
                first = 0;
            }
            i = ve;
            while (i < close && (JSON_WS(data[i]) || data[i] == ',')) i++;
        }
        if (!first) buf_putc(b, ',');
        buf_puts(b, "\"_caller_worker_id\":\"");
        buf_puts(b, wid);
        return buf_puts(b, "\"}");
    }
    if (conn_put_big(t, at, data, close) < 0) return -1;
    if (!empty && buf_putc(b, ',') < 0) return -1;
    return buf_puts(b, "\"_caller_worker_id\":\"") < 0 || buf_puts(b, wid) < 0 ||
                   buf_puts(b, "\"}") < 0
               ? -1
               : 0;
}

/* Appends an invokefunction frame for target t. fid: raw JSON string; ctx: the caller's raw
 * ",\"traceparent\":..,\"baggage\":.." members (may be empty); meta: raw metadata or NULL.
 * 0, or -1 when t was dropped (OOM or over its outbound cap). */
static int rt_send_invoke(struct conn *t, const char *id, const char *fid, size_t fidlen,
                          const unsigned char *data, size_t dl, const char *caller_wid,
                          int maybe_key, const char *ctx, size_t ctxlen, const unsigned char *meta,
                          size_t metalen)
{
    struct buf *b = &t->out;
    size_t at = ws_begin(b, 110 + fidlen + dl + ctxlen + metalen, 0);
    buf_puts(b, "{\"type\":\"invokefunction\",\"invocation_id\":\"");
    buf_append(b, id, 36);
    buf_puts(b, "\",\"function_id\":");
    buf_append(b, fid, fidlen);
    buf_puts(b, ",\"data\":");
    rt_put_data(t, at, data, dl, caller_wid, maybe_key);
    buf_append(b, ctx, ctxlen);
    if (meta) buf_puts(b, ",\"metadata\":"), buf_append(b, meta, metalen);
    buf_putc(b, '}');
    return conn_frame_end(t, at);
}


/* Tokenizes the raw value of token ti on its own (for small nested objects such as `action`)
 * into fixed storage: no allocation. -1 if it does not fit or is not valid. */
static int json_sub(const struct jdoc *d, int ti, struct jdoc *sub, struct jtok *arr, uint32_t n)
{
    memset(sub, 0, sizeof *sub);
    sub->t = arr, sub->cap = sub->max = n;
    return json_parse(sub, JRAW(d, ti), JLEN(d, ti), 2, 0);
}

/* Runs builtin f on data (raw JSON) for caller (NULL = engine-internal). The builtin writes a
 * result into r->res (nothing = no result) or an error body into r->err, and may hand back a
 * binding in r->defer (see struct bi_res). */
static void rt_run_builtin(struct func *f, struct conn *caller, const unsigned char *data,
                           size_t dl, struct bi_res *r)
{
    struct jdoc d = {0};
    if (json_parse(&d, data, dl, 3, 0) < 0 || d.t[0].type != J_OBJECT)
        rt_err(&r->err, "deserialization_error",
               "Failed to deserialize input for %s: invalid type: expected a JSON object", f->id);
    else f->bi(caller, &d, 0, &r->res, &r->err);
    xfree(d.t);
}

static struct ttype *trig_provider(const struct trig *t);
static void ack_settle(struct inv *v, const struct jdoc *d, int errbody);
static void auth_answer(struct inv *v, const struct jdoc *d, int res, int err);
static void auth_refuse(struct conn *c, const char *msg);
static int rt_busy(const struct conn *c, const struct conn *t, int reply, char *msg, size_t cap);

/* The error a caller gets when the target disconnects mid-call (§7; exact text, docs/§10). */
static const char ERR_STOPPED[] =
    "{\"code\":\"invocation_stopped\",\"message\":\"Invocation stopped\"}";

/* ---- routing: providers, queues and retries (README "Routing") ---- */
/* A copy of frame p[0..n) for caller c, in no list yet. NULL on OOM. */
static struct qcall *qcall_new(struct conn *c, const unsigned char *p, size_t n, int64_t at)
{
    struct qcall *q = xmalloc(sizeof *q + n);
    if (!q) return NULL;
    memset(q, 0, sizeof *q);
    q->caller = c, q->n = n, q->at = at;
    memcpy(q->frame, p, n);
    return q;
}

/* Links q into its caller's list (teardown forgets the caller in each entry). */
static void qcall_own(struct qcall *q)
{
    struct conn *c = q->caller;
    q->cprev = NULL, q->cnext = c->queued;
    if (c->queued) c->queued->cprev = q;
    c->queued = q;
}

/* Unlinks q from its caller's list (if it still has a caller) and frees it. */
static void qcall_free(struct qcall *q)
{
    if (q->caller) {
        if (q->cprev) q->cprev->cnext = q->cnext;
        else q->caller->queued = q->cnext;
        if (q->cnext) q->cnext->cprev = q->cprev;
    }
    xfree(q);
}

/* Appends (or with front, prepends) q to primary f's queue, listing f on S.qfuncs. */
static void rt_enqueue_q(struct func *f, struct qcall *q, int front)
{
    if (front) q->next = f->qhead, f->qhead = q;
    else q->next = NULL, *(f->qtail ? &f->qtail->next : &f->qhead) = q;
    if (!q->next) f->qtail = q;
    if (!f->qn++) f->qnext = S.qfuncs, S.qfuncs = f;
}

/* Takes f off S.qfuncs (its queue is empty or handed over). */
static void rt_unlist_q(struct func *f)
{
    for (struct func **pp = &S.qfuncs; *pp; pp = &(*pp)->qnext)
        if (*pp == f) {
            *pp = f->qnext;
            break;
        }
    f->qnext = NULL;
}

/* Puts c's call (frame d) in primary f's queue: 1, or 0 when the queue is full (max_queue) or
 * memory is short (the caller is then answered BUSY). */
static int rt_queue(struct conn *c, struct func *f, const struct jdoc *d, const struct cfg_route *ru)
{
    if (f->qn >= ru->max_queue) return 0;
    struct qcall *q = qcall_new(c, d->src, d->len, S.qwait_ms ? now_ms() - S.qwait_ms : now_ms());
    if (!q) return 0;
    qcall_own(q);
    rt_enqueue_q(f, q, 0);
    return 1;
}

/* The provider of f (a primary) for the next call under rule ru (NULL: the single owner's
 * way): open, not retiring, under max_inflight, chosen by the balance. NULL when none; *full
 * when open providers exist but all are at max_inflight. */
static struct func *rt_pick(struct func *f, const struct cfg_route *ru, int *full)
{
    size_t lim = ru ? ru->max_inflight : 0, n = 0;
    int bal = ru ? ru->balance : BAL_FIRST;
    struct func *best = NULL, *p = f;
    *full = 0;
    for (struct func *x = f; x; x = x->rnext) n++;
    /* round-robin starts one further each call; so does least-inflight, so that ties (idle
     * providers, sequential callers) are shared rather than always won by the first */
    if ((bal == BAL_RR || bal == BAL_LEAST) && n > 1)
        for (size_t i = f->rr % n; i; i--) p = p->rnext;
    for (size_t i = 0; i < n; i++, p = p->rnext ? p->rnext : f) {
        if (!conn_open(p->owner) || p->owner->retiring) continue;
        if (lim && p->owner->n_in >= lim) {
            *full = 1;
            continue;
        }
        if (!best || (bal == BAL_LEAST && p->owner->n_in < best->owner->n_in)) best = p;
        if (bal != BAL_LEAST) break;
    }
    if (best) *full = 0;
    if (best && bal != BAL_FIRST) f->rr++;
    return best;
}

static void rt_invoke(struct conn *c, const struct jdoc *d);

/* Dispatches what waits in routing queues while providers have room (once per loop turn).
 * A queued call is routed as if it arrived now, but its deadline counts the time it waited. */
static void route_tick(void)
{
    for (struct func *f = S.qfuncs, *nf; f; f = nf) {
        nf = f->qnext;
        const struct cfg_route *ru = route_for(f->ns, strlen(f->ns), f->id, strlen(f->id));
        while (f->qhead) {
            struct qcall *q = f->qhead;
            int full = 0;
            if (q->caller && !rt_pick(f, ru, &full) && full) break;
            if (!(f->qhead = q->next)) f->qtail = NULL;
            f->qn--;
            if (q->caller && conn_open(q->caller)) {
                struct jdoc d = {0};
                d.max = 4096;
                S.qwait_ms = now_ms() - q->at;
                if (!S.qwait_ms) S.qwait_ms = 1; /* nonzero: "from a queue" */
                if (json_parse(&d, q->frame, q->n, 2, 0) == 0) rt_invoke(q->caller, &d);
                S.qwait_ms = 0;
                xfree(d.t);
            }
            qcall_free(q);
        }
        if (!f->qn) rt_unlist_q(f);
    }
}

/* f (a primary) is going away with calls still queued: r (the next provider) takes the queue,
 * or, when there is none, every waiting caller gets invocation_stopped. */
static void rt_queue_handoff(struct func *f, struct func *r)
{
    if (!f->qn && !f->qhead) return;
    rt_unlist_q(f);
    if (r) {
        r->qhead = f->qhead, r->qtail = f->qtail, r->qn = f->qn;
        r->qnext = S.qfuncs, S.qfuncs = r;
    } else {
        while (f->qhead) {
            struct qcall *q = f->qhead;
            f->qhead = q->next;
            struct jdoc d = {0};
            d.max = 64;
            if (q->caller && json_parse(&d, q->frame, q->n, 2, 0) == 0) {
                int iid = json_get(&d, 0, "invocation_id"), fidt = json_get(&d, 0, "function_id");
                if (JTYPE(&d, iid) == J_STRING && JLEN(&d, iid) == 38 && JTYPE(&d, fidt) == J_STRING)
                    rt_send_result(q->caller, (const char *)JRAW(&d, iid) + 1, 36,
                                   (const char *)JRAW(&d, fidt), JLEN(&d, fidt), NULL, 0,
                                   (const unsigned char *)ERR_STOPPED, sizeof ERR_STOPPED - 1, "", 0);
            }
            xfree(d.t);
            qcall_free(q);
        }
    }
    f->qhead = f->qtail = NULL, f->qn = 0;
}

/* Engine-internal call (trigger fires, discovery events): resolve in ns, run or dispatch with a
 * fresh id; the result is discarded. meta: raw JSON metadata or NULL. */
/* No caller is linked (INV_FIRE): a result or error from the target is only logged, and a
 * target that disconnects just drops the record. data is copied into the frame. */
static void rt_call_internal(const char *ns, const char *fid, const unsigned char *data, size_t dl,
                             const char *meta)
{
    struct func *f = func_find_c(ns, fid);
    if (!f) {
        LOG(LOG_DEBUG, "trigger fire: function %s not found in namespace %s", fid, ns);
        return;
    }
    S.n_invocations++;
    if (!f->owner) {
        struct bi_res r;
        memset(&r, 0, sizeof r);
        rt_run_builtin(f, NULL, data, dl, &r);
        buf_free(&r.res), buf_free(&r.err);
        return;
    }
    char why[256];
    /* a function with several providers: one of them, by its routing rule */
    const struct cfg_route *ru = S.cfg.nroutes ? route_for(ns, strlen(ns), fid, strlen(fid)) : NULL;
    int full = 0;
    struct func *p = rt_pick(f, ru, &full);
    if (p) f = p;
    if (!conn_open(f->owner)) return;
    if (rt_busy(NULL, f->owner, 0, why, sizeof why)) {
        S.n_busy++;
        LOG_LIMITED(f->owner, LOG_WARN, "trigger fire to %s dropped: %s", fid, why);
        return;
    }
    char id[37];
    uuid_new(id);
    struct inv *v = inv_new(id, INV_FIRE);
    if (!v) return;
    inv_link(v, NULL, f->owner);
    v->fst = f->fst, v->t0_us = fstat_begin(f->fst);
    if (ru && ru->timeout_ms) { /* deadlines apply to trigger-fired calls too */
        v->timeout_ms = ru->timeout_ms, v->deadline = now_ms() + ru->timeout_ms, v->notify = 1;
        if (timed_add(v) < 0) v->notify = 0;
    }
    struct buf q = {0};
    json_put_cstr(&q, fid);
    if (buf_check(&q)) conn_oom(f->owner);
    else
        rt_send_invoke(f->owner, v->id, (char *)buf_data(&q), buf_used(&q), data, dl, NULL, 0, "",
                       0, (const unsigned char *)meta, meta ? strlen(meta) : 0);
    buf_free(&q);
}

/* Baggage for an enqueue: the caller's W3C baggage with iii.function.id set to the target
 * (§3.4), written as a JSON string. */
/* Any existing iii.function.id entries are removed first, so the key appears once. */
static void rt_baggage(struct buf *b, const struct jdoc *d, int bg, const char *fid, size_t fl)
{
    struct buf in = {0}, out = {0};
    if (JTYPE(d, bg) == J_STRING) json_unescape(d, bg, &in);
    buf_cstr(&in);
    const char *s = in.p ? (const char *)in.p : "";
    while (*s) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        const char *k = s;
        while (k < s + n && *k == ' ') k++;
        if (!((size_t)(s + n - k) >= 15 && !memcmp(k, "iii.function.id", 15) &&
              (k[15] == '=' || k[15] == ' ')) &&
            n) {
            if (buf_used(&out)) buf_putc(&out, ',');
            buf_append(&out, s, n);
        }
        s += n + (e ? 1 : 0);
    }
    if (buf_used(&out)) buf_putc(&out, ',');
    buf_puts(&out, "iii.function.id=");
    buf_append(&out, fid, fl);
    json_put_str(b, (char *)buf_data(&out), buf_used(&out));
    buf_free(&in), buf_free(&out);
}

/* §3.4: an enqueue action calls engine::queue::enqueue in default with the engine's receipt. */
/* iid < 0: no reply is wanted. The target of the call is the queue worker, not fid: fid only
 * goes into the payload. The caller's reply (receipt or enqueue_error) is sent by rt_result
 * when the queue worker answers; while waiting, v->ctx holds the caller's invocation id. */
static void rt_enqueue(struct conn *c, const struct jdoc *d, int iid, int fidt, const char *fid,
                       size_t fl, const char *ns, int data, int tp, int bg, const char *queue,
                       size_t ql)
{
    int reply = !JABSENT(d, iid);
    const char *qfid = "engine::queue::enqueue";
    struct func *f = func_find_c(NS_DEFAULT, qfid);
    struct buf err = {0};
    if (!f || !f->owner || !conn_open(f->owner)) {
        if (reply) {
            rt_err(
                &err, "enqueue_error",
                "Failed to enqueue '%.*s' on queue '%.*s': function engine::queue::enqueue is not "
                "registered in namespace default (no queue worker is connected; add one with "
                "`iii worker add queue`)",
                (int)fl, fid, (int)ql, queue);
            rt_send_result(c, (const char *)JRAW(d, iid) + 1, 36, (const char *)JRAW(d, fidt),
                           JLEN(d, fidt), NULL, 0, buf_data(&err), buf_used(&err), "", 0);
        }
        S.n_inv_errors++;
        buf_free(&err);
        return;
    }
    char id[37];
    uuid_new(id);
    struct inv *v = inv_new(id, INV_ENQUEUE);
    if (!v) return;
    uuid_new(v->receipt);
    if (reply) {
        /* the reply goes out under the caller's id: keep it in fid's place as a prefix */
        v->fid = inv_store(v->fid_small, sizeof v->fid_small, JRAW(d, fidt), JLEN(d, fidt));
        v->fid_len = JLEN(d, fidt);
        struct buf cid = {0};
        buf_append(&cid, JRAW(d, iid) + 1, 36);
        v->ctx = inv_store(v->ctx_small, sizeof v->ctx_small, buf_data(&cid), 36);
        v->ctx_len = 36;
        buf_free(&cid);
    }
    inv_link(v, reply ? c : NULL, f->owner);
    struct buf in = {0};
    buf_puts(&in, "{\"queue\":");
    json_put_str(&in, queue, ql);
    buf_puts(&in, ",\"function_id\":");
    json_put_str(&in, fid, fl);
    buf_puts(&in, ",\"data\":");
    json_put_raw(&in, d, data);
    buf_printf(&in, ",\"messageReceiptId\":\"%s\"", v->receipt);
    if (!JABSENT(d, tp)) buf_puts(&in, ",\"traceparent\":"), json_put_raw(&in, d, tp);
    buf_puts(&in, ",\"baggage\":");
    rt_baggage(&in, d, bg, fid, fl);
    if (strcmp(ns, NS_DEFAULT)) buf_puts(&in, ",\"namespace\":"), json_put_cstr(&in, ns);
    buf_putc(&in, '}');
    static const char qf[] = "\"engine::queue::enqueue\"";
    if (buf_check(&in)) conn_oom(c);
    else
        rt_send_invoke(f->owner, v->id, qf, sizeof qf - 1, buf_data(&in), buf_used(&in), NULL, 0,
                       "", 0, NULL, 0);
    buf_free(&in);
    S.n_invocations++;
}

/* Bytes rt_ctx_write needs for the caller's trace context of frame d. */
static size_t rt_ctx_len(const struct jdoc *d, int tp, int bg)
{
    return (JABSENT(d, tp) ? 0 : 15 + JLEN(d, tp)) + (JABSENT(d, bg) ? 0 : 11 + JLEN(d, bg));
}

/* Writes the members a reply echoes to its caller (§3.7), raw as they arrived:
 * ,"traceparent":..,"baggage":.. (each only when present). out has rt_ctx_len bytes of room.
 * Returns the bytes written. */
static size_t rt_ctx_write(char *out, const struct jdoc *d, int tp, int bg)
{
    size_t n = 0;
    if (!JABSENT(d, tp))
        memcpy(out, ",\"traceparent\":", 15), memcpy(out + 15, JRAW(d, tp), JLEN(d, tp)),
            n = 15 + JLEN(d, tp);
    if (!JABSENT(d, bg))
        memcpy(out + n, ",\"baggage\":", 11), memcpy(out + n + 11, JRAW(d, bg), JLEN(d, bg)),
            n += 11 + JLEN(d, bg);
    return n;
}

/* Answers caller c's call (id cid, function_id token fidt of frame d) with an error body
 * {code, message}; ctx is the trace context echoed back. */
static void rt_reply_err(struct conn *c, const struct jdoc *d, int fidt, const char *cid,
                         const char *ctx, size_t cl, const char *code, const char *fmt, ...)
    III_PRINTF(8, 9);
static void rt_reply_err(struct conn *c, const struct jdoc *d, int fidt, const char *cid,
                         const char *ctx, size_t cl, const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct buf e = {0};
    rt_err(&e, code, "%s", msg);
    if (buf_check(&e)) conn_oom(c);
    else
        rt_send_result(c, cid, 36, (const char *)JRAW(d, fidt), JLEN(d, fidt), NULL, 0,
                       buf_data(&e), buf_used(&e), ctx, cl);
    buf_free(&e);
}

/* 1 when a call from c to target t (NULL: an in-process builtin) must be refused now, with the
 * reason in msg: the engine's calls in flight, c's as caller, t's as target, or the memory
 * budget. These bounds are what keeps one peer from holding unbounded call records. */
static int rt_busy(const struct conn *c, const struct conn *t, int reply, char *msg, size_t cap)
{
    size_t per = S.set.max_inflight_per_connection;
    if (t && S.invs.n >= S.set.max_inflight_total)
        snprintf(msg, cap, "The engine has %zu calls in flight (max_inflight_total)", S.invs.n);
    else if (t && reply && c->n_out >= per)
        snprintf(msg, cap, "This connection has %zu calls in flight (max_inflight_per_connection)",
                 c->n_out);
    else if (t && t->n_in >= per)
        snprintf(msg, cap, "Worker %s has %zu calls in flight (max_inflight_per_connection)",
                 t->name ? t->name : t->wid, t->n_in);
    else if (mem_over_budget())
        snprintf(msg, cap, "The engine is at its memory budget of %zu bytes (max_memory_bytes)",
                 S.set.max_memory_bytes);
    else return 0;
    return 1;
}

/* §5.11: engine::register_trigger's binding t is served by a WS provider, so the reply to
 * caller c waits (up to 10 s) for the provider's triggerregistrationresult. 1 when the wait
 * was set up (the reply is then sent by ack_settle), 0 to reply now. */
static int rt_hold_ack(struct conn *c, struct trig *t, const struct jdoc *d, int fidt,
                       const char *cid, const char *ctx, size_t cl)
{
    struct ttype *pt = trig_provider(t);
    if (!pt || !pt->provider || inv_find(cid)) return 0;
    struct inv *v = inv_new(cid, INV_ACK);
    if (!v) return 0;
    S.n_acks++; /* counted from the start, as inv_free uncounts every INV_ACK */
    v->fid = inv_store(v->fid_small, sizeof v->fid_small, JRAW(d, fidt), JLEN(d, fidt));
    v->ctx = inv_store(v->ctx_small, sizeof v->ctx_small, (const unsigned char *)ctx, cl);
    if (!v->fid || !v->ctx) {
        inv_free(v);
        return 0;
    }
    memcpy(v->receipt, t->id, 36);
    v->receipt[36] = 0;
    /* 10 s as in the reference engine (§5.11); then the call is accepted without the ack */
    v->deadline = now_ms() + 10000;
    if (timed_add(v) < 0) {
        inv_free(v);
        return 0;
    }
    v->fid_len = JLEN(d, fidt), v->ctx_len = cl;
    inv_link(v, c, pt->provider);
    return 1;
}

/* An in-process builtin runs inline and is answered now (§3.2 step 6). Its result lives in a
 * struct bi_res on this stack frame: nothing global is held across the builtin, which may
 * itself fire triggers and so re-enter the router. */
static void rt_invoke_builtin(struct conn *c, struct func *f, const struct jdoc *d, int fidt,
                              int data, const char *cid, const char *ctx, size_t cl)
{
    struct bi_res r;
    memset(&r, 0, sizeof r);
    int64_t t0 = fstat_begin(f->fst);
    rt_run_builtin(f, c, JRAW(d, data), JLEN(d, data), &r);
    fstat_end(f->fst, t0, buf_used(&r.err) > 0);
    if (buf_check(&r.res) | buf_check(&r.err)) { /* a half-built answer is never sent */
        buf_free(&r.res), buf_free(&r.err);
        rt_err(&r.err, "invocation_error", "out of memory");
    }
    if (buf_used(&r.err)) S.n_inv_errors++;
    if (cid && conn_open(c) && !(r.defer && rt_hold_ack(c, r.defer, d, fidt, cid, ctx, cl)))
        rt_send_result(c, cid, 36, (const char *)JRAW(d, fidt), JLEN(d, fidt),
                       buf_used(&r.err) || !buf_used(&r.res) ? NULL : buf_data(&r.res),
                       buf_used(&r.res), buf_used(&r.err) ? buf_data(&r.err) : NULL,
                       buf_used(&r.err), ctx, cl);
    buf_free(&r.res), buf_free(&r.err);
}

/* Dispatches c's call to worker t: a call record joins both in-flight sets (§3.2 steps 5-6)
 * and one invokefunction frame is queued to t. cid NULL: a void call, whose target still gets
 * an invocation_id, one the engine mints (§3.3). */
static void rt_invoke_worker(struct conn *c, struct func *f, const struct jdoc *d, int fidt,
                             int data, int meta, const char *cid, const char *ctx, size_t cl,
                             int64_t tmo, int64_t left, const struct cfg_route *ru)
{
    struct conn *t = f->owner;
    char mint[37];
    uint32_t h = 0; /* the hash of cid's key: computed by the check, reused by the insert */
    if (!cid) uuid_new(mint);
    /* a caller's id is the key of the call record (§3.2 step 6), so it must be unique in flight */
    if (!conn_open(t) || (cid && inv_find_h(cid, &h))) {
        S.n_inv_errors++;
        if (!cid) return;
        if (!conn_open(t))
            rt_reply_err(c, d, fidt, cid, ctx, cl, "channel_send_failed",
                         "Worker connection for %.*s is closed", (int)JLEN(d, fidt) - 2,
                         (const char *)JRAW(d, fidt) + 1);
        else
            rt_reply_err(c, d, fidt, cid, ctx, cl, "invocation_error",
                         "invocation_id %.36s is already in flight", cid);
        return;
    }
    struct inv *v = inv_new_h(cid ? cid : mint, cid ? INV_CALL : INV_VOID, cid ? &h : NULL);
    if (!v) {
        conn_oom(c);
        return;
    }
    if (cid) {
        v->fid = inv_store(v->fid_small, sizeof v->fid_small, JRAW(d, fidt), JLEN(d, fidt));
        v->fid_len = JLEN(d, fidt);
        v->ctx = inv_store(v->ctx_small, sizeof v->ctx_small, (const unsigned char *)ctx, cl);
        v->ctx_len = cl;
        if (!v->fid || !v->ctx) {
            inv_free(v);
            conn_oom(c);
            return;
        }
    }
    inv_link(v, cid ? c : NULL, t);
    v->fst = f->fst, v->t0_us = fstat_begin(f->fst);
    v->notify = ru != NULL; /* a routed call's target hears when it ends without its result */
    if (tmo > 0) { /* a deadline: invocation_timeout then, and the target is told */
        v->timeout_ms = tmo, v->deadline = now_ms() + left, v->notify = 1;
        if (timed_add(v) < 0) v->notify = ru != NULL;
    }
    /* retry_on_disconnect: the frame is kept, to route the call again if its provider leaves */
    if (ru && ru->retry && cid)
        v->retry = qcall_new(c, d->src, d->len, now_ms() - (tmo ? tmo - left : 0));
    /* metadata goes to the target only: the reply echoes trace context, nothing else (§2.7) */
    rt_send_invoke(t, v->id, (const char *)JRAW(d, fidt), JLEN(d, fidt), JRAW(d, data),
                   JLEN(d, data), c->wid, d->cwid_key, ctx, cl,
                   JABSENT(d, meta) ? NULL : JRAW(d, meta), JABSENT(d, meta) ? 0 : JLEN(d, meta));
}

/* §3.9: the FORBIDDEN answer, with the caller's trace context, under the caller's id or a
 * minted one for a void call. forbidden: the id was explicitly forbidden (the message says
 * which rbac list to edit). */
static void rt_forbidden(struct conn *c, const struct jdoc *d, int iid, int fidt, int tp, int bg,
                         const char *fid, size_t fl, int forbidden)
{
    char mint[37], ctxs[512], *ctx = ctxs;
    size_t cl = rt_ctx_len(d, tp, bg);
    if (cl > sizeof ctxs) cl = 0; /* an oversized context is not echoed on a refusal */
    else cl = rt_ctx_write(ctx, d, tp, bg);
    const char *cid = mint;
    if (JTYPE(d, iid) == J_STRING && JLEN(d, iid) == 38) cid = (const char *)JRAW(d, iid) + 1;
    else uuid_new(mint);
    S.n_inv_errors++;
    LOG_LIMITED(c, LOG_WARN, "worker %s: call to %.*s forbidden by its session", c->wid,
                (int)(fl > 200 ? 200 : fl), fid);
    rt_reply_err(c, d, fidt, cid, ctx, cl, "FORBIDDEN", "function '%.*s' not allowed (%s)",
                 (int)(fl > 600 ? 600 : fl), fid,
                 forbidden ? "remove from rbac.forbidden_functions" : "add to rbac.expose_functions");
}

/* §3.9: a call routed to the middleware function mw instead of its target: the middleware gets
 * {function_id, payload, action, context, namespace}, and its result or error is the reply to
 * the caller, under the caller's id and function_id. */
static void rt_invoke_mw(struct conn *c, struct func *mw, const struct jdoc *d, int fidt, int data,
                         int act, const char *ns, size_t nl, const char *cid, const char *ctx,
                         size_t cl)
{
    struct conn *t = mw->owner;
    char mint[37], why[256];
    if (rt_busy(c, t, cid != NULL, why, sizeof why)) {
        S.n_busy++;
        if (cid) rt_reply_err(c, d, fidt, cid, ctx, cl, "BUSY", "%s", why);
        return;
    }
    /* §3.9: through the middleware a reply is always sent, under a minted id for a void call */
    if (!cid) uuid_new(mint), cid = mint;
    if (!conn_open(t) || inv_find(cid)) {
        rt_reply_err(c, d, fidt, cid, ctx, cl, "invocation_error",
                     "the middleware is unavailable or the id is in flight");
        return;
    }
    struct buf in = {0}, q = {0};
    buf_puts(&in, "{\"function_id\":");
    json_put_raw(&in, d, fidt);
    buf_puts(&in, ",\"payload\":");
    json_put_raw(&in, d, data);
    buf_puts(&in, ",\"action\":");
    if (JABSENT(d, act)) buf_puts(&in, "null");
    else json_put_raw(&in, d, act);
    buf_puts(&in, ",\"context\":");
    const struct session *s = c->sess;
    if (s && !JABSENT(&s->d, s->ctx)) json_put_raw(&in, &s->d, s->ctx);
    else buf_puts(&in, "null");
    buf_puts(&in, ",\"namespace\":");
    json_put_str(&in, ns, nl);
    buf_putc(&in, '}');
    json_put_cstr(&q, mw->id);
    struct inv *v = buf_check(&in) | buf_check(&q) ? NULL : inv_new(cid, INV_CALL);
    if (!v) {
        conn_oom(c);
    } else {
        if (cid) {
            v->fid = inv_store(v->fid_small, sizeof v->fid_small, JRAW(d, fidt), JLEN(d, fidt));
            v->fid_len = JLEN(d, fidt);
            v->ctx = inv_store(v->ctx_small, sizeof v->ctx_small, (const unsigned char *)ctx, cl);
            v->ctx_len = cl;
        }
        if (cid && (!v->fid || !v->ctx)) {
            inv_free(v);
            conn_oom(c);
        } else {
            inv_link(v, cid ? c : NULL, t);
            v->fst = mw->fst, v->t0_us = fstat_begin(mw->fst);
            rt_send_invoke(t, v->id, (char *)buf_data(&q), buf_used(&q), buf_data(&in), buf_used(&in),
                           c->wid, 0, ctx, cl, NULL, 0);
        }
    }
    buf_free(&in), buf_free(&q);
}

/* Handles an invokefunction frame from worker c (§3). Malformed frames are dropped silently. */
static int cl_forward(struct conn *c, const struct jdoc *d, int iid, int fidt, const char *fid,
                      size_t fl, const char *ns, size_t nl, int reply);
static void cl_caller_gone(struct conn *c);

static void rt_invoke(struct conn *c, const struct jdoc *d)
{
    int iid = json_get(d, 0, "invocation_id"), fidt = json_get(d, 0, "function_id");
    int data = json_get(d, 0, "data"), tp = json_get(d, 0, "traceparent");
    int bg = json_get(d, 0, "baggage"), act = json_get(d, 0, "action");
    int meta = json_get(d, 0, "metadata"), nsi = json_get(d, 0, "namespace");
    int64_t tmo = 0; /* timeout_ms this engine adds: a deadline for the call (0: none) */
    if (json_int(d, json_get(d, 0, "timeout_ms"), &tmo) < 0 || tmo < 0 || tmo > CFG_MS_MAX)
        tmo = 0;
    struct buf s1 = {0}, s2 = {0}, s3 = {0};
    const char *fid, *ns = NS_DEFAULT, *queue = NULL;
    size_t fl, nl = sizeof NS_DEFAULT - 1, ql = 0;
    int is_void = 0, is_enq = 0;
    /* §2: data is required (null is a value), function_id a string, invocation_id a UUID when
     * present; anything else does not decode and is dropped without a reply (§1.5) */
    if (data < 0 || jstr(d, fidt, &s1, &fid, &fl) < 0) goto drop;
    if (!JABSENT(d, iid) && (JTYPE(d, iid) != J_STRING ||
                             !uuid_valid((const char *)JRAW(d, iid) + 1, JLEN(d, iid) - 2)))
        goto drop;
    if ((!JABSENT(d, tp) && JTYPE(d, tp) != J_STRING) ||
        (!JABSENT(d, bg) && JTYPE(d, bg) != J_STRING) ||
        (!JABSENT(d, nsi) && JTYPE(d, nsi) != J_STRING))
        goto drop;
    /* §2: action is {"type":"void"} or {"type":"enqueue","queue":..}; any other makes the whole
     * frame invalid */
    if (!JABSENT(d, act)) {
        struct jdoc ad;
        /* an action object is tiny: 16 tokens on the stack, no allocation per call */
        struct jtok at[16];
        if (JTYPE(d, act) != J_OBJECT || json_sub(d, act, &ad, at, 16) < 0) goto drop;
        int ty = json_get(&ad, 0, "type");
        if (json_streq(&ad, ty, "void")) {
            is_void = 1;
        } else if (json_streq(&ad, ty, "enqueue")) {
            if (jstr(&ad, json_get(&ad, 0, "queue"), &s3, &queue, &ql) < 0) goto drop;
            is_enq = 1;
        } else {
            goto drop;
        }
    }
    /* §3.3: void ignores the caller's invocation_id; no id at all is fire-and-forget too */
    int reply = !JABSENT(d, iid) && !is_void;
    if (!JABSENT(d, nsi)) {
        if (jstr(d, nsi, &s2, &ns, &nl) < 0) goto drop;
        if (str_blank(ns, nl)) {
            if (reply) {
                struct buf e = {0};
                rt_err(&e, "INVALID_NAMESPACE",
                       "`namespace` is empty: it was named and left blank. "
                       "Give it a name, or omit it to use `default`.");
                rt_send_result(c, (const char *)JRAW(d, iid) + 1, 36, (const char *)JRAW(d, fidt),
                               JLEN(d, fidt), NULL, 0, buf_data(&e), buf_used(&e), "", 0);
                buf_free(&e);
            } else {
                LOG_LIMITED(c, LOG_WARN, "worker %s: invoke of %.*s with a blank namespace dropped", c->wid,
                    (int)fl, fid);
            }
            goto done;
        }
    }
    /* §3.9: a session that may not call fid in ns is answered FORBIDDEN, even for a void call
     * (under a minted id), before anything is routed or enqueued */
    if (c->sess && !c->sess->full) {
        int forb;
        if (!sess_allows(c->sess, fid, fl, ns, nl, func_find(ns, nl, fid, fl), &forb)) {
            rt_forbidden(c, d, iid, fidt, tp, bg, fid, fl, forb);
            goto done;
        }
    }
    /* §3.4: an enqueue never resolves its target: it goes to engine::queue::enqueue in default */
    if (is_enq) {
        char *nsz = xstrndup(ns, nl);
        if (nsz) rt_enqueue(c, d, reply ? iid : -1, fidt, fid, fl, nsz, data, tp, bg, queue, ql);
        xfree(nsz);
        goto done;
    }
    S.n_invocations++;
    /* the trace context echoed to the caller lives in this call's own stack frame (or a block
     * it owns): never in a global scratch buffer, as a builtin below may re-enter the router */
    char ctxs[256], *ctxh = NULL, *ctx = ctxs;
    size_t cl = rt_ctx_len(d, tp, bg);
    if (cl > sizeof ctxs && !(ctx = ctxh = xmalloc(cl))) {
        conn_oom(c);
        goto done;
    }
    cl = rt_ctx_write(ctx, d, tp, bg);
    const char *cid = reply ? (const char *)JRAW(d, iid) + 1 : NULL;
    /* §3.9 middleware: every call but to the engine's own engine::* builtins goes to the
     * middleware function instead (its own worker's calls excepted: it must reach the real one) */
    struct func *mw = AUTH && AUTH->middleware ? func_find_c(NS_DEFAULT, AUTH->middleware) : NULL;
    /* §3.1: strict resolution in exactly ns; the miss names the namespaces that do have the id */
    struct func *f = func_find(ns, nl, fid, fl);
    char why[256];
    if (mw && mw->owner && mw->owner != c && !(f && !f->owner)) {
        rt_invoke_mw(c, mw, d, fidt, data, act, ns, nl, cid, ctx, cl);
    } else if (!f && !S.draining && cl_forward(c, d, iid, fidt, fid, fl, ns, nl, reply)) {
        /* no provider here, one on another node: the call went there (README "Cluster") */
    } else if (!f) {
        S.n_inv_errors++;
        if (reply) {
            char hint[512];
            rt_ns_hint(fid, fl, hint, sizeof hint);
            rt_reply_err(c, d, fidt, cid, ctx, cl, "function_not_found",
                         "Function %.*s not found in namespace %.*s.%s", (int)fl, fid, (int)nl, ns,
                         hint);
        }
    } else if (S.draining) {
        /* shutting down: calls in flight finish, new ones are refused */
        S.n_inv_errors++;
        if (reply)
            rt_reply_err(c, d, fidt, cid, ctx, cl, "engine_draining",
                         "The engine is shutting down and takes no new calls");
    } else {
        /* a worker function: the provider by the routing rule (the only one by default); all
         * at their max_inflight: the call waits in the rule's queue, or is BUSY */
        const struct cfg_route *ru = f->owner && S.cfg.nroutes ? route_for(ns, nl, fid, fl) : NULL;
        int full = 0;
        struct func *p = f->owner ? rt_pick(f, ru, &full) : f;
        if (!p && full && ru && ru->max_queue && rt_queue(c, f, d, ru)) {
            /* queued: dispatched by route_tick when a provider has room */
        } else if (!p && full) {
            S.n_inv_errors++, S.n_busy++;
            if (reply)
                rt_reply_err(c, d, fidt, cid, ctx, cl, "BUSY",
                             "Every provider of %.*s has %zu calls in flight (max_inflight)%s",
                             (int)fl, fid, ru->max_inflight,
                             ru->max_queue ? " and the queue is full (max_queue)" : "");
        } else if (p = p ? p : f, rt_busy(c, p->owner, reply, why, sizeof why)) {
            /* a bound is reached: refused now, with a reason, rather than queued without limit */
            S.n_inv_errors++, S.n_busy++;
            if (reply) rt_reply_err(c, d, fidt, cid, ctx, cl, "BUSY", "%s", why);
            else LOG_LIMITED(c, LOG_WARN, "worker %s: call to %.*s dropped: %s", c->wid, (int)fl,
                             fid, why);
        } else if (!p->owner) {
            rt_invoke_builtin(c, p, d, fidt, data, cid, ctx, cl);
        } else {
            int64_t qt = S.qwait_ms; /* time this call already spent in a routing queue */
            int64_t dl = tmo ? tmo : ru ? ru->timeout_ms : 0;
            if (dl && qt >= dl) {
                S.n_inv_errors++;
                if (reply)
                    rt_reply_err(c, d, fidt, cid, ctx, cl, "invocation_timeout",
                                 "Invocation timed out after %lld ms", (long long)dl);
            } else {
                rt_invoke_worker(c, p, d, fidt, data, meta, cid, ctx, cl, dl, dl ? dl - qt : 0, ru);
            }
        }
    }
    xfree(ctxh);
    goto done;
drop:
    LOG_LIMITED(c, LOG_WARN, "worker %s: json decode error: invalid invokefunction dropped", c->wid);
done:
    buf_free(&s1), buf_free(&s2), buf_free(&s3);
}

/* Handles an invocationresult from worker c (§2.3): the call is found by id; only its target
 * may answer it (a stricter rule than the reference: no connection can settle another's call). */
static void rt_result(struct conn *c, const struct jdoc *d)
{
    int iid = json_get(d, 0, "invocation_id");
    int res = json_get(d, 0, "result"), err = json_get(d, 0, "error");
    /* shapes were checked by msg_valid: a UUID invocation_id, a string function_id */
    struct inv *v = inv_find((const char *)JRAW(d, iid) + 1);
    /* §2.3: a late or unknown result is a debug-level no-op */
    if (!v || v->target != c) {
        LOG(LOG_DEBUG, "worker %s: result for unknown invocation %.36s ignored", c->wid,
            JRAW(d, iid) + 1);
        return;
    }
    int has_err = !JABSENT(d, err), has_res = !JABSENT(d, res);
    if (has_err) S.n_inv_errors++;
    if (v->fst) fstat_end(v->fst, v->t0_us, has_err), v->fst = NULL;
    /* an error wins over a result; a null or absent result is omitted from the reply (§2.7) */
    if (v->kind == INV_CALL && v->caller) {
        rt_send_result(v->caller, v->id, 36, v->fid, v->fid_len,
                       has_err || !has_res ? NULL : JRAW(d, res), has_res ? JLEN(d, res) : 0,
                       has_err ? JRAW(d, err) : NULL, has_err ? JLEN(d, err) : 0, v->ctx,
                       v->ctx_len);
        /* §3.4: the queue worker's answer becomes the engine's receipt, or enqueue_error */
    } else if (v->kind == INV_ENQUEUE && v->caller) {
        struct buf out = {0};
        if (has_err) {
            struct jdoc ed;
            struct jtok et[16];
            size_t ml = 0;
            const char *m = NULL;
            struct buf sc = {0};
            if (json_sub(d, err, &ed, et, 16) < 0 ||
                jstr(&ed, json_get(&ed, 0, "message"), &sc, &m, &ml) < 0)
                m = "enqueue failed", ml = strlen(m);
            rt_err(&out, "enqueue_error", "%.*s", (int)ml, m);
            buf_free(&sc);
            rt_send_result(v->caller, v->ctx, 36, v->fid, v->fid_len, NULL, 0, buf_data(&out),
                           buf_used(&out), "", 0);
        } else {
            buf_printf(&out, "{\"messageReceiptId\":\"%s\"}", v->receipt);
            rt_send_result(v->caller, v->ctx, 36, v->fid, v->fid_len, buf_data(&out),
                           buf_used(&out), NULL, 0, "", 0);
        }
        buf_free(&out);
    } else if (v->kind == INV_AUTH) {
        auth_answer(v, d, res, err);
    } else if (has_err && v->kind == INV_FIRE) {
        LOG(LOG_DEBUG, "trigger fire %s failed: %.*s", v->id, (int)JLEN(d, err), JRAW(d, err));
    }
    inv_free(v);
}

/* ==== Triggers and discovery ================================================================
 * Trigger types keyed (namespace, id) with one provider each (replace, never skip); bindings
 * keyed by id, live or parked. Provider resolution: the explicit trigger_namespace only, else
 * the binding's home namespace, then default (§4.1). WS-provided types are fired by their
 * provider; the engine's own types (the two discovery events) are fired here.
 *
 * Invariants: every binding is in exactly one type group (its trigger type id) and one function
 * group (its target), and in its acct connection's list while that is connected; every trigger
 * type with a provider is on that provider's list. So a provider change, a fire or a teardown
 * walks only what it concerns, and teardown needs no allocation. Bindings are bounded per
 * connection, per target function and in all (max_triggers*), so no client can make one event
 * fan out into unbounded calls.
 */
static const char TT_WORKERS[] = "engine::workers-available";
static const char TT_FUNCTIONS[] = "engine::functions-available";

/* The trigger type registered as (ns, id), or NULL. */
static struct ttype *tt_find(const char *ns, const char *id)
{
    return (struct ttype *)reg_find(&S.ttypes, ns, strlen(ns), id, strlen(id));
}

/* The binding with id[0..n), live or parked, or NULL. Binding ids are global (not per ns). */
static struct trig *trig_find(const char *id, size_t n)
{
    return (struct trig *)hm_get(&S.trigs, id, n);
}

/* The group of map m under key k[0..kl), or NULL. */
static struct tgroup *tg_find(struct hmap *m, const char *k, size_t kl)
{
    return (struct tgroup *)hm_get(m, k, kl);
}

/* The bindings of trigger type id (any namespace): the head of its group's chain, or NULL. */
static struct trig *tg_first(const char *type)
{
    struct tgroup *g = tg_find(&S.tgroups, type, strlen(type));
    return g ? g->head : NULL;
}

/* The group of m under key k[0..kl), created empty when missing. NULL on OOM. */
static struct tgroup *tg_get(struct hmap *m, const char *k, size_t kl)
{
    struct tgroup *g = tg_find(m, k, kl);
    if (g) return g;
    if (!(g = xcalloc(sizeof *g))) return NULL;
    if (!(g->key = xmalloc(kl + 1)) || (memcpy(g->key, k, kl), g->key[kl] = 0, 0) ||
        hm_put(m, &g->h, g->key, kl) < 0) {
        xfree(g->key), xfree(g);
        return NULL;
    }
    return g;
}

/* Frees group g of map m once it is empty. */
static void tg_release(struct hmap *m, struct tgroup *g)
{
    if (!g || g->n) return;
    hm_del(m, &g->h);
    xfree(g->key), xfree(g);
}

/* Links t into its type and function groups (created on demand). 0 ok, -1 OOM (t unlinked). */
static int trig_index(struct trig *t)
{
    char sb[256];
    size_t kl, nl = strlen(t->ns);
    char *k = reg_key(sb, sizeof sb, t->ns, nl, t->fid, strlen(t->fid), &kl);
    struct tgroup *tg = tg_get(&S.tgroups, t->type, strlen(t->type));
    struct tgroup *fg = k ? tg_get(&S.fgroups, k, kl) : NULL;
    if (k && k != sb) xfree(k);
    if (!tg || !fg) {
        if (tg) tg_release(&S.tgroups, tg);
        if (fg) tg_release(&S.fgroups, fg);
        return -1;
    }
    t->tg = tg, t->fg = fg;
    t->type_next = tg->head, t->type_prev = NULL;
    if (tg->head) tg->head->type_prev = t;
    tg->head = t, tg->n++;
    t->fn_next = fg->head, t->fn_prev = NULL;
    if (fg->head) fg->head->fn_prev = t;
    fg->head = t, fg->n++;
    return 0;
}

/* Counts t against connection c (its owner, or the creator of a durable binding). */
static void trig_acct(struct trig *t, struct conn *c)
{
    t->acct = c;
    t->acct_prev = NULL, t->acct_next = c->trigs;
    if (c->trigs) c->trigs->acct_prev = t;
    c->trigs = t, c->n_trigs++;
}

/* Stops counting t against its connection (the connection left, or t is freed). */
static void trig_unacct(struct trig *t)
{
    struct conn *c = t->acct;
    if (!c) return;
    if (t->acct_prev) t->acct_prev->acct_next = t->acct_next;
    else c->trigs = t->acct_next;
    if (t->acct_next) t->acct_next->acct_prev = t->acct_prev;
    c->n_trigs--;
    t->acct = NULL, t->acct_prev = t->acct_next = NULL;
}

/* Provider resolution of §4.1: an explicit trigger_namespace is the only candidate; otherwise
 * the binding's home namespace, then default. NULL: no provider yet (the binding parks). */
static struct ttype *trig_resolve(const struct trig *t)
{
    if (t->trigger_ns) return tt_find(t->trigger_ns, t->type);
    struct ttype *tt = tt_find(t->home_ns, t->type);
    return tt ? tt : tt_find(NS_DEFAULT, t->type);
}

/* The provider type currently serving live binding t, or NULL. */
static struct ttype *trig_provider(const struct trig *t)
{
    return t->live && t->provider_ns ? tt_find(t->provider_ns, t->type) : NULL;
}

/* Sends registertrigger for t to a WS provider (§4.2 step 8): namespace omitted when the
 * target is default, trigger_namespace omitted when the provider namespace is default. */
static void trig_send_register(struct conn *p, const struct trig *t, const char *provider_ns)
{
    struct buf *b = &p->out;
    size_t at = ws_begin(b,
                         128 + strlen(t->id) + strlen(t->type) + strlen(t->fid) +
                             strlen(t->config_raw) + (t->meta_raw ? strlen(t->meta_raw) : 0),
                         0);
    buf_puts(b, "{\"type\":\"registertrigger\",\"id\":");
    json_put_cstr(b, t->id);
    buf_puts(b, ",\"trigger_type\":");
    json_put_cstr(b, t->type);
    buf_puts(b, ",\"function_id\":");
    json_put_cstr(b, t->fid);
    buf_puts(b, ",\"config\":");
    buf_puts(b, t->config_raw);
    if (t->meta_raw) buf_puts(b, ",\"metadata\":"), buf_puts(b, t->meta_raw);
    if (strcmp(t->ns, NS_DEFAULT)) buf_puts(b, ",\"namespace\":"), json_put_cstr(b, t->ns);
    if (strcmp(provider_ns, NS_DEFAULT))
        buf_puts(b, ",\"trigger_namespace\":"), json_put_cstr(b, provider_ns);
    buf_putc(b, '}');
    conn_frame_end(p, at); /* every append above is checked here, once (sticky error) */
}

/* Sends unregistertrigger for t to provider p (§2.7: trigger_type always present). A closed
 * provider is skipped; OOM drops the provider. */
static void trig_send_unregister(struct conn *p, const struct trig *t)
{
    if (!conn_open(p)) return;
    struct buf *b = &p->out;
    size_t at = ws_begin(b, 64 + strlen(t->id) + strlen(t->type), 0);
    buf_puts(b, "{\"type\":\"unregistertrigger\",\"id\":");
    json_put_cstr(b, t->id);
    buf_puts(b, ",\"trigger_type\":");
    json_put_cstr(b, t->type);
    buf_putc(b, '}');
    conn_frame_end(p, at);
}

/* Delivers t to provider tt: a WS provider gets registertrigger (fire-and-forget, live at
 * once); an in-process one just books it. A provider that is gone parks the binding. */
static void trig_deliver(struct trig *t, struct ttype *tt)
{
    if (tt->provider && !conn_open(tt->provider)) {
        t->live = 0;
        return;
    }
    if (tt->provider) trig_send_register(tt->provider, t, tt->ns);
    char *pn = xstrdup(tt->ns);
    if (!pn) {
        t->live = 0;
        return;
    }
    xfree(t->provider_ns);
    t->provider_ns = pn;
    t->live = 1;
}

/* Frees binding t's strings and t (it is in no map and no list any more). */
static void trig_destroy(struct trig *t)
{
    xfree(t->id), xfree(t->type), xfree(t->fid), xfree(t->config_raw), xfree(t->meta_raw);
    xfree(t->ns), xfree(t->trigger_ns), xfree(t->home_ns), xfree(t->provider_ns);
    sess_unref(t->sess);
    xfree(t);
}

/* Unmaps, unlinks and frees binding t. Tells no provider: see trig_remove. Allocates nothing. */
static void trig_free(struct trig *t)
{
    hm_del(&S.trigs, &t->h);
    trig_unacct(t);
    if (t->tg) {
        if (t->type_prev) t->type_prev->type_next = t->type_next;
        else t->tg->head = t->type_next;
        if (t->type_next) t->type_next->type_prev = t->type_prev;
        t->tg->n--;
        tg_release(&S.tgroups, t->tg);
    }
    if (t->fg) {
        if (t->fn_prev) t->fn_prev->fn_next = t->fn_next;
        else t->fg->head = t->fn_next;
        if (t->fn_next) t->fn_next->fn_prev = t->fn_prev;
        t->fg->n--;
        tg_release(&S.fgroups, t->fg);
    }
    trig_destroy(t);
}

/* Removes binding t; a live one's provider is told with unregistertrigger (§2.5). */
static void trig_remove(struct trig *t)
{
    struct ttype *tt = trig_provider(t);
    if (tt && tt->provider) trig_send_unregister(tt->provider, t);
    trig_free(t);
}

/* Why a new binding from connection acct (NULL: none) to function (ns, fid) must be refused,
 * written into why; 0 when it may be made. Replacing binding `old` frees its place first. */
static int trig_limits(const struct conn *acct, const char *ns, const char *fid,
                       const struct trig *old, char *why, size_t cap)
{
    char sb[256];
    size_t kl;
    char *k = reg_key(sb, sizeof sb, ns, strlen(ns), fid, strlen(fid), &kl);
    struct tgroup *fg = k ? tg_find(&S.fgroups, k, kl) : NULL;
    if (k && k != sb) xfree(k);
    size_t on_fn = fg ? fg->n - (old && old->fg == fg) : 0;
    size_t mine = acct ? acct->n_trigs - (old && old->acct == acct) : 0;
    if (S.trigs.n - (old != NULL) >= S.set.max_triggers)
        snprintf(why, cap, "the engine holds %zu bindings (max_triggers)", S.trigs.n);
    else if (on_fn >= S.set.max_triggers_per_function)
        snprintf(why, cap, "function %s has %zu bindings (max_triggers_per_function)", fid, on_fn);
    else if (mine >= S.set.max_triggers_per_connection)
        snprintf(why, cap, "this connection made %zu bindings (max_triggers_per_connection)", mine);
    else return 0;
    return 1;
}

/* Creates or replaces binding id (§4.2): owner NULL = durable, counted against acct (its
 * creator) while that is connected. All strings are copied. Returns the binding, or NULL with
 * the reason in why (a limit, or out of memory). */
static struct trig *trig_register(struct conn *owner, struct conn *acct, const char *id,
                                  const char *type, const char *fid, const char *config_raw,
                                  const char *meta_raw, const char *ns, const char *trigger_ns,
                                  const char *home_ns, char *why, size_t whycap)
{
    struct trig *old = trig_find(id, strlen(id));
    if (trig_limits(acct, ns, fid, old, why, whycap)) return NULL;
    snprintf(why, whycap, "out of memory");
    struct ttype *oldp = old ? trig_provider(old) : NULL;
    struct trig *t = xcalloc(sizeof *t);
    if (!t) return NULL;
    t->id = xstrdup(id), t->type = xstrdup(type), t->fid = xstrdup(fid);
    t->config_raw = xstrdup(config_raw), t->meta_raw = meta_raw ? xstrdup(meta_raw) : NULL;
    t->ns = xstrdup(ns), t->trigger_ns = trigger_ns ? xstrdup(trigger_ns) : NULL;
    t->home_ns = xstrdup(home_ns);
    t->owner = owner;
    if (!t->id || !t->type || !t->fid || !t->config_raw || (meta_raw && !t->meta_raw) || !t->ns ||
        (trigger_ns && !t->trigger_ns) || !t->home_ns || trig_index(t) < 0) {
        trig_destroy(t);
        return NULL;
    }
    if (hm_put(&S.trigs, &t->h, t->id, strlen(t->id)) < 0) {
        t->h.key = NULL;
        trig_free(t); /* hm_del of a node not in the map is a no-op */
        return NULL;
    }
    struct ttype *tt = trig_resolve(t);
    if (old) {
        /* the id moves (ownership included); a different provider is told the old one is gone */
        if (oldp && oldp->provider && (!tt || oldp != tt))
            trig_send_unregister(oldp->provider, old);
        trig_free(old);
    }
    if (acct) trig_acct(t, acct), t->sess = sess_ref(acct->sess);
    /* no provider yet: the binding stays parked (§4.4) until one registers the type */
    if (tt) trig_deliver(t, tt);
    else if (acct)
        LOG_LIMITED(acct, LOG_WARN,
                    "trigger %s: no provider for trigger type '%s' yet; parked until a worker "
                    "registers it",
                    id, type);
    return t;
}

/* Moves trigger type tt to provider p (NULL = in-process), keeping the providers' lists. */
static void tt_set_provider(struct ttype *tt, struct conn *p)
{
    if (tt->provider) {
        struct ttype **pp = &tt->provider->ttypes;
        while (*pp && *pp != tt) pp = &(*pp)->pnext;
        if (*pp) *pp = tt->pnext;
    }
    tt->provider = p, tt->pnext = NULL;
    if (p) tt->pnext = p->ttypes, p->ttypes = tt;
}

/* Registers (replaces) trigger type (ns, id) provided by p (NULL = in-process), then replays
 * and activates the bindings that now resolve to it (§2.4). Walks only the bindings of id. */
static struct ttype *tt_register(struct conn *p, const char *ns, const char *id,
                                 const char *desc_raw, const char *treq_raw, const char *creq_raw)
{
    /* §2.4: parked intents of connections that are gone are dropped before anything replays */
    for (struct trig *t = tg_first(id), *nx; t; t = nx) {
        nx = t->type_next;
        if (!t->live && t->owner && !conn_live(t->owner)) trig_free(t);
    }
    struct ttype *tt = tt_find(ns, id);
    if (!tt) {
        tt = xcalloc(sizeof *tt);
        size_t kl;
        if (!tt || !(tt->key = reg_key(NULL, 0, ns, strlen(ns), id, strlen(id), &kl)) ||
            hm_put(&S.ttypes, &tt->h, tt->key, kl) < 0) {
            if (tt) xfree(tt->key);
            xfree(tt);
            return NULL;
        }
        tt->klen = kl;
        tt->ns = tt->key;
        tt->id = tt->key + strlen(ns) + 1;
    }
    /* §2.4: replace, never skip: the newest registration's description and schemas win */
    xfree(tt->desc_raw), xfree(tt->treq_raw), xfree(tt->creq_raw);
    tt->desc_raw = desc_raw ? xstrdup(desc_raw) : NULL;
    tt->treq_raw = treq_raw ? xstrdup(treq_raw) : NULL;
    tt->creq_raw = creq_raw ? xstrdup(creq_raw) : NULL;
    tt_set_provider(tt, p);
    S.reg_ver++; /* the cluster snapshot lists trigger types */
    /* §2.4 steps 1-3: replay live bindings that resolve here, activate parked ones, and re-home
     * bindings that had fallen back to default (the old provider is told to drop them) */
    for (struct trig *t = tg_first(id); t; t = t->type_next) {
        if (trig_resolve(t) != tt) continue;
        struct ttype *cur = trig_provider(t);
        if (t->live && cur && cur != tt && cur->provider)
            trig_send_unregister(cur->provider, t); /* re-home */
        trig_deliver(t, tt);
    }
    return tt;
}

/* Removes trigger type tt (its provider left): bindings it served fall back or park (§4.5).
 * Walks only the bindings of its id; allocates nothing. */
static void tt_remove(struct ttype *tt)
{
    S.reg_ver++; /* the cluster snapshot lists trigger types */
    hm_del(&S.ttypes, &tt->h);
    tt_set_provider(tt, NULL);
    for (struct trig *t = tg_first(tt->id); t; t = t->type_next) {
        if (!t->live || !t->provider_ns || strcmp(t->provider_ns, tt->ns)) continue;
        struct ttype *alt = trig_resolve(t);
        /* §4.5: another provider may still resolve (home namespace or default); else park it */
        if (alt) trig_deliver(t, alt);
        else {
            t->live = 0;
            LOG(LOG_INFO, "trigger %s disabled until trigger type '%s' returns", t->id, t->type);
        }
    }
    xfree(tt->desc_raw), xfree(tt->treq_raw), xfree(tt->creq_raw), xfree(tt->key), xfree(tt);
}

/* Fires an in-process trigger type: every live binding of that type gets the event. A fire
 * only queues frames (a target that overflows is marked dead, not freed) or runs a builtin
 * with the event as its input, which no binding-changing builtin accepts (they need an id or a
 * trigger_type), so the chain does not change under the walk. about: the worker the event is
 * about (a restricted session hears only of workers it may see); remote: the worker is on
 * another node (a restricted session hears nothing of those, as its listings show none). */
static void trig_fire(const char *type, const unsigned char *data, size_t dl,
                      const struct conn *about, int remote)
{
    struct tgroup *g = tg_find(&S.tgroups, type, strlen(type));
    size_t n = g ? g->n : 0, i = 0;
    for (struct trig *t = g ? g->head : NULL; t && i < n; t = t->type_next, i++) {
        if (!t->live) continue;
        if (remote ? t->sess && !t->sess->full && t->sess->restricted
                   : about && !sess_sees_worker(t->sess, about))
            continue;
        rt_call_internal(t->ns, t->fid, data, dl, t->meta_raw);
    }
}

/* Fires engine::workers-available (§6.1) with {"event":event,"worker_id":w's id}. */
static void ev_worker(const char *event, const struct conn *w)
{
    char data[128];
    int n = snprintf(data, sizeof data, "{\"event\":\"%s\",\"worker_id\":\"%s\"}", event, w->wid);
    S.reg_ver++; /* the cluster snapshot lists workers */
    trig_fire(TT_WORKERS, (unsigned char *)data, (size_t)n, w, 0);
}

/* The same for worker wid on another node: the payload adds "node". */
static void ev_worker_remote(const char *event, const char *wid, const char *node)
{
    struct buf b = {0};
    buf_printf(&b, "{\"event\":\"%s\",\"worker_id\":", event);
    json_put_cstr(&b, wid);
    buf_puts(&b, ",\"node\":");
    json_put_cstr(&b, node);
    buf_putc(&b, '}');
    if (!buf_check(&b)) trig_fire(TT_WORKERS, buf_data(&b), buf_used(&b), NULL, 1);
    buf_free(&b);
}

static int fn_summary(struct buf *b, const struct func *f);
static void cl_rows_event(struct buf *b, const struct session *s, size_t k);

/* The functions_changed payload as session s sees it (NULL: all functions). */
static void ev_functions_build(struct buf *b, const struct session *s)
{
    size_t n = 0, k = 0;
    struct hnode **v = hm_list(&S.funcs, &n);
    buf_puts(b, "{\"event\":\"functions_changed\",\"functions\":[");
    for (size_t i = 0; v && i < n; i++) {
        if (!sess_sees_fn(s, (struct func *)v[i])) continue;
        if (k++) buf_putc(b, ',');
        fn_summary(b, (struct func *)v[i]);
    }
    cl_rows_event(b, s, k);
    buf_puts(b, "]}");
    if (!v) b->err = BUF_ENOMEM;
    xfree(v);
}


/* 1 if some live binding of trigger type `type` exists (somebody listens). */
static int trig_listened(const char *type)
{
    for (struct trig *t = tg_first(type); t; t = t->type_next)
        if (t->live) return 1;
    return 0;
}

/* Called once per loop turn: fires functions_changed when the id set changed (docs/§10
 * item 1: immediate, coalesced to one event per turn; keyed on the id set only). A snapshot is
 * the whole function list, so the next one waits until the last one's size has been paced
 * out at III_DISCOVERY_BYTES_PER_S: a small registry still gets every change at once, while a
 * client toggling one function among 20,000 cannot make the engine send gigabytes. */
static void ev_functions_tick(int64_t now, int64_t *next)
{
    if (S.fn_fp == S.fn_fp_sent && S.fn_n == S.fn_n_sent && S.cl_rver == S.cl_rver_sent) return;
    if (now < S.fn_event_at) {
        if (S.fn_event_at < *next) *next = S.fn_event_at;
        return;
    }
    S.fn_fp_sent = S.fn_fp, S.fn_n_sent = S.fn_n, S.cl_rver_sent = S.cl_rver;
    /* nobody listens: skip building the list (the fingerprint is already marked as sent) */
    if (!trig_listened(TT_FUNCTIONS)) return;
    struct buf b = {0};
    ev_functions_build(&b, NULL);
    if (buf_check(&b)) {
        LOG(LOG_WARN, "functions-available: out of memory building the event; skipped");
    } else {
        /* a subscriber under a restricted session gets the list as its session sees it */
        struct tgroup *g = tg_find(&S.tgroups, TT_FUNCTIONS, sizeof TT_FUNCTIONS - 1);
        size_t gn = g ? g->n : 0, i = 0;
        for (struct trig *t = g ? g->head : NULL; t && i < gn; t = t->type_next, i++) {
            if (!t->live) continue;
            if (!t->sess || t->sess->full || !t->sess->restricted) {
                rt_call_internal(t->ns, t->fid, buf_data(&b), buf_used(&b), t->meta_raw);
                continue;
            }
            struct buf fb = {0};
            ev_functions_build(&fb, t->sess);
            if (!buf_check(&fb)) rt_call_internal(t->ns, t->fid, buf_data(&fb), buf_used(&fb), t->meta_raw);
            buf_free(&fb);
        }
        S.fn_event_at = now + (int64_t)(buf_used(&b) / (III_DISCOVERY_BYTES_PER_S / 1000));
    }
    buf_free(&b);
}

/* ---- authentication of a new connection by the auth function (§1.2 step 1, §3.9) ---- */
/* Admits c with session s (a reference c takes over): it becomes a worker now (workerregistered
 * and so on), and what it sent while it waited is processed on the next turn. */
static void auth_admit(struct conn *c, struct session *s)
{
    c->sess = s;
    c->auth_wait = 0;
    worker_on_open(c);
    if (buf_used(&c->in) && conn_open(c)) c->rsnext = S.resume, S.resume = c;
}

/* Refuses c after its upgrade: one error frame, then a Close (§1.2 step 1). */
static void auth_refuse(struct conn *c, const char *msg)
{
    struct buf b = {0};
    buf_puts(&b, "{\"type\":\"error\",\"error\":{\"code\":\"AUTH_ERROR\",\"message\":");
    json_put_cstr(&b, msg);
    buf_puts(&b, "}}");
    c->auth_wait = 0;
    LOG_LIMITED(c, LOG_WARN, "connection from %s refused: AUTH_ERROR: %s", c->ip, msg);
    if (!buf_check(&b)) conn_frame(c, WS_TEXT, buf_data(&b), buf_used(&b));
    buf_free(&b);
    conn_close(c, 1008, "AUTH_ERROR");
}

/* Calls the auth function for c with {headers, query_params, ip_address} (JSON members in
 * hq: "\"headers\":{..},\"query_params\":{..}"). The answer (rt_result) admits or refuses
 * c; no answer within III_AUTH_TIMEOUT_MS refuses it. */
static void auth_begin(struct conn *c, const struct buf *hq)
{
    struct func *f = func_find_c(NS_DEFAULT, AUTH->auth_fn);
    if (!f || !f->owner || !conn_open(f->owner)) {
        auth_refuse(c, "the auth function is not available");
        return;
    }
    char id[37];
    uuid_new(id);
    struct inv *v = inv_new(id, INV_AUTH);
    struct buf in = {0}, q = {0};
    if (!v) {
        conn_oom(c);
        return;
    }
    v->deadline = now_ms() + III_AUTH_TIMEOUT_MS; /* inv_timeouts gives up on it then */
    if (timed_add(v) < 0) {
        inv_free(v);
        conn_oom(c);
        return;
    }
    inv_link(v, c, f->owner);
    c->auth_wait = 1;
    buf_putc(&in, '{');
    buf_append(&in, buf_data(hq), buf_used(hq));
    buf_puts(&in, ",\"ip_address\":");
    json_put_cstr(&in, c->ip);
    buf_putc(&in, '}');
    json_put_cstr(&q, AUTH->auth_fn);
    if (buf_check(&in) | buf_check(&q)) auth_refuse(c, "out of memory");
    else
        rt_send_invoke(f->owner, v->id, (char *)buf_data(&q), buf_used(&q), buf_data(&in),
                       buf_used(&in), NULL, 0, "", 0, NULL, 0);
    buf_free(&in), buf_free(&q);
}

/* The auth function answered call v (d: its invocationresult): its result object is the
 * session; an error, an empty result or a wrong shape refuses the connection (AUTH_ERROR). */
static void auth_answer(struct inv *v, const struct jdoc *d, int res, int err)
{
    struct conn *c = v->caller;
    char why[200];
    if (!c || !c->auth_wait) return;
    if (!JABSENT(d, err)) {
        struct jdoc ed;
        struct jtok et[16];
        struct buf sc = {0};
        const char *m = "the auth function failed";
        size_t ml = strlen(m);
        if (json_sub(d, err, &ed, et, 16) == 0) jstr(&ed, json_get(&ed, 0, "message"), &sc, &m, &ml);
        snprintf(why, sizeof why, "%.*s", (int)ml, m);
        buf_free(&sc);
        auth_refuse(c, why);
        return;
    }
    if (JTYPE(d, res) != J_OBJECT || JLEN(d, res) <= 2) {
        auth_refuse(c, "the auth function returned no session");
        return;
    }
    struct session *s = sess_new((const char *)JRAW(d, res), JLEN(d, res), 0, why, sizeof why);
    if (!s) auth_refuse(c, why);
    else auth_admit(c, s);
}

/* ==== Worker protocol =======================================================================
 * One connection's life: workerregistered first; registration frames buffered until the
 * namespace is known (engine::workers::register or the grace period, §1.4), then applied in
 * arrival order; invokes and results routed at once; reattach retires a previous connection;
 * teardown (§7) runs exactly once, in the spec's order, whatever ended the connection.
 */
/* Queues the JSON text in b to c as one text frame (b is not consumed). */
static void worker_send(struct conn *c, const struct buf *b)
{
    conn_frame(c, WS_TEXT, buf_data(b), buf_used(b));
}

static void sup_refusal_set(uint32_t pid, const char *json);
static const char *sup_refusal_get(uint32_t pid);

/* Sends registrationrejected (§5.10) to c; name and fid are omitted when NULL, and so is
 * why (a "message" member this engine adds: unknown fields are ignored by SDKs). The
 * connection stays open: a rejection refuses one registration, never the worker. Each refusal
 * is logged at warn, rate-limited per connection (a client that reconnects and retries stays
 * visible without flooding the log). */
static void worker_rejected(struct conn *c, const char *code, const char *ns, const char *name,
                            const char *fid, size_t fidlen, const char *owner, const char *why)
{
    /* the members once: the frame is {"type":...,MEMBERS}, the kept refusal {MEMBERS,"at_ms"} */
    struct buf m = {0}, b = {0};
    buf_puts(&m, "\"code\":");
    json_put_cstr(&m, code);
    buf_puts(&m, ",\"namespace\":");
    json_put_cstr(&m, ns);
    if (name) buf_puts(&m, ",\"worker_name\":"), json_put_cstr(&m, name);
    if (fid) buf_puts(&m, ",\"function_id\":"), json_put_str(&m, fid, fidlen);
    buf_puts(&m, ",\"owner_worker_id\":");
    json_put_cstr(&m, owner);
    if (why) buf_puts(&m, ",\"message\":"), json_put_cstr(&m, why);
    int ok = !buf_check(&m);
    if (ok) {
        buf_puts(&b, "{\"type\":\"registrationrejected\",");
        buf_append(&b, buf_data(&m), buf_used(&m));
        buf_putc(&b, '}');
        ok = !buf_check(&b);
    }
    if (!ok) {
        conn_oom(c);
        goto log;
    }
    worker_send(c, &b);
    /* kept for engine::workers::info: the frame's members and when (the SDKs ignore the frame,
     * so this is where an operator sees why a worker has fewer functions than it should) */
    buf_reset(&b);
    buf_putc(&b, '{');
    buf_append(&b, buf_data(&m), buf_used(&m));
    buf_printf(&b, ",\"at_ms\":%lld}", (long long)wall_ms());
    char *j = buf_check(&b) ? NULL : xstrndup((char *)buf_data(&b), buf_used(&b));
    if (j) {
        xfree(c->refusal), c->refusal = j;
        if (c->has_pid) sup_refusal_set(c->pid, j);
    }
log:
    buf_free(&m), buf_free(&b);
    LOG_LIMITED(c, LOG_WARN,
                "worker %s (name %s, pid %lu): registration refused: %s in namespace '%s'%s%.*s%s%s%s%s",
                c->wid, c->name ? c->name : "-", c->has_pid ? (unsigned long)c->pid : 0UL, code, ns,
                fid ? ", function " : "", fid ? (int)(fidlen > 200 ? 200 : fidlen) : 0,
                fid ? fid : "", name ? ", name " : "", name ? name : "",
                owner && *owner ? ", held by worker " : "", owner && *owner ? owner : "");
    if (why) LOG_LIMITED(c, LOG_WARN, "worker %s: %s", c->wid, why);
}

/* Copies the raw bytes of token ti into a new string, NULL when absent/null (or OOM). */
static char *jraw_dup(const struct jdoc *d, int ti)
{
    return JABSENT(d, ti) ? NULL : xstrndup((const char *)JRAW(d, ti), JLEN(d, ti));
}

/* registerfunction (§2.1), already in the connection's namespace. */
static void reg_function(struct conn *c, const struct jdoc *d)
{
    size_t il;
    const char *id;
    struct buf sc = {0}, pre = {0};
    if (jstr(d, json_get(d, 0, "id"), &sc, &id, &il) < 0 || !il) goto done;
    /* §2.1 step 6: an HTTP-invoked function needs the http_functions module, which this engine
     * does not have: logged, no reply */
    if (!JABSENT(d, json_get(d, 0, "invocation"))) {
        LOG_LIMITED(c, LOG_ERROR,
            "worker %s: function %.*s is HTTP-invoked; this engine has no http_functions module",
            c->wid, (int)il, id);
        goto done;
    }
    const char *FNC = "FUNCTION_NAMESPACE_CONFLICT"; /* non-fatal for the SDKs (§5.10) */
    /* §2.1 step 1: a session may not register at all (dropped silently), or only under its
     * prefix: "x" becomes "<prefix>::x" (in pre, declared with sc: every goto done frees it) */
    const struct session *s = c->sess;
    if (s && !s->full && !s->fn_reg) {
        LOG_LIMITED(c, LOG_DEBUG, "worker %s: registerfunction dropped: not allowed by its session",
                    c->wid);
        goto done;
    }
    if (s && !s->full && JTYPE(&s->d, s->prefix) == J_STRING) {
        struct buf ps = {0};
        const char *pp;
        size_t pl;
        if (jstr(&s->d, s->prefix, &ps, &pp, &pl) == 0) buf_append(&pre, pp, pl);
        buf_puts(&pre, "::");
        buf_append(&pre, id, il);
        buf_free(&ps);
        if (buf_check(&pre)) goto done;
        id = (const char *)buf_data(&pre), il = buf_used(&pre);
    }
    /* ids are routing keys: no control characters (a NUL made "x\u0000" list as "x"), bounded */
    if (!id_ok(id, il)) {
        worker_rejected(c, FNC, c->ns, NULL, id, il, "",
                        "function ids are 1 to " III_STR(III_MAX_ID) " bytes with no control "
                        "characters");
        goto done;
    }
    /* §2.1 step 3: engine:: ids are reserved to the default namespace */
    if (il >= 8 && !memcmp(id, "engine::", 8) && strcmp(c->ns, NS_DEFAULT)) {
        worker_rejected(c, FNC, c->ns, NULL, id, il, "", NULL);
        goto done;
    }
    struct func *f = func_find(c->ns, strlen(c->ns), id, il);
    struct func *mine = f ? func_of(f, c) : NULL;
    if (mine) {
        f = mine; /* a re-register by one of its providers: an idempotent overwrite */
    } else if (f && f->owner && conn_live(f->owner) &&
               route_many(c->ns, strlen(c->ns), id, il)) {
        /* routing: providers: many: a further worker joins as a provider instead of being
         * refused (the default stays the reference's single owner) */
        if (c->n_funcs >= S.set.max_functions_per_connection || !(f = func_add_replica(f, c))) {
            worker_rejected(c, FNC, c->ns, NULL, id, il, "",
                            "this connection cannot add more functions");
            goto done;
        }
    } else if (f && f->owner != c) {
        if (!f->owner) {
            /* deliberate deviation (§11.24): builtins cannot be overwritten by a worker */
            worker_rejected(c, FNC, c->ns, NULL, id, il, "", NULL);
            goto done;
        }
        /* §2.1 step 4: a different live owner keeps the id; the newcomer is told who holds it */
        if (conn_live(f->owner)) {
            worker_rejected(c, FNC, c->ns, NULL, id, il, f->owner->wid, NULL);
            goto done;
        }
        func_remove(f); /* the owner is tearing down: a fast restart takes over */
        f = NULL;
    }
    if (!f && c->n_funcs >= S.set.max_functions_per_connection) {
        char why[160];
        snprintf(why, sizeof why, "this connection owns %zu functions (max_functions_per_connection)",
                 c->n_funcs);
        worker_rejected(c, FNC, c->ns, NULL, id, il, "", why);
        goto done;
    }
    if (!f && !(f = func_add(c, c->ns, strlen(c->ns), id, il))) {
        conn_oom(c);
        goto done;
    }
    /* a re-register by the owner is an idempotent overwrite (§2.1 step 4) */
    func_clear_meta(f);
    f->desc_raw = jraw_dup(d, json_get(d, 0, "description"));
    f->req_raw = jraw_dup(d, json_get(d, 0, "request_format"));
    f->resp_raw = jraw_dup(d, json_get(d, 0, "response_format"));
    int mt = json_get(d, 0, "metadata");
    f->meta_raw = jraw_dup(d, mt);
    if (JTYPE(d, mt) == J_OBJECT) {
        struct jdoc md = {0};
        /* metadata is small in practice; the cap bounds the work a hostile value can cause */
        md.max = 4096;
        if (json_parse(&md, JRAW(d, mt), JLEN(d, mt), 2, 0) == 0)
            f->internal = JTYPE(&md, json_get(&md, 0, "internal")) == J_TRUE;
        xfree(md.t);
    }
done:
    buf_free(&sc), buf_free(&pre);
}

/* Sends triggerregistrationresult with an error to c. */
static void trig_result_error(struct conn *c, const struct jdoc *d, int id, int type, int fid,
                              const char *errjson)
{
    struct buf b = {0};
    buf_puts(&b, "{\"type\":\"triggerregistrationresult\",\"id\":");
    JABSENT(d, id) ? buf_puts(&b, "null") : json_put_raw(&b, d, id);
    buf_puts(&b, ",\"trigger_type\":");
    JABSENT(d, type) ? buf_puts(&b, "null") : json_put_raw(&b, d, type);
    buf_puts(&b, ",\"function_id\":");
    JABSENT(d, fid) ? buf_puts(&b, "null") : json_put_raw(&b, d, fid);
    buf_puts(&b, ",\"error\":");
    buf_puts(&b, errjson);
    buf_putc(&b, '}');
    worker_send(c, &b);
    buf_free(&b);
}

/* Applies one registration frame of connection c (resolved namespace). */
static void reg_apply(struct conn *c, const struct jdoc *d)
{
    int ty = json_get(d, 0, "type");
    if (json_streq(d, ty, "registerfunction")) {
        reg_function(c, d);
    } else if (json_streq(d, ty, "unregisterfunction")) {
        /* §2.2: only the recorded owner may remove it; no reply either way */
        char *id = json_strdup(d, json_get(d, 0, "id"), NULL);
        struct func *f = id ? func_find_c(c->ns, id) : NULL;
        if (f && (f = func_of(f, c))) func_remove(f); /* c's own provider of it, if any */
        xfree(id);
    } else if (json_streq(d, ty, "registertriggertype")) {
        int nsi = json_get(d, 0, "namespace"), dsc = json_get(d, 0, "description");
        size_t il = 0, nl = 0;
        char *id = json_strdup(d, json_get(d, 0, "id"), &il);
        char *ns = JABSENT(d, nsi) ? xstrdup(c->ns) : json_strdup(d, nsi, &nl);
        if (ns && JABSENT(d, nsi)) nl = strlen(ns);
        if (!id || !ns || JTYPE(d, dsc) != J_STRING) {
            LOG_LIMITED(c, LOG_WARN,
                        "worker %s: json decode error: invalid registertriggertype dropped", c->wid);
        } else if (str_blank(ns, nl)) {
            LOG_LIMITED(c, LOG_ERROR,
                        "worker %s: registertriggertype %s: `namespace` is empty; nothing registered",
                        c->wid, id);
        } else if (!id_ok(id, il) || !id_ok(ns, nl)) {
            LOG_LIMITED(c, LOG_WARN,
                        "worker %s: registertriggertype refused: ids and namespaces are 1 to "
                        "%d bytes with no control characters",
                        c->wid, III_MAX_ID);
        } else if (c->sess && !c->sess->full && !c->sess->tt_reg) {
            /* §2.4: a session without allow_trigger_type_registration: dropped silently */
            LOG_LIMITED(c, LOG_DEBUG, "worker %s: registertriggertype %s dropped by its session",
                        c->wid, id);
        } else if (!strncmp(id, "engine::", 8)) {
            /* the engine's own trigger types (the discovery events) belong to it, like engine::
             * function ids (§2.1 step 3): a worker cannot take their bindings or delete them */
            LOG_LIMITED(c, LOG_WARN,
                        "worker %s: registertriggertype %s refused: engine:: trigger types belong "
                        "to the engine",
                        c->wid, id);
        } else {
            char *dr = jraw_dup(d, dsc),
                 *tr = jraw_dup(d, json_get(d, 0, "trigger_request_format"));
            char *cr = jraw_dup(d, json_get(d, 0, "call_request_format"));
            tt_register(c, ns, id, dr, tr, cr);
            xfree(dr), xfree(tr), xfree(cr);
        }
        xfree(id), xfree(ns);
    } else if (json_streq(d, ty, "registertrigger")) {
        /* §4.2: `namespace` is the target function's namespace (default when absent), and
         * trigger_namespace pins the provider's; a blank one is answered with INVALID_NAMESPACE */
        int id = json_get(d, 0, "id"), tt = json_get(d, 0, "trigger_type"),
            fid = json_get(d, 0, "function_id");
        int cfg = json_get(d, 0, "config"), mt = json_get(d, 0, "metadata");
        int nsi = json_get(d, 0, "namespace"), tns = json_get(d, 0, "trigger_namespace");
        if (JTYPE(d, id) != J_STRING || JTYPE(d, tt) != J_STRING || JTYPE(d, fid) != J_STRING ||
            cfg < 0 || (!JABSENT(d, nsi) && JTYPE(d, nsi) != J_STRING) ||
            (!JABSENT(d, tns) && JTYPE(d, tns) != J_STRING)) {
            LOG_LIMITED(c, LOG_WARN, "worker %s: json decode error: invalid registertrigger dropped",
                        c->wid);
            return;
        }
        size_t l1 = 0, l2 = 0, l3 = 0, l4 = 3, l5 = 0;
        char *ids = json_strdup(d, id, &l1), *tts = json_strdup(d, tt, &l2),
             *fids = json_strdup(d, fid, &l3);
        char *ns = JABSENT(d, nsi) ? xstrdup(NS_DEFAULT) : json_strdup(d, nsi, &l4);
        char *tn = JABSENT(d, tns) ? NULL : json_strdup(d, tns, &l5);
        char *cr = jraw_dup(d, cfg), *mr = jraw_dup(d, mt);
        if (!cr) cr = xstrdup("null");
        if (ids && tts && fids && ns && cr) {
            const char *blank = str_blank(ns, l4)         ? "namespace"
                                : tn && str_blank(tn, l5) ? "trigger_namespace"
                                                          : NULL;
            char why[200];
            struct buf e = {0};
            if (blank) {
                rt_err(&e, "INVALID_NAMESPACE",
                       "`%s` is empty: it was named and left blank. Give it a name, "
                       "or omit it to use `default`.",
                       blank);
            } else if (!id_ok(ids, l1) || !id_ok(tts, l2) || !id_ok(fids, l3) || !id_ok(ns, l4) ||
                       (tn && !id_ok(tn, l5))) {
                rt_err(&e, "trigger_registration_failed",
                       "ids and namespaces are 1 to %d bytes with no control characters",
                       III_MAX_ID);
            } else if (!trig_register(c, c, ids, tts, fids, cr, mr, ns, tn, c->ns, why,
                                      sizeof why)) {
                rt_err(&e, "trigger_registration_failed", "%s", why);
            }
            if (buf_used(&e)) {
                LOG_LIMITED(c, LOG_WARN, "worker %s: registertrigger %s refused: %.*s", c->wid,
                            ids, (int)buf_used(&e), (char *)buf_data(&e));
                if (buf_check(&e)) conn_oom(c);
                else trig_result_error(c, d, id, tt, fid, buf_cstr(&e));
            }
            buf_free(&e);
        }
        xfree(ids), xfree(tts), xfree(fids), xfree(ns), xfree(tn), xfree(cr), xfree(mr);
    } else if (json_streq(d, ty, "unregistertrigger")) {
        size_t n;
        /* §2.5: by id only, with no ownership check: any connection may remove any binding */
        char *id = json_strdup(d, json_get(d, 0, "id"), &n);
        struct trig *t = id ? trig_find(id, n) : NULL;
        /* a session that is not full access removes only its own bindings */
        if (t && c->sess && !c->sess->full && t->owner != c && t->acct != c) t = NULL;
        if (t) trig_remove(t);
        xfree(id);
    }
    /* registerservice: internal bookkeeping only in the reference; accepted and ignored */
}

static void rt_invoke(struct conn *c, const struct jdoc *d);

/* Buffers frame p[0..n) at the tail of c's queue (§1.4 and docs/§10 item 10): registration
 * frames while the namespace is pending, and, while anything is queued, later registrations
 * and calls too, so they keep their arrival order. The queue is bounded in bytes (its buffer's
 * cap, max_pending_registration_bytes) and frames (max_pending_registration_frames): a client
 * that goes past either is closed with 1008, never allowed to grow the engine's memory. */
static void worker_queue(struct conn *c, const unsigned char *p, size_t n)
{
    /* record = [host-order u32 length][frame bytes]; host order is fine, as only worker_drain
     * in this process reads it back. Frames over 4 GiB never get here (frame limits). */
    uint32_t len = (uint32_t)n;
    if (c->pend_frames >= S.set.max_pending_frames) {
        LOG(LOG_WARN, "worker %s: over %zu buffered frames before its announce; closing",
            c->wid, S.set.max_pending_frames);
        conn_close(c, 1008, "registration buffer full");
        return;
    }
    buf_append(&c->pendq, &len, 4);
    buf_append(&c->pendq, p, n);
    int e = buf_check(&c->pendq);
    if (e == BUF_ELIMIT) {
        LOG(LOG_WARN, "worker %s: over %zu buffered bytes before its announce; closing", c->wid,
            c->pendq.lim);
        conn_close(c, 1008, "registration buffer full");
    } else if (e) {
        conn_oom(c);
    } else {
        c->pend_frames++;
    }
    /* a failed record may have left its length behind: the queue is dropped with c anyway */
}

/* Takes c off the list of connections with a queue left to drain. */
static void drain_unlink(struct conn *c)
{
    if (!c->draining) return;
    for (struct conn **pp = &S.drain; *pp; pp = &(*pp)->drnext)
        if (*pp == c) {
            *pp = c->drnext;
            break;
        }
    c->draining = 0, c->drnext = NULL;
}

/* Applies c's queued frames in arrival order (§1.4): registrations, and the calls that waited
 * behind them (docs/§10 item 10). At most III_DRAIN_FRAMES frames or III_DRAIN_BYTES bytes
 * per call, so no turn of the loop does unbounded work: a connection with more left stays on
 * S.drain and the loop comes back to it next turn. Stops if c goes away. */
static void worker_drain(struct conn *c)
{
    struct jdoc d = {0};
    d.max = 4096;
    size_t frames = 0, bytes = 0;
    while (buf_used(&c->pendq) >= 4 && c->ns_state == NS_RESOLVED && conn_open(c) &&
           frames < III_DRAIN_FRAMES && bytes < III_DRAIN_BYTES) {
        uint32_t n;
        memcpy(&n, buf_data(&c->pendq), 4);
        const unsigned char *p = buf_data(&c->pendq) + 4;
        /* the frame was validated when it arrived (UTF-8 and shape): parse, then dispatch */
        if (json_parse(&d, p, n, 2, 0) == 0 && d.t[0].type == J_OBJECT) {
            if (json_streq(&d, json_get(&d, 0, "type"), "invokefunction")) rt_invoke(c, &d);
            else reg_apply(c, &d);
        }
        /* consumed only now: nothing above appends to or frees c->pendq (a teardown would,
         * but none runs inline for c itself) */
        buf_consume(&c->pendq, 4 + (size_t)n);
        c->pend_frames--;
        frames++, bytes += n;
    }
    xfree(d.t);
    /* an empty queue gives its block back (its cap, pendq.lim, stays): nearly every worker
     * queues a few frames before its announce and none after, so an idle worker keeps none */
    if (!buf_used(&c->pendq)) buf_free(&c->pendq);
    int more = buf_used(&c->pendq) && c->ns_state == NS_RESOLVED && conn_open(c);
    if (more && !c->draining) c->draining = 1, c->drnext = S.drain, S.drain = c;
    else if (!more) drain_unlink(c);
}

/* One slice of every unfinished drain (called once per loop turn). */
static void drain_tick(void)
{
    for (struct conn *c = S.drain, *nx; c; c = nx) {
        nx = c->drnext;
        worker_drain(c);
    }
}

/* Pins c to namespace ns and drains its buffer. */
static void worker_resolve(struct conn *c, const char *ns)
{
    if (c->ns_state != NS_PENDING) return;
    char *n = xstrdup(ns);
    if (!n) {
        conn_oom(c);
        return;
    }
    xfree(c->ns);
    c->ns = n;
    c->ns_state = NS_RESOLVED;
    worker_drain(c); /* the first slice now; drain_tick does the rest, a slice per turn */
}

/* The upgrade to "/" completed (§1.2): mint worker_id and reattach_token, arm the namespace
 * grace timer, map the connection, send workerregistered first, then announce
 * worker_connected. OOM drops the connection. */
static void worker_on_open(struct conn *c)
{
    uuid_new(c->wid);
    uuid_new(c->token);
    c->connected_wall = wall_ms();
    c->ns_state = NS_PENDING;
    c->pendq.lim = S.set.max_pending_bytes;
    c->grace_at = now_ms() + S.grace_ms;
    timer_touch(c->grace_at);
    /* §1.2 step 3: discoverable from now on (engine::workers::list shows it once it has a pid) */
    if (hm_put(&S.workers, &c->h, c->wid, 36) < 0) {
        conn_oom(c);
        return;
    }
    char m[160];
    int n =
        snprintf(m, sizeof m,
                 "{\"type\":\"workerregistered\",\"worker_id\":\"%s\",\"reattach_token\":\"%s\"}",
                 c->wid, c->token);
    conn_frame(c, WS_TEXT, m, (size_t)n);
    LOG(LOG_INFO, "worker %s connected from %s", c->wid, c->ip);
    ev_worker("worker_connected", c);
}

/* reattach (§1.7): with the right token the previous connection is retired now, inline, so
 * that everything after it on this socket sees a clean slate. No reply. */
static void worker_reattach(struct conn *c, const struct jdoc *d)
{
    int pw = json_get(d, 0, "previous_worker_id"), tk = json_get(d, 0, "reattach_token");
    if (JTYPE(d, pw) != J_STRING || !uuid_valid((const char *)JRAW(d, pw) + 1, JLEN(d, pw) - 2))
        return;
    const char *prev = (const char *)JRAW(d, pw) + 1;
    /* §1.7 step 1: ignored when it names ourselves or no live connection */
    if (!memcmp(prev, c->wid, 36)) return;
    struct conn *old = (struct conn *)hm_get(&S.workers, prev, 36);
    /* §1.7 step 2: worker ids are public, so the token is the proof of identity */
    if (!old || old->torn) return;
    if (JTYPE(d, tk) != J_STRING || JLEN(d, tk) != 38 || memcmp(JRAW(d, tk) + 1, old->token, 36)) {
        LOG_LIMITED(c, LOG_WARN, "worker %s: reattach to %s refused: missing or wrong reattach_token", c->wid,
            old->wid);
        return;
    }
    LOG(LOG_INFO, "worker %s: reattached, retiring previous connection %s", c->wid, old->wid);
    /* §1.7 step 3: the old connection's cleanup runs now, inline, so a register that follows on
     * this socket finds its name lease and functions free */
    worker_teardown(old);
    conn_abort(old, "retired by reattach");
}

/* Field shapes of the inbound messages (§2): a frame whose field has the wrong type, or that
 * lacks a required one, does not decode and is dropped (the reference engine's serde rules). */
/* F_* (low 4 bits) is the shape; F_REQ marks a required field. null counts as absent except
 * for F_ANY, where it is a value (`"config": null` is a config). */
enum { F_STR = 1, F_UUID, F_ANY, F_OBJ, F_ERR, F_REQ = 16 };
#define MF(t, f, k)                                                                                \
    {                                                                                              \
        t, f, k, sizeof(t) - 1, sizeof(f) - 1                                                      \
    }
static const struct msg_field {
    const char *type, *field; /* message type and member name */
    int kind;                 /* F_* shape, | F_REQ when required */
    unsigned char tl, fl;     /* their lengths (MF computes them at compile time) */
} MSG_FIELDS[] = { /* the rows of one type are adjacent: msg_valid stops after its last */
    MF("registerfunction", "id", F_STR | F_REQ),
    MF("registerfunction", "description", F_STR),
    MF("registerfunction", "invocation", F_OBJ),
    MF("unregisterfunction", "id", F_STR | F_REQ),
    MF("invocationresult", "invocation_id", F_UUID | F_REQ),
    MF("invocationresult", "function_id", F_STR | F_REQ),
    MF("invocationresult", "error", F_ERR),
    MF("invocationresult", "traceparent", F_STR),
    MF("invocationresult", "baggage", F_STR),
    MF("registertriggertype", "id", F_STR | F_REQ),
    MF("registertriggertype", "description", F_STR | F_REQ),
    MF("registertriggertype", "namespace", F_STR),
    MF("registertrigger", "id", F_STR | F_REQ),
    MF("registertrigger", "trigger_type", F_STR | F_REQ),
    MF("registertrigger", "function_id", F_STR | F_REQ),
    MF("registertrigger", "config", F_ANY | F_REQ),
    MF("registertrigger", "namespace", F_STR),
    MF("registertrigger", "trigger_namespace", F_STR),
    MF("unregistertrigger", "id", F_STR | F_REQ),
    MF("unregistertrigger", "trigger_type", F_STR),
    MF("triggerregistrationresult", "id", F_STR | F_REQ),
    MF("triggerregistrationresult", "trigger_type", F_STR | F_REQ),
    MF("triggerregistrationresult", "function_id", F_STR | F_REQ),
    MF("triggerregistrationresult", "error", F_ERR),
    MF("registerservice", "id", F_STR | F_REQ),
    MF("registerservice", "name", F_STR),
    MF("registerservice", "description", F_STR),
    MF("registerservice", "parent_service_id", F_STR),
    MF("reattach", "previous_worker_id", F_UUID | F_REQ),
    MF("reattach", "reattach_token", F_STR),
};

/* 1 if value ti is an ErrorBody {code: string, message: string, stacktrace?: string}. */
static int msg_errbody(const struct jdoc *d, int ti)
{
    struct jdoc e;
    struct jtok t[32];
    if (JTYPE(d, ti) != J_OBJECT || json_sub(d, ti, &e, t, 32) < 0) return 0;
    int st = json_get(&e, 0, "stacktrace");
    return JTYPE(&e, json_get(&e, 0, "code")) == J_STRING &&
           JTYPE(&e, json_get(&e, 0, "message")) == J_STRING &&
           (JABSENT(&e, st) || JTYPE(&e, st) == J_STRING);
}

/* 1 if frame d of message type t[0..tl) has every field in the right shape. */
static int msg_valid(const struct jdoc *d, const char *t, size_t tl)
{
    /* bit min(n, 31): some row's type is n bytes long; a type of a length no row has (every
     * invokefunction) is valid without walking the table. Made on the first call. */
    static uint32_t lens;
    if (!lens)
        for (size_t i = 0; i < sizeof MSG_FIELDS / sizeof MSG_FIELDS[0]; i++)
            lens |= 1u << (MSG_FIELDS[i].tl < 31 ? MSG_FIELDS[i].tl : 31);
    if (!(lens >> (tl < 31 ? tl : 31) & 1)) return 1;
    int seen = 0; /* a row of this type was reached: the next other type ends the rows */
    for (size_t i = 0; i < sizeof MSG_FIELDS / sizeof MSG_FIELDS[0]; i++) {
        const struct msg_field *f = &MSG_FIELDS[i];
        if (f->tl != tl || f->type[0] != t[0] || memcmp(f->type, t, tl)) {
            if (seen) break;
            continue;
        }
        seen = 1;
        int v = json_get_n(d, 0, f->field, f->fl);
        if (v < 0 || (d->t[v].type == J_NULL && (f->kind & 15) != F_ANY)) {
            if (f->kind & F_REQ) return 0;
            continue;
        }
        switch (f->kind & 15) {
        case F_STR:
            if (d->t[v].type != J_STRING) return 0;
            break;
        case F_UUID:
            if (d->t[v].type != J_STRING ||
                !uuid_valid((const char *)JRAW(d, v) + 1, JLEN(d, v) - 2))
                return 0;
            break;
        case F_OBJ:
            if (d->t[v].type != J_OBJECT) return 0;
            break;
        case F_ERR:
            if (!msg_errbody(d, v)) return 0;
            break;
        default:
            break;
        }
    }
    return 1;
}

/* A frame nested deeper than III_JSON_MAX_DEPTH is not parsed, but a call in it is still
 * answered rather than left to hang: the top-level members are found by skipping values (a
 * bracket counter, no stack, bounded by n), and an invokefunction with a well-formed
 * invocation_id and function_id gets deserialization_error. Anything else is logged. */
static void worker_too_deep(struct conn *c, const unsigned char *p, size_t n)
{
    size_t i = 0, ids = 0, fs = 0, fl = 0;
    int esc, invoke = 0, idok = 0;
    while (i < n && JSON_WS(p[i])) i++;
    if (i < n && p[i] == '{') i++;
    else i = n;
    while (i < n) {
        while (i < n && (JSON_WS(p[i]) || p[i] == ',')) i++;
        size_t ks = i, ke = i, vs;
        if (i >= n || p[i] != '"' || json_scan_str(p, n, &ke, 1, &esc) < 0) break;
        for (i = ke; i < n && JSON_WS(p[i]); i++) continue;
        if (i >= n || p[i] != ':') break;
        for (i++; i < n && JSON_WS(p[i]); i++) continue;
        if (i >= n) break;
        vs = i;
        int str = p[i] == '"', vesc = 0;
        if (str && json_scan_str(p, n, &i, 1, &vesc) < 0) break;
        if (!str) i = json_skip(p, n, i);
#define KEY_IS(k) (!esc && ke - ks == sizeof(k) + 1 && !memcmp(p + ks + 1, k, sizeof(k) - 1))
        if (KEY_IS("type") && str && i - vs == 16 && !memcmp(p + vs, "\"invokefunction\"", 16))
            invoke = 1;
        else if (KEY_IS("invocation_id") && str && !vesc && i - vs == 38)
            ids = vs + 1, idok = uuid_valid((const char *)p + ids, 36);
        else if (KEY_IS("function_id") && str)
            fs = vs, fl = i - vs;
#undef KEY_IS
    }
    LOG_LIMITED(c, LOG_WARN, "worker %s: frame nested deeper than %d levels dropped%s", c->wid,
                III_JSON_MAX_DEPTH, invoke && idok && fl ? " (the call is answered with an error)" : "");
    if (!invoke || !idok || !fl) return;
    static const char e[] = "{\"code\":\"deserialization_error\",\"message\":\"Failed to "
                            "deserialize invokefunction: nested deeper than " III_STR(
                                III_JSON_MAX_DEPTH) " levels\"}";
    rt_send_result(c, (const char *)p + ids, 36, (const char *)p + fs, fl, NULL, 0,
                   (const unsigned char *)e, sizeof e - 1, "", 0);
}

/* Every frame from a worker connection. Malformed or unknown frames are dropped without a
 * reply and without closing (§1.5). Text frames arrive UTF-8-validated; binary ones are
 * checked by the parser (check_utf8). */
static void worker_on_message(struct conn *c, const unsigned char *p, size_t n, int check_utf8)
{
    /* §1.5: empty or whitespace-only frames are ignored */
    if (str_blank((const char *)p, n)) return;
    struct jdoc *d = &S.jd;
    /* an envelope has a handful of members; 4096 tokens bounds the work per frame (payloads are
     * not tokenized: tokdepth 2 keeps `data` one opaque token) */
    d->max = 4096;
    int rc = json_parse(d, p, n, 2, check_utf8);
    if (rc == -2) {
        worker_too_deep(c, p, n);
        return;
    }
    if (rc < 0 || d->t[0].type != J_OBJECT) {
        LOG_LIMITED(c, LOG_WARN, "worker %s: json decode error: frame dropped", c->wid);
        return;
    }
    int ty = json_get(d, 0, "type");
    if (JTYPE(d, ty) != J_STRING) {
        LOG_LIMITED(c, LOG_WARN, "worker %s: json decode error: frame without type dropped", c->wid);
        return;
    }
    const char *t = (const char *)JRAW(d, ty) + 1;
    size_t tl = JLEN(d, ty) - 2;
/* `type` matching is exact and case-sensitive (§1.5) */
#define TYPE_IS(x) (tl == sizeof(x) - 1 && !memcmp(t, x, tl))
    /* the reference engine's serde rules: a wrong field type drops the frame (§1.5) */
    if (!msg_valid(d, t, tl)) {
        LOG_LIMITED(c, LOG_WARN, "worker %s: json decode error: invalid %.*s frame dropped", c->wid, (int)tl,
            t);
        return;
    }
    if (TYPE_IS("invokefunction")) {
        /* docs/§10 item 10: a call behind this connection's own queued registrations waits
         * in that queue (read-your-own-writes); the announce itself never waits, as it is what
         * settles the namespace and drains the queue */
        if (buf_used(&c->pendq) && c->ns_state != NS_ABORTED &&
            !json_streq(d, json_get(d, 0, "function_id"), "engine::workers::register"))
            worker_queue(c, p, n);
        else rt_invoke(c, d);
    } else if (TYPE_IS("invocationresult")) {
        rt_result(c, d);
        /* §1.6: a JSON ping gets a JSON pong; the engine never sends JSON pings itself */
    } else if (TYPE_IS("ping")) {
        conn_frame(c, WS_TEXT, "{\"type\":\"pong\"}", 15);
    } else if (TYPE_IS("registerfunction") || TYPE_IS("unregisterfunction") ||
               TYPE_IS("registertriggertype") || TYPE_IS("registertrigger") ||
               TYPE_IS("unregistertrigger") || TYPE_IS("registerservice")) {
        /* §1.4: buffered while the namespace is pending (or behind frames still queued),
         * applied once resolved, swallowed once the connection is aborted */
        if (c->ns_state == NS_PENDING || buf_used(&c->pendq)) worker_queue(c, p, n);
        else if (c->ns_state == NS_RESOLVED) reg_apply(c, d);
    } else if (TYPE_IS("triggerregistrationresult")) {
        int id = json_get(d, 0, "id"), err = json_get(d, 0, "error");
        struct buf sc = {0};
        const char *ids;
        size_t il;
        struct inv *ack = NULL;
        /* an engine::register_trigger waiting on this provider is matched by binding id (receipt)
         */
        if (jstr(d, id, &sc, &ids, &il) == 0 && il == 36)
            for (struct inv *x = c->calls_in; x && !ack; x = x->tnext)
                if (x->kind == INV_ACK && !memcmp(x->receipt, ids, 36)) ack = x;
        if (ack) {
            ack_settle(ack, d,
                       err); /* §4.3 step 1: a waiting engine::register_trigger stops here */
        } else if (jstr(d, id, &sc, &ids, &il) == 0) {
            struct trig *tr = trig_find(ids, il);
            struct ttype *pt = tr ? trig_provider(tr) : NULL;
            if (tr && pt && pt->provider == c && !JABSENT(d, err)) {
                /* §4.3: a provider's error parks the binding and is forwarded to its owner */
                tr->live = 0;
                LOG_LIMITED(c, LOG_WARN, "trigger %s: provider refused it; parked", tr->id);
                if (tr->owner && conn_open(tr->owner)) {
                    struct buf b = {0};
                    buf_puts(&b, "{\"type\":\"triggerregistrationresult\",\"id\":");
                    json_put_cstr(&b, tr->id);
                    buf_puts(&b, ",\"trigger_type\":");
                    json_put_cstr(&b, tr->type);
                    buf_puts(&b, ",\"function_id\":");
                    json_put_cstr(&b, tr->fid);
                    buf_puts(&b, ",\"error\":");
                    json_put_raw(&b, d, err);
                    buf_putc(&b, '}');
                    worker_send(tr->owner, &b);
                    buf_free(&b);
                }
            } else if (tr && pt && pt->provider != c) {
                LOG_LIMITED(c, LOG_WARN,
                    "worker %s: triggerregistrationresult for %s from a non-provider ignored",
                    c->wid, tr->id);
            }
        }
        buf_free(&sc);
    } else if (TYPE_IS("reattach")) {
        worker_reattach(c, d);
        /* §1.5: engine-to-worker types arriving from a worker are ignored */
    } else if (TYPE_IS("pong") || TYPE_IS("workerregistered") || TYPE_IS("registrationrejected")) {
        /* no-ops */
    } else {
        LOG(LOG_DEBUG, "worker %s: unknown message type %.*s dropped", c->wid, (int)tl, t);
    }
#undef TYPE_IS
}

/* Settles an engine::register_trigger waiting for its provider: errbody NULL = accepted. */
static void ack_settle(struct inv *v, const struct jdoc *d, int errbody)
{
    struct buf out = {0};
    if (v->caller) {
        if (d && !JABSENT(d, errbody)) {
            struct jdoc ed;
            struct jtok et[32];
            struct buf s1 = {0}, s2 = {0};
            const char *code = "error", *msg = "";
            size_t cl = 5, ml = 0;
            if (json_sub(d, errbody, &ed, et, 32) == 0) {
                jstr(&ed, json_get(&ed, 0, "code"), &s1, &code, &cl);
                jstr(&ed, json_get(&ed, 0, "message"), &s2, &msg, &ml);
            }
            rt_err(&out, "trigger_registration_failed", "%.*s: %.*s", (int)cl, code, (int)ml, msg);
            buf_free(&s1), buf_free(&s2);
            rt_send_result(v->caller, v->id, 36, v->fid, v->fid_len, NULL, 0, buf_data(&out),
                           buf_used(&out), v->ctx, v->ctx_len);
            struct trig *t = trig_find(v->receipt, 36);
            if (t) trig_free(t); /* the provider refused it: the durable binding is not kept */
        } else {
            buf_printf(&out, "{\"id\":\"%s\"}", v->receipt);
            rt_send_result(v->caller, v->id, 36, v->fid, v->fid_len, buf_data(&out), buf_used(&out),
                           NULL, 0, v->ctx, v->ctx_len);
        }
    }
    buf_free(&out);
    inv_free(v);
}

/* retry_on_disconnect: call v lost its provider; if its function still has one, the call goes
 * back to the front of the function's queue (route_tick sends it again, under the same id) and
 * v is freed: 1. 0 when there is nowhere to send it (the caller gets invocation_stopped). */
static int rt_retry(struct inv *v)
{
    struct qcall *q = v->retry;
    struct jdoc d = {0};
    struct func *f = NULL;
    d.max = 64;
    if (v->kind == INV_CALL && v->caller && conn_open(v->caller) &&
        json_parse(&d, q->frame, q->n, 2, 0) == 0) {
        int fidt = json_get(&d, 0, "function_id"), nsi = json_get(&d, 0, "namespace");
        struct buf s1 = {0}, s2 = {0};
        const char *fid, *ns = NS_DEFAULT;
        size_t fl, nl = 7;
        if (jstr(&d, fidt, &s1, &fid, &fl) == 0 && (JABSENT(&d, nsi) || jstr(&d, nsi, &s2, &ns, &nl) == 0))
            f = func_find(ns, nl, fid, fl);
        buf_free(&s1), buf_free(&s2);
    }
    xfree(d.t);
    if (!f || !f->owner) return 0;
    v->retry = NULL;
    qcall_own(q);
    rt_enqueue_q(f, q, 1);
    inv_free(v);
    return 1;
}

/* Tells the target of call v that it ended without the target's answer (the frame this engine
 * adds: {"type":"invocationcancelled","invocation_id":..,"reason":..}; SDKs ignore unknown
 * frame types, and it is only sent for calls with a deadline or a routing rule). */
static void rt_cancel_notify(struct inv *v, const char *reason)
{
    if (!v->notify || !v->target || !conn_open(v->target)) return;
    char m[160];
    int n = snprintf(m, sizeof m,
                     "{\"type\":\"invocationcancelled\",\"invocation_id\":\"%s\",\"reason\":\"%s\"}",
                     v->id, reason);
    conn_frame(v->target, WS_TEXT, m, (size_t)n);
}

/* Everything whose deadline has passed, earliest first (the heap's top): an ack wait is
 * accepted (§5.11), an auth call refuses its connection, a call gets invocation_timeout and its
 * target invocationcancelled. Lowers *next to the next deadline. */
static void inv_timeouts(int64_t now, int64_t *next)
{
    while (S.ntimed && S.timed[0]->deadline <= now) {
        struct inv *x = S.timed[0];
        timed_del(x);
        if (x->kind == INV_AUTH) {
            if (x->caller) auth_refuse(x->caller, "the auth function did not answer in time");
            inv_free(x);
        } else if (x->kind == INV_ACK) {
            ack_settle(x, NULL, -1);
        } else {
            char e[160];
            int n = snprintf(e, sizeof e, "{\"code\":\"invocation_timeout\",\"message\":\""
                                          "Invocation timed out after %lld ms\"}",
                             (long long)x->timeout_ms);
            S.n_inv_errors++;
            if (x->caller && x->kind == INV_CALL)
                rt_send_result(x->caller, x->id, 36, x->fid, x->fid_len, NULL, 0,
                               (const unsigned char *)e, (size_t)n, x->ctx, x->ctx_len);
            rt_cancel_notify(x, "timeout");
            inv_free(x);
        }
    }
    if (S.ntimed && S.timed[0]->deadline < *next) *next = S.timed[0]->deadline;
}

/* Disconnect cleanup (§7), exactly once per connection, in the spec's order. */
static void worker_teardown(struct conn *c)
{
    if (c->torn || c->kind != CK_WORKER) return;
    c->torn = 1;
    if (!c->wid[0]) { /* refused or gone while the auth function decided: never a worker */
        for (struct inv *v = c->calls_out, *nx; v; v = nx) nx = v->cnext, inv_free(v);
        if (c->rcalls) cl_caller_gone(c);
        return;
    }
    c->ns_state = NS_ABORTED;
    size_t nf = c->n_funcs;
    /* 2-3: release the functions it still owns (every walk below saves its next link first:
     * each step frees the element it is on, and only that one) */
    for (struct func *f = c->funcs, *nx; f; f = nx) nx = f->cnext, func_remove(f);
    /* 5: halt every call it was party to */
    for (struct inv *v = c->calls_in, *nx; v; v = nx) {
        nx = v->tnext;
        if (v->kind == INV_ACK) {
            ack_settle(v, NULL, -1); /* a closed provider channel is accepted (§5.11) */
            continue;
        }
        if (v->kind == INV_AUTH && v->caller) auth_refuse(v->caller, "the auth function went away");
        if (v->retry && rt_retry(v)) continue; /* routed again to another provider */
        if (v->caller && (v->kind == INV_CALL || v->kind == INV_ENQUEUE)) {
            if (v->kind == INV_CALL)
                rt_send_result(v->caller, v->id, 36, v->fid, v->fid_len, NULL, 0,
                               (const unsigned char *)ERR_STOPPED, sizeof ERR_STOPPED - 1, v->ctx,
                               v->ctx_len);
            else
                rt_send_result(v->caller, v->ctx, 36, v->fid, v->fid_len, NULL, 0,
                               (const unsigned char *)ERR_STOPPED, sizeof ERR_STOPPED - 1, "", 0);
        }
        inv_free(v);
    }
    /* calls it made: the targets may still answer; those results find no record and are ignored */
    for (struct inv *v = c->calls_out, *nx; v; v = nx)
        nx = v->cnext, rt_cancel_notify(v, "caller_disconnected"), inv_free(v);
    if (c->rcalls) cl_caller_gone(c); /* ... and so are its calls on other nodes */
    /* its calls still waiting in routing queues are dropped when they are reached */
    for (struct qcall *q = c->queued; q; q = q->cnext) q->caller = NULL;
    c->queued = NULL;
    /* 6: its bindings and parked intents; durable bindings it created stay, no longer counted
     * against it; then the trigger types it provides (lists: nothing is allocated here) */
    for (struct trig *t = c->trigs, *nx; t; t = nx) {
        nx = t->acct_next;
        if (t->owner == c) trig_remove(t);
        else trig_unacct(t);
    }
    for (struct ttype *tt = c->ttypes, *nx; tt; tt = nx) nx = tt->pnext, tt_remove(tt);
    /* 8: the name lease */
    lease_drop(c);
    /* 9-10: out of the registry; never-applied registrations (and calls queued behind them)
     * are discarded */
    hm_del(&S.workers, &c->h);
    buf_free(&c->pendq);
    c->pend_frames = 0;
    drain_unlink(c);
    LOG(LOG_INFO, "worker %s disconnected (name %s, runtime %s, namespace %s, %zu functions): %s",
        c->wid, c->name ? c->name : "-", c->runtime ? c->runtime : "-", c->ns ? c->ns : "-", nf,
        c->why ? c->why : "engine shutting down");
    /* 11 */
    ev_worker("worker_disconnected", c);
}

/* ==== Engine functions ======================================================================
 * The in-process engine::* functions of §5, registered in `default` with no owner. Each reads
 * its input object (d, token 0), writes a result into res or an error body into err. Lists are
 * collected into arrays and sorted with qsort; nothing here is on the routing hot path.
 */
/* Every builtin gets: caller (NULL for engine-internal calls), the parsed input d with `in`
 * the token of the input object, and two empty buffers it borrows: res for a raw JSON result
 * (left empty = no result, omitted on the wire) and err for an ErrorBody. Builtins never keep
 * pointers into d: it is freed when they return. */
#define BI_ARGS struct conn *caller, const struct jdoc *d, int in, struct buf *res, struct buf *err

/* Optional string input: 0 absent, 1 present (decoded copy in *out, caller frees), -1 wrong type.
 */
static int bi_str(const struct jdoc *d, int in, const char *key, char **out)
{
    int t = json_get(d, in, key);
    size_t n = 0;
    *out = NULL;
    if (JABSENT(d, t)) return 0;
    if (JTYPE(d, t) != J_STRING || !(*out = json_strdup(d, t, &n))) return -1;
    /* a \u0000 inside would make the C string say less than the JSON did: refused */
    if (strlen(*out) != n) {
        xfree(*out);
        *out = NULL;
        return -1;
    }
    return 1;
}

/* 1 only for a literal true: absent, null or any other type reads as false. */
static int bi_bool(const struct jdoc *d, int in, const char *key)
{
    return JTYPE(d, json_get(d, in, key)) == J_TRUE;
}

/* A case-insensitive (ASCII) substring search, prepared once per listing: Knuth-Morris-Pratt,
 * so each haystack costs its own length whatever the needle (a naive scan let one 600 KB
 * search freeze the loop for 23 s). Needles are at most III_MAX_SEARCH bytes (bi_search). */
#define ASCII_LOWER(c) ((unsigned char)((c) >= 'A' && (c) <= 'Z' ? (c) | 0x20 : (c)))
struct isearch {
    const char *nd;                      /* the needle (borrowed) */
    size_t nl;                           /* its length */
    uint16_t fail[III_MAX_SEARCH + 1];   /* KMP failure function over the folded needle */
};

static void isearch_init(struct isearch *s, const char *nd)
{
    s->nd = nd, s->nl = strlen(nd);
    s->fail[0] = 0;
    for (size_t i = 1, k = 0; i < s->nl; i++) {
        while (k && ASCII_LOWER(nd[i]) != ASCII_LOWER(nd[k])) k = s->fail[k - 1];
        if (ASCII_LOWER(nd[i]) == ASCII_LOWER(nd[k])) k++;
        s->fail[i] = (uint16_t)k;
    }
}

/* 1 if the needle occurs in h[0..hl), ignoring ASCII case. An empty needle is everywhere. */
static int isearch_in(const struct isearch *s, const char *h, size_t hl)
{
    size_t k = 0;
    if (!s->nl) return 1;
    for (size_t i = 0; i < hl; i++) {
        while (k && ASCII_LOWER(h[i]) != ASCII_LOWER(s->nd[k])) k = s->fail[k - 1];
        if (ASCII_LOWER(h[i]) == ASCII_LOWER(s->nd[k]) && ++k == s->nl) return 1;
    }
    return 0;
}

/* A listing's `search` input: 0 absent (*out NULL), 1 present and prepared, -1 wrong type or
 * longer than III_MAX_SEARCH (with an INVALID_ARGUMENTS error in err). *out is freed by the
 * caller (xfree). */
static int bi_search(const struct jdoc *d, int in, struct isearch **out, struct buf *err)
{
    char *s = NULL;
    *out = NULL;
    int r = bi_str(d, in, "search", &s);
    if (r <= 0) {
        if (r < 0) rt_err(err, "INVALID_ARGUMENTS", "`search` must be a string");
        return r;
    }
    if (strlen(s) > III_MAX_SEARCH) {
        rt_err(err, "INVALID_ARGUMENTS", "`search` is longer than %d bytes", III_MAX_SEARCH);
        xfree(s);
        return -1;
    }
    struct isearch *is = xmalloc(sizeof *is);
    if (!is) {
        rt_err(err, "invocation_error", "out of memory");
        xfree(s);
        return -1;
    }
    isearch_init(is, s); /* is->nd keeps s: freed with is by bi_search_free */
    *out = is;
    return 1;
}

static void bi_search_free(struct isearch *is)
{
    if (is) xfree((char *)is->nd), xfree(is);
}

/* 1 if s starts with p (byte comparison); the length test first keeps a long p cheap. */
static int str_prefix(const char *s, const char *p)
{
    size_t pl = strlen(p);
    return !strncmp(s, p, pl);
}

/* A raw JSON string value decoded (for searching descriptions); NULL when not a string. */
static char *raw_str(const char *raw)
{
    if (!raw || raw[0] != '"') return NULL;
    struct jdoc d = {0};
    struct jtok t[2];
    d.t = t, d.cap = d.max = 2;
    if (json_parse(&d, (const unsigned char *)raw, strlen(raw), 1, 0) < 0) return NULL;
    return json_strdup(&d, 0, NULL);
}

/* Writes the worker name of f as a C string into out. */
static const char *fn_wname(const struct func *f, char *out, size_t cap)
{
    if (!f->owner) return "iii-engine-functions";
    if (f->owner->name) return f->owner->name;
    const char *sep = strstr(f->id, "::");
    size_t n = sep ? (size_t)(sep - f->id) : strlen(f->id);
    if (n >= cap) n = cap - 1;
    memcpy(out, f->id, n);
    out[n] = 0;
    return out;
}

/* ,"providers":[{"worker_id","worker_name","inflight"},...] for a function that may have
 * several providers (this engine's routing); nothing for the usual single owner, so default
 * listings are unchanged. */
static void fn_providers(struct buf *b, const struct func *f)
{
    if (!f->owner || (!f->rnext && !route_many(f->ns, strlen(f->ns), f->id, strlen(f->id))))
        return;
    buf_puts(b, ",\"providers\":[");
    for (const struct func *p = f; p; p = p->rnext) {
        if (p != f) buf_putc(b, ',');
        buf_printf(b, "{\"worker_id\":\"%s\",\"worker_name\":", p->owner->wid);
        json_put_cstr(b, p->owner->name);
        buf_printf(b, ",\"inflight\":%zu}", p->owner->n_in);
    }
    buf_putc(b, ']');
}

/* One FunctionSummary (§5.1): function_id, namespace, worker_name, and description / metadata
 * as registered (raw JSON, omitted when absent). Also the element of functions_changed (§6.2). */
static int fn_summary(struct buf *b, const struct func *f)
{
    buf_puts(b, "{\"function_id\":");
    json_put_cstr(b, f->id);
    buf_puts(b, ",\"namespace\":");
    json_put_cstr(b, f->ns);
    buf_puts(b, ",\"worker_name\":");
    func_put_worker_name(b, f);
    if (f->desc_raw) buf_puts(b, ",\"description\":"), buf_puts(b, f->desc_raw);
    if (f->meta_raw) buf_puts(b, ",\"metadata\":"), buf_puts(b, f->meta_raw);
    fn_providers(b, f);
    return buf_putc(b, '}');
}

struct ranked {
    int rank;          /* primary key: lower sorts first (search rank, or 0) */
    const char *a, *b; /* sort keys */
    void *p;           /* the object the row stands for */
    const char *row;   /* functions::list: a remote node's row, listed as is (p NULL) */
};

static int cl_rows(const struct session *s, const char *prefix, const char *worker,
                   char **names, size_t nn, int by_name, const struct isearch *q,
                   struct ranked *r, size_t k);

/* qsort order for listings: rank, then a, then b (NULL b sorts as ""): deterministic output. */
static int ranked_cmp(const void *x, const void *y)
{
    const struct ranked *p = x, *q = y;
    if (p->rank != q->rank) return p->rank - q->rank;
    int c = strcmp(p->a, q->a);
    return c ? c : strcmp(p->b ? p->b : "", q->b ? q->b : "");
}

/* 1 when the id is hidden from default listings: engine::* (but engine::queue::*) or internal. */
static int fn_hidden(const struct func *f)
{
    return (str_prefix(f->id, "engine::") && !str_prefix(f->id, "engine::queue::")) || f->internal;
}

/* Search rank of §5.1: 0 id starts with needle or a "::" segment equals it, 1 id contains it,
 * 2 only the description matches, -1 no match. */
static int fn_rank(const struct func *f, const struct isearch *q)
{
    size_t nl = q->nl, il = f->klen - (size_t)(f->id - f->ns);
    if (il >= nl && str_ncaseeq(f->id, q->nd, nl)) return 0;
    for (const char *s = f->id; (s = strstr(s, "::"));) {
        s += 2;
        const char *e = strstr(s, "::");
        size_t sl = e ? (size_t)(e - s) : strlen(s);
        if (sl == nl && str_ncaseeq(s, q->nd, nl)) return 0;
    }
    if (isearch_in(q, f->id, il)) return 1;
    char *ds = raw_str(f->desc_raw);
    int m = ds && isearch_in(q, ds, strlen(ds));
    xfree(ds);
    return m ? 2 : -1;
}

/* The names of a `workers` filter array, sorted for bsearch (struct ranked's a is the name).
 * NULL with *n 0 when absent; the caller frees every name and the array. */
static int names_cmp(const void *x, const void *y)
{
    return strcmp(*(const char *const *)x, *(const char *const *)y);
}

/* engine::functions::list (§5.1): filters search / prefix / worker / workers, hides engine::*
 * and internal ids unless include_internal, sorts by search rank then id then namespace.
 * A non-string filter is a deserialization_error. */
static void bi_functions_list(BI_ARGS)
{
    const struct session *sess = caller ? caller->sess : NULL;
    char *prefix = NULL, *worker = NULL, **names = NULL;
    struct isearch *q = NULL;
    size_t nn = 0, pl = 0;
    struct ranked *r = NULL;
    if (bi_search(d, in, &q, err) < 0) goto out;
    if (bi_str(d, in, "prefix", &prefix) < 0 || bi_str(d, in, "worker", &worker) < 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::functions::list: invalid type");
        goto out;
    }
    if (prefix) pl = strlen(prefix);
    int incl = bi_bool(d, in, "include_internal");
    int wl = json_get(d, in, "workers");
    /* `workers` is copied once and sorted: each function is then one bsearch, not a walk over
     * the list (60,000 names x 20,000 functions took seconds from one message) */
    if (JTYPE(d, wl) == J_ARRAY && !d->t[wl].opaque) {
        if (!(names = xmalloc((d->t[wl].n + 1) * sizeof *names))) goto oom;
        for (uint32_t j = 0, e = (uint32_t)wl + 1; j < d->t[wl].n; j++, e = d->t[e].next)
            if (JTYPE(d, (int)e) == J_STRING && !(names[nn++] = json_strdup(d, (int)e, NULL)))
                goto oom;
        qsort(names, nn, sizeof *names, names_cmp);
    }
    size_t n = S.funcs.n + S.cl_nrfn, k = 0;
    if (!(r = xmalloc((n ? n : 1) * sizeof *r))) goto oom;
    for (size_t bkt = 0; bkt < S.funcs.nb; bkt++)
        for (struct hnode *e = S.funcs.b[bkt]; e; e = e->next) {
            struct func *f = (struct func *)e;
            char tmp[128];
            if (!incl && fn_hidden(f)) continue;
            if (!sess_sees_fn(sess, f)) continue; /* a session sees what it may call */
            if (prefix && (f->klen - (size_t)(f->id - f->ns) < pl || memcmp(f->id, prefix, pl)))
                continue;
            const char *wn = fn_wname(f, tmp, sizeof tmp);
            /* `worker` (one name) and `workers` (a list) filter together: either keeps it */
            if (worker || JTYPE(d, wl) == J_ARRAY) {
                int ok = (worker && !strcmp(worker, wn)) ||
                         (nn && bsearch(&wn, names, nn, sizeof *names, names_cmp));
                if (!ok) continue;
            }
            int rank = 0;
            if (q && q->nl && (rank = fn_rank(f, q)) < 0) continue;
            r[k].rank = rank, r[k].a = f->id, r[k].b = f->ns, r[k].p = f, r[k].row = NULL;
            k++;
        }
    k = cl_rows(sess, prefix, worker, names, nn, JTYPE(d, wl) == J_ARRAY, q, r, k);
    qsort(r, k, sizeof *r, ranked_cmp);
    buf_puts(res, "{\"functions\":[");
    for (size_t i = 0; i < k; i++) {
        if (i) buf_putc(res, ',');
        if (r[i].row) buf_puts(res, r[i].row);
        else fn_summary(res, r[i].p);
    }
    buf_puts(res, "]}");
    goto out;
oom:
    rt_err(err, "invocation_error", "out of memory");
out:
    for (size_t i = 0; i < nn; i++) xfree(names[i]);
    xfree(names), xfree(r), bi_search_free(q), xfree(prefix), xfree(worker);
}

static int trig_row(struct buf *b, const struct trig *t);

/* FunctionDetail (§5.2). */
static void fn_detail(struct buf *b, const struct func *f)
{
    buf_puts(b, "{\"function_id\":");
    json_put_cstr(b, f->id);
    buf_puts(b, ",\"namespace\":");
    json_put_cstr(b, f->ns);
    buf_puts(b, ",\"worker_name\":");
    func_put_worker_name(b, f);
    if (f->desc_raw) buf_puts(b, ",\"description\":"), buf_puts(b, f->desc_raw);
    if (f->req_raw) buf_puts(b, ",\"request_schema\":"), buf_puts(b, f->req_raw);
    if (f->resp_raw) buf_puts(b, ",\"response_schema\":"), buf_puts(b, f->resp_raw);
    if (f->meta_raw) buf_puts(b, ",\"metadata\":"), buf_puts(b, f->meta_raw);
    fn_providers(b, f);
    /* the live bindings that target this function in its namespace, sorted by id */
    buf_puts(b, ",\"registered_triggers\":[");
    struct tgroup *g = tg_find(&S.fgroups, f->key, f->klen);
    size_t n = g ? g->n : 0, k = 0;
    struct ranked *r = xmalloc((n ? n : 1) * sizeof *r);
    for (struct trig *t = g ? g->head : NULL; r && t; t = t->fn_next)
        if (t->live) r[k].rank = 0, r[k].a = t->id, r[k].b = NULL, r[k++].p = t;
    if (r) qsort(r, k, sizeof *r, ranked_cmp);
    for (size_t i = 0; i < k; i++) {
        struct trig *t = r[i].p;
        if (i) buf_putc(b, ',');
        buf_puts(b, "{\"id\":");
        json_put_cstr(b, t->id);
        buf_puts(b, ",\"trigger_type\":");
        json_put_cstr(b, t->type);
        buf_puts(b, ",\"config\":");
        buf_puts(b, t->config_raw);
        buf_putc(b, '}');
    }
    xfree(r);
    buf_puts(b, "]}");
}

/* Resolves id for functions::info: explicit ns strict; else default, else the only one. */
static struct func *fn_info_resolve(const char *id, const char *ns, struct buf *err)
{
    char where[512];
    int cnt;
    struct func *only = NULL;
    if (ns) {
        struct func *f = func_find_c(ns, id);
        if (f) return f;
        fn_namespaces(id, strlen(id), where, sizeof where, &cnt, &only);
        if (err) {
            if (cnt)
                rt_err(err, "NOT_FOUND",
                       "Function '%s' is not registered in namespace '%s'. It is registered in "
                       "namespace(s): %s.",
                       id, ns, where);
            else rt_err(err, "NOT_FOUND", "Function '%s' is not registered.", id);
        }
        return NULL;
    }
    struct func *f = func_find_c(NS_DEFAULT, id);
    if (f) return f;
    fn_namespaces(id, strlen(id), where, sizeof where, &cnt, &only);
    if (cnt == 1) return only;
    if (err) {
        if (cnt > 1)
            rt_err(err, "NOT_FOUND",
                   "Function '%s' is ambiguous: it is registered in namespace(s): %s. Pass "
                   "`namespace` to select one.",
                   id, where);
        else rt_err(err, "NOT_FOUND", "Function '%s' is not registered.", id);
    }
    return NULL;
}

/* engine::functions::info (§5.2): one function_id (NOT_FOUND error when missing) or a batch
 * of function_ids (deduplicated, at most 32; a missing one becomes an error row, not an
 * error reply). namespace, when given, is strict. */
static void bi_functions_info(BI_ARGS)
{
    int one = json_get(d, in, "function_id"), many = json_get(d, in, "function_ids");
    char *ns = NULL, *id = NULL;
    if (bi_str(d, in, "namespace", &ns) < 0) {
        rt_err(err, "INVALID_ARGUMENTS", "`namespace` must be a string");
        return;
    }
    if (!JABSENT(d, one) && !JABSENT(d, many)) {
        rt_err(err, "INVALID_ARGUMENTS", "pass either `function_id` or `function_ids`, not both");
    } else if (JABSENT(d, one) && JABSENT(d, many)) {
        rt_err(err, "INVALID_ARGUMENTS",
               "missing field `function_id` (or `function_ids` for a batch)");
    } else if (!JABSENT(d, one)) {
        if (!(id = json_strdup(d, one, NULL))) {
            rt_err(err, "INVALID_ARGUMENTS", "`function_id` must be a string");
        } else {
            struct func *f = fn_info_resolve(id, ns, err);
            if (f && !sess_sees_fn(caller ? caller->sess : NULL, f))
                rt_err(err, "FORBIDDEN", "Function '%s' is not visible to this session.", id);
            else if (f) fn_detail(res, f);
        }
    } else if (JTYPE(d, many) != J_ARRAY || d->t[many].opaque || !d->t[many].n) {
        rt_err(err, "INVALID_ARGUMENTS",
               "`function_ids` must be a non-empty array of function ids");
    } else {
        /* a batch is capped at 32 distinct ids; duplicates are answered once */
        const char *ids[33];
        char *own[33];
        size_t k = 0, bad = 0;
        uint32_t e = (uint32_t)many + 1;
        for (uint32_t j = 0; j < d->t[many].n && !bad; j++, e = d->t[e].next) {
            char *s = json_strdup(d, (int)e, NULL);
            if (!s) {
                bad = 1;
                break;
            }
            int dup = 0;
            for (size_t q = 0; q < k; q++) dup |= !strcmp(ids[q], s);
            if (dup) {
                xfree(s);
                continue;
            }
            if (k == 32) {
                xfree(s);
                bad = 2;
                break;
            }
            ids[k] = own[k] = s, k++;
        }
        if (bad == 1)
            rt_err(err, "INVALID_ARGUMENTS",
                   "`function_ids` must be a non-empty array of function ids");
        else if (bad == 2) rt_err(err, "INVALID_ARGUMENTS", "too many function_ids (max 32)");
        else {
            buf_puts(res, "{\"functions\":[");
            for (size_t q = 0; q < k; q++) {
                struct func *f = fn_info_resolve(ids[q], ns, NULL);
                if (f && !sess_sees_fn(caller ? caller->sess : NULL, f)) f = NULL;
                if (q) buf_putc(res, ',');
                if (f) fn_detail(res, f);
                else
                    buf_puts(res, "{\"function_id\":"), json_put_cstr(res, ids[q]),
                        buf_puts(res, ",\"error\":\"not_found\"}");
            }
            buf_puts(res, "]}");
        }
        for (size_t q = 0; q < k; q++) xfree(own[q]);
    }
    xfree(ns), xfree(id);
}

/* ---- workers ---- */
/* The in-process modules listed as workers with status "available" (§5.7). */
static const char *const BUILTIN_MODULES[] = {"iii-worker-manager", "iii-engine-functions"};

/* Functions c owns (its list is unbounded, so this is O(n); listings only). */
static size_t conn_fn_count(const struct conn *c)
{
    size_t n = 0;
    for (const struct func *f = c->funcs; f; f = f->cnext) n++;
    return n;
}

/* One engine::workers::list row for worker c (extra: the info-only fields). */
static void worker_row(struct buf *b, const struct conn *c, int extra)
{
    buf_puts(b, "{\"name\":");
    json_put_cstr(b, c->name);
    buf_puts(b, ",\"description\":");
    json_put_cstr(b, c->desc);
    buf_puts(b, ",\"version\":");
    json_put_cstr(b, c->version);
    buf_printf(b, ",\"id\":\"%s\",\"namespace\":", c->wid);
    /* a worker whose namespace is still pending is listed in default */
    json_put_cstr(b, c->ns ? c->ns : NS_DEFAULT);
    buf_puts(b, ",\"runtime\":");
    /* §5.7: runtime is "unknown" when the worker did not report one */
    json_put_cstr(b, c->runtime ? c->runtime : "unknown");
    buf_puts(b, ",\"os\":");
    json_put_cstr(b, c->os);
    buf_printf(b,
               ",\"status\":\"connected\",\"function_count\":%zu,\"connected_at_ms\":%lld,"
               "\"active_invocations\":%zu,\"isolation\":",
               conn_fn_count(c), (long long)c->connected_wall, c->n_out + c->n_in);
    json_put_cstr(b, c->isolation);
    buf_puts(b, ",\"ip_address\":");
    json_put_cstr(b, c->ip);
    if (extra) {
        if (c->has_pid) buf_printf(b, ",\"pid\":%lu", (unsigned long)c->pid);
        buf_puts(b, ",\"internal\":false");
        /* this engine adds the last registration refusal (of this connection, or of the
         * declared worker process it belongs to, which outlives reconnects) */
        const char *rf = c->refusal ? c->refusal : c->has_pid ? sup_refusal_get(c->pid) : NULL;
        if (rf) buf_puts(b, ",\"last_refusal\":"), buf_puts(b, rf);
    }
    buf_putc(b, '}');
}

/* The row of a builtin module in engine::workers::list/info: it reports the engine's version and
 * start time; only iii-engine-functions owns functions (the ownerless builtins). */
static void module_row(struct buf *b, const char *name, int extra)
{
    size_t nf = 0;
    if (!strcmp(name, "iii-engine-functions"))
        for (size_t i = 0; i < S.funcs.nb; i++)
            for (struct hnode *e = S.funcs.b[i]; e; e = e->next) nf += !((struct func *)e)->owner;
    buf_puts(b, "{\"name\":");
    json_put_cstr(b, name);
    buf_puts(b, ",\"description\":null,\"version\":\"" III_VERSION "\",\"id\":");
    json_put_cstr(b, name);
    buf_printf(
        b,
        ",\"namespace\":\"default\",\"runtime\":\"engine\",\"os\":null,\"status\":\"available\","
        "\"function_count\":%zu,\"connected_at_ms\":%lld,\"active_invocations\":0,"
        "\"isolation\":\"in-process\",\"ip_address\":null",
        nf, (long long)S.start_wall);
    if (extra) buf_puts(b, ",\"internal\":true");
    buf_putc(b, '}');
}

static size_t cl_nwks(void);
static size_t cl_wrows(const struct isearch *q, const char *runtime, const char *status,
                       struct ranked *r, size_t k);

/* engine::workers::list (§5.7): live worker connections that reported a pid, plus the builtin
 * modules; filters search (substring of name), runtime and status; sorted by name then id. */
static void bi_workers_list(BI_ARGS)
{
    (void)caller;
    char *runtime = NULL, *status = NULL;
    struct isearch *q = NULL;
    if (bi_search(d, in, &q, err) < 0) return;
    bi_str(d, in, "runtime", &runtime), bi_str(d, in, "status", &status);
    size_t n = cl_nwks(), k = 0;
    for (struct conn *c = S.conns; c; c = c->next) n++;
    struct ranked *r = xmalloc((n + 2) * sizeof *r);
    if (!r) {
        rt_err(err, "invocation_error", "out of memory");
        goto out;
    }
    for (struct conn *c = S.conns; c; c = c->next) {
        if (c->kind != CK_WORKER || !c->has_pid || c->torn) continue; /* §5.7: pid-less hidden */
        if (!sess_sees_worker(caller ? caller->sess : NULL, c)) continue;
        /* §5.7: search is a case-insensitive substring of the name; empty is no filter */
        if (q && q->nl && (!c->name || !isearch_in(q, c->name, strlen(c->name)))) continue;
        if (runtime && strcmp(runtime, c->runtime ? c->runtime : "unknown")) continue;
        if (status && strcmp(status, "connected")) continue;
        r[k].rank = 0, r[k].a = c->name ? c->name : c->wid, r[k].b = c->wid, r[k].row = NULL;
        r[k++].p = c;
    }
    if (!caller || !caller->sess || caller->sess->full || !caller->sess->restricted)
        k = cl_wrows(q, runtime, status, r, k);
    for (size_t i = 0; i < 2; i++) {
        const char *m = BUILTIN_MODULES[i];
        if (q && q->nl && !isearch_in(q, m, strlen(m))) continue;
        if (runtime && strcmp(runtime, "engine")) continue;
        if (status && strcmp(status, "available")) continue;
        r[k].rank = 0, r[k].a = m, r[k].b = m, r[k].row = NULL, r[k++].p = NULL;
    }
    qsort(r, k, sizeof *r, ranked_cmp);
    buf_puts(res, "{\"workers\":[");
    for (size_t i = 0; i < k; i++) {
        if (i) buf_putc(res, ',');
        if (r[i].row) buf_puts(res, r[i].row);
        else if (r[i].p) worker_row(res, r[i].p, 0);
        else module_row(res, r[i].a, 0);
    }
    buf_puts(res, "]}");
    xfree(r);
out:
    bi_search_free(q), xfree(runtime), xfree(status);
}

/* The worker_name of a trigger type (§5.3): the provider's reported name, the module that
 * provides the well-known ids in the reference engine, else the id's first "::" segment,
 * written into the caller's seg[128] (no static buffer: the caller owns the result). */
static const char *tt_worker_name(const struct ttype *tt, char seg[128])
{
    /* the reference engine's module names for the well-known types, so listings look the same */
    static const char *const known[][2] = {
        {"http", "iii-http"},     {"cron", "iii-cron"},        {"state", "iii-state"},
        {"stream", "iii-stream"}, {"subscribe", "iii-pubsub"}, {"durable:subscriber", "queue"}};
    if (tt->provider && tt->provider->name) return tt->provider->name;
    if (!tt->provider) return "iii-engine-functions";
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (!strcmp(tt->id, known[i][0])) return known[i][1];
    const char *sep = strstr(tt->id, "::");
    size_t n = sep ? (size_t)(sep - tt->id) : strlen(tt->id);
    if (n >= 128) n = 127;
    memcpy(seg, tt->id, n);
    seg[n] = 0;
    return seg;
}

/* One TriggerTypeSummary row of engine::triggers::list (§5.3). */
static void tt_row(struct buf *b, const struct ttype *tt)
{
    buf_puts(b, "{\"id\":");
    json_put_cstr(b, tt->id);
    buf_puts(b, ",\"namespace\":");
    json_put_cstr(b, tt->ns);
    buf_puts(b, ",\"worker_name\":");
    char seg[128];
    json_put_cstr(b, tt_worker_name(tt, seg));
    buf_puts(b, ",\"description\":");
    buf_puts(b, tt->desc_raw ? tt->desc_raw : "null");
    buf_putc(b, '}');
}

/* Compact JSON of config truncated to 80 characters with "…" appended (§5.5). */
static void config_summary(struct buf *b, const char *raw)
{
    struct buf c = {0};
    int in_str = 0;
    /* drop white space outside strings: the stored raw config may be pretty-printed */
    for (const char *p = raw; *p; p++) {
        if (in_str) {
            buf_putc(&c, *p);
            if (*p == '\\' && p[1]) buf_putc(&c, *++p);
            else if (*p == '"') in_str = 0;
        } else if (!JSON_WS(*p)) {
            buf_putc(&c, *p);
            if (*p == '"') in_str = 1;
        }
    }
    /* cut at 80 code points, never inside a UTF-8 sequence */
    size_t n = buf_used(&c), chars = 0, i = 0;
    const unsigned char *s = buf_data(&c);
    while (i < n && chars < 80) {
        i++;
        while (i < n && (s[i] & 0xC0) == 0x80) i++;
        chars++;
    }
    if (i < n) {
        struct buf t = {0};
        buf_append(&t, s, i);
        buf_puts(&t, "\xE2\x80\xA6");
        json_put_str(b, (char *)buf_data(&t), buf_used(&t));
        buf_free(&t);
    } else {
        json_put_str(b, s ? (const char *)s : "", n);
    }
    buf_free(&c);
}

/* The worker name of a binding's target function (in its namespace), JSON. */
static void trig_target_wname(struct buf *b, const struct trig *t)
{
    struct func *f = func_find_c(t->ns, t->fid);
    if (f) func_put_worker_name(b, f);
    else buf_puts(b, "null");
}

/* One RegisteredTriggerSummary (§5.5): the binding with its raw config and config_summary. */
static int trig_row(struct buf *b, const struct trig *t)
{
    buf_puts(b, "{\"id\":");
    json_put_cstr(b, t->id);
    buf_puts(b, ",\"trigger_type\":");
    json_put_cstr(b, t->type);
    buf_puts(b, ",\"function_id\":");
    json_put_cstr(b, t->fid);
    buf_puts(b, ",\"worker_name\":");
    trig_target_wname(b, t);
    buf_puts(b, ",\"config\":");
    buf_puts(b, t->config_raw);
    buf_puts(b, ",\"config_summary\":");
    config_summary(b, t->config_raw);
    return buf_putc(b, '}');
}

/* Resolves a worker name for workers::info (§5.8). NULL with err set when not found. */
static struct conn *worker_by_name(const char *name, const char *ns, struct buf *err)
{
    struct conn *in_default = NULL, *in_ns = NULL, *any = NULL;
    const char *nss[64];
    size_t k = 0;
    for (struct conn *c = S.conns; c; c = c->next) {
        if (c->kind != CK_WORKER || c->torn || !c->name || strcmp(c->name, name)) continue;
        const char *cn = c->ns ? c->ns : NS_DEFAULT;
        if (ns && !strcmp(cn, ns)) in_ns = c;
        if (!strcmp(cn, NS_DEFAULT)) in_default = c;
        int seen = 0;
        for (size_t i = 0; i < k; i++) seen |= !strcmp(nss[i], cn);
        if (!seen && k < 64) nss[k++] = cn;
        any = c;
    }
    char where[512];
    names_join(nss, k, where, sizeof where);
    if (ns) {
        if (in_ns) return in_ns;
        if (k)
            rt_err(err, "NOT_FOUND",
                   "Worker '%s' is not connected in the requested namespace; it is connected in "
                   "namespace(s): %s",
                   name, where);
        else rt_err(err, "NOT_FOUND", "Worker '%s' is not connected.", name);
        return NULL;
    }
    if (in_default) return in_default;
    if (k == 1) return any;
    if (k > 1)
        rt_err(err, "NOT_FOUND",
               "Worker '%s' is ambiguous: it is connected in namespace(s): %s. Pass `namespace` to "
               "disambiguate.",
               name, where);
    else rt_err(err, "NOT_FOUND", "Worker '%s' is not connected.", name);
    return NULL;
}

/* engine::workers::info (§5.8): by name (namespace strict when given, else default, else the
 * only match); a builtin module answers with its ownerless functions. The reply lists the
 * worker's functions, the trigger types it provides and the live bindings that target it. */
static void bi_workers_info(BI_ARGS)
{
    (void)caller;
    char *name = NULL, *ns = NULL;
    if (bi_str(d, in, "name", &name) <= 0 || bi_str(d, in, "namespace", &ns) < 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::workers::info: missing field `name`");
        goto out;
    }
    for (size_t i = 0; i < 2; i++) /* the builtin modules live in default */
        if (!strcmp(name, BUILTIN_MODULES[i]) && (!ns || !strcmp(ns, NS_DEFAULT))) {
            buf_puts(res, "{\"worker\":");
            module_row(res, name, 1);
            buf_puts(res, ",\"functions\":[");
            size_t n = 0, k = 0;
            struct hnode **v = hm_list(&S.funcs, &n);
            struct ranked *r = xmalloc((n ? n : 1) * sizeof *r);
            for (size_t j = 0; v && r && i == 1 && j < n; j++)
                if (!((struct func *)v[j])->owner)
                    r[k].rank = 0, r[k].a = ((struct func *)v[j])->id, r[k].b = NULL,
                    r[k++].p = v[j];
            if (r) qsort(r, k, sizeof *r, ranked_cmp);
            for (size_t j = 0; j < k; j++) {
                if (j) buf_putc(res, ',');
                fn_summary(res, r[j].p);
            }
            xfree(v), xfree(r);
            buf_puts(res, "],\"trigger_types\":[],\"registered_triggers\":[]}");
            goto out;
        }
    struct conn *c = worker_by_name(name, ns, err);
    const struct session *sess = caller ? caller->sess : NULL;
    if (c && !sess_sees_worker(sess, c)) {
        rt_err(err, "NOT_FOUND", "Worker '%s' is not connected.", name);
        goto out;
    }
    if (!c) goto out;
    buf_puts(res, "{\"worker\":");
    worker_row(res, c, 1);
    buf_puts(res, ",\"functions\":[");
    /* rows: its functions, the trigger types it provides, and the live bindings that target
     * its functions (from each function's group): the cost is this worker's share only */
    size_t n = c->n_funcs, k = 0;
    for (struct ttype *tt = c->ttypes; tt; tt = tt->pnext) n++;
    for (struct func *f = c->funcs; f; f = f->cnext) {
        struct tgroup *g = tg_find(&S.fgroups, f->key, f->klen);
        n += g ? g->n : 0;
    }
    struct ranked *r = xmalloc((n + 1) * sizeof *r);
    if (!r) {
        buf_reset(res);
        rt_err(err, "invocation_error", "out of memory");
        goto out;
    }
    for (struct func *f = c->funcs; f; f = f->cnext)
        if (sess_sees_fn(sess, f)) r[k].rank = 0, r[k].a = f->id, r[k].b = NULL, r[k++].p = f;
    qsort(r, k, sizeof *r, ranked_cmp);
    for (size_t j = 0; j < k; j++) {
        if (j) buf_putc(res, ',');
        fn_summary(res, r[j].p);
    }
    buf_puts(res, "],\"trigger_types\":[");
    k = 0;
    for (struct ttype *tt = c->ttypes; tt; tt = tt->pnext)
        r[k].rank = 0, r[k].a = tt->id, r[k].b = tt->ns, r[k++].p = tt;
    qsort(r, k, sizeof *r, ranked_cmp);
    for (size_t j = 0; j < k; j++) {
        if (j) buf_putc(res, ',');
        tt_row(res, r[j].p);
    }
    buf_puts(res, "],\"registered_triggers\":[");
    k = 0;
    for (struct func *f = c->funcs; f; f = f->cnext) {
        struct tgroup *g = tg_find(&S.fgroups, f->key, f->klen);
        for (struct trig *t = g && sess_sees_fn(sess, f) ? g->head : NULL; t; t = t->fn_next)
            if (t->live) r[k].rank = 0, r[k].a = t->id, r[k].b = NULL, r[k++].p = t;
    }
    qsort(r, k, sizeof *r, ranked_cmp);
    for (size_t j = 0; j < k; j++) {
        if (j) buf_putc(res, ',');
        trig_row(res, r[j].p);
    }
    buf_puts(res, "]}");
    xfree(r);
out:
    xfree(name), xfree(ns);
}

/* Sanitises a worker name/description (§5.9 step 3): control, bidi and line-separator
 * characters dropped, cut to III_MAX_NAME characters, trimmed; NULL when empty. s[0..n) is
 * decoded defensively: a sequence is taken only when its bytes are there and are continuation
 * bytes (anything else is dropped one byte at a time), so nothing is ever read past n. */
static char *sanitize(const char *s, size_t n)
{
    struct buf b = {0};
    size_t chars = 0, i = 0;
    const unsigned char *p = (const unsigned char *)s;
    while (i < n && chars < III_MAX_NAME) {
        unsigned c = p[i];
        size_t l = c < 0x80 ? 1 : c >= 0xC2 && c < 0xE0 ? 2 : c >= 0xE0 && c < 0xF0 ? 3
                                                          : c >= 0xF0 && c < 0xF5 ? 4
                                                                                   : 0;
        if (!l || l > n - i || !utf8_valid(p + i, l)) {
            i++; /* not a whole valid sequence: dropped */
            continue;
        }
        uint32_t cp = c;
        if (l == 2) cp = (uint32_t)(c & 0x1F) << 6 | (p[i + 1] & 0x3F);
        else if (l == 3)
            cp = (uint32_t)(c & 0x0F) << 12 | (uint32_t)(p[i + 1] & 0x3F) << 6 | (p[i + 2] & 0x3F);
        /* C0/C1 controls, ALM, LRM/RLM, LS/PS and the bidi embedding/override/isolate controls:
         * they could make one worker's name display as another's in logs and listings */
        int drop = cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp < 0xA0) || cp == 0x061C ||
                   cp == 0x200E || cp == 0x200F || (cp >= 0x2028 && cp <= 0x202E) ||
                   (cp >= 0x2066 && cp <= 0x2069);
        if (!drop) buf_append(&b, p + i, l), chars++;
        i += l;
    }
    const char *out = (const char *)buf_data(&b);
    size_t st = 0, e = buf_used(&b);
    while (st < e && isspace((unsigned char)out[st])) st++;
    while (e > st && isspace((unsigned char)out[e - 1])) e--;
    char *r = e > st && !buf_check(&b) ? xstrndup(out + st, e - st) : NULL;
    buf_free(&b);
    return r;
}

/* engine::workers::register (§5.9), the connection's announce: records metadata, claims the
 * (namespace, name) lease, and pins the namespace (§1.4), which drains buffered
 * registrations. A name held by another live worker gets registrationrejected
 * WORKER_NAMESPACE_CONFLICT and a 1008 close (§5.10). Needs a WS caller. */
static void bi_workers_register(BI_ARGS)
{
    struct conn *c = caller;
    char *ns = NULL, *name = NULL, *raw = NULL;
    if (!c) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::workers::register: missing field "
               "`_caller_worker_id`");
        return;
    }
    int nsi = json_get(d, in, "namespace"), nm = json_get(d, in, "name");
    size_t rawlen = 0;
    if (!JABSENT(d, nm) && JTYPE(d, nm) == J_STRING && (raw = json_strdup(d, nm, &rawlen)))
        name = sanitize(raw, rawlen);
    xfree(raw);
    if (!JABSENT(d, nsi)) {
        if (JTYPE(d, nsi) != J_STRING || !(ns = json_strdup(d, nsi, NULL))) {
            rt_err(err, "deserialization_error",
                   "Failed to deserialize input for engine::workers::register: invalid type for "
                   "`namespace`");
            goto out;
        }
        if (str_blank(ns, strlen(ns))) {
            rt_err(err, "INVALID_NAMESPACE",
                   "namespace is empty: worker '%s' declared \"%s\". Give it a name, or omit the "
                   "field to register in 'default'.",
                   name ? name : "", ns);
            goto out;
        }
        const struct session *s = c->sess;
        if (s && !s->full && s->restricted && sess_ns(s, ns, strlen(ns)) < 0) {
            /* §3.9: a session may announce only into its own namespaces */
            char permitted[400] = "", nb[16][128];
            const char *names[16];
            size_t k = 0;
            for (uint32_t i = 0, e = (uint32_t)s->ns + 1;
                 JTYPE(&s->d, s->ns) == J_OBJECT && i < s->d.t[s->ns].n && k < 16;
                 i++, e = s->d.t[e + 1].next) {
                snprintf(nb[k], sizeof nb[k], "%.*s", (int)JLEN(&s->d, (int)e) - 2,
                         JRAW(&s->d, (int)e) + 1);
                names[k] = nb[k], k++;
            }
            names_join(names, k, permitted, sizeof permitted);
            rt_err(err, "FORBIDDEN", "namespace '%s' not allowed for this session (permitted: %s)",
                   ns, permitted);
            goto out;
        }
        if (!id_ok(ns, strlen(ns))) {
            rt_err(err, "INVALID_NAMESPACE",
                   "namespace is not usable: namespaces are 1 to %d bytes with no control "
                   "characters",
                   III_MAX_ID);
            goto out;
        }
    }
    /* the first resolution wins (§1.4): a late register with another namespace changes nothing */
    const char *eff = c->ns_state != NS_PENDING && c->ns ? c->ns : ns ? ns : NS_DEFAULT;
    if (c->ns_state != NS_PENDING && ns && strcmp(ns, eff))
        LOG_LIMITED(c, LOG_WARN,
            "worker %s: late engine::workers::register for namespace '%s' honoured in fixed "
            "namespace '%s'",
            c->wid, ns, eff);
    /* §5.9: a (namespace, name) lease: one live worker per name in a namespace. Whatever
     * happens, c->lease is the lease c holds now and l->owner->lease == l for every lease */
    if (name) {
        struct lease *l = (struct lease *)reg_find(&S.leases, eff, strlen(eff), name, strlen(name));
        /* a retiring holder (a rolling reload replaces it) yields its name to the newcomer */
        if (l && l->owner != c && conn_live(l->owner) && !l->owner->retiring) {
            worker_rejected(c, "WORKER_NAMESPACE_CONFLICT", eff, name, NULL, 0, l->owner->wid,
                            NULL);
            conn_close(c, 1008, "WORKER_NAMESPACE_CONFLICT");
            buf_puts(res, "{\"success\":false}");
            goto out;
        }
        /* a re-register under another name (or namespace) gives the old lease up */
        if (c->lease && c->lease != l) lease_drop(c);
        if (l && l->owner != c) l->owner->lease = NULL; /* its holder is going away: taken over */
        if (!l) {
            size_t kl;
            l = xcalloc(sizeof *l);
            if (!l || !(l->key = reg_key(NULL, 0, eff, strlen(eff), name, strlen(name), &kl)) ||
                hm_put(&S.leases, &l->h, l->key, kl) < 0) {
                if (l) xfree(l->key);
                xfree(l);
                rt_err(err, "invocation_error", "out of memory");
                goto out;
            }
            l->klen = kl;
        }
        l->owner = c;
        c->lease = l;
    } else {
        lease_drop(c); /* announced without a (usable) name: it holds none */
    }
    xfree(c->name);
    c->name = name;
    name = NULL;
    char *s;
    int t;
    if (bi_str(d, in, "description", &s) > 0)
        xfree(c->desc), c->desc = sanitize(s, strlen(s)), xfree(s);
    if (bi_str(d, in, "runtime", &s) > 0) xfree(c->runtime), c->runtime = s;
    else if (!c->runtime) c->runtime = xstrdup("unknown");
    if (bi_str(d, in, "version", &s) > 0) xfree(c->version), c->version = s;
    if (bi_str(d, in, "os", &s) > 0) xfree(c->os), c->os = s;
    if (bi_str(d, in, "isolation", &s) > 0) xfree(c->isolation), c->isolation = s;
    if (!JABSENT(d, (t = json_get(d, in, "telemetry"))))
        xfree(c->telemetry), c->telemetry = jraw_dup(d, t);
    int64_t pid;
    /* only a worker that reports a pid is listed by engine::workers::list (§5.7) */
    if (json_int(d, json_get(d, in, "pid"), &pid) == 0 && pid >= 0 && pid <= UINT32_MAX)
        c->pid = (uint32_t)pid, c->has_pid = 1;
    worker_resolve(c, eff);
    char pidb[24] = "-";
    if (c->has_pid) snprintf(pidb, sizeof pidb, "%lu", (unsigned long)c->pid);
    LOG(LOG_INFO, "worker %s announced: name %s, runtime %s, namespace %s, pid %s, %zu functions",
        c->wid, c->name ? c->name : "-", c->runtime ? c->runtime : "-", c->ns ? c->ns : eff, pidb,
        c->n_funcs);
    ev_worker("worker_metadata_updated", c);
    buf_puts(res, "{\"success\":true}");
out:
    xfree(ns), xfree(name);
}

/* engine::triggers::list (§5.3): trigger *types*; engine::* ids hidden unless
 * include_internal; filters search (id or description), prefix, worker; sorted by id, ns. */
static size_t cl_ntts(void);
static size_t cl_ttrows(const struct isearch *q, const char *prefix, const char *worker,
                        struct ranked *r, size_t k);

static void bi_triggers_list(BI_ARGS)
{
    (void)err;
    char *prefix = NULL, *worker = NULL;
    struct isearch *q = NULL;
    if (bi_search(d, in, &q, err) < 0) return;
    bi_str(d, in, "prefix", &prefix), bi_str(d, in, "worker", &worker);
    int incl = bi_bool(d, in, "include_internal");
    size_t n = 0, k = 0;
    struct hnode **v = hm_list(&S.ttypes, &n);
    struct ranked *r = xmalloc((n + cl_ntts() + 1) * sizeof *r);
    for (size_t i = 0; v && r && i < n; i++) {
        struct ttype *tt = (struct ttype *)v[i];
        if (!incl && str_prefix(tt->id, "engine::")) continue;
        if (!sess_sees_tt(caller ? caller->sess : NULL, tt)) continue;
        if (prefix && !str_prefix(tt->id, prefix)) continue;
        char seg[128];
        if (worker && strcmp(worker, tt_worker_name(tt, seg))) continue;
        if (q && q->nl) {
            char *ds = raw_str(tt->desc_raw);
            int m = isearch_in(q, tt->id, strlen(tt->id)) || (ds && isearch_in(q, ds, strlen(ds)));
            xfree(ds);
            if (!m) continue;
        }
        r[k].rank = 0, r[k].a = tt->id, r[k].b = tt->ns, r[k].row = NULL, r[k++].p = tt;
    }
    if (r && (!caller || !caller->sess || caller->sess->full || !caller->sess->restricted))
        k = cl_ttrows(q, prefix, worker, r, k);
    if (r) qsort(r, k, sizeof *r, ranked_cmp);
    buf_puts(res, "{\"triggers\":[");
    for (size_t i = 0; i < k; i++) {
        if (i) buf_putc(res, ',');
        if (r[i].row) buf_puts(res, r[i].row);
        else tt_row(res, r[i].p);
    }
    buf_puts(res, "]}");
    xfree(v), xfree(r), bi_search_free(q), xfree(prefix), xfree(worker);
}

/* TriggerTypeDetail (§5.4): the summary plus schemas and the count of live bindings. */
static void tt_detail(struct buf *b, const struct ttype *tt)
{
    size_t cnt = 0;
    for (struct trig *t = tg_first(tt->id); t; t = t->type_next) cnt += t->live;
    buf_puts(b, "{\"id\":");
    json_put_cstr(b, tt->id);
    buf_puts(b, ",\"namespace\":");
    json_put_cstr(b, tt->ns);
    buf_puts(b, ",\"worker_name\":");
    char seg[128];
    json_put_cstr(b, tt_worker_name(tt, seg));
    buf_puts(b, ",\"description\":");
    buf_puts(b, tt->desc_raw ? tt->desc_raw : "null");
    if (tt->treq_raw) buf_puts(b, ",\"configuration_schema\":"), buf_puts(b, tt->treq_raw);
    if (tt->creq_raw) buf_puts(b, ",\"request_schema\":"), buf_puts(b, tt->creq_raw);
    buf_printf(b, ",\"instance_count\":%zu}", cnt);
}

/* engine::triggers::info (§5.4): type id in `namespace` (default when absent), strict. */
static void bi_triggers_info(BI_ARGS)
{
    char *id = NULL, *ns = NULL;
    if (bi_str(d, in, "id", &id) <= 0 || bi_str(d, in, "namespace", &ns) < 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::triggers::info: missing field `id`");
    } else {
        struct ttype *tt = tt_find(ns ? ns : NS_DEFAULT, id);
        if (tt && !sess_sees_tt(caller ? caller->sess : NULL, tt)) tt = NULL;
        if (!tt)
            rt_err(err, "NOT_FOUND", "Trigger type '%s' is not registered in namespace '%s'.", id,
                   ns ? ns : NS_DEFAULT);
        else tt_detail(res, tt);
    }
    xfree(id), xfree(ns);
}

/* engine::registered-triggers::list (§5.5): live bindings only (parked ones are invisible);
 * bindings that target engine::* functions hidden unless include_internal. Sorted by id. */
static void bi_rtriggers_list(BI_ARGS)
{
    char *type = NULL, *fid = NULL, *worker = NULL;
    struct isearch *q = NULL;
    if (bi_search(d, in, &q, err) < 0) return;
    bi_str(d, in, "trigger_type", &type);
    bi_str(d, in, "function_id", &fid), bi_str(d, in, "worker", &worker);
    int incl = bi_bool(d, in, "include_internal");
    size_t n = 0, k = 0;
    struct hnode **v = hm_list(&S.trigs, &n);
    struct ranked *r = xmalloc((n ? n : 1) * sizeof *r);
    for (size_t i = 0; v && r && i < n; i++) {
        struct trig *t = (struct trig *)v[i];
        if (!t->live) continue;
        if (!incl && str_prefix(t->fid, "engine::")) continue;
        if (!sess_sees_trig(caller ? caller->sess : NULL, t)) continue;
        if (type && strcmp(type, t->type)) continue;
        if (fid && strcmp(fid, t->fid)) continue;
        if (q && q->nl && !isearch_in(q, t->id, strlen(t->id)) &&
            !isearch_in(q, t->type, strlen(t->type)) && !isearch_in(q, t->fid, strlen(t->fid)))
            continue;
        if (worker) {
            struct func *f = func_find_c(t->ns, t->fid);
            char tmp[128];
            if (!f || strcmp(fn_wname(f, tmp, sizeof tmp), worker)) continue;
        }
        r[k].rank = 0, r[k].a = t->id, r[k].b = NULL, r[k++].p = t;
    }
    if (r) qsort(r, k, sizeof *r, ranked_cmp);
    buf_puts(res, "{\"registered_triggers\":[");
    for (size_t i = 0; i < k; i++) {
        if (i) buf_putc(res, ',');
        trig_row(res, r[i].p);
    }
    buf_puts(res, "]}");
    xfree(v), xfree(r), bi_search_free(q), xfree(type), xfree(fid), xfree(worker);
}

/* engine::registered-triggers::info (§5.6): one live binding with its provider's type detail
 * and its target function's detail (null when either is missing). */
static void bi_rtriggers_info(BI_ARGS)
{
    char *id = NULL;
    if (bi_str(d, in, "id", &id) <= 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::registered-triggers::info: missing field "
               "`id`");
        return;
    }
    struct trig *t = trig_find(id, strlen(id));
    if (t && !sess_sees_trig(caller ? caller->sess : NULL, t)) t = NULL;
    if (!t || !t->live) {
        rt_err(err, "NOT_FOUND", "Registered trigger '%s' was not found.", id);
        xfree(id);
        return;
    }
    buf_puts(res, "{\"id\":");
    json_put_cstr(res, t->id);
    buf_puts(res, ",\"trigger_type\":");
    json_put_cstr(res, t->type);
    buf_puts(res, ",\"function_id\":");
    json_put_cstr(res, t->fid);
    buf_puts(res, ",\"worker_name\":");
    trig_target_wname(res, t);
    buf_puts(res, ",\"config\":");
    buf_puts(res, t->config_raw);
    if (t->meta_raw) buf_puts(res, ",\"metadata\":"), buf_puts(res, t->meta_raw);
    buf_puts(res, ",\"trigger\":");
    struct ttype *tt = trig_provider(t);
    if (tt) tt_detail(res, tt);
    else buf_puts(res, "null");
    buf_puts(res, ",\"function\":");
    struct func *f = func_find_c(t->ns, t->fid);
    if (f) fn_detail(res, f);
    else buf_puts(res, "null");
    buf_putc(res, '}');
    xfree(id);
}

/* engine::register_trigger (§5.11): a durable binding (no owner, survives disconnects) in
 * default with a fresh id. The {"id"} result goes out at once unless a WS provider serves
 * the binding: then the call's struct bi_res carries it back (defer) and the router holds the
 * reply until the provider acks (or 10 s pass). */
static void bi_register_trigger(BI_ARGS)
{
    (void)caller;
    char *type = NULL, *fid = NULL, *tns = NULL;
    if (bi_str(d, in, "trigger_type", &type) <= 0 || bi_str(d, in, "function_id", &fid) <= 0 ||
        bi_str(d, in, "trigger_namespace", &tns) < 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::register_trigger: missing field "
               "`trigger_type` or `function_id`");
        goto out;
    }
    int ct = json_get(d, in, "config"), mt = json_get(d, in, "metadata");
    char *cr = ct >= 0 ? jraw_dup(d, ct) : NULL, *mr = jraw_dup(d, mt);
    char id[37];
    uuid_new(id);
    char why[200];
    size_t tl = strlen(type), fl = strlen(fid);
    struct trig *t = NULL;
    if (!id_ok(type, tl) || !id_ok(fid, fl) || (tns && !id_ok(tns, strlen(tns))))
        rt_err(err, "trigger_registration_failed",
               "ids and namespaces are 1 to %d bytes with no control characters", III_MAX_ID);
    else if (!(t = trig_register(NULL, caller, id, type, fid, cr ? cr : "null", mr, NS_DEFAULT,
                                 tns, NS_DEFAULT, why, sizeof why)))
        rt_err(err, "trigger_registration_failed", "%s", why);
    else {
        buf_printf(res, "{\"id\":\"%s\"}", id);
        /* res is the res member of the caller's struct bi_res (rt_run_builtin): reach the rest */
        ((struct bi_res *)(void *)((char *)res - offsetof(struct bi_res, res)))->defer = t;
    }
    xfree(cr), xfree(mr);
out:
    xfree(type), xfree(fid), xfree(tns);
}

/* engine::unregister_trigger (§5.12): removes any binding by id; {"removed":bool}. */
static void bi_unregister_trigger(BI_ARGS)
{
    (void)caller;
    char *id = NULL;
    if (bi_str(d, in, "id", &id) <= 0) {
        rt_err(err, "deserialization_error",
               "Failed to deserialize input for engine::unregister_trigger: missing field `id`");
        return;
    }
    struct trig *t = trig_find(id, strlen(id));
    /* a session that is not full access removes only the bindings it made */
    if (t && caller && caller->sess && !caller->sess->full && t->owner != caller &&
        t->acct != caller)
        t = NULL;
    if (t) trig_remove(t);
    buf_printf(res, "{\"removed\":%s}", t ? "true" : "false");
    xfree(id);
}

/* engine::log::* (docs/§10): writes message and data to the engine's log at `level`; data
 * is cut to 600 bytes so one call cannot flood the log. No result. */
static void bi_log(struct conn *caller, const struct jdoc *d, int in, int level)
{
    char *msg = NULL;
    bi_str(d, in, "message", &msg);
    int data = json_get(d, in, "data");
    const char *who = caller ? (caller->name ? caller->name : caller->wid) : "engine";
    if (level <= log_level) {
        if (data >= 0)
            log_write(level, "[%s] %s %.*s", who, msg ? msg : "",
                      (int)(JLEN(d, data) > 600 ? 600 : JLEN(d, data)), JRAW(d, data));
        else log_write(level, "[%s] %s", who, msg ? msg : "");
    }
    xfree(msg);
}
static void bi_log_info(BI_ARGS) { (void)res, (void)err, bi_log(caller, d, in, LOG_INFO); }
static void bi_log_warn(BI_ARGS) { (void)res, (void)err, bi_log(caller, d, in, LOG_WARN); }
static void bi_log_error(BI_ARGS) { (void)res, (void)err, bi_log(caller, d, in, LOG_ERROR); }
static void bi_log_debug(BI_ARGS) { (void)res, (void)err, bi_log(caller, d, in, LOG_DEBUG); }
static void bi_log_trace(BI_ARGS) { (void)res, (void)err, bi_log(caller, d, in, LOG_TRACE); }

static void bi_channels_create(BI_ARGS);
static void sup_list(struct buf *res);

/* engine::processes::list (this engine's): the declared workers and their supervision state,
 * for `iii ps`. */
static void bi_processes_list(BI_ARGS)
{
    (void)caller, (void)d, (void)in, (void)err;
    sup_list(res);
}

/* The builtin table: id -> handler, registered ownerless in default by bi_init. */
static const struct {
    const char *id;
    void (*fn)(BI_ARGS);
} BUILTINS[] = {
    {"engine::functions::list", bi_functions_list},
    {"engine::functions::info", bi_functions_info},
    {"engine::workers::list", bi_workers_list},
    {"engine::workers::info", bi_workers_info},
    {"engine::workers::register", bi_workers_register},
    {"engine::triggers::list", bi_triggers_list},
    {"engine::triggers::info", bi_triggers_info},
    {"engine::registered-triggers::list", bi_rtriggers_list},
    {"engine::registered-triggers::info", bi_rtriggers_info},
    {"engine::register_trigger", bi_register_trigger},
    {"engine::unregister_trigger", bi_unregister_trigger},
    {"engine::channels::create", bi_channels_create},
    {"engine::processes::list", bi_processes_list},
    {"engine::log::info", bi_log_info},
    {"engine::log::warn", bi_log_warn},
    {"engine::log::error", bi_log_error},
    {"engine::log::debug", bi_log_debug},
    {"engine::log::trace", bi_log_trace},
};

/* Registers the builtins and the engine's own trigger types (start-up). */
static int bi_init(void)
{
    for (size_t i = 0; i < sizeof BUILTINS / sizeof BUILTINS[0]; i++) {
        /* 7 == strlen("default"); owner NULL marks the function as in-process */
        struct func *f = func_add(NULL, NS_DEFAULT, 7, BUILTINS[i].id, strlen(BUILTINS[i].id));
        if (!f) return -1;
        f->bi = BUILTINS[i].fn;
    }
    if (!tt_register(NULL, NS_DEFAULT, TT_WORKERS,
                     "\"Fires when a worker connects, registers or disconnects\"", NULL, NULL) ||
        !tt_register(NULL, NS_DEFAULT, TT_FUNCTIONS,
                     "\"Fires when the set of registered functions changes\"", NULL, NULL))
        return -1;
    S.fn_fp_sent = S.fn_fp, S.fn_n_sent = S.fn_n; /* baseline: no event at start */
    return 0;
}

/* ==== Channels ==============================================================================
 * engine::channels::create (§5.13): a one-way relay between a writer and a reader socket on
 * /ws/channels/<id>?key=<key>&dir=write|read. Frames written before the reader arrives wait
 * in the channel (bounded by max_outbound_bytes); the writer's close reaches the reader after
 * the data. Channels have no owner; one not fully connected after III_CHANNEL_TTL_MS is swept.
 */
/* engine::channels::create (§5.13): mints channel id and access key and returns the writer
 * and reader references. The channel lives in S.chans until both sides are gone or the sweep. */
static void bi_channels_create(BI_ARGS)
{
    (void)caller, (void)d, (void)in;
    struct chan *ch = xcalloc(sizeof *ch);
    if (!ch) {
        rt_err(err, "invocation_error", "out of memory");
        return;
    }
    uuid_new(ch->id);
    uuid_new(ch->key);
    ch->created = now_ms();
    if (hm_put(&S.chans, &ch->h, ch->id, 36) < 0) {
        xfree(ch);
        rt_err(err, "invocation_error", "out of memory");
        return;
    }
    buf_printf(res,
               "{\"writer\":{\"channel_id\":\"%s\",\"access_key\":\"%s\",\"direction\":\"write\"},"
               "\"reader\":{\"channel_id\":\"%s\",\"access_key\":\"%s\",\"direction\":\"read\"}}",
               ch->id, ch->key, ch->id, ch->key);
}

/* Finds the channel of an upgrade path; *dir = 'w' or 'r'; *status 404 or 400 on failure. */
static struct chan *chan_lookup(const char *path, const char *query, int *dir, int *status)
{
    /* query parameters are matched literally (no percent-decoding): ids and keys are UUIDs */
    const char *id = path + 13; /* after "/ws/channels/" */
    char key[64] = "", dv[16] = "";
    *status = 404;
    for (const char *q = query; q && *q;) {
        const char *e = strchr(q, '&');
        size_t n = e ? (size_t)(e - q) : strlen(q);
        if (n > 4 && !strncmp(q, "key=", 4) && n - 4 < sizeof key)
            memcpy(key, q + 4, n - 4), key[n - 4] = 0;
        if (n > 4 && !strncmp(q, "dir=", 4) && n - 4 < sizeof dv)
            memcpy(dv, q + 4, n - 4), dv[n - 4] = 0;
        q = e ? e + 1 : NULL;
    }
    struct chan *ch = strlen(id) == 36 ? (struct chan *)hm_get(&S.chans, id, 36) : NULL;
    if (!ch || strcmp(key, ch->key)) return NULL;
    if (!strcmp(dv, "write")) *dir = 'w';
    else if (!strcmp(dv, "read")) *dir = 'r';
    else {
        *status = 400;
        return NULL;
    }
    return ch;
}

/* Unmaps and frees ch. The connections must already have dropped their c->chan pointers. */
static void chan_free(struct chan *ch)
{
    hm_del(&S.chans, &ch->h);
    buf_free(&ch->pending);
    xfree(ch);
}

/* A data frame from a channel side: the writer's frames are relayed to the reader with their
 * opcode (text or binary), or held until it arrives; over the cap, the writer gets 1009. */
static void chan_on_message(struct conn *c, int op, const unsigned char *p, size_t n)
{
    struct chan *ch = c->chan;
    if (!ch || c->kind != CK_CHAN_W) return; /* the reader's data frames are ignored */
    if (ch->r) {
        conn_frame(ch->r, op, p, n); /* over the reader's outbound cap drops the reader */
    } else if (ws_frame(&ch->pending, op, p, n, 0) < 0 ||
               buf_used(&ch->pending) > S.set.max_outbound_bytes) {
        conn_close(c, 1009, "channel buffer full");
    }
}

/* A channel side went away: the writer's end closes the reader (after queued data); the
 * channel is freed when both sides are gone. */
static void chan_teardown(struct conn *c)
{
    struct chan *ch = c->chan;
    if (!ch) return;
    c->chan = NULL;
    if (c == ch->w) {
        ch->w = NULL;
        ch->w_done = 1;
        if (ch->r) conn_close(ch->r, 1000, NULL);
    } else if (c == ch->r) {
        ch->r = NULL;
    }
    if (!ch->w && !ch->r && ch->w_taken && ch->r_taken) chan_free(ch);
}

/* Sweeps channels not fully connected within III_CHANNEL_TTL_MS (§5.13), once a minute. When
 * memory is short (over half of max_memory_bytes) unclaimed channels, whose buffered frames
 * may be what fills it, go after III_CHANNEL_TTL_SHORT_MS instead, checked every second. The
 * walk is over the map's buckets (saving each next link): it allocates nothing. */
static void chan_sweep(int64_t now, int64_t *next)
{
    int short_ttl = S.set.max_memory_bytes && mem_live_bytes > S.set.max_memory_bytes / 2;
    int64_t ttl = short_ttl ? III_CHANNEL_TTL_SHORT_MS : III_CHANNEL_TTL_MS;
    if (!S.chan_sweep_at) S.chan_sweep_at = now + 60000;
    if (short_ttl && S.chan_sweep_at > now + 1000) S.chan_sweep_at = now + 1000;
    if (now >= S.chan_sweep_at) {
        S.chan_sweep_at = now + (short_ttl ? 1000 : 60000);
        for (size_t i = 0; i < S.chans.nb; i++)
            for (struct hnode *e = S.chans.b[i], *nx; e; e = nx) {
                struct chan *ch = (struct chan *)e;
                nx = e->next;
                if ((ch->w_taken && ch->r_taken) || now - ch->created < ttl) continue;
                if (ch->w) ch->w->chan = NULL, conn_close(ch->w, 1001, "channel expired");
                if (ch->r) ch->r->chan = NULL, conn_close(ch->r, 1001, "channel expired");
                chan_free(ch);
            }
    }
    if (S.chan_sweep_at < *next) *next = S.chan_sweep_at;
}

/* ==== NATS client ===========================================================================
 * The engine's link to a NATS server (README "Cluster", docs/CLUSTER.md), spoken here in the
 * same poll loop: the client protocol is text lines over TCP (INFO, CONNECT, PING/PONG, SUB,
 * UNSUB, PUB, HPUB, MSG, HMSG, +OK, -ERR). One non-blocking socket (in the epoll set on Linux,
 * its output written in the turn that made it: nats_flush); a parser that returns bytes
 * consumed / need more / error over a bounded input buffer (a control line is at most
 * NATS_MAX_LINE bytes, a payload at most the server's max_payload); reconnect with backoff
 * (250 ms doubling to 5 s) across the URL list, resubscribing; output beyond NATS_OUT_MAX drops
 * the link. What travels: a heartbeat every NATS_HB_MS with the version of this node's
 * snapshot; the snapshot (its functions and workers) when it changes, when a node joins or
 * asks; a goodbye at shutdown; calls with no local provider (to one node's subject, or to the
 * function's queue-group subject), their acknowledgements, answers and cancels. A message over
 * max_payload travels as ordered chunks and is reassembled under max_message_bytes.
 * Invariants: a remote node's rows (and their entries in the (namespace, id) index CL.rkeys)
 * are replaced whole by each snapshot and dropped with the node (goodbye, TTL
 * NATS_NODE_TTL_MS, new instance id); every call sent to another node is answered to its
 * caller exactly once (the answer, an error, or invocation_stopped when the node leaves, the
 * link drops or a queue group's taker never acknowledges), unless the caller left first, in
 * which case the node running it is told to cancel it; every subscription this engine holds
 * is one of sids 1-7 or one CL.fsubs entry per function provided here.
 */
/* unsent output beyond this drops the link (a server that stopped reading) */
#define NATS_OUT_MAX (4 * CL.max_payload + 2 * S.set.max_message_bytes + 65536)
/* bytes held by reassemblies of chunked messages, in all */
#define NATS_CHUNK_MAX (4 * (size_t)S.set.max_message_bytes + 65536)
enum { NOP_INFO = 1, NOP_MSG, NOP_HMSG, NOP_PING, NOP_PONG, NOP_OK, NOP_ERR };
enum { NATS_OFF, NATS_WAIT, NATS_CONNECTING, NATS_HANDSHAKE, NATS_READY };

/* One parsed server operation; pointers into the input buffer, valid until it is consumed. */
struct nats_msg {
    int op;                  /* NOP_* */
    const char *arg;         /* INFO's JSON, -ERR's text */
    size_t argn;
    const char *subj, *reply; /* MSG / HMSG: subject and reply subject (reply may be NULL) */
    size_t subjn, replyn;
    unsigned long sid;
    const unsigned char *hdr, *pl; /* HMSG headers; the payload */
    size_t hdrn, pln;
};

/* Splits line[0..n) on spaces into at most 6 fields. Returns the count. */
static int nats_fields(const char *line, size_t n, const char *f[6], size_t fl[6])
{
    int k = 0;
    for (size_t i = 0; i < n && k < 6;) {
        while (i < n && (line[i] == ' ' || line[i] == '\t')) i++;
        if (i >= n) break;
        f[k] = line + i;
        while (i < n && line[i] != ' ' && line[i] != '\t') i++;
        fl[k] = (size_t)(line + i - f[k]), k++;
    }
    return k;
}

/* A decimal size field, at most max. -1 when it is not one. */
static long nats_num(const char *s, size_t n, size_t max)
{
    size_t v = 0;
    if (!n || n > 12) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (size_t)(s[i] - '0');
    }
    return v > max ? -1 : (long)v;
}

/* The first occurrence of C string nd in h[0..n), or NULL. */
static const char *strstr_n(const char *h, size_t n, const char *nd)
{
    size_t k = strlen(nd);
    for (size_t i = 0; k && i + k <= n; i++)
        if (h[i] == nd[0] && !memcmp(h + i, nd, k)) return h + i;
    return NULL;
}

/* Parses one operation at p[0..n): > 0 bytes consumed (m filled), 0 more bytes needed, -1 a
 * protocol error (an unknown op, a bad field, a line over NATS_MAX_LINE or a payload over
 * max_payload). Never reads past n. */
static int nats_parse(const unsigned char *p, size_t n, size_t max_payload, struct nats_msg *m)
{
    if (!n) return 0; /* (p may be NULL then: an empty buffer) */
    const unsigned char *nl = memchr(p, '\n', n < NATS_MAX_LINE ? n : NATS_MAX_LINE);
    if (!nl) return n >= NATS_MAX_LINE ? -1 : 0;
    size_t ll = (size_t)(nl - p), used = ll + 1;
    if (ll && p[ll - 1] == '\r') ll--;
    const char *line = (const char *)p, *f[6];
    size_t fl[6];
    int k = nats_fields(line, ll, f, fl);
    memset(m, 0, sizeof *m);
    if (!k) return -1;
#define OP_IS(x) (fl[0] == sizeof(x) - 1 && str_ncaseeq(f[0], x, fl[0]))
    if (OP_IS("PING") || OP_IS("PONG") || OP_IS("+OK")) {
        m->op = OP_IS("PING") ? NOP_PING : OP_IS("PONG") ? NOP_PONG : NOP_OK;
        return (int)used;
    }
    if (OP_IS("INFO") || OP_IS("-ERR")) {
        m->op = OP_IS("INFO") ? NOP_INFO : NOP_ERR;
        m->arg = f[0] + fl[0], m->argn = (size_t)(line + ll - m->arg);
        while (m->argn && *m->arg == ' ') m->arg++, m->argn--;
        return (int)used;
    }
    int hm = OP_IS("HMSG");
    if (!OP_IS("MSG") && !hm) return -1;
#undef OP_IS
    /* MSG subject sid [reply] bytes / HMSG subject sid [reply] hdr_bytes total_bytes */
    int base = hm ? 6 : 5; /* fields with a reply subject (one fewer without) */
    if (k != base && k != base - 1) return -1;
    int has_reply = k == base;
    long sid = nats_num(f[2], fl[2], 0xFFFFFFFFu);
    long total = nats_num(f[k - 1], fl[k - 1], max_payload + (hm ? 65536 : 0));
    long hdr = hm ? nats_num(f[k - 2], fl[k - 2], (size_t)(total < 0 ? 0 : total)) : 0;
    if (sid < 0 || total < 0 || hdr < 0) return -1;
    if (n - used < (size_t)total + 2) return 0;
    if (p[used + (size_t)total] != '\r' || p[used + (size_t)total + 1] != '\n') return -1;
    m->op = hm ? NOP_HMSG : NOP_MSG;
    m->subj = f[1], m->subjn = fl[1], m->sid = (unsigned long)sid;
    if (has_reply) m->reply = f[3], m->replyn = fl[3];
    m->hdr = p + used, m->hdrn = (size_t)hdr;
    m->pl = p + used + (size_t)hdr, m->pln = (size_t)(total - hdr);
    return (int)(used + (size_t)total + 2);
}

struct cnode;

/* The nodes that provide one (namespace, id): the index a call with no local provider is
 * routed by (CL.rkeys, keyed "ns\0id"), so a miss costs one lookup, not a scan of every
 * remote row. nodes[] holds one entry per remote row (a node with two providers is there
 * twice), in the order the rows arrived. */
struct rkey {
    struct hnode h;
    struct cnode **nodes;
    size_t n, cap;
    size_t rr;             /* round-robin cursor of node-addressed calls with providers: many */
    char key[];
};

/* A function another node announced, as listings need it (no parsing per listing). */
struct rfn {
    char *id, *ns, *wname; /* function_id, namespace, worker_name */
    char *row;             /* its FunctionSummary with "node" first: listed as is */
    struct rkey *k;        /* its index entry (NULL when the index could not hold it) */
};

/* A worker connected to another node, as engine::workers::list shows it. */
struct rwk {
    char *id, *name, *runtime; /* for the listing's filters and the connect/disconnect events */
    char *row;                 /* its WorkerInfo with "node" first */
};

/* A trigger type another node's workers provide, as engine::triggers::list shows it. */
struct rtt {
    char *id, *wname; /* for the listing's filters */
    char *row;        /* its TriggerTypeSummary with "node" first */
};

/* A node heard from over the cluster: its name, its engine instance, when it was last heard
 * (the TTL) and the functions, workers and trigger types of its last snapshot (workers sorted by id, so two
 * snapshots are compared in one merge pass). */
struct cnode {
    struct hnode h;      /* CL.nodes, keyed by name */
    char *name;
    int64_t seen;        /* monotonic ms of its last heartbeat or snapshot */
    char iid[24];        /* its instance id: a restarted engine under the same name has a new one */
    uint64_t v;          /* version of the snapshot held (0: none yet) */
    int64_t asked;       /* when a resync was last asked of it */
    struct rfn *fns;
    size_t nfns;
    struct rwk *wks;
    size_t nwks;
    struct rtt *tts;
    size_t ntts;
};

/* A call this engine sent to another node, waiting for its answer. */
struct rcall {
    struct hnode h; /* CL.rcalls, keyed by rid */
    char rid[37];   /* the id it travels under: fresh, so ids from many callers never collide */
    char cid[37];   /* the caller's own invocation id */
    struct conn *caller;          /* the caller: its teardown ends the call first */
    struct rcall *cprev, *cnext;  /* caller->rcalls */
    char *node;     /* the node it went to (NULL: sent to a queue group, not yet acknowledged) */
    char *fid;      /* raw JSON string of the function id, for an error answer */
    int64_t sent;   /* when it was sent (an unacknowledged one is stopped after the TTL) */
};

/* A large message arriving in chunks (HMSG with an Iii-Chunk header), keyed by its id. */
struct chunks {
    struct hnode h; /* CL.chunks */
    struct buf b;
    uint32_t next, count;
    int64_t t0;
    char key[37];
};

/* A subscription to a function's queue-group subject (CL.fsubs, keyed by the subject). */
struct fsub {
    struct hnode h;
    unsigned long sid;
    uint64_t gen; /* the sync pass that last saw its function here */
    char subj[];
};

/* A call from another node running here: where its answer goes. */
struct rin {
    struct hnode h; /* CL.rins, keyed by rid */
    struct rin *prev, *next; /* CL.rin_list: all of them, for the count and the final free */
    char rid[37];
    char reply[];   /* the reply subject */
};

static struct {
    int state, fd;
    unsigned ep_ev;               /* the socket's interest in the epoll set now (0: not in it) */
    int ep_bad;                   /* epoll_ctl failed for this socket: poll() watches it */
    struct buf in, out;
    size_t url;                   /* index in the config's urls of the one tried now */
    int64_t next_try, backoff, next_hb, ready_at;
    size_t max_payload;           /* from the server's INFO */
    uint64_t connects;            /* successful connections (the first and reconnects) */
    char node[160];               /* this engine's node name */
    char tok[160];                /* node as a subject token ([A-Za-z0-9_-], others '_') */
    char iid[24];                 /* this engine instance (random, hex) */
    struct hmap nodes;            /* other engines heard from (struct cnode) */
    uint64_t v;                   /* version of the local snapshot (bumped when the set changes) */
    uint64_t fp_pub;              /* the function-set fingerprint v was taken from */
    uint64_t wk_pub;              /* ... and the worker-set version (S.reg_ver) */
    int64_t sweep_at;             /* next sweep of unacknowledged calls and stale chunks */
    size_t n_pub;
    int snap_due;                 /* publish the snapshot (changed, a node joined or asked) */
    int64_t snap_at;              /* not before: snapshots are paced NATS_SNAP_GAP_MS apart */
    int64_t dup_logged;           /* last "duplicate node name" error */
    struct hmap rcalls;           /* calls sent to other nodes (struct rcall) */
    struct hmap rins;             /* calls from other nodes in flight here (struct rin) */
    struct rin *rin_list;
    struct conn *vc;              /* their caller here (CK_CLUSTER), made on first use */
    struct hmap rkeys;            /* (namespace, id) -> the nodes that provide it (struct rkey) */
    struct hmap chunks;           /* large messages being reassembled (struct chunks) */
    size_t chunk_bytes;           /* bytes they hold, bounded by NATS_CHUNK_MAX */
    struct hmap fsubs;            /* queue-group subscriptions of local functions (struct fsub) */
    unsigned long next_sid;       /* the next sid for an fsub (fixed ones are 1-7) */
    uint64_t fsub_gen;
    size_t n_unacked;             /* rcalls sent to a queue group and not yet acknowledged */
} CL;                             /* CL.fd is set to -1 in main, before the loop */

static void rt_send_result(struct conn *c, const char *id, size_t idlen, const char *fid,
                           size_t fidlen, const unsigned char *res, size_t rlen,
                           const unsigned char *err, size_t elen, const char *ctx, size_t ctxlen);
static void cnode_wk_events(const struct cnode *cn, const struct rwk *w, size_t n);
static void cl_fsubs_clear(void);
static void cl_chunks_clear(int64_t before);

/* Ends remote call rc: err (an ErrorBody) to its caller when non-NULL, then frees it. */
static void rcall_end(struct rcall *rc, const char *err)
{
    struct conn *c = rc->caller;
    if (rc->cprev) rc->cprev->cnext = rc->cnext;
    else if (c) c->rcalls = rc->cnext; /* (c is never NULL once the call is in CL.rcalls) */
    if (rc->cnext) rc->cnext->cprev = rc->cprev;
    if (err && c && conn_open(c))
        rt_send_result(c, rc->cid, 36, rc->fid, strlen(rc->fid), NULL, 0,
                       (const unsigned char *)err, strlen(err), "", 0);
    if (!rc->node) CL.n_unacked--;
    hm_del(&CL.rcalls, &rc->h);
    xfree(rc->node), xfree(rc->fid), xfree(rc);
}

static const char ERR_RSTOPPED[] =
    "{\"code\":\"invocation_stopped\",\"message\":\"Invocation stopped: the engine that ran it "
    "left the cluster or the cluster link was lost\"}";

/* Ends with invocation_stopped every remote call to node (every one when NULL; with
 * unacked, also those sent to a queue group and not acknowledged for NATS_NODE_TTL_MS): the
 * node went away, or the link to NATS did, so their answers can no longer arrive. */
static void rcall_stop_all(const char *node, int unacked)
{
    int64_t old = now_ms() - NATS_NODE_TTL_MS;
    for (size_t i = 0; i < CL.rcalls.nb; i++)
        for (struct hnode *x = CL.rcalls.b[i], *nx; x; x = nx) {
            nx = x->next;
            struct rcall *rc = (struct rcall *)x;
            int hit = !node && !unacked ? 1
                      : rc->node        ? node && !strcmp(rc->node, node)
                                        : unacked && rc->sent <= old;
            if (hit) rcall_end(rc, ERR_RSTOPPED);
        }
}

/* Adds node cn as a provider of r's (namespace, id) in the index (best effort: a row the
 * index cannot hold is listed but not routed to). */
static void rkey_add(struct rfn *r, struct cnode *cn)
{
    size_t nl = strlen(r->ns), il = strlen(r->id);
    char kb[2 * III_MAX_ID + 2];
    if (nl + il + 1 > sizeof kb) return;
    memcpy(kb, r->ns, nl), kb[nl] = 0, memcpy(kb + nl + 1, r->id, il);
    struct rkey *k = (struct rkey *)hm_get(&CL.rkeys, kb, nl + 1 + il);
    if (!k) { /* a new entry, with room for two nodes, enters the map only when complete */
        struct cnode **v = xmalloc(2 * sizeof *v);
        if (!v || !(k = xcalloc(sizeof *k + nl + 1 + il))) {
            xfree(v);
            return;
        }
        memcpy(k->key, kb, nl + 1 + il);
        k->nodes = v, k->cap = 2;
        if (hm_put(&CL.rkeys, &k->h, k->key, nl + 1 + il) < 0) {
            xfree(v), xfree(k);
            return;
        }
    } else if (k->n == k->cap) {
        struct cnode **v = xrealloc(k->nodes, 2 * k->cap * sizeof *v);
        if (!v) return;
        k->nodes = v, k->cap *= 2;
    }
    k->nodes[k->n++] = cn, r->k = k;
}

/* Removes one entry of cn from r's index entry (the entry goes with its last node). */
static void rkey_del(struct rfn *r, const struct cnode *cn)
{
    struct rkey *k = r->k;
    if (!k) return;
    for (size_t i = 0; i < k->n; i++)
        if (k->nodes[i] == cn) {
            memmove(k->nodes + i, k->nodes + i + 1, (k->n - i - 1) * sizeof *k->nodes);
            k->n--;
            break;
        }
    if (!k->n) hm_del(&CL.rkeys, &k->h), xfree(k->nodes), xfree(k);
    r->k = NULL;
}

/* Frees what node cn holds of its registry; the remote view changed if it held anything. */
static void cnode_clear(struct cnode *cn)
{
    for (size_t i = 0; i < cn->nfns; i++) {
        struct rfn *r = &cn->fns[i];
        rkey_del(r, cn);
        xfree(r->id), xfree(r->ns), xfree(r->wname), xfree(r->row);
    }
    if (cn->nfns) S.cl_rver++;
    S.cl_nrfn -= cn->nfns;
    for (size_t i = 0; i < cn->ntts; i++)
        xfree(cn->tts[i].id), xfree(cn->tts[i].wname), xfree(cn->tts[i].row);
    xfree(cn->tts), cn->tts = NULL, cn->ntts = 0;
    xfree(cn->fns), cn->fns = NULL, cn->nfns = 0, cn->v = 0;
    for (size_t i = 0; i < cn->nwks; i++) {
        struct rwk *w = &cn->wks[i];
        xfree(w->id), xfree(w->name), xfree(w->runtime), xfree(w->row);
    }
    xfree(cn->wks), cn->wks = NULL, cn->nwks = 0;
}

/* Forgets node cn (it left cleanly, or its TTL ran out). */
static void cnode_drop(struct cnode *cn, const char *why)
{
    LOG(LOG_INFO, "cluster: node %s left (%s)", cn->name, why);
    rcall_stop_all(cn->name, 0);
    cnode_wk_events(cn, NULL, 0);
    cnode_clear(cn);
    hm_del(&CL.nodes, &cn->h);
    xfree(cn->name), xfree(cn);
}

static int ep_nats(short pev);

/* Closes the socket, out of the epoll set first (ep_nats), so that its entry can never be taken
 * for a later descriptor with the same number. */
static void nats_close(void)
{
    if (CL.fd < 0) return;
    ep_nats(0);
    close(CL.fd), CL.fd = -1, CL.ep_bad = 0;
}

/* Drops the connection: the next attempt, on the next URL, after the backoff. */
static void nats_drop(const char *why)
{
    nats_close();
    if (CL.state == NATS_READY || CL.state == NATS_HANDSHAKE)
        LOG(LOG_WARN, "cluster: connection to %s lost: %s; reconnecting",
            S.cfg.cluster.urls[CL.url], why);
    buf_free(&CL.in), buf_free(&CL.out);
    CL.state = NATS_WAIT;
    rcall_stop_all(NULL, 0);
    cl_fsubs_clear(), cl_chunks_clear(INT64_MAX);
    CL.url = (CL.url + 1) % S.cfg.cluster.nurls;
    CL.next_try = now_ms() + CL.backoff;
    CL.backoff = CL.backoff * 2 > 5000 ? 5000 : CL.backoff * 2;
}

/* Opens a non-blocking connection to the current URL (nats://host:port). */
static void nats_connect(void)
{
    const char *u = S.cfg.cluster.urls[CL.url] + 7, *colon = strrchr(u, ':');
    char host[256], port[16] = "4222";
    size_t hl = colon && !strchr(colon, ']') ? (size_t)(colon - u) : strlen(u);
    if (colon && !strchr(colon, ']')) snprintf(port, sizeof port, "%s", colon + 1);
    if (u[0] == '[' && hl >= 2) u++, hl -= 2;
    snprintf(host, sizeof host, "%.*s", (int)hl, u);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) || !res) {
        nats_drop("cannot resolve the server's address");
        return;
    }
    CL.fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (CL.fd < 0 || net_flags(CL.fd) < 0 ||
        (connect(CL.fd, res->ai_addr, res->ai_addrlen) < 0 && errno != EINPROGRESS)) {
        freeaddrinfo(res);
        nats_drop(strerror(errno));
        return;
    }
    freeaddrinfo(res);
    int one = 1;
    setsockopt(CL.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    CL.state = NATS_CONNECTING;
}

/* The server's INFO: its max_payload, then our CONNECT (credentials from the config) and a
 * PING, whose PONG says the CONNECT was accepted. */
static void nats_on_info(const struct nats_msg *m)
{
    struct jdoc d = {0};
    int64_t mp = 0;
    d.max = 4096;
    if (json_parse(&d, (const unsigned char *)m->arg, m->argn, 2, 1) == 0 &&
        json_int(&d, json_get(&d, 0, "max_payload"), &mp) == 0 && mp > 0)
        CL.max_payload = (size_t)mp;
    xfree(d.t);
    const struct cfg_cluster *cc = &S.cfg.cluster;
    buf_puts(&CL.out, "CONNECT {\"verbose\":false,\"pedantic\":false,\"lang\":\"c\",\"version\":\""
                      III_VERSION "\",\"protocol\":1,\"headers\":true,\"no_responders\":true,"
                      "\"name\":");
    json_put_cstr(&CL.out, CL.node);
    if (cc->user) buf_puts(&CL.out, ",\"user\":"), json_put_cstr(&CL.out, cc->user);
    if (cc->pass) buf_puts(&CL.out, ",\"pass\":"), json_put_cstr(&CL.out, cc->pass);
    if (cc->token) buf_puts(&CL.out, ",\"auth_token\":"), json_put_cstr(&CL.out, cc->token);
    buf_puts(&CL.out, "}\r\nPING\r\n");
}

#define CL_PREFIX (S.cfg.cluster.prefix ? S.cfg.cluster.prefix : "iii")

/* Queues PUB subj payload; a backlog beyond NATS_OUT_MAX (a server that stopped reading)
 * drops the link rather than growing without bound. */
static void nats_pub(const char *subj, const char *pl, size_t n)
{
    if (CL.state != NATS_READY) return;
    buf_printf(&CL.out, "PUB %s %zu\r\n", subj, n);
    buf_append(&CL.out, pl, n);
    buf_puts(&CL.out, "\r\n");
    if (buf_check(&CL.out) || buf_used(&CL.out) > NATS_OUT_MAX) nats_drop("output backlog");
}

/* Publishes pl[0..n) on subj (which may end in " REPLY"): one PUB when it fits the server's
 * max_payload, else in order as chunks, each an HPUB with the header "Iii-Chunk: KEY SEQ
 * COUNT" (key: 36 characters, unique per message). NATS keeps the order of one publisher's
 * messages on one subject, so the receiver appends them as they come. */
static void nats_pub_big(const char *subj, const char *key, const char *pl, size_t n)
{
    if (n <= CL.max_payload) {
        nats_pub(subj, pl, n);
        return;
    }
    size_t cut = CL.max_payload > 1024 ? CL.max_payload - 128 : 896, cnt = (n + cut - 1) / cut;
    for (size_t i = 0; i < cnt && CL.state == NATS_READY; i++) {
        size_t len = i + 1 < cnt ? cut : n - i * cut;
        char h[128];
        int hl = snprintf(h, sizeof h, "NATS/1.0\r\nIii-Chunk: %.36s %zu %zu\r\n\r\n", key, i, cnt);
        buf_printf(&CL.out, "HPUB %s %d %zu\r\n", subj, hl, (size_t)hl + len);
        buf_append(&CL.out, h, (size_t)hl);
        buf_append(&CL.out, pl + i * cut, len);
        buf_puts(&CL.out, "\r\n");
        if (buf_check(&CL.out) || buf_used(&CL.out) > NATS_OUT_MAX) nats_drop("output backlog");
    }
}

static void chunks_free(struct chunks *ch)
{
    CL.chunk_bytes -= buf_used(&ch->b);
    hm_del(&CL.chunks, &ch->h);
    buf_free(&ch->b), xfree(ch);
}

/* Drops the reassemblies started before `before` (every one: INT64_MAX), which can no longer
 * complete (the link dropped, or the sender stopped midway). */
static void cl_chunks_clear(int64_t before)
{
    for (size_t i = 0; i < CL.chunks.nb; i++)
        for (struct hnode *e = CL.chunks.b[i], *nx; e; e = nx) {
            nx = e->next;
            if (((struct chunks *)e)->t0 < before) chunks_free((struct chunks *)e);
        }
    if (!CL.chunks.n) hm_free(&CL.chunks);
}

static const char ERR_RTOOBIG[] =
    "{\"code\":\"invocation_failed\",\"message\":\"The call or its answer is larger than the "
    "receiving engine accepts (max_message_bytes), or the engine had no room to reassemble it\"}";
static void cl_on_reply(const struct nats_msg *m);

/* A chunked message that cannot be reassembled still gets its call answered: an answer is
 * ended here with an error; a call is answered {"err":..} on its reply subject, which its
 * caller's engine turns into the same error. */
static void cl_chunk_failed(const struct nats_msg *m)
{
    static const char e[] = "{\"err\":1}";
    if (m->sid == 6) {
        struct nats_msg x = *m;
        x.op = NOP_MSG, x.hdrn = 0, x.pl = (const unsigned char *)e, x.pln = sizeof e - 1;
        cl_on_reply(&x);
    } else if (m->reply && m->replyn < 512) {
        char rs[512];
        memcpy(rs, m->reply, m->replyn), rs[m->replyn] = 0;
        nats_pub(rs, e, sizeof e - 1);
    }
}

/* A chunk (HMSG with an Iii-Chunk header) appended to its message. Returns the reassembly
 * when m was its last chunk (the caller handles it, then frees it with chunks_free), else
 * NULL. A chunk out of order, a message over max_message_bytes, more than NATS_MAX_CHUNKED
 * reassemblies or NATS_CHUNK_MAX bytes in all: the reassembly is dropped, with a warning. */
static struct chunks *cl_chunk(const struct nats_msg *m)
{
    const char *h = strstr_n((const char *)m->hdr, m->hdrn, "Iii-Chunk: ");
    const char *end = (const char *)m->hdr + m->hdrn;
    unsigned long seq = 0, cnt = 0;
    if (!h || end - h < 11 + 36 + 4) return NULL;
    const char *key = h + 11, *q = key + 36;
    if (*q++ != ' ') return NULL;
    while (q < end && *q >= '0' && *q <= '9' && seq < 1ul << 24) seq = seq * 10 + (unsigned long)(*q++ - '0');
    if (q >= end || *q++ != ' ') return NULL;
    while (q < end && *q >= '0' && *q <= '9' && cnt < 1ul << 24) cnt = cnt * 10 + (unsigned long)(*q++ - '0');
    struct chunks *ch = (struct chunks *)hm_get(&CL.chunks, key, 36);
    const char *why = NULL;
    int tail = !ch && seq; /* the rest of a message already dropped (or noise): said once */
    if (!ch) {
        if (seq || cnt < 2 || cnt >= 1ul << 24) why = "a chunk that starts no message";
        else if (CL.chunks.n >= NATS_MAX_CHUNKED) why = "too many large messages at once";
        else if (!(ch = xcalloc(sizeof *ch))) why = "out of memory";
        else {
            memcpy(ch->key, key, 36), ch->count = (uint32_t)cnt, ch->t0 = now_ms();
            if (hm_put(&CL.chunks, &ch->h, ch->key, 36) < 0) xfree(ch), ch = NULL, why = "out of memory";
        }
    } else if (seq != ch->next || cnt != ch->count) {
        why = "a chunk out of order";
    }
    if (!why && (buf_used(&ch->b) + m->pln > S.set.max_message_bytes + 65536 ||
                 CL.chunk_bytes + m->pln > NATS_CHUNK_MAX))
        why = "a message larger than max_message_bytes, or too many bytes in reassembly";
    if (!why && (buf_append(&ch->b, m->pl, m->pln), buf_check(&ch->b))) why = "out of memory";
    if (why) {
        if (ch) chunks_free(ch);
        if (tail) return NULL;
        LOG(LOG_WARN, "cluster: chunked message on %.*s dropped: %s", (int)m->subjn, m->subj, why);
        cl_chunk_failed(m);
        return NULL;
    }
    CL.chunk_bytes += m->pln;
    return ++ch->next == ch->count ? ch : NULL;
}

/* The subject of function id in namespace ns: PREFIX.fn.NS.ID with each byte outside
 * [A-Za-z0-9_-] written as %XX; when that is longer than NATS_MAX_SUBJECT, PREFIX.fnh.HASH. */
static void cl_fn_subject(const char *ns, size_t nl, const char *id, size_t il, char *out)
{
    static const char hx[] = "0123456789ABCDEF";
    size_t k = (size_t)snprintf(out, NATS_MAX_SUBJECT, "%s.fn.", CL_PREFIX);
    for (size_t part = 0; part < 2; part++) {
        const unsigned char *p = (const unsigned char *)(part ? id : ns);
        for (size_t i = 0, n = part ? il : nl; i < n && k + 4 < NATS_MAX_SUBJECT; i++) {
            if (isalnum(p[i]) || p[i] == '_' || p[i] == '-') out[k++] = (char)p[i];
            else out[k++] = '%', out[k++] = hx[p[i] >> 4], out[k++] = hx[p[i] & 15];
        }
        if (!part && k + 1 < NATS_MAX_SUBJECT) out[k++] = '.';
    }
    if (k + 4 >= NATS_MAX_SUBJECT) { /* too long to spell out: FNV-1a of "ns\0id" */
        uint64_t hsh = 1469598103934665603ull;
        for (size_t i = 0; i < nl + 1 + il; i++) {
            unsigned char ch = i < nl ? (unsigned char)ns[i] : i == nl ? 0 : (unsigned char)id[i - nl - 1];
            hsh = (hsh ^ ch) * 1099511628211ull;
        }
        snprintf(out, NATS_MAX_SUBJECT, "%s.fnh.%016llx", CL_PREFIX, (unsigned long long)hsh);
        return;
    }
    out[k] = 0;
}

/* Keeps one queue-group subscription per function provided here (so that engines sharing a
 * function share calls sent to its subject, NATS picking one member per call): subscribes
 * the new ones and unsubscribes the gone ones, in one pass over the registry. */
static void cl_fsubs_sync(void)
{
    char subj[NATS_MAX_SUBJECT];
    uint64_t gen = ++CL.fsub_gen;
    for (size_t i = 0; i < S.funcs.nb; i++)
        for (struct hnode *e = S.funcs.b[i]; e; e = e->next) {
            const struct func *f = (const struct func *)e;
            if (!f->owner) continue;
            cl_fn_subject(f->ns, strlen(f->ns), f->id, strlen(f->id), subj);
            size_t sl = strlen(subj);
            struct fsub *fs = (struct fsub *)hm_get(&CL.fsubs, subj, sl);
            if (!fs) {
                if (!(fs = xcalloc(sizeof *fs + sl + 1))) continue;
                memcpy(fs->subj, subj, sl);
                if (hm_put(&CL.fsubs, &fs->h, fs->subj, sl) < 0) {
                    xfree(fs);
                    continue;
                }
                fs->sid = CL.next_sid++;
                buf_printf(&CL.out, "SUB %s %s.q %lu\r\n", fs->subj, CL_PREFIX, fs->sid);
            }
            fs->gen = gen;
        }
    for (size_t i = 0; i < CL.fsubs.nb; i++)
        for (struct hnode *e = CL.fsubs.b[i], *nx; e; e = nx) {
            nx = e->next;
            struct fsub *fs = (struct fsub *)e;
            if (fs->gen == gen) continue;
            buf_printf(&CL.out, "UNSUB %lu\r\n", fs->sid);
            hm_del(&CL.fsubs, e), xfree(fs);
        }
    if (buf_check(&CL.out)) nats_drop("out of memory");
}

/* Forgets every subscription record (the link dropped: the server forgot them too). */
static void cl_fsubs_clear(void)
{
    for (size_t i = 0; i < CL.fsubs.nb; i++)
        for (struct hnode *e = CL.fsubs.b[i], *nx; e; e = nx) nx = e->next, xfree(e);
    hm_free(&CL.fsubs);
    CL.next_sid = 100;
}

/* Ready (the CONNECT's PONG): subscribe to the other nodes' heartbeats, snapshots and
 * goodbyes and to resync requests addressed to this node; the snapshot goes out next tick. */
static void nats_on_ready(void)
{
    CL.state = NATS_READY, CL.backoff = 250, CL.connects++;
    CL.ready_at = now_ms(), CL.next_hb = 0, CL.snap_due = 1;
    LOG(LOG_INFO, "cluster: node %s connected to %s (max_payload %zu)", CL.node,
        S.cfg.cluster.urls[CL.url], CL.max_payload);
    buf_printf(&CL.out, "SUB %s.node.*.hb 1\r\nSUB %s.node.*.snap 2\r\nSUB %s.node.*.bye 3\r\n"
                        "SUB %s.node.%s.sync 4\r\nSUB %s.call.%s 5\r\nSUB %s.reply.%s.* 6\r\n"
                        "SUB %s.node.%s.cancel 7\r\n",
               CL_PREFIX, CL_PREFIX, CL_PREFIX, CL_PREFIX, CL.tok, CL_PREFIX, CL.tok, CL_PREFIX, CL.tok,
               CL_PREFIX, CL.tok);
}

/* The subject token for a node name: [A-Za-z0-9_-] kept, anything else '_' (NATS subjects
 * split on '.', and '*' / '>' / spaces are not token characters). */
static void nats_token(const char *name, char *out, size_t cap)
{
    size_t i = 0;
    for (; name[i] && i + 1 < cap; i++) {
        unsigned char ch = (unsigned char)name[i];
        out[i] = (char)(isalnum(ch) || ch == '_' || ch == '-' ? ch : '_');
    }
    out[i] = 0;
}

/* The node a heartbeat or snapshot is from, found or added; NULL for this
 * node itself (a second engine under the same name is logged as an error) or when full. */
static struct cnode *nats_node_of(const char *name, const char *iid)
{
    size_t nn = strlen(name);
    if (!strcmp(name, CL.node)) {
        if (strcmp(iid, CL.iid) && now_ms() - CL.dup_logged >= 10000) {
            CL.dup_logged = now_ms();
            LOG(LOG_ERROR, "cluster: another engine also calls itself node %s: its registry is "
                "ignored here (give every engine its own cluster.node)", CL.node);
        }
        return NULL;
    }
    struct cnode *cn = (struct cnode *)hm_get(&CL.nodes, name, nn);
    if (!cn) {
        if (CL.nodes.n >= NATS_MAX_NODES || !(cn = xcalloc(sizeof *cn))) return NULL;
        if (!(cn->name = xstrndup(name, nn)) || hm_put(&CL.nodes, &cn->h, cn->name, nn) < 0) {
            xfree(cn->name), xfree(cn);
            return NULL;
        }
        LOG(LOG_INFO, "cluster: node %s joined", cn->name);
        CL.snap_due = 1; /* so that it learns this node's registry at once */
    }
    if (strcmp(cn->iid, iid)) { /* new instance: what the old one had is gone */
        if (cn->iid[0]) rcall_stop_all(cn->name, 0);
        cnode_wk_events(cn, NULL, 0);
        cnode_clear(cn);
        snprintf(cn->iid, sizeof cn->iid, "%s", iid);
    }
    cn->seen = now_ms();
    return cn;
}

/* {"node","iid","v"} of a cluster message (name and iid copied into the caller's arrays);
 * -1 when the message is not one. */
static int nats_head(struct jdoc *d, char name[160], char iid[24], uint64_t *v)
{
    char *n = json_strdup(d, json_get(d, 0, "node"), NULL);
    char *i = json_strdup(d, json_get(d, 0, "iid"), NULL);
    int64_t vv = 0;
    int ok = n && i && *n && strlen(n) < 160 && strlen(i) < 24 &&
             json_int(d, json_get(d, 0, "v"), &vv) == 0 && vv >= 0;
    if (ok) strcpy(name, n), strcpy(iid, i), *v = (uint64_t)vv;
    xfree(n), xfree(i);
    return ok ? 0 : -1;
}

/* A heartbeat: the node's TTL starts again; a version other than the snapshot held asks the
 * node (once per heartbeat period) to publish its snapshot again (one was lost or is late). */
static void nats_on_hb(const struct nats_msg *m)
{
    struct jdoc d = {0};
    char name[160], iid[24], subj[256];
    uint64_t v = 0;
    d.max = 64;
    if (json_parse(&d, m->pl, m->pln, 2, 1) == 0 && nats_head(&d, name, iid, &v) == 0) {
        struct cnode *cn = nats_node_of(name, iid);
        if (cn && cn->v != v && now_ms() - cn->asked >= NATS_HB_MS) {
            char tok[160];
            nats_token(cn->name, tok, sizeof tok);
            snprintf(subj, sizeof subj, "%s.node.%s.sync", CL_PREFIX, tok);
            cn->asked = now_ms();
            nats_pub(subj, "{}", 2);
        }
    }
    xfree(d.t);
}

/* Row e of a snapshot (an object) as this engine lists it: {"node":NODE, then the row's own
 * members}. A malloc'd C string, or NULL when e is no non-empty object or on OOM. */
static char *nats_row(struct jdoc *d, int e, const char *node)
{
    if (JTYPE(d, e) != J_OBJECT || d->t[e].opaque || JLEN(d, e) < 3) return NULL;
    struct buf b = {0};
    buf_puts(&b, "{\"node\":");
    json_put_cstr(&b, node);
    buf_putc(&b, ','); /* the row has a member, so a ',' joins the rest of it */
    buf_append(&b, JRAW(d, e) + 1, JLEN(d, e) - 1);
    buf_putc(&b, 0);
    if (buf_check(&b)) {
        buf_free(&b);
        return NULL;
    }
    return (char *)buf_data(&b);
}

/* One row of a snapshot's functions array into r (its fields and the row with "node" first). */
static int nats_rfn(struct jdoc *d, int e, const char *node, struct rfn *r)
{
    if (JTYPE(d, e) != J_OBJECT || d->t[e].opaque || JLEN(d, e) < 2) return -1;
    memset(r, 0, sizeof *r);
    r->id = json_strdup(d, json_get(d, e, "function_id"), NULL);
    r->ns = json_strdup(d, json_get(d, e, "namespace"), NULL);
    r->wname = json_strdup(d, json_get(d, e, "worker_name"), NULL);
    if (r->id && !r->ns) r->ns = xstrdup("default");
    if (r->id && r->ns && !r->wname) r->wname = xstrdup("");
    r->row = nats_row(d, e, node);
    if (!r->id || !r->ns || !r->wname || !id_ok(r->id, strlen(r->id)) || !r->row) {
        xfree(r->id), xfree(r->ns), xfree(r->wname), xfree(r->row);
        return -1;
    }
    return 0;
}

/* One row of a snapshot's workers array into w (its id, name and runtime; the row with
 * "node" first). */
static int nats_rwk(struct jdoc *d, int e, const char *node, struct rwk *w)
{
    if (JTYPE(d, e) != J_OBJECT || d->t[e].opaque || JLEN(d, e) < 2) return -1;
    memset(w, 0, sizeof *w);
    w->id = json_strdup(d, json_get(d, e, "id"), NULL);
    w->name = json_strdup(d, json_get(d, e, "name"), NULL);
    w->runtime = json_strdup(d, json_get(d, e, "runtime"), NULL);
    w->row = nats_row(d, e, node);
    if (!w->id || !*w->id || strlen(w->id) > III_MAX_ID || !w->row) {
        xfree(w->id), xfree(w->name), xfree(w->runtime), xfree(w->row);
        return -1;
    }
    return 0;
}

/* One row of a snapshot's trigger_types array into t (its id and worker_name; the row with
 * "node" first). */
static int nats_rtt(struct jdoc *d, int e, const char *node, struct rtt *t)
{
    if (JTYPE(d, e) != J_OBJECT || d->t[e].opaque || JLEN(d, e) < 2) return -1;
    memset(t, 0, sizeof *t);
    t->id = json_strdup(d, json_get(d, e, "id"), NULL);
    t->wname = json_strdup(d, json_get(d, e, "worker_name"), NULL);
    t->row = nats_row(d, e, node);
    if (!t->id || !id_ok(t->id, strlen(t->id)) || !t->row) {
        xfree(t->id), xfree(t->wname), xfree(t->row);
        return -1;
    }
    return 0;
}

static int rwk_cmp(const void *a, const void *b)
{
    return strcmp(((const struct rwk *)a)->id, ((const struct rwk *)b)->id);
}

/* engine::workers-available for what differs between node cn's workers and the sorted set
 * w[0..n): one merge pass over the two id-sorted arrays. */
static void cnode_wk_events(const struct cnode *cn, const struct rwk *w, size_t n)
{
    size_t i = 0, j = 0;
    while (i < cn->nwks || j < n) {
        int c = i == cn->nwks ? 1 : j == n ? -1 : strcmp(cn->wks[i].id, w[j].id);
        if (c < 0) ev_worker_remote("worker_disconnected", cn->wks[i++].id, cn->name);
        else if (c > 0) ev_worker_remote("worker_connected", w[j++].id, cn->name);
        else i++, j++;
    }
}

/* The rows of array member `key` of snapshot d, each parsed by one(); *out gets the rows that
 * parsed (n of them), *bad the count of those that did not. -1 on OOM or no such array. */
static int nats_snap_rows(struct jdoc *d, const char *key, const char *node, size_t sz,
                          int (*one)(struct jdoc *, int, const char *, void *), void **out,
                          size_t *n, size_t *bad)
{
    int arr = json_get(d, 0, key);
    *out = NULL, *n = 0, *bad = 0;
    if (JABSENT(d, arr)) return 0; /* a node of an older version: no such rows */
    if (JTYPE(d, arr) != J_ARRAY || d->t[arr].opaque) return -1;
    size_t cnt = d->t[arr].n;
    char *v = cnt ? xcalloc(cnt * sz) : NULL;
    if (cnt && !v) return -1;
    for (uint32_t j = 0, e = (uint32_t)arr + 1; j < cnt; j++, e = d->t[e].next)
        if (one(d, (int)e, node, v + *n * sz) == 0) ++*n;
        else ++*bad;
    *out = v;
    return 0;
}

static int nats_rfn_v(struct jdoc *d, int e, const char *node, void *r)
{
    return nats_rfn(d, e, node, (struct rfn *)r);
}

static int nats_rwk_v(struct jdoc *d, int e, const char *node, void *w)
{
    return nats_rwk(d, e, node, (struct rwk *)w);
}

static int nats_rtt_v(struct jdoc *d, int e, const char *node, void *t)
{
    return nats_rtt(d, e, node, (struct rtt *)t);
}

/* A snapshot: the node's functions and workers replace what was held of it (the index is
 * rebuilt for its rows, and workers that came or went are announced). */
static void nats_on_snap(const struct nats_msg *m)
{
    struct jdoc d = {0};
    char name[160], iid[24];
    uint64_t v = 0;
    void *fv = NULL, *wv = NULL, *tv = NULL;
    size_t nf = 0, nw = 0, nt = 0, bf = 0, bw = 0, bt = 0;
    d.max = m->pln / 2 + 64;
    if (json_parse(&d, m->pl, m->pln, 4, 1) < 0 || nats_head(&d, name, iid, &v) < 0) goto out;
    struct cnode *cn = nats_node_of(name, iid);
    if (!cn || JABSENT(&d, json_get(&d, 0, "functions")) ||
        nats_snap_rows(&d, "functions", cn->name, sizeof(struct rfn), nats_rfn_v, &fv, &nf, &bf) < 0 ||
        nats_snap_rows(&d, "workers", cn->name, sizeof(struct rwk), nats_rwk_v, &wv, &nw, &bw) < 0 ||
        nats_snap_rows(&d, "trigger_types", cn->name, sizeof(struct rtt), nats_rtt_v, &tv, &nt,
                       &bt) < 0)
        goto out;
    struct rfn *fns = fv;
    struct rwk *wks = wv;
    if (nw) qsort(wks, nw, sizeof *wks, rwk_cmp);
    cnode_wk_events(cn, wks, nw);
    cnode_clear(cn);
    cn->fns = fns, cn->nfns = nf, cn->wks = wks, cn->nwks = nw, cn->v = v;
    cn->tts = tv, cn->ntts = nt;
    fv = wv = tv = NULL;
    for (size_t i = 0; i < nf; i++) rkey_add(&fns[i], cn);
    S.cl_nrfn += nf, S.cl_rver++;
    if (bf || bw || bt)
        LOG(LOG_WARN, "cluster: node %s: %zu malformed rows of its snapshot ignored", cn->name,
            bf + bw + bt);
out:
    if (fv) {
        struct rfn *f = fv;
        for (size_t i = 0; i < nf; i++) xfree(f[i].id), xfree(f[i].ns), xfree(f[i].wname), xfree(f[i].row);
    }
    if (wv) {
        struct rwk *w = wv;
        for (size_t i = 0; i < nw; i++) xfree(w[i].id), xfree(w[i].name), xfree(w[i].runtime), xfree(w[i].row);
    }
    if (tv) {
        struct rtt *t = tv;
        for (size_t i = 0; i < nt; i++) xfree(t[i].id), xfree(t[i].wname), xfree(t[i].row);
    }
    xfree(fv), xfree(wv), xfree(tv), xfree(d.t);
}

/* A goodbye: the node shut down cleanly, so it leaves the view at once. */
static void nats_on_bye(const struct nats_msg *m)
{
    struct jdoc d = {0};
    d.max = 64;
    if (json_parse(&d, m->pl, m->pln, 2, 1) == 0) {
        char *name = json_strdup(&d, json_get(&d, 0, "node"), NULL);
        struct cnode *cn = name ? (struct cnode *)hm_get(&CL.nodes, name, strlen(name)) : NULL;
        if (cn) cnode_drop(cn, "shut down");
        xfree(name);
    }
    xfree(d.t);
}

/* This node's snapshot: {"node","iid","v","functions":[FunctionSummary of every function a
 * worker connected here provides],"workers":[WorkerInfo of every worker listed here]}, in
 * chunks when it is larger than the server's max_payload. The function subscriptions are
 * brought in step first, so a node that learns of a function can send to its subject. */
static void nats_publish_snap(void)
{
    struct buf b = {0};
    char subj[256], key[37];
    size_t n = 0, k = 0;
    cl_fsubs_sync();
    struct hnode **v = hm_list(&S.funcs, &n);
    buf_puts(&b, "{\"node\":");
    json_put_cstr(&b, CL.node);
    buf_printf(&b, ",\"iid\":\"%s\",\"v\":%llu,\"functions\":[", CL.iid, (unsigned long long)CL.v);
    for (size_t i = 0; v && i < n; i++) {
        const struct func *f = (const struct func *)v[i];
        if (!f->owner) continue; /* engine::* builtins exist on every node */
        if (k++) buf_putc(&b, ',');
        fn_summary(&b, f);
    }
    buf_puts(&b, "],\"workers\":[");
    k = 0;
    for (const struct conn *c = S.conns; c; c = c->next) {
        if (c->kind != CK_WORKER || !c->has_pid || c->torn) continue; /* as the local listing */
        if (k++) buf_putc(&b, ',');
        worker_row(&b, c, 0);
    }
    buf_puts(&b, "],\"trigger_types\":[");
    k = 0;
    for (size_t i = 0; i < S.ttypes.nb; i++)
        for (struct hnode *e = S.ttypes.b[i]; e; e = e->next) {
            const struct ttype *tt = (const struct ttype *)e;
            if (!tt->provider) continue; /* engine::* types exist on every node */
            if (k++) buf_putc(&b, ',');
            tt_row(&b, tt);
        }
    buf_puts(&b, "]}");
    snprintf(subj, sizeof subj, "%s.node.%s.snap", CL_PREFIX, CL.tok);
    uuid_new(key);
    if (v && !buf_check(&b)) nats_pub_big(subj, key, (const char *)buf_data(&b), buf_used(&b));
    else CL.snap_due = 1; /* out of memory: try again next time */
    xfree(v), buf_free(&b);
}

/* ---- calls across engines ----
 * A call with no provider here but one on another node (its snapshot) travels as
 * PUB PREFIX.call.NODE with reply PREFIX.reply.THIS.RID and payload {"cw":caller worker id,
 * "f":the invokefunction frame} where the frame's invocation_id is replaced by RID (same
 * length, fresh). The node runs it with CL.vc as the caller, under the caller's worker id (so
 * _caller_worker_id is the real caller's), and publishes the invocationresult frame it gets to
 * the reply subject; this engine swaps the caller's id back in and passes the frame on. */

/* The node a node-addressed call of key k goes to: with providers: one the first by name
 * (every engine picks the same one), with many the next in turn. */
static const struct cnode *rkey_pick(struct rkey *k, int many)
{
    if (many) return k->nodes[k->rr++ % k->n];
    const struct cnode *best = k->nodes[0];
    for (size_t i = 1; i < k->n; i++)
        if (strcmp(k->nodes[i]->name, best->name) < 0) best = k->nodes[i];
    return best;
}

/* Sends the call in d to another node that provides fid in ns: 1 sent, 0 no node has it (or
 * no link, or out of memory). It goes to the function's subject (every node providing it
 * subscribes there in one queue group) when one node provides it, or several and this engine's
 * routing rule says providers: many: NATS picks the taker, which is asked to acknowledge when
 * it is not known here, so that its death still stops the call. Otherwise (providers: one
 * among several nodes, or a call too large for one message, whose chunks must all reach one
 * node) it goes to one node's call subject. Void calls travel without a reply subject. */
static int cl_forward(struct conn *c, const struct jdoc *d, int iid, int fidt, const char *fid,
                      size_t fl, const char *ns, size_t nl, int reply)
{
    if (CL.state != NATS_READY || c == CL.vc || !CL.rkeys.n) return 0;
    char kb[2 * III_MAX_ID + 2], subj[NATS_MAX_SUBJECT + 256], to_subj[NATS_MAX_SUBJECT], key[37];
    if (nl + 1 + fl > sizeof kb) return 0;
    memcpy(kb, ns, nl), kb[nl] = 0, memcpy(kb + nl + 1, fid, fl);
    struct rkey *k = (struct rkey *)hm_get(&CL.rkeys, kb, nl + 1 + fl);
    if (!k) return 0;
    const struct cfg_route *ru = S.cfg.nroutes ? route_for(ns, nl, fid, fl) : NULL;
    size_t n = JLEN(d, 0), multi = 0;
    for (size_t i = 1; i < k->n; i++) multi |= k->nodes[i] != k->nodes[0];
    const struct cnode *to = NULL;
    int many = ru && ru->many;
    if (n + 256 <= CL.max_payload && (!multi || many)) {
        /* the function's own subject: with one node providing it, that node (known: no
         * acknowledgement needed); with several, NATS picks one of them */
        cl_fn_subject(ns, nl, fid, fl, to_subj);
        if (!multi) to = k->nodes[0];
    } else {
        char tok[160];
        to = rkey_pick(k, many);
        nats_token(to->name, tok, sizeof tok);
        snprintf(to_subj, sizeof to_subj, "%s.call.%s", CL_PREFIX, tok);
    }
    struct rcall *rc = NULL;
    struct buf b = {0};
    /* "ack": the taker is not known here, so it says who it is before it answers */
    buf_printf(&b, "{\"cw\":\"%s\",%s\"f\":", c->wid, !to && reply ? "\"ack\":1," : "");
    size_t at = buf_used(&b);
    buf_append(&b, JRAW(d, 0), n);
    buf_putc(&b, '}');
    if (buf_check(&b)) goto oom;
    if (reply) {
        if (!(rc = xcalloc(sizeof *rc)) || (to && !(rc->node = xstrdup(to->name))) ||
            !(rc->fid = xstrndup((const char *)JRAW(d, fidt), JLEN(d, fidt))))
            goto oom;
        uuid_new(rc->rid);
        memcpy(rc->cid, JRAW(d, iid) + 1, 36);
        rc->sent = now_ms();
        /* the frame's invocation_id is the caller's: the fresh one takes its place */
        memcpy(b.p + b.off + at + (size_t)(JRAW(d, iid) + 1 - JRAW(d, 0)), rc->rid, 36);
        if (hm_put(&CL.rcalls, &rc->h, rc->rid, 36) < 0) goto oom;
        rc->caller = c, rc->cnext = c->rcalls, CL.n_unacked += !to;
        if (c->rcalls) c->rcalls->cprev = rc;
        c->rcalls = rc;
        memcpy(key, rc->rid, 37);
        snprintf(subj, sizeof subj, "%s %s.reply.%s.%s", to_subj, CL_PREFIX, CL.tok, rc->rid);
    } else {
        uuid_new(key);
        snprintf(subj, sizeof subj, "%s", to_subj);
    }
    nats_pub_big(subj, key, (const char *)buf_data(&b), buf_used(&b));
    buf_free(&b);
    return 1;
oom:
    if (rc) xfree(rc->node), xfree(rc->fid), xfree(rc);
    buf_free(&b);
    return 0;
}

/* The caller c goes away: its calls waiting on other nodes are forgotten, and the nodes
 * running them are told (PREFIX.node.NODE.cancel), so that their workers get
 * invocationcancelled as they would for a caller of their own. */
static void cl_caller_gone(struct conn *c)
{
    while (c->rcalls) { /* its own list: the cost is its calls, not every call in flight */
        struct rcall *rc = c->rcalls;
        if (rc->node) {
            char tok[160], subj[256], pl[64];
            nats_token(rc->node, tok, sizeof tok);
            snprintf(subj, sizeof subj, "%s.node.%s.cancel", CL_PREFIX, tok);
            int n = snprintf(pl, sizeof pl, "{\"rid\":\"%s\"}", rc->rid);
            nats_pub(subj, pl, (size_t)n);
        }
        rcall_end(rc, NULL);
    }
}

/* Remembers where the answer to call rid (36 chars) goes (the entry, held by CL.rins; NULL
 * on OOM). */
static struct rin *rin_add(const char *rid, const char *reply, size_t rn)
{
    struct rin *r = xcalloc(sizeof *r + rn + 1);
    if (!r) return NULL;
    memcpy(r->rid, rid, 36);
    memcpy(r->reply, reply, rn);
    if (hm_put(&CL.rins, &r->h, r->rid, 36) < 0) {
        xfree(r);
        return NULL;
    }
    if ((r->next = CL.rin_list)) r->next->prev = r;
    CL.rin_list = r;
    return r;
}

/* Forgets r (its answer went out, or the engine stops). */
static void rin_free(struct rin *r)
{
    hm_del(&CL.rins, &r->h);
    if (r->prev) r->prev->next = r->next;
    else CL.rin_list = r->next;
    if (r->next) r->next->prev = r->prev;
    xfree(r);
}

/* A call from another node: run here with CL.vc as the caller (made on first use). */
static void cl_on_call(const struct nats_msg *m)
{
    struct jdoc d = {0}, f = {0};
    d.max = 16, f.max = 4096;
    if (json_parse(&d, m->pl, m->pln, 2, 1) < 0) goto out;
    int cw = json_get(&d, 0, "cw"), ft = json_get(&d, 0, "f");
    if (JTYPE(&d, cw) != J_STRING || JLEN(&d, cw) != 38 || JTYPE(&d, ft) != J_OBJECT) goto out;
    if (!CL.vc) {
        if (!(CL.vc = conn_new(-1, "cluster"))) goto out;
        CL.vc->kind = CK_CLUSTER;
        CL.vc->out.lim = 0;
    }
    if (json_parse(&f, JRAW(&d, ft), JLEN(&d, ft), 2, 0) < 0) goto out;
    int iid = json_get(&f, 0, "invocation_id");
    if (m->reply && JTYPE(&f, iid) == J_STRING && JLEN(&f, iid) == 38) {
        /* an id already running here (a replay) is not run twice */
        if (hm_get(&CL.rins, (const char *)JRAW(&f, iid) + 1, 36)) goto out;
        if (!rin_add((const char *)JRAW(&f, iid) + 1, m->reply, m->replyn)) goto out;
        if (!JABSENT(&d, json_get(&d, 0, "ack"))) { /* the caller's engine asks who took it */
            struct buf a = {0};
            buf_puts(&a, "{\"ack\":");
            json_put_cstr(&a, CL.node);
            buf_putc(&a, '}');
            char *rs = xstrndup(m->reply, m->replyn);
            if (rs && !buf_check(&a)) nats_pub(rs, (const char *)buf_data(&a), buf_used(&a));
            xfree(rs), buf_free(&a);
        }
    }
    /* the call is the remote caller's: its worker id is the one the target sees */
    memcpy(CL.vc->wid, JRAW(&d, cw) + 1, 36);
    CL.vc->wid[36] = 0;
    rt_invoke(CL.vc, &f);
out:
    xfree(d.t), xfree(f.t);
}

/* The frames the engine wrote to CL.vc: each invocationresult goes to its reply subject. */
static void cl_vc_flush(struct conn *vc)
{
    const unsigned char *p = buf_data(&vc->out);
    size_t n = buf_used(&vc->out), i = 0;
    while (n - i >= 2) {
        size_t hl = 2, len = p[i + 1] & 0x7f;
        if (len == 126) hl = 4, len = n - i >= 4 ? (size_t)p[i + 2] << 8 | p[i + 3] : 0;
        else if (len == 127) {
            hl = 10, len = 0;
            for (int k = 0; k < 8 && n - i >= 10; k++) len = len << 8 | p[i + 2 + k];
        }
        if (n - i < hl || n - i - hl < len) break;
        const char *fr = (const char *)p + i + hl;
        const char *k = len > 60 ? strstr_n(fr, len, "\"invocation_id\":\"") : NULL;
        if ((p[i] & 0x0f) == WS_TEXT && k && (size_t)(fr + len - k) > 17 + 36) {
            struct rin *r = (struct rin *)hm_get(&CL.rins, k + 17, 36);
            if (r) {
                nats_pub_big(r->reply, r->rid, fr, len);
                rin_free(r);
            }
        }
        i += hl + len;
    }
    buf_consume(&vc->out, i);
}

/* CL.vc goes away (the engine stops, or it failed): its calls are cancelled like a caller's. */
static void cl_vc_teardown(struct conn *vc)
{
    cl_vc_flush(vc); /* what was answered before it went (a shutdown's last results) */
    for (struct inv *v = vc->calls_out, *nx; v; v = nx)
        nx = v->cnext, rt_cancel_notify(v, "caller_disconnected"), inv_free(v);
    if (CL.vc == vc) CL.vc = NULL;
}

/* An answer from the node a call went to: the caller's id goes back in, the frame to the
 * caller. A no-responders status (the node is gone) ends the call with invocation_stopped. */
static void cl_on_reply(const struct nats_msg *m)
{
    if (m->subjn < 36) return;
    struct rcall *rc = (struct rcall *)hm_get(&CL.rcalls, m->subj + m->subjn - 36, 36);
    if (!rc) return;
    if (m->op == NOP_HMSG && m->hdrn >= 12 && !memcmp(m->hdr, "NATS/1.0 503", 12)) {
        rcall_end(rc, "{\"code\":\"invocation_stopped\",\"message\":\"Invocation stopped: the "
                      "engine that had the function did not answer (no responders)\"}");
        return;
    }
    if (m->pln == 9 && !memcmp(m->pl, "{\"err\":1}", 9)) { /* too large to reassemble */
        rcall_end(rc, ERR_RTOOBIG);
        return;
    }
    if (m->pln > 8 && !memcmp(m->pl, "{\"ack\":", 7)) { /* the node a queue group picked */
        struct jdoc d = {0};
        d.max = 8;
        if (!rc->node && json_parse(&d, m->pl, m->pln, 2, 1) == 0 &&
            (rc->node = json_strdup(&d, json_get(&d, 0, "ack"), NULL)))
            CL.n_unacked--;
        xfree(d.t);
        return;
    }
    const char *k = strstr_n((const char *)m->pl, m->pln, "\"invocation_id\":\"");
    struct conn *c = rc->caller;
    if (k && (size_t)((const char *)m->pl + m->pln - k) > 17 + 36 && !memcmp(k + 17, rc->rid, 36) &&
        c && conn_open(c)) {
        struct buf b = {0};
        buf_append(&b, m->pl, m->pln);
        if (!buf_check(&b) && b.p) {
            memcpy(b.p + b.off + (size_t)(k + 17 - (const char *)m->pl), rc->cid, 36);
            conn_frame(c, WS_TEXT, buf_data(&b), buf_used(&b));
        }
        buf_free(&b);
    }
    rcall_end(rc, NULL);
}

/* A call from another node's caller went away: its invocation here is cancelled as a local
 * caller's would be (the worker gets invocationcancelled; no answer goes back). */
static void cl_on_cancel(const struct nats_msg *m)
{
    struct jdoc d = {0};
    d.max = 8;
    if (json_parse(&d, m->pl, m->pln, 2, 1) == 0) {
        int r = json_get(&d, 0, "rid");
        struct rin *ri = JTYPE(&d, r) == J_STRING && JLEN(&d, r) == 38
                             ? (struct rin *)hm_get(&CL.rins, (const char *)JRAW(&d, r) + 1, 36)
                             : NULL;
        if (ri) {
            struct inv *v = inv_find(ri->rid);
            if (v && v->caller == CL.vc) rt_cancel_notify(v, "caller_disconnected"), inv_free(v);
            rin_free(ri);
        }
    }
    xfree(d.t);
}

/* One message from the server, by the subscription it came on. */
static void nats_dispatch(const struct nats_msg *m)
{
    switch (m->sid) {
    case 1: nats_on_hb(m); break;
    case 2: nats_on_snap(m); break;
    case 3: nats_on_bye(m); break;
    case 4: CL.snap_due = 1; break;
    case 5: cl_on_call(m); break;
    case 6: cl_on_reply(m); break;
    case 7: cl_on_cancel(m); break;
    default:
        if (m->sid >= 100) cl_on_call(m); /* a function's queue-group subject */
    }
}

/* Handles everything complete in CL.in. */
static void nats_input(void)
{
    for (;;) {
        struct nats_msg m;
        int r = nats_parse(buf_data(&CL.in), buf_used(&CL.in), CL.max_payload, &m);
        if (r < 0) {
            nats_drop("protocol error from the server");
            return;
        }
        if (!r) return;
        if (m.op == NOP_INFO && CL.state == NATS_HANDSHAKE) nats_on_info(&m);
        else if (m.op == NOP_PING) buf_puts(&CL.out, "PONG\r\n");
        else if (m.op == NOP_PONG && CL.state == NATS_HANDSHAKE) nats_on_ready();
        else if (m.op == NOP_ERR) LOG(LOG_WARN, "cluster: server error: %.*s", (int)m.argn, m.arg);
        else if (m.op == NOP_HMSG && strstr_n((const char *)m.hdr, m.hdrn, "Iii-Chunk: ")) {
            struct chunks *ch = cl_chunk(&m);
            if (ch) { /* the last chunk: the whole message, as if it had come in one */
                m.op = NOP_MSG, m.hdr = NULL, m.hdrn = 0;
                m.pl = buf_data(&ch->b), m.pln = buf_used(&ch->b);
                nats_dispatch(&m);
                chunks_free(ch);
            }
        } else if (m.op == NOP_MSG || m.op == NOP_HMSG) {
            nats_dispatch(&m);
        }
        buf_consume(&CL.in, (size_t)r);
        if (CL.state == NATS_WAIT) return;
    }
}

/* The poll entry of the NATS socket (fd -1 when none). */
static short nats_events(void)
{
    if (CL.fd < 0) return 0;
    return (short)(CL.state == NATS_CONNECTING ? POLLOUT
                                               : POLLIN | (buf_used(&CL.out) ? POLLOUT : 0));
}

static void nats_flush(void);

/* Socket events of the NATS connection. */
static void nats_on_poll(short re)
{
    if (CL.fd < 0 || !re) return;
    if (CL.state == NATS_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        if (getsockopt(CL.fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
            nats_drop(strerror(err ? err : errno));
            return;
        }
        CL.state = NATS_HANDSHAKE;
        return;
    }
    if (re & (POLLIN | POLLHUP | POLLERR)) {
        if (buf_reserve(&CL.in, 65536) < 0) {
            nats_drop("out of memory");
            return;
        }
        ssize_t r = read(CL.fd, CL.in.p + CL.in.len, CL.in.cap - CL.in.len);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            nats_drop(r == 0 ? "the server closed the connection" : strerror(errno));
            return;
        }
        if (r > 0) CL.in.len += (size_t)r, nats_input();
    }
    nats_flush();
}

/* Writes what CL.out holds, as far as the socket takes it: each turn before the loop waits (and
 * on POLLOUT), so a published message leaves in the turn that made it, with no wake-up of its
 * own; POLLOUT is asked for only while the socket does not take everything. */
static void nats_flush(void)
{
    if (CL.state == NATS_CONNECTING) return;
    while (CL.fd >= 0 && buf_used(&CL.out)) {
        ssize_t w = write(CL.fd, buf_data(&CL.out), buf_used(&CL.out));
        if (w > 0) buf_consume(&CL.out, (size_t)w);
        else if (w < 0 && errno == EINTR) continue;
        else {
            if (w < 0 && errno != EAGAIN) nats_drop(strerror(errno));
            break;
        }
    }
}

/* Timers: connection attempts, the heartbeat, and nodes whose TTL ran out. */
static void nats_tick(int64_t now, int64_t *next)
{
    if (!S.cfg.cluster.nurls) {
        if (CL.state != NATS_OFF) {
            nats_close();
            buf_free(&CL.in), buf_free(&CL.out);
            CL.state = NATS_OFF;
        }
        return;
    }
    if (CL.state == NATS_OFF) {
        CL.state = NATS_WAIT, CL.backoff = 250, CL.next_try = now, CL.url = 0, CL.next_sid = 100;
        CL.max_payload = 1 << 20;
        if (S.cfg.cluster.node) snprintf(CL.node, sizeof CL.node, "%s", S.cfg.cluster.node);
        else {
            char h[128] = "engine";
            gethostname(h, sizeof h - 1);
            h[sizeof h - 1] = 0;
            snprintf(CL.node, sizeof CL.node, "%s:%d", h, S.bound_port);
        }
        nats_token(CL.node, CL.tok, sizeof CL.tok);
        unsigned char r[8];
        rnd_bytes(r, sizeof r);
        for (int i = 0; i < 8; i++) snprintf(CL.iid + 2 * i, 3, "%02x", r[i]);
    }
    if (CL.state == NATS_WAIT) {
        if (now >= CL.next_try) nats_connect();
        else if (CL.next_try < *next) *next = CL.next_try;
    }
    if (CL.state == NATS_READY) {
        if (S.fn_fp != CL.fp_pub || S.fn_n != CL.n_pub || S.reg_ver != CL.wk_pub)
            CL.v++, CL.fp_pub = S.fn_fp, CL.n_pub = S.fn_n, CL.wk_pub = S.reg_ver, CL.snap_due = 1;
        if (CL.snap_due && now >= CL.snap_at) {
            CL.snap_due = 0, CL.snap_at = now + NATS_SNAP_GAP_MS;
            nats_publish_snap();
        }
        if (CL.state == NATS_READY && now >= CL.next_hb) {
            struct buf b = {0};
            char subj[256];
            buf_puts(&b, "{\"node\":");
            json_put_cstr(&b, CL.node);
            buf_printf(&b, ",\"iid\":\"%s\",\"v\":%llu}", CL.iid, (unsigned long long)CL.v);
            snprintf(subj, sizeof subj, "%s.node.%s.hb", CL_PREFIX, CL.tok);
            if (!buf_check(&b)) nats_pub(subj, (const char *)buf_data(&b), buf_used(&b));
            buf_free(&b);
            CL.next_hb = now + NATS_HB_MS;
        }
        if (CL.next_hb < *next) *next = CL.next_hb;
        if (CL.snap_due && CL.snap_at < *next) *next = CL.snap_at;
    }
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i], *nx; e; e = nx) {
            struct cnode *cn = (struct cnode *)e;
            nx = e->next;
            if (now - cn->seen >= NATS_NODE_TTL_MS) cnode_drop(cn, "no heartbeat within the TTL");
        }
    if (now >= CL.sweep_at) { /* twice a second: calls never acknowledged, stale chunks */
        CL.sweep_at = now + 500;
        if (CL.n_unacked) rcall_stop_all(NULL, 1);
        if (CL.chunks.n) cl_chunks_clear(now - NATS_CHUNK_TTL_MS);
    }
    if ((CL.nodes.n || CL.n_unacked || CL.chunks.n) && CL.sweep_at < *next) *next = CL.sweep_at;
}

/* A clean shutdown: a goodbye, so the other nodes drop this one at once rather than after the
 * TTL (best effort: what the socket takes within 200 ms). */
static void nats_leave(void)
{
    if (CL.state != NATS_READY) return;
    if (CL.vc) cl_vc_flush(CL.vc); /* answers to other nodes' calls, ended by the shutdown */
    struct buf b = {0};
    char subj[256];
    buf_puts(&b, "{\"node\":");
    json_put_cstr(&b, CL.node);
    buf_putc(&b, '}');
    snprintf(subj, sizeof subj, "%s.node.%s.bye", CL_PREFIX, CL.tok);
    if (!buf_check(&b)) nats_pub(subj, (const char *)buf_data(&b), buf_used(&b));
    buf_free(&b);
    for (int64_t end = now_ms() + 200; CL.fd >= 0 && buf_used(&CL.out) && now_ms() < end;) {
        struct pollfd p = {CL.fd, POLLOUT, 0};
        if (poll(&p, 1, 50) > 0) nats_on_poll(POLLOUT);
    }
}

/* Frees the cluster state at exit. */
static void nats_free(void)
{
    nats_close();
    buf_free(&CL.in), buf_free(&CL.out);
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i], *nx; e; e = nx) {
            nx = e->next;
            cnode_clear((struct cnode *)e);
            xfree(((struct cnode *)e)->name), xfree(e);
        }
    hm_free(&CL.nodes), hm_free(&CL.rkeys);
    rcall_stop_all(NULL, 0);
    hm_free(&CL.rcalls);
    cl_fsubs_clear(), cl_chunks_clear(INT64_MAX);
    while (CL.rin_list) rin_free(CL.rin_list);
    hm_free(&CL.rins);
}

/* The remote functions (rows of other nodes' snapshots) a listing shows, appended to r from
 * index k under the same filters as local ones (a search ranks on the id only); returns the
 * new count. A restricted session sees none: its grants name this node's functions. */
static int cl_rows(const struct session *s, const char *prefix, const char *worker,
                   char **names, size_t nn, int by_name, const struct isearch *q,
                   struct ranked *r, size_t k)
{
    if (s && !s->full && s->restricted) return (int)k;
    size_t pl = prefix ? strlen(prefix) : 0;
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) {
            const struct cnode *cn = (const struct cnode *)e;
            for (size_t j = 0; j < cn->nfns; j++) {
                const struct rfn *f = &cn->fns[j];
                int rank = 0;
                if (prefix && strncmp(f->id, prefix, pl)) continue;
                if ((worker || by_name) &&
                    !((worker && !strcmp(worker, f->wname)) ||
                      (nn && bsearch(&f->wname, names, nn, sizeof *names, names_cmp))))
                    continue;
                if (q && q->nl) {
                    size_t il = strlen(f->id);
                    rank = il >= q->nl && str_ncaseeq(f->id, q->nd, q->nl) ? 0
                           : isearch_in(q, f->id, il)                    ? 1
                                                                         : -1;
                    if (rank < 0) continue;
                }
                r[k].rank = rank, r[k].a = f->id, r[k].b = f->ns, r[k].p = NULL, r[k].row = f->row;
                k++;
            }
        }
    return (int)k;
}

/* Workers of other nodes held, over all nodes (a bound for a listing's rows). */
static size_t cl_nwks(void)
{
    size_t n = 0;
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) n += ((struct cnode *)e)->nwks;
    return n;
}

/* The remote workers engine::workers::list shows, appended to r from index k under the same
 * filters as local ones (they are all "connected"); returns the new count. */
static size_t cl_wrows(const struct isearch *q, const char *runtime, const char *status,
                       struct ranked *r, size_t k)
{
    if (status && strcmp(status, "connected")) return k;
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) {
            const struct cnode *cn = (const struct cnode *)e;
            for (size_t j = 0; j < cn->nwks; j++) {
                const struct rwk *w = &cn->wks[j];
                if (q && q->nl && (!w->name || !isearch_in(q, w->name, strlen(w->name)))) continue;
                if (runtime && strcmp(runtime, w->runtime ? w->runtime : "unknown")) continue;
                r[k].rank = 0, r[k].a = w->name ? w->name : w->id, r[k].b = w->id;
                r[k].p = NULL, r[k++].row = w->row;
            }
        }
    return k;
}

/* Trigger types of other nodes held, over all nodes (a bound for a listing's rows). */
static size_t cl_ntts(void)
{
    size_t n = 0;
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) n += ((struct cnode *)e)->ntts;
    return n;
}

/* The remote trigger types engine::triggers::list shows, appended to r from index k under the
 * local filters (a search matches the id only); returns the new count. */
static size_t cl_ttrows(const struct isearch *q, const char *prefix, const char *worker,
                        struct ranked *r, size_t k)
{
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) {
            const struct cnode *cn = (const struct cnode *)e;
            for (size_t j = 0; j < cn->ntts; j++) {
                const struct rtt *t = &cn->tts[j];
                if (prefix && !str_prefix(t->id, prefix)) continue;
                if (worker && (!t->wname || strcmp(worker, t->wname))) continue;
                if (q && q->nl && !isearch_in(q, t->id, strlen(t->id))) continue;
                r[k].rank = 0, r[k].a = t->id, r[k].b = cn->name, r[k].p = NULL;
                r[k++].row = t->row;
            }
        }
    return k;
}

/* The remote rows of a functions_changed payload (k: rows already written). */
static void cl_rows_event(struct buf *b, const struct session *s, size_t k)
{
    if (s && !s->full && s->restricted) return;
    for (size_t i = 0; i < CL.nodes.nb; i++)
        for (struct hnode *e = CL.nodes.b[i]; e; e = e->next) {
            const struct cnode *cn = (const struct cnode *)e;
            for (size_t j = 0; j < cn->nfns; j++) {
                if (k++) buf_putc(b, ',');
                buf_puts(b, cn->fns[j].row);
            }
        }
}

/* ==== Health and metrics ====================================================================
 * Plain HTTP on the worker port (docs/§10 item 8).
 */
/* Worker connections not yet torn down (the iii_workers_active gauge and /health). */
static size_t count_workers(void)
{
    size_t n = 0;
    for (struct conn *c = S.conns; c; c = c->next) n += c->kind == CK_WORKER && !c->torn;
    return n;
}

/* GET /health body (docs/§10 item 8). */
static void http_health(struct buf *b)
{
    buf_printf(b, "{\"status\":\"ok\",\"workers\":%zu,\"functions\":%zu,\"uptime_ms\":%lld}",
               count_workers(), S.funcs.n, (long long)(now_ms() - S.start_ms));
}

/* GET /metrics: Prometheus text exposition format 0.0.4 (hence the content type's version);
 * the counter names are the ones docs/§10 item 8 promises. */
/* Appends s[0..n) as a Prometheus label value (backslash, quote and newline escaped). */
static void prom_label(struct buf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' || s[i] == '"') buf_putc(b, '\\');
        if (s[i] == '\n') buf_puts(b, "\\n");
        else buf_putc(b, s[i]);
    }
}

/* One family of per-function series: for every struct fstat (and _other when it counted
 * anything), NAME{function,namespace[,le]} VALUE, in the order kind picks. */
static void http_fstat_family(struct buf *b, const char *name, int kind)
{
    for (size_t i = 0; i <= S.fstats.nb; i++)
        for (struct hnode *e = i < S.fstats.nb ? S.fstats.b[i] : &S.fstat_other.h; e;
             e = i < S.fstats.nb ? e->next : NULL) {
            struct fstat *s = (struct fstat *)e;
            const char *ns = s->key ? s->key : "", *id = s->key ? s->key + strlen(s->key) + 1 : "_other";
            if (!s->key && !s->calls) continue;
            uint64_t cum = 0;
            for (int k = 0; k < (kind == 3 ? FSTAT_BUCKETS : 1); k++) {
                buf_puts(b, name);
                buf_puts(b, "{function=\"");
                prom_label(b, id, s->key ? s->klen - strlen(ns) - 1 : 6);
                buf_puts(b, "\",namespace=\"");
                prom_label(b, ns, strlen(ns));
                if (kind == 3) {
                    cum += s->bucket[k];
                    if (k < FSTAT_BUCKETS - 1)
                        buf_printf(b, "\",le=\"%g\"} %llu\n", (double)FSTAT_LE_US[k] / 1e6,
                                   (unsigned long long)cum);
                    else buf_printf(b, "\",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
                } else {
                    uint64_t v = kind == 0 ? s->calls : kind == 1 ? s->errors
                                : kind == 2 ? s->inflight : 0;
                    if (kind == 4) {
                        buf_printf(b, "\"} %.6f\n", (double)s->sum_us / 1e6);
                        continue;
                    }
                    if (kind == 5) v = s->calls - s->inflight;
                    buf_printf(b, "\"} %llu\n", (unsigned long long)v);
                }
            }
        }
}

/* The per-function series (struct fstat): calls, errors, in flight and a duration histogram,
 * labelled function and namespace; at most III_METRIC_FUNCTIONS functions, then _other. */
static void http_metrics_functions(struct buf *b)
{
    buf_puts(b, "# HELP iii_function_calls_total Calls routed to a function.\n"
                "# TYPE iii_function_calls_total counter\n");
    http_fstat_family(b, "iii_function_calls_total", 0);
    buf_puts(b, "# HELP iii_function_errors_total Calls of a function that ended in an error.\n"
                "# TYPE iii_function_errors_total counter\n");
    http_fstat_family(b, "iii_function_errors_total", 1);
    buf_puts(b, "# HELP iii_function_inflight Calls of a function awaiting their result.\n"
                "# TYPE iii_function_inflight gauge\n");
    http_fstat_family(b, "iii_function_inflight", 2);
    buf_puts(b, "# HELP iii_function_duration_seconds Time from dispatch to result.\n"
                "# TYPE iii_function_duration_seconds histogram\n");
    http_fstat_family(b, "iii_function_duration_seconds_bucket", 3);
    http_fstat_family(b, "iii_function_duration_seconds_sum", 4);
    http_fstat_family(b, "iii_function_duration_seconds_count", 5);
    /* routing (functions with several providers or a queue): per provider and per queue */
    buf_puts(b, "# HELP iii_provider_inflight Calls in flight to each provider's worker.\n"
                "# TYPE iii_provider_inflight gauge\n");
    for (size_t i = 0; i < S.funcs.nb; i++)
        for (struct hnode *e = S.funcs.b[i]; e; e = e->next) {
            const struct func *f = (const struct func *)e;
            int many = f->owner && (f->rnext || route_many(f->ns, strlen(f->ns), f->id, strlen(f->id)));
            for (const struct func *p = many ? f : NULL; p; p = p->rnext) {
                buf_puts(b, "iii_provider_inflight{function=\"");
                prom_label(b, f->id, strlen(f->id));
                buf_puts(b, "\",namespace=\"");
                prom_label(b, f->ns, strlen(f->ns));
                buf_printf(b, "\",worker_id=\"%s\"} %zu\n", p->owner->wid, p->owner->n_in);
            }
        }
    buf_puts(b, "# HELP iii_function_queue_depth Calls waiting for a provider with room.\n"
                "# TYPE iii_function_queue_depth gauge\n");
    for (const struct func *f = S.qfuncs; f; f = f->qnext) {
        buf_puts(b, "iii_function_queue_depth{function=\"");
        prom_label(b, f->id, strlen(f->id));
        buf_puts(b, "\",namespace=\"");
        prom_label(b, f->ns, strlen(f->ns));
        buf_printf(b, "\"} %zu\n", f->qn);
    }
}

static void http_metrics(struct buf *b)
{
    buf_printf(
        b,
        "# HELP iii_invocations_total Invocations routed.\n# TYPE iii_invocations_total counter\n"
        "iii_invocations_total %llu\n"
        "# HELP iii_invocation_errors_total Invocations that ended in an error.\n"
        "# TYPE iii_invocation_errors_total counter\niii_invocation_errors_total %llu\n"
        "# HELP iii_workers_active Connected workers.\n# TYPE iii_workers_active gauge\n"
        "iii_workers_active %zu\n"
        "# HELP iii_workers_spawns_total Worker processes started.\n# TYPE "
        "iii_workers_spawns_total counter\n"
        "iii_workers_spawns_total %llu\n"
        "# HELP iii_workers_deaths_total Worker processes that exited.\n"
        "# TYPE iii_workers_deaths_total counter\niii_workers_deaths_total %llu\n"
        "# HELP iii_connections_active Open sockets.\n# TYPE iii_connections_active gauge\n"
        "iii_connections_active %zu\n"
        "# HELP iii_functions_registered Functions in the registry.\n# TYPE "
        "iii_functions_registered gauge\n"
        "iii_functions_registered %zu\n"
        "# HELP iii_invocations_in_flight Calls awaiting a result.\n# TYPE "
        "iii_invocations_in_flight gauge\n"
        "iii_invocations_in_flight %zu\n"
        "# HELP iii_memory_bytes Bytes allocated by the engine.\n# TYPE iii_memory_bytes gauge\n"
        "iii_memory_bytes %zu\n"
        "# HELP iii_allocations_total Allocator calls since start.\n# TYPE iii_allocations_total "
        "counter\n"
        "iii_allocations_total %zu\n",
        (unsigned long long)S.n_invocations, (unsigned long long)S.n_inv_errors, count_workers(),
        (unsigned long long)S.n_spawns, (unsigned long long)S.n_deaths, S.nconns, S.funcs.n,
        S.invs.n, mem_live_bytes, mem_allocs_total);
    buf_printf(b, "# HELP iii_busy_total Calls and upgrades refused by a limit (BUSY, 503).\n"
                  "# TYPE iii_busy_total counter\niii_busy_total %llu\n",
               (unsigned long long)S.n_busy);
    if (S.cfg.cluster.nurls)
        buf_printf(b, "# HELP iii_cluster_connected 1 while the NATS connection is up.\n"
                      "# TYPE iii_cluster_connected gauge\niii_cluster_connected %d\n"
                      "# HELP iii_cluster_nodes Other engines heard from within the TTL.\n"
                      "# TYPE iii_cluster_nodes gauge\niii_cluster_nodes %zu\n"
                      "# HELP iii_cluster_connects_total Connections made to NATS.\n"
                      "# TYPE iii_cluster_connects_total counter\niii_cluster_connects_total %llu\n",
                   CL.state == NATS_READY, CL.nodes.n, (unsigned long long)CL.connects);
    http_metrics_functions(b);
}

/* ==== Event loop ============================================================================
 * One wait per turn over: the signal self-pipe, the listener, supervised children's output
 * pipes, and every connection. With epoll (Linux) the connections, the self-pipe and the
 * listener live in the epoll set, and a turn with nothing else to watch blocks in epoll_wait
 * alone; otherwise one poll() covers the rest and the epoll descriptor. Deadlines (handshake,
 * grace, ping, idle, close flush) are computed while the poll set is built, so no timer
 * structure is needed. After dispatch each dirty connection is written once,
 * functions-available is checked, and closed connections are torn down and freed (the reap
 * pass).
 */
/* Async-signal-safe: sets a flag and writes one byte to the self-pipe so poll() wakes; errno is
 * preserved for the interrupted code. All real work happens in the loop. */
static void sig_handler(int sig)
{
    int e = errno;
    if (sig == SIGINT || sig == SIGTERM) S.sig_term = 1;
    else if (sig == SIGHUP) S.sig_hup = 1;
    else if (sig == SIGCHLD) S.sig_chld = 1;
    unsigned char b = (unsigned char)sig;
    ssize_t w = write(S.sigpipe[1], &b, 1);
    (void)w;
    errno = e;
}

/* SIGPIPE ignored (a write to a dead peer returns EPIPE instead of killing us); SIGINT/SIGTERM,
 * SIGHUP and SIGCHLD go through sig_handler. SA_RESTART keeps slow syscalls from failing with
 * EINTR. Start-up only: dies on failure. */
static void loop_signals_init(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    if (pipe(S.sigpipe) < 0 || net_flags(S.sigpipe[0]) < 0 || net_flags(S.sigpipe[1]) < 0)
        die("cannot create the signal pipe: %s", strerror(errno));
    sa.sa_handler = sig_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGCHLD, &sa, NULL);
}

/* Descriptors (start-up): the soft RLIMIT_NOFILE is raised to the hard limit, and connections
 * are capped (fd_conn_cap) to what fits below it with III_FD_RESERVE kept back for the
 * listener, the config file on a reload, worker pipes and the sentinel, plus one spare
 * descriptor held open (S.spare_fd) that accept() can borrow to turn a peer away cleanly when
 * the process is out of them anyway. So idle sockets cannot make a reload or a spawn fail. */
static size_t fd_conn_cap = SIZE_MAX;

static void fd_limits(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
    if (rl.rlim_cur != RLIM_INFINITY && (rl.rlim_max == RLIM_INFINITY || rl.rlim_cur < rl.rlim_max)) {
        struct rlimit up = rl;
        /* "unlimited" is not a number the kernel takes for open files: aim at 1M */
        up.rlim_cur = rl.rlim_max == RLIM_INFINITY ? (rlim_t)1 << 20 : rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &up) == 0) rl.rlim_cur = up.rlim_cur;
    }
    if (rl.rlim_cur == RLIM_INFINITY) return;
    fd_conn_cap = rl.rlim_cur > 2 * III_FD_RESERVE ? (size_t)rl.rlim_cur - III_FD_RESERVE
                                                   : (size_t)rl.rlim_cur / 2;
    S.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/* Accepts up to 64 connections per turn (fairness to established ones) while under
 * max_connections; each gets TCP_NODELAY (small latency-bound frames) and a CK_HTTP conn.
 * Out of descriptors, the spare one is freed to accept the peer and close it at once (it sees
 * a clean close instead of hanging in the backlog), and accepting pauses for 100 ms. */
static void loop_accept(void)
{
    for (int i = 0; i < 64 && S.nconns < S.set.max_connections; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept(S.lfd, (struct sockaddr *)&ss, &sl);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of descriptors: stop accepting for a moment instead of spinning */
                LOG(LOG_WARN, "accept: %s; pausing accepts for 100 ms", strerror(errno));
                S.accept_pause_until = now_ms() + 100;
                if (S.spare_fd >= 0) {
                    close(S.spare_fd);
                    int x = accept(S.lfd, NULL, NULL);
                    if (x >= 0) close(x);
                    S.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                }
            }
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char ip[48];
        net_peer(&ss, ip, sizeof ip);
        if (net_flags(fd) < 0 || !conn_new(fd, ip)) close(fd);
    }
}

/* Dispatches buffered input by role: request head, or WebSocket frames. */
static void loop_process(struct conn *c)
{
    if (c->kind == CK_HTTP) http_on_data(c);
    else if (c->auth_wait) {
        /* the auth function decides first: input is held, up to III_AUTH_HOLD_BYTES */
        if (buf_used(&c->in) > III_AUTH_HOLD_BYTES) conn_close(c, 1008, "too much input before auth");
    } else if (c->ws) ws_on_data(c);
}

/* Processes the input held by connections the auth function admitted (S.resume), once per
 * turn: from the loop, never from inside the auth worker's own message handling. */
static void resume_tick(void)
{
    while (S.resume) {
        struct conn *c = S.resume;
        S.resume = c->rsnext, c->rsnext = NULL;
        if (conn_open(c) && buf_used(&c->in)) ws_on_data(c);
    }
}

/* Reads what the socket has and processes it. A connection with no partial frame pending reads
 * into one shared buffer and is handled from there: only a trailing partial frame is copied into
 * the connection's own buffer. The shared buffer (III_READ_SHARED) is larger than the step a
 * connection's own buffer grows by (III_READ_CHUNK), so a message of up to about that size
 * arrives whole in one read() and is never copied. So an idle connection holds no input memory,
 * and a steady stream of whole frames costs no allocation. A closing connection's input is read
 * and discarded (lingering close: the peer gets our Close instead of a reset). */
static void loop_read(struct conn *c)
{
    /* static is safe: one thread, and nothing keeps a pointer into it after loop_process */
    static unsigned char
        shared[III_READ_SHARED > III_READ_CHUNK ? III_READ_SHARED : III_READ_CHUNK];
    if (c->closing) {
        ssize_t r = read(c->fd, shared, sizeof shared);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            c->dead = 1, reap_push(c);
        return;
    }
    int borrow = !buf_used(&c->in);
    if (borrow) buf_drop(&c->in);
    else if (buf_reserve(&c->in, III_READ_CHUNK) < 0) {
        conn_oom(c);
        return;
    }
    ssize_t r = borrow ? read(c->fd, shared, sizeof shared)
                       : read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (r == 0) {
        conn_abort(c, "connection lost (EOF)");
        return;
    }
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) conn_abort(c, "read error");
        return;
    }
    if (!borrow) {
        c->in.len += (size_t)r;
        loop_process(c);
        if (!buf_used(&c->in)) buf_drop(&c->in);
        return;
    }
    c->in.p = shared, c->in.len = (size_t)r, c->in.cap = sizeof shared, c->in.off = 0;
    c->in_borrowed = 1, rd_keep = 0;
    loop_process(c);
    c->in_borrowed = 0;
    size_t left = buf_used(&c->in);
    unsigned char *lp = buf_data(&c->in);
    memset(&c->in, 0, sizeof c->in);
    /* a large partial frame ws_on_data accepted gets the room it asked for, so it is copied once
     * and its block is not regrown while the rest arrives; a small one (a header and a few
     * bytes) only its own bytes, committing no more memory than before it moved */
    size_t keep = left >= III_READ_CHUNK && rd_keep > left ? rd_keep : left;
    if (left && !c->dead && !c->closing &&
        (buf_reserve(&c->in, keep) < 0 || buf_append(&c->in, lp, left) < 0))
        conn_oom(c);
}

/* Per-connection deadlines; returns the earliest future deadline (or INT64_MAX). */
static int64_t loop_timers(struct conn *c, int64_t now)
{
    int64_t next = INT64_MAX;
/* DUE(t): 1 once deadline t has passed; otherwise 0, and t becomes the next wake-up if sooner */
#define DUE(t) ((t) <= now ? 1 : ((t) < next ? (next = (t)), 0 : 0))
    if (c->dead) return next;
    if (c->closing) {
        /* RFC 6455 §7.1.1 wants the peer's Close and a TCP close; a peer that never answers gets
         * III_CLOSE_FLUSH_MS before we drop the socket anyway */
        if (DUE(c->t_close + III_CLOSE_FLUSH_MS)) c->dead = 1, reap_push(c);
        return next;
    }
    if (c->kind == CK_HTTP) {
        /* §1.1: the request head must be complete within handshake_timeout_ms; once upgraded the
         * deadline no longer applies */
        if (DUE(c->t_accept + S.set.handshake_timeout_ms)) conn_abort(c, "handshake timeout");
        return next;
    }
    if (!c->ws) return next;
    /* §1.4 grace timer: no engine::workers::register in time, so pin to default and drain */
    if (c->kind == CK_WORKER && c->ns_state == NS_PENDING && DUE(c->grace_at)) {
        LOG(LOG_WARN,
            "worker %s: no engine::workers::register within %lld ms; its registrations land in "
            "'default'",
            c->wid, (long long)S.grace_ms);
        worker_resolve(c, NS_DEFAULT);
    }
    /* docs/§10 item 2: silence past idle_timeout_ms is a dead peer; 1001 "going away" */
    if (S.set.idle_timeout_ms > 0 && DUE(c->t_rx + S.set.idle_timeout_ms)) {
        conn_close(c, 1001, "idle timeout");
        return next;
    }
    if (S.set.ping_interval_ms > 0) {
        /* ping only a quiet connection, at most once per interval (RFC 6455 §5.5.2) */
        int64_t last = c->t_rx > c->t_ping ? c->t_rx : c->t_ping;
        if (DUE(last + S.set.ping_interval_ms)) {
            conn_frame(c, WS_PING, "", 0);
            c->t_ping = now;
            DUE(now + S.set.ping_interval_ms);
        }
    }
#undef DUE
    return next;
}

/* Tears down and frees connections that are done. */
static void loop_reap(void)
{
    struct conn *c;
    S.reap_now = 0;
    for (c = S.reap; c; c = c->rnext)
        if (!c->torn) {
            if (c->kind == CK_WORKER) worker_teardown(c);
            else if (c->kind == CK_CHAN_W || c->kind == CK_CHAN_R) chan_teardown(c);
            else if (c->kind == CK_CLUSTER) cl_vc_teardown(c);
            c->torn = 1;
        }
    /* a second pass: every teardown has run before anything is freed, as a teardown may still
     * queue frames to (or close) other connections that are going away in this same turn;
     * closing connections still flushing their Close stay on the list */
    struct conn **pp = &S.reap;
    while ((c = *pp)) {
        if (!c->dead) {
            pp = &c->rnext;
            continue;
        }
        *pp = c->rnext;
        if (c->dirty) {
            /* unlink from the dirty list before freeing */
            struct conn **dp = &S.dirty;
            while (*dp && *dp != c) dp = &(*dp)->dnext;
            if (*dp) *dp = c->dnext;
        }
        conn_free(c);
    }
}

/* epoll: asks for EPOLLOUT exactly while output is pending (level-triggered, so no event is
 * missed; one epoll_ctl when a reader falls behind and one when it catches up). */
static void ep_sync(struct conn *c)
{
#ifdef III_EPOLL
    unsigned want = buf_used(&c->out) > 0;
    if (S.ep < 0 || c->fd < 0 || c->dead || want == c->ep_out) return;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(S.ep, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->ep_out = want;
    else conn_abort(c, "epoll_ctl failed");
#else
    (void)c;
#endif
}

/* epoll also carries the self-pipe, the listener and the NATS socket (ep_nats, below), tagged by
 * the addresses of ep_tag_sig, ep_tag_lfd and ep_tag_nats instead of a conn: a turn with no
 * other descriptor to watch (no worker pipe, no stdout backlog) blocks in epoll_wait alone, one
 * syscall per wake-up instead of poll() plus epoll_wait. ep_lfd is the listener registered now
 * (-1: none); ep_listener drops it from the set before the listener is closed, so a descriptor
 * number reused later by a connection is never mistaken for it. Either registration failing
 * just puts that descriptor back in poll(). */
static char ep_tag_sig, ep_tag_lfd;
static int ep_lfd = -1, ep_sig;

static int ep_add(int fd, void *tag)
{
#ifdef III_EPOLL
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.ptr = tag;
    return S.ep >= 0 && epoll_ctl(S.ep, EPOLL_CTL_ADD, fd, &ev) == 0 ? 0 : -1;
#else
    (void)fd, (void)tag;
    return -1;
#endif
}

/* Makes fd (-1: none) the listener in the epoll set; one epoll_ctl per change, none per turn. */
static void ep_listener(int fd)
{
    if (fd == ep_lfd) return;
#ifdef III_EPOLL
    if (ep_lfd >= 0) epoll_ctl(S.ep, EPOLL_CTL_DEL, ep_lfd, NULL);
#endif
    ep_lfd = fd >= 0 && ep_add(fd, &ep_tag_lfd) == 0 ? fd : -1;
}

/* The NATS socket in the epoll set too (tagged ep_tag_nats): makes its interest the poll bits
 * `pev` (POLLIN, POLLOUT; 0 takes it out), one epoll_ctl per change (POLLOUT is wanted only
 * while a write is short: nats_flush). 0 done; -1 when it cannot be there (no epoll set, or
 * epoll_ctl failed), and then the loop watches it with poll(). */
#ifdef III_EPOLL
static char ep_tag_nats;
#endif
static int ep_nats(short pev)
{
#ifdef III_EPOLL
    unsigned ev = (pev & POLLIN ? EPOLLIN : 0u) | (pev & POLLOUT ? EPOLLOUT : 0u);
    if (ev == CL.ep_ev) return 0;
    if (ev && (CL.ep_bad || !ep_sig || CL.fd < 0)) return -1;
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = ev;
    e.data.ptr = &ep_tag_nats;
    int op = !ev ? EPOLL_CTL_DEL : CL.ep_ev ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(S.ep, op, CL.fd, &e) == 0) {
        CL.ep_ev = ev;
        return 0;
    }
    /* failed: out of the set for good (until the socket is replaced), watched by poll() */
    if (CL.ep_ev) epoll_ctl(S.ep, EPOLL_CTL_DEL, CL.fd, &e);
    CL.ep_ev = 0, CL.ep_bad = 1;
    return ev ? -1 : 0;
#else
    return pev ? -1 : 0;
#endif
}

/* Writes what c->out holds and keeps the poll interest in step. A closing connection is
 * half-closed once its Close frame or HTTP answer is out: the peer reads EOF and closes, and we
 * keep reading until it does (RFC 6455 §7.1.1: ideally the server closes TCP first). */
static void conn_write(struct conn *c)
{
    if (c->kind == CK_CLUSTER) {
        cl_vc_flush(c);
        return;
    }
    conn_flush(c);
    ep_sync(c);
    if (c->closing && !buf_used(&c->out) && !c->dead) shutdown(c->fd, SHUT_WR);
}

/* Writes every dirty connection once; a closing one is half-closed once its output is out. */
static void loop_flush(void)
{
    struct conn *c = S.dirty;
    S.dirty = NULL;
    while (c) {
        struct conn *nx = c->dnext;
        c->dirty = 0;
        c->dnext = NULL;
        if (!c->dead) conn_write(c);
        c = nx;
    }
}

static void sup_tick(int64_t now, int64_t *next);
static int sup_pollfds(struct pollfd *p, size_t cap);
static void sup_on_poll(struct pollfd *p, size_t n);
static void sup_reap_children(void);
static void cfg_watch_tick(int64_t now, int64_t *next);
static void cfg_reload(const char *why);
static void sup_stop_all(void);
static int sup_running(void);
static int64_t sup_max_stop(void);
static size_t sup_slots(void);
static void sup_kill_all(void);
static void out_log(const char *line, size_t n);

/* Calls in flight that a drain waits for (not the engine's own ack and auth waits). */
static size_t drain_busy(void) { return S.invs.n - S.n_acks; }

/* SIGINT/SIGTERM: a drain first (drain_timeout_ms, README): the listener closes, new calls get
 * engine_draining, calls in flight may finish; then loop_shutdown. A second signal, no call
 * in flight, or a zero drain_timeout_ms stops at once. */
static void drain_begin(void)
{
    if (S.draining || !S.cfg.lis.drain_timeout_ms || !drain_busy()) {
        S.stop = 1;
        return;
    }
    S.draining = 1;
    S.drain_until = now_ms() + S.cfg.lis.drain_timeout_ms;
    timer_touch(S.drain_until);
    if (S.lfd >= 0) ep_listener(-1), close(S.lfd), S.lfd = -1;
    LOG(LOG_INFO, "draining: %zu calls in flight get up to %lld ms", drain_busy(),
        (long long)S.cfg.lis.drain_timeout_ms);
}

/* Graceful shutdown (SIGINT/SIGTERM): stop accepting, end every worker's calls with
 * invocation_stopped, close every connection with 1012 (Service Restart, docs/§10 item 11:
 * clients that treat 1000/1001 as final, Python's websockets among them, reconnect on it),
 * stop supervised workers, flush. */
static void loop_shutdown(void)
{
    LOG(LOG_INFO, "shutting down");
    if (S.lfd >= 0) ep_listener(-1), close(S.lfd), S.lfd = -1;
    /* targets first: their teardown ends each call in flight with invocation_stopped to its
     * caller, which must not have been torn down (and its calls forgotten) before */
    for (struct conn *c = S.conns; c; c = c->next)
        if (c->kind == CK_WORKER && c->calls_in) worker_teardown(c);
    for (struct conn *c = S.conns; c; c = c->next)
        if (c->kind == CK_WORKER) worker_teardown(c);
    for (struct conn *c = S.conns; c; c = c->next) {
        if (c->ws) conn_close(c, 1012, "engine restarting");
        else conn_abort(c, "shutdown");
    }
    /* SIGTERM to every worker group now; SIGKILL follows per stop_timeout_ms in sup_tick below */
    sup_stop_all();
    loop_flush();
    /* peers get up to 1 s to take their Close; workers their stop timeout */
    int64_t t0 = now_ms(), conn_until = t0 + 1000, until = t0 + sup_max_stop() + 500;
    if (until < conn_until) until = conn_until;
    loop_reap(); /* dead ones go now: no reason to sleep a poll round on them */
    while (now_ms() < until && ((S.conns && now_ms() < conn_until) || sup_running())) {
        size_t cap = S.nconns + sup_slots() + 1;
        struct pollfd *pf = xmalloc(cap * sizeof *pf);
        struct conn **pc = xmalloc(cap * sizeof *pc);
        if (!pf || !pc) {
            xfree(pf), xfree(pc);
            break; /* no memory to wait with: the workers are killed below */
        }
        size_t n = 0;
        for (struct conn *c = S.conns; c; c = c->next) {
            if (c->dead) continue;
            pf[n].fd = c->fd, pf[n].events = (short)(POLLIN | (buf_used(&c->out) ? POLLOUT : 0)),
            pc[n++] = c;
        }
        size_t ns = sup_pollfds(pf + n, cap - n);
        poll(pf, (nfds_t)(n + ns), 20);
        for (size_t i = 0; i < n; i++) {
            if (pf[i].revents & POLLOUT) conn_flush(pc[i]);
            if (!buf_used(&pc[i]->out) && !pc[i]->dead) shutdown(pc[i]->fd, SHUT_WR);
            if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) loop_read(pc[i]);
        }
        sup_on_poll(pf + n, ns);
        xfree(pf), xfree(pc);
        sup_reap_children();
        int64_t nx = INT64_MAX;
        sup_tick(now_ms(), &nx);
        loop_reap();
    }
    sup_kill_all(); /* anything still running past its stop timeout */
    /* whatever has not closed by now is dropped (already torn down above) */
    for (struct conn *c = S.conns; c; c = c->next) c->dead = 1, c->torn = 1, reap_push(c);
    loop_reap();
}

/* Frees every registry object at exit, so a leak checker sees only real leaks. */
static void engine_free_all(void)
{
    struct hmap *maps[] = {&S.funcs, &S.trigs, &S.ttypes, &S.leases, &S.chans, &S.invs};
    for (size_t m = 0; m < sizeof maps / sizeof maps[0]; m++) {
        size_t n = 0;
        struct hnode **v = hm_list(maps[m], &n);
        for (size_t i = 0; v && i < n; i++) {
            if (maps[m] == &S.funcs) func_remove((struct func *)v[i]);
            else if (maps[m] == &S.trigs) trig_free((struct trig *)v[i]);
            else if (maps[m] == &S.ttypes) {
                struct ttype *tt = (struct ttype *)v[i];
                xfree(tt->desc_raw), xfree(tt->treq_raw), xfree(tt->creq_raw), xfree(tt->key),
                    xfree(tt);
            } else if (maps[m] == &S.leases) {
                xfree(((struct lease *)v[i])->key), xfree(v[i]);
            } else if (maps[m] == &S.chans) chan_free((struct chan *)v[i]);
            else inv_free((struct inv *)v[i]);
        }
        xfree(v);
        hm_free(maps[m]);
    }
    hm_free(&S.tgroups), hm_free(&S.fgroups); /* emptied with the last binding of each */
    hm_free(&S.fids);                         /* ... and with the last function of each id */
    for (size_t i = 0; i < S.fstats.nb; i++)
        for (struct hnode *e = S.fstats.b[i], *nx; e; e = nx) {
            nx = e->next;
            xfree(((struct fstat *)e)->key), xfree(e);
        }
    hm_free(&S.fstats);
    xfree(S.timed), S.timed = NULL, S.ntimed = S.timed_cap = 0; /* emptied with the last call */
    while (S.inv_free) {
        struct inv *v = S.inv_free;
        S.inv_free = v->free_next;
        xfree(v);
    }
    xfree(S.jd.t);
    buf_free(&S.tmp), buf_free(&S.tmp2);
    buf_cache_trim(0), buf_out_trim();
}

/* 1 when a cache whose park/take counter is `stamp` has gone III_BUF_CACHE_MS unused (*seen and
 * *at remember the counter and when it last moved); otherwise 0, and *next becomes the time it
 * would be, if sooner. */
static int buf_cache_unused(unsigned stamp, unsigned *seen, int64_t *at, int64_t now,
                            int64_t *next)
{
    if (stamp != *seen) *seen = stamp, *at = now;
    else if (now - *at >= III_BUF_CACHE_MS) return 1;
    if (*at + III_BUF_CACHE_MS < *next) *next = *at + III_BUF_CACHE_MS;
    return 0;
}

/* The parked blocks (bcache and opark, Buffer): large ones up to III_BUF_CACHE bytes and an
 * eighth of max_memory_bytes; none of either kind once memory is over half the budget; each
 * kind freed after III_BUF_CACHE_MS without a park or a take of that kind. */
static void buf_cache_tick(int64_t now, int64_t *next)
{
    static unsigned bseen, oseen;
    static int64_t bat, oat;
    size_t lim = III_BUF_CACHE, mm = S.set.max_memory_bytes;
    if (mm && lim > mm / 8) lim = mm / 8;
    if (mm && mem_live_bytes > mm / 2) lim = 0;
    bcache.limit = lim;
    buf_cache_trim(lim);
    if (!lim) buf_out_trim();
    if (bcache.n && buf_cache_unused(bcache.stamp, &bseen, &bat, now, next)) buf_cache_trim(0);
    if (opark.n && buf_cache_unused(opark.stamp, &oseen, &oat, now, next)) buf_out_trim();
}

/* Drains the self-pipe; the sig_* flags say which signals arrived. */
static void sig_drain(void)
{
    unsigned char sink[64];
    while (read(S.sigpipe[0], sink, sizeof sink) > 0) {
    }
}

/* The engine's main loop until a shutdown is requested: flush and reap, build the poll set
 * (computing the next deadline on the way), poll, dispatch, then handle the signal flags and
 * the functions-available check. Ends with loop_shutdown. */
static void loop_run(void)
{
    struct pollfd *pf = NULL;
    struct conn **pc = NULL;
    size_t cap = 0;
    log_sink = out_log; /* from now on a log line never waits for stderr (out_write drains it) */
    ep_sig = ep_add(S.sigpipe[0], &ep_tag_sig) == 0;
    while (!S.stop) {
        loop_flush();
        loop_reap();
        int64_t now = now_ms(), next = INT64_MAX;
        /* the poll set follows the connection count (+64 for the signal pipe, the listener and the
         * worker pipes); if growing it fails, connections beyond it just wait for a later turn */
        size_t need = S.nconns + sup_slots() + 64;
        if (need > cap) {
            struct pollfd *np = xrealloc(pf, need * sizeof *pf);
            struct conn **nc = np ? xrealloc(pc, need * sizeof *pc) : NULL;
            if (np) pf = np;
            if (nc) pc = nc, cap = need;
        }
        if (!cap) { /* not even a first poll set: nothing to wait with; retry in a moment */
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
            continue;
        }
        size_t n = 0, gidx = SIZE_MAX, lidx = SIZE_MAX;
        if (!ep_sig) gidx = n, pf[n].fd = S.sigpipe[0], pf[n].events = POLLIN, pc[n++] = NULL;
        /* at max_connections the listener leaves the poll set: new peers wait in the backlog */
        int lwant = S.lfd >= 0 && S.nconns < S.set.max_connections && now >= S.accept_pause_until;
        if (!lwant && S.accept_pause_until > now && S.accept_pause_until < next)
            next = S.accept_pause_until;
        if (ep_sig) ep_listener(lwant ? S.lfd : -1);
        if (lwant && ep_lfd != S.lfd)
            lidx = n, pf[n].fd = S.lfd, pf[n].events = POLLIN, pc[n++] = NULL;
        size_t sidx = n;
        size_t ns = sup_pollfds(pf + n, cap - n);
        n += ns;
        /* connection deadlines: one scan when the earliest is due (at most every 20 ms), not a
         * walk over every connection per turn */
        if (now >= S.timer_at) {
            S.timer_at = INT64_MAX;
            for (struct conn *c = S.conns; c; c = c->next) timer_touch(loop_timers(c, now));
            if (S.timer_at < now + 20) S.timer_at = now + 20;
        }
        if (S.timer_at < next) next = S.timer_at;
        if (S.reap_now) next = now;
        /* the NATS connection (cluster:), when there is one */
        size_t nidx = SIZE_MAX;
        nats_tick(now, &next);
        if (CL.fd >= 0) {
            nats_flush();
            short ne = nats_events();
            if (ep_nats(ne) < 0 && n < cap)
                nidx = n, pf[n].fd = CL.fd, pf[n].events = ne, pc[n++] = NULL;
        }
        size_t cidx = n, eidx = SIZE_MAX;
#ifdef III_EPOLL
        if (S.ep >= 0) eidx = n, pf[n].fd = S.ep, pf[n].events = POLLIN, pc[n++] = NULL;
#endif
        for (struct conn *c = S.conns; eidx == SIZE_MAX && c && n < cap; c = c->next) {
            if (c->dead) continue;
            pf[n].fd = c->fd;
            pf[n].events = (short)(POLLIN | (buf_used(&c->out) ? POLLOUT : 0));
            pc[n++] = c;
        }
        sup_tick(now, &next);
        cfg_watch_tick(now, &next);
        inv_timeouts(now, &next);
        chan_sweep(now, &next);
        buf_cache_tick(now, &next);
        if (S.dirty || S.drain || S.resume) next = now;
        /* wake at least once a minute even with no deadline: cheap, and robust to a missed one */
        int timeout = next == INT64_MAX    ? -1
                      : next <= now        ? 0
                      : next - now > 60000 ? 60000
                                           : (int)(next - now);
        int rc;
#ifdef III_EPOLL
        struct epoll_event evs[256];
        int k = 0;
        if (eidx == 0 && n == 1) {
            /* only the epoll set to watch: wait in it directly */
            k = epoll_wait(S.ep, evs, 256, timeout);
            rc = 0;
            if (k < 0 && errno != EINTR) LOG(LOG_ERROR, "epoll_wait: %s", strerror(errno));
        } else
#endif
            rc = poll(pf, (nfds_t)n, timeout);
        if (rc < 0 && errno != EINTR) {
            LOG(LOG_ERROR, "poll: %s", strerror(errno));
            continue;
        }
        if (rc > 0) {
            if (gidx != SIZE_MAX && (pf[gidx].revents & POLLIN)) sig_drain();
            if (lidx != SIZE_MAX && (pf[lidx].revents & POLLIN)) loop_accept();
            if (nidx != SIZE_MAX) nats_on_poll(pf[nidx].revents);
            sup_on_poll(pf + sidx, ns);
            for (size_t i = cidx; eidx == SIZE_MAX && i < n; i++) {
                struct conn *c = pc[i];
                if (!pf[i].revents || c->dead) continue;
                if (pf[i].revents & POLLOUT) conn_write(c);
                if (pf[i].revents & (POLLIN | POLLHUP | POLLERR)) loop_read(c);
            }
#ifdef III_EPOLL
            if (eidx != SIZE_MAX && (pf[eidx].revents & POLLIN)) k = epoll_wait(S.ep, evs, 256, 0);
#endif
        }
#ifdef III_EPOLL
        /* only the ready connections: a turn costs nothing per idle one */
        for (int i = 0; i < k; i++) {
            if (evs[i].data.ptr == &ep_tag_sig) {
                sig_drain();
                continue;
            }
            if (evs[i].data.ptr == &ep_tag_lfd) {
                loop_accept();
                continue;
            }
            if (evs[i].data.ptr == &ep_tag_nats) {
                unsigned e = evs[i].events;
                nats_on_poll((short)((e & EPOLLIN ? POLLIN : 0) | (e & EPOLLOUT ? POLLOUT : 0) |
                                     (e & EPOLLERR ? POLLERR : 0) | (e & EPOLLHUP ? POLLHUP : 0)));
                continue;
            }
            struct conn *c = evs[i].data.ptr;
            if (c->dead) continue; /* freed only by the next reap: the pointer is valid */
            if (evs[i].events & EPOLLOUT) conn_write(c);
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) loop_read(c);
        }
#endif
        drain_tick();
        resume_tick();
        if (S.qfuncs) route_tick();
        if (S.sig_chld) S.sig_chld = 0, sup_reap_children();
        if (S.sig_hup) S.sig_hup = 0, cfg_reload("SIGHUP");
        if (S.sig_term) S.sig_term = 0, drain_begin();
        if (S.draining && (!drain_busy() || now_ms() >= S.drain_until)) S.stop = 1;
        ev_functions_tick(now_ms(), &S.timer_at);
    }
    xfree(pf);
    xfree(pc);
    loop_shutdown();
}

/* ==== Supervisor ============================================================================
 * Declared workers (entries with `command`) are child processes: fork, own process group,
 * stdin /dev/null, stdout/stderr through pipes that the loop reads and copies line by line
 * with a "[name] " prefix. SIGCHLD arrives through the self-pipe; exits are reaped with
 * waitpid(WNOHANG) and restarted per policy with exponential backoff (1 s doubling to 30 s,
 * reset after 60 s of uptime). Stop = SIGTERM to the group, SIGKILL after stop_timeout_ms.
 * An entry with `instances: N` is N processes (name.1 .. name.N); a changed entry whose
 * functions may have several providers is replaced one instance at a time (sup_roll_tick).
 * Output goes through two queues (stdout, stderr) written in whole lines when the engine's own
 * descriptors can take them; a full queue stops the reading of worker pipes (backpressure).
 *
 * Dying with the engine: at start-up the engine forks a sentinel, a tiny process in its own
 * session that holds the read end of a lifeline pipe. The engine writes "+pgid" / "-pgid"
 * lines as worker groups come and go. When the engine dies for any reason, SIGKILL included,
 * the kernel closes the write end; the sentinel reads EOF, sends SIGTERM then SIGKILL to every
 * group it still knows, and exits. No Linux-only calls are needed.
 */
struct proc {
    struct cfg_worker *w; /* its entry in S.cfg (re-pointed on reload); NULL once removed */
    char *name;           /* instance name (own copy: outlives a reload) */
    int64_t stop_ms;      /* stop_timeout_ms in force */
    pid_t pid;            /* 0: not running */
    int fd[2];            /* stdout, stderr pipes (-1 when closed) */
    struct buf line[2];   /* partial output lines */
    /* started: monotonic ms of the last start (uptime decides the backoff reset); next_start: when
     * a pending restart is due; backoff: the next restart delay; kill_at: SIGKILL deadline */
    int64_t started, next_start, backoff, kill_at;
    int stopping;                    /* SIGTERM sent */
    int remove;                      /* free once stopped */
    struct cfg_worker *restart_with; /* changed by a reload: start this once stopped */
    int dead_restart;                /* policy says: start at next_start */
    char *refusal;                   /* last registrationrejected of its process (JSON) */
    int inst;                        /* instance number (1..N), 0 when the entry has one */
    struct cfg_worker *roll_with;    /* rolling reload: to be replaced by a process of this entry */
    struct proc *roll_new;           /* ... the replacement, once started */
    int roll_phase;                  /* 0 none, 1 waiting for the new one's functions, 2 draining */
    int64_t roll_until;              /* the current phase's deadline */
    unsigned restarts;               /* restarts by its policy since the engine started it */
    int has_exit, exit_code, exit_signal; /* how it last ended (exit_signal 0: exited) */
    int64_t exit_at;                 /* ... and when (epoch ms) */
};

/* Every supervised process, in no particular order (sup_free swaps the last one in). */
static struct proc **procs;
static size_t nprocs;        /* entries in procs */

/* The supervised process running as pid, or NULL. */
static struct proc *sup_by_pid(uint32_t pid)
{
    for (size_t i = 0; i < nprocs; i++)
        if (procs[i]->pid > 0 && (uint32_t)procs[i]->pid == pid) return procs[i];
    return NULL;
}

/* Records a refusal against the declared worker running as pid (if any): it outlives the
 * connection, so a worker that reconnects and is refused again stays explained. */
static void sup_refusal_set(uint32_t pid, const char *json)
{
    struct proc *pr = sup_by_pid(pid);
    char *j = pr ? xstrdup(json) : NULL;
    if (j) xfree(pr->refusal), pr->refusal = j;
}

static const char *sup_refusal_get(uint32_t pid)
{
    struct proc *pr = sup_by_pid(pid);
    return pr ? pr->refusal : NULL;
}
static int sentinel_fd = -1; /* write end of the lifeline pipe (-1: no sentinel) */
static struct buf out_q[2];  /* worker output waiting for the engine's stdout / stderr */

/* engine::processes::list: the declared workers, each with its state (running, backoff: a
 * restart is due, failed: ended with an error and stays down, stopped), pid, restarts, uptime,
 * last exit and command. Sorted by name. */
static int sup_cmp(const void *a, const void *b)
{
    return strcmp((*(struct proc *const *)a)->name, (*(struct proc *const *)b)->name);
}

static void sup_list(struct buf *res)
{
    struct proc **v = xmalloc((nprocs + 1) * sizeof *v);
    if (!v) {
        res->err = BUF_ENOMEM;
        return;
    }
    memcpy(v, procs, nprocs * sizeof *v);
    qsort(v, nprocs, sizeof *v, sup_cmp);
    int64_t now = now_ms();
    buf_puts(res, "{\"processes\":[");
    for (size_t i = 0; i < nprocs; i++) {
        struct proc *pr = v[i];
        const char *st = pr->pid ? "running"
                         : pr->dead_restart ? "backoff"
                         : pr->has_exit && (pr->exit_code || pr->exit_signal) && !pr->stopping
                             ? "failed"
                             : "stopped";
        if (i) buf_putc(res, ',');
        buf_puts(res, "{\"name\":");
        json_put_cstr(res, pr->name);
        if (pr->pid) buf_printf(res, ",\"pid\":%ld", (long)pr->pid);
        else buf_puts(res, ",\"pid\":null");
        buf_printf(res, ",\"state\":\"%s\",\"restarts\":%u", st, pr->restarts);
        if (pr->pid) buf_printf(res, ",\"uptime_ms\":%lld", (long long)(now - pr->started));
        else buf_puts(res, ",\"uptime_ms\":null");
        if (!pr->has_exit) buf_puts(res, ",\"last_exit\":null");
        else if (pr->exit_signal)
            buf_printf(res, ",\"last_exit\":{\"signal\":%d,\"at_ms\":%lld}", pr->exit_signal,
                       (long long)pr->exit_at);
        else
            buf_printf(res, ",\"last_exit\":{\"code\":%d,\"at_ms\":%lld}", pr->exit_code,
                       (long long)pr->exit_at);
        buf_puts(res, ",\"command\":[");
        for (char **a = pr->w ? pr->w->argv : NULL; a && *a; a++) {
            if (a != pr->w->argv) buf_putc(res, ',');
            json_put_cstr(res, *a);
        }
        buf_puts(res, "]}");
    }
    buf_puts(res, "]}");
    xfree(v);
}

/* Tells the sentinel that process group pgid appeared ('+') or is gone ('-'). Best effort:
 * without a sentinel the engine still stops its workers on a normal shutdown. */
static void sentinel_cmd(char op, pid_t pgid)
{
    if (sentinel_fd < 0) return;
    char m[32];
    int n = snprintf(m, sizeof m, "%c%ld\n", op, (long)pgid);
    ssize_t w = write(sentinel_fd, m, (size_t)n); /* < PIPE_BUF: atomic, and the pipe is drained */
    (void)w;
}

/* Forks the sentinel (see the section comment), on the first spawn. It closes every inherited
 * descriptor but its pipe and points its stdio at /dev/null, so it holds nothing of ours. */
static void sentinel_start(void)
{
    int p[2];
    if (pipe(p) < 0) return;
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]), close(p[1]);
        return;
    }
    if (pid == 0) {
        setsid(); /* out of the engine's group: a kill of that group does not reach us */
        signal(SIGINT, SIG_IGN), signal(SIGTERM, SIG_IGN), signal(SIGHUP, SIG_IGN);
        signal(SIGCHLD, SIG_DFL), signal(SIGPIPE, SIG_DFL);
        int dn = open("/dev/null", O_RDWR); /* let go of the engine's stdio too */
        if (dn >= 0) dup2(dn, 0), dup2(dn, 1), dup2(dn, 2);
        long maxfd = sysconf(_SC_OPEN_MAX);
        /* keep only the lifeline: the sentinel must not hold the listener or any pipe open (it
         * would keep the port bound, or a worker's output pipe alive, after the engine died) */
        for (long fd = 3; fd < (maxfd > 0 && maxfd < 65536 ? maxfd : 1024); fd++)
            if (fd != p[0]) close((int)fd);
        static long groups[1024]; /* one per declared worker at most (III_CFG_MAX_WORKERS) */
        size_t ng = 0;
        char rb[512], ln[32];
        size_t ll = 0;
        for (;;) {
            ssize_t r = read(p[0], rb, sizeof rb);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            for (ssize_t i = 0; i < r; i++) {
                if (rb[i] != '\n') {
                    if (ll < sizeof ln - 1) ln[ll++] = rb[i];
                    continue;
                }
                ln[ll] = 0, ll = 0;
                long g = atol(ln + 1);
                if (ln[0] == '+' && ng < 1024) groups[ng++] = g;
                else if (ln[0] == '-')
                    for (size_t k = 0; k < ng; k++)
                        if (groups[k] == g) groups[k] = groups[--ng];
            }
        }
        /* the engine is gone */
        for (size_t k = 0; k < ng; k++) kill((pid_t)-groups[k], SIGTERM);
        if (ng) {
            /* one second between SIGTERM and SIGKILL: the sentinel has no config to read
             * stop_timeout_ms */
            struct timespec ts = {1, 0};
            nanosleep(&ts, NULL);
        }
        for (size_t k = 0; k < ng; k++) kill((pid_t)-groups[k], SIGKILL);
        _exit(0);
    }
    close(p[0]);
    sentinel_fd = p[1];
    fcntl(sentinel_fd, F_SETFD, FD_CLOEXEC);
}

/* Appends "[name] text\n" for output stream k (0 stdout, 1 stderr). Nothing is dropped: the
 * queue is bounded by backpressure instead (docs/§10 item 12): past III_OUTQ_HIGH bytes
 * sup_pollfds stops reading that stream's worker pipes, so a worker writing faster than the
 * engine's output drains blocks on its own write, as on a slow terminal. */
static void sup_emit(int k, const char *name, const unsigned char *p, size_t n)
{
    size_t at = out_q[k].len;
    buf_putc(&out_q[k], '[');
    buf_puts(&out_q[k], name);
    buf_puts(&out_q[k], "] ");
    buf_append(&out_q[k], p, n);
    buf_putc(&out_q[k], '\n');
    if (buf_check(&out_q[k])) out_q[k].len = at; /* out of memory: this line only is lost */
}

/* log_sink of the running engine: its own log lines join the stderr queue, whole. They cannot
 * be held back like a worker's, so past III_OUTQ_MAX they are counted instead, and the count
 * is written once output drains again. */
static unsigned long out_lost;
static void out_log(const char *line, size_t n)
{
    struct buf *q = &out_q[1];
    if (buf_used(q) + n > III_OUTQ_MAX) {
        out_lost++;
        return;
    }
    if (out_lost) {
        buf_printf(q, "iii: warn: %lu log lines lost: stderr is not being read\n", out_lost);
        out_lost = 0;
    }
    size_t at = q->len;
    buf_append(q, line, n);
    if (buf_check(q)) q->len = at;
}

/* Writes the next chunk of output stream k to fd 1 + k: at most PIPE_BUF bytes (a write that
 * size after POLLOUT does not block, POSIX), cut after the last newline in it, so every write
 * carries whole lines and the two streams, often one file (> log 2>&1), never interleave
 * mid-line. A line longer than that goes out in pieces, and its stream keeps the turn
 * (out_partial) until the line is complete. A write error discards the stream's queue: nobody
 * reads it, and the engine must neither block nor grow. */
static int out_partial; /* 1 + the stream that is in the middle of a line, or 0 */
static void out_write(int k)
{
    struct buf *q = &out_q[k];
    const unsigned char *d = buf_data(q);
    size_t len = buf_used(q) < PIPE_BUF ? buf_used(q) : PIPE_BUF, cut = len;
    while (cut && d[cut - 1] != '\n') cut--;
    if (cut) len = cut;
    ssize_t w = write(1 + k, d, len);
    if (w > 0) {
        out_partial = d[w - 1] == '\n' ? 0 : 1 + k;
        buf_consume(q, (size_t)w);
    } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
        buf_consume(q, buf_used(q));
        if (out_partial == 1 + k) out_partial = 0;
    }
}

/* Splits what arrived on a worker's pipe into lines; a line longer than III_WORKER_LINE_MAX
 * is emitted in pieces. eof flushes a final partial line. */
static void sup_lines(struct proc *pr, int k, int eof)
{
    struct buf *b = &pr->line[k];
    for (;;) {
        unsigned char *p = buf_data(b);
        size_t n = buf_used(b), scan = n < III_WORKER_LINE_MAX + 1 ? n : III_WORKER_LINE_MAX + 1;
        unsigned char *nl = scan ? memchr(p, '\n', scan) : NULL;
        if (nl && (size_t)(nl - p) <= III_WORKER_LINE_MAX) {
            size_t l = (size_t)(nl - p);
            sup_emit(k, pr->name, p, l && p[l - 1] == '\r' ? l - 1 : l);
            buf_consume(b, l + 1);
        } else if (n >= III_WORKER_LINE_MAX || (eof && n)) {
            /* no newline within the limit: emit a piece of the limit's size (or the rest) */
            size_t l = n >= III_WORKER_LINE_MAX ? III_WORKER_LINE_MAX : n;
            sup_emit(k, pr->name, p, l);
            buf_consume(b, l);
        } else {
            return;
        }
    }
}

/* Closes output pipe k of pr after emitting any final partial line. */
static void sup_close_fd(struct proc *pr, int k)
{
    if (pr->fd[k] < 0) return;
    sup_lines(pr, k, 1);
    close(pr->fd[k]);
    pr->fd[k] = -1;
    buf_free(&pr->line[k]);
}

/* Starts pr's process. 0 ok, -1 (logged) when fork or pipe fails; exec failures show up as a
 * quick exit with status 127 and the reason on the worker's stderr. */
static int sup_start(struct proc *pr)
{
    int po[2], pe[2];
    char *nm = xmalloc(strlen(pr->w->name) + 24);
    if (nm) {
        if (pr->inst) sprintf(nm, "%s.%d", pr->w->name, pr->inst);
        else strcpy(nm, pr->w->name);
    }
    if (!nm) return -1;
    xfree(pr->name);
    pr->name = nm;
    pr->stop_ms = pr->w->stop_timeout_ms;
    if (pipe(po) < 0) return -1;
    if (pipe(pe) < 0) {
        close(po[0]), close(po[1]);
        return -1;
    }
    char url[96], pidv[32];
    if (sentinel_fd < 0) sentinel_start();
    /* children dial the address actually bound (a wildcard: loopback of its family) */
    snprintf(url, sizeof url, "%s", S.worker_url);
    snprintf(pidv, sizeof pidv, "%ld", (long)getpid());
    pid_t pid = fork();
    if (pid < 0) {
        LOG(LOG_ERROR, "worker %s: fork: %s", pr->name, strerror(errno));
        close(po[0]), close(po[1]), close(pe[0]), close(pe[1]);
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        /* the child must not inherit the engine's dispositions (SIGPIPE ignored) or blocked signals
         */
        for (int sg = 1; sg < 32; sg++) sigaction(sg, &sa, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        int dn = open("/dev/null", O_RDONLY);
        if (dn >= 0) dup2(dn, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        /* only 0, 1 and 2 reach the worker: every other engine fd is close-on-exec */
        int fds[] = {dn, po[0], po[1], pe[0], pe[1]};
        for (size_t k = 0; k < sizeof fds / sizeof fds[0]; k++)
            if (fds[k] > 2) close(fds[k]);
        setenv("III_URL", url, 1);
        setenv("III_ENGINE_URL", url, 1);
        setenv("III_WORKER_NAME", pr->name, 1);
        if (pr->inst) {
            char ib[16];
            snprintf(ib, sizeof ib, "%d", pr->inst);
            setenv("III_INSTANCE", ib, 1);
        }
        setenv("III_ENGINE_PID", pidv, 1);
        /* the engine's own workers pass its authentication: a full-access token per start */
        setenv("III_TOKEN", worker_token, 1);
        /* the entry's env is applied last: it may override the III_* variables too */
        for (char **e = pr->w->env; e && *e; e++) {
            char *eq = strchr(*e, '=');
            if (eq) {
                *eq = 0;
                setenv(*e, eq + 1, 1);
                *eq = '=';
            }
        }
        if (pr->w->cwd && chdir(pr->w->cwd) < 0) {
            dprintf(2, "cannot change directory to %s: %s\n", pr->w->cwd, strerror(errno));
            _exit(127);
        }
        execvp(pr->w->argv[0], pr->w->argv);
        dprintf(2, "cannot run %s: %s\n", pr->w->argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid); /* also here: no race with the child's own call */
    close(po[1]), close(pe[1]);
    net_flags(po[0]), net_flags(pe[0]);
    pr->fd[0] = po[0], pr->fd[1] = pe[0];
    pr->pid = pid;
    pr->started = now_ms();
    pr->stopping = 0;
    pr->dead_restart = 0;
    sentinel_cmd('+', pid);
    S.n_spawns++;
    LOG(LOG_INFO, "worker %s: started (pid %ld)", pr->name, (long)pid);
    return 0;
}

/* Adds a supervised process for entry w (borrowed: it belongs to S.cfg) and starts it; a failed
 * start is retried after the backoff. NULL on OOM. */
static struct proc *sup_add_inst(struct cfg_worker *w, int inst);

/* Adds and starts every process of entry w (instances). 0 ok, -1 OOM. */
static int sup_add(struct cfg_worker *w)
{
    for (int k = 1; k <= w->instances; k++)
        if (!sup_add_inst(w, w->instances > 1 ? k : 0)) return -1;
    return 0;
}

/* Adds a supervised process for instance inst of entry w and starts it. NULL on OOM. */
static struct proc *sup_add_inst(struct cfg_worker *w, int inst)
{
    struct proc **np = xrealloc(procs, (nprocs + 1) * sizeof *np);
    struct proc *pr = xcalloc(sizeof *pr);
    if (!np || !pr) {
        if (np) procs = np;
        xfree(pr);
        return NULL;
    }
    procs = np;
    pr->w = w;
    pr->inst = inst;
    pr->fd[0] = pr->fd[1] = -1;
    pr->backoff = III_BACKOFF_MIN_MS;
    procs[nprocs++] = pr;
    if (sup_start(pr) < 0) pr->dead_restart = 1, pr->next_start = now_ms() + pr->backoff;
    return pr;
}

/* SIGTERM to the group now, SIGKILL at kill_at (sup_tick). */
static void sup_stop(struct proc *pr)
{
    pr->dead_restart = 0;
    if (!pr->pid || pr->stopping) return;
    pr->stopping = 1;
    pr->kill_at = now_ms() + pr->stop_ms;
    kill(-pr->pid, SIGTERM);
    LOG(LOG_INFO, "worker %s: stopping (pid %ld)", pr->name, (long)pr->pid);
}

/* Frees procs[i] (its process must have been reaped) and fills the hole with the last entry. */
static void sup_free(size_t i)
{
    struct proc *pr = procs[i];
    sup_close_fd(pr, 0), sup_close_fd(pr, 1);
    xfree(pr->name), xfree(pr->refusal);
    xfree(pr);
    procs[i] = procs[--nprocs];
}

/* Shutdown: every process is stopped and freed once reaped, with no restart. */
static void sup_stop_all(void)
{
    for (size_t i = 0; i < nprocs; i++) {
        procs[i]->remove = 1;
        procs[i]->restart_with = NULL;
        sup_stop(procs[i]);
    }
}

/* Poll slots the supervisor may need: two pipes per worker, plus stdout and stderr. */
static size_t sup_slots(void) { return 2 * nprocs + 2; }

/* SIGKILL to every worker group still running (end of shutdown). */
static void sup_kill_all(void)
{
    for (size_t i = 0; i < nprocs; i++)
        if (procs[i]->pid) kill(-procs[i]->pid, SIGKILL);
}

/* The longest stop timeout among running workers (shutdown waits that long at most). */
static int64_t sup_max_stop(void)
{
    int64_t m = 0;
    for (size_t i = 0; i < nprocs; i++)
        if (procs[i]->pid && procs[i]->stop_ms > m) m = procs[i]->stop_ms;
    return m;
}

/* 1 while a child runs or captured output still waits for stdout/stderr (shutdown waits). */
static int sup_running(void)
{
    for (size_t i = 0; i < nprocs; i++)
        if (procs[i]->pid) return 1;
    return buf_used(&out_q[0]) || buf_used(&out_q[1]);
}

/* The worker connection that a process announced (its pid in engine::workers::register) is
 * retired at once when the process exits, so a restarted instance never races its own ghost. */
static void sup_retire_conns(pid_t pid)
{
    for (struct conn *c = S.conns; c; c = c->next)
        if (c->kind == CK_WORKER && c->has_pid && c->pid == (uint32_t)pid && !c->torn) {
            worker_teardown(c);
            conn_abort(c, "worker process exited");
        }
}

/* Reaps every exited child (WNOHANG, after SIGCHLD) and applies the restart policy: removed
 * entries are freed, reloaded ones restart at once with the new entry, others per `restart`
 * with exponential backoff (docs/§10 item 3). Only called from the loop. */
static void sup_reap_children(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (size_t i = 0; i < nprocs; i++) {
            struct proc *pr = procs[i];
            if (pr->pid != pid) continue;
            S.n_deaths++;
            kill(-pid, SIGKILL); /* the rest of its group (a shell's children) goes with it */
            sentinel_cmd('-', pid);
            sup_retire_conns(pid);
            pr->pid = 0;
            pr->has_exit = 1, pr->exit_at = wall_ms();
            pr->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 0;
            pr->exit_signal = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
            /* on-failure restarts after a non-zero status or a death by signal */
            int failed = !WIFEXITED(st) || WEXITSTATUS(st) != 0;
            if (WIFEXITED(st))
                LOG(pr->stopping || !failed ? LOG_INFO : LOG_WARN,
                    "worker %s: exited with status %d", pr->name, WEXITSTATUS(st));
            else
                LOG(pr->stopping ? LOG_INFO : LOG_WARN, "worker %s: killed by signal %d", pr->name,
                    WIFSIGNALED(st) ? WTERMSIG(st) : 0);
            int64_t now = now_ms();
            if (pr->remove) {
                sup_free(i);
            } else if (pr->restart_with) {
                pr->w = pr->restart_with;
                pr->restart_with = NULL;
                pr->backoff = III_BACKOFF_MIN_MS;
                sup_close_fd(pr, 0), sup_close_fd(pr, 1);
                if (sup_start(pr) < 0) pr->dead_restart = 1, pr->next_start = now + pr->backoff;
            } else if (!pr->stopping && pr->w &&
                       (pr->w->restart == CFG_RESTART_ALWAYS ||
                        (pr->w->restart == CFG_RESTART_ON_FAILURE && failed))) {
                /* a worker that ran a while is not penalised for crashes long ago */
                if (now - pr->started >= III_BACKOFF_RESET_MS) pr->backoff = III_BACKOFF_MIN_MS;
                pr->next_start = now + pr->backoff;
                LOG(LOG_INFO, "worker %s: restarting in %lld ms", pr->name, (long long)pr->backoff);
                pr->backoff =
                    pr->backoff * 2 > III_BACKOFF_MAX_MS ? III_BACKOFF_MAX_MS : pr->backoff * 2;
                pr->dead_restart = 1;
            }
            break;
        }
    }
}

/* The totals over the worker connections of process pid: functions and calls in flight.
 * Returns how many connections there are. */
static size_t sup_conns_of(pid_t pid, size_t *nfuncs, size_t *inflight)
{
    size_t n = 0;
    *nfuncs = *inflight = 0;
    for (struct conn *c = S.conns; c; c = c->next)
        if (c->kind == CK_WORKER && c->has_pid && (pid_t)c->pid == pid && !c->torn)
            n++, *nfuncs += c->n_funcs, *inflight += c->n_in;
    return n;
}

/* 1 if processes a and b are instances of one entry (their names without ".k" agree). */
static int sup_same_entry(const struct proc *a, const struct proc *b)
{
    size_t la = strlen(a->name), lb = strlen(b->name);
    if (a->inst) la = (size_t)(strrchr(a->name, '.') - a->name);
    if (b->inst) lb = (size_t)(strrchr(b->name, '.') - b->name);
    return la == lb && !memcmp(a->name, b->name, la);
}

/* 1 when pr's process can be replaced without a gap (rolling reload): it is connected and
 * every function it provides may have several providers (routing: providers: many). */
static int sup_can_roll(const struct proc *pr)
{
    int any = 0;
    for (struct conn *c = S.conns; c; c = c->next) {
        if (c->kind != CK_WORKER || !c->has_pid || (pid_t)c->pid != pr->pid || c->torn) continue;
        any = 1;
        for (const struct func *f = c->funcs; f; f = f->cnext)
            if (!route_many(f->ns, strlen(f->ns), f->id, strlen(f->id))) return 0;
    }
    return any;
}

/* Rolling reload, one instance of an entry at a time: the replacement starts (phase 1) while
 * the old process stops taking calls (its connections are retiring: the router skips them and
 * the new one may take over the name lease); once the new one has registered as many
 * functions (or 10 s passed) the old one drains its calls in flight (phase 2, up to its stop
 * timeout) and is stopped. So calls keep going to the other instances and none fails. */
static void sup_roll_tick(int64_t now, int64_t *next)
{
    for (size_t i = 0; i < nprocs; i++) {
        struct proc *pr = procs[i];
        size_t of, oi, nf = 0, ni;
        if (pr->roll_with && !pr->roll_phase) {
            int busy = 0; /* one instance of an entry at a time */
            for (size_t k = 0; k < nprocs; k++)
                busy |= procs[k]->roll_phase > 0 && procs[k]->roll_phase < 3 &&
                        sup_same_entry(procs[k], pr);
            if (busy) continue;
            struct cfg_worker *nw = pr->roll_with;
            pr->roll_with = NULL, pr->roll_phase = 1, pr->roll_until = now + 10000;
            for (struct conn *c = S.conns; c; c = c->next)
                if (c->kind == CK_WORKER && c->has_pid && (pid_t)c->pid == pr->pid) c->retiring = 1;
            LOG(LOG_INFO, "worker %s: rolling reload: starting its replacement", pr->name);
            pr->roll_new = sup_add_inst(nw, pr->inst);
            pr->w = NULL; /* no restart of the old one, whatever its policy */
            pr = procs[i];
        }
        if (pr->roll_phase == 1) {
            sup_conns_of(pr->pid, &of, &oi);
            int found = 0;
            for (size_t k = 0; k < nprocs; k++) found |= procs[k] == pr->roll_new;
            if (found && pr->roll_new->pid) sup_conns_of(pr->roll_new->pid, &nf, &ni);
            if (!found || nf >= of || now >= pr->roll_until)
                pr->roll_phase = 2, pr->roll_until = now + pr->stop_ms;
        }
        if (pr->roll_phase == 2) {
            sup_conns_of(pr->pid, &of, &oi);
            if (!oi || now >= pr->roll_until) {
                pr->roll_phase = 3, pr->remove = 1;
                LOG(LOG_INFO, "worker %s: rolling reload: replacement ready, stopping the old one",
                    pr->name);
                sup_stop(pr);
            }
        }
        if (pr->roll_phase == 1 || pr->roll_phase == 2 || pr->roll_with)
            if (now + 50 < *next) *next = now + 50; /* look again soon while a roll goes on */
    }
}

/* Timers of the supervisor: SIGKILL for processes past their stop timeout (repeated every
 * second until they are reaped), and due restarts. Lowers *next to the earliest deadline. */
static void sup_tick(int64_t now, int64_t *next)
{
    sup_roll_tick(now, next);
    for (size_t i = 0; i < nprocs; i++) {
        struct proc *pr = procs[i];
        if (pr->pid && pr->stopping) {
            if (now >= pr->kill_at) {
                kill(-pr->pid, SIGKILL);
                pr->kill_at = now + 1000;
            }
            if (pr->kill_at < *next) *next = pr->kill_at;
        } else if (!pr->pid && pr->dead_restart && pr->w) {
            if (now >= pr->next_start) {
                sup_close_fd(pr, 0), sup_close_fd(pr, 1);
                pr->restarts++;
                if (sup_start(pr) < 0) pr->next_start = now + pr->backoff;
            } else if (pr->next_start < *next) {
                *next = pr->next_start;
            }
        }
    }
}

/* At exit: what is still queued for stdout/stderr gets up to a second to go out, then the rest
 * is dropped (an exit must not hang on an output nobody reads). Logging is direct again. */
static void out_flush_exit(void)
{
    log_sink = NULL;
    int64_t until = now_ms() + 1000;
    while ((buf_used(&out_q[0]) || buf_used(&out_q[1])) && now_ms() < until) {
        struct pollfd p[2];
        int n = 0;
        for (int k = 0; k < 2; k++)
            if (buf_used(&out_q[k]) && (!out_partial || out_partial == 1 + k))
                p[n].fd = 1 + k, p[n].events = POLLOUT, p[n].revents = 0, n++;
        if (poll(p, (nfds_t)n, 50) > 0)
            for (int j = 0; j < n; j++)
                if (p[j].revents) out_write(p[j].fd - 1);
    }
}

/* Poll entries: each running worker's two pipes (a stream whose queue is over III_OUTQ_HIGH
 * is not read: backpressure), then stdout/stderr when output is queued (only the stream that
 * is mid-line, while one is). */
static int sup_pollfds(struct pollfd *p, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < nprocs; i++)
        for (int k = 0; k < 2; k++)
            if (procs[i]->fd[k] >= 0 && n + 2 < cap && buf_used(&out_q[k]) < III_OUTQ_HIGH)
                p[n].fd = procs[i]->fd[k], p[n].events = POLLIN, n++;
    for (int k = 0; k < 2; k++)
        if (buf_used(&out_q[k]) && n < cap && (!out_partial || out_partial == 1 + k))
            p[n].fd = 1 + k, p[n].events = POLLOUT, n++;
    return (int)n;
}

/* Handles the poll results of sup_pollfds' entries: drains queued output to the engine's
 * stdout/stderr (out_write), reads worker pipes into line buffers. */
static void sup_on_poll(struct pollfd *p, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        if (!p[j].revents) continue;
        if (p[j].fd == 1 || p[j].fd == 2) {
            out_write(p[j].fd - 1);
            continue;
        }
        for (size_t i = 0; i < nprocs; i++)
            for (int k = 0; k < 2; k++) {
                struct proc *pr = procs[i];
                if (pr->fd[k] != p[j].fd) continue;
                /* read at most what fits after reserving 4 KiB; sup_lines keeps the line buffer
                 * short */
                if (buf_reserve(&pr->line[k], 4096) < 0) {
                    sup_close_fd(pr, k);
                    continue;
                }
                ssize_t r = read(pr->fd[k], pr->line[k].p + pr->line[k].len,
                                 pr->line[k].cap - pr->line[k].len);
                if (r > 0) {
                    pr->line[k].len += (size_t)r;
                    sup_lines(pr, k, 0);
                } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                    sup_close_fd(pr, k);
                }
            }
    }
}

/* ==== Configuration and hot reload ==========================================================
 * The loaded config lives in S.cfg; the listener settings are copied into S.set (the CLI's
 * --host/--port win). Reload: load + validate everything first; on any error the engine stops
 * its workers and exits non-zero with a message starting "reload:". Otherwise the entries are
 * diffed by instance name (structural comparison, key order ignored) and only added, removed
 * and changed process workers are touched; a changed host/port rebinds the listener.
 */
static const char *cli_host;
static long cli_port = -1;
static struct cfg_watch {
    int have;                      /* watching is on (a config file existed at start-up) */
    struct stat st;                /* the file's last seen stat (mtime, size, inode) */
    int64_t next_check, reload_at; /* next stat() poll; debounced reload time (0: none) */
} watch;

/* Copies the listener settings of S.cfg into S.set; --host/--port from the command line win.
 * S.set borrows the strings (host, origins) from S.cfg or argv: nothing to free here. */
static void settings_from_cfg(void)
{
    struct cfg_listener *l = &S.cfg.lis;
    S.set.host = cli_host ? (char *)cli_host : l->host;
    S.set.port = cli_port >= 0 ? (int)cli_port : l->port;
    S.set.handshake_timeout_ms = l->handshake_timeout_ms;
    S.set.ping_interval_ms = l->ping_interval_ms;
    S.set.idle_timeout_ms = l->idle_timeout_ms;
    S.set.max_message_bytes = l->max_message_bytes;
    S.set.max_frame_bytes = l->max_frame_bytes;
    S.set.max_header_bytes = l->max_header_bytes;
    S.set.max_connections = l->max_connections;
    if (S.set.max_connections > fd_conn_cap) {
        S.set.max_connections = fd_conn_cap;
        LOG(LOG_INFO, "max_connections capped to %zu by the descriptor limit (RLIMIT_NOFILE, %d kept "
                      "in reserve)", fd_conn_cap, III_FD_RESERVE);
    }
    S.set.max_outbound_bytes = l->max_outbound_bytes;
    S.set.max_pending_bytes = l->max_pending_bytes;
    S.set.max_pending_frames = l->max_pending_frames;
    S.set.max_inflight_per_connection = l->max_inflight_per_connection;
    S.set.max_inflight_total = l->max_inflight_total;
    S.set.max_functions_per_connection = l->max_functions_per_connection;
    S.set.max_triggers_per_connection = l->max_triggers_per_connection;
    S.set.max_triggers_per_function = l->max_triggers_per_function;
    S.set.max_triggers = l->max_triggers;
    S.set.max_memory_bytes = l->max_memory_bytes;
    /* a reload's new outbound cap applies to the connections already open, too */
    for (struct conn *c = S.conns; c; c = c->next)
        c->out.lim = l->max_outbound_bytes, c->pendq.lim = l->max_pending_bytes;
    S.set.origins = l->allowed_origins;
    S.set.n_origins = l->n_origins;
    if (auth_load(l) < 0) LOG(LOG_ERROR, "out of memory building the listener's authentication");
    if (l->worker_token) snprintf(worker_token, sizeof worker_token, "%s", l->worker_token);
    else if (!worker_token[0]) { /* per start: 32 random bytes as hex, full access */
        unsigned char r[32];
        rnd_bytes(r, sizeof r);
        for (int i = 0; i < 32; i++) snprintf(worker_token + 2 * i, 3, "%02x", r[i]);
    }
}

/* stat() of the config file; -1 with errno when it is missing. */
static int watch_stat(struct stat *st) { return stat(S.cfg_path, st); }

/* 1 if the file looks different: the inode catches rename-over saves, ctime and nanosecond
 * mtime catch same-second, same-size in-place edits where the platform has them. */
static int watch_changed(const struct stat *a, const struct stat *b)
{
    return a->st_mtime != b->st_mtime || a->st_size != b->st_size || a->st_ino != b->st_ino ||
           a->st_dev != b->st_dev || a->st_ctime != b->st_ctime
#if defined(_POSIX_VERSION) && _POSIX_VERSION >= 200809L
           || a->st_mtim.tv_nsec != b->st_mtim.tv_nsec
#endif
        ;
}

/* Polls config.yaml's stat (catches in-place writes and write-temp-then-rename saves alike). */
static void cfg_watch_tick(int64_t now, int64_t *next)
{
    if (!watch.have) return;
    if (now >= watch.next_check) {
        struct stat st;
        int rc = watch_stat(&st);
        if (rc < 0) memset(&st, 0, sizeof st);
        if (watch_changed(&st, &watch.st)) {
            watch.st = st;
            watch.reload_at =
                now + III_RELOAD_DEBOUNCE_MS; /* debounce: a burst of writes = one reload */
        }
        watch.next_check = now + III_WATCH_INTERVAL_MS;
    }
    if (watch.reload_at && now >= watch.reload_at) {
        watch.reload_at = 0;
        cfg_reload("config.yaml changed");
    }
    if (watch.next_check < *next) *next = watch.next_check;
    if (watch.reload_at && watch.reload_at < *next) *next = watch.reload_at;
}

/* The entry of c with instance name `name`, or NULL (a linear scan: configs are small). */
static struct cfg_worker *cfg_find(struct cfg *c, const char *name)
{
    for (size_t i = 0; i < c->nw; i++)
        if (!strcmp(c->w[i].name, name)) return &c->w[i];
    return NULL;
}

/* 1 for an entry the supervisor runs (not built-in, has a command). */
static int cfg_is_process(const struct cfg_worker *w) { return !w->builtin && w->argv; }

/* Opens the listener for S.set; prints the listening line. 0 ok, -1 with err. */
/* The URL a local process dials to reach listening socket fd, from the address actually bound
 * (getsockname), not from the configured text: a wildcard bind gives the loopback address of
 * the same family (0.0.0.0 -> 127.0.0.1, :: -> [::1]); any other address is used as it is, an
 * IPv6 one in brackets. Falls back to 127.0.0.1. */
static void listener_url(int fd, int port, char *out, size_t cap)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char a[INET6_ADDRSTRLEN] = "127.0.0.1";
    int v6 = 0;
    memset(&ss, 0, sizeof ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *s4 = (struct sockaddr_in *)(void *)&ss;
            if (s4->sin_addr.s_addr != htonl(INADDR_ANY))
                inet_ntop(AF_INET, &s4->sin_addr, a, sizeof a);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)(void *)&ss;
            v6 = 1;
            if (!memcmp(&s6->sin6_addr, &in6addr_any, sizeof in6addr_any)) strcpy(a, "::1");
            else inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof a);
        }
    }
    snprintf(out, cap, v6 ? "ws://[%s]:%d" : "ws://%s:%d", a, port);
}

static int listener_open(char *err, size_t errlen)
{
    int bound;
    int fd = net_listen(S.set.host, S.set.port, &bound, err, errlen);
    if (fd < 0) return -1;
    if (S.lfd >= 0) ep_listener(-1), close(S.lfd);
    S.lfd = fd;
    S.bound_port = bound;
    snprintf(S.listen_url, sizeof S.listen_url,
             strchr(S.set.host, ':') ? "ws://[%s]:%d" : "ws://%s:%d", S.set.host, bound);
    listener_url(fd, bound, S.worker_url, sizeof S.worker_url);
    char line[128];
    int n = snprintf(line, sizeof line, "iii: listening on %s\n", S.listen_url);
    /* on stdout in one write: whoever started the engine can wait for it and learn the port */
    ssize_t w = write(1, line, (size_t)n);
    (void)w;
    return 0;
}

/* Logs each warning the config produced (unknown entry keys), one line each. */
static void cfg_log_warnings(const struct cfg *c)
{
    const char *s = (const char *)buf_data(&c->warnings), *e;
    size_t left = buf_used(&c->warnings);
    while (s && left && (e = memchr(s, '\n', left))) {
        LOG(LOG_WARN, "%.*s", (int)(e - s), s);
        left -= (size_t)(e - s) + 1, s = e + 1;
    }
}

/* 1 if process pr's instance number exists in entry w: the single process of a one-instance
 * entry, or one of 1..N. */
static int sup_inst_fits(const struct proc *pr, const struct cfg_worker *w)
{
    return w->instances > 1 ? pr->inst >= 1 && pr->inst <= w->instances : pr->inst == 0;
}

/* 1 if two worker entries are the same but for `instances` (that key alone starts or stops
 * the difference, and restarts nothing). */
static int cfg_entry_same(const struct yaml_node *a, const struct yaml_node *b)
{
    if (!a || !b || a->kind != YAML_MAP || b->kind != YAML_MAP) return yaml_equal(a, b);
    size_t na = 0, nb = 0;
    for (size_t i = 0; i < a->n; i++) {
        if (!strcmp(a->keys[i], "instances")) continue;
        na++;
        size_t j = 0;
        while (j < b->n && strcmp(b->keys[j], a->keys[i])) j++;
        if (j == b->n || !yaml_equal(a->items[i], b->items[j])) return 0;
    }
    for (size_t j = 0; j < b->n; j++) nb += strcmp(b->keys[j], "instances") != 0;
    return na == nb;
}

/* iii --check: the config is valid (cfg_load already said otherwise and exited 1); prints what
 * would run: the listener and each declared worker with its command. Returns 0. */
static int cfg_check_print(int missing)
{
    const struct cfg_listener *l = &S.cfg.lis;
    printf("%s: %s\n", S.cfg_path, missing ? "absent: built-in defaults" : "valid");
    printf("listener: %s%s%s:%d\n", strchr(l->host, ':') ? "[" : "", l->host,
           strchr(l->host, ':') ? "]" : "", cli_port >= 0 ? (int)cli_port : l->port);
    size_t n = 0;
    for (size_t i = 0; i < S.cfg.nw; i++) {
        const struct cfg_worker *w = &S.cfg.w[i];
        if (!cfg_is_process(w)) continue;
        printf("worker %s:", w->name);
        for (char **a = w->argv; a && *a; a++) printf(" %s", *a);
        printf("  (restart %s)\n", w->restart == CFG_RESTART_ALWAYS       ? "always"
                                   : w->restart == CFG_RESTART_ON_FAILURE ? "on-failure"
                                                                          : "never");
        n++;
    }
    printf("%zu worker%s to start\n", n, n == 1 ? "" : "s");
    return 0;
}

/* A failed reload: the reason on stderr ("iii: ...: reload: ..."), then workers stopped and
 * exit 1 (the default), or, with on_invalid_reload: keep, the running config kept. */
static void reload_fail(const char *fmt, ...) III_PRINTF(1, 2);
static void reload_fail(const char *fmt, ...)
{
    char m[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof m, fmt, ap);
    va_end(ap);
    /* on_invalid_reload: keep: the running configuration stays, the reason is logged */
    if (S.cfg.keep_on_invalid) {
        LOG(LOG_ERROR, "reload of %s failed, keeping the running configuration: %s", S.cfg_path,
            m);
        return;
    }
    LOG(LOG_ERROR, "reload: %s", m);
    S.exit_code = 1;
    /* no exit() here: the loop ends, so workers are stopped and output flushed on the way out */
    S.stop = 1;
}

/* Hot reload (§8.5, docs/§10 item 4), from the config watch or SIGHUP. Loads and
 * validates the whole file first; any failure is fatal via reload_fail. Then rebinds the
 * listener if host/port changed, and diffs process entries by instance name: removed ones are
 * stopped, changed ones stopped and restarted from the new entry, added ones started. The old
 * config is freed last: procs are re-pointed at entries of the new one before that. */
static void cfg_reload(const char *why)
{
    struct cfg nc;
    int missing = 0;
    char err[1024];
    LOG(LOG_INFO, "reloading %s (%s)", S.cfg_path, why);
    if (cfg_load(S.cfg_path, &nc, &missing, err, sizeof err) < 0) {
        reload_fail("parse failed: %s", err);
        return;
    }
    if (missing) {
        cfg_free(&nc);
        reload_fail("parse failed: %s: the config file is gone", S.cfg_path);
        return;
    }
    cfg_log_warnings(&nc);
    /* the listener first: if it cannot be rebound, nothing else has been touched */
    int rebound = 0;
    struct cfg old = S.cfg;
    S.cfg = nc;
    char *oh = xstrdup(S.set.host);
    int oport = S.set.port;
    settings_from_cfg();
    timer_touch(now_ms()); /* new ping/idle/handshake settings: rescan the deadlines */
    if (oh && (strcmp(oh, S.set.host) || oport != S.set.port)) {
        if (listener_open(err, sizeof err) < 0) {
            xfree(oh);
            S.cfg = old;
            settings_from_cfg();
            cfg_free(&nc);
            reload_fail("cannot rebind the listener: %s", err);
            return;
        }
        LOG(LOG_INFO, "listener rebound to %s", S.listen_url);
        rebound = 1;
    }
    xfree(oh);
    /* diff by entry and instance: a process outside the new entry's instances goes, a changed
     * entry restarts its processes (one at a time, when they can roll: sup_can_roll), a new
     * instance starts; `instances` alone changes nothing for the others */
    size_t added = 0, removed = 0, changed = 0;
    for (size_t i = 0; i < nprocs; i++) {
        struct proc *pr = procs[i];
        struct cfg_worker *nw = pr->w ? cfg_find(&S.cfg, pr->w->name) : NULL;
        if (pr->restart_with) {
            /* still stopping from an earlier reload: restart from this config's entry, if any */
            nw = cfg_find(&S.cfg, pr->restart_with->name);
            pr->restart_with = nw && cfg_is_process(nw) && sup_inst_fits(pr, nw) ? nw : NULL;
            if (!pr->restart_with) pr->remove = 1;
            continue;
        }
        if (pr->remove || !pr->w) {
            pr->w = NULL;
            continue;
        }
        if (!nw || !cfg_is_process(nw) || !sup_inst_fits(pr, nw)) {
            pr->remove = 1;
            pr->restart_with = NULL;
            pr->w = NULL;
            pr->roll_with = NULL;
            if (pr->pid) sup_stop(pr);
            else pr->dead_restart = 0;
            removed++;
        } else if (!cfg_entry_same(pr->w->entry, nw->entry) ||
                   (!pr->pid && !pr->dead_restart && !pr->stopping)) {
            changed++;
            if (pr->pid && nw->instances > 1 && sup_can_roll(pr)) {
                pr->roll_with = nw; /* replaced by sup_roll_tick, one instance at a time */
                pr->w = nw;
            } else if (pr->pid) {
                sup_stop(pr);
                pr->restart_with = nw; /* started from the new entry once the old one is gone */
                pr->w = NULL;
            } else {
                pr->w = nw;
                pr->backoff = III_BACKOFF_MIN_MS;
                sup_close_fd(pr, 0), sup_close_fd(pr, 1);
                if (sup_start(pr) < 0)
                    pr->dead_restart = 1, pr->next_start = now_ms() + pr->backoff;
            }
        } else {
            pr->w = nw; /* unchanged: never touched */
        }
    }
    for (size_t i = 0; i < S.cfg.nw; i++) {
        struct cfg_worker *w = &S.cfg.w[i];
        if (!cfg_is_process(w)) continue;
        for (int k = 1; k <= w->instances; k++) {
            int inst = w->instances > 1 ? k : 0, found = 0;
            for (size_t q = 0; q < nprocs && !found; q++) {
                struct proc *pr = procs[q];
                struct cfg_worker *pw = pr->w ? pr->w : pr->restart_with;
                found = !pr->remove && pw && !strcmp(pw->name, w->name) && pr->inst == inst;
            }
            if (!found) sup_add_inst(w, inst), added++;
        }
    }
    /* only now: every proc points into the new config (or has w == NULL) */
    cfg_free(&old);
    LOG(LOG_INFO, "reload of %s applied: %zu added, %zu removed, %zu changed, listener %s", S.cfg_path,
        added, removed, changed, rebound ? "rebound" : "unchanged");
}
/* The command-line synopsis (engine mode and the two CLI client commands). */
/* ==== CLI client ============================================================================
 * `iii trigger` and `iii list` (docs/§10 item 9): a blocking client in the same binary that
 * connects as an ordinary worker (no engine::workers::register, so it never shows in the
 * registry), sends one invokefunction and waits for its result. Same framing code as the
 * engine; client frames are masked (RFC 6455 §5.3; a zero key is legal).
 */
/* The token the client commands present (--token, else $III_TOKEN), or NULL. */
static const char *cli_token;

/* One blocking client connection: fd (blocking socket), input and output buffers, and the
 * deadline (monotonic ms) that bounds every wait in cli_fill. */
struct cli {
    int fd;
    struct buf in, out;
    int64_t deadline;
};

/* Writes all of c->out (a blocking socket: a command sends a few hundred bytes). */
static int cli_flush(struct cli *c)
{
    while (buf_used(&c->out)) {
        ssize_t w = write(c->fd, buf_data(&c->out), buf_used(&c->out));
        if (w > 0) buf_consume(&c->out, (size_t)w);
        else if (w < 0 && errno == EINTR) continue;
        else return -1;
    }
    return 0;
}

/* Reads more bytes, waiting at most until the deadline. 0 ok, -1 EOF/error/timeout. */
static int cli_fill(struct cli *c)
{
    int64_t left = c->deadline - now_ms();
    if (left <= 0) return -1;
    struct pollfd pf = {c->fd, POLLIN, 0};
    if (poll(&pf, 1, (int)left) <= 0) return -1;
    /* read in 64 KiB steps: one read per poll, many frames per read */
    if (buf_reserve(&c->in, 65536) < 0) return -1;
    ssize_t r = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (r <= 0) return -1;
    c->in.len += (size_t)r;
    return 0;
}

/* Next text or binary message into *p and *n (valid until the next call). Pings are answered.
 * Returns 0, or -1 with why set. */
static int cli_recv(struct cli *c, unsigned char **p, size_t *n, const char **why)
{
    for (;;) {
        int op, fin, code;
        size_t plen;
        unsigned char mask[4];
        /* server frames are unmasked (RFC 6455 §5.1); 1 GiB bounds what one answer may make us
         * buffer */
        int hl = ws_parse_hdr(buf_data(&c->in), buf_used(&c->in), 0, (size_t)1 << 30, &op, &fin,
                              &plen, mask, &code);
        if (hl < 0) {
            *why = "protocol error from the engine";
            return -1;
        }
        if (hl == 0 || buf_used(&c->in) - (size_t)hl < plen) {
            if (cli_fill(c) < 0) {
                *why = now_ms() >= c->deadline ? "timed out" : "connection closed";
                return -1;
            }
            continue;
        }
        unsigned char *pl = buf_data(&c->in) + hl;
        buf_consume(&c->in, (size_t)hl + plen); /* data stays in place until the next fill */
        if (op == WS_PING) {
            ws_frame(&c->out, WS_PONG, pl, plen, 1);
            cli_flush(c);
        } else if (op == WS_CLOSE) {
            *why = "the engine closed the connection";
            return -1;
        } else if (op == WS_TEXT || op == WS_BIN) {
            *p = pl, *n = plen;
            return 0;
        }
    }
}

/* Connects to url (ws://host:port[/path]) and completes the handshake. */
static int cli_connect(struct cli *c, const char *url, const char **why)
{
    char host[256], port[16] = "49134", path[256] = "/";
    const char *h = url;
    if (!strncmp(h, "ws://", 5)) h += 5;
    else if (strstr(h, "://")) {
        *why = "only ws:// URLs are supported";
        return -1;
    }
    const char *hend, *pp;
    if (*h == '[') {
        hend = strchr(h, ']');
        if (!hend) {
            *why = "bad URL";
            return -1;
        }
        snprintf(host, sizeof host, "%.*s", (int)(hend - h - 1), h + 1);
        pp = hend + 1;
    } else {
        hend = h + strcspn(h, ":/");
        snprintf(host, sizeof host, "%.*s", (int)(hend - h), h);
        pp = hend;
    }
    if (*pp == ':') {
        size_t pl = strcspn(pp + 1, "/");
        snprintf(port, sizeof port, "%.*s", (int)pl, pp + 1);
        pp += 1 + pl;
    }
    if (*pp == '/') snprintf(path, sizeof path, "%s", pp);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) || !res) {
        *why = "cannot resolve the engine's host";
        return -1;
    }
    c->fd = -1;
    for (struct addrinfo *ai = res; ai && c->fd < 0; ai = ai->ai_next) {
        c->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (c->fd >= 0 && connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0) close(c->fd), c->fd = -1;
    }
    freeaddrinfo(res);
    if (c->fd < 0) {
        *why = "cannot connect to the engine";
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* a fresh random 16-byte nonce per handshake (RFC 6455 §4.1), and the accept value we expect */
    unsigned char kb[16];
    char key[25], acc[29];
    rnd_bytes(kb, 16);
    b64_encode(kb, 16, key);
    ws_accept_key(key, strlen(key), acc);
    buf_printf(&c->out,
               "GET %s HTTP/1.1\r\nHost: %s%s%s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n",
               path, strchr(host, ':') ? "[" : "", host, strchr(host, ':') ? "]" : "", port, key);
    if (cli_token && *cli_token) buf_printf(&c->out, "Authorization: Bearer %s\r\n", cli_token);
    buf_puts(&c->out, "\r\n");
    if (cli_flush(c) < 0) {
        *why = "cannot send the handshake";
        return -1;
    }
    for (;;) {
        char *hd = buf_cstr(&c->in), *e = hd ? strstr(hd, "\r\n\r\n") : NULL;
        if (e) {
            /* RFC 6455 §4.1: anything but 101 with our Sec-WebSocket-Accept fails the connection */
            if (!strncmp(hd, "HTTP/1.1 401", 12)) {
                *why = "the engine requires a token (401): pass --token T or set $III_TOKEN";
                return -1;
            }
            if (strncmp(hd, "HTTP/1.1 101", 12) || !strstr(hd, acc)) {
                *why = "the engine refused the WebSocket upgrade";
                return -1;
            }
            buf_consume(&c->in, (size_t)(e + 4 - hd));
            return 0;
        }
        if (cli_fill(c) < 0) {
            *why = "no handshake answer";
            return -1;
        }
    }
}

/* Calls function_id with data (JSON text) and leaves the invocationresult frame in *frame.
 * Returns 0, or -1 with why. */
static int cli_call(const char *url, const char *fid, const char *data, const char *ns,
                    int64_t timeout_ms, struct buf *frame, const char **why)
{
    struct cli c;
    memset(&c, 0, sizeof c);
    c.deadline = now_ms() + timeout_ms;
    int rc = -1;
    if (cli_connect(&c, url, why) < 0) goto out;
    char id[37];
    uuid_new(id);
    struct buf m = {0};
    buf_printf(&m, "{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":", id);
    json_put_cstr(&m, fid);
    buf_puts(&m, ",\"data\":");
    buf_puts(&m, data);
    if (ns) buf_puts(&m, ",\"namespace\":"), json_put_cstr(&m, ns);
    buf_putc(&m, '}');
    ws_frame(&c.out, WS_TEXT, buf_data(&m), buf_used(&m), 1);
    buf_free(&m);
    if (cli_flush(&c) < 0) {
        *why = "cannot send";
        goto out;
    }
    for (;;) {
        unsigned char *p;
        size_t n;
        if (cli_recv(&c, &p, &n, why) < 0) goto out;
        struct jdoc d = {0};
        d.max = 4096;
        /* the engine answers with our invocation_id (§3.2); other frames (workerregistered, and so
         * on) are skipped */
        int ok = json_parse(&d, p, n, 2, 1) == 0 && d.t[0].type == J_OBJECT &&
                 json_streq(&d, json_get(&d, 0, "type"), "invocationresult") &&
                 json_streq(&d, json_get(&d, 0, "invocation_id"), id);
        xfree(d.t);
        if (ok) {
            buf_append(frame, p, n);
            rc = 0;
            break;
        }
    }
    /* a polite 1000 (normal closure) close; we do not wait for the engine's answer */
    ws_frame(&c.out, WS_CLOSE, "\x03\xe8", 2, 1);
    cli_flush(&c);
out:
    if (c.fd > 0) close(c.fd);
    buf_free(&c.in), buf_free(&c.out);
    return rc;
}

/* Prints a result/err of a frame: returns the exit status (0 ok, 1 error result). */
static const char *cli_list_key, *const *cli_list_cols, *cli_list_ns;

static int cli_report(struct buf *frame, int as_json, void (*table)(const struct jdoc *, int))
{
    struct jdoc d = {0};
    /* a listing can be long: no token cap; depth 64 tokenizes all of it for the tables */
    d.max = UINT32_MAX;
    buf_cstr(frame);
    if (json_parse(&d, buf_data(frame), buf_used(frame), 64, 0) < 0) {
        fprintf(stderr, "iii: error: malformed answer from the engine\n");
        xfree(d.t);
        return 1;
    }
    int err = json_get(&d, 0, "error"), res = json_get(&d, 0, "result");
    if (!JABSENT(&d, err)) {
        char *code = json_strdup(&d, json_get(&d, err, "code"), NULL);
        char *msg = json_strdup(&d, json_get(&d, err, "message"), NULL);
        fprintf(stderr, "iii: error: %s: %s\n", code ? code : "UNKNOWN", msg ? msg : "");
        if (as_json) printf("{\"error\":%.*s}\n", (int)JLEN(&d, err), JRAW(&d, err));
        xfree(code), xfree(msg), xfree(d.t);
        return 1;
    }
    int arr = cli_list_ns && cli_list_key ? json_get(&d, res, cli_list_key) : -1;
    if (as_json && JTYPE(&d, arr) == J_ARRAY) {
        /* --namespace filters the JSON as it filters the table: the rows in that namespace */
        printf("{\"%s\":[", cli_list_key);
        int k = 0;
        for (uint32_t i = 0, e = (uint32_t)arr + 1; i < d.t[arr].n; i++, e = d.t[e].next) {
            int nst = json_get(&d, (int)e, "namespace");
            if (JTYPE(&d, nst) == J_STRING && !json_streq(&d, nst, cli_list_ns)) continue;
            printf("%s%.*s", k++ ? "," : "", (int)JLEN(&d, (int)e), JRAW(&d, (int)e));
        }
        printf("]}\n");
    } else if (as_json || !table) {
        if (res < 0) printf("null\n");
        else printf("%.*s\n", (int)JLEN(&d, res), JRAW(&d, res));
    } else {
        table(&d, res);
    }
    xfree(d.t);
    return 0;
}

/* Human-readable tables for `iii list`: one row per entry, tab-separated columns. */
static void cli_cell(const struct jdoc *d, int obj, const char *key, int last)
{
    int t = json_get(d, obj, key);
    char *s = NULL;
    if (JTYPE(d, t) == J_STRING) s = json_strdup(d, t, NULL);
    if (s) printf("%s", s);
    else if (t >= 0 && JTYPE(d, t) != J_NULL) printf("%.*s", (int)JLEN(d, t), JRAW(d, t));
    else printf("-");
    xfree(s);
    putchar(last ? '\n' : '\t');
}

/* ==== CLI worker: iii serve and iii watch ===================================================
 * Long-lived clients in the same binary. `iii serve` is a worker with zero dependencies: it
 * registers one function and runs a command per call, the payload on stdin and the result on
 * stdout (like `nats reply --command`). `iii watch` prints the discovery events. Both run a
 * small poll loop of their own (the socket, and for serve each running command's three pipes),
 * reconnect with backoff when the engine goes away, and stop on SIGINT/SIGTERM.
 * Invariants: at most `concurrency` commands run at once, each in its own process group (a
 * timeout kills the group); at most SRV_MAX_WAITING calls wait; a command's stdout is capped at
 * the engine's message size and its stderr at SRV_MAX_STDERR, so no command can grow the
 * client without bound; every result is valid UTF-8 JSON.
 */
#define SRV_MAX_WAITING 1000      /* calls waiting for a free slot; then BUSY */
#define SRV_MAX_STDOUT  (64u << 20) /* a result larger than the engine takes is pointless */
#define SRV_MAX_STDERR  65536     /* error messages are for people */

static volatile sig_atomic_t cli_stop; /* SIGINT/SIGTERM seen */
static void cli_on_signal(int sig)
{
    (void)sig;
    cli_stop = 1;
}

/* The next complete text/binary message already in c->in, without reading: 1 with *p and *n set,
 * 0 when more bytes are needed, -1 when the engine closed or broke the protocol. Pings are
 * answered. */
static int cli_next(struct cli *c, unsigned char **p, size_t *n)
{
    for (;;) {
        int op, fin, code;
        size_t plen;
        unsigned char mask[4];
        int hl = ws_parse_hdr(buf_data(&c->in), buf_used(&c->in), 0, (size_t)1 << 30, &op, &fin,
                              &plen, mask, &code);
        if (hl < 0) return -1;
        if (hl == 0 || buf_used(&c->in) - (size_t)hl < plen) return 0;
        unsigned char *pl = buf_data(&c->in) + hl;
        buf_consume(&c->in, (size_t)hl + plen); /* the bytes stay until the next read */
        if (op == WS_PING) {
            ws_frame(&c->out, WS_PONG, pl, plen, 1);
        } else if (op == WS_CLOSE) {
            return -1;
        } else if (op == WS_TEXT || op == WS_BIN) {
            *p = pl, *n = plen;
            return 1;
        }
    }
}

/* Reads what the socket has (one read). 0 ok, -1 EOF or error. */
static int cli_read(struct cli *c)
{
    if (buf_reserve(&c->in, 65536) < 0) return -1;
    ssize_t r = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (r < 0 && errno == EINTR) return 0;
    if (r <= 0) return -1;
    c->in.len += (size_t)r;
    return 0;
}

/* Queues one masked text frame with the JSON in m. */
static void cli_send(struct cli *c, const struct buf *m)
{
    ws_frame(&c->out, WS_TEXT, buf_data(m), buf_used(m), 1);
}

/* Announces the client (engine::workers::register) with name and runtime; with_pid makes it
 * visible in engine::workers::list (§5.7). */
static void cli_announce(struct cli *c, const char *name, const char *runtime, const char *ns,
                         int with_pid)
{
    struct buf m = {0};
    char id[37];
    uuid_new(id);
    buf_printf(&m, "{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":"
                   "\"engine::workers::register\",\"data\":{\"name\":", id);
    json_put_cstr(&m, name);
    buf_puts(&m, ",\"runtime\":");
    json_put_cstr(&m, runtime);
    buf_puts(&m, ",\"version\":\"" III_VERSION "\"");
    if (with_pid) buf_printf(&m, ",\"pid\":%ld", (long)getpid());
    if (ns) buf_puts(&m, ",\"namespace\":"), json_put_cstr(&m, ns);
    buf_puts(&m, "}}");
    cli_send(c, &m);
    buf_free(&m);
}


/* One call being served: its command's process and pipes, or (pid 0) a call still waiting. */
struct srv_job {
    char id[37];           /* invocation_id, "" for a void call (no reply) */
    pid_t pid;             /* 0 while waiting; -1 once reaped */
    int fd[3];             /* command's stdin (write end), stdout, stderr (read ends); -1 closed */
    struct buf in, out, err; /* payload still to write; what it printed */
    int status;            /* waitpid status once reaped */
    int timed_out;         /* killed at the deadline */
    int64_t deadline;      /* monotonic ms; 0 = none */
    struct srv_job *next;
};

/* What `iii serve` was asked to do. */
struct srv {
    const char *fid, *ns, *name, *desc;
    char **argv;        /* the command */
    int concurrency;
    int64_t timeout_ms; /* 0 = none */
    struct srv_job *jobs; /* running and waiting, oldest first */
    size_t running, waiting;
};

/* Starts job j's command: its own process group, payload on stdin, env III_FUNCTION_ID and
 * III_INVOCATION_ID. -1 when a pipe or fork fails (the call then fails). */
static int srv_spawn(struct srv *s, struct srv_job *j)
{
    int pi[2] = {-1, -1}, po[2] = {-1, -1}, pe[2] = {-1, -1};
    if (pipe(pi) < 0 || pipe(po) < 0 || pipe(pe) < 0) goto fail;
    pid_t pid = fork();
    if (pid < 0) goto fail;
    if (pid == 0) {
        setpgid(0, 0);
        signal(SIGPIPE, SIG_DFL), signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL);
        dup2(pi[0], 0), dup2(po[1], 1), dup2(pe[1], 2);
        int fds[] = {pi[0], pi[1], po[0], po[1], pe[0], pe[1]};
        for (size_t k = 0; k < 6; k++)
            if (fds[k] > 2) close(fds[k]);
        setenv("III_FUNCTION_ID", s->fid, 1);
        setenv("III_INVOCATION_ID", j->id, 1);
        execvp(s->argv[0], s->argv);
        dprintf(2, "cannot run %s: %s\n", s->argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    close(pi[0]), close(po[1]), close(pe[1]);
    j->fd[0] = pi[1], j->fd[1] = po[0], j->fd[2] = pe[0];
    for (int k = 0; k < 3; k++) net_flags(j->fd[k]);
    j->pid = pid;
    j->deadline = s->timeout_ms ? now_ms() + s->timeout_ms : 0;
    s->running++, s->waiting--;
    if (!buf_used(&j->in)) close(j->fd[0]), j->fd[0] = -1;
    return 0;
fail:
    for (int k = 0; k < 2; k++) {
        if (pi[k] >= 0) close(pi[k]);
        if (po[k] >= 0) close(po[k]);
        if (pe[k] >= 0) close(pe[k]);
    }
    return -1;
}

/* The invocationresult for job j: stdout as JSON (or a JSON string), or the error. */
static void srv_result(struct cli *c, struct srv *s, struct srv_job *j, const char *code,
                       const char *msg)
{
    if (!j->id[0]) return; /* a void call: nobody waits */
    struct buf m = {0};
    buf_printf(&m, "{\"type\":\"invocationresult\",\"invocation_id\":\"%s\",\"function_id\":", j->id);
    json_put_cstr(&m, s->fid);
    if (code) {
        buf_puts(&m, ",\"error\":{\"code\":");
        json_put_cstr(&m, code);
        buf_puts(&m, ",\"message\":");
        json_put_cstr(&m, msg);
        buf_putc(&m, '}');
    } else if (j->timed_out) {
        buf_printf(&m, ",\"error\":{\"code\":\"invocation_timeout\",\"message\":\"Invocation timed "
                       "out after %lld ms\"}", (long long)s->timeout_ms);
    } else if (!WIFEXITED(j->status) || WEXITSTATUS(j->status)) {
        const unsigned char *e = buf_data(&j->err);
        size_t n = buf_used(&j->err);
        while (n && isspace(e[n - 1])) n--;
        while (n && isspace(*e)) e++, n--;
        buf_puts(&m, ",\"error\":{\"code\":\"invocation_failed\",\"message\":");
        if (n) json_put_lossy(&m, e, n);
        else if (WIFEXITED(j->status)) buf_printf(&m, "\"exited with status %d\"", WEXITSTATUS(j->status));
        else buf_printf(&m, "\"killed by signal %d\"", WIFSIGNALED(j->status) ? WTERMSIG(j->status) : 0);
        buf_putc(&m, '}');
    } else {
        const unsigned char *o = buf_data(&j->out);
        size_t n = buf_used(&j->out);
        while (n && isspace(o[n - 1])) n--;
        struct jdoc d = {0};
        d.max = UINT32_MAX;
        buf_puts(&m, ",\"result\":");
        if (n && json_parse(&d, o, n, 1, 1) == 0) buf_append(&m, o, n); /* JSON: as it is */
        else json_put_lossy(&m, o, n);                                   /* text: a string */
        xfree(d.t);
    }
    buf_putc(&m, '}');
    if (!buf_check(&m)) cli_send(c, &m);
    buf_free(&m);
}

/* Frees job j (its pipes closed) and takes it off s's list. */
static void srv_drop(struct srv *s, struct srv_job *j)
{
    for (struct srv_job **pp = &s->jobs; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            break;
        }
    for (int k = 0; k < 3; k++)
        if (j->fd[k] >= 0) close(j->fd[k]);
    if (j->pid) s->running--;
    else s->waiting--;
    buf_free(&j->in), buf_free(&j->out), buf_free(&j->err);
    xfree(j);
}

/* An invokefunction for the served function: a job that starts now or waits for a slot. */
static void srv_call(struct cli *c, struct srv *s, const struct jdoc *d)
{
    int iid = json_get(d, 0, "invocation_id"), data = json_get(d, 0, "data");
    struct srv_job *j = xcalloc(sizeof *j);
    if (!j) return;
    j->fd[0] = j->fd[1] = j->fd[2] = -1;
    if (JTYPE(d, iid) == J_STRING && JLEN(d, iid) == 38) memcpy(j->id, JRAW(d, iid) + 1, 36);
    if (data >= 0) buf_append(&j->in, JRAW(d, data), JLEN(d, data)), buf_putc(&j->in, '\n');
    struct srv_job **pp = &s->jobs; /* oldest first: appended at the tail */
    while (*pp) pp = &(*pp)->next;
    *pp = j;
    s->waiting++;
    if (s->waiting > SRV_MAX_WAITING) {
        srv_result(c, s, j, "BUSY", "too many calls waiting for a free slot (--concurrency)");
        srv_drop(s, j);
    }
}

/* Starts waiting jobs while slots are free; finishes jobs whose command is done. */
static void srv_tick(struct cli *c, struct srv *s)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (struct srv_job *j = s->jobs; j; j = j->next)
            if (j->pid == pid) j->status = status, j->pid = -1;
    int64_t now = now_ms();
    for (struct srv_job *j = s->jobs, *nx; j; j = nx) {
        nx = j->next;
        if (j->pid > 0 && j->deadline && now >= j->deadline && !j->timed_out)
            j->timed_out = 1, kill(-j->pid, SIGKILL);
        if (j->pid == -1 && j->fd[1] < 0 && j->fd[2] < 0) {
            srv_result(c, s, j, NULL, NULL);
            srv_drop(s, j);
        }
    }
    for (struct srv_job *j = s->jobs; j && s->running < (size_t)s->concurrency; j = j->next)
        if (!j->pid && srv_spawn(s, j) < 0) {
            srv_result(c, s, j, "invocation_failed", "cannot start the command (pipe or fork failed)");
            srv_drop(s, j);
            break; /* the list changed: the next tick goes on */
        }
}

/* Kills every running command and forgets every call (the connection is gone). */
static void srv_reset(struct srv *s)
{
    for (struct srv_job *j = s->jobs; j; j = j->next)
        if (j->pid > 0) kill(-j->pid, SIGKILL), waitpid(j->pid, NULL, 0), j->pid = -1;
    while (s->jobs) srv_drop(s, s->jobs);
}

/* Handles one message from the engine for `iii serve`. */
static void srv_message(struct cli *c, struct srv *s, const unsigned char *p, size_t n)
{
    struct jdoc d = {0};
    d.max = 4096;
    if (json_parse(&d, p, n, 2, 1) == 0 && d.t[0].type == J_OBJECT) {
        int ty = json_get(&d, 0, "type");
        if (json_streq(&d, ty, "invokefunction") &&
            json_streq(&d, json_get(&d, 0, "function_id"), s->fid))
            srv_call(c, s, &d);
        else if (json_streq(&d, ty, "registrationrejected"))
            fprintf(stderr, "iii: serve: the engine refused the registration: %.*s\n", (int)n, p);
    }
    xfree(d.t);
}

/* One connected session of `iii serve`: register, announce, then serve until the connection
 * ends or a signal arrives. 0 = stop, -1 = reconnect. */
static int srv_session(struct cli *c, struct srv *s)
{
    struct buf m = {0};
    buf_puts(&m, "{\"type\":\"registerfunction\",\"id\":");
    json_put_cstr(&m, s->fid);
    if (s->desc) buf_puts(&m, ",\"description\":"), json_put_cstr(&m, s->desc);
    buf_putc(&m, '}');
    cli_send(c, &m);
    buf_free(&m);
    cli_announce(c, s->name, "iii-serve", s->ns, 1);
    for (;;) {
        if (cli_stop) return 0;
        srv_tick(c, s);
        if (cli_flush(c) < 0) return -1;
        struct pollfd pf[1 + 3 * 64];
        struct srv_job *pj[1 + 3 * 64];
        int pk[1 + 3 * 64];
        size_t np = 0;
        pf[np].fd = c->fd, pf[np].events = POLLIN, pj[np] = NULL, pk[np++] = -1;
        for (struct srv_job *j = s->jobs; j && np + 3 <= sizeof pf / sizeof pf[0]; j = j->next)
            for (int k = 0; k < 3; k++)
                if (j->pid && j->fd[k] >= 0)
                    pf[np].fd = j->fd[k], pf[np].events = k ? POLLIN : POLLOUT, pj[np] = j,
                    pk[np++] = k;
        /* children exit without a descriptor event of their own: look again every 20 ms */
        poll(pf, (nfds_t)np, s->running ? 20 : 200);
        for (size_t i = 1; i < np; i++) {
            struct srv_job *j = pj[i];
            int k = pk[i];
            if (!pf[i].revents) continue;
            if (k == 0) {
                ssize_t w = write(j->fd[0], buf_data(&j->in), buf_used(&j->in));
                if (w > 0) buf_consume(&j->in, (size_t)w);
                if ((w < 0 && errno != EAGAIN && errno != EINTR) || !buf_used(&j->in))
                    close(j->fd[0]), j->fd[0] = -1;
            } else {
                struct buf *b = k == 1 ? &j->out : &j->err;
                size_t cap = k == 1 ? SRV_MAX_STDOUT : SRV_MAX_STDERR;
                unsigned char tmp[16384];
                ssize_t r = read(j->fd[k], tmp, sizeof tmp);
                if (r > 0 && buf_used(b) < cap)
                    buf_append(b, tmp, (size_t)r > cap - buf_used(b) ? cap - buf_used(b) : (size_t)r);
                else if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
                    close(j->fd[k]), j->fd[k] = -1;
            }
        }
        if (pf[0].revents) {
            if (cli_read(c) < 0) return -1;
            unsigned char *p;
            size_t n;
            int r;
            while ((r = cli_next(c, &p, &n)) > 0) srv_message(c, s, p, n);
            if (r < 0) return -1;
        }
    }
}

/* Reconnects with backoff (0.5 s doubling to 5 s) until a signal ends it; each session gets a
 * fresh connection. session() returns 0 to stop, -1 to reconnect. */
static int cli_persist(const char *url, const char *what, int (*session)(struct cli *, void *),
                       void *arg)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = cli_on_signal;
    sigaction(SIGINT, &sa, NULL), sigaction(SIGTERM, &sa, NULL);
    int64_t backoff = 500;
    while (!cli_stop) {
        struct cli c;
        const char *why = NULL;
        memset(&c, 0, sizeof c);
        c.deadline = now_ms() + 10000;
        if (cli_connect(&c, url, &why) == 0) {
            fprintf(stderr, "iii: %s: connected to %s\n", what, url);
            backoff = 500;
            if (session(&c, arg) == 0) {
                ws_frame(&c.out, WS_CLOSE, "\x03\xe8", 2, 1);
                cli_flush(&c);
                close(c.fd);
                buf_free(&c.in), buf_free(&c.out);
                break;
            }
            fprintf(stderr, "iii: %s: connection lost; reconnecting\n", what);
        } else {
            fprintf(stderr, "iii: %s: %s (%s); retrying in %lld ms\n", what, why, url,
                    (long long)backoff);
        }
        if (c.fd > 0) close(c.fd);
        buf_free(&c.in), buf_free(&c.out);
        struct timespec ts = {(time_t)(backoff / 1000), (long)(backoff % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
    }
    return 0;
}

static int srv_session_cb(struct cli *c, void *arg)
{
    struct srv *s = arg;
    int r = srv_session(c, s);
    srv_reset(s);
    return r;
}

/* `iii watch`: the function the engine calls with each discovery event, and the last function
 * set seen (sorted "id@ns" strings) for the +/- diff. */
struct watch_state {
    char fid[64];
    int json;
    char **set;
    size_t n;
    char base_id[37];   /* the functions::list call that gives the starting set */
    struct {
        char call[37], wid[37];
    } pend[16];         /* worker_metadata_updated lines waiting for the worker's name */
    int npend;
};

static int watch_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The function set of a functions_changed payload (token arr: its "functions" array), sorted;
 * the watcher's own function is left out. */
static char **watch_set(const struct jdoc *d, int arr, const char *self, size_t *n)
{
    *n = 0;
    if (JTYPE(d, arr) != J_ARRAY) return NULL;
    char **v = xmalloc((d->t[arr].n + 1) * sizeof *v);
    if (!v) return NULL;
    for (uint32_t i = 0, e = (uint32_t)arr + 1; i < d->t[arr].n; i++, e = d->t[e].next) {
        char *id = json_strdup(d, json_get(d, (int)e, "function_id"), NULL);
        char *ns = json_strdup(d, json_get(d, (int)e, "namespace"), NULL);
        if (id && strcmp(id, self)) {
            struct buf b = {0};
            buf_puts(&b, id);
            if (ns && strcmp(ns, NS_DEFAULT)) buf_putc(&b, '@'), buf_puts(&b, ns);
            if (buf_cstr(&b)) v[(*n)++] = (char *)b.p;
        }
        xfree(id), xfree(ns);
    }
    qsort(v, *n, sizeof *v, watch_cmp);
    return v;
}

static void watch_free_set(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++) xfree(v[i]);
    xfree(v);
}

/* Prints one event: --json as it came, else one readable line. */
static void watch_event(struct watch_state *w, const struct jdoc *d, int data, struct cli *c)
{
    if (w->json) {
        printf("%.*s\n", (int)JLEN(d, data), JRAW(d, data));
        return;
    }
    char *ev = json_strdup(d, json_get(d, data, "event"), NULL);
    char *wid = json_strdup(d, json_get(d, data, "worker_id"), NULL);
    if (ev && !strcmp(ev, "functions_changed")) {
        size_t n = 0;
        char **v = watch_set(d, json_get(d, data, "functions"), w->fid, &n);
        struct buf line = {0};
        size_t i = 0, j = 0;
        /* merge walk of two sorted sets: + only in the new one, - only in the old one */
        while (v && (i < n || j < w->n)) {
            int c = i == n ? 1 : j == w->n ? -1 : strcmp(v[i], w->set[j]);
            const char *id = c < 0 ? v[i] : c > 0 ? w->set[j] : NULL;
            if (id) buf_puts(&line, c < 0 ? " +" : " -"), buf_puts(&line, id);
            if (c <= 0) i++;
            if (c >= 0) j++;
        }
        /* no line when nothing changed as the watcher sees it (its own function came or went) */
        const char *txt = (const char *)buf_data(&line);
        if (txt && buf_used(&line))
            printf("functions_changed%.*s (%zu functions)\n", (int)buf_used(&line), txt, n);
        buf_free(&line);
        if (v) watch_free_set(w->set, w->n), w->set = v, w->n = n;
    } else if (ev && !strcmp(ev, "worker_metadata_updated") && wid && strlen(wid) == 36 && c &&
               w->npend < 16) {
        /* the event names the worker by id only: its name comes from engine::workers::list */
        struct buf m = {0};
        uuid_new(w->pend[w->npend].call);
        memcpy(w->pend[w->npend].wid, wid, 37);
        buf_printf(&m, "{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":"
                       "\"engine::workers::list\",\"data\":{}}", w->pend[w->npend].call);
        w->npend++;
        cli_send(c, &m);
        buf_free(&m);
    } else if (ev) {
        printf("%s %s\n", ev, wid ? wid : "-");
    }
    xfree(ev), xfree(wid);
}

/* A call the watcher made itself: the starting function set, or the name for a
 * worker_metadata_updated line (printed now, with the name or "-"). */
static void watch_answer(struct watch_state *w, const struct jdoc *d, int iid)
{
    int res = json_get(d, 0, "result");
    if (json_streq(d, iid, w->base_id)) {
        size_t n = 0;
        char **v = watch_set(d, json_get(d, res, "functions"), w->fid, &n);
        if (v) watch_free_set(w->set, w->n), w->set = v, w->n = n;
        return;
    }
    for (int i = 0; i < w->npend; i++) {
        if (!json_streq(d, iid, w->pend[i].call)) continue;
        int arr = json_get(d, res, "workers");
        char *name = NULL;
        for (uint32_t k = 0, e = (uint32_t)arr + 1; JTYPE(d, arr) == J_ARRAY && k < d->t[arr].n && !name;
             k++, e = d->t[e].next)
            if (json_streq(d, json_get(d, (int)e, "id"), w->pend[i].wid))
                name = json_strdup(d, json_get(d, (int)e, "name"), NULL);
        printf("worker_metadata_updated %s %s\n", w->pend[i].wid, name ? name : "-");
        xfree(name);
        w->pend[i] = w->pend[--w->npend];
        return;
    }
}

static void watch_message(struct cli *c, struct watch_state *w, const unsigned char *p, size_t n)
{
    struct jdoc d = {0};
    d.max = UINT32_MAX;
    if (json_parse(&d, p, n, 64, 1) == 0 && d.t[0].type == J_OBJECT) {
        int ty = json_get(&d, 0, "type"), iid = json_get(&d, 0, "invocation_id");
        if (json_streq(&d, ty, "invocationresult")) watch_answer(w, &d, iid);
        if (json_streq(&d, ty, "invokefunction") &&
            json_streq(&d, json_get(&d, 0, "function_id"), w->fid)) {
            int data = json_get(&d, 0, "data");
            if (data >= 0) watch_event(w, &d, data, c);
            if (JTYPE(&d, iid) == J_STRING) { /* an answer, so no call is left pending */
                struct buf m = {0};
                buf_puts(&m, "{\"type\":\"invocationresult\",\"invocation_id\":");
                json_put_raw(&m, &d, iid);
                buf_puts(&m, ",\"function_id\":");
                json_put_cstr(&m, w->fid);
                buf_putc(&m, '}');
                cli_send(c, &m);
                buf_free(&m);
            }
        }
    }
    xfree(d.t);
}

/* One session of `iii watch`: an internal function bound to both discovery events. */
static int watch_session(struct cli *c, void *arg)
{
    struct watch_state *w = arg;
    struct buf m = {0};
    /* the starting set first: asked before anything is registered, so it is answered at once
     * and the first functions_changed line shows only what changed since */
    uuid_new(w->base_id);
    buf_printf(&m, "{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":"
                   "\"engine::functions::list\",\"data\":{\"include_internal\":true}}", w->base_id);
    cli_send(c, &m);
    buf_reset(&m);
    w->npend = 0;
    buf_puts(&m, "{\"type\":\"registerfunction\",\"id\":");
    json_put_cstr(&m, w->fid);
    buf_puts(&m, ",\"description\":\"iii watch\",\"metadata\":{\"internal\":true}}");
    cli_send(c, &m);
    static const char *const types[] = {"engine::workers-available", "engine::functions-available"};
    for (int i = 0; i < 2; i++) {
        char id[37];
        uuid_new(id);
        buf_reset(&m);
        buf_printf(&m, "{\"type\":\"registertrigger\",\"id\":\"%s\",\"trigger_type\":\"%s\","
                       "\"function_id\":", id, types[i]);
        json_put_cstr(&m, w->fid);
        buf_puts(&m, ",\"config\":{}}");
        cli_send(c, &m);
    }
    buf_free(&m);
    cli_announce(c, "iii-watch", "iii-cli", NULL, 0); /* no pid: not listed as a worker */
    for (;;) {
        if (cli_stop) return 0;
        if (cli_flush(c) < 0) return -1;
        fflush(stdout);
        struct pollfd pf = {c->fd, POLLIN, 0};
        if (poll(&pf, 1, 200) <= 0) continue;
        if (cli_read(c) < 0) return -1;
        unsigned char *p;
        size_t n;
        int r;
        while ((r = cli_next(c, &p, &n)) > 0) watch_message(c, w, p, n);
        if (r < 0) return -1;
    }
}

/* ---- command line of the client commands ---- */
/* Each client command: its usage line and the lines that explain its flags. Every flag listed
 * here is accepted by that command (cli_flags checks against the same table). */
static const struct cli_cmd {
    const char *name, *usage, *help, *flags;
} CLI_CMDS[] = {
    {"trigger", "iii trigger FUNCTION_ID [JSON|-|@FILE] [--namespace NS] [--url URL] "
                "[--timeout MS] [--json] [--token T]",
     "  Calls a function and prints its result as JSON. The payload is JSON text, - (read from\n"
     "  stdin) or @FILE (read from FILE); default {}. A function_not_found suggests near names.\n"
     "  --namespace NS   call it in namespace NS (default: default)\n"
     "  --url URL        engine address (default $III_URL, else ws://127.0.0.1:49134)\n"
     "  --timeout MS     give up after MS milliseconds (default 30000)\n"
     "  --token T        present token T (default $III_TOKEN) to an engine with auth_tokens\n"
     "  --json           on an error, also print {\"error\":...} on stdout\n",
     " --namespace --url --timeout --json --token "},
    {"list", "iii list functions|workers|triggers|registered-triggers [--search S] "
             "[--namespace NS] [--internal] [--url URL] [--timeout MS] [--json] [--token T]",
     "  Prints the registry as a table (or the engine's JSON with --json).\n"
     "  --search S       only entries matching S (case-insensitive substring)\n"
     "  --namespace NS   only entries in namespace NS\n"
     "  --internal       include engine::* and internal entries\n"
     "  --url URL, --timeout MS, --json, --token T   as for trigger\n",
     " --search --namespace --internal --url --timeout --json --token "},
    {"info", "iii info function ID | worker NAME [--namespace NS] [--url URL] [--timeout MS] "
             "[--json] [--token T]",
     "  Prints one function or worker in detail (engine::functions::info / workers::info).\n"
     "  --namespace NS   look in namespace NS only\n"
     "  --json           one line of raw JSON instead of the indented form\n"
     "  --url URL, --timeout MS, --token T   as for trigger\n",
     " --namespace --url --timeout --json --token "},
    {"ps", "iii ps [--url URL] [--timeout MS] [--json] [--token T]",
     "  Lists the workers declared in the engine's config: pid, state (running, backoff,\n"
     "  stopped, failed), restarts, uptime and last exit.\n"
     "  --url URL, --timeout MS, --json, --token T   as for trigger\n",
     " --url --timeout --json --token "},
    {"watch", "iii watch [--url URL] [--json] [--token T]",
     "  Prints registry changes as they happen, one line each: worker_connected,\n"
     "  worker_metadata_updated, worker_disconnected, and functions_changed with the ids added\n"
     "  (+) and removed (-). Runs until interrupted; reconnects if the engine restarts.\n"
     "  --json           each event's JSON payload instead\n"
     "  --url URL, --token T   as for trigger\n",
     " --url --json --token "},
    {"serve", "iii serve FUNCTION_ID [--namespace NS] [--name NAME] [--description TEXT] "
              "[--concurrency N] [--timeout MS] [--url URL] [--token T] -- COMMAND [ARGS...]",
     "  A worker with no dependencies: registers FUNCTION_ID and, for each call, runs COMMAND\n"
     "  with the payload JSON on stdin. Its stdout is the result (JSON, or else a JSON string);\n"
     "  a non-zero exit is an invocation_failed error carrying its stderr. The command sees\n"
     "  III_FUNCTION_ID and III_INVOCATION_ID. Reconnects if the engine restarts.\n"
     "  --namespace NS   register in namespace NS\n"
     "  --name NAME      worker name (default $III_WORKER_NAME, else serve:FUNCTION_ID)\n"
     "  --description T  the function's description\n"
     "  --concurrency N  at most N commands at once (default 4; up to 1000 calls wait, then BUSY)\n"
     "  --timeout MS     kill a command after MS ms: invocation_timeout (default 30000, 0 = none)\n"
     "  --url URL, --token T   as for trigger\n",
     " --namespace --name --description --concurrency --timeout --url --token "},
};

static const struct cli_cmd *cli_cmd(const char *name)
{
    for (size_t i = 0; i < sizeof CLI_CMDS / sizeof CLI_CMDS[0]; i++)
        if (!strcmp(CLI_CMDS[i].name, name)) return &CLI_CMDS[i];
    return NULL;
}

/* `iii --help`: the commands, the environment and the exit codes. */
static void usage(FILE *f)
{
    fputs("usage: iii [-c|--config FILE] [--host H] [--port N] [--echo] [-v|--version] "
          "[-h|--help]\n"
          "       iii --check [-c|--config FILE]\n",
          f);
    for (size_t i = 0; i < sizeof CLI_CMDS / sizeof CLI_CMDS[0]; i++)
        fprintf(f, "       %s\n", CLI_CMDS[i].usage);
    fputs("\n"
          "Without a command, runs the engine: loads the config (./config.yaml by default; a\n"
          "missing default file means built-in defaults), starts the declared workers and\n"
          "serves WebSocket connections. --check validates the config and prints what would\n"
          "run. `iii COMMAND --help` explains a command.\n"
          "\n"
          "Environment:\n"
          "  III_URL                 engine address for the client commands\n"
          "  III_TOKEN               token the client commands present (declared workers get one)\n"
          "  III_LOG                 log level: error, warn, info (default), debug, trace\n"
          "  III_LOG_FORMAT          text (default) or json: one JSON object per log line\n"
          "  III_NAMESPACE_GRACE_MS  registration grace period (default 5000)\n"
          "  III_ALLOW_WEAK_RANDOM   1: start even without /dev/urandom (predictable ids)\n"
          "\n"
          "Exit status: 0 ok; 1 the function returned an error, or the config is invalid;\n"
          "2 usage error; 3 the engine could not be reached or did not answer in time.\n",
          f);
}

/* Reads a payload argument: JSON text as given, "-" = all of stdin, "@FILE" = that file's
 * contents, into out. -1 with a message on stderr when it cannot be read. */
static int cli_payload(const char *arg, struct buf *out)
{
    if (strcmp(arg, "-") && arg[0] != '@') return buf_puts(out, arg);
    FILE *f = !strcmp(arg, "-") ? stdin : fopen(arg + 1, "rb");
    if (!f) {
        fprintf(stderr, "iii: cannot read %s: %s\n", arg + 1, strerror(errno));
        return -1;
    }
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_append(out, tmp, n);
    int bad = ferror(f);
    if (f != stdin) fclose(f);
    if (bad || buf_check(out)) {
        fprintf(stderr, "iii: cannot read %s\n", !strcmp(arg, "-") ? "stdin" : arg + 1);
        return -1;
    }
    return 0;
}

/* After function_not_found: the registered ids closest to fid, on stderr ("did you mean"). */
static void cli_suggest(const char *url, const char *fid, int64_t timeout)
{
    struct buf frame = {0};
    const char *why;
    if (cli_call(url, "engine::functions::list", "{}", NULL, timeout, &frame, &why) < 0) goto out;
    struct jdoc d = {0};
    d.max = UINT32_MAX;
    if (json_parse(&d, buf_data(&frame), buf_used(&frame), 64, 0) == 0) {
        int arr = json_get(&d, json_get(&d, 0, "result"), "functions");
        int lim = (int)strlen(fid) / 3 > 2 ? (int)strlen(fid) / 3 : 2, shown = 0;
        for (int dist = 1; dist <= lim && shown < 3; dist++)
            for (uint32_t i = 0, e = (uint32_t)arr + 1; JTYPE(&d, arr) == J_ARRAY &&
                                                        i < d.t[arr].n && shown < 3;
                 i++, e = d.t[e].next) {
                char *id = json_strdup(&d, json_get(&d, (int)e, "function_id"), NULL);
                if (id && str_distance(fid, id) == dist)
                    fprintf(stderr, "iii: did you mean %s?\n", id), shown++;
                xfree(id);
            }
    }
    xfree(d.t);
out:
    buf_free(&frame);
}

/* Writes value ti of d indented by `ind` spaces per level (iii info without --json). */
static void cli_pretty(const struct jdoc *d, int ti, int ind)
{
    int ty = JTYPE(d, ti);
    if ((ty != J_OBJECT && ty != J_ARRAY) || !d->t[ti].n || d->t[ti].opaque) {
        printf("%.*s", (int)JLEN(d, ti), JRAW(d, ti));
        return;
    }
    printf(ty == J_OBJECT ? "{\n" : "[\n");
    uint32_t e = (uint32_t)ti + 1;
    for (uint32_t i = 0; i < d->t[ti].n; i++) {
        printf("%*s", ind + 2, "");
        if (ty == J_OBJECT) printf("%.*s: ", (int)JLEN(d, (int)e), JRAW(d, (int)e)), e++;
        cli_pretty(d, (int)e, ind + 2);
        printf(i + 1 < d->t[ti].n ? ",\n" : "\n");
        e = d->t[e].next;
    }
    printf("%*s%c", ind, "", ty == J_OBJECT ? '}' : ']');
}

/* What the table printers show: the result member holding the array, the columns, and an
 * optional namespace filter (rows whose "namespace" differs are skipped). */
static int cli_pretty_mode;

/* One cell of `iii ps`: uptime in seconds, last exit as "code N" / "signal N", else raw. */
static int cli_ps_cell(const struct jdoc *d, int row, const char *col, int last)
{
    int t;
    if (!strcmp(col, "uptime")) {
        int64_t ms;
        t = json_get(d, row, "uptime_ms");
        if (json_int(d, t, &ms) == 0) printf("%lld.%llds", (long long)(ms / 1000), (long long)(ms % 1000 / 100));
        else printf("-");
    } else if (!strcmp(col, "last_exit")) {
        int64_t v;
        t = json_get(d, row, "last_exit");
        if (json_int(d, json_get(d, t, "code"), &v) == 0) printf("code %lld", (long long)v);
        else if (json_int(d, json_get(d, t, "signal"), &v) == 0) printf("signal %lld", (long long)v);
        else printf("-");
    } else {
        return 0;
    }
    putchar(last ? '\n' : '\t');
    return 1;
}

/* Prints the header row in upper case, then one row per element of the result's array. */
static void cli_table(const struct jdoc *d, int res)
{
    if (cli_pretty_mode) {
        cli_pretty(d, res, 0);
        putchar('\n');
        return;
    }
    int arr = json_get(d, res, cli_list_key);
    for (const char *const *c = cli_list_cols; *c; c++) {
        for (const char *p = *c; *p; p++) putchar(toupper((unsigned char)*p));
        putchar(c[1] ? '\t' : '\n');
    }
    if (JTYPE(d, arr) != J_ARRAY) return;
    for (uint32_t i = 0, e = (uint32_t)arr + 1; i < d->t[arr].n; i++, e = d->t[e].next) {
        int nst = json_get(d, (int)e, "namespace");
        if (cli_list_ns && JTYPE(d, nst) == J_STRING && !json_streq(d, nst, cli_list_ns)) continue;
        for (const char *const *c = cli_list_cols; *c; c++)
            if (!cli_ps_cell(d, (int)e, *c, !c[1])) cli_cell(d, (int)e, *c, !c[1]);
    }
}

/* The client commands (argv[0] is the command). Exit status: 0 ok, 1 the function returned an
 * error, 2 usage error, 3 could not reach the engine or no answer in time. The default timeout
 * is 30 s; --url defaults to $III_URL, then the SDK's default address. */
static int cli_main(int argc, char **argv)
{
    const struct cli_cmd *cmd = cli_cmd(argv[0]);
    const char *url = getenv("III_URL"), *ns = NULL, *search = NULL, *name = NULL, *desc = NULL;
    int64_t timeout = 30000, conc = 4;
    int as_json = 0, internal = 0, timeout_set = 0;
    const char *pos[3] = {NULL, NULL, NULL};
    char **command = NULL;
    int np = 0;
    if (!url || !*url) url = "ws://127.0.0.1:49134";
    cli_token = getenv("III_TOKEN");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        char flag[40];
        snprintf(flag, sizeof flag, " %s ", a);
        int takes = !strcmp(a, "--url") || !strcmp(a, "--namespace") || !strcmp(a, "--search") ||
                    !strcmp(a, "--token") ||
                    !strcmp(a, "--timeout") || !strcmp(a, "--name") ||
                    !strcmp(a, "--description") || !strcmp(a, "--concurrency");
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: %s\n%s", cmd->usage, cmd->help);
            return 0;
        }
        if (!strcmp(a, "--") && !strcmp(cmd->name, "serve")) {
            command = argv + i + 1;
            break;
        }
        if (a[0] == '-' && a[1] && !isdigit((unsigned char)a[1])) {
            if (!strstr(cmd->flags, flag) || (takes && i + 1 >= argc)) {
                fprintf(stderr, "iii %s: unknown or incomplete option %s\nusage: %s\n", cmd->name,
                        a, cmd->usage);
                return 2;
            }
            const char *v = takes ? argv[++i] : NULL;
            if (!strcmp(a, "--url")) url = v;
            else if (!strcmp(a, "--token")) cli_token = v;
            else if (!strcmp(a, "--namespace")) ns = v;
            else if (!strcmp(a, "--search")) search = v;
            else if (!strcmp(a, "--name")) name = v;
            else if (!strcmp(a, "--description")) desc = v;
            else if (!strcmp(a, "--json")) as_json = 1;
            else if (!strcmp(a, "--internal")) internal = 1;
            else if (v && (!strcmp(a, "--timeout") || !strcmp(a, "--concurrency"))) {
                char *e;
                long long n = strtoll(v, &e, 10);
                int conc_flag = !strcmp(a, "--concurrency");
                if (*e || n < (conc_flag ? 1 : 0) || (!conc_flag && !n && strcmp(cmd->name, "serve"))) {
                    fprintf(stderr, "iii %s: %s: '%s' is not a valid number\n", cmd->name, a, v);
                    return 2;
                }
                if (conc_flag) conc = n;
                else timeout = n, timeout_set = 1;
            }
        } else if (np < 3) {
            pos[np++] = a;
        } else {
            fprintf(stderr, "iii %s: too many arguments\nusage: %s\n", cmd->name, cmd->usage);
            return 2;
        }
    }
    struct buf frame = {0}, data = {0};
    const char *why = NULL;
    int rc = 2;
    if (!strcmp(cmd->name, "serve")) {
        if (np != 1 || !command || !command[0]) {
            fprintf(stderr, "iii serve: a FUNCTION_ID and a command after -- are needed\nusage: %s\n",
                    cmd->usage);
            return 2;
        }
        /* a declared worker is named by the engine (III_WORKER_NAME: name, or name.k for one
         * of several instances), so instances do not contend for one name */
        char nm[300];
        const char *en = getenv("III_WORKER_NAME");
        if (en && *en) snprintf(nm, sizeof nm, "%s", en);
        else snprintf(nm, sizeof nm, "serve:%s", pos[0]);
        struct srv s;
        memset(&s, 0, sizeof s);
        s.fid = pos[0], s.ns = ns, s.name = name ? name : nm, s.desc = desc, s.argv = command;
        s.concurrency = (int)(conc > 1000 ? 1000 : conc);
        s.timeout_ms = timeout_set ? timeout : 30000;
        return cli_persist(url, "serve", srv_session_cb, &s);
    }
    if (!strcmp(cmd->name, "watch")) {
        if (np) {
            fprintf(stderr, "usage: %s\n", cmd->usage);
            return 2;
        }
        struct watch_state w;
        memset(&w, 0, sizeof w);
        char id[37];
        uuid_new(id);
        snprintf(w.fid, sizeof w.fid, "iii::watch::%.8s", id);
        w.json = as_json;
        setvbuf(stdout, NULL, _IOLBF, 0);
        cli_persist(url, "watch", watch_session, &w);
        watch_free_set(w.set, w.n);
        return 0;
    }
    if (!strcmp(cmd->name, "trigger")) {
        if (np < 1 || np > 2) goto usage;
        if (cli_payload(np == 2 ? pos[1] : "{}", &data) < 0) return 2;
        struct jdoc d = {0};
        d.max = UINT32_MAX;
        int bad = json_parse(&d, buf_data(&data), buf_used(&data), 1, 1) < 0;
        xfree(d.t);
        if (bad) {
            fprintf(stderr, "iii: error: the payload is not valid JSON: %.*s\n",
                    (int)(buf_used(&data) > 200 ? 200 : buf_used(&data)), (char *)buf_data(&data));
            rc = 2;
            goto out;
        }
        if (!buf_cstr(&data) || cli_call(url, pos[0], (char *)buf_data(&data), ns, timeout, &frame,
                                         &why) < 0) {
            fprintf(stderr, "iii: error: %s (%s)\n", why ? why : "out of memory", url);
            rc = 3;
            goto out;
        }
        rc = cli_report(&frame, 1, NULL);
        if (rc == 1 && strstr((char *)buf_cstr(&frame), "\"function_not_found\""))
            cli_suggest(url, pos[0], timeout);
        goto out;
    }
    const char *fid;
    static const char *const fcols[] = {"function_id", "namespace", "worker_name", "description",
                                        NULL};
    static const char *const wcols[] = {"name",           "id",     "namespace", "runtime",
                                        "function_count", "status", NULL};
    static const char *const tcols[] = {"id", "namespace", "worker_name", "description", NULL};
    static const char *const rcols[] = {"id",          "trigger_type",   "function_id",
                                        "worker_name", "config_summary", NULL};
    static const char *const pcols[] = {"name", "pid", "state", "restarts", "uptime", "last_exit",
                                        NULL};
    if (!strcmp(cmd->name, "ps")) {
        if (np) goto usage;
        fid = "engine::processes::list", cli_list_key = "processes", cli_list_cols = pcols;
        buf_puts(&data, "{}");
    } else if (!strcmp(cmd->name, "info")) {
        if (np != 2) goto usage;
        int fn = !strcmp(pos[0], "function");
        if (!fn && strcmp(pos[0], "worker")) goto usage;
        fid = fn ? "engine::functions::info" : "engine::workers::info";
        buf_puts(&data, fn ? "{\"function_id\":" : "{\"name\":");
        json_put_cstr(&data, pos[1]);
        if (ns) buf_puts(&data, ",\"namespace\":"), json_put_cstr(&data, ns);
        buf_putc(&data, '}');
        ns = NULL;
        cli_pretty_mode = 1;
    } else {
        if (np != 1) goto usage;
        if (!strcmp(pos[0], "functions"))
            fid = "engine::functions::list", cli_list_key = "functions", cli_list_cols = fcols;
        else if (!strcmp(pos[0], "workers"))
            fid = "engine::workers::list", cli_list_key = "workers", cli_list_cols = wcols;
        else if (!strcmp(pos[0], "triggers"))
            fid = "engine::triggers::list", cli_list_key = "triggers", cli_list_cols = tcols;
        else if (!strcmp(pos[0], "registered-triggers"))
            fid = "engine::registered-triggers::list", cli_list_key = "registered_triggers",
            cli_list_cols = rcols;
        else {
            fprintf(stderr,
                    "iii: list: unknown kind '%s' (functions, workers, triggers, "
                    "registered-triggers)\n",
                    pos[0]);
            return 2;
        }
        buf_puts(&data, "{\"include_internal\":");
        buf_puts(&data, internal ? "true" : "false");
        if (search) buf_puts(&data, ",\"search\":"), json_put_cstr(&data, search);
        buf_putc(&data, '}');
        cli_list_ns = ns;
        ns = NULL;
    }
    if (!buf_cstr(&data) ||
        cli_call(url, fid, (char *)buf_data(&data), NULL, timeout, &frame, &why) < 0) {
        fprintf(stderr, "iii: error: %s (%s)\n", why ? why : "out of memory", url);
        rc = 3;
        goto out;
    }
    rc = cli_report(&frame, as_json, cli_table);
    goto out;
usage:
    fprintf(stderr, "usage: %s\n", cmd->usage);
    rc = 2;
out:
    buf_free(&frame), buf_free(&data);
    return rc;
}

/* ==== main ================================================================================== */

#ifndef III_NO_MAIN
/* Engine mode: parse arguments, load config.yaml (missing = built-in defaults; invalid = exit
 * 1), apply --host/--port and III_NAMESPACE_GRACE_MS, install signals, register builtins,
 * bind the listener (fatal on failure, docs/§10 item 5), start declared workers, run the
 * loop, then free everything so leak checkers see only real leaks. III_LOG sets the level. */
int main(int argc, char **argv)
{
    const char *host = NULL;
    long port = -1;
    int cfg_explicit = 0, check_only = 0;
    S.cfg_path = "config.yaml";
    S.lfd = -1;
    S.spare_fd = -1;
    CL.fd = -1;
    const char *lv = getenv("III_LOG");
    /* III_LOG=error|warn|info|debug|trace; any other value keeps the default (info) */
    for (int i = 0; lv && i <= LOG_TRACE; i++)
        if (!strcmp(lv, log_names[i])) log_level = i;
    const char *lf = getenv("III_LOG_FORMAT");
    log_json = lf && !strcmp(lf, "json");
    /* the client commands need no config, listener or signals: dispatch before any set-up
     * (their invocation ids need uniqueness, not secrecy: a weak source is fine there) */
    if (argc > 1 && cli_cmd(argv[1])) {
        signal(SIGPIPE, SIG_IGN);
        rnd_init();
        return cli_main(argc - 1, argv + 1);
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-c") || !strcmp(a, "--config")) && i + 1 < argc)
            S.cfg_path = argv[++i], cfg_explicit = 1;
        else if (!strcmp(a, "--check")) check_only = 1;
        else if (!strcmp(a, "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(a, "--port") && i + 1 < argc) {
            char *e;
            port = strtol(argv[++i], &e, 10);
            if (*e || port < 0 || port > 65535)
                die("--port: '%s' is not a port number (0-65535)", argv[i]);
        } else if (!strcmp(a, "--echo")) S.echo = 1;
        else if (!strcmp(a, "-v") || !strcmp(a, "--version")) {
            printf("iii %s\n", III_VERSION);
            return 0;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            die("unknown argument '%s'", a);
        }
    }
    {
        /* descriptors inherited from whoever started the engine (a shell's `exec 7>log`, a
         * parent's pipe) must not reach the workers it execs: every open one from 3 up, up to
         * the descriptor limit, becomes close-on-exec. poll() says which are open, 256 at a
         * time (POLLNVAL: not open), rather than one fcntl() per possible descriptor. */
        struct rlimit rl;
        long top = 1L << 20;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
            rl.rlim_cur < (rlim_t)top)
            top = (long)rl.rlim_cur;
        struct pollfd fdp[256];
        for (long base = 3; base < top; base += 256) {
            nfds_t k = (nfds_t)(top - base < 256 ? top - base : 256);
            for (nfds_t j = 0; j < k; j++)
                fdp[j].fd = (int)(base + (long)j), fdp[j].events = 0, fdp[j].revents = 0;
            if (poll(fdp, k, 0) < 0) break;
            for (nfds_t j = 0; j < k; j++) {
                if (fdp[j].revents & POLLNVAL) continue;
                int fl = fcntl(fdp[j].fd, F_GETFD);
                if (fl >= 0 && !(fl & FD_CLOEXEC)) fcntl(fdp[j].fd, F_SETFD, fl | FD_CLOEXEC);
            }
        }
    }
    S.start_ms = now_ms();
    S.start_wall = wall_ms();
    fd_limits();
    /* before anything is hashed or any id minted (bi_init, the first connection) */
    if (rnd_init() < 0) {
        const char *weak = getenv("III_ALLOW_WEAK_RANDOM");
        if (!weak || strcmp(weak, "1"))
            die("no strong random source (/dev/urandom cannot be read): worker ids and reattach "
                "tokens would be guessable. Refusing to start; set III_ALLOW_WEAK_RANDOM=1 to "
                "run anyway on a trusted network");
        LOG(LOG_ERROR, "no strong random source (/dev/urandom): running with PREDICTABLE worker "
                       "ids and reattach tokens because III_ALLOW_WEAK_RANDOM=1");
    }
    cli_host = host;
    cli_port = port;
    char err[1024];
    int missing = 0;
    if (cfg_load(S.cfg_path, &S.cfg, &missing, err, sizeof err) < 0) die("%s", err);
    /* only the default path may be absent: a file named on the command line must exist */
    if (missing && cfg_explicit) die("%s: no such config file", S.cfg_path);
    if (missing)
        LOG(LOG_INFO, "no config file at %s: running on built-in defaults (no workers)",
            S.cfg_path);
    cfg_log_warnings(&S.cfg);
    /* --host beyond loopback is held to the same rule as the config's host */
    if (host && !host_loopback(host) && !S.cfg.lis.n_tokens && !S.cfg.lis.rbac_json &&
        !S.cfg.lis.allow_unauth)
        die("--host %s: %s", host, LIS_OPEN_MSG);
    if (check_only) return cfg_check_print(missing);
    settings_from_cfg();
    /* the grace period is read at start-up only (§1.4); a reload does not change it */
    S.grace_ms = S.cfg.grace_ms;
    /* §1.4: the environment wins over registration_namespace_grace_ms from the config */
    const char *ge = getenv("III_NAMESPACE_GRACE_MS");
    if (ge && *ge) {
        char *e;
        long long v = strtoll(ge, &e, 10);
        if (*e || v < 0) die("III_NAMESPACE_GRACE_MS: '%s' is not a number of milliseconds", ge);
        S.grace_ms = v;
    }
    loop_signals_init();
    S.ep = -1;
#ifdef III_EPOLL
    /* on x86_64 the kernel writes a packed 12-byte struct epoll_event: a compiler that lays it
     * out otherwise (see the include at the top) would read data.ptr from the wrong place */
#ifdef __x86_64__
    int ep_layout_ok = sizeof(struct epoll_event) == 12 && offsetof(struct epoll_event, data) == 4;
#else
    int ep_layout_ok = 1;
#endif
    if (!ep_layout_ok)
        LOG(LOG_WARN, "struct epoll_event is not the kernel's layout; polling every connection");
    else if ((S.ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        LOG(LOG_WARN, "epoll_create1: %s; polling every connection instead", strerror(errno));
#endif
    if (bi_init() < 0) die("out of memory");
    if (listener_open(err, sizeof err) < 0) die("%s", err);
    for (size_t i = 0; i < S.cfg.nw; i++)
        if (cfg_is_process(&S.cfg.w[i]) && sup_add(&S.cfg.w[i]) < 0) die("out of memory");
    /* watch the file only if it existed at start-up (docs/§10 item 6: no file, no reload) */
    if (!missing) {
        if (watch_stat(&watch.st) == 0)
            watch.have = 1, watch.next_check = now_ms() + III_WATCH_INTERVAL_MS;
        else
            LOG(LOG_WARN, "cannot stat %s (%s): config changes will not be picked up", S.cfg_path,
                strerror(errno));
    }
    loop_run();
    nats_leave();
    out_flush_exit();
    nats_free();
    engine_free_all();
    while (nprocs) sup_free(0);
    xfree(procs);
    buf_free(&out_q[0]), buf_free(&out_q[1]);
    cfg_free(&S.cfg);
    if (sentinel_fd >= 0) close(sentinel_fd);
    if (S.ep >= 0) close(S.ep);
    return S.exit_code;
}
#endif
