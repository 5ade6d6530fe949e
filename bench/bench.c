/* bench/bench.c - the load generator of the iii benchmarks (driven by bench/run.sh).
 *
 * It plays real workers and callers over real sockets, single-threaded, non-blocking, one
 * poll() loop, many calls in flight, every socket on 127.0.0.1. The same generator drives every
 * peer so the figures compare like with like:
 *   engine  callers and echo workers are WebSocket clients of a running iii engine and speak the
 *           worker protocol as the Node SDK does (registerfunction, engine::workers::register,
 *           invokefunction with UUIDv4 ids, invocationresult; PROTOCOL.md, SDK-NODE.md).
 *   nats    callers publish requests with a reply inbox, echo responders sit in a queue group;
 *           the NATS text protocol is spoken here directly. Payload bytes are identical.
 *   floor   the same callers and the same echo worker (here a WebSocket server) joined by
 *           bench/relay.c, a TCP relay that forwards bytes unparsed: the cheapest router.
 *   direct  the same callers talking to the echo worker over one WebSocket hop, no router.
 *
 * Commands (each prints one "result key=value ..." line on stdout, or "error: ..." and exit 2):
 *   bench run     --peer P --port N [--pid N] --size B --callers C --workers W --depth D
 *                 --calls N --warmup N --secs S [--relay-exe PATH] [--scen NAME]
 *                 [--shared 1]  (every echo worker provides one function: the engine must
 *                 have a routing rule with providers: many for bench::echo.*)
 *                 [--caller-port N]  (engine: the callers connect to another engine than the
 *                 workers, e.g. a second engine of a cluster; default --port)
 *                 [--wait-route S]  (before the warm-up, single calls are sent until every
 *                 echo function answered; function_not_found is retried for up to S seconds:
 *                 the time a cluster takes to announce the workers' functions)
 *                 [--fn-prefix P]  (engine function ids P0, P1, ...; default bench::echo.)
 *                 [--pids P,P,...]  (more server processes: their CPU is added up with --pid's)
 *                 [--start-at T]  (the measured phase starts at Unix time T, after the warm-up:
 *                 generators run side by side measure the same window)
 *   bench conns   --peer engine|nats --port N --pid N --n N [--conc K] [--secs S]
 *                 [--probe 1|2 --calls N]  (serial probe before and with the N connections
 *                 open; 2 = pinned to core 0 with taskset, like the table's serial runs)
 *   bench cleanup --port N --pid N --functions F --calls N --callers C --rounds R
 *   bench startup --peer engine|nats|floor --rounds R [--relay-exe PATH] -- ARGV...
 *
 * It #includes ../iii.c (built with -DIII_NO_MAIN) to reuse the engine's buffer, WebSocket
 * framing, SHA-1/base64 and JSON code; nothing of the engine's state is used.
 * Everything is bounded: each phase has a call count and a deadline; a stall is an error.
 */
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"

#include <dirent.h>

/* ==== small helpers ========================================================================= */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void fail(const char *fmt, ...) III_PRINTF(1, 2) III_NORETURN;
static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("error: ", stdout);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    exit(2);
}

static uint64_t rng_s = 0x9E3779B97F4A7C15u;
static uint64_t rng(void)
{
    rng_s ^= rng_s << 13, rng_s ^= rng_s >> 7, rng_s ^= rng_s << 17;
    return rng_s;
}

static const char hexd[] = "0123456789abcdef";

/* A UUIDv4 whose first 8 hex digits carry the caller's slot number (the rest random): the
 * reply is matched to its call without a lookup table, and the id is still a valid UUID. */
static void uuid_slot(char out[37], unsigned slot)
{
    unsigned char b[16];
    uint64_t r1 = rng(), r2 = rng();
    memcpy(b, &r1, 8), memcpy(b + 8, &r2, 8);
    b[0] = (unsigned char)(slot >> 24), b[1] = (unsigned char)(slot >> 16);
    b[2] = (unsigned char)(slot >> 8), b[3] = (unsigned char)slot;
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    int j = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[j++] = '-';
        out[j++] = hexd[b[i] >> 4];
        out[j++] = hexd[b[i] & 15];
    }
    out[36] = 0;
}

static long hexval(const unsigned char *s, size_t n)
{
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        int c = s[i], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static const unsigned char *bmem(const unsigned char *h, size_t hn, const char *nd, size_t nn)
{
    if (nn == 0) return h;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == (unsigned char)nd[0] && !memcmp(h + i, nd, nn)) return h + i;
    return NULL;
}

static void put_u(struct buf *b, unsigned long v)
{
    char t[24];
    int n = snprintf(t, sizeof t, "%lu", v);
    buf_append(b, t, (size_t)n);
}

static void bput(struct buf *b, const void *p, size_t n)
{
    if (buf_append(b, p, n) < 0) fail("out of memory");
}
#define BPUTS(b, s) bput((b), (s), sizeof(s) - 1)

/* ==== /proc and HTTP probes ================================================================= */

/* utime + stime of a process from /proc/PID/stat, in clock ticks (every thread, including the
 * threads that have exited), -1 if unknown. */
static long long proc_stat_ticks(int pid)
{
    if (pid <= 0) return -1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[2048];
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    char *p = strrchr(line, ')');
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* fields after ")": state(3) ... utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return -1;
    return (long long)(ut + st);
}

/* CPU time of a process in ns: the sum of its threads' schedstat run time (ns precision), or
 * utime+stime from /proc/PID/stat (clock ticks) where schedstat is missing. */
static uint64_t proc_cpu_ns(int pid)
{
    if (pid <= 0) return 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    uint64_t sum = 0;
    int got = 0;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char p2[320];
            snprintf(p2, sizeof p2, "/proc/%d/task/%s/schedstat", pid, e->d_name);
            FILE *f = fopen(p2, "r");
            if (!f) continue;
            unsigned long long run = 0;
            if (fscanf(f, "%llu", &run) == 1) sum += run, got = 1;
            fclose(f);
        }
        closedir(d);
    }
    if (got) return sum;
    long long t = proc_stat_ticks(pid);
    return t < 0 ? 0 : (uint64_t)t * (1000000000ull / (unsigned long long)sysconf(_SC_CLK_TCK));
}

/* A "Vm...:" line of /proc/PID/status in kB (VmRSS, VmHWM), -1 if unknown. */
static long proc_status_kb(int pid, const char *key)
{
    if (pid <= 0) return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':') v = strtol(line + kl + 1, NULL, 10);
    fclose(f);
    return v;
}

/* Busy CPU time of the whole machine in ns (all cores; /proc/stat minus idle and iowait): with
 * the router's and the generator's own time subtracted it tells how much else ran meanwhile. */
static uint64_t machine_busy_ns(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]);
    fclose(f);
    if (n < 5) return 0;
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return busy * (1000000000ull / (unsigned long long)sysconf(_SC_CLK_TCK));
}

static double gen_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* Blocking GET http://127.0.0.1:port/path with a 5 s bound; the body is left in out. 0 ok. */
static int http_get(int port, const char *path, struct buf *out)
{
    out->len = out->off = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    uint64_t deadline = now_ns() + 5000000000u;
    long clen = -1;
    size_t hdr = 0;
    for (;;) {
        if (hdr && clen >= 0 && buf_used(out) >= hdr + (size_t)clen) break;
        struct pollfd p = {fd, POLLIN, 0};
        if (now_ns() > deadline || poll(&p, 1, 100) < 0) break;
        if (!p.revents) continue;
        if (buf_reserve(out, 65536) < 0) break;
        ssize_t r = read(fd, out->p + out->len, 65536);
        if (r <= 0) break;
        out->len += (size_t)r;
        if (!hdr) {
            const unsigned char *e = bmem(buf_data(out), buf_used(out), "\r\n\r\n", 4);
            if (e) {
                hdr = (size_t)(e - buf_data(out)) + 4;
                const unsigned char *cl = bmem(buf_data(out), hdr, "Content-Length:", 15);
                if (!cl) cl = bmem(buf_data(out), hdr, "content-length:", 15);
                if (cl) clen = strtol((const char *)cl + 15, NULL, 10);
            }
        }
    }
    close(fd);
    if (!hdr) return -1;
    buf_consume(out, hdr);
    return buf_cstr(out) ? 0 : -1;
}

/* Value of metric `name` in Prometheus text, -1 if absent. */
static double metric(const char *text, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = text; p && *p;) {
        if (!strncmp(p, name, nl) && p[nl] == ' ') return strtod(p + nl + 1, NULL);
        p = strchr(p, '\n');
        if (p) p++;
    }
    return -1;
}

/* The first counter whose name contains "alloc" (an allocation counter, if the engine exports
 * one), its name in name[]. -1 if none. */
static double metric_alloc(const char *text, char *name, size_t cap)
{
    for (const char *p = text; p && *p;) {
        const char *e = strchr(p, '\n');
        size_t ln = e ? (size_t)(e - p) : strlen(p);
        if (*p != '#' && ln < 200) {
            const char *sp = memchr(p, ' ', ln);
            const char *al = NULL;
            for (const char *q = p; sp && q + 5 <= sp; q++)
                if (!strncmp(q, "alloc", 5)) al = q;
            if (sp && al) {
                size_t kn = (size_t)(sp - p) < cap - 1 ? (size_t)(sp - p) : cap - 1;
                memcpy(name, p, kn), name[kn] = 0;
                return strtod(sp + 1, NULL);
            }
        }
        p = e ? e + 1 : NULL;
    }
    return -1;
}

/* ==== connections =========================================================================== */

enum { P_ENGINE = 1, P_NATS, P_FLOOR, P_DIRECT };
enum { R_CALLER = 1, R_WORKER, R_ECHO_SRV, R_IDLE, R_DRAIN };
enum { S_CONNECTING = 1, S_HS, S_OPEN, S_READY, S_DEAD };

struct bconn {
    int fd, role, st, nats, idx;
    int mask;          /* WebSocket client: frames are masked */
    struct buf in, out;
    char accept[32];   /* expected Sec-WebSocket-Accept */
    char inbox[40];    /* NATS caller's reply inbox prefix */
    int got_info, pongs;
    int expect_close;
    /* caller */
    int depth, nfree;
    int *freel;
    uint64_t *sent;
    unsigned char *meas;
    /* worker */
    int nfuncs, first_func, hold;
    char fn_prefix[32];
};

static struct bconn **conns;
static int nconns, capconns;
static struct pollfd *pfds;
static int listen_fd = -1, listen_port;
static int peer;
static struct jdoc jd;

/* payload and call accounting */
static unsigned char *payload;
static size_t psize;
static int g_nfuncs = 1;
static unsigned long g_rr;
static long g_issued, g_done, g_target, g_bad, g_stopped, g_held, g_errors;
static int g_measuring;
static uint64_t *g_lat;
static long g_nlat, g_caplat;
static const char *fn_name = "bench::echo."; /* engine function ids: prefix + index */
static char last_error[256];
static int g_names; /* worker names are unique per generator: a live name is a lease (§5.9) */
static int g_tolerate_nf; /* --wait-route: function_not_found answers are counted, not fatal */
static long g_notfound;

static struct bconn *conn_add(int fd, int role)
{
    if (nconns == capconns) {
        int nc = capconns ? capconns * 2 : 64;
        struct bconn **v = realloc(conns, (size_t)nc * sizeof *v);
        struct pollfd *pv = realloc(pfds, (size_t)(nc + 1) * sizeof *pv);
        if (!v || !pv) fail("out of memory");
        conns = v, pfds = pv, capconns = nc;
    }
    struct bconn *c = calloc(1, sizeof *c);
    if (!c) fail("out of memory");
    c->fd = fd, c->role = role, c->idx = nconns;
    conns[nconns++] = c;
    return c;
}

static void conn_kill(struct bconn *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->st = S_DEAD;
}

static void conns_free(void)
{
    for (int i = 0; i < nconns; i++) {
        struct bconn *c = conns[i];
        if (c->fd >= 0) close(c->fd);
        buf_free(&c->in), buf_free(&c->out);
        free(c->freel), free(c->sent), free(c->meas);
        free(c);
    }
    nconns = 0;
}

static void sock_opts(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static int tcp_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) fail("socket: %s", strerror(errno));
    sock_opts(fd);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)
        fail("connect 127.0.0.1:%d: %s", port, strerror(errno));
    return fd;
}

static int tcp_listen(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (fd < 0) fail("socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) fail("listen: %s", strerror(errno));
    getsockname(fd, (struct sockaddr *)&a, &al);
    *port = ntohs(a.sin_port);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

/* ---- WebSocket client side ------------------------------------------------------------------ */

static void ws_client_start(struct bconn *c, int port)
{
    unsigned char k[16];
    char key[32];
    for (int i = 0; i < 16; i++) k[i] = (unsigned char)rng();
    b64_encode(k, 16, key);
    ws_accept_key(key, 24, c->accept);
    c->mask = 1;
    c->st = S_CONNECTING;
    char req[256];
    int n = snprintf(req, sizeof req,
                     "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n",
                     port, key);
    bput(&c->out, req, (size_t)n);
}

/* Starts a text frame in c->out; wse() finishes it (and masks it on a client connection with a
 * fresh random key, as every browser/Node WebSocket client does). */
static size_t wsb(struct bconn *c, size_t est)
{
    size_t at = ws_begin(&c->out, est, c->mask);
    if (at == SIZE_MAX) fail("out of memory");
    return at;
}

static void wse(struct bconn *c, size_t at)
{
    if (ws_end(&c->out, at, WS_TEXT, c->mask) < 0) fail("out of memory");
    if (!c->mask) return;
    unsigned char *h = c->out.p + c->out.off + at;
    size_t hl, n = h[1] & 127;
    if (n < 126) hl = 6;
    else if (n == 126) hl = 8, n = (size_t)h[2] << 8 | h[3];
    else {
        hl = 14, n = 0;
        for (int i = 0; i < 8; i++) n = n << 8 | h[2 + i];
    }
    uint64_t r = rng();
    unsigned char key[4] = {(unsigned char)r, (unsigned char)(r >> 8), (unsigned char)(r >> 16), (unsigned char)(r >> 24)};
    memcpy(h + hl - 4, key, 4);
    ws_unmask(h + hl, n, key); /* XOR: masking and unmasking are the same operation */
}

static void ws_text(struct bconn *c, const char *s)
{
    size_t n = strlen(s), at = wsb(c, n);
    bput(&c->out, s, n);
    wse(c, at);
}

/* What an SDK worker sends once the socket is open (SDK-NODE.md §4): its registerfunction
 * frames, then the void engine::workers::register call; then a JSON ping whose pong tells us
 * that everything before it was applied (frames of one connection are handled in order). */
static void ws_on_open(struct bconn *c)
{
    char fr[512];
    for (int i = 0; i < c->nfuncs; i++) {
        snprintf(fr, sizeof fr, "{\"type\":\"registerfunction\",\"description\":\"bench echo\",\"id\":\"%s%d\"}",
                 c->fn_prefix, c->first_func + i);
        ws_text(c, fr);
    }
    snprintf(fr, sizeof fr,
             "{\"type\":\"invokefunction\",\"function_id\":\"engine::workers::register\",\"data\":{\"runtime\":\"c\","
             "\"version\":\"0.1.0\",\"name\":\"bench-%s-%d-%d\",\"os\":\"linux\",\"pid\":%d,\"isolation\":null,"
             "\"telemetry\":{\"language\":\"en-US\",\"project_name\":\"iii-bench\",\"framework\":\"iii-bench\"}},"
             "\"action\":{\"type\":\"void\"}}",
             c->role == R_CALLER ? "caller" : c->role == R_IDLE ? "idle" : "worker", (int)getpid(), ++g_names,
             (int)getpid());
    ws_text(c, fr);
    ws_text(c, "{\"type\":\"ping\"}");
}

/* ---- NATS ----------------------------------------------------------------------------------- */

static void bn_nats_on_info(struct bconn *c)
{
    static const char connect_line[] =
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"name\":\"iii-bench\","
        "\"lang\":\"c\",\"version\":\"0.1.0\",\"protocol\":1,\"echo\":false}\r\n";
    bput(&c->out, connect_line, sizeof connect_line - 1);
    char l[256];
    int n;
    if (c->role == R_CALLER) {
        snprintf(c->inbox, sizeof c->inbox, "_INBOX.%08lx%08lx.", (unsigned long)(rng() & 0xffffffffu),
                 (unsigned long)(rng() & 0xffffffffu));
        n = snprintf(l, sizeof l, "SUB %s* 1\r\nPING\r\n", c->inbox);
    } else if (c->role == R_WORKER) {
        n = snprintf(l, sizeof l, "SUB bench.echo bench.echo.q 1\r\nPING\r\n");
    } else {
        n = snprintf(l, sizeof l, "SUB bench.idle.%d 1\r\nPING\r\n", c->idx);
    }
    bput(&c->out, l, (size_t)n);
}

/* ==== calls ================================================================================= */

static void caller_init(struct bconn *c, int depth)
{
    c->depth = depth, c->nfree = depth;
    c->freel = malloc((size_t)depth * sizeof *c->freel);
    c->sent = calloc((size_t)depth, sizeof *c->sent);
    c->meas = calloc((size_t)depth, 1);
    if (!c->freel || !c->sent || !c->meas) fail("out of memory");
    for (int i = 0; i < depth; i++) c->freel[i] = depth - 1 - i;
}

static void issue(struct bconn *c)
{
    int slot = c->freel[--c->nfree];
    c->sent[slot] = now_ns();
    c->meas[slot] = (unsigned char)g_measuring;
    if (c->nats) {
        char l[128];
        int n = snprintf(l, sizeof l, "PUB bench.echo %s%x %zu\r\n", c->inbox, (unsigned)slot, psize);
        bput(&c->out, l, (size_t)n);
        bput(&c->out, payload, psize);
        BPUTS(&c->out, "\r\n");
    } else {
        char id[37], fid[48];
        uuid_slot(id, (unsigned)slot);
        int fl = snprintf(fid, sizeof fid, "%s%lu", fn_name, g_rr++ % (unsigned long)g_nfuncs);
        size_t at = wsb(c, psize + 120);
        BPUTS(&c->out, "{\"type\":\"invokefunction\",\"invocation_id\":\"");
        bput(&c->out, id, 36);
        BPUTS(&c->out, "\",\"function_id\":\"");
        bput(&c->out, fid, (size_t)fl);
        BPUTS(&c->out, "\",\"data\":");
        bput(&c->out, payload, psize);
        bput(&c->out, "}", 1);
        wse(c, at);
    }
    g_issued++;
}

static void complete(struct bconn *c, long slot, const unsigned char *res, size_t rl, int exact)
{
    if (slot < 0 || slot >= c->depth) {
        g_bad++;
        snprintf(last_error, sizeof last_error, "reply for unknown slot");
        return;
    }
    uint64_t t = now_ns();
    if (c->meas[slot] && g_nlat < g_caplat) g_lat[g_nlat++] = t - c->sent[slot];
    /* the echo must carry the payload back: exact for NATS and the floor; the engine adds
     * "_caller_worker_id" as the last member of an object payload (PROTOCOL.md §3.2) */
    if (!res || rl < psize || memcmp(res, payload, psize - 1) || (exact && rl != psize)) {
        g_bad++;
        snprintf(last_error, sizeof last_error, "echo mismatch: %.*s", (int)(rl < 120 ? rl : 120),
                 res ? (const char *)res : "(none)");
    }
    c->freel[c->nfree++] = (int)slot;
    g_done++;
}

static void pump(void)
{
    for (int i = 0; i < nconns; i++) {
        struct bconn *c = conns[i];
        if (c->role != R_CALLER || c->st != S_READY) continue;
        while (c->nfree > 0 && g_issued < g_target) issue(c);
    }
}

/* ==== message handling ====================================================================== */

static int jeq(int ti, const char *lit)
{
    size_t n = strlen(lit);
    return ti >= 0 && jd.t[ti].type == J_STRING && JLEN(&jd, ti) == n + 2 && !memcmp(JRAW(&jd, ti) + 1, lit, n);
}

/* One WebSocket text message from the engine (client side) or from a caller (echo server). */
static void ws_message(struct bconn *c, const unsigned char *p, size_t n)
{
    if (json_parse(&jd, p, n, 2, 0) < 0 || jd.t[0].type != J_OBJECT) {
        g_errors++;
        snprintf(last_error, sizeof last_error, "bad JSON frame: %.*s", (int)(n < 120 ? n : 120), (const char *)p);
        return;
    }
    int ty = json_get(&jd, 0, "type");
    if (jeq(ty, "invokefunction")) {
        if (c->role == R_CALLER) return;
        int iid = json_get(&jd, 0, "invocation_id"), fid = json_get(&jd, 0, "function_id"),
            data = json_get(&jd, 0, "data");
        if (iid < 0 || jd.t[iid].type != J_STRING) return; /* a void call: nothing to answer */
        if (c->hold) {
            g_held++;
            return;
        }
        size_t at = wsb(c, JLEN(&jd, iid) + (fid >= 0 ? JLEN(&jd, fid) : 2) + (data >= 0 ? JLEN(&jd, data) : 4) + 80);
        BPUTS(&c->out, "{\"type\":\"invocationresult\",\"invocation_id\":");
        bput(&c->out, JRAW(&jd, iid), JLEN(&jd, iid));
        BPUTS(&c->out, ",\"function_id\":");
        if (fid >= 0) bput(&c->out, JRAW(&jd, fid), JLEN(&jd, fid));
        else BPUTS(&c->out, "\"\"");
        if (data >= 0) {
            BPUTS(&c->out, ",\"result\":");
            bput(&c->out, JRAW(&jd, data), JLEN(&jd, data));
        }
        bput(&c->out, "}", 1);
        wse(c, at);
    } else if (jeq(ty, "invocationresult")) {
        if (c->role != R_CALLER) return;
        int iid = json_get(&jd, 0, "invocation_id"), er = json_get(&jd, 0, "error"), res = json_get(&jd, 0, "result");
        long slot = iid >= 0 && JLEN(&jd, iid) == 38 ? hexval(JRAW(&jd, iid) + 1, 8) : -1;
        if (!JABSENT(&jd, er)) {
            if (bmem(JRAW(&jd, er), JLEN(&jd, er), "\"invocation_stopped\"", 20)) {
                g_stopped++;
                if (slot >= 0 && slot < c->depth) c->freel[c->nfree++] = (int)slot;
                return;
            }
            if (g_tolerate_nf && bmem(JRAW(&jd, er), JLEN(&jd, er), "\"function_not_found\"", 20)) {
                g_notfound++;
                if (slot >= 0 && slot < c->depth) c->freel[c->nfree++] = (int)slot, g_done++;
                return;
            }
            g_bad++;
            snprintf(last_error, sizeof last_error, "error result: %.*s", (int)(n < 200 ? n : 200), (const char *)p);
            if (slot >= 0 && slot < c->depth) c->freel[c->nfree++] = (int)slot, g_done++;
            return;
        }
        complete(c, slot, res >= 0 ? JRAW(&jd, res) : NULL, res >= 0 ? JLEN(&jd, res) : 0, peer != P_ENGINE);
    } else if (jeq(ty, "ping")) {
        ws_text(c, "{\"type\":\"pong\"}");
    } else if (jeq(ty, "pong")) {
        c->pongs++;
        if (c->st == S_OPEN) c->st = S_READY;
    } else if (jeq(ty, "registrationrejected")) {
        g_errors++;
        snprintf(last_error, sizeof last_error, "%.*s", (int)(n < 200 ? n : 200), (const char *)p);
    }
}

/* Parses complete frames out of c->in. */
static void ws_frames(struct bconn *c)
{
    for (;;) {
        unsigned char *p = buf_data(&c->in), mk[4];
        size_t avail = buf_used(&c->in), plen;
        int op, fin, code;
        int server = c->role == R_ECHO_SRV;
        int hl = ws_parse_hdr(p, avail, server, (size_t)1 << 30, &op, &fin, &plen, mk, &code);
        if (hl < 0) fail("WebSocket protocol error from peer (code %d)", code);
        if (hl == 0 || avail - (size_t)hl < plen) return;
        unsigned char *pl = p + hl;
        if (server) ws_unmask(pl, plen, mk);
        if (!fin || op == WS_CONT) fail("fragmented WebSocket messages are not expected here");
        if (op == WS_TEXT || op == WS_BIN) ws_message(c, pl, plen);
        else if (op == WS_PING) {
            if (ws_frame(&c->out, WS_PONG, pl, plen, c->mask) < 0) fail("out of memory");
        } else if (op == WS_CLOSE) {
            if (!c->expect_close) fail("peer sent a WebSocket Close");
            conn_kill(c);
            return;
        }
        buf_consume(&c->in, (size_t)hl + plen);
    }
}

static void echo_srv_handshake(struct bconn *c)
{
    const unsigned char *p = buf_data(&c->in);
    size_t n = buf_used(&c->in);
    const unsigned char *e = bmem(p, n, "\r\n\r\n", 4);
    if (!e) {
        if (n > 16384) fail("oversized upgrade request");
        return;
    }
    size_t hl = (size_t)(e - p) + 4;
    const unsigned char *k = bmem(p, hl, "Sec-WebSocket-Key: ", 19);
    if (!k) fail("upgrade request without Sec-WebSocket-Key");
    k += 19;
    const unsigned char *ke = k;
    while (ke < p + hl && *ke != '\r') ke++;
    char acc[32], resp[256];
    ws_accept_key((const char *)k, (size_t)(ke - k), acc);
    int rn = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n",
                      acc);
    bput(&c->out, resp, (size_t)rn);
    buf_consume(&c->in, hl);
    c->st = S_READY;
}

static void ws_client_handshake(struct bconn *c)
{
    const unsigned char *p = buf_data(&c->in);
    size_t n = buf_used(&c->in);
    const unsigned char *e = bmem(p, n, "\r\n\r\n", 4);
    if (!e) return;
    size_t hl = (size_t)(e - p) + 4;
    if (n < 12 || memcmp(p, "HTTP/1.1 101", 12)) fail("upgrade refused: %.*s", (int)(hl < 200 ? hl : 200), (const char *)p);
    if (!bmem(p, hl, c->accept, strlen(c->accept))) fail("bad Sec-WebSocket-Accept");
    buf_consume(&c->in, hl);
    c->st = S_OPEN;
    ws_on_open(c);
}

/* One NATS protocol operation at a time out of c->in. */
static void nats_ops(struct bconn *c)
{
    for (;;) {
        unsigned char *p = buf_data(&c->in);
        size_t n = buf_used(&c->in);
        const unsigned char *e = bmem(p, n, "\r\n", 2);
        if (!e) {
            if (n > 65536) fail("NATS: control line too long");
            return;
        }
        size_t ll = (size_t)(e - p);
        if (ll >= 4 && !memcmp(p, "MSG ", 4)) {
            /* MSG <subject> <sid> [reply-to] <#bytes> */
            const unsigned char *tok[5];
            size_t tl[5];
            int nt = 0;
            size_t i = 4;
            while (i < ll && nt < 5) {
                while (i < ll && p[i] == ' ') i++;
                size_t s = i;
                while (i < ll && p[i] != ' ') i++;
                if (i > s) tok[nt] = p + s, tl[nt] = i - s, nt++;
            }
            if (nt < 3) fail("NATS: bad MSG line");
            long len = strtol((const char *)tok[nt - 1], NULL, 10);
            if (len < 0 || n < ll + 2 + (size_t)len + 2) return;
            const unsigned char *body = p + ll + 2;
            if (c->role == R_WORKER && nt == 4) {
                if (c->hold) g_held++;
                else {
                    char l[160];
                    int m = snprintf(l, sizeof l, "PUB %.*s %ld\r\n", (int)tl[2], (const char *)tok[2], len);
                    bput(&c->out, l, (size_t)m);
                    bput(&c->out, body, (size_t)len);
                    BPUTS(&c->out, "\r\n");
                }
            } else if (c->role == R_CALLER) {
                size_t il = strlen(c->inbox);
                long slot = tl[0] > il ? hexval(tok[0] + il, tl[0] - il) : -1;
                complete(c, slot, body, (size_t)len, 1);
            }
            buf_consume(&c->in, ll + 2 + (size_t)len + 2);
            continue;
        }
        if (ll >= 4 && !memcmp(p, "PING", 4)) BPUTS(&c->out, "PONG\r\n");
        else if (ll >= 4 && !memcmp(p, "PONG", 4)) {
            c->pongs++;
            if (c->st == S_OPEN) c->st = S_READY;
        } else if (ll >= 4 && !memcmp(p, "INFO", 4)) {
            if (!c->got_info) {
                c->got_info = 1;
                c->st = S_OPEN;
                bn_nats_on_info(c);
            }
        } else if (ll >= 4 && !memcmp(p, "-ERR", 4)) {
            fail("NATS: %.*s", (int)(ll < 200 ? ll : 200), (const char *)p);
        }
        buf_consume(&c->in, ll + 2);
    }
}

/* ==== the event loop ======================================================================== */

static void on_readable(struct bconn *c)
{
    size_t total = 0;
    for (;;) {
        if (buf_reserve(&c->in, 262144) < 0) fail("out of memory");
        ssize_t r = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
        if (r > 0) {
            c->in.len += (size_t)r;
            total += (size_t)r;
            if ((size_t)r < 262144 || total >= ((size_t)4 << 20)) break;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
        /* EOF or error */
        if (c->role == R_DRAIN) {
            conn_kill(c);
            return;
        }
        if (!c->expect_close)
            fail("connection %d (role %d) closed by peer%s%s", c->idx, c->role, r < 0 ? ": " : "",
                 r < 0 ? strerror(errno) : "");
        conn_kill(c);
        return;
    }
    if (c->role == R_DRAIN) {
        c->in.len = c->in.off = 0;
        return;
    }
    if (c->nats) {
        nats_ops(c);
        return;
    }
    if (c->st == S_HS) {
        if (c->role == R_ECHO_SRV) echo_srv_handshake(c);
        else ws_client_handshake(c);
        if (c->st == S_HS) return;
    }
    ws_frames(c);
}

static void flush(struct bconn *c)
{
    while (c->fd >= 0 && buf_used(&c->out)) {
        ssize_t w = write(c->fd, buf_data(&c->out), buf_used(&c->out));
        if (w > 0) {
            buf_consume(&c->out, (size_t)w);
            continue;
        }
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        if (c->expect_close) {
            conn_kill(c);
            return;
        }
        fail("write: %s", w < 0 ? strerror(errno) : "short");
    }
}

static void loop_once(int timeout_ms)
{
    /* calls that can start now go out before we sleep in poll() */
    pump();
    for (int i = 0; i < nconns; i++)
        if (conns[i]->fd >= 0 && buf_used(&conns[i]->out) && conns[i]->st != S_CONNECTING) flush(conns[i]);
    int np = 0;
    if (listen_fd >= 0) pfds[np].fd = listen_fd, pfds[np].events = POLLIN, pfds[np].revents = 0, np++;
    int base = np;
    for (int i = 0; i < nconns; i++) {
        struct bconn *c = conns[i];
        short ev = 0;
        if (c->fd >= 0) {
            ev = c->st == S_CONNECTING ? POLLOUT : POLLIN;
            if (buf_used(&c->out)) ev |= POLLOUT;
        }
        pfds[base + i].fd = c->fd, pfds[base + i].events = ev, pfds[base + i].revents = 0;
    }
    np = base + nconns;
    int r = poll(pfds, (nfds_t)np, timeout_ms);
    if (r < 0 && errno != EINTR) fail("poll: %s", strerror(errno));
    if (r > 0 && listen_fd >= 0 && pfds[0].revents) {
        for (;;) {
            int fd = accept(listen_fd, NULL, NULL);
            if (fd < 0) break;
            sock_opts(fd);
            struct bconn *c = conn_add(fd, R_ECHO_SRV);
            c->st = S_HS;
        }
    }
    int n0 = nconns < np - base ? nconns : np - base;
    for (int i = 0; r > 0 && i < n0; i++) {
        struct bconn *c = conns[i];
        short re = pfds[base + i].revents;
        if (!re || c->fd < 0) continue;
        if (c->st == S_CONNECTING && (re & (POLLOUT | POLLERR | POLLHUP))) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) fail("connect: %s", strerror(err));
            c->st = S_HS;
        }
        if (re & (POLLIN | POLLHUP | POLLERR)) on_readable(c);
        if (c->fd >= 0 && (re & POLLOUT)) flush(c);
    }
    pump();
    for (int i = 0; i < nconns; i++)
        if (conns[i]->fd >= 0 && buf_used(&conns[i]->out) && conns[i]->st != S_CONNECTING) flush(conns[i]);
}

static int count_ready(int role)
{
    int k = 0;
    for (int i = 0; i < nconns; i++)
        if (conns[i]->role == role && conns[i]->st == S_READY) k++;
    return k;
}

static void wait_ready(int role, int want, double secs, const char *what)
{
    uint64_t dl = now_ns() + (uint64_t)(secs * 1e9);
    while (count_ready(role) < want) {
        if (now_ns() > dl) fail("timed out waiting for %s (%d of %d ready)", what, count_ready(role), want);
        if (g_errors) fail("%s", last_error);
        loop_once(20);
    }
}

/* Opens a client connection to port with the given role; for the engine/floor/direct it is a
 * WebSocket client, for NATS a NATS client. */
static struct bconn *open_client(int port, int role, int nats)
{
    struct bconn *c = conn_add(tcp_connect(port), role);
    c->nats = nats;
    if (nats) c->st = S_CONNECTING;
    else ws_client_start(c, port);
    return c;
}

/* Runs until n more calls are done (issuing no more after `secs`); returns the calls done. */
static long run_calls(long n, double secs, int measure)
{
    long d0 = g_done;
    g_target = g_issued + n;
    g_measuring = measure;
    uint64_t t0 = now_ns(), stop = t0 + (uint64_t)(secs * 1e9), hard = stop + 30000000000u;
    while (g_done < g_issued || g_issued < g_target) {
        uint64_t t = now_ns();
        if (t > stop) g_target = g_issued;
        if (t > hard) fail("calls did not complete within 30 s after the deadline (%ld in flight)", g_issued - g_done);
        if (g_bad || g_errors) fail("%s", last_error);
        loop_once(50);
    }
    if (g_bad || g_errors) fail("%s", last_error);
    return g_done - d0;
}

/* ==== child processes ======================================================================= */

static pid_t spawn(char **argv, int *outfd)
{
    int pfd[2];
    if (pipe(pfd) < 0) fail("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) fail("fork: %s", strerror(errno));
    if (pid == 0) {
        dup2(pfd[1], 1), dup2(pfd[1], 2);
        close(pfd[0]), close(pfd[1]);
        signal(SIGPIPE, SIG_DFL);
        execv(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    fcntl(pfd[0], F_SETFL, fcntl(pfd[0], F_GETFL) | O_NONBLOCK);
    fcntl(pfd[0], F_SETFD, FD_CLOEXEC);
    *outfd = pfd[0];
    return pid;
}

/* Reads the child's output until a line containing `ready` shows up (bounded); the port is
 * taken from the last ":NUMBER" of the line that contains `portline`. The drained output stays
 * in the loop as a R_DRAIN connection so the child never blocks on a full pipe. */
static int wait_line(int fd, const char *ready, const char *portline, int *port, double secs, struct buf *acc)
{
    uint64_t dl = now_ns() + (uint64_t)(secs * 1e9);
    *port = 0;
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        if (now_ns() > dl) return -1;
        poll(&p, 1, 10);
        if (buf_reserve(acc, 4096) < 0) fail("out of memory");
        ssize_t r = read(fd, acc->p + acc->len, 4096);
        if (r == 0) return -1;
        if (r > 0) acc->len += (size_t)r;
        if (!buf_cstr(acc)) fail("out of memory");
        const char *txt = (const char *)buf_data(acc);
        const char *pl = strstr(txt, portline);
        if (pl && !*port) {
            const char *e = strchr(pl, '\n');
            if (e) {
                const char *q = e;
                while (q > pl && q[-1] != ':') q--;
                *port = atoi(q);
            }
        }
        const char *rl = strstr(txt, ready);
        if (rl && strchr(rl, '\n') && *port) return 0;
    }
}

static int stop_child(pid_t pid, double *exit_ms)
{
    uint64_t t0 = now_ns();
    kill(pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 20000; i++) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (exit_ms) *exit_ms = (double)(now_ns() - t0) / 1e6;
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        }
        struct timespec ts = {0, 250000};
        nanosleep(&ts, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
}

static pid_t relay_pid;
static int relay_fd = -1;

/* Starts bench/relay.c listening on an ephemeral port, forwarding to target. */
static int start_relay(const char *exe, int target)
{
    char tp[16];
    snprintf(tp, sizeof tp, "%d", target);
    char *argv[] = {(char *)exe, "0", tp, NULL};
    struct buf acc = {0};
    int port;
    relay_pid = spawn(argv, &relay_fd);
    if (wait_line(relay_fd, "listening on", "listening on", &port, 10, &acc) < 0)
        fail("relay did not start: %s", acc.p ? (char *)buf_data(&acc) : "");
    buf_free(&acc);
    struct bconn *d = conn_add(relay_fd, R_DRAIN);
    d->st = S_OPEN;
    return port;
}

/* ==== options =============================================================================== */

static struct {
    const char *peer, *relay_exe, *scen;
    int port, pid, callers, workers, depth, functions, rounds, conc, probe;
    long size, calls, warmup, n;
    double secs;
    char **argv;
    int shared; /* --shared 1: every echo worker provides the same function (routing replicas) */
    int caller_port;                /* --caller-port: callers on another engine (a cluster) */
    double wait_route, start_at;    /* --wait-route S, --start-at UNIX_TIME */
    const char *fn_prefix, *pids;   /* --fn-prefix, --pids P,P,... */
} O = {"engine", NULL, NULL, 0, 0, 1, 1, 1, 200, 3, 256, 0, 128, 10000, 1000, 1000, 5, NULL, 0, 0, 0, 0, NULL, NULL};

static int peer_of(const char *s)
{
    if (!strcmp(s, "engine")) return P_ENGINE;
    if (!strcmp(s, "nats")) return P_NATS;
    if (!strcmp(s, "floor")) return P_FLOOR;
    if (!strcmp(s, "direct")) return P_DIRECT;
    fail("unknown peer '%s'", s);
}

static void parse_opts(int argc, char **argv)
{
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--")) {
            O.argv = argv + i + 1;
            return;
        }
        if (!v) fail("option %s needs a value", a);
        i++;
        if (!strcmp(a, "--peer")) O.peer = v;
        else if (!strcmp(a, "--port")) O.port = atoi(v);
        else if (!strcmp(a, "--pid")) O.pid = atoi(v);
        else if (!strcmp(a, "--size")) O.size = atol(v);
        else if (!strcmp(a, "--callers")) O.callers = atoi(v);
        else if (!strcmp(a, "--workers")) O.workers = atoi(v);
        else if (!strcmp(a, "--depth")) O.depth = atoi(v);
        else if (!strcmp(a, "--calls")) O.calls = atol(v);
        else if (!strcmp(a, "--warmup")) O.warmup = atol(v);
        else if (!strcmp(a, "--secs")) O.secs = atof(v);
        else if (!strcmp(a, "--n")) O.n = atol(v);
        else if (!strcmp(a, "--conc")) O.conc = atoi(v);
        else if (!strcmp(a, "--probe")) O.probe = atoi(v);
        else if (!strcmp(a, "--functions")) O.functions = atoi(v);
        else if (!strcmp(a, "--rounds")) O.rounds = atoi(v);
        else if (!strcmp(a, "--relay-exe")) O.relay_exe = v;
        else if (!strcmp(a, "--scen")) O.scen = v;
        else if (!strcmp(a, "--shared")) O.shared = atoi(v);
        else if (!strcmp(a, "--caller-port")) O.caller_port = atoi(v);
        else if (!strcmp(a, "--wait-route")) O.wait_route = atof(v);
        else if (!strcmp(a, "--start-at")) O.start_at = atof(v);
        else if (!strcmp(a, "--fn-prefix")) O.fn_prefix = v;
        else if (!strcmp(a, "--pids")) O.pids = v;
        else fail("unknown option %s", a);
    }
}

static void make_payload(size_t n)
{
    if (n < 16) n = 16;
    psize = n;
    payload = malloc(n);
    if (!payload) fail("out of memory");
    memcpy(payload, "{\"p\":\"", 6);
    for (size_t i = 6; i < n - 2; i++) payload[i] = (unsigned char)('a' + i % 26);
    payload[n - 2] = '"', payload[n - 1] = '}';
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(double q)
{
    if (!g_nlat) return 0;
    long k = (long)(q * (double)(g_nlat - 1) + 0.5);
    return (double)g_lat[k] / 1000.0;
}

/* ==== bench run ============================================================================= */

/* CPU time of the processes listed in --pids (comma-separated), added up; 0 without any. */
static uint64_t pids_cpu_ns(void)
{
    uint64_t sum = 0;
    for (const char *p = O.pids; p && *p;) {
        sum += proc_cpu_ns(atoi(p));
        p = strchr(p, ',');
        if (p) p++;
    }
    return sum;
}

/* --wait-route: single calls, round robin over the echo functions, until each of them answered
 * in a row; function_not_found (the cluster has not announced them yet) is retried after 50 ms,
 * for at most `secs`. Returns the seconds it took. */
static double wait_route(double secs)
{
    uint64_t t0 = now_ns(), dl = t0 + (uint64_t)(secs * 1e9);
    int ok = 0;
    g_tolerate_nf = 1;
    while (ok < g_nfuncs) {
        if (now_ns() > dl) fail("the echo functions were not callable through the caller's engine within %.0f s", secs);
        long nf = g_notfound;
        run_calls(1, secs, 0);
        if (g_notfound == nf) {
            ok++;
            continue;
        }
        ok = 0;
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    }
    g_tolerate_nf = 0;
    return (double)(now_ns() - t0) / 1e9;
}

/* --start-at: sleeps until the wall clock reaches T (at most 60 s away), so that generators
 * started side by side measure the same seconds. */
static void start_at(double t)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    double left = t - ((double)now.tv_sec + (double)now.tv_nsec / 1e9);
    if (left > 60) fail("--start-at is more than 60 s away");
    if (left <= 0) return;
    struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
    nanosleep(&ts, NULL);
}

static int cmd_run(void)
{
    peer = peer_of(O.peer);
    make_payload((size_t)O.size);
    int nats = peer == P_NATS;
    int port = O.port;
    int srv_pid = O.pid;
    if (O.fn_prefix) {
        if (strlen(O.fn_prefix) > 24) fail("--fn-prefix: at most 24 characters");
        fn_name = O.fn_prefix;
    }
    if (O.caller_port && peer != P_ENGINE) fail("--caller-port is for the engine peer");
    g_caplat = O.calls;
    g_lat = malloc((size_t)g_caplat * sizeof *g_lat);
    if (!g_lat) fail("out of memory");

    /* the echo workers */
    if (peer == P_ENGINE || peer == P_NATS) {
        g_nfuncs = nats || O.shared ? 1 : O.workers;
        for (int w = 0; w < O.workers; w++) {
            struct bconn *c = open_client(port, R_WORKER, nats);
            c->nfuncs = 1, c->first_func = O.shared ? 0 : w;
            snprintf(c->fn_prefix, sizeof c->fn_prefix, "%s", fn_name);
        }
        wait_ready(R_WORKER, O.workers, 20, "echo workers");
    } else {
        listen_fd = tcp_listen(&listen_port);
        port = listen_port;
        if (peer == P_FLOOR) {
            if (!O.relay_exe) fail("--relay-exe is needed for the floor");
            port = start_relay(O.relay_exe, listen_port);
            srv_pid = (int)relay_pid;
        }
    }
    for (int k = 0; k < O.callers; k++) {
        struct bconn *c = open_client(O.caller_port ? O.caller_port : port, R_CALLER, nats);
        caller_init(c, O.depth);
    }
    wait_ready(R_CALLER, O.callers, 20, "callers");

    /* (functions announced through the cluster,) warm-up, then the measured phase */
    double route_s = O.wait_route > 0 ? wait_route(O.wait_route) : -1;
    if (O.warmup > 0) run_calls(O.warmup, O.secs, 0);
    if (O.start_at > 0) start_at(O.start_at);
    struct buf mt = {0};
    double inv0 = -1, mem0 = -1, al0 = -1;
    char alname[200] = "";
    if (peer == P_ENGINE && http_get(O.port, "/metrics", &mt) == 0) {
        inv0 = metric((char *)buf_data(&mt), "iii_invocations_total");
        mem0 = metric((char *)buf_data(&mt), "iii_memory_bytes");
        al0 = metric_alloc((char *)buf_data(&mt), alname, sizeof alname);
    }
    long long tk0 = proc_stat_ticks(srv_pid);
    uint64_t cpu0 = proc_cpu_ns(srv_pid), m0 = machine_busy_ns(), xcpu0 = pids_cpu_ns();
    double g0 = gen_cpu_s();
    uint64_t t0 = now_ns();
    long done = run_calls(O.calls, O.secs, 1);
    uint64_t t1 = now_ns();
    double g1 = gen_cpu_s();
    uint64_t cpu1 = proc_cpu_ns(srv_pid), m1 = machine_busy_ns(), xcpu1 = pids_cpu_ns();
    long long tk1 = proc_stat_ticks(srv_pid);
    long rss = proc_status_kb(srv_pid, "VmRSS"), hwm = proc_status_kb(srv_pid, "VmHWM");
    double inv1 = -1, mem1 = -1, al1 = -1;
    if (peer == P_ENGINE && http_get(O.port, "/metrics", &mt) == 0) {
        inv1 = metric((char *)buf_data(&mt), "iii_invocations_total");
        mem1 = metric((char *)buf_data(&mt), "iii_memory_bytes");
        al1 = metric_alloc((char *)buf_data(&mt), alname, sizeof alname);
    }
    buf_free(&mt);

    double secs = (double)(t1 - t0) / 1e9;
    qsort(g_lat, (size_t)g_nlat, sizeof *g_lat, cmp_u64);
    printf("result peer=%s scen=%s size=%ld callers=%d workers=%d depth=%d calls=%ld secs=%.3f cps=%.0f "
           "mbps=%.2f p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f gen_cpu_pct=%.0f",
           O.peer, O.scen ? O.scen : "run", O.size, O.callers, O.workers, O.depth, done, secs, (double)done / secs,
           (double)done * (double)psize / secs / 1e6, pct_us(0.50), pct_us(0.90), pct_us(0.99),
           g_nlat ? (double)g_lat[g_nlat - 1] / 1000.0 : 0.0, 100.0 * (g1 - g0) / secs);
    if (srv_pid > 0)
        printf(" srv_cpu_us_call=%.2f srv_cpu_pct=%.0f srv_rss_kb=%ld srv_hwm_kb=%ld",
               (double)(cpu1 - cpu0) / 1e3 / (double)done, 100.0 * (double)(cpu1 - cpu0) / 1e9 / secs, rss, hwm);
    /* the same CPU time as the kernel's utime + stime (clock ticks: 10 ms at 100 Hz) */
    if (tk0 >= 0 && tk1 >= tk0)
        printf(" srv_stat_ticks=%lld srv_stat_cpu_us_call=%.2f", tk1 - tk0,
               (double)(tk1 - tk0) * 1e6 / (double)sysconf(_SC_CLK_TCK) / (double)done);
    if (O.pids)
        printf(" all_srv_cpu_us_call=%.2f all_srv_cpu_pct=%.0f", (double)(cpu1 - cpu0 + xcpu1 - xcpu0) / 1e3 / (double)done,
               100.0 * (double)(cpu1 - cpu0 + xcpu1 - xcpu0) / 1e9 / secs);
    if (route_s >= 0) printf(" route_wait_s=%.2f", route_s);
    if (m1 > m0) {
        double other = (double)(m1 - m0) / 1e9 - (g1 - g0) - (double)(cpu1 - cpu0 + xcpu1 - xcpu0) / 1e9;
        printf(" other_cpu_pct=%.0f", other > 0 ? 100.0 * other / secs : 0.0);
    }
    if (inv0 >= 0 && inv1 >= 0) printf(" engine_invocations=%.0f", inv1 - inv0);
    if (mem1 >= 0) printf(" engine_mem_bytes=%.0f", mem1);
    (void)mem0;
    if (al0 >= 0 && al1 >= 0) printf(" metric_allocs_call=%.2f metric_allocs_name=%s", (al1 - al0) / (double)done, alname);
    printf("\n");
    fflush(stdout);
    conns_free();
    if (relay_pid > 0) stop_child(relay_pid, NULL);
    return 0;
}

/* ==== bench conns: N idle registered workers ================================================ */

/* A short serial probe (one echo worker, one caller, one call in flight) over fresh
 * connections; the connections already open are parked outside the generator's poll set, so
 * only the server sees them. Optionally pinned (router and generator on core 0) like the serial
 * runs of the table. Fills p50/p99 in µs and calls/s. */
static void probe(int nats, int pin, double *p50, double *p99, double *cps)
{
    struct bconn **parked = conns;
    int nparked = nconns, cap = capconns;
    conns = NULL, nconns = capconns = 0;
    char cmd[160];
    if (pin) {
        snprintf(cmd, sizeof cmd, "taskset -a -pc 0 %d >/dev/null 2>&1; taskset -pc 0 %d >/dev/null 2>&1", O.pid, (int)getpid());
        if (system(cmd) != 0) pin = 0;
    }
    g_nfuncs = 1;
    struct bconn *w = open_client(O.port, R_WORKER, nats);
    w->nfuncs = 1, w->first_func = 0;
    snprintf(w->fn_prefix, sizeof w->fn_prefix, "%s", fn_name);
    wait_ready(R_WORKER, 1, 30, "probe worker");
    caller_init(open_client(O.port, R_CALLER, nats), 1);
    wait_ready(R_CALLER, 1, 30, "probe caller");
    run_calls(500, 10, 0);
    g_nlat = 0;
    uint64_t t0 = now_ns();
    long done = run_calls(O.calls, 3, 1);
    uint64_t t1 = now_ns();
    qsort(g_lat, (size_t)g_nlat, sizeof *g_lat, cmp_u64);
    *p50 = pct_us(0.50), *p99 = pct_us(0.99), *cps = (double)done / ((double)(t1 - t0) / 1e9);
    conns_free();
    free(conns);
    conns = parked, nconns = nparked, capconns = cap;
    pfds = realloc(pfds, (size_t)(capconns + 1) * sizeof *pfds);
    if (!pfds) fail("out of memory");
    if (pin) {
        snprintf(cmd, sizeof cmd, "taskset -a -pc 0-%ld %d >/dev/null 2>&1; taskset -pc 0-%ld %d >/dev/null 2>&1",
                 sysconf(_SC_NPROCESSORS_ONLN) - 1, O.pid, sysconf(_SC_NPROCESSORS_ONLN) - 1, (int)getpid());
        if (system(cmd) != 0) fail("could not unpin");
    }
}

static int cmd_conns(void)
{
    peer = peer_of(O.peer);
    int nats = peer == P_NATS;
    if (peer != P_ENGINE && !nats) fail("conns: peer must be engine or nats");
    make_payload((size_t)O.size);
    g_caplat = O.calls;
    g_lat = malloc((size_t)g_caplat * sizeof *g_lat);
    if (!g_lat) fail("out of memory");
    double q50[2] = {-1, -1}, q99[2] = {-1, -1}, qcps[2] = {-1, -1};
    if (O.probe) probe(nats, O.probe > 1, &q50[0], &q99[0], &qcps[0]);
    struct buf mt = {0};
    double mem0 = -1, c0 = -1;
    if (!nats && http_get(O.port, "/metrics", &mt) == 0) {
        mem0 = metric((char *)buf_data(&mt), "iii_memory_bytes");
        c0 = metric((char *)buf_data(&mt), "iii_connections_active");
    }
    long rss0 = proc_status_kb(O.pid, "VmRSS");
    uint64_t cpu0 = proc_cpu_ns(O.pid);
    uint64_t t0 = now_ns(), dl = t0 + (uint64_t)(O.secs * 1e9);
    long opened = 0;
    while (count_ready(R_IDLE) < O.n) {
        int ready = count_ready(R_IDLE);
        while (opened < O.n && opened - ready < O.conc) {
            struct bconn *c = open_client(O.port, R_IDLE, nats);
            c->nfuncs = 1, c->first_func = (int)opened;
            snprintf(c->fn_prefix, sizeof c->fn_prefix, "bench::idle.");
            opened++;
        }
        if (now_ns() > dl) fail("conns: only %d of %ld registered within %.0f s", ready, O.n, O.secs);
        if (g_errors) fail("%s", last_error);
        loop_once(20);
    }
    uint64_t t1 = now_ns();
    uint64_t cpu1 = proc_cpu_ns(O.pid);
    /* let the engine settle (it may free scratch) and sample memory */
    for (int i = 0; i < 10; i++) loop_once(20);
    long rss1 = proc_status_kb(O.pid, "VmRSS");
    double mem1 = -1, fn1 = -1, c1 = -1;
    if (!nats && http_get(O.port, "/metrics", &mt) == 0) {
        mem1 = metric((char *)buf_data(&mt), "iii_memory_bytes");
        fn1 = metric((char *)buf_data(&mt), "iii_functions_registered");
        c1 = metric((char *)buf_data(&mt), "iii_connections_active");
    }
    if (O.probe) probe(nats, O.probe > 1, &q50[1], &q99[1], &qcps[1]);
    double reg_s = (double)(t1 - t0) / 1e9;
    /* everything disconnects at once: time until the engine reports its baseline again */
    double close_ms = -1;
    uint64_t tc = now_ns();
    conns_free();
    if (!nats && c0 >= 0) {
        uint64_t cdl = tc + 30000000000u;
        while (now_ns() < cdl) {
            if (http_get(O.port, "/metrics", &mt) == 0 && metric((char *)buf_data(&mt), "iii_connections_active") <= c0 + 1) {
                close_ms = (double)(now_ns() - tc) / 1e6;
                break;
            }
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
    }
    buf_free(&mt);
    printf("result peer=%s scen=%s n=%ld secs=%.3f reg_per_s=%.0f rss0_kb=%ld rss1_kb=%ld rss_per_conn_b=%.0f "
           "srv_cpu_us_conn=%.1f",
           O.peer, O.scen ? O.scen : "conns", O.n, reg_s, (double)O.n / reg_s, rss0, rss1, (double)(rss1 - rss0) * 1024.0 / (double)O.n,
           (double)(cpu1 - cpu0) / 1e3 / (double)O.n);
    if (mem0 >= 0 && mem1 >= 0)
        printf(" mem_per_conn_b=%.0f functions=%.0f conns_active=%.0f", (mem1 - mem0) / (double)O.n, fn1, c1);
    if (close_ms >= 0) printf(" close_all_ms=%.1f", close_ms);
    if (O.probe)
        printf(" probe_pinned=%d probe0_p50_us=%.1f probe0_p99_us=%.1f probe0_cps=%.0f probeN_p50_us=%.1f "
               "probeN_p99_us=%.1f probeN_cps=%.0f",
               O.probe > 1, q50[0], q99[0], qcps[0], q50[1], q99[1], qcps[1]);
    printf("\n");
    return 0;
}

/* ==== bench cleanup: a worker with F functions and N calls in flight disconnects ============ */

static int cmd_cleanup(void)
{
    peer = P_ENGINE;
    make_payload((size_t)O.size);
    g_nfuncs = O.functions;
    fn_name = "bench::cleanup.";
    int per = (int)((O.calls + O.callers - 1) / O.callers);
    for (int k = 0; k < O.callers; k++) caller_init(open_client(O.port, R_CALLER, 0), per);
    wait_ready(R_CALLER, O.callers, 20, "callers");
    double *ms = calloc((size_t)O.rounds, sizeof *ms);
    if (!ms) fail("out of memory");
    for (int r = 0; r < O.rounds; r++) {
        struct bconn *w = open_client(O.port, R_WORKER, 0);
        w->nfuncs = O.functions, w->first_func = 0, w->hold = 1;
        snprintf(w->fn_prefix, sizeof w->fn_prefix, "%s", fn_name);
        while (w->st != S_READY) {
            if (g_errors) fail("%s", last_error);
            loop_once(20);
        }
        g_held = g_stopped = 0;
        g_rr = 0;
        g_target = g_issued + O.calls;
        uint64_t dl = now_ns() + 30000000000u;
        while (g_held < O.calls) {
            if (now_ns() > dl) fail("cleanup: only %ld of %ld calls reached the worker", g_held, O.calls);
            if (g_bad || g_errors) fail("%s", last_error);
            loop_once(20);
        }
        /* the worker vanishes (TCP close, no WebSocket Close: a crash or a kill) */
        uint64_t t0 = now_ns();
        conn_kill(w);
        while (g_stopped < O.calls) {
            if (now_ns() > dl) fail("cleanup: only %ld of %ld callers got invocation_stopped", g_stopped, O.calls);
            if (g_bad || g_errors) fail("%s", last_error);
            loop_once(20);
        }
        ms[r] = (double)(now_ns() - t0) / 1e6;
        g_issued = g_done = g_target = 0;
    }
    qsort(ms, (size_t)O.rounds, sizeof *ms, cmp_dbl);
    double sum = 0;
    for (int r = 0; r < O.rounds; r++) sum += ms[r];
    printf("result peer=engine scen=%s functions=%d calls=%ld callers=%d rounds=%d stop_ms_p50=%.2f "
           "stop_ms_min=%.2f stop_ms_max=%.2f stop_ms_mean=%.2f\n",
           O.scen ? O.scen : "cleanup", O.functions, O.calls, O.callers, O.rounds, ms[O.rounds / 2], ms[0], ms[O.rounds - 1], sum / O.rounds);
    free(ms);
    conns_free();
    return 0;
}

/* ==== bench startup: exec -> listening line -> first successful call ======================== */

static int cmd_startup(void)
{
    peer = peer_of(O.peer);
    int nats = peer == P_NATS;
    make_payload((size_t)O.size);
    if (peer == P_DIRECT) fail("startup: no process to start for the direct hop");
    if (peer != P_FLOOR && (!O.argv || !O.argv[0])) fail("startup: give the command after --");
    double *lst = calloc((size_t)O.rounds, sizeof *lst), *fst = calloc((size_t)O.rounds, sizeof *fst),
           *ext = calloc((size_t)O.rounds, sizeof *ext);
    if (!lst || !fst || !ext) fail("out of memory");
    const char *ready = peer == P_NATS ? "Server is ready" : "listening on";
    const char *portline = peer == P_NATS ? "Listening for client connections on" : "listening on";
    for (int r = 0; r < O.rounds; r++) {
        int echo_port = 0;
        if (peer == P_FLOOR) {
            if (listen_fd < 0) listen_fd = tcp_listen(&listen_port);
            echo_port = listen_port;
        }
        char tp[16];
        snprintf(tp, sizeof tp, "%d", echo_port);
        char *rargv[] = {(char *)O.relay_exe, "0", tp, NULL};
        char **argv = peer == P_FLOOR ? rargv : O.argv;
        if (peer == P_FLOOR && !O.relay_exe) fail("--relay-exe is needed for the floor");
        int ofd, port;
        struct buf acc = {0};
        uint64_t t0 = now_ns();
        pid_t pid = spawn(argv, &ofd);
        if (wait_line(ofd, ready, portline, &port, 20, &acc) < 0)
            fail("startup: %s did not print its listening line: %s", argv[0], acc.p ? (char *)buf_data(&acc) : "");
        uint64_t t1 = now_ns();
        buf_free(&acc);
        struct bconn *d = conn_add(ofd, R_DRAIN);
        d->st = S_OPEN;
        /* first call: an echo worker registers (or the relay's upstream is our echo server),
         * a caller connects, one call goes through */
        g_nfuncs = 1;
        if (peer != P_FLOOR) {
            struct bconn *w = open_client(port, R_WORKER, nats);
            w->nfuncs = 1, w->first_func = 0;
            snprintf(w->fn_prefix, sizeof w->fn_prefix, "%s", fn_name);
        }
        struct bconn *c = open_client(port, R_CALLER, nats);
        caller_init(c, 1);
        uint64_t dl = now_ns() + 20000000000u;
        while (!(c->st == S_READY && (peer == P_FLOOR || count_ready(R_WORKER) == 1))) {
            if (now_ns() > dl) fail("startup: peers did not connect");
            if (g_errors) fail("%s", last_error);
            loop_once(5);
        }
        g_issued = g_done = 0;
        g_target = 1;
        while (g_done < 1) {
            if (now_ns() > dl) fail("startup: first call did not complete");
            if (g_bad || g_errors) fail("%s", last_error);
            loop_once(5);
        }
        uint64_t t2 = now_ns();
        lst[r] = (double)(t1 - t0) / 1e6, fst[r] = (double)(t2 - t0) / 1e6;
        /* the clients leave first, then SIGTERM: the exit time is that of an idle server (the
         * output pipe stays open until it has exited, so it never writes into a closed pipe) */
        for (int i = 0; i < nconns; i++)
            if (conns[i]->role != R_DRAIN) conn_kill(conns[i]);
        int rc = stop_child(pid, &ext[r]);
        conns_free();
        if (rc != 0 && !(nats && rc == 1)) fail("startup: %s exited %d after SIGTERM", argv[0], rc);
    }
    qsort(lst, (size_t)O.rounds, sizeof *lst, cmp_dbl);
    qsort(fst, (size_t)O.rounds, sizeof *fst, cmp_dbl);
    qsort(ext, (size_t)O.rounds, sizeof *ext, cmp_dbl);
    printf("result peer=%s scen=%s rounds=%d listen_ms_p50=%.2f listen_ms_min=%.2f first_call_ms_p50=%.2f "
           "first_call_ms_min=%.2f sigterm_exit_ms_p50=%.2f\n",
           O.peer, O.scen ? O.scen : "startup", O.rounds, lst[O.rounds / 2], lst[0], fst[O.rounds / 2], fst[0], ext[O.rounds / 2]);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    {
        /* every generator its own ids: without rnd_init the engine's rnd_bytes is a fixed
         * stream, and two generators calling through one engine would send the same
         * invocation_ids (the second one is refused as already in flight) */
        unsigned char seed[8];
        (void)rnd_init();
        rnd_bytes(seed, 8);
        memcpy(&rng_s, seed, 8);
        rng_s |= 1;
    }
    jd.max = 1u << 20;
    if (argc < 2) {
        fprintf(stderr, "usage: bench run|conns|cleanup|startup [options] (see the comment at the top of bench/bench.c)\n");
        return 2;
    }
    parse_opts(argc, argv);
    if (O.calls < 1 || O.callers < 1 || O.workers < 1 || O.depth < 1 || O.rounds < 1 || O.n < 1 || O.conc < 1)
        fail("counts must be positive");
    if (!strcmp(argv[1], "run")) return cmd_run();
    if (!strcmp(argv[1], "conns")) return cmd_conns();
    if (!strcmp(argv[1], "cleanup")) return cmd_cleanup();
    if (!strcmp(argv[1], "startup")) return cmd_startup();
    fail("unknown command '%s'", argv[1]);
}
