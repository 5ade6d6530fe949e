/* fuzz_engine.c - libFuzzer target over the engine's network-facing parsers.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined tests/fuzz_engine.c -o build/fuzz_engine
 *   build/fuzz_engine -max_total_time=60
 *   Without libFuzzer: cc -g -fsanitize=address,undefined -DFUZZ_STANDALONE tests/fuzz_engine.c
 *   then pass files (or nothing: a seeded mutation loop runs for III_FUZZ_SECS, default 10).
 *
 * The first input byte picks the target: an HTTP request head on a fresh connection, or
 * WebSocket bytes on an upgraded worker / echo / otel connection (masked or as given), with
 * the payload run through the whole worker protocol (JSON envelope, routing, registry,
 * engine::* builtins). Two resident workers give the router somewhere to send. Every call ends
 * with the reap pass, so teardown paths run too; no state may leak or crash between inputs.
 */
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"

static struct conn *fz_conn(int kind)
{
    struct conn *c = conn_new(-1, "127.0.0.1");
    if (!c) return NULL;
    c->kind = kind;
    c->ws = kind != CK_HTTP;
    if (kind == CK_WORKER) worker_on_open(c);
    return c;
}

static void fz_init(void)
{
    static int done;
    if (done) return;
    done = 1;
    log_level = -1; /* silent */
    cfg_defaults(&S.cfg);
    settings_from_cfg();
    S.set.max_message_bytes = S.set.max_frame_bytes = 1 << 20;
    S.grace_ms = 0;
    S.echo = 1;
    S.lfd = -1;
    if (bi_init() < 0) abort();
}

/* Masks a payload region in place as a client would (key 0x5a5a5a5a). */
static void fz_frames(struct buf *out, const uint8_t *p, size_t n)
{
    /* split the input into frames of the sizes its own bytes ask for */
    size_t i = 0;
    while (i < n) {
        size_t len = p[i] % 64, op = p[i] >> 6;
        i++;
        if (len > n - i) len = n - i;
        static const int ops[] = {WS_TEXT, WS_BIN, WS_CONT, WS_PING};
        unsigned char hdr[6] = {(unsigned char)(0x80 | ops[op]), (unsigned char)(0x80 | len), 0x5a, 0x5a, 0x5a, 0x5a};
        if (ops[op] == WS_CONT || (len && p[i] == '!')) hdr[0] &= 0x7F; /* some unfinished */
        buf_append(out, hdr, 6);
        for (size_t k = 0; k < len; k++) buf_putc(out, p[i + k] ^ 0x5a);
        i += len;
    }
}

static void fz_feed(struct conn *c, const unsigned char *p, size_t n, int bytewise)
{
    size_t step = bytewise ? 1 : n;
    for (size_t i = 0; i < n && !c->dead && !c->closing; i += step) {
        size_t k = n - i < step ? n - i : step;
        buf_append(&c->in, p + i, k);
        if (c->kind == CK_HTTP) http_on_data(c);
        else ws_on_data(c);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_init();
    if (!size) return 0;
    int mode = data[0] % 7;
    data++, size--;
    /* two resident workers: one owns functions, one subscribes to discovery */
    struct conn *w1 = fz_conn(CK_WORKER), *w2 = fz_conn(CK_WORKER);
    static const char reg[] = "{\"type\":\"registerfunction\",\"id\":\"math::add\"}";
    static const char ann[] = "{\"type\":\"invokefunction\",\"function_id\":\"engine::workers::register\","
                              "\"data\":{\"name\":\"w\",\"pid\":1},\"action\":{\"type\":\"void\"}}";
    static const char sub[] = "{\"type\":\"registertrigger\",\"id\":\"t\",\"trigger_type\":"
                              "\"engine::functions-available\",\"function_id\":\"math::add\",\"config\":{}}";
    worker_on_message(w1, (const unsigned char *)ann, sizeof ann - 1, 0);
    worker_on_message(w1, (const unsigned char *)reg, sizeof reg - 1, 0);
    worker_on_message(w2, (const unsigned char *)sub, sizeof sub - 1, 0);
    struct conn *c;
    struct buf b = {0};
    switch (mode) {
    case 0: /* an HTTP request head, whole */
    case 1: /* ... and byte by byte */
        c = fz_conn(CK_HTTP);
        if (c) fz_feed(c, data, size, mode == 1);
        break;
    case 2: /* raw bytes on an upgraded worker connection */
        c = fz_conn(CK_WORKER);
        if (c) fz_feed(c, data, size, 0);
        break;
    case 3: /* the input as one masked text message to the worker protocol */
        c = fz_conn(CK_WORKER);
        if (c) {
            unsigned char h[14] = {0x81};
            size_t hl = 2;
            if (size < 126) h[1] = (unsigned char)(0x80 | size);
            else h[1] = 0x80 | 126, h[2] = (unsigned char)(size >> 8), h[3] = (unsigned char)size, hl = 4;
            if (size < 65536) {
                buf_append(&b, h, hl);
                buf_append(&b, "\0\0\0\0", 4); /* zero mask key: payload as given */
                buf_append(&b, data, size);
                fz_feed(c, buf_data(&b), buf_used(&b), 0);
            }
            /* and straight in, as binary (validated by the parser) */
            worker_on_message(c, data, size, 1);
        }
        break;
    case 4: /* frames built from the input on an echo connection, byte by byte */
    case 5: /* ... on a worker connection, whole */
        c = fz_conn(mode == 4 ? CK_ECHO : CK_WORKER);
        fz_frames(&b, data, size);
        if (c) fz_feed(c, buf_data(&b), buf_used(&b), mode == 4);
        break;
    case 6: /* the input as what a NATS server sent (cluster link ready): parser, heartbeats,
             * snapshots (listed through functions::list and the discovery event), goodbyes,
             * chunks, acknowledgements, cancels, and a call routed to a remote node */
        {
            static char *urls[] = {"nats://127.0.0.1:4222"};
            S.cfg.cluster.urls = urls, S.cfg.cluster.nurls = 1;
            CL.state = NATS_READY, CL.max_payload = 4096, CL.fd = -1;
            strcpy(CL.node, "me"), strcpy(CL.tok, "me"), strcpy(CL.iid, "00");
            buf_append(&CL.in, data, size);
            nats_input();
            static const char lst[] = "{\"type\":\"invokefunction\",\"invocation_id\":\"x1\","
                                      "\"function_id\":\"engine::functions::list\",\"data\":{\"search\":\"a\"}}";
            worker_on_message(w1, (const unsigned char *)lst, sizeof lst - 1, 0);
            /* a call routed to another node (the index), then the cluster-wide worker listing */
            static const char rc[] = "{\"type\":\"invokefunction\",\"invocation_id\":"
                                     "\"5b3b1b2e-1111-4222-8333-444455556666\",\"function_id\":\"a::b\",\"data\":{}}";
            worker_on_message(w1, (const unsigned char *)rc, sizeof rc - 1, 0);
            static const char wl[] = "{\"type\":\"invokefunction\",\"invocation_id\":\"x2\","
                                     "\"function_id\":\"engine::workers::list\",\"data\":{}}";
            worker_on_message(w1, (const unsigned char *)wl, sizeof wl - 1, 0);
            static const char tl[] = "{\"type\":\"invokefunction\",\"invocation_id\":\"x3\","
                                     "\"function_id\":\"engine::triggers::list\",\"data\":{\"search\":\"t\"}}";
            worker_on_message(w1, (const unsigned char *)tl, sizeof tl - 1, 0);
            int64_t nx = INT64_MAX;
            ev_functions_tick(now_ms(), &nx);
            nats_free();
            CL.state = NATS_OFF, S.cfg.cluster.urls = NULL, S.cfg.cluster.nurls = 0;
        }
        break;
    }
    buf_free(&b);
    {
        int64_t nx = INT64_MAX;
        ev_functions_tick(now_ms(), &nx);
    }
    /* every connection goes away: teardown paths run, then nothing may be left */
    for (struct conn *x = S.conns; x; x = x->next) x->dead = 1, reap_push(x);
    S.dirty = NULL;
    for (struct conn *x = S.conns; x; x = x->next) x->dirty = 0;
    loop_reap();
    if (S.conns || S.invs.n || S.workers.n || S.leases.n) abort();
    return 0;
}

#ifdef FUZZ_STANDALONE
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        size_t n;
        FILE *f = fopen(argv[i], "rb");
        if (!f) continue;
        static unsigned char buf[1 << 20];
        n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
    }
    if (argc > 1) return 0;
    const char *e = getenv("III_FUZZ_SECS");
    int64_t end = now_ms() + 1000 * (e ? atol(e) : 10);
    uint64_t x = 88172645463325252u;
    unsigned char in[2048];
    static const char *seeds[] = {
        "\x02GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "\x03{\"type\":\"invokefunction\",\"invocation_id\":\"0b3b1b2e-1111-4222-8333-444455556666\","
        "\"function_id\":\"math::add\",\"data\":{\"a\":1}}",
        "\x03{\"type\":\"invokefunction\",\"invocation_id\":\"0b3b1b2e-1111-4222-8333-444455556666\","
        "\"function_id\":\"engine::functions::info\",\"data\":{\"function_ids\":[\"a\",\"math::add\"]}}",
        "\x03{\"type\":\"registertriggertype\",\"id\":\"x\",\"description\":\"d\"}",
        "\x03{\"type\":\"reattach\",\"previous_worker_id\":\"0b3b1b2e-1111-4222-8333-444455556666\"}",
        "\x06MSG iii.node.b.hb 1 28\r\n{\"node\":\"b\",\"iid\":\"1\",\"v\":2}\r\n"
        "MSG iii.node.b.snap 2 83\r\n{\"node\":\"b\",\"iid\":\"1\",\"v\":2,\"functions\":[{\"function_id\":\"a::b\",\"worker_name\":\"w\"}]}\r\n"
        "PING\r\nMSG iii.node.b.bye 3 12\r\n{\"node\":\"b\"}\r\n",
        "\x06MSG iii.call.me 5 iii.reply.b.1b3b1b2e-1111-4222-8333-444455556666 171\r\n{\"cw\":\"0b3b1b2e-1111-4222-8333-444455556666\",\"f\":{\"type\":\"invokefunction\",\"invocation_id\":\"1b3b1b2e-1111-4222-8333-444455556666\",\"function_id\":\"math::add\",\"data\":{\"a\":1}}}\r\nMSG iii.reply.me.2b3b1b2e-1111-4222-8333-444455556666 6 119\r\n{\"type\":\"invocationresult\",\"invocation_id\":\"2b3b1b2e-1111-4222-8333-444455556666\",\"function_id\":\"math::add\",\"result\":1}\r\nHMSG iii.reply.me.2b3b1b2e-1111-4222-8333-444455556666 6 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        "\x06HMSG iii.node.b.snap 2 65 125\r\nNATS/1.0\r\nIii-Chunk: 2b3b1b2e-1111-4222-8333-444455556666 0 2\r\n\r\n{\"node\":\"b\",\"iid\":\"1\",\"v\":3,\"functions\":[{\"function_id\":\"a::\r\nHMSG iii.node.b.snap 2 65 174\r\nNATS/1.0\r\nIii-Chunk: 2b3b1b2e-1111-4222-8333-444455556666 1 2\r\n\r\nb\",\"worker_name\":\"w\"}],\"workers\":[{\"name\":\"w\",\"id\":\"9b3b1b2e-1111-4222-8333-444455556666\",\"runtime\":\"node\"}]}\r\nMSG iii.node.b.hb 1 28\r\n{\"node\":\"b\",\"iid\":\"1\",\"v\":3}\r\n",
        "\x06MSG iii.fn.default.math%3A%3Aadd 100 iii.reply.b.1b3b1b2e-1111-4222-8333-444455556666 171\r\n{\"cw\":\"0b3b1b2e-1111-4222-8333-444455556666\",\"f\":{\"type\":\"invokefunction\",\"invocation_id\":\"1b3b1b2e-1111-4222-8333-444455556666\",\"function_id\":\"math::add\",\"data\":{\"a\":1}}}\r\nMSG iii.node.me.cancel 7 46\r\n{\"rid\":\"1b3b1b2e-1111-4222-8333-444455556666\"}\r\nMSG iii.reply.me.2b3b1b2e-1111-4222-8333-444455556666 6 11\r\n{\"ack\":\"b\"}\r\n",
        "\x06MSG iii.node.c.snap 2 155\r\n{\"node\":\"c\",\"iid\":\"2\",\"v\":1,\"functions\":[],\"workers\":[],\"trigger_types\":[{\"id\":\"t::x\",\"namespace\":\"default\",\"worker_name\":\"w\",\"description\":\"d\"},{\"id\":1}]}\r\n",
    };
    long runs = 0;
    while (now_ms() < end) {
        const char *s = seeds[runs % (sizeof seeds / sizeof seeds[0])];
        size_t n = strlen(s);
        memcpy(in, s, n);
        for (int k = 0; k < 4; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            in[x % n] = (unsigned char)(x >> 24);
        }
        LLVMFuzzerTestOneInput(in, n);
        runs++;
    }
    printf("ok - fuzz_engine: %ld standalone runs without a crash or leak\n", runs);
    return 0;
}
#endif
