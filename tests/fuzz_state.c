/* fuzz_state.c - stateful protocol fuzzer: a sequence of operations over a pool of in-process
 * worker connections, with registry invariants and a routing oracle checked after every step.
 *
 * Build and run (tests/run_fuzz_state.sh does this):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Wno-unused-function tests/fuzz_state.c \
 *         -o build/fuzz_state
 *   mkdir -p build/fuzz_state_corpus
 *   build/fuzz_state -max_total_time=15 build/fuzz_state_corpus tests/fuzz_state_corpus  # short
 *   build/fuzz_state -max_total_time=600 build/fuzz_state_corpus tests/fuzz_state_corpus # --long
 *   build/fuzz_state crash-<sha>          # replay one input; FZ_TRACE=1 prints every step
 * Without libFuzzer:
 *   cc -std=c99 -g -O1 -fsanitize=address,undefined -Wno-unused-function -DFUZZ_STANDALONE \
 *      tests/fuzz_state.c -o build/fuzz_state_sa
 *   build/fuzz_state_sa FILE...            # replay
 *   build/fuzz_state_sa                    # seeded mutation loop for III_FUZZ_SECS (default 10)
 *   build/fuzz_state_sa --write-seeds DIR  # (re)writes the committed seed corpus
 * FZ_IGNORE=name,name... turns named checks off (to look past a known bug), e.g.
 *   FZ_IGNORE=lease-name,lease-owner. Names: see the FZ_CHECK calls in fz_check_invariants.
 *
 * Input format: a byte stream of operations (see "Operations" below): open a connection
 * (directly, or through a real HTTP upgrade), send a frame built from a template with
 * fuzz-chosen fields (as text or binary, whole or fragmented), send a raw fuzz frame or raw
 * WebSocket bytes, answer a call the slot received, drop/close a connection, advance the
 * virtual clock (timers: grace period, ack timeouts, idle, close flush), run the reap pass.
 * Determinism: the monotonic and wall clocks are virtual (clock_gettime is redirected), and
 * random ids come from the engine's SipHash fallback stream from a fixed counter (open() of
 * /dev/urandom is redirected to fail). No sockets: every connection has fd -1.
 * After the last step every connection is dropped and reaped, the whole registry freed, and
 * the engine's live-byte count must be back at its baseline.
 */
#ifndef FZ_STATE_C
#define FZ_STATE_C
#define _POSIX_C_SOURCE   200809L
#define _FILE_OFFSET_BITS 64
#define _TIME_BITS        64
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
#include <sys/utsname.h>
#include <sys/wait.h>
#if defined(__linux__)
#include <sys/epoll.h>
#endif

/* virtual clocks and deterministic randomness for the engine */
static int64_t fz_now = 1000000;
static int fz_clock_gettime(clockid_t id, struct timespec *ts)
{
    int64_t ms = fz_now + (id == CLOCK_REALTIME ? INT64_C(1700000000000) : 0);
    ts->tv_sec = (time_t)(ms / 1000);
    ts->tv_nsec = (long)(ms % 1000) * 1000000L;
    return 0;
}
static int fz_open(const char *path, int flags, ...)
{
    (void)path, (void)flags;
    errno = ENOENT;
    return -1; /* /dev/urandom: the engine falls back to its seeded xorshift */
}
#define clock_gettime fz_clock_gettime
#define open          fz_open
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"
#undef open
#undef clock_gettime

/* ==== Invariants ============================================================================
 * Everything the registry must satisfy between two operations. Keep all structural knowledge of
 * the engine's registry here, so this is the one function to update when its structs change.
 */
static const char *fz_ignore; /* FZ_IGNORE: comma-separated check names that are skipped */
static int fz_trace;          /* FZ_TRACE: print each step */
static const char *fz_step = "";

static int fz_ignored(const char *name)
{
    if (!fz_ignore) return 0;
    size_t n = strlen(name);
    for (const char *p = fz_ignore; (p = strstr(p, name)); p += n)
        if ((p == fz_ignore || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
    return 0;
}

static void fz_failf(const char *name, const char *fmt, ...) III_PRINTF(2, 3);
static void fz_failf(const char *name, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "fz: invariant '%s' violated after step %s: ", name, fz_step);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}
#define FZ_CHECK(name, cond, ...)                                                                  \
    do {                                                                                           \
        if (!(cond) && !fz_ignored(name)) fz_failf(name, __VA_ARGS__);                             \
    } while (0)

/* 1 if c is a connection in S.conns (pointer compare only: c may be freed memory). */
static int fz_in_conns(const struct conn *c)
{
    for (const struct conn *x = S.conns; x; x = x->next)
        if (x == c) return 1;
    return 0;
}

/* an owner/provider/caller pointer: NULL allowed when may_null; else in S.conns and not torn */
static void fz_check_ref(const char *what, const struct conn *c, int may_null, const char *obj)
{
    if (!c) {
        FZ_CHECK("null-ref", may_null, "%s of %s is NULL", what, obj);
        return;
    }
    FZ_CHECK("dangling", fz_in_conns(c), "%s of %s points at a connection not in S.conns (freed)",
             what, obj);
    if (!fz_in_conns(c)) return;
    FZ_CHECK("torn-ref", !c->torn, "%s of %s is a torn-down connection %s", what, obj, c->wid);
}

/* a registry string: valid UTF-8; ids also free of control characters ("ctl") */
static void fz_check_str(const char *what, const char *s, size_t n, int is_id)
{
    if (!s) return;
    FZ_CHECK("utf8", utf8_valid((const unsigned char *)s, n), "%s is not valid UTF-8: '%.*s'",
             what, (int)n, s);
    if (is_id)
        for (size_t i = 0; i < n; i++)
            FZ_CHECK("ctl", (unsigned char)s[i] >= 0x20 && s[i] != 0x7f,
                     "%s contains control character 0x%02x", what, (unsigned char)s[i]);
}

/* a "ns\0id" key: both halves C strings that exactly fill klen (no NUL inside either) */
static void fz_check_key(const char *what, const char *key, size_t klen, const char *ns,
                         const char *id)
{
    size_t nl = strlen(key);
    FZ_CHECK("key", ns == key && id == key + nl + 1, "%s: ns/id do not point into key", what);
    FZ_CHECK("nul", nl + 1 + strlen(key + nl + 1) == klen,
             "%s '%s'/'%s': key of %zu bytes holds a NUL inside the id", what, key, key + nl + 1,
             klen);
    fz_check_str(what, key, nl, 1);
    fz_check_str(what, key + nl + 1, strlen(key + nl + 1), 1);
}

static size_t fz_u8_chars(const char *s)
{
    size_t k = 0;
    for (; *s; s++) k += ((unsigned char)*s & 0xC0) != 0x80;
    return k;
}

static void fz_check_invariants(void)
{
    /* connections: a consistent doubly linked list of S.nconns entries */
    size_t nc = 0;
    for (struct conn *c = S.conns; c; c = c->next) {
        FZ_CHECK("conns", c->prev ? c->prev->next == c : S.conns == c, "S.conns prev link broken");
        FZ_CHECK("conns", ++nc <= 100000, "S.conns has a cycle");
    }
    FZ_CHECK("conns", nc == S.nconns, "S.nconns %zu but %zu on the list", S.nconns, nc);
    for (struct conn *c = S.reap; c; c = c->rnext)
        FZ_CHECK("reap", fz_in_conns(c) && c->reapq, "S.reap holds a freed or unflagged conn");
    for (struct conn *c = S.dirty; c; c = c->dnext)
        FZ_CHECK("dirty", fz_in_conns(c), "S.dirty holds a freed connection");
    for (struct conn *c = S.drain; c; c = c->drnext)
        FZ_CHECK("drain", fz_in_conns(c) && c->draining, "S.drain holds a freed or unflagged conn");

    /* worker map */
    for (size_t i = 0; i < S.workers.nb; i++)
        for (struct hnode *e = S.workers.b[i]; e; e = e->next) {
            struct conn *c = (struct conn *)e;
            fz_check_ref("S.workers entry", c, 0, "worker map");
            if (fz_in_conns(c))
                FZ_CHECK("workers", c->kind == CK_WORKER && e->klen == 36 && !memcmp(e->key, c->wid, 36),
                         "S.workers entry does not match its connection");
        }

    /* per connection: own lists, counters, metadata, namespace state */
    for (struct conn *c = S.conns; c; c = c->next) {
        size_t out = 0, in = 0;
        for (struct inv *v = c->calls_out; v; v = v->cnext) {
            FZ_CHECK("inv-list", v->caller == c, "calls_out of %s holds a call of another caller",
                     c->wid);
            FZ_CHECK("inv-list", v->cnext == NULL || v->cnext->cprev == v, "calls_out links");
            FZ_CHECK("inv-list", inv_find(v->id) == v,
                     "calls_out of %s holds %s, not in S.invs", c->wid, v->id);
            FZ_CHECK("inv-list", ++out < 1000000, "calls_out cycle");
        }
        for (struct inv *v = c->calls_in; v; v = v->tnext) {
            FZ_CHECK("inv-list", v->target == c, "calls_in of %s holds a call for another target",
                     c->wid);
            FZ_CHECK("inv-list", v->tnext == NULL || v->tnext->tprev == v, "calls_in links");
            FZ_CHECK("inv-list", inv_find(v->id) == v,
                     "calls_in of %s holds %s, not in S.invs", c->wid, v->id);
            FZ_CHECK("inv-list", ++in < 1000000, "calls_in cycle");
        }
        FZ_CHECK("n_calls", c->n_in == in && c->n_out == out,
                 "%s: n_in/n_out %zu/%zu but %zu in + %zu out lists", c->wid, c->n_in, c->n_out,
                 in, out);
        size_t ntr = 0;
        for (struct trig *t = c->trigs; t; t = t->acct_next) {
            FZ_CHECK("trig-acct", t->acct == c && (!t->acct_next || t->acct_next->acct_prev == t),
                     "acct list of %s broken", c->wid);
            FZ_CHECK("trig-acct", hm_get(&S.trigs, t->id, strlen(t->id)) == &t->h,
                     "acct list of %s holds an unmapped binding", c->wid);
            FZ_CHECK("trig-acct", ++ntr < 1000000, "acct list cycle");
        }
        FZ_CHECK("trig-acct", ntr == c->n_trigs, "%s: n_trigs %zu but %zu listed", c->wid,
                 c->n_trigs, ntr);
        for (struct ttype *tt = c->ttypes; tt; tt = tt->pnext)
            FZ_CHECK("tt-prov", tt->provider == c, "ttypes list of %s holds another's type", c->wid);
        if (c->lease)
            FZ_CHECK("lease-owner", c->lease->owner == c, "%s points at a lease it does not own",
                     c->wid);
        size_t nf = 0;
        for (struct func *f = c->funcs; f; f = f->cnext) {
            FZ_CHECK("func-list", f->owner == c && hm_get(&S.funcs, f->key, f->klen) == &f->h,
                     "funcs list of %s holds a function it does not own or an unmapped one", c->wid);
            FZ_CHECK("func-list", ++nf < 1000000, "funcs list cycle");
        }
        if (c->torn)
            FZ_CHECK("torn-owns", !c->funcs && !c->calls_in && !c->calls_out && !c->n_in && !c->n_out &&
                                      !c->trigs && !c->ttypes && !c->lease && !c->draining &&
                                      hm_get(&S.workers, c->wid, 36) != &c->h,
                     "torn connection %s still owns functions/calls or is mapped", c->wid);
        if (c->kind == CK_WORKER && !c->torn && !c->dead && c->ws)
            FZ_CHECK("workers", hm_get(&S.workers, c->wid, 36) == &c->h,
                     "live worker %s missing from S.workers", c->wid);
        if (c->kind != CK_WORKER) continue;
        fz_check_str("worker name", c->name, c->name ? strlen(c->name) : 0, 1);
        fz_check_str("worker description", c->desc, c->desc ? strlen(c->desc) : 0, 1);
        if (c->name) FZ_CHECK("name-len", fz_u8_chars(c->name) <= III_MAX_NAME, "name too long");
        if (c->desc) FZ_CHECK("name-len", fz_u8_chars(c->desc) <= III_MAX_NAME, "desc too long");
        fz_check_str("worker runtime", c->runtime, c->runtime ? strlen(c->runtime) : 0, 0);
        fz_check_str("worker version", c->version, c->version ? strlen(c->version) : 0, 0);
        fz_check_str("worker os", c->os, c->os ? strlen(c->os) : 0, 0);
        fz_check_str("worker isolation", c->isolation, c->isolation ? strlen(c->isolation) : 0, 0);
        fz_check_str("worker telemetry", c->telemetry, c->telemetry ? strlen(c->telemetry) : 0, 0);
        fz_check_str("worker namespace", c->ns, c->ns ? strlen(c->ns) : 0, 1);
        if (c->ns_state == NS_RESOLVED) {
            FZ_CHECK("ns", c->ns && !str_blank(c->ns, strlen(c->ns)),
                     "%s resolved to a NULL or blank namespace", c->wid);
            FZ_CHECK("pendq", !buf_used(&c->pendq) || c->draining || !conn_open(c),
                     "%s is resolved, holds %zu queued bytes and is not draining", c->wid,
                     buf_used(&c->pendq));
        }
        /* a connection that claims a lease holds exactly that one (ns, name) */
        if (c->lease && c->name && c->ns && conn_live(c)) {
            struct lease *l = (struct lease *)reg_find(&S.leases, c->ns, strlen(c->ns), c->name,
                                                       strlen(c->name));
            FZ_CHECK("lease-missing", l == c->lease,
                     "%s holds a lease but not the one for name '%s' ns '%s'", c->wid, c->name,
                     c->ns);
        }
    }

    /* functions */
    uint64_t fp = 0;
    size_t nfun = 0;
    for (size_t i = 0; i < S.funcs.nb; i++)
        for (struct hnode *e = S.funcs.b[i]; e; e = e->next) {
            struct func *f = (struct func *)e;
            nfun++;
            fz_check_key("function", f->key, f->klen, f->ns, f->id);
            fp += reg_fp_hash(f->key, f->klen);
            FZ_CHECK("func-bi", f->owner || f->bi, "ownerless function %s without a builtin", f->id);
            /* its id group is mapped under its id and keyed by the group head's copy of it */
            size_t il = f->klen - (size_t)(f->id - f->key);
            FZ_CHECK("func-ig",
                     f->ig && f->ig->n && f->ig->head && hm_get(&S.fids, f->id, il) == &f->ig->h &&
                         f->ig->h.key == f->ig->head->id,
                     "function %s: id group not mapped under its id, or not keyed by its head's id",
                     f->id);
            fz_check_ref("owner", f->owner, 1, f->id);
            if (f->owner && fz_in_conns(f->owner)) {
                struct func *x = f->owner->funcs;
                while (x && x != f) x = x->cnext;
                FZ_CHECK("func-list", x == f, "function %s is not on its owner's list", f->id);
            }
            fz_check_str("function description", f->desc_raw, f->desc_raw ? strlen(f->desc_raw) : 0, 0);
            fz_check_str("function metadata", f->meta_raw, f->meta_raw ? strlen(f->meta_raw) : 0, 0);
        }
    FZ_CHECK("funcs-count", nfun == S.funcs.n && nfun == S.fn_n && fp == S.fn_fp,
             "function map/fingerprint out of step (%zu in map, n %zu, fn_n %zu)", nfun, S.funcs.n,
             S.fn_n);

    /* trigger types */
    for (size_t i = 0; i < S.ttypes.nb; i++)
        for (struct hnode *e = S.ttypes.b[i]; e; e = e->next) {
            struct ttype *tt = (struct ttype *)e;
            fz_check_key("trigger type", tt->key, tt->klen, tt->ns, tt->id);
            fz_check_ref("provider", tt->provider, 1, tt->id);
            fz_check_str("trigger type description", tt->desc_raw,
                         tt->desc_raw ? strlen(tt->desc_raw) : 0, 0);
        }

    /* bindings */
    for (size_t i = 0; i < S.trigs.nb; i++)
        for (struct hnode *e = S.trigs.b[i]; e; e = e->next) {
            struct trig *t = (struct trig *)e;
            FZ_CHECK("nul", strlen(t->id) == e->klen, "binding id '%s' holds a NUL", t->id);
            fz_check_str("binding id", t->id, strlen(t->id), 1);
            fz_check_str("binding trigger_type", t->type, strlen(t->type), 1);
            fz_check_str("binding function_id", t->fid, strlen(t->fid), 1);
            fz_check_str("binding namespace", t->ns, strlen(t->ns), 1);
            fz_check_str("binding home namespace", t->home_ns, strlen(t->home_ns), 1);
            fz_check_str("binding trigger_namespace", t->trigger_ns,
                         t->trigger_ns ? strlen(t->trigger_ns) : 0, 1);
            fz_check_str("binding config", t->config_raw, strlen(t->config_raw), 0);
            fz_check_str("binding metadata", t->meta_raw, t->meta_raw ? strlen(t->meta_raw) : 0, 0);
            fz_check_ref("owner", t->owner, 1, t->id);
            FZ_CHECK("trig-group", t->tg && !strcmp(t->tg->key, t->type) &&
                                       tg_find(&S.tgroups, t->type, strlen(t->type)) == t->tg,
                     "binding %s is not in the group of its type", t->id);
            FZ_CHECK("trig-group", t->fg && t->fg->n && t->tg->n, "binding %s group count", t->id);
            if (t->owner) FZ_CHECK("trig-acct", t->acct == t->owner, "live binding %s counted "
                                   "against another connection", t->id);
            if (t->live)
                FZ_CHECK("trig-live", t->provider_ns && trig_provider(t),
                         "binding %s is live but its provider type (%s in %s) is gone", t->id,
                         t->type, t->provider_ns ? t->provider_ns : "(null)");
        }

    /* name leases */
    for (size_t i = 0; i < S.leases.nb; i++)
        for (struct hnode *e = S.leases.b[i]; e; e = e->next) {
            struct lease *l = (struct lease *)e;
            const char *ns = l->key, *name = l->key + strlen(l->key) + 1;
            FZ_CHECK("lease-key", e->key == l->key && strlen(ns) + 1 + strlen(name) == e->klen,
                     "lease key malformed");
            fz_check_str("lease name", name, strlen(name), 1);
            fz_check_ref("lease owner", l->owner, 0, name);
            FZ_CHECK("lease-owner", fz_in_conns(l->owner),
                     "lease (%s, %s) owned by a freed connection", ns, name);
            if (!fz_in_conns(l->owner)) continue;
            FZ_CHECK("lease-owner", l->owner->lease == l, "lease (%s, %s) not held by its owner",
                     ns, name);
            /* an owner on its way out (closing, dead) keeps the lease until teardown frees it
             * through c->lease; its name and namespace may be half-set (an OOM mid-announce) */
            if (!conn_live(l->owner)) continue;
            /* the owner still goes by that name in that namespace (else the lease is stale and
             * teardown, which looks the lease up by the current name, will not release it) */
            FZ_CHECK("lease-name",
                     l->owner->lease == l && l->owner->name && !strcmp(l->owner->name, name) &&
                         l->owner->ns && !strcmp(l->owner->ns, ns),
                     "lease (%s, %s) owned by %s which is now named '%s' in '%s' (leased=%d)", ns,
                     name, l->owner->wid, l->owner->name ? l->owner->name : "(null)",
                     l->owner->ns ? l->owner->ns : "(null)", l->owner->lease == l);
        }

    /* calls in flight */
    size_t ninv = 0, nack = 0;
    for (size_t i = 0; i < S.invs.nb; i++)
        for (struct hnode *e = S.invs.b[i]; e; e = e->next) {
            struct inv *v = (struct inv *)e;
            ninv++;
            nack += v->kind == INV_ACK;
            FZ_CHECK("inv-key", e->key == v->key && e->klen == 36 && strlen(v->id) == 36,
                     "call record keyed wrong");
            fz_check_ref("target", v->target, 0, v->id);
            fz_check_ref("caller", v->caller, !(v->kind == INV_CALL || v->kind == INV_ACK), v->id);
            if (v->caller && fz_in_conns(v->caller)) {
                struct inv *x = v->caller->calls_out;
                while (x && x != v) x = x->cnext;
                FZ_CHECK("inv-list", x == v, "call %s not on its caller's list", v->id);
            }
            if (v->target && fz_in_conns(v->target)) {
                struct inv *x = v->target->calls_in;
                while (x && x != v) x = x->tnext;
                FZ_CHECK("inv-list", x == v, "call %s not on its target's list", v->id);
            }
        }
    /* the deadline heap: every entry is a mapped call whose hidx points back, heap-ordered */
    for (size_t i = 0; i < S.ntimed; i++) {
        struct inv *v = S.timed[i];
        FZ_CHECK("timed", v->hidx == i + 1 && inv_find(v->id) == v,
                 "deadline heap slot %zu does not hold a mapped call that points back", i);
        FZ_CHECK("timed", !i || S.timed[(i - 1) / 2]->deadline <= v->deadline,
                 "deadline heap out of order at %zu", i);
    }
    FZ_CHECK("inv-count", ninv == S.invs.n && nack == S.n_acks,
             "S.invs count %zu/%zu, acks %zu/%zu", ninv, S.invs.n, nack, S.n_acks);

    /* channels */
    for (size_t i = 0; i < S.chans.nb; i++)
        for (struct hnode *e = S.chans.b[i]; e; e = e->next) {
            struct chan *ch = (struct chan *)e;
            if (ch->w) FZ_CHECK("chan", fz_in_conns(ch->w), "channel writer freed");
            if (ch->r) FZ_CHECK("chan", fz_in_conns(ch->r), "channel reader freed");
        }
}

/* ==== Harness state and the routing model ===================================================
 * No allocation through the engine's allocator here (the allocation sweep shares this code).
 */
#define FZ_SLOTS 8
#define FZ_OUT   48
struct fz_call {
    char id[37];
    int any;                /* context not checked (raw frames) */
    char tp[96], bg[96];    /* raw JSON of the traceparent / baggage the reply must echo, "" = none */
};
struct fz_slot {
    struct conn *c;
    int loose;                   /* raw WebSocket bytes were sent: its results are not checked */
    int http;                    /* opened through HTTP: a 101 head precedes its frames */
    int escids;                  /* registered an id with an escape: the target check is skipped */
    struct fz_call out[FZ_OUT];  /* calls made whose reply may still come */
    int nout;
    char in_ids[16][37];         /* invocation ids delivered to it (ring) */
    int nin;
    char prov[8][72];            /* binding ids it was asked to serve (ring, raw JSON) */
    int nprov;
    char fids[32][72];           /* function ids it registered (raw JSON, no escapes) */
    int nfids;
    char wid[37], token[37];
    int closed;                  /* the engine sent it a Close frame */
};
static struct fz_slot fz_s[FZ_SLOTS];
static char fz_dur[8][37]; /* ids returned by engine::register_trigger */
static int fz_ndur;
static unsigned fz_uuid_ctr;
static size_t fz_mem_base;

static struct jtok fz_tok[4096];

static void fz_slot_clear(int i)
{
    memset(&fz_s[i], 0, sizeof fz_s[i]);
}

static int fz_slot_of(const struct conn *c)
{
    for (int i = 0; i < FZ_SLOTS; i++)
        if (fz_s[i].c == c) return i;
    return -1;
}

/* Copies raw token ti of d (a JSON value) into out as a C string, "" when absent. */
static void fz_raw(const struct jdoc *d, int ti, char *out, size_t cap)
{
    out[0] = 0;
    if (ti < 0) return;
    size_t n = JLEN(d, ti);
    if (n >= cap) n = cap - 1;
    memcpy(out, JRAW(d, ti), n);
    out[n] = 0;
}

/* One text frame the engine sent to slot i: parse it and check the routing oracle. */
static void fz_on_engine_msg(int i, const unsigned char *p, size_t n)
{
    struct fz_slot *s = &fz_s[i];
    struct jdoc d;
    memset(&d, 0, sizeof d);
    d.t = fz_tok, d.cap = d.max = 4096;
    FZ_CHECK("out-json", json_parse(&d, p, n, 3, 1) == 0 && d.t[0].type == J_OBJECT,
             "engine sent slot %d a text frame that is not a valid UTF-8 JSON object: %.*s", i,
             (int)(n > 300 ? 300 : n), p);
    if (d.nt == 0 || d.t[0].type != J_OBJECT) return;
    int ty = json_get(&d, 0, "type");
    if (json_streq(&d, ty, "invocationresult")) {
        int iid = json_get(&d, 0, "invocation_id");
        FZ_CHECK("route", JTYPE(&d, iid) == J_STRING && JLEN(&d, iid) == 38,
                 "invocationresult without a 36-char invocation_id");
        if (JTYPE(&d, iid) != J_STRING || JLEN(&d, iid) != 38) return;
        const char *id = (const char *)JRAW(&d, iid) + 1;
        /* a register_trigger result names the durable binding: remember it for unregister */
        int res = json_get(&d, 0, "result");
        if (JTYPE(&d, res) == J_OBJECT && fz_ndur < 8) {
            int rid = json_get(&d, res, "id");
            if (JTYPE(&d, rid) == J_STRING && JLEN(&d, rid) == 38)
                memcpy(fz_dur[fz_ndur++ % 8], JRAW(&d, rid) + 1, 36);
        }
        if (s->loose) return;
        char tp[96], bg[96];
        fz_raw(&d, json_get(&d, 0, "traceparent"), tp, sizeof tp);
        fz_raw(&d, json_get(&d, 0, "baggage"), bg, sizeof bg);
        int k, idmatch = -1;
        for (k = 0; k < s->nout; k++) {
            if (memcmp(s->out[k].id, id, 36)) continue;
            idmatch = k;
            if (s->out[k].any || (!strcmp(s->out[k].tp, tp) && !strcmp(s->out[k].bg, bg))) break;
        }
        FZ_CHECK("route", idmatch >= 0,
                 "slot %d (%s) got an invocationresult for %.36s, a call it did not make or that "
                 "was already answered",
                 i, s->c ? s->c->wid : "?", id);
        FZ_CHECK("reply-ctx", k < s->nout,
                 "slot %d got the reply to %.36s with traceparent=%s baggage=%s; it sent "
                 "traceparent=%s baggage=%s",
                 i, id, tp[0] ? tp : "(none)", bg[0] ? bg : "(none)",
                 idmatch >= 0 && s->out[idmatch].tp[0] ? s->out[idmatch].tp : "(none)",
                 idmatch >= 0 && s->out[idmatch].bg[0] ? s->out[idmatch].bg : "(none)");
        if (k >= s->nout) k = idmatch;
        if (k >= 0) s->out[k] = s->out[--s->nout];
    } else if (json_streq(&d, ty, "invokefunction")) {
        int iid = json_get(&d, 0, "invocation_id"), fid = json_get(&d, 0, "function_id");
        FZ_CHECK("route", JTYPE(&d, iid) == J_STRING && JLEN(&d, iid) == 38 &&
                              JTYPE(&d, fid) == J_STRING,
                 "invokefunction to slot %d without an id or function_id", i);
        if (JTYPE(&d, iid) == J_STRING && JLEN(&d, iid) == 38) {
            memcpy(s->in_ids[s->nin % 16], JRAW(&d, iid) + 1, 36);
            s->in_ids[s->nin % 16][36] = 0;
            s->nin++;
        }
        /* the target must be a slot that registered that function id at some point */
        if (!s->loose && !s->escids && JTYPE(&d, fid) == J_STRING && !d.t[fid].esc &&
            !json_streq(&d, fid, "engine::queue::enqueue")) {
            int ok = 0;
            for (int k = 0; k < s->nfids && k < 32 && !ok; k++)
                ok = strlen(s->fids[k]) == JLEN(&d, fid) && !memcmp(s->fids[k], JRAW(&d, fid), JLEN(&d, fid));
            FZ_CHECK("route-target", ok, "slot %d got invokefunction for %.*s, which it never registered",
                     i, (int)JLEN(&d, fid), JRAW(&d, fid));
        }
    } else if (json_streq(&d, ty, "registertrigger")) {
        fz_raw(&d, json_get(&d, 0, "id"), s->prov[s->nprov++ % 8], sizeof s->prov[0]);
    } else if (json_streq(&d, ty, "workerregistered")) {
        int w = json_get(&d, 0, "worker_id"), t = json_get(&d, 0, "reattach_token");
        if (JTYPE(&d, w) == J_STRING && JLEN(&d, w) == 38) memcpy(s->wid, JRAW(&d, w) + 1, 36);
        if (JTYPE(&d, t) == J_STRING && JLEN(&d, t) == 38) memcpy(s->token, JRAW(&d, t) + 1, 36);
    }
}

/* Consumes every frame the engine queued to every connection (server frames: unmasked). */
static void fz_drain_out(void)
{
    for (struct conn *c = S.conns; c; c = c->next) {
        int i = fz_slot_of(c);
        unsigned char *p = buf_data(&c->out);
        size_t n = buf_used(&c->out), at = 0;
        /* a dead connection is never written: what it holds (maybe a frame cut short by an
         * allocation failure) never reaches the peer */
        if (c->kind == CK_HTTP || c->kind == CK_PLAIN || c->dead) {
            buf_consume(&c->out, n);
            continue;
        }
        if (i >= 0 && fz_s[i].http && n >= 5 && !memcmp(p, "HTTP/", 5)) {
            unsigned char *e = NULL;
            for (size_t k = 0; k + 4 <= n; k++)
                if (!memcmp(p + k, "\r\n\r\n", 4)) {
                    e = p + k + 4;
                    break;
                }
            FZ_CHECK("out-frame", e != NULL, "partial HTTP head queued");
            if (!e) continue;
            at = (size_t)(e - p);
            fz_s[i].http = 0;
        }
        while (at < n) {
            FZ_CHECK("out-frame", n - at >= 2, "truncated frame header in c->out");
            if (n - at < 2) break;
            int op = p[at] & 15, fin = p[at] >> 7;
            size_t len = p[at + 1] & 127, hl = 2;
            FZ_CHECK("out-frame", !(p[at + 1] & 0x80) && fin && !(p[at] & 0x70),
                     "server frame masked, fragmented or with RSV bits");
            if (len == 126) len = (size_t)p[at + 2] << 8 | p[at + 3], hl = 4;
            else if (len == 127) {
                len = 0;
                for (int k = 0; k < 8; k++) len = len << 8 | p[at + 2 + k];
                hl = 10;
            }
            FZ_CHECK("out-frame", n - at >= hl && n - at - hl >= len, "truncated frame in c->out");
            if (n - at < hl || n - at - hl < len) break;
            if (i >= 0 && op == WS_TEXT && c->kind == CK_WORKER) fz_on_engine_msg(i, p + at + hl, len);
            if (i >= 0 && op == WS_CLOSE) fz_s[i].closed = 1;
            at += hl + len;
        }
        buf_consume(&c->out, n);
    }
    S.dirty = NULL;
    for (struct conn *c = S.conns; c; c = c->next) c->dirty = 0, c->dnext = NULL;
}

/* ==== Input decoding ========================================================================= */
static const uint8_t *fz_in;
static size_t fz_n, fz_pos;
static unsigned fz_u8(void) { return fz_pos < fz_n ? fz_in[fz_pos++] : 0; }

/* the frame being built */
static char fz_msg[1 << 16];
static size_t fz_len;
static void fz_put(const char *s)
{
    size_t n = strlen(s);
    if (fz_len + n < sizeof fz_msg) memcpy(fz_msg + fz_len, s, n), fz_len += n;
}
static void fz_putn(const void *s, size_t n)
{
    if (fz_len + n < sizeof fz_msg) memcpy(fz_msg + fz_len, s, n), fz_len += n;
}
static void fz_putf(const char *fmt, ...) III_PRINTF(1, 2);
static void fz_putf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(fz_msg + fz_len, sizeof fz_msg - fz_len, fmt, ap);
    va_end(ap);
    if (n > 0 && fz_len + (size_t)n < sizeof fz_msg) fz_len += (size_t)n;
}

/* A JSON string with fuzz-chosen content: raw bytes (possibly invalid UTF-8), control and
 * quote bytes escaped, bytes 1..7 select tricky escapes (lone surrogates, NUL, pairs). */
static void fz_put_fstr(void)
{
    static const char *const esc[] = {"", "\\ud800", "\\udc00", "\\u0000", "\\n",
                                      "\\ud83d\\ude00", "\\u00e9", "\\\""};
    unsigned len = fz_u8() % 24;
    fz_put("\"");
    for (unsigned k = 0; k < len; k++) {
        unsigned b = fz_u8();
        char e[8];
        if (b >= 1 && b <= 7) fz_put(esc[b]);
        else if (b < 0x20 || b == '"' || b == '\\') snprintf(e, sizeof e, "\\u%04x", b), fz_put(e);
        else fz_putn(&(char){(char)b}, 1);
    }
    fz_put("\"");
}

static const char *const FZ_FIDS[] = {
    "\"math::add\"", "\"math::mul\"", "\"svc::echo\"", "\"a\"", "\"engine::queue::enqueue\"",
    "\"engine::functions::list\"", "\"engine::workers::register\"", "\"x::\\u00e9\"",
    "\"math::add\"", "\"\\u0041::b\"", "\"engine::mine\"", "\"\xc3\xa9::\xf0\x9f\x98\x80\""};
#define FZ_NFIDS (sizeof FZ_FIDS / sizeof FZ_FIDS[0])
static const char *const FZ_NSS[] = {NULL, "\"default\"", "\"ns1\"", "\"ns2\"", "\"  \"", "\"\"", "null"};
#define FZ_NNSS (sizeof FZ_NSS / sizeof FZ_NSS[0])
static const char *const FZ_NAMES[] = {NULL, "\"w1\"", "\"w2\"", "\"w1\"", "\"\"", "\" \\n \"",
                                       "null", "\"q\\u202eevil\""};
#define FZ_NNAMES (sizeof FZ_NAMES / sizeof FZ_NAMES[0])
static const char *const FZ_TTS[] = {"\"engine::functions-available\"",
                                     "\"engine::workers-available\"", "\"cron\"", "\"http\"",
                                     "\"queue\""};
#define FZ_NTTS (sizeof FZ_TTS / sizeof FZ_TTS[0])
static const char *const FZ_TIDS[] = {"\"t1\"", "\"t2\"", "\"t3\"", "\"t\\u0031\""};
static const char *const FZ_TPS[] = {
    NULL, "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"",
    "\"00-11111111111111111111111111111111-2222222222222222-01\"", "\"x\""};
static const char *const FZ_BGS[] = {NULL, "\"k=v\"", "\"iii.function.id=zz,a=b\"", "\"\""};

/* a string field: pool entry, or a fuzz string when the selector says so */
static void fz_put_pick(const char *const *pool, size_t n, unsigned sel)
{
    if (sel % (n + 1) == n) fz_put_fstr();
    else fz_put(pool[sel % (n + 1)] ? pool[sel % (n + 1)] : "null");
}

static void fz_new_uuid(char out[37])
{
    snprintf(out, 37, "%08x-0000-4000-8000-%012x", 0xf00du, ++fz_uuid_ctr);
}

/* Picks an invocation id: 0 fresh, 1 one this slot received, 2 one another slot made (in flight
 * or answered), 3 uppercase of a received one, 4 one the slot itself has outstanding. */
static void fz_pick_id(int slot, unsigned sel, char out[37])
{
    struct fz_slot *s = &fz_s[slot];
    int o = (int)(sel >> 3) % FZ_SLOTS;
    switch (sel % 5) {
    case 1:
        if (s->nin) {
            memcpy(out, s->in_ids[(sel >> 3) % (s->nin < 16 ? s->nin : 16)], 37);
            return;
        }
        break;
    case 2:
        if (fz_s[o].nout) {
            memcpy(out, fz_s[o].out[(sel >> 6) % fz_s[o].nout].id, 37);
            return;
        }
        break;
    case 3:
        if (s->nin) {
            memcpy(out, s->in_ids[(sel >> 3) % (s->nin < 16 ? s->nin : 16)], 37);
            for (int k = 0; k < 36; k++) out[k] = (char)toupper((unsigned char)out[k]);
            return;
        }
        break;
    case 4:
        if (s->nout) {
            memcpy(out, s->out[(sel >> 3) % s->nout].id, 37);
            return;
        }
        break;
    }
    fz_new_uuid(out);
}

/* Records a call the slot makes whose reply may come (id as sent). */
static void fz_expect(int slot, const char *id, const char *tp, const char *bg, int any)
{
    struct fz_slot *s = &fz_s[slot];
    if (s->nout >= FZ_OUT) {
        s->loose = 1; /* model full: stop checking this slot rather than guess */
        return;
    }
    struct fz_call *k = &s->out[s->nout++];
    memcpy(k->id, id, 36);
    k->id[36] = 0;
    k->any = any;
    snprintf(k->tp, sizeof k->tp, "%s", tp ? tp : "");
    snprintf(k->bg, sizeof k->bg, "%s", bg ? bg : "");
}

/* Delivers payload p[0..n) to c as masked client frame(s): op, optionally split in two. */
static void fz_feed_frame(struct conn *c, int op, const void *p, size_t n, int split, unsigned key)
{
    static unsigned char fr[(1 << 16) + 64];
    size_t at = 0;
    size_t cut = split && n > 1 ? n / 2 : n;
    for (int part = 0; part < 2; part++) {
        size_t off = part ? cut : 0, len = part ? n - cut : cut;
        if (part && cut == n) break;
        int fin = part || cut == n;
        fr[at++] = (unsigned char)((fin ? 0x80 : 0) | (part ? WS_CONT : op));
        if (len < 126) fr[at++] = (unsigned char)(0x80 | len);
        else fr[at++] = 0x80 | 126, fr[at++] = (unsigned char)(len >> 8), fr[at++] = (unsigned char)len;
        unsigned char mk[4] = {(unsigned char)key, (unsigned char)(key >> 8), 0x5a, 0xa5};
        memcpy(fr + at, mk, 4);
        at += 4;
        for (size_t k = 0; k < len; k++) fr[at + k] = ((const unsigned char *)p)[off + k] ^ mk[k & 3];
        at += len;
    }
    if (!conn_open(c)) return;
    if (buf_append(&c->in, fr, at) < 0) {
        conn_abort(c, "out of memory");
        return;
    }
    ws_on_data(c);
}

/* Sends the frame in fz_msg from slot i (text unless binary). */
static void fz_send(int i, int binary, int split, unsigned key)
{
    if (fz_trace) fprintf(stderr, "fz:   slot %d <- %s%.*s\n", i, binary ? "(bin) " : "", (int)fz_len, fz_msg);
    fz_feed_frame(fz_s[i].c, binary ? WS_BIN : WS_TEXT, fz_msg, fz_len, split, key);
}

/* Parses a raw frame a slot sends, to keep the model honest: registered ids and call ids. */
static void fz_note_raw(int i, const unsigned char *p, size_t n)
{
    struct jdoc d;
    memset(&d, 0, sizeof d);
    d.t = fz_tok, d.cap = d.max = 4096;
    if (json_parse(&d, p, n, 2, 1) < 0 || d.t[0].type != J_OBJECT) return;
    int ty = json_get(&d, 0, "type");
    if (json_streq(&d, ty, "registerfunction")) {
        int id = json_get(&d, 0, "id");
        if (JTYPE(&d, id) == J_STRING) {
            if (d.t[id].esc || JLEN(&d, id) >= 72) fz_s[i].escids = 1;
            else fz_raw(&d, id, fz_s[i].fids[fz_s[i].nfids++ % 32], 72);
        }
    } else {
        int iid = json_get(&d, 0, "invocation_id");
        if (JTYPE(&d, iid) == J_STRING && JLEN(&d, iid) == 38)
            fz_expect(i, (const char *)JRAW(&d, iid) + 1, NULL, NULL, 1);
    }
    /* with duplicate "type"/"invocation_id" keys the engine takes the first, as we do */
}

enum {
    T_REGFN, T_UNREGFN, T_INVOKE, T_RESULT, T_REGTT, T_REGTRIG, T_UNREGTRIG, T_TRR, T_ANNOUNCE,
    T_ENG_REGTRIG, T_ENG_UNREGTRIG, T_ENG_LIST, T_REATTACH, T_PING, T_NTEMPL
};

/* Builds one template frame for slot i into fz_msg and records the model's expectations. */
static void fz_template(int i, unsigned t)
{
    struct fz_slot *s = &fz_s[i];
    char id[37];
    fz_len = 0;
    switch (t % T_NTEMPL) {
    case T_REGFN: {
        unsigned sel = fz_u8(), opt = fz_u8();
        fz_put("{\"type\":\"registerfunction\",\"id\":");
        size_t at = fz_len;
        fz_put_pick(FZ_FIDS, FZ_NFIDS, sel);
        if (memchr(fz_msg + at, '\\', fz_len - at) || fz_len - at >= 72) s->escids = 1;
        else {
            memcpy(s->fids[s->nfids % 32], fz_msg + at, fz_len - at);
            s->fids[s->nfids++ % 32][fz_len - at] = 0;
        }
        if (opt & 1) fz_put(",\"description\":\"adds\"");
        if (opt & 2) fz_put(",\"metadata\":{\"internal\":true}");
        if (opt & 4) fz_put(",\"request_format\":{\"type\":\"object\"}");
        fz_put("}");
        break;
    }
    case T_UNREGFN:
        fz_put("{\"type\":\"unregisterfunction\",\"id\":");
        fz_put_pick(FZ_FIDS, FZ_NFIDS, fz_u8());
        fz_put("}");
        break;
    case T_INVOKE: {
        unsigned idsel = fz_u8(), fsel = fz_u8(), opt = fz_u8(), ctx = fz_u8();
        int has_id = (opt & 3) != 0, null_id = (opt & 3) == 3;
        unsigned act = (opt >> 2) % 5; /* none, void, enqueue, bad, enqueue without queue */
        unsigned nsel = (opt >> 5) % (FZ_NNSS + 1);
        const char *tp = FZ_TPS[ctx % 4], *bg = FZ_BGS[(ctx >> 2) % 4];
        fz_put("{\"type\":\"invokefunction\"");
        if (has_id && !null_id) {
            fz_pick_id(i, idsel, id);
            fz_putf(",\"invocation_id\":\"%s\"", id);
        } else if (null_id) fz_put(",\"invocation_id\":null");
        fz_put(",\"function_id\":");
        fz_put_pick(FZ_FIDS, FZ_NFIDS, fsel);
        switch ((ctx >> 4) % 4) {
        case 0: fz_put(",\"data\":{\"a\":1,\"b\":2}"); break;
        case 1: fz_put(",\"data\":{\"_caller_worker_id\":\"spoof\",\"x\":[1,{\"_caller_worker_id\":2}]}"); break;
        case 2: fz_put(",\"data\":null"); break;
        default: fz_put(",\"data\":{}"); break;
        }
        if (tp) fz_putf(",\"traceparent\":%s", tp);
        if (bg) fz_putf(",\"baggage\":%s", bg);
        if (ctx & 64) fz_put(",\"metadata\":{\"m\":1}");
        int blank = 0;
        if (nsel < FZ_NNSS && FZ_NSS[nsel]) {
            fz_putf(",\"namespace\":%s", FZ_NSS[nsel]);
            blank = nsel == 4 || nsel == 5;
        } else if (nsel == FZ_NNSS) {
            fz_put(",\"namespace\":");
            size_t at = fz_len;
            fz_put_fstr();
            blank = 1; /* a fuzz namespace may be blank: the context check is relaxed */
            (void)at;
        }
        if (act == 1) fz_put(",\"action\":{\"type\":\"void\"}");
        else if (act == 2) fz_put(",\"action\":{\"type\":\"enqueue\",\"queue\":\"q1\"}");
        else if (act == 3) fz_put(",\"action\":{\"type\":\"bogus\"}");
        else if (act == 4) fz_put(",\"action\":{\"type\":\"enqueue\"}");
        fz_put("}");
        /* replies echo traceparent/baggage, except enqueue replies and blank-namespace errors */
        if (has_id && !null_id && act != 1)
            fz_expect(i, id, tp, bg, act == 2 || act == 4 || blank);
        break;
    }
    case T_RESULT: {
        unsigned idsel = fz_u8(), opt = fz_u8();
        fz_pick_id(i, idsel % 4 == 0 ? 1 : idsel, id);
        fz_putf("{\"type\":\"invocationresult\",\"invocation_id\":\"%s\",\"function_id\":", id);
        fz_put_pick(FZ_FIDS, FZ_NFIDS, opt >> 4);
        if (opt & 1) fz_put(",\"error\":{\"code\":\"E\",\"message\":\"boom\"}");
        if (opt & 2) fz_put(",\"result\":{\"sum\":3}");
        if (opt & 4) fz_put(",\"result\":null");
        if (opt & 8) fz_put(",\"traceparent\":\"00-aa-bb-01\"");
        fz_put("}");
        break;
    }
    case T_REGTT: {
        unsigned sel = fz_u8(), nsel = fz_u8();
        fz_put("{\"type\":\"registertriggertype\",\"id\":");
        fz_put_pick(FZ_TTS, FZ_NTTS, sel);
        fz_put(",\"description\":\"d\"");
        if (nsel % (FZ_NNSS + 1) < FZ_NNSS && FZ_NSS[nsel % (FZ_NNSS + 1)])
            fz_putf(",\"namespace\":%s", FZ_NSS[nsel % (FZ_NNSS + 1)]);
        fz_put("}");
        break;
    }
    case T_REGTRIG: {
        unsigned tid = fz_u8(), tt = fz_u8(), fsel = fz_u8(), opt = fz_u8();
        fz_put("{\"type\":\"registertrigger\",\"id\":");
        fz_put_pick(FZ_TIDS, 4, tid);
        fz_put(",\"trigger_type\":");
        fz_put_pick(FZ_TTS, FZ_NTTS, tt);
        fz_put(",\"function_id\":");
        fz_put_pick(FZ_FIDS, FZ_NFIDS, fsel);
        fz_put((opt & 1) ? ",\"config\":null" : ",\"config\":{\"expr\":\"* * *\"}");
        if (opt & 2) fz_put(",\"metadata\":{\"k\":\"v\"}");
        unsigned n1 = (opt >> 2) % (FZ_NNSS + 1), n2 = (opt >> 5) % (FZ_NNSS + 1);
        if (n1 < FZ_NNSS && FZ_NSS[n1]) fz_putf(",\"namespace\":%s", FZ_NSS[n1]);
        if (n2 < FZ_NNSS && FZ_NSS[n2]) fz_putf(",\"trigger_namespace\":%s", FZ_NSS[n2]);
        fz_put("}");
        break;
    }
    case T_UNREGTRIG: {
        unsigned sel = fz_u8();
        fz_put("{\"type\":\"unregistertrigger\",\"id\":");
        if (sel & 1 && fz_ndur) fz_putf("\"%s\"", fz_dur[(sel >> 1) % (fz_ndur < 8 ? fz_ndur : 8)]);
        else fz_put_pick(FZ_TIDS, 4, sel >> 1);
        fz_put("}");
        break;
    }
    case T_TRR: {
        unsigned sel = fz_u8(), opt = fz_u8();
        fz_put("{\"type\":\"triggerregistrationresult\",\"id\":");
        if (s->nprov && !(sel & 1)) fz_put(s->prov[(sel >> 1) % (s->nprov < 8 ? s->nprov : 8)]);
        else if (fz_ndur && (sel & 2)) fz_putf("\"%s\"", fz_dur[(sel >> 2) % (fz_ndur < 8 ? fz_ndur : 8)]);
        else fz_put_pick(FZ_TIDS, 4, sel >> 2);
        fz_put(",\"trigger_type\":");
        fz_put_pick(FZ_TTS, FZ_NTTS, opt >> 2);
        fz_put(",\"function_id\":\"math::add\"");
        if (opt & 1) fz_put(",\"error\":{\"code\":\"BAD\",\"message\":\"no\"}");
        fz_put("}");
        break;
    }
    case T_ANNOUNCE: {
        unsigned nm = fz_u8(), ns = fz_u8(), opt = fz_u8(), ctx = fz_u8();
        const char *tp = FZ_TPS[ctx % 4], *bg = FZ_BGS[(ctx >> 2) % 4];
        int sync = opt & 1;
        fz_put("{\"type\":\"invokefunction\",\"function_id\":\"engine::workers::register\"");
        if (sync) {
            fz_new_uuid(id);
            fz_putf(",\"invocation_id\":\"%s\"", id);
            if (tp) fz_putf(",\"traceparent\":%s", tp);
            if (bg) fz_putf(",\"baggage\":%s", bg);
        } else {
            fz_put(",\"action\":{\"type\":\"void\"}");
        }
        fz_put(",\"data\":{\"runtime\":\"c\"");
        unsigned k = nm % (FZ_NNAMES + 1);
        if (k == FZ_NNAMES) fz_put(",\"name\":"), fz_put_fstr();
        else if (FZ_NAMES[k]) fz_putf(",\"name\":%s", FZ_NAMES[k]);
        k = ns % (FZ_NNSS + 1);
        if (k == FZ_NNSS) fz_put(",\"namespace\":"), fz_put_fstr();
        else if (FZ_NSS[k]) fz_putf(",\"namespace\":%s", FZ_NSS[k]);
        if (opt & 2) fz_put(",\"pid\":1234");
        if (opt & 4) fz_put(",\"description\":"), fz_put_fstr();
        if (opt & 8) fz_put(",\"telemetry\":{\"sdk\":\"x\"}");
        if (opt & 16) fz_put(",\"os\":\"linux\",\"version\":\"1\",\"isolation\":\"none\"");
        fz_put("}}");
        if (sync) fz_expect(i, id, tp, bg, 0);
        break;
    }
    case T_ENG_REGTRIG: {
        unsigned tt = fz_u8(), fsel = fz_u8(), opt = fz_u8();
        fz_new_uuid(id);
        fz_putf("{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":"
                "\"engine::register_trigger\",\"data\":{\"trigger_type\":",
                id);
        fz_put_pick(FZ_TTS, FZ_NTTS, tt);
        fz_put(",\"function_id\":");
        fz_put_pick(FZ_FIDS, FZ_NFIDS, fsel);
        if (opt & 1) fz_put(",\"config\":{\"c\":1}");
        if (opt & 2) fz_put(",\"trigger_namespace\":\"ns1\"");
        if (opt & 4) fz_put(",\"metadata\":{\"m\":true}");
        fz_put("}");
        if (opt & 8) fz_put(",\"traceparent\":\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"");
        fz_put("}");
        fz_expect(i, id, (opt & 8) ? "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"" : NULL,
                  NULL, 0);
        break;
    }
    case T_ENG_UNREGTRIG: {
        unsigned sel = fz_u8();
        fz_new_uuid(id);
        fz_putf("{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":"
                "\"engine::unregister_trigger\",\"data\":{\"id\":",
                id);
        if (fz_ndur && (sel & 1)) fz_putf("\"%s\"", fz_dur[(sel >> 1) % (fz_ndur < 8 ? fz_ndur : 8)]);
        else fz_put_pick(FZ_TIDS, 4, sel >> 1);
        fz_put("}}");
        fz_expect(i, id, NULL, NULL, 0);
        break;
    }
    case T_ENG_LIST: {
        static const char *const L[] = {
            "\"engine::functions::list\",\"data\":{}",
            "\"engine::functions::list\",\"data\":{\"include_internal\":true,\"search\":\"add\"}",
            "\"engine::workers::list\",\"data\":{}",
            "\"engine::triggers::list\",\"data\":{\"include_internal\":true}",
            "\"engine::registered-triggers::list\",\"data\":{}",
            "\"engine::functions::info\",\"data\":{\"function_ids\":[\"math::add\",\"x\"]}",
            "\"engine::workers::info\",\"data\":{}",
            "\"engine::log::info\",\"data\":{\"message\":\"hi\"}",
            "\"engine::functions::list\",\"data\":[]"};
        unsigned sel = fz_u8();
        fz_new_uuid(id);
        fz_putf("{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":%s}", id,
                L[sel % (sizeof L / sizeof L[0])]);
        fz_expect(i, id, NULL, NULL, 0);
        break;
    }
    case T_REATTACH: {
        unsigned sel = fz_u8();
        int o = (int)(sel % FZ_SLOTS);
        if (!fz_s[o].wid[0]) return;
        fz_putf("{\"type\":\"reattach\",\"previous_worker_id\":\"%s\"", fz_s[o].wid);
        if (sel & 8) fz_putf(",\"reattach_token\":\"%s\"", fz_s[o].token);
        else if (sel & 16) fz_put(",\"reattach_token\":\"00000000-0000-4000-8000-000000000000\"");
        fz_put("}");
        break;
    }
    case T_PING:
        fz_put("{\"type\":\"ping\"}");
        break;
    }
}

/* ==== Operations ============================================================================= */
enum { OP_OPEN, OP_SEND, OP_DROP, OP_CLOCK, OP_REAP, OP_RAWFRAME, OP_RAWWS, OP_ANSWER, OP_N };

static void fz_open_slot(int i, int via_http)
{
    if (fz_s[i].c) return;
    struct conn *c = conn_new(-1, "127.0.0.1");
    if (!c) return;
    fz_slot_clear(i);
    fz_s[i].c = c;
    if (via_http) {
        static const char req[] = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  "Sec-WebSocket-Version: 13\r\n\r\n";
        fz_s[i].http = 1;
        if (buf_append(&c->in, req, sizeof req - 1) < 0) conn_abort(c, "out of memory");
        else http_on_data(c);
    } else {
        c->kind = CK_WORKER;
        c->ws = 1;
        worker_on_open(c);
    }
}

/* what one loop turn does around its I/O: timers when due, the discovery tick, the reap pass */
static void fz_timers(void)
{
    int64_t now = now_ms(), next = INT64_MAX;
    for (struct conn *c = S.conns; c; c = c->next) timer_touch(loop_timers(c, now));
    inv_timeouts(now, &next);
}

static void fz_reap(void)
{
    {
        int64_t nx = INT64_MAX;
        drain_tick();
        ev_functions_tick(now_ms(), &nx);
    }
    fz_drain_out();
    for (int i = 0; i < FZ_SLOTS; i++)
        if (fz_s[i].c && fz_s[i].c->dead) fz_slot_clear(i); /* freed by the pass below */
    loop_reap();
}

static void fz_run_op(void)
{
    static char stepbuf[64];
    unsigned b = fz_u8();
    unsigned op = b % OP_N, a = fz_u8();
    int i = (int)(a % FZ_SLOTS);
    struct conn *c = fz_s[i].c;
    static const char *const names[] = {"open", "send", "drop", "clock", "reap", "rawframe", "rawws", "answer"};
    snprintf(stepbuf, sizeof stepbuf, "#%zu %s slot %d", fz_pos, names[op], i);
    fz_step = stepbuf;
    if (fz_trace) fprintf(stderr, "fz: %s\n", stepbuf);
    switch (op) {
    case OP_OPEN:
        fz_open_slot(i, (a >> 3) & 1);
        break;
    case OP_SEND: {
        unsigned t = fz_u8();
        if (!c || !conn_open(c) || !c->ws) break;
        fz_template(i, t);
        if (fz_len) fz_send(i, (a >> 3) & 1, (a >> 4) & 1, a);
        break;
    }
    case OP_DROP:
        if (!c) break;
        switch ((a >> 3) % 4) {
        case 0: conn_abort(c, "eof"); break;
        case 1: fz_feed_frame(c, WS_CLOSE, "\x03\xe8" "bye", 5, 0, a); break;
        case 2: fz_feed_frame(c, 3, "", 0, 0, a); break; /* reserved opcode: protocol error */
        default: conn_close(c, 1001, "going away"); break;
        }
        break;
    case OP_CLOCK: {
        static const int64_t dt[] = {0, 1, 100, 1999, 2001, 4999, 5001, 10001, 20001, 60001};
        fz_now += dt[a % (sizeof dt / sizeof dt[0])];
        fz_timers();
        break;
    }
    case OP_REAP:
        fz_reap();
        break;
    case OP_RAWFRAME: {
        size_t n = fz_u8() * (size_t)((a >> 5) + 1);
        if (n > fz_n - fz_pos) n = fz_n - fz_pos;
        const unsigned char *p = fz_in + fz_pos;
        fz_pos += n;
        if (!c || !conn_open(c) || !c->ws) break;
        int binary = (a >> 3) & 1;
        /* a text frame the engine will refuse at the UTF-8 check closes it: still model it */
        fz_note_raw(i, p, n);
        if (fz_trace) fprintf(stderr, "fz:   slot %d <- raw %s%.*s\n", i, binary ? "(bin) " : "", (int)n, p);
        fz_feed_frame(c, binary ? WS_BIN : WS_TEXT, p, n, (a >> 4) & 1, a);
        break;
    }
    case OP_RAWWS: {
        size_t n = fz_u8();
        if (n > fz_n - fz_pos) n = fz_n - fz_pos;
        const unsigned char *p = fz_in + fz_pos;
        fz_pos += n;
        if (!c || !conn_open(c)) break;
        fz_s[i].loose = 1;
        if (buf_append(&c->in, p, n) < 0) break;
        if (c->kind == CK_HTTP) http_on_data(c);
        else if (c->ws) ws_on_data(c);
        break;
    }
    case OP_ANSWER: {
        /* answers the most recent (or a chosen) call this slot received */
        if (!c || !conn_open(c) || !c->ws || !fz_s[i].nin) break;
        unsigned sel = fz_u8();
        int k = (fz_s[i].nin - 1 - (int)(sel % 4) + 64) % 16;
        if (k >= fz_s[i].nin) k = (fz_s[i].nin - 1) % 16;
        fz_len = 0;
        fz_putf("{\"type\":\"invocationresult\",\"invocation_id\":\"%s\",\"function_id\":\"math::add\"%s}",
                fz_s[i].in_ids[k],
                (a & 8) ? ",\"error\":{\"code\":\"E\",\"message\":\"m\"}" : ",\"result\":{\"ok\":true}");
        fz_send(i, 0, 0, a);
        break;
    }
    }
    fz_drain_out();
    fz_check_invariants();
}

/* ==== Per-input setup and teardown =========================================================== */
static void fz_init(void)
{
    static int done;
    if (done) return;
    done = 1;
    log_level = -1; /* silent */
    fz_ignore = getenv("FZ_IGNORE");
    fz_trace = getenv("FZ_TRACE") != NULL;
    cfg_defaults(&S.cfg);
    settings_from_cfg();
    S.set.max_message_bytes = S.set.max_frame_bytes = 1 << 20;
    S.grace_ms = 5000;
    S.lfd = -1;
    S.ep = -1;
    fz_mem_base = mem_live_bytes;
}

/* Fresh engine state for one input: builtins registered, clocks and randomness reset. */
static void fz_begin(void)
{
    fz_init();
    fz_now = 1000000;
    rnd_left = 0;
    rnd_state = UINT64_C(0x9E3779B97F4A7C15);
    fz_uuid_ctr = 0;
    fz_ndur = 0;
    memset(fz_s, 0, sizeof fz_s);
    S.timer_at = INT64_MAX;
    if (bi_init() < 0) abort();
}

/* Drops every connection, reaps, frees the whole registry: nothing may be left. */
static void fz_end(void)
{
    fz_step = "final teardown";
    for (struct conn *x = S.conns; x; x = x->next) x->dead = 1, reap_push(x);
    fz_drain_out();
    memset(fz_s, 0, sizeof fz_s);
    loop_reap();
    fz_check_invariants();
    FZ_CHECK("final", !S.conns && !S.invs.n && !S.workers.n && !S.leases.n && !S.n_acks,
             "after dropping every connection: %zu conns, %zu calls, %zu workers, %zu leases",
             S.nconns, S.invs.n, S.workers.n, S.leases.n);
    /* only durable bindings and the engine's own functions and trigger types may remain */
    for (size_t i = 0; i < S.funcs.nb; i++)
        for (struct hnode *e = S.funcs.b[i]; e; e = e->next)
            FZ_CHECK("final", !((struct func *)e)->owner, "a worker function survived");
    for (size_t i = 0; i < S.ttypes.nb; i++)
        for (struct hnode *e = S.ttypes.b[i]; e; e = e->next)
            FZ_CHECK("final", !((struct ttype *)e)->provider, "a worker trigger type survived");
    for (size_t i = 0; i < S.trigs.nb; i++)
        for (struct hnode *e = S.trigs.b[i]; e; e = e->next)
            FZ_CHECK("final", !((struct trig *)e)->owner, "a worker binding survived");
    engine_free_all();
    hm_free(&S.workers);
    memset(&S.jd, 0, sizeof S.jd);
    S.inv_free_n = 0;
    S.reap = NULL, S.dirty = NULL;
    FZ_CHECK("leak", mem_live_bytes == fz_mem_base,
             "%zd bytes still allocated after a full teardown",
             (ssize_t)(mem_live_bytes - fz_mem_base));
}

static void fz_run(const uint8_t *data, size_t size)
{
    fz_begin();
    fz_in = data, fz_n = size, fz_pos = 0;
    fz_check_invariants();
    while (fz_pos < fz_n) fz_run_op();
    fz_end();
}

#ifndef FZ_NO_ENTRY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 8192) return 0; /* long sessions add little and slow everything down */
    fz_run(data, size);
    return 0;
}
#endif

/* ==== Seeds ================================================================================== */
/* Each seed is a meaningful session; committed as tests/fuzz_state_corpus/seed-N. */
#define O_OPEN(s)          OP_OPEN, (s)
#define O_OPEN_HTTP(s)     OP_OPEN, (8 | (s))
#define O_SEND(s, t)       OP_SEND, (s), (t)
#define O_SENDB(s, t)      OP_SEND, (8 | (s)), (t)
#define O_DROP(s)          OP_DROP, (s)
#define O_CLOCK(k)         OP_CLOCK, (k)
#define O_REAP             OP_REAP, 0
#define O_ANSWER(s)        OP_ANSWER, (s), 0
static const uint8_t FZ_SEED0[] = {
    /* connect two workers, w1 announces in default, registers math::add; w2 calls it (with
     * traceparent), w1 answers; both disconnect */
    O_OPEN(0), O_OPEN_HTTP(1),
    O_SEND(0, T_ANNOUNCE), 1, 1, 3, 0,
    O_SEND(0, T_REGFN), 0, 1,
    O_SEND(1, T_ANNOUNCE), 2, 1, 2, 0,
    O_SEND(1, T_INVOKE), 0, 0, 1, 1,
    O_ANSWER(0),
    O_DROP(0), O_REAP, O_DROP(1), O_REAP};
static const uint8_t FZ_SEED1[] = {
    /* registrations buffered before the announce, the grace period expires, then a call to a
     * worker that disconnects mid-call (invocation_stopped) */
    O_OPEN(0), O_OPEN(1),
    O_SEND(0, T_REGFN), 0, 0,
    O_SEND(0, T_REGTT), 2, 0,
    O_CLOCK(6),
    O_SEND(1, T_INVOKE), 0, 0, 1, 5,
    O_DROP(0), O_REAP, O_CLOCK(3), O_REAP};
static const uint8_t FZ_SEED2[] = {
    /* the stale-lease session: announce with a name, re-announce without one, disconnect */
    O_OPEN(0),
    O_SEND(0, T_ANNOUNCE), 1, 0, 3, 0,
    O_SEND(0, T_ANNOUNCE), 0, 0, 3, 0,
    O_DROP(0), O_REAP,
    O_OPEN(1), O_SEND(1, T_ANNOUNCE), 1, 0, 3, 0, O_REAP};
static const uint8_t FZ_SEED3[] = {
    /* a discovery trigger on workers-available bound to a worker function; another worker
     * announces with a sync call carrying trace context (nested internal call inside rt_invoke) */
    O_OPEN(0), O_OPEN(1),
    O_SEND(0, T_ANNOUNCE), 1, 1, 0, 0,
    O_SEND(0, T_REGFN), 0, 0,
    O_SEND(0, T_REGTRIG), 0, 1, 0, 0x02,
    O_SEND(1, T_ANNOUNCE), 2, 1, 1, 1 | 4,
    O_ANSWER(0), O_REAP, O_DROP(1), O_REAP};
static const uint8_t FZ_SEED4[] = {
    /* a provider registers trigger type cron; engine::register_trigger waits for its ack;
     * the provider acks; then engine::unregister_trigger; the provider leaves */
    O_OPEN(0), O_OPEN(1),
    O_SEND(0, T_ANNOUNCE), 1, 1, 0, 0,
    O_SEND(0, T_REGTT), 2, 0,
    O_SEND(1, T_ANNOUNCE), 2, 1, 0, 0,
    O_SEND(1, T_REGFN), 1, 0,
    O_SEND(1, T_ENG_REGTRIG), 2, 1, 1,
    O_SEND(0, T_TRR), 0, 0,
    O_SEND(1, T_ENG_UNREGTRIG), 1,
    O_SEND(1, T_REGTRIG), 1, 2, 1, 0,
    O_CLOCK(8), O_DROP(0), O_REAP, O_SEND(1, T_ENG_LIST), 4, O_REAP};
static const uint8_t FZ_SEED5[] = {
    /* binary frames whose JSON strings have an escape between the bytes of one UTF-8 sequence:
     * an announce name "\xC3\\n\xA9" and a function id "\xF0\\u0041\x9F\x98\x80" */
    O_OPEN(0),
    OP_RAWFRAME, 8, 116,
    '{', '"', 't', 'y', 'p', 'e', '"', ':', '"', 'i', 'n', 'v', 'o', 'k', 'e', 'f', 'u', 'n',
    'c', 't', 'i', 'o', 'n', '"', ',', '"', 'f', 'u', 'n', 'c', 't', 'i', 'o', 'n', '_', 'i',
    'd', '"', ':', '"', 'e', 'n', 'g', 'i', 'n', 'e', ':', ':', 'w', 'o', 'r', 'k', 'e', 'r',
    's', ':', ':', 'r', 'e', 'g', 'i', 's', 't', 'e', 'r', '"', ',', '"', 'd', 'a', 't', 'a',
    '"', ':', '{', '"', 'n', 'a', 'm', 'e', '"', ':', '"', 'a', 0xC3, '\\', 'n', 0xA9, '"',
    '}', ',', '"', 'a', 'c', 't', 'i', 'o', 'n', '"', ':', '{', '"', 't', 'y', 'p', 'e', '"',
    ':', '"', 'v', 'o', 'i', 'd', '"', '}', '}',
    OP_RAWFRAME, 8, 48,
    '{', '"', 't', 'y', 'p', 'e', '"', ':', '"', 'r', 'e', 'g', 'i', 's', 't', 'e', 'r', 'f',
    'u', 'n', 'c', 't', 'i', 'o', 'n', '"', ',', '"', 'i', 'd', '"', ':', '"', 0xF0, '\\', 'u',
    '0', '0', '4', '1', 0x9F, 0x98, 0x80, '"', '}', ' ', ' ', ' ',
    O_CLOCK(6), O_SEND(0, T_ENG_LIST), 0, O_REAP};
static const uint8_t FZ_SEED6[] = {
    /* enqueue without a queue worker, then with one; void calls; results for unknown ids */
    O_OPEN(0), O_OPEN(1),
    O_SEND(0, T_ANNOUNCE), 1, 1, 0, 0,
    O_SEND(0, T_REGFN), 4, 0,
    O_SEND(1, T_INVOKE), 0, 0, 1 | (2 << 2), 5,
    O_SEND(0, T_RESULT), 1, 2,
    O_SEND(1, T_INVOKE), 0, 0, 1 | (1 << 2), 0,
    O_SEND(1, T_RESULT), 2, 3,
    O_SEND(1, T_REATTACH), 0 | 8,
    O_REAP, O_DROP(0), O_DROP(1), O_REAP};
static const struct {
    const uint8_t *p;
    size_t n;
} FZ_SEEDS[] = {{FZ_SEED0, sizeof FZ_SEED0}, {FZ_SEED1, sizeof FZ_SEED1},
                {FZ_SEED2, sizeof FZ_SEED2}, {FZ_SEED3, sizeof FZ_SEED3},
                {FZ_SEED4, sizeof FZ_SEED4}, {FZ_SEED5, sizeof FZ_SEED5},
                {FZ_SEED6, sizeof FZ_SEED6}};
#define FZ_NSEEDS (sizeof FZ_SEEDS / sizeof FZ_SEEDS[0])

#if defined(FUZZ_STANDALONE) && !defined(FZ_NO_ENTRY)
int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "--write-seeds")) {
        for (size_t k = 0; k < FZ_NSEEDS; k++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/seed-%zu", argv[2], k);
            FILE *f = fopen(path, "wb");
            if (!f || fwrite(FZ_SEEDS[k].p, 1, FZ_SEEDS[k].n, f) != FZ_SEEDS[k].n) return 1;
            fclose(f);
        }
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        static unsigned char buf[1 << 16];
        FILE *f = fopen(argv[i], "rb");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
    }
    if (argc > 1) return 0;
    const char *e = getenv("III_FUZZ_SECS");
    time_t end = time(NULL) + (e ? atol(e) : 10);
    uint64_t x = 88172645463325252u;
    static unsigned char in[4096];
    long runs = 0;
    while (time(NULL) < end) {
        size_t n = FZ_SEEDS[runs % FZ_NSEEDS].n;
        memcpy(in, FZ_SEEDS[runs % FZ_NSEEDS].p, n);
        int muts = 1 + (int)(runs % 6);
        for (int k = 0; k < muts; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            if ((x >> 40) % 4 == 0 && n < sizeof in) in[n++] = (unsigned char)(x >> 16);
            else in[x % n] = (unsigned char)(x >> 24);
        }
        LLVMFuzzerTestOneInput(in, n);
        runs++;
    }
    printf("ok - fuzz_state: %ld standalone runs, invariants held\n", runs);
    return 0;
}
#endif
#endif /* FZ_STATE_C */
