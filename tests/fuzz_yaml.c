/* fuzz_yaml.c - fuzz target for the YAML reader, ${VAR} expansion and the config model.
 *
 * libFuzzer:  clang -g -O1 -fsanitize=fuzzer,address,undefined tests/fuzz_yaml.c -o /tmp/fy
 *             /tmp/fy -max_total_time=60 -dict=tests/fuzz_yaml.dict
 * Without it: cc -g -fsanitize=address,undefined -DFUZZ_STANDALONE tests/fuzz_yaml.c -o /tmp/fy
 *             /tmp/fy SECONDS   (random mutations of built-in seeds)
 *
 * Beyond "no crash, no leak" it checks properties: a parsed tree equals itself, and its
 * canonical JSON reads back (JSON is YAML) to the same canonical JSON.
 */
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"
#include <time.h>

static void fz_check(int cond, const char *what, const uint8_t *d, size_t n)
{
    if (cond) return;
    fprintf(stderr, "property failed: %s\ninput (%lu bytes): %.*s\n", what, (unsigned long)n,
            (int)n, (const char *)d);
    abort();
}

/* 1 when JSON text holds a character YAML refuses raw (C1 controls, U+FFFE, U+FFFF): valid
 * JSON, which a YAML escape can produce, but not readable back as YAML. */
static int fz_unreadable(const unsigned char *s, size_t n)
{
    size_t i;
    for (i = 0; i + 1 < n; i++) {
        if (s[i] == 0xC2 && s[i + 1] >= 0x80 && s[i + 1] <= 0x9F && s[i + 1] != 0x85) return 1;
        if (i + 2 < n && s[i] == 0xEF && s[i + 1] == 0xBF && s[i + 2] >= 0xBE) return 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    char err[512];
    size_t live = mem_live_bytes;
    struct yaml_node *t = yaml_parse((const char *)d, n, "f.yaml", err, sizeof err);
    struct buf j = {NULL, 0, 0, 0}, j2 = {NULL, 0, 0, 0}, x = {NULL, 0, 0, 0};
    struct cfg c;
    (void)cfg_load; /* reads files: not fuzzed here, cfg_parse is */
    if (t) {
        struct yaml_node *t2;
        fz_check(yaml_equal(t, t), "yaml_equal(t, t)", d, n);
        fz_check(yaml_to_json(t, &j) == 0, "yaml_to_json", d, n);
        if (!fz_unreadable(j.p, j.len)) {
            t2 = yaml_parse((const char *)j.p, j.len, "json", err, sizeof err);
            if (!t2) fprintf(stderr, "json %.*s: %s\n", (int)j.len, (const char *)j.p, err);
            fz_check(t2 != NULL, "canonical JSON parses", d, n);
            fz_check(yaml_to_json(t2, &j2) == 0 && j.len == j2.len && !memcmp(j.p, j2.p, j.len),
                     "JSON round trip", d, n);
            yaml_free(t2);
        }
        yaml_free(t);
    } else {
        fz_check(strncmp(err, "f.yaml:", 7) == 0, "error names the file", d, n);
    }
    buf_free(&j);
    buf_free(&j2);
    (void)cfg_expand((const char *)d, n, &x, err, sizeof err);
    buf_free(&x);
    if (cfg_parse((const char *)d, n, "/f/config.yaml", &c, err, sizeof err) == 0) cfg_free(&c);
    fz_check(mem_live_bytes == live, "no allocation left behind", d, n);
    return 0;
}

#ifdef FUZZ_STANDALONE
static const char *const fz_seeds[] = {
    "a: 1\nb: [1, 2.5, \"x\\u00e9\", {c: d}]\nc:\n  - x\n  - y: 1\n    z: 2\n",
    "workers:\n  - name: iii-worker-manager\n    config: {port: ${P:1}, host: '::'}\n"
    "  - name: m\n    command: [\"node\", \"m.mjs\"]\n    env: {A: 1}\n    cwd: ./w\n",
    "e: |\n  line1\n   line2\nf: >-\n  folded\n  text\n\n  para\ng: ~\nh: true\n",
    "k: \"a\\\n   b\\t\\x41\"\nl: multi\n  line plain\nm: 'it''s'\n",
    "--- {a: [1, {b: c}], 'd': \"e\"}\n...\n",
    "- - a\n  - b\n-\n  c: |+\n    x\n\n- [1,\n  2, ]\n",
    "%YAML 1.2\n---\n# c\nkey:\n- 1\n- 2\nother: x # c\n",
};

/* Random byte edits, insertions of YAML-significant tokens, deletions and splices. */
static size_t fz_mutate(char *b, size_t n, size_t cap)
{
    static const char *const tok[] = {
        "\n",  " ",    "  ",       "- ",   ": ", "#",    "[",  "]",          "{",
        "}",   ",",    "'",        "\"",   "\\", "|",    ">",  "|-",         ">+",
        "---", "...",  "\t",       "&a",   "*a", "!t",   "? ", "${X}",       "${Y:d}",
        "\\u", "\r\n", "\xC3\xA9", "\xFF", "0x", ".inf", "~",  "%YAML 1.2\n"};
    int k, edits = 1 + rand() % 4;
    for (k = 0; k < edits; k++) {
        size_t at = n ? (size_t)rand() % (n + 1) : 0;
        switch (rand() % 4) {
        case 0:
            if (n) b[at % n] = (char)(rand() % 256);
            break;
        case 1: {
            const char *t = tok[rand() % (int)(sizeof tok / sizeof tok[0])];
            size_t tl = strlen(t);
            if (n + tl > cap) break;
            memmove(b + at + tl, b + at, n - at);
            memcpy(b + at, t, tl);
            n += tl;
            break;
        }
        case 2:
            if (at < n) {
                size_t dl = 1 + (size_t)rand() % 8;
                if (dl > n - at) dl = n - at;
                memmove(b + at, b + at + dl, n - at - dl);
                n -= dl;
            }
            break;
        default:
            if (n && n * 2 <= cap) { /* duplicate a slice */
                static char tmp[8192];
                size_t from = (size_t)rand() % n, len = 1 + (size_t)rand() % (n - from);
                memcpy(tmp, b + from, len);
                memmove(b + at + len, b + at, n - at);
                memcpy(b + at, tmp, len);
                n += len;
            }
        }
    }
    return n;
}

int main(int argc, char **argv)
{
    static char b[8192];
    time_t end = time(NULL) + (argc > 1 ? atoi(argv[1]) : 30);
    unsigned long runs = 0;
    srand((unsigned)time(NULL));
    setenv("X", "1", 1);
    while (time(NULL) < end) {
        const char *s = fz_seeds[rand() % (int)(sizeof fz_seeds / sizeof fz_seeds[0])];
        size_t n = strlen(s);
        int m, rounds = 1 + rand() % 16;
        memcpy(b, s, n);
        for (m = 0; m < rounds; m++) {
            n = fz_mutate(b, n, sizeof b);
            LLVMFuzzerTestOneInput((const uint8_t *)b, n);
            runs++;
        }
    }
    printf("fuzz_yaml: %lu runs, no failure\n", runs);
    return 0;
}
#endif
