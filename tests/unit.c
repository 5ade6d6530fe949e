/* Unit tests: the engine's own code, included whole so every static is reachable.
 * Build: cc -DIII_NO_MAIN tests/unit.c -o build/unit   Run: build/unit [JSONTestSuite/test_parsing]
 * Prints one "ok - name" / "not ok - name: why" line per test; exits 1 on any failure.
 */
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"

#include <dirent.h>

static int failed, passed;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("not ok - %s: ", test_name);                                                    \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
            failed++;                                                                              \
            return;                                                                                \
        }                                                                                          \
    } while (0)
#define PASS() (printf("ok - %s\n", test_name), passed++)

static void hex(const unsigned char *d, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", d[i]);
}

static void t_sha1(void)
{
    const char *test_name = "sha1_fips180_vectors";
    static const struct {
        const char *in;
        const char *out;
    } v[] = {
        {"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"},
        {"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "84983e441c3bd26ebaae4aa1f95129e5e54670f1"},
    };
    for (size_t i = 0; i < 3; i++) {
        struct sha1 s;
        unsigned char d[20];
        char h[41];
        sha1_init(&s);
        sha1_update(&s, v[i].in, strlen(v[i].in));
        sha1_final(&s, d);
        hex(d, 20, h);
        CHECK(!strcmp(h, v[i].out), "vector %zu: %s", i, h);
    }
    /* one million 'a', fed in uneven pieces */
    struct sha1 s;
    unsigned char d[20], a[997];
    char h[41];
    memset(a, 'a', sizeof a);
    sha1_init(&s);
    size_t left = 1000000;
    while (left) {
        size_t k = left < sizeof a ? left : sizeof a;
        sha1_update(&s, a, k);
        left -= k;
    }
    sha1_final(&s, d);
    hex(d, 20, h);
    CHECK(!strcmp(h, "34aa973cd4c4daa4f61eeb2bdbad27316534016f"), "million a: %s", h);
    PASS();
}

static void t_base64(void)
{
    const char *test_name = "base64_rfc4648_vectors";
    static const char *in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *out[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (int i = 0; i < 7; i++) {
        char b[16];
        unsigned char r[16];
        b64_encode((const unsigned char *)in[i], strlen(in[i]), b);
        CHECK(!strcmp(b, out[i]), "encode %s -> %s", in[i], b);
        long n = b64_decode(out[i], strlen(out[i]), r, sizeof r);
        CHECK(n == (long)strlen(in[i]) && !memcmp(r, in[i], (size_t)n), "decode %s", out[i]);
    }
    unsigned char r[32];
    CHECK(b64_decode("Zm9v=", 5, r, sizeof r) < 0, "bad length accepted");
    CHECK(b64_decode("Zm=v", 4, r, sizeof r) < 0, "inner padding accepted");
    CHECK(b64_decode("Zm9*", 4, r, sizeof r) < 0, "bad char accepted");
    PASS();
}

static void t_handshake(void)
{
    const char *test_name = "rfc6455_1_3_handshake_example";
    char acc[29];
    ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, acc);
    CHECK(!strcmp(acc, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "got %s", acc);
    PASS();
}

static void t_utf8(void)
{
    const char *test_name = "utf8_edge_cases";
    static const struct {
        const char *s;
        int ok;
    } v[] = {
        {"plain ascii", 1},
        {"\xc3\xa9", 1},
        {"\xe2\x82\xac", 1},
        {"\xf0\x9f\x98\x80", 1},
        {"\xf4\x8f\xbf\xbf", 1}, /* U+10FFFF */
        {"\xef\xbf\xbf", 1},     /* U+FFFF */
        {"\xc0\x80", 0},         /* overlong NUL */
        {"\xc1\xbf", 0},         /* overlong */
        {"\xe0\x80\x80", 0},     /* overlong 3-byte */
        {"\xe0\x9f\xbf", 0},     /* overlong 3-byte upper edge */
        {"\xf0\x80\x80\x80", 0}, /* overlong 4-byte */
        {"\xf0\x8f\xbf\xbf", 0}, /* overlong 4-byte upper edge */
        {"\xed\xa0\x80", 0},     /* U+D800 surrogate */
        {"\xed\xbf\xbf", 0},     /* U+DFFF surrogate */
        {"\xf4\x90\x80\x80", 0}, /* > U+10FFFF */
        {"\xf5\x80\x80\x80", 0},
        {"\xff", 0},
        {"\xfe", 0},
        {"\x80", 0},
        {"\xbf", 0},
        {"\xc3", 0},          /* truncated */
        {"\xe2\x82", 0},      /* truncated */
        {"a\xf0\x9f\x98", 0}, /* truncated at end */
        {"\xc3\x28", 0},      /* bad continuation */
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        CHECK(utf8_valid((const unsigned char *)v[i].s, strlen(v[i].s)) == v[i].ok, "case %zu", i);
    /* split across fragments: every split point of a 4-byte sequence stays valid */
    const unsigned char e[] = "x\xf0\x9f\x98\x80y";
    for (size_t cut = 0; cut <= 6; cut++) {
        struct utf8 u = {0, 0, 0};
        CHECK(utf8_feed(&u, e, cut) == 0 && utf8_feed(&u, e + cut, 6 - cut) == 0 && !u.need,
              "split at %zu", cut);
    }
    /* fail fast: the invalid byte is reported before the message ends */
    struct utf8 u = {0, 0, 0};
    CHECK(utf8_feed(&u, (const unsigned char *)"ok\xed\xa0", 4) < 0,
          "surrogate prefix not caught early");
    PASS();
}

/* ---- frame parser through a fake connection ------------------------------------------------ */
static struct conn *fake_conn(int kind)
{
    struct conn *c = xcalloc(sizeof *c);
    c->fd = -1;
    c->kind = kind;
    c->ws = 1;
    return c;
}

static void fake_free(struct conn *c)
{
    buf_free(&c->in), buf_free(&c->out), buf_free(&c->msg);
    struct conn **pp = &S.dirty;
    while (*pp && *pp != c) pp = &(*pp)->dnext;
    if (*pp) *pp = c->dnext;
    xfree(c);
}

static void mkframe(struct buf *b, int fin, int op, const void *p, size_t n, int mask)
{
    unsigned char h[14];
    size_t hl = 2;
    h[0] = (unsigned char)((fin ? 0x80 : 0) | op);
    if (n < 126) h[1] = (unsigned char)n;
    else if (n < 65536) h[1] = 126, h[2] = (unsigned char)(n >> 8), h[3] = (unsigned char)n, hl = 4;
    else {
        h[1] = 127;
        for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
        hl = 10;
    }
    if (mask) {
        static const unsigned char k[4] = {0x37, 0xfa, 0x21, 0x3d};
        h[1] |= 0x80;
        memcpy(h + hl, k, 4);
        hl += 4;
        buf_append(b, h, hl);
        for (size_t i = 0; i < n; i++) buf_putc(b, ((const unsigned char *)p)[i] ^ k[i & 3]);
    } else {
        buf_append(b, h, hl);
        buf_append(b, p, n);
    }
}

/* Feeds `in` to a fresh echo connection whole (bytewise=0) or one byte at a time; returns the
 * output bytes in out and the close code the engine sent (0 = none). */
static unsigned feed(const struct buf *in, int bytewise, struct buf *out)
{
    struct conn *c = fake_conn(CK_ECHO);
    size_t n = buf_used(in);
    if (!bytewise) {
        buf_append(&c->in, buf_data(in), n);
        ws_on_data(c);
    } else {
        for (size_t i = 0; i < n && !c->closing && !c->dead; i++) {
            buf_append(&c->in, buf_data(in) + i, 1);
            ws_on_data(c);
        }
    }
    buf_append(out, buf_data(&c->out), buf_used(&c->out));
    unsigned code = 0;
    /* find a close frame in the output */
    const unsigned char *p = buf_data(&c->out);
    size_t left = buf_used(&c->out);
    while (left >= 2) {
        size_t len = p[1] & 127, hl = 2;
        if (len == 126) len = (size_t)p[2] << 8 | p[3], hl = 4;
        else if (len == 127) {
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            hl = 10;
        }
        if ((p[0] & 15) == WS_CLOSE) code = len >= 2 ? (unsigned)p[hl] << 8 | p[hl + 1] : 1000;
        if (hl + len > left) break;
        p += hl + len, left -= hl + len;
    }
    fake_free(c);
    return code;
}

static void t_frames(void)
{
    const char *test_name = "frame_parser_whole_and_bytewise";
    static const unsigned char big_payload[70000];
    for (int bw = 0; bw < 2; bw++) {
        struct buf in = {0}, out = {0};
        /* echo: text, binary, fragmented text with a ping in between, 126 and 65536 sizes */
        mkframe(&in, 1, WS_TEXT, "hello", 5, 1);
        mkframe(&in, 1, WS_BIN, "\x00\x01\x02", 3, 1);
        mkframe(&in, 0, WS_TEXT, "frag", 4, 1);
        mkframe(&in, 1, WS_PING, "pp", 2, 1);
        mkframe(&in, 1, WS_CONT, "ment", 4, 1);
        mkframe(&in, 1, WS_BIN, big_payload, 126, 1);
        mkframe(&in, 1, WS_BIN, big_payload, 65536, 1);
        mkframe(&in, 1, WS_CLOSE, "\x03\xe8", 2, 1);
        unsigned code = feed(&in, bw, &out);
        CHECK(code == 1000, "close code %u (bytewise=%d)", code, bw);
        const unsigned char *p = buf_data(&out);
        CHECK(p[0] == 0x81 && p[1] == 5 && !memcmp(p + 2, "hello", 5), "text echo");
        CHECK(p[7] == 0x82 && p[8] == 3, "binary echo");
        CHECK(p[12] == 0x8A && p[13] == 2 && !memcmp(p + 14, "pp", 2),
              "pong before reassembled message");
        CHECK(p[16] == 0x81 && p[17] == 8 && !memcmp(p + 18, "fragment", 8), "reassembled");
        CHECK(p[26] == 0x82 && p[27] == 126 && p[28] == 0 && p[29] == 126,
              "126 uses 16-bit length");
        buf_free(&in), buf_free(&out);
    }
    PASS();
}

static void t_frame_violations(void)
{
    const char *test_name = "frame_violations_close_codes";
    static const unsigned char zeros[200];
    struct {
        const char *what;
        unsigned code;
        void (*build)(struct buf *);
    } cases[] = {0};
    (void)cases;
    for (int bw = 0; bw < 2; bw++) {
        struct buf in = {0}, out = {0};
#define EXPECT(code_, ...)                                                                         \
    do {                                                                                           \
        in.len = in.off = 0, out.len = out.off = 0;                                                \
        __VA_ARGS__;                                                                               \
        unsigned got = feed(&in, bw, &out);                                                        \
        CHECK(got == (code_), "%s: expected %u got %u (bytewise=%d)", #__VA_ARGS__,                \
              (unsigned)(code_), got, bw);                                                         \
    } while (0)
        EXPECT(1002, mkframe(&in, 1, WS_TEXT, "x", 1, 0));                    /* unmasked */
        EXPECT(1002, (mkframe(&in, 1, WS_TEXT, "x", 1, 1), in.p[0] |= 0x40)); /* RSV1 */
        EXPECT(1002, mkframe(&in, 1, 3, "x", 1, 1));                          /* reserved opcode */
        EXPECT(1002, mkframe(&in, 1, 0xB, "x", 1, 1));                        /* reserved control */
        EXPECT(1002, mkframe(&in, 1, WS_CONT, "x", 1, 1)); /* continuation first */
        EXPECT(1002, (mkframe(&in, 0, WS_TEXT, "a", 1, 1), mkframe(&in, 1, WS_TEXT, "b", 1, 1)));
        EXPECT(1002, mkframe(&in, 1, WS_PING, zeros, 126, 1));         /* control > 125 */
        EXPECT(1002, mkframe(&in, 0, WS_PING, "x", 1, 1));             /* fragmented control */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x03", 1, 1));         /* 1-byte close */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x03\xed", 2, 1));     /* 1005 */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x00\x00", 2, 1));     /* 0 */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x03\xe7", 2, 1));     /* 999 */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x03\xf7", 2, 1));     /* 1015 */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x0b\xb7", 2, 1));     /* 2999 */
        EXPECT(1002, mkframe(&in, 1, WS_CLOSE, "\x13\x88", 2, 1));     /* 5000 */
        EXPECT(3000, mkframe(&in, 1, WS_CLOSE, "\x0b\xb8", 2, 1));     /* 3000 echoed */
        EXPECT(4999, mkframe(&in, 1, WS_CLOSE, "\x13\x87", 2, 1));     /* 4999 echoed */
        EXPECT(1007, mkframe(&in, 1, WS_CLOSE, "\x03\xe8\xff", 3, 1)); /* bad reason */
        EXPECT(1007, mkframe(&in, 1, WS_TEXT, "\xc0\x80", 2, 1));      /* overlong */
        EXPECT(1007, mkframe(&in, 0, WS_TEXT, "ok\xff", 3, 1));        /* fail fast */
        EXPECT(1007,
               (mkframe(&in, 0, WS_TEXT, "\xf0\x9f", 2, 1), mkframe(&in, 1, WS_CONT, "", 0, 1)));
        EXPECT(1000, (mkframe(&in, 0, WS_TEXT, "\xf0\x9f", 2, 1),
                      mkframe(&in, 1, WS_CONT, "\x98\x80", 2, 1),
                      mkframe(&in, 1, WS_CLOSE, "", 0, 1))); /* split code point ok */
        /* 64-bit length with the top bit set */
        EXPECT(1002, (buf_append(&in, "\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00", 10),
                      buf_append(&in, "abcd", 4)));
        /* over the frame limit: refused from the header alone */
        size_t saved = S.set.max_frame_bytes;
        S.set.max_frame_bytes = 1000;
        EXPECT(1009, buf_append(&in, "\x82\xfe\x10\x00kkkk", 8));
        S.set.max_frame_bytes = saved;
        saved = S.set.max_message_bytes;
        S.set.max_message_bytes = 100;
        EXPECT(1009,
               (mkframe(&in, 0, WS_BIN, zeros, 60, 1), mkframe(&in, 1, WS_CONT, zeros, 60, 1)));
        S.set.max_message_bytes = saved;
        buf_free(&in), buf_free(&out);
#undef EXPECT
    }
    PASS();
}

/* ---- JSON ---------------------------------------------------------------------------------- */
static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)sz + 1);
    *n = fread(p, 1, (size_t)sz, f);
    fclose(f);
    return p;
}

static void t_json_suite(const char *dir)
{
    const char *test_name = "json_test_suite";
    DIR *dh = dir ? opendir(dir) : NULL;
    if (!dh) {
        printf("skip - %s: corpus not found at %s\n", test_name, dir ? dir : "(none)");
        return;
    }
    struct dirent *de;
    int y = 0, nn = 0, ii = 0;
    char bad[512] = "";
    while ((de = readdir(dh))) {
        const char *f = de->d_name;
        if (strlen(f) < 3 || f[1] != '_') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, f);
        size_t n;
        char *s = slurp(path, &n);
        if (!s) continue;
        struct jdoc d = {0};
        d.max = UINT32_MAX;
        int rc = json_parse(&d, (unsigned char *)s, n, 1000, 1);
        /* also the envelope mode must agree on validity */
        struct jdoc e = {0};
        e.max = UINT32_MAX;
        int rc2 = json_parse(&e, (unsigned char *)s, n, 2, 1);
        xfree(d.t), xfree(e.t);
        free(s);
        if (rc != rc2 && !bad[0]) snprintf(bad, sizeof bad, "%s: modes disagree", f);
        if (f[0] == 'y') {
            y++;
            if (rc != 0 && !bad[0]) snprintf(bad, sizeof bad, "%s rejected", f);
        } else if (f[0] == 'n') {
            nn++;
            if (rc == 0 && !bad[0]) snprintf(bad, sizeof bad, "%s accepted", f);
        } else {
            ii++;
        }
    }
    closedir(dh);
    CHECK(!bad[0], "%s", bad);
    CHECK(y > 90 && nn > 180, "only %d y_ and %d n_ files", y, nn);
    printf("ok - %s (%d y_ accepted, %d n_ rejected, %d i_ survived)\n", test_name, y, nn, ii);
    passed++;
}

static void t_json_api(void)
{
    const char *test_name = "json_tokens_lookup_and_raw_relay";
    const char *src =
        "{\"type\":\"invokefunction\",\"data\":{\"n\":1e300,\"z\":-0,\"b\":9007199254740993,"
        "\"d\":1,\"d\":2},\"k\\u0065y\":\"v\\n\\ud83d\\ude00\",\"arr\":[1,[2,3],{}],\"t\":true}";
    struct jdoc d = {0};
    d.max = 4096;
    CHECK(json_parse(&d, (const unsigned char *)src, strlen(src), 2, 1) == 0, "parse");
    int data = json_get(&d, 0, "data");
    CHECK(data > 0 && d.t[data].opaque, "data opaque");
    const char *want = "{\"n\":1e300,\"z\":-0,\"b\":9007199254740993,\"d\":1,\"d\":2}";
    CHECK(JLEN(&d, data) == strlen(want) && !memcmp(JRAW(&d, data), want, strlen(want)),
          "raw relay");
    int k = json_get(&d, 0, "key");
    CHECK(k > 0, "escaped key lookup");
    size_t n;
    char *s = json_strdup(&d, k, &n);
    CHECK(s && n == 6 && !memcmp(s, "v\n\xf0\x9f\x98\x80", 6), "unescape with surrogate pair");
    xfree(s);
    CHECK(json_streq(&d, json_get(&d, 0, "type"), "invokefunction"), "streq");
    CHECK(!d.cwid_key, "no _caller_worker_id key in this data");
    {
        /* the router's hint: a key at data's depth is noted, a deeper or top-level one is not */
        static const char *yes = "{\"data\":{\"a\":1,\"_caller_worker_id\":\"x\"}}";
        static const char *no1 = "{\"data\":{\"a\":{\"_caller_worker_id\":\"x\"}}}";
        static const char *no2 = "{\"_caller_worker_id\":1,\"data\":\"_caller_worker_id\"}";
        struct jdoc h = {0};
        h.max = 64;
        CHECK(json_parse(&h, (const unsigned char *)yes, strlen(yes), 2, 1) == 0 && h.cwid_key,
              "hint missed");
        CHECK(json_parse(&h, (const unsigned char *)no1, strlen(no1), 2, 1) == 0 && !h.cwid_key,
              "depth 3 noted");
        CHECK(json_parse(&h, (const unsigned char *)no2, strlen(no2), 2, 1) == 0 && !h.cwid_key,
              "depth 1 noted");
        xfree(h.t);
    }
    CHECK(JTYPE(&d, json_get(&d, 0, "t")) == J_TRUE, "true");
    CHECK(json_get(&d, 0, "missing") < 0, "missing");
    {
        /* the top-level key index agrees with the member walk: plain keys use it, a duplicate key
         * (first wins), two keys sharing a slot, or an escaped key fall back to the walk */
        static const char *docs[] = {
            "{\"type\":\"a\",\"invocation_id\":1,\"function_id\":2,\"data\":3,\"result\":4,"
            "\"error\":5,\"action\":6,\"namespace\":7,\"traceparent\":8,\"baggage\":9,"
            "\"metadata\":10,\"timeout_ms\":11,\"\":12}",
            "{\"data\":1,\"type\":\"x\",\"data\":2}",
            "{\"type\":\"x\",\"tzpe\":2,\"tyze\":3}",
            "{\"typ\\u0065\":\"x\",\"data\":5}",
            "{\"a\":{\"type\":1},\"b\":[{\"type\":2}]}",
        };
        static const char *keys[] = {"type", "invocation_id", "function_id", "data", "result",
                                     "error", "action", "namespace", "traceparent", "baggage",
                                     "metadata", "timeout_ms", "", "tzpe", "tyze", "a", "b",
                                     "typf", "datb", "missing", "typ"};
        struct jdoc h = {0};
        h.max = 64;
        for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
            CHECK(json_parse(&h, (const unsigned char *)docs[i], strlen(docs[i]), 2, 1) == 0,
                  "index doc %zu", i);
            int saved = h.kidx;
            for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
                h.kidx = saved;
                int fast = json_get(&h, 0, keys[k]);
                h.kidx = 0;
                int walk = json_get(&h, 0, keys[k]);
                CHECK(fast == walk, "index doc %zu key %s: %d, walk %d", i, keys[k], fast, walk);
            }
        }
        CHECK(json_parse(&h, (const unsigned char *)docs[0], strlen(docs[0]), 2, 1) == 0 && h.kidx,
              "envelope keys share no slot");
        CHECK(json_parse(&h, (const unsigned char *)docs[1], strlen(docs[1]), 2, 1) == 0 && !h.kidx &&
                  JLEN(&h, json_get(&h, 0, "data")) == 1 && *JRAW(&h, json_get(&h, 0, "data")) == '1',
              "duplicate key: the first wins");
        CHECK(json_parse(&h, (const unsigned char *)docs[3], strlen(docs[3]), 2, 1) == 0 && !h.kidx &&
                  json_get(&h, 0, "type") > 0,
              "escaped key found by the walk");
        xfree(h.t);
    }
    CHECK(uuid_valid("0123abcd-EF45-6789-aBcD-0123456789ef", 36), "uuid");
    CHECK(!uuid_valid("0123abcd-EF45-6789-aBcD-0123456789eg", 36), "uuid: g");
    CHECK(!uuid_valid("0123abcd-EF45-6789-aBcD-0123456789e", 35), "uuid: short");
    CHECK(!uuid_valid("0123abcd0EF45-6789-aBcD-0123456789ef", 36), "uuid: no hyphen");
    CHECK(!uuid_valid("0123abcd-EF45-6789-aBcD-01234567-9ef", 36), "uuid: hyphen in hex");
    CHECK(!uuid_valid("0123abc:-EF45-6789-aBcD-0123456789ef", 36), "uuid: ':'");
    /* msg_valid stops after the last row of the frame's type: the rows of a type are adjacent */
    for (size_t i = 1; i < sizeof MSG_FIELDS / sizeof MSG_FIELDS[0]; i++)
        if (strcmp(MSG_FIELDS[i].type, MSG_FIELDS[i - 1].type))
            for (size_t j = 0; j < i; j++)
                CHECK(strcmp(MSG_FIELDS[i].type, MSG_FIELDS[j].type), "MSG_FIELDS: %s rows apart",
                      MSG_FIELDS[i].type);
    /* ... and its index of type lengths never skips a type that has rows: a frame with only
     * its type fails every type that has a required row; invokefunction (no rows) passes */
    for (size_t i = 0; i < sizeof MSG_FIELDS / sizeof MSG_FIELDS[0]; i++) {
        if (!(MSG_FIELDS[i].kind & F_REQ)) continue;
        char fr[96];
        struct jdoc m = {0};
        snprintf(fr, sizeof fr, "{\"type\":\"%s\"}", MSG_FIELDS[i].type);
        CHECK(json_parse(&m, (const unsigned char *)fr, strlen(fr), 2, 1) == 0 &&
                  !msg_valid(&m, MSG_FIELDS[i].type, MSG_FIELDS[i].tl),
              "msg_valid: %s without its %s", MSG_FIELDS[i].type, MSG_FIELDS[i].field);
        xfree(m.t);
    }
    {
        struct jdoc m = {0};
        const char *fr = "{\"type\":\"invokefunction\",\"function_id\":7}";
        CHECK(json_parse(&m, (const unsigned char *)fr, strlen(fr), 2, 1) == 0 &&
                  msg_valid(&m, "invokefunction", 14),
              "msg_valid: invokefunction has no rows");
        xfree(m.t);
    }
    CHECK(!uuid_valid("0123abcd-EF45-6789-aBcD-0123456789e\xe6", 36), "uuid: non-ASCII");
    CHECK(!uuid_valid("0123abcd-EF45-6789-aBcD-0123456789eG", 36), "uuid: G");
    CHECK(!uuid_valid("/123abcd-EF45-6789-aBcD-0123456789e`", 36), "uuid: / and `");
    {
        char f[37];
        inv_fold("0123ABCD-EF45-6789-aBcD-@[Z`{\xc1\xdaQRSTU", f);
        CHECK(!memcmp(f, "0123abcd-ef45-6789-abcd-@[z`{\xc1\xdaqrstu", 37), "inv_fold");
    }
    CHECK(!uuid_valid("0123abc\0-EF45-6789-aBcD-0123456789ef", 36), "uuid: NUL");
    /* writer escapes */
    struct buf b = {0};
    json_put_str(&b, "a\"b\\c\n\x01\xc3\xa9", 9);
    CHECK(buf_used(&b) == strlen("\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"") &&
              !memcmp(buf_data(&b), "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"", buf_used(&b)),
          "escape: %.*s", (int)buf_used(&b), buf_data(&b));
    buf_free(&b);
    /* depth cap, no recursion: 100000 '[' is rejected quickly */
    size_t deep = 100000;
    char *x = malloc(deep);
    memset(x, '[', deep);
    CHECK(json_parse(&d, (unsigned char *)x, deep, 2, 1) < 0, "deep nesting accepted");
    memset(x, '[', 128);
    memset(x + 128, ']', 128);
    CHECK(json_parse(&d, (unsigned char *)x, 256, 2, 1) == 0, "depth 128 rejected");
    memset(x, '[', 129);
    memset(x + 129, ']', 129);
    CHECK(json_parse(&d, (unsigned char *)x, 258, 2, 1) < 0, "depth 129 accepted");
    free(x);
    xfree(d.t);
    PASS();
}

/* Every allocation in a message round trip made to fail in turn: no crash, no leak. */
/* json_scan_str's inline step (one 16-byte look for the closing quote) against the full scan
 * from the opening quote: every string length 0-40, each with one special byte (quote,
 * escape, bad escape, control, valid and invalid UTF-8) at every position, cut at every
 * length, with and without UTF-8 validation: same verdict, same end, same escape flag. */
static void t_json_scan_fast(void)
{
    const char *test_name = "json_scan_str_inline_step_matches_full_scan";
    static const char *specials[] = {"\"", "\\n", "\\x", "\\u00e9", "\x01", "\xc3\xa9", "\xff", "\xe2\x82"};
    unsigned char s[64];
    long cases = 0;
    for (size_t len = 0; len <= 40; len++)
        for (size_t sp = 0; sp < sizeof specials / sizeof *specials; sp++)
            for (size_t at = 0; at <= len; at++) {
                size_t k = 0, sl = strlen(specials[sp]);
                s[k++] = '"';
                for (size_t j = 0; j < len; j++) {
                    if (j == at && k + sl < sizeof s) memcpy(s + k, specials[sp], sl), k += sl;
                    s[k++] = 'a';
                }
                if (k < sizeof s) s[k++] = '"';
                for (size_t n = 1; n <= k; n++)
                    for (int u = 0; u <= 1; u++) {
                        size_t p1 = 0, p2 = 0;
                        int e1 = -1, e2 = -1;
                        int r1 = json_scan_str(s, n, &p1, u, &e1);
                        int r2 = json_scan_str_from(s, n, &p2, 1, u, &e2);
                        CHECK(r1 == r2 && (r1 < 0 || (p1 == p2 && e1 == e2)),
                              "len %zu special %zu at %zu n %zu utf8 %d: %d/%zu/%d vs %d/%zu/%d",
                              len, sp, at, n, u, r1, p1, e1, r2, p2, e2);
                        cases++;
                    }
            }
    CHECK(cases > 10000, "only %ld cases", cases);
    PASS();
}

/* json_put_str's eight-byte skip against a byte-at-a-time escaper: every length 0-40 with each
 * byte that needs an escape (and bytes that do not: 0x1F/0x20 edges, 0x7F, 0x80, 0xFF) at
 * every position, and the word-test's false positives (0x21 next to a borrow, 0x5D..). */
static void t_json_put_words(void)
{
    const char *test_name = "json_put_str_word_skip_matches_byte_escaper";
    static const unsigned char odd[] = {'"', '\\', 0, 1, '\n', 0x1F, 0x20, 0x21, 0x5B, 0x5D, 0x7F, 0x80, 0xFF};
    char s[48];
    struct buf b = {0}, r = {0};
    for (size_t len = 0; len <= 40; len++)
        for (size_t o = 0; o < sizeof odd; o++)
            for (size_t at = 0; at < len || (at == 0 && len == 0); at++) {
                for (size_t j = 0; j < len; j++) s[j] = (char)(j == at ? odd[o] : 'a' + j % 26);
                buf_reset(&b), buf_reset(&r);
                CHECK(json_put_str(&b, s, len) == 0, "append");
                buf_putc(&r, '"');
                for (size_t j = 0; j < len; j++) {
                    unsigned char c = (unsigned char)s[j];
                    if (c == '"' || c == '\\') buf_putc(&r, '\\'), buf_putc(&r, c);
                    else if (c == '\n') buf_puts(&r, "\\n");
                    else if (c < 0x20) buf_printf(&r, "\\u%04x", c);
                    else buf_putc(&r, c);
                }
                buf_putc(&r, '"');
                CHECK(buf_used(&b) == buf_used(&r) && !memcmp(buf_data(&b), buf_data(&r), buf_used(&r)),
                      "len %zu byte 0x%02x at %zu: %.*s", len, odd[o], at, (int)buf_used(&b), buf_data(&b));
            }
    buf_free(&b), buf_free(&r);
    PASS();
}

static void t_alloc_failures(void)
{
    const char *test_name = "allocation_failure_sweep_json_and_buffers";
    const char *src = "{\"a\":[1,2,{\"b\":\"\\u00e9\"}],\"c\":\"x\"}";
    size_t base = mem_live_bytes;
    for (long k = 0; k < 40; k++) {
        struct jdoc d = {0};
        struct buf b = {0};
        mem_fail_after = k;
        d.max = 4096;
        if (json_parse(&d, (const unsigned char *)src, strlen(src), 10, 1) == 0) {
            char *s = json_strdup(&d, json_get(&d, 0, "c"), NULL);
            xfree(s);
            for (int i = 0; i < 100; i++) buf_puts(&b, "0123456789");
        }
        mem_fail_after = -1;
        xfree(d.t);
        buf_free(&b);
        CHECK(mem_live_bytes == base, "leak after failing allocation %ld", k);
    }
    PASS();
}

/* Large drained blocks are parked and reused (Buffer, bcache), within the limit, and freed
 * when the limit drops to 0 (memory pressure) or by buf_cache_trim. */
static void t_buf_cache(void)
{
    const char *test_name = "buffer_large_block_parked_and_reused";
    size_t big = (size_t)III_BUF_SHRINK + 1, live0 = mem_live_bytes;
    static unsigned char z[1 << 16];
    struct buf a = {0}, b = {0};
    bcache.limit = 4 * (size_t)III_BUF_SHRINK + 4 * 4096;
    for (size_t i = 0; i < big; i += sizeof z)
        buf_append(&a, z, big - i < sizeof z ? big - i : sizeof z);
    CHECK(!a.err && a.cap > III_BUF_SHRINK, "grew to %zu", a.cap);
    unsigned char *blk = a.p;
    size_t cap = a.cap;
    buf_consume(&a, buf_used(&a));
    CHECK(!a.p && !a.cap && bcache.n == 1 && bcache.p[0] == blk, "drained block not parked");
    CHECK(mem_live_bytes == live0 + cap, "parked block not counted as live");
    buf_append(&b, "xy", 2);
    CHECK(buf_reserve(&b, big) == 0 && b.p == blk && b.cap == cap && !bcache.n, "not reused");
    CHECK(buf_used(&b) == 2 && !memcmp(buf_data(&b), "xy", 2), "live bytes lost in the move");
    b.len = b.off + big;
    bcache.limit = 0; /* memory pressure: nothing is parked */
    buf_consume(&b, buf_used(&b));
    CHECK(!bcache.n && !b.p && mem_live_bytes == live0, "parked under pressure");
    bcache.limit = 4 * (size_t)III_BUF_SHRINK + 4 * 4096;
    buf_append(&a, z, 1), buf_reserve(&a, big), buf_consume(&a, buf_used(&a));
    CHECK(bcache.n == 1, "second park");
    buf_cache_trim(0);
    CHECK(!bcache.n && !bcache.bytes && mem_live_bytes == live0, "trim left %d blocks", bcache.n);
    bcache.limit = 0;
    PASS();
}

static void t_registry(void)
{
    const char *test_name = "registry_fingerprint_and_ownership";
    uint64_t fp0 = S.fn_fp;
    size_t n0 = S.fn_n;
    struct conn *c = fake_conn(CK_WORKER);
    c->ns = xstrdup("orders");
    c->ns_state = NS_RESOLVED;
    struct func *f = func_add(c, "orders", 6, "a::b", 4);
    CHECK(f && func_find_c("orders", "a::b") == f && !func_find_c("default", "a::b"),
          "lookup by namespace");
    CHECK(S.fn_fp != fp0 && S.fn_n == n0 + 1, "fingerprint changed");
    func_remove(f);
    CHECK(S.fn_fp == fp0 && S.fn_n == n0, "fingerprint restored");
    CHECK(!c->funcs, "owner list emptied");
    {
        /* the id group (S.fids) is keyed by its head's copy of the id, whichever function made
         * it and whichever goes first: the same id in two namespaces, then as two providers */
        struct conn *c2 = fake_conn(CK_WORKER);
        struct func *f1 = func_add(c, "orders", 6, "a::b", 4);
        struct func *f2 = func_add(c2, "billing", 7, "a::b", 4);
        struct idgroup *g = (struct idgroup *)hm_get(&S.fids, "a::b", 4);
        CHECK(f1 && f2 && g && f1->ig == g && f2->ig == g && g->n == 2 && g->h.key == g->head->id,
              "one group for both namespaces, keyed by its head");
        func_remove(f1); /* the function whose id the group was first keyed by */
        g = (struct idgroup *)hm_get(&S.fids, "a::b", 4);
        CHECK(g && g->n == 1 && g->head == f2 && g->h.key == f2->id,
              "key moved to the remaining head");
        struct func *r = func_add_replica(f2, c);
        CHECK(r && r->ig == g && g->n == 1, "a replica joins no group");
        func_remove(f2); /* the primary: its replica takes its place, in S.funcs and the group */
        g = (struct idgroup *)hm_get(&S.fids, "a::b", 4);
        CHECK(g && g->n == 1 && g->head == r && g->h.key == r->id &&
                  func_find_c("billing", "a::b") == r,
              "key moved to the replica that took the primary's place");
        func_remove(r);
        CHECK(!hm_get(&S.fids, "a::b", 4) && S.fn_n == n0, "group freed with its last function");
        fake_free(c2);
    }
    xfree(c->ns);
    fake_free(c);
    PASS();
}

/* SipHash (the hash maps' keyed hash and the fallback random stream): the 2-4 variant against
 * the paper's test vector (key 00..0f, message 00..0e), which checks the round function, the
 * little-endian word assembly and the length padding that 1-3 shares; then the properties the
 * engine relies on: the key changes the hash, and equal keys hash equally. */
static void t_siphash(void)
{
    const char *test_name = "siphash_vectors_and_keying";
    unsigned char m[15];
    for (int i = 0; i < 15; i++) m[i] = (unsigned char)i;
    uint64_t k0 = UINT64_C(0x0706050403020100), k1 = UINT64_C(0x0f0e0d0c0b0a0908);
    CHECK(siphash(k0, k1, m, 15, 2, 4) == UINT64_C(0xa129ca6149be45e5), "SipHash-2-4 vector");
    CHECK(siphash(k0, k1, "", 0, 2, 4) == UINT64_C(0x726fdb47dd0e0e31), "SipHash-2-4 empty");
    CHECK(siphash13(1, 2, "abc", 3) == siphash13(1, 2, "abc", 3), "deterministic");
    CHECK(siphash13(1, 2, "abc", 3) != siphash13(1, 3, "abc", 3), "keyed");
    {
        /* the word load and the tail switch against a byte-at-a-time reference, every length */
        unsigned char big[70];
        for (int i = 0; i < 70; i++) big[i] = (unsigned char)(i * 37 + 11);
        for (size_t l = 0; l <= 70; l++)
            for (int v = 0; v < 2; v++) {
                int c = v ? 2 : 1, dr = v ? 4 : 3;
                uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575), v1 = k1 ^ UINT64_C(0x646f72616e646f6d);
                uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261), v3 = k1 ^ UINT64_C(0x7465646279746573);
                size_t i = 0;
                for (; i <= l; i += 8) { /* the last word carries the length byte */
                    uint64_t w = 0;
                    for (int k = 7; k >= 0; k--)
                        w = w << 8 | (i + (size_t)k < l ? big[i + (size_t)k] : k == 7 ? (uint64_t)(l & 255) : 0);
                    v3 ^= w;
                    for (int r = 0; r < c; r++) SIP_ROUND(v0, v1, v2, v3);
                    v0 ^= w;
                }
                v2 ^= 0xff;
                for (int r = 0; r < dr; r++) SIP_ROUND(v0, v1, v2, v3);
                CHECK(siphash(k0, k1, big, l, c, dr) == (v0 ^ v1 ^ v2 ^ v3), "siphash-%d-%d len %zu", c, dr, l);
            }
        CHECK(siphash13(k0, k1, big, 70) == siphash(k0, k1, big, 70, 1, 3), "siphash13");
    }
    hm_k0 = 1, hm_k1 = 2;
    uint32_t a = hm_hash("default\0x", 9);
    hm_k0 = 3;
    CHECK(a != hm_hash("default\0x", 9), "map hash depends on the per-process key");
    hm_k0 = hm_k1 = 0;
    PASS();
}

/* The string scanner (json_scan_str) against what it must find, for one byte of each class put
 * at every position of strings of every length up to 200 (so each lands in the 64-byte step, the
 * 16-byte step, the word step and the byte tail), validating (binary input) or not (text input
 * already validated): '"' ends the string there, a control or a bad escape fails it, a
 * non-ASCII byte fails only the validating scan (a lone byte is never valid UTF-8), and a valid
 * two-byte sequence passes both. */
static void t_json_scan(void)
{
    const char *test_name = "json_string_scan_every_position";
    static const unsigned char cls[] = {0x00, 0x01, 0x1f, 0x20, 0x21, '"',  0x23, '\\',
                                        0x5b, 0x5d, 0x7f, 0x80, 0xa1, 0xc3, 0xdd, 0xff};
    unsigned char s[260];
    for (size_t len = 0; len <= 200; len++)
        for (size_t at = 0; at < len; at++)
            for (size_t k = 0; k <= sizeof cls; k++)
                for (int cu = 0; cu < 2; cu++) {
                    /* s = '"' + len filler bytes (one of them replaced) + '"' */
                    s[0] = '"';
                    /* filler: capitals, none of them an escape letter */
                    for (size_t j = 0; j < len; j++) s[1 + j] = (unsigned char)('A' + j % 26);
                    s[1 + len] = '"';
                    size_t n = len + 2, end = len + 2;
                    int want = 0;
                    if (k == sizeof cls) { /* a valid two-byte sequence (needs two bytes) */
                        if (at + 1 >= len) continue;
                        s[1 + at] = 0xc3, s[2 + at] = 0xa9;
                    } else {
                        unsigned char b = cls[k];
                        s[1 + at] = b;
                        if (b == '"') end = at + 2;
                        else if (b < 0x20 || b == '\\' || (b >= 0x80 && cu)) want = -1;
                    }
                    size_t pos = 0;
                    int esc = -1, rc = json_scan_str(s, n, &pos, cu, &esc);
                    CHECK(rc == want && (rc < 0 || (pos == end && esc == 0)),
                          "len %zu, byte %zu of class %zu, check_utf8 %d: rc %d pos %zu (want %d %zu)",
                          len, at, k, cu, rc, pos, want, end);
                }
    PASS();
}

/* Reads what the socket has into b (non-blocking); 1 when nothing more came. */
static int drain_into(int fd, struct buf *b)
{
    unsigned char tmp[8192];
    ssize_t r = read(fd, tmp, sizeof tmp);
    if (r > 0) buf_append(b, tmp, (size_t)r);
    return r <= 0;
}

/* Large payloads written from where they lie (conn_put_big): whatever the socket takes at once
 * and what is queued after it make exactly the frames the copying path builds, in order, also
 * when the socket takes only part of the frame (a small send buffer); a frame queued behind
 * pending output, a connection with no socket, and a payload over the outbound cap take the
 * copying path (the last one drops the connection as a slow reader, writing nothing). */
static void t_splice(void)
{
    const char *test_name = "large_payload_written_from_the_input";
    int ep0 = S.ep, ll0 = log_level, sv[2];
    S.ep = -1, log_level = -1; /* (the slow reader's warning) */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    size_t n = 3 * (size_t)III_SPLICE_MIN + 7;
    unsigned char *pay = malloc(n);
    CHECK(pay, "malloc");
    pay[0] = '"', pay[n - 1] = '"';
    for (size_t i = 1; i + 1 < n; i++) pay[i] = (unsigned char)('a' + i % 23);
    const char *id = "0f0e0d0c-0b0a-4908-8706-050403020100";
    /* the frames the copying path makes: one with the payload, then a small one */
    struct buf want = {0}, got = {0};
    size_t f1 = 0;
    for (int k = 0; k < 3; k++) {
        if (k == 1) f1 = buf_used(&want);
        size_t at = ws_begin(&want, 100 + n, 0);
        buf_puts(&want, "{\"type\":\"invocationresult\",\"invocation_id\":");
        json_put_str(&want, id, 36);
        buf_puts(&want, ",\"function_id\":\"f\"");
        if (k < 2) buf_puts(&want, ",\"result\":"), buf_append(&want, pay, n);
        buf_putc(&want, '}');
        ws_end(&want, at, WS_TEXT, 0);
    }
    struct conn *c = conn_new(sv[0], "127.0.0.1");
    CHECK(c, "conn_new");
    c->kind = CK_WORKER, c->ws = 1;
    /* spliced (c->out empty), then queued behind its unwritten rest, then a small one */
    rt_send_result(c, id, 36, "\"f\"", 3, pay, n, NULL, 0, "", 0);
    CHECK(!c->dead && !wsplice.b, "first frame");
    CHECK(buf_used(&c->out) > 0 && buf_used(&c->out) < f1, "nothing written at once");
    rt_send_result(c, id, 36, "\"f\"", 3, pay, n, NULL, 0, "", 0);
    rt_send_result(c, id, 36, "\"f\"", 3, NULL, 0, NULL, 0, "", 0);
    CHECK(!c->dead && !wsplice.b, "later frames");
    for (int spins = 0; spins < 100000 && (buf_used(&c->out) || !drain_into(sv[1], &got)); spins++) {
        conn_flush(c);
        drain_into(sv[1], &got);
    }
    CHECK(buf_used(&got) == buf_used(&want) && !memcmp(buf_data(&got), buf_data(&want), buf_used(&got)),
          "stream differs: %zu bytes, want %zu", buf_used(&got), buf_used(&want));
    /* no socket: the whole frame is queued */
    struct conn *x = conn_new(-1, "127.0.0.1");
    CHECK(x, "conn_new");
    x->kind = CK_WORKER, x->ws = 1;
    rt_send_result(x, id, 36, "\"f\"", 3, pay, n, NULL, 0, "", 0);
    CHECK(!x->dead && buf_used(&x->out) == f1 && !memcmp(buf_data(&x->out), buf_data(&want), f1),
          "queued frame differs");
    /* over the cap: refused as before, and nothing written */
    buf_reset(&got);
    c->out.lim = n / 2;
    rt_send_result(c, id, 36, "\"f\"", 3, pay, n, NULL, 0, "", 0);
    CHECK(c->dead && !wsplice.b && buf_used(&c->out) == 0, "payload over the cap not refused");
    drain_into(sv[1], &got);
    CHECK(!buf_used(&got), "%zu bytes written past the cap", buf_used(&got));
    S.dirty = NULL, S.reap = NULL, S.reap_now = 0;
    conn_free(c), conn_free(x);
    close(sv[1]);
    buf_free(&want), buf_free(&got), free(pay);
    S.ep = ep0, log_level = ll0;
    PASS();
}

/* A large frame arriving in parts (loop_read): when its first part moves out of the shared read
 * buffer, the connection's buffer gets room for the whole frame, so the parts that follow are
 * read in place, neither allocating nor moving it, and the message arrives whole; a partial
 * frame smaller than one read step keeps only its own bytes. */
static void t_read_keep(void)
{
    const char *test_name = "large_frame_moved_out_of_the_shared_buffer_once";
    int ep0 = S.ep, sv[2];
    S.ep = -1;
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    struct conn *c = conn_new(sv[0], "127.0.0.1");
    CHECK(c, "conn_new");
    c->kind = CK_OTEL, c->ws = 1; /* a sink: counts the messages it is given */
    /* just under 1 MiB: a block sized to the frame alone would have to grow for the last read
     * step (loop_read wants III_READ_CHUNK of room before each read) */
    size_t n = ((size_t)1 << 20) - 1000;
    unsigned char *pay = malloc(n);
    CHECK(pay, "malloc");
    for (size_t i = 0; i < n; i++) pay[i] = (unsigned char)i;
    struct buf f = {0};
    CHECK(ws_frame(&f, WS_BIN, pay, n, 1) == 0, "frame");
    int big = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    /* the first part, 2 read steps, is read into the shared buffer (c->in is empty) and its
     * partial frame moves out; the rest comes half a read step at a time, read after each */
    size_t sent = 0, moved = 0, allocs0 = 0;
    unsigned char *p0 = NULL;
    for (int turn = 0; turn < 100000 && sent < f.len; turn++) {
        size_t step = turn ? III_READ_CHUNK / 2 : 2 * (size_t)III_READ_CHUNK;
        ssize_t w = write(sv[1], f.p + sent, f.len - sent < step ? f.len - sent : step);
        if (w > 0) sent += (size_t)w;
        loop_read(c);
        CHECK(!c->dead, "connection dropped");
        if (c->otel_frames) break;
        if (!p0) {
            CHECK(buf_used(&c->in) >= III_READ_CHUNK && c->in.cap >= f.len,
                  "the first %zu bytes moved out with room for %zu, not the frame's %zu",
                  buf_used(&c->in), c->in.cap, f.len);
            p0 = c->in.p, allocs0 = mem_allocs_total;
        } else if (c->in.p != p0) {
            moved++;
        }
    }
    size_t allocs = mem_allocs_total - allocs0;
    for (int turn = 0; turn < 100 && c->otel_frames == 0; turn++) loop_read(c);
    CHECK(sent == f.len && c->otel_frames == 1, "the message arrived (%u)", (unsigned)c->otel_frames);
    CHECK(!moved && !allocs, "the buffer moved %zu times, %zu allocations while the rest arrived",
          moved, allocs);
    /* the small case: a header and a few bytes keep only their own room */
    CHECK(!buf_used(&c->in) && write(sv[1], f.p, 20) == 20, "write");
    loop_read(c);
    CHECK(!c->dead && buf_used(&c->in) == 20 && c->in.cap < III_READ_CHUNK,
          "a 20-byte partial frame kept %zu bytes of room", c->in.cap);
    /* input held unparsed (a connection waiting for the auth function): its header was never
     * checked, so it gets only its own bytes, whatever size it declares */
    buf_free(&c->in);
    c->auth_wait = 1;
    size_t held = III_AUTH_HOLD_BYTES < III_READ_CHUNK ? III_READ_CHUNK : III_AUTH_HOLD_BYTES;
    CHECK(write(sv[1], f.p, held) == (ssize_t)held, "write");
    loop_read(c);
    CHECK(buf_used(&c->in) == held && c->in.cap < 2 * held,
          "%zu held bytes given %zu bytes of room", buf_used(&c->in), c->in.cap);
    c->auth_wait = 0;
    free(pay), buf_free(&f);
    conn_free(c);
    close(sv[1]);
    S.ep = ep0;
    PASS();
}

/* The NATS socket in the epoll set (ep_nats) and its eager write (nats_flush): its interest
 * follows the poll bits asked for, with events tagged ep_tag_nats; nats_close takes it out
 * before closing, so a later descriptor with the same number is not mistaken for it; what
 * CL.out holds is written at once when connected, and not while the connect is in progress. */
static void t_nats_epoll(void)
{
    const char *test_name = "nats_socket_in_the_epoll_set";
#ifdef III_EPOLL
    int ep0 = S.ep, sig0 = ep_sig, sv[2], st0 = CL.state;
    S.ep = epoll_create1(EPOLL_CLOEXEC), ep_sig = 1;
    CHECK(S.ep >= 0 && socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "epoll, socketpair");
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    CL.fd = sv[0], CL.state = NATS_CONNECTING;
    buf_puts(&CL.out, "PING\r\n");
    nats_flush();
    CHECK(buf_used(&CL.out) == 6, "written while connecting");
    CL.state = NATS_READY;
    nats_flush();
    char got[16] = {0};
    CHECK(!buf_used(&CL.out) && read(sv[1], got, sizeof got) == 6 && !memcmp(got, "PING\r\n", 6),
          "not written at once when connected (%zu left)", buf_used(&CL.out));
    struct epoll_event ev[4];
    CHECK(ep_nats(POLLIN) == 0 && CL.ep_ev == EPOLLIN, "registered");
    CHECK(epoll_wait(S.ep, ev, 4, 0) == 0, "an event with nothing to read");
    CHECK(write(sv[1], "PONG\r\n", 6) == 6, "write");
    CHECK(epoll_wait(S.ep, ev, 4, 0) == 1 && ev[0].data.ptr == &ep_tag_nats &&
              ev[0].events == EPOLLIN, "no tagged EPOLLIN");
    CHECK(ep_nats(POLLIN | POLLOUT) == 0 && epoll_wait(S.ep, ev, 4, 0) == 1 &&
              ev[0].events == (EPOLLIN | EPOLLOUT), "POLLOUT not added");
    /* closed: out of the set, even while another descriptor (a dup, as a forked child would
     * hold) keeps the socket itself open, which a bare close() would leave registered */
    int dupfd = dup(sv[0]);
    CHECK(dupfd >= 0, "dup");
    nats_close();
    CHECK(CL.fd == -1 && CL.ep_ev == 0, "close");
    CHECK(write(sv[1], "x", 1) == 1 && epoll_wait(S.ep, ev, 4, 0) == 0,
          "an event for the closed socket (through its dup)");
    /* an epoll_ctl that fails: poll() watches the socket from then on, without retrying */
    CL.fd = dupfd, CL.state = NATS_READY;
    int ep = S.ep, pp[2];
    CHECK(pipe(pp) == 0, "pipe");
    S.ep = pp[0]; /* not an epoll descriptor: epoll_ctl fails */
    CHECK(ep_nats(POLLIN) == -1 && CL.ep_bad && !CL.ep_ev, "a failed registration not reported");
    S.ep = ep;
    CHECK(ep_nats(POLLIN) == -1 && !CL.ep_ev, "retried after a failure");
    nats_close();
    CHECK(!CL.ep_bad && ep_nats(0) == 0, "the failure outlived its socket");
    close(pp[0]), close(pp[1]), close(sv[1]), close(S.ep);
    buf_free(&CL.in), buf_free(&CL.out);
    S.ep = ep0, ep_sig = sig0, CL.state = st0;
#endif
    PASS();
}

/* Output blocks (opark): a connection whose output has all been written holds no block; the
 * next output takes the parked one back without malloc; a block over III_OUT_PARK_MAX stays
 * with its connection; a first block the parked one is too small for comes from malloc; with
 * parking off (bcache.limit 0, memory pressure) or with the stack full a drained block is
 * freed; each kind of parked block (small output, large) is freed after
 * III_BUF_CACHE_MS without a park or a take of its own kind. */
static void t_out_park(void)
{
    const char *test_name = "idle_connection_holds_no_output_block";
    int ep0 = S.ep, sv[2];
    size_t lim0 = bcache.limit, live0 = mem_live_bytes;
    S.ep = -1, bcache.limit = III_BUF_CACHE;
    buf_cache_trim(0), buf_out_trim();
    live0 = mem_live_bytes;
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    struct conn *c = conn_new(sv[0], "127.0.0.1");
    CHECK(c && c->out.park, "conn_new");
    c->kind = CK_WORKER, c->ws = 1;
    static unsigned char big[8192], got[16384];
    conn_frame(c, WS_TEXT, "hello", 5);
    unsigned char *blk = c->out.p;
    CHECK(blk && c->out.cap <= III_OUT_PARK_MAX, "a small first block (%zu)", c->out.cap);
    conn_flush(c);
    CHECK(!c->out.p && !c->out.cap && opark.n == 1 && opark.p[0] == blk, "drained: not parked");
    CHECK(read(sv[1], got, sizeof got) == 7 && !memcmp(got + 2, "hello", 5), "frame 1 on the wire");
    size_t a0 = mem_allocs_total;
    conn_frame(c, WS_TEXT, "again", 5);
    CHECK(c->out.p == blk && !opark.n && mem_allocs_total == a0, "the parked block not taken back");
    conn_flush(c);
    CHECK(read(sv[1], got, sizeof got) == 7 && !memcmp(got + 2, "again", 5), "frame 2 on the wire");
    /* a first frame bigger than the parked block: malloc; bigger than the park limit: kept */
    conn_frame(c, WS_BIN, big, sizeof big);
    CHECK(c->out.p != blk && opark.n == 1 && mem_allocs_total == a0 + 1, "the big frame's block");
    conn_flush(c);
    CHECK(c->out.p && c->out.cap > III_OUT_PARK_MAX && opark.n == 1, "a big block left its conn");
    for (int i = 0; i < 100 && read(sv[1], got, sizeof got) > 0; i++) {
    }
    /* parking off: a drained small block goes back to malloc */
    buf_free(&c->out);
    bcache.limit = 0;
    conn_frame(c, WS_TEXT, "three", 5);
    CHECK(c->out.p == blk && !opark.n, "the parked block not taken");
    conn_flush(c);
    CHECK(!c->out.p && !opark.n, "parked with parking off");
    /* the stack full: a drained block is freed */
    bcache.limit = III_BUF_CACHE;
    for (int i = 0; i < III_OUT_PARK_N; i++) {
        struct buf t = {0};
        buf_puts(&t, "t"); /* (its own block: park set only after, or it would take one) */
        buf_consume(&t, 1);
        t.park = 1;
        buf_out_park(&t);
    }
    CHECK(opark.n == III_OUT_PARK_N, "filling the stack");
    conn_frame(c, WS_BIN, big, 1000); /* (bigger than the parked blocks: malloc'd) */
    unsigned char *own = c->out.p;
    CHECK(own && c->out.cap <= III_OUT_PARK_MAX && opark.n == III_OUT_PARK_N, "a block of its own");
    conn_flush(c);
    CHECK(!c->out.p && opark.n == III_OUT_PARK_N, "kept, or parked on a full stack");
    buf_out_trim();
    S.dirty = NULL, S.reap = NULL, S.reap_now = 0;
    conn_free(c);
    close(sv[1]);
    struct buf o = {0};
    o.park = 1;
    buf_puts(&o, "x");
    buf_out_park(&o);
    CHECK(o.p && !opark.n, "parked with a byte unwritten");
    buf_consume(&o, 1);
    buf_out_park(&o);
    CHECK(!o.p && opark.n == 1, "park");
    /* each kind of parked block is freed after III_BUF_CACHE_MS without its own use: steady
     * small output does not keep a large block parked, nor the reverse */
    struct buf L = {0};
    static unsigned char z[4096];
    for (size_t i = 0; i <= III_BUF_SHRINK; i += sizeof z) buf_append(&L, z, sizeof z);
    buf_consume(&L, buf_used(&L)); /* drained above III_BUF_SHRINK: parked in bcache */
    CHECK(bcache.n == 1 && opark.n == 1, "both kinds parked (%d, %d)", bcache.n, opark.n);
    int64_t t0 = 1000000, nx;
    for (int64_t t = t0; t <= t0 + 2 * III_BUF_CACHE_MS; t += 100) {
        nx = INT64_MAX;
        buf_puts(&o, "y"), buf_consume(&o, 1), buf_out_park(&o); /* small output goes on */
        buf_cache_tick(t, &nx);
    }
    CHECK(!bcache.n && opark.n == 1, "the large block kept by small traffic (%d, %d)", bcache.n,
          opark.n);
    for (int64_t t = t0 + 2 * III_BUF_CACHE_MS; t <= t0 + 4 * III_BUF_CACHE_MS; t += 100) {
        nx = INT64_MAX;
        buf_cache_tick(t, &nx);
    }
    CHECK(!opark.n && mem_live_bytes == live0, "the unused stack kept %d blocks, %zd bytes",
          opark.n, (ssize_t)(mem_live_bytes - live0));
    S.ep = ep0, bcache.limit = lim0;
    PASS();
}

static uint64_t rng_state = 1;
static uint64_t test_rand(void)
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return rng_state;
}

/* The clean-block note made while unmasking (ws_unmask_msg): the same bytes and ASCII verdict as
 * ws_unmask, every bit right (set exactly when its 64-byte block holds '"', '\\' or a control),
 * and the string scan over a noted text ends exactly where it ends without the note, for
 * strings with escapes, quotes, controls and non-ASCII bytes at random places, validating or
 * not, message lengths around the block and word boundaries. */
static void t_scan_note(void)
{
    const char *test_name = "unmask_note_and_noted_string_scan";
#ifdef III_SSE2
    struct conn w;
    memset(&w, 0, sizeof w);
    w.kind = CK_WORKER;
    static const size_t lens[] = {III_SCAN_NOTE_MIN, III_SCAN_NOTE_MIN + 1, III_SCAN_NOTE_MIN + 63,
                                  4096 + 64 * 64, 4096 + 64 * 64 + 17, 70001, 131072};
    size_t cap = 131072 + 64;
    unsigned char *a = malloc(cap), *m0 = malloc(cap + 64), *r = malloc(cap), *m;
    CHECK(a && m0 && r, "malloc");
    const unsigned char key[4] = {0x5a, 0xc3, 0x01, 0x80};
    rng_state = 12345;
#ifdef III_AVX2
    /* both loops: SSE2, then AVX2 where the CPU has it */
    int has_avx2 = __builtin_cpu_supports("avx2") != 0;
    /* the engine's own CPUID/XGETBV probe agrees with the compiler's (libgcc's) */
    CHECK(ws_cpu_avx2() == has_avx2, "ws_cpu_avx2 %d, __builtin_cpu_supports %d", ws_cpu_avx2(),
          has_avx2);
    for (int simd = 0; simd <= has_avx2; simd++) {
        ws_avx2 = simd;
#endif
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++)
        for (int round = 0; round < 40; round++) {
            size_t n = lens[li];
            /* a JSON string spanning the text: filler, a few special bytes at random places */
            a[0] = '"';
            for (size_t i = 1; i < n; i++) a[i] = (unsigned char)('A' + i % 26);
            a[n - 1] = '"';
            int kinds = round % 5; /* 0: clean, 1: escapes, 2: an early quote, 3: a control, 4: UTF-8 */
            for (int e = 0; e < 1 + round % 4 && kinds; e++) {
                size_t at = 1 + (size_t)(test_rand() % (n - 4));
                if (kinds == 1) a[at] = '\\', a[at + 1] = 'n';
                else if (kinds == 2) a[at] = '"';
                else if (kinds == 3) a[at] = 0x09;
                else a[at] = 0xc3, a[at + 1] = 0xa9;
            }
            m = m0 + (size_t)(round * 7 + (int)li) % 64; /* every alignment of the blocks */
            for (size_t i = 0; i < n; i++) m[i] = a[i] ^ key[i & 3];
            memcpy(r, m, n);
            int noted = 0, asc = ws_unmask_msg(&w, WS_TEXT, 1, m, n, key, &noted);
            int asc_ref = ws_unmask(r, n, key);
            CHECK(noted && !memcmp(m, a, n) && !memcmp(r, a, n) && asc == asc_ref,
                  "len %zu round %d: unmask differs (ascii %d vs %d)", n, round, asc, asc_ref);
            for (size_t b = 0; b < jnote.nb; b++) {
                int sp = 0;
                for (size_t i = jnote.h + 64 * b; i < jnote.h + 64 * b + 64; i++)
                    sp |= a[i] == '"' || a[i] == '\\' || a[i] < 0x20;
                CHECK(sp == (int)(jnote.bits[b / 64] >> (b % 64) & 1), "len %zu round %d: bit %zu", n, round, b);
            }
            for (int cu = 0; cu < 2; cu++) {
                size_t p0 = 0, p1 = 0;
                int e0, e1;
                jnote.s = NULL;
                int rc0 = json_scan_str(m, n, &p0, cu, &e0);
                jnote.s = m, jnote.n = n;
                int rc1 = json_scan_str(m, n, &p1, cu, &e1);
                jnote.s = NULL;
                CHECK(rc0 == rc1 && (rc0 < 0 || (p0 == p1 && e0 == e1)),
                      "len %zu round %d check_utf8 %d: %d/%zu with the note, %d/%zu without", n,
                      round, cu, rc1, p1, rc0, p0);
            }
        }
#ifdef III_AVX2
    }
    ws_avx2 = -1;
#endif
    free(a), free(m0), free(r);
#endif
    PASS();
}

int main(int argc, char **argv)
{
    cfg_defaults(&S.cfg);
    settings_from_cfg();
    t_sha1();
    t_siphash();
    t_base64();
    t_handshake();
    t_utf8();
    t_frames();
    t_frame_violations();
    t_json_api();
    t_json_scan_fast();
    t_json_put_words();
    t_json_scan();
    t_scan_note();
    t_json_suite(argc > 1 ? argv[1] : NULL);
    t_alloc_failures();
    t_buf_cache();
    t_splice();
    t_read_keep();
    t_nats_epoll();
    t_out_park();
    t_registry();
    return failed ? 1 : 0;
}
