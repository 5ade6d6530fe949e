/* unit_yaml.c - tests of the YAML subset reader and the config model.
 *
 *   cc -std=c99 -Wall -Wextra -Wpedantic -fsanitize=address,undefined -g tests/unit_yaml.c \
 *      -o /tmp/uy && /tmp/uy
 *
 * Prints `ok - name` / `not ok - name: why` per case; exits 1 if any failed. Every case also
 * checks that it leaves no allocation behind (xmalloc's live-byte count).
 */
#ifndef III_NO_MAIN
#define III_NO_MAIN
#endif
#include "../iii.c"

static int n_pass, n_fail;
static char errbuf[1024];

static void report(int good, const char *name, const char *fmt, ...) III_PRINTF(3, 4);
static void report(int good, const char *name, const char *fmt, ...)
{
    va_list ap;
    if (good) {
        printf("ok - %s\n", name);
        n_pass++;
        return;
    }
    printf("not ok - %s: ", name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    n_fail++;
}

/* Canonical JSON of a tree as a new C string (caller frees with xfree). */
static char *to_json(const struct yaml_node *n)
{
    struct buf b = {NULL, 0, 0, 0};
    char *s;
    if (yaml_to_json(n, &b) < 0 || buf_putc(&b, 0) < 0) {
        buf_free(&b);
        return NULL;
    }
    s = xstrdup((char *)b.p);
    buf_free(&b);
    return s;
}

/* Parses text[0..len) and expects its canonical JSON; also checks the JSON round trip (JSON
 * is YAML: reading it back must give the same canonical JSON) and yaml_equal(x, x). */
static void yjn(const char *name, const char *text, size_t len, const char *want)
{
    size_t live = mem_live_bytes;
    struct yaml_node *n = yaml_parse(text, len, "t.yaml", errbuf, sizeof errbuf), *n2;
    char *got, *again;
    if (!n) {
        report(0, name, "parse failed: %s", errbuf);
        return;
    }
    got = to_json(n);
    if (!got || strcmp(got, want)) {
        report(0, name, "got %s, want %s", got ? got : "(oom)", want);
    } else if (!(n2 = yaml_parse(got, strlen(got), "rt", errbuf, sizeof errbuf))) {
        report(0, name, "round trip failed: %s", errbuf);
    } else {
        again = to_json(n2);
        report(again && !strcmp(again, got) && yaml_equal(n, n), name, "round trip gave %s",
               again ? again : "(oom)");
        xfree(again);
        yaml_free(n2);
    }
    xfree(got);
    yaml_free(n);
    if (mem_live_bytes != live)
        report(0, name, "leaked %lu bytes", (unsigned long)(mem_live_bytes - live));
}

static void yj(const char *name, const char *text, const char *want)
{
    yjn(name, text, strlen(text), want);
}

/* Expects text to be refused with exactly "t.yaml:" + want. */
static void yen(const char *name, const char *text, size_t len, const char *want)
{
    size_t live = mem_live_bytes;
    char full[600];
    struct yaml_node *n = yaml_parse(text, len, "t.yaml", errbuf, sizeof errbuf);
    snprintf(full, sizeof full, "t.yaml:%s", want);
    if (n) {
        char *j = to_json(n);
        report(0, name, "parsed as %s, want error %s", j ? j : "?", full);
        xfree(j);
        yaml_free(n);
    } else {
        report(!strcmp(errbuf, full), name, "got error \"%s\", want \"%s\"", errbuf, full);
    }
    if (mem_live_bytes != live)
        report(0, name, "leaked %lu bytes", (unsigned long)(mem_live_bytes - live));
}

static void ye(const char *name, const char *text, const char *want)
{
    yen(name, text, strlen(text), want);
}

/* ---- valid documents ------------------------------------------------------------------------ */

static void test_valid(void)
{
    static const char bom[] = "\xEF\xBB\xBF"
                              "a: 1\n";
    yj("empty document", "", "null");
    yj("only comments", "# hello\n\n   # indented\n", "null");
    yj("only ---", "---\n", "null");
    yj("--- and ...", "---\n...\n", "null");
    yj("top-level plain scalar", "hello world", "\"hello world\"");
    yj("top-level integer", "42\n", "42");
    yj("core schema types",
       "a: 1\nb: -7\nc: +7\nd: 0o17\ne: 0x1f\nf: 1.5\ng: 1e3\nh: .5\ni: ~\nj: null\nk: Null\n"
       "l: true\nm: False\nn: TRUE\no: yes\np: 0755\nq: 1_000\nr: 1.\ns: -0.0\nt: 0xZ\nu: 0o8\n",
       "{\"a\":1,\"b\":-7,\"c\":7,\"d\":15,\"e\":31,\"f\":1.5,\"g\":1000.0,\"h\":0.5,\"i\":null,"
       "\"j\":null,\"k\":null,\"l\":true,\"m\":false,\"n\":true,\"o\":\"yes\",\"p\":755,"
       "\"q\":\"1_000\",\"r\":1.0,\"s\":-0.0,\"t\":\"0xZ\",\"u\":\"0o8\"}");
    yj("inf and nan become null", "[.inf, -.Inf, +.INF, .nan, .NaN]", "[null,null,null,null,null]");
    yj("int64 limits", "[9223372036854775807, -9223372036854775808]",
       "[9223372036854775807,-9223372036854775808]");
    yj("integer overflow becomes float", "a: 123456789012345678901234567890",
       "{\"a\":1.2345678901234568e+29}");
    yj("shortest float text", "[0.1, 1e-7, 2.5e+300, 3.0]", "[0.1,1e-7,2.5e+300,3.0]");
    yj("strings that look like other things", "['1', \"true\", '~', \"\"]",
       "[\"1\",\"true\",\"~\",\"\"]");
    yj("plain scalars with indicators inside",
       "url: http://x.io:80/a#frag\nt: a:b\nh: a#b\nd: -x\nq: ?y\nc: :z\ns: a, b [c] {d}\n",
       "{\"c\":\":z\",\"d\":\"-x\",\"h\":\"a#b\",\"q\":\"?y\",\"s\":\"a, b [c] {d}\","
       "\"t\":\"a:b\",\"url\":\"http://x.io:80/a#frag\"}");
    yj("single quotes", "a: 'it''s # not a comment'\nb: ''\n",
       "{\"a\":\"it's # not a comment\",\"b\":\"\"}");
    yj("double-quoted escapes",
       "a: \"t\\tn\\nq\\\"b\\\\s\\/x\\x41\\u00e9\\U0001F600\\uD83D\\uDE00\"\n",
       "{\"a\":\"t\\tn\\nq\\\"b\\\\s/xAé😀😀\"}");
    yj("more escapes", "a: \"\\0\\a\\b\\v\\f\\r\\e\\ \\N\\_\\L\\P\\\t.\"",
       "{\"a\":\"\\u0000\\u0007\\b\\u000b\\f\\r\\u001b "
       "\xC2\x85\xC2\xA0\xE2\x80\xA8\xE2\x80\xA9\\t.\"}");
    yj("multi-line double quotes fold", "a: \"one\n  two  \n\n  three\\\n   four\"\n",
       "{\"a\":\"one two\\nthreefour\"}");
    yj("escaped blank before a break is kept", "a: \"x\\t\n  y\"", "{\"a\":\"x\\t y\"}");
    yj("multi-line single quotes fold", "- 'a\n  b\n\n\n  c'\n", "[\"a b\\n\\nc\"]");
    yj("multi-line plain scalar", "a: one\n  two\n\n  three\nb: x\n",
       "{\"a\":\"one two\\nthree\",\"b\":\"x\"}");
    yj("plain continuation may start with -", "a: x\n  - y\n", "{\"a\":\"x - y\"}");
    yj("plain value on the next line", "a:\n  long\n  text\n", "{\"a\":\"long text\"}");
    yj("literal block", "a: |\n  line1\n    indented\n  line3\nb: 1\n",
       "{\"a\":\"line1\\n  indented\\nline3\\n\",\"b\":1}");
    yj("literal strip", "a: |-\n  x\n  y\n\n\nb: 1", "{\"a\":\"x\\ny\",\"b\":1}");
    yj("literal keep", "a: |+\n  x\n\n\nb: 1", "{\"a\":\"x\\n\\n\\n\",\"b\":1}");
    yj("literal clip with trailing empty lines", "a: |\n  x\n\n\n", "{\"a\":\"x\\n\"}");
    yj("literal at end of text without a line break", "a: |\n  x", "{\"a\":\"x\"}");
    yj("empty literal", "a: |\nb: 1\n", "{\"a\":\"\",\"b\":1}");
    yj("literal with leading empty lines", "a: |\n\n  x\n", "{\"a\":\"\\nx\\n\"}");
    yj("literal keeps # and tabs", "a: |\n  # not a comment\n  \tx\n",
       "{\"a\":\"# not a comment\\n\\tx\\n\"}");
    yj("literal indentation indicator", "a: |2\n    x\n  y\n", "{\"a\":\"  x\\ny\\n\"}");
    yj("indicators in either order", "a: |-2\n   x\nb: |2-\n   y\n", "{\"a\":\" x\",\"b\":\" y\"}");
    yj("comment after block indicator", "a: | # note\n  x\n", "{\"a\":\"x\\n\"}");
    yj("folded block", "a: >\n  one\n  two\n\n  three\n    more\n  four\n",
       "{\"a\":\"one two\\nthree\\n  more\\nfour\\n\"}");
    yj("folded strip and keep", "a: >-\n  x\n  y\nb: >+\n  z\n\n",
       "{\"a\":\"x y\",\"b\":\"z\\n\\n\"}");
    yj("block scalar in a sequence", "- |\n  a\n- >\n  b\n  c\n", "[\"a\\n\",\"b c\\n\"]");
    yj("top-level block scalar", "--- |\n  text\n", "\"text\\n\"");
    yj("nested block maps", "a:\n  b:\n    c: 1\n  d: 2\ne: 3\n",
       "{\"a\":{\"b\":{\"c\":1},\"d\":2},\"e\":3}");
    yj("sequence of maps", "workers:\n  - name: a\n    config:\n      x: 1\n  - name: b\n",
       "{\"workers\":[{\"config\":{\"x\":1},\"name\":\"a\"},{\"name\":\"b\"}]}");
    yj("indentless sequence", "a:\n- 1\n- 2\nb:\n- x: 1\n  y: 2\n",
       "{\"a\":[1,2],\"b\":[{\"x\":1,\"y\":2}]}");
    yj("sequence of sequences", "- - a\n  - b\n- - c\n", "[[\"a\",\"b\"],[\"c\"]]");
    yj("compact map with a nested sequence", "- a:\n  - 1\n  b: 2\n", "[{\"a\":[1],\"b\":2}]");
    yj("map in a sequence on the next line", "-\n  a: 1\n-\n- x\n", "[{\"a\":1},null,\"x\"]");
    yj("empty values", "a:\nb: # c\nc: ~\n", "{\"a\":null,\"b\":null,\"c\":null}");
    yj("quoted keys", "\"a b\": 1\n'c:d': 2\n\"\": 3\n", "{\"\":3,\"a b\":1,\"c:d\":2}");
    yj("non-string keys are text", "1: a\ntrue: b\n~: c\n",
       "{\"1\":\"a\",\"true\":\"b\",\"~\":\"c\"}");
    yj("tab after the colon", "a:\tb\n", "{\"a\":\"b\"}");
    yj("trailing spaces are not content", "a: b   \nc: 'd'   \n", "{\"a\":\"b\",\"c\":\"d\"}");
    yj("deeper first indentation", "  a: 1\n  b: 2\n", "{\"a\":1,\"b\":2}");
    yj("flow collections", "a: [1, [2, 3], {b: c, d: [e]}]\nf: {}\ng: []\n",
       "{\"a\":[1,[2,3],{\"b\":\"c\",\"d\":[\"e\"]}],\"f\":{},\"g\":[]}");
    yj("flow over several lines with comments",
       "a: [\n  1,   # one\n  2,\n]\nb: {\n  x: 1,\n  # c\n  y: 2 }\n",
       "{\"a\":[1,2],\"b\":{\"x\":1,\"y\":2}}");
    yj("flow implicit nulls", "{a, b: , c:}", "{\"a\":null,\"b\":null,\"c\":null}");
    yj("flow plain multi-word and url", "[a b, http://x:1/y, -1, 'q']",
       "[\"a b\",\"http://x:1/y\",-1,\"q\"]");
    yj("flow plain key a:1 is one scalar", "{a:1}", "{\"a:1\":null}");
    yj("JSON document", "{\"a\":[1,2.5,\"x\\u00e9\",true,null],\"b\":{\"c\":{}}}",
       "{\"a\":[1,2.5,\"xé\",true,null],\"b\":{\"c\":{}}}");
    yj("top-level flow after ---", "--- [1, 2]\n", "[1,2]");
    yj("top-level scalar after ---", "--- text # c\n", "\"text\"");
    yj("%YAML directive", "%YAML 1.2\n---\na: 1\n", "{\"a\":1}");
    yj("document end marker", "a: 1\n...\n# trailing comment\n", "{\"a\":1}");
    yj("comments everywhere",
       "# head\na: 1 # tail\n# between\nb:   # after key\n  - x # item\n  # inside\n  - y\n",
       "{\"a\":1,\"b\":[\"x\",\"y\"]}");
    yj("CRLF line endings", "a: 1\r\nb:\r\n  - x\r\nc: |\r\n  l1\r\n  l2\r\n",
       "{\"a\":1,\"b\":[\"x\"],\"c\":\"l1\\nl2\\n\"}");
    yj("CR line endings", "a: 1\rb: 2\r", "{\"a\":1,\"b\":2}");
    yj("byte order mark", bom, "{\"a\":1}");
    yj("tab-indented comment line is fine", "a:\n\t# c\n  b: 1\n", "{\"a\":{\"b\":1}}");
    yj("unicode text", "名前: \"値\"\né: ü\n", "{\"é\":\"ü\",\"名前\":\"値\"}");
    yj("20 keys (sorted duplicate check path)",
       "a: 1\nb: 2\nc: 3\nd: 4\ne: 5\nf: 6\ng: 7\nh: 8\ni: 9\nj: 10\nk: 11\nl: 12\nm: 13\n"
       "n: 14\no: 15\np: 16\nq: 17\nr: 18\ns: 19\nt: 20\n",
       "{\"a\":1,\"b\":2,\"c\":3,\"d\":4,\"e\":5,\"f\":6,\"g\":7,\"h\":8,\"i\":9,\"j\":10,"
       "\"k\":11,\"l\":12,\"m\":13,\"n\":14,\"o\":15,\"p\":16,\"q\":17,\"r\":18,\"s\":19,"
       "\"t\":20}");
    yjn("NUL from an escape in a value", "a: \"x\\0y\"", 9, "{\"a\":\"x\\u0000y\"}");
}

/* ---- positions ---------------------------------------------------------------------------- */

static void test_positions(void)
{
    struct yaml_node *n =
        yaml_parse("a: 1\nb:\n  - x\n  - {c: 'd'}\né: z\n", 32, "t.yaml", errbuf, sizeof errbuf);
    const struct yaml_node *b, *x, *m, *d;
    if (!n) {
        report(0, "node positions", "%s", errbuf);
        return;
    }
    b = yaml_get(n, "b");
    x = b ? b->items[0] : NULL;
    m = b ? b->items[1] : NULL;
    d = yaml_get(m, "c");
    report(n->line == 1 && n->col == 1 && b && b->line == 3 && b->col == 3 && x && x->line == 3 &&
               x->col == 5 && m && m->line == 4 && m->col == 5 && d && d->line == 4 &&
               d->col == 9 && n->key_lines[2] == 5 && n->key_cols[2] == 1 && yaml_get(n, "é") &&
               yaml_get(n, "é")->col == 4 && yaml_get(n, "nope") == NULL,
           "node positions", "wrong line/col");
    yaml_free(n);
}

/* ---- refused documents: exact line:col and message --------------------------------------- */

static void test_errors(void)
{
    static char deep[1200], deep_ok[200], block[8000];
    size_t i, k = 0;
    ye("unterminated double quote", "a: 1\nb: 2\nc: x\nkey:   \"abc\n",
       "4:8: unterminated double-quoted scalar");
    ye("unterminated double quote (doc)", "x:\n  y:\n    z: \"abc",
       "3:8: unterminated double-quoted scalar");
    ye("unterminated single quote", "a:\n  b: 'abc\n", "2:6: unterminated single-quoted scalar");
    ye("quoted continuation not indented", "a: \"abc\nb: 1\"\n",
       "1:4: unterminated double-quoted scalar");
    ye("anchor", "a: &x 1", "1:4: anchors (&) are not supported");
    ye("alias", "a: 1\nb: *x\n", "2:4: aliases (*) are not supported");
    ye("tag", "a: !!str 1", "1:4: tags (!) are not supported");
    ye("anchor in flow", "a: [1, &y 2]", "1:8: anchors (&) are not supported");
    ye("%TAG directive", "%TAG ! tag:x\n---\na: 1", "1:1: tags (%TAG) are not supported");
    ye("other directive", "%FOO\n---\n", "1:1: directives other than %YAML are not supported");
    ye("directive without ---", "%YAML 1.2\na: 1\n",
       "2:1: expected `---` after the %YAML directive");
    ye("complex key", "? a\n: b\n", "1:1: complex keys (`? `) are not supported");
    ye("flow key in block", "[a]: b\n",
       "1:4: flow collections cannot be used as mapping keys (complex keys are not supported)");
    ye("flow key in flow", "{[a]: b}",
       "1:2: flow collections cannot be used as mapping keys (complex keys are not supported)");
    ye("second document", "a: 1\n---\nb: 2\n",
       "2:1: multi-document streams are not supported (a second document starts here)");
    ye("second document after ...", "a: 1\n...\n---\nb: 2\n",
       "3:1: multi-document streams are not supported (a second document starts here)");
    ye("content after ...", "a: 1\n...\nb: 2\n",
       "3:1: unexpected content after the document end `...`");
    ye("tab indentation", "a:\n\tb: 1\n",
       "2:1: tab character in indentation (YAML indents with spaces only)");
    ye("tab after spaces", "a:\n  \tb: 1\n",
       "2:3: tab character in indentation (YAML indents with spaces only)");
    ye("duplicate key", "a: 1\nb: 2\na: 3\n",
       "3:1: duplicate key `a` (first defined at line 1, column 1)");
    ye("duplicate key in flow", "{x: 1, y: 2, x: 3}",
       "1:14: duplicate key `x` (first defined at line 1, column 2)");
    ye("duplicate among 20 keys",
       "a: 1\nb: 2\nc: 3\nd: 4\ne: 5\nf: 6\ng: 7\nh: 8\ni: 9\nj: 10\nk: 11\nl: 12\nm: 13\n"
       "n: 14\no: 15\np: 16\nq: 17\ne: 18\ns: 19\nb: 20\n",
       "18:1: duplicate key `e` (first defined at line 5, column 1)");
    ye("duplicate quoted and plain key", "a: 1\n\"a\": 2\n",
       "2:1: duplicate key `a` (first defined at line 1, column 1)");
    ye("nested mapping on the key's line", "a: b: c\n",
       "1:5: a mapping cannot start here (a nested mapping goes on its own line, indented under "
       "its key)");
    ye("sequence on the key's line", "key: - a\n",
       "1:6: a block sequence cannot start on the same line as its key (start it on the next "
       "line)");
    ye("mapping after a sequence", "- a\nb: 1\n",
       "2:1: expected `- ` (the entries of this sequence are at column 1)");
    ye("key after a nested sequence", "a:\n  - x\n  b: 1\n",
       "3:3: expected `- ` (the entries of this sequence are at column 3)");
    ye("sequence entry among keys", "a: 1\n- b\n",
       "2:1: a sequence entry `- ` cannot appear among the keys of a mapping (check the "
       "indentation)");
    ye("bad indentation", "a:\n  b: 1\n c: 2\n",
       "3:2: bad indentation (this line starts at column 2, but the keys of its mapping are at "
       "column 1)");
    ye("over-indented after a value", "a: 'x'\n  b: 1\n",
       "2:3: bad indentation (this line starts at column 3, but the keys of its mapping are at "
       "column 1)");
    ye("top level less indented", "  a: 1\nb: 2\n",
       "2:1: bad indentation (this line starts at column 1, but the document's top level is at "
       "column 3)");
    ye("missing colon", "a: 1\nb\nc: 2\n", "2:1: expected `:` after the key `b`");
    ye("missing colon on its own", "a: 1\nbee # x\n", "2:1: expected `:` after the key `bee`");
    ye("text after a quoted value", "a: 'x'y\n", "1:7: unexpected `y` after a scalar");
    ye("text after a flow value", "a: [1] x\n", "1:8: unexpected `x` after a flow collection");
    ye("comment without a space", "a: 'x'#c\n", "1:7: a comment needs a space before `#`");
    ye("comment without a space in flow", "[1,#c\n]", "1:4: a comment needs a space before `#`");
    ye("unknown escape", "a: \"ab\\qc\"", "1:7: unknown escape `\\q` in a double-quoted scalar");
    ye("short \\u escape", "a: \"\\u12G4\"", "1:5: `\\u` must be followed by 4 hex digits");
    ye("short \\x escape", "a: \"\\x4\"", "1:5: `\\x` must be followed by 2 hex digits");
    ye("unpaired surrogate", "a: \"\\uD800x\"", "1:5: unpaired UTF-16 surrogate `\\uD800`");
    ye("lone low surrogate", "a: \"\\uDC00\"", "1:5: `\\u` escape of an invalid code point");
    ye("\\U beyond unicode", "a: \"\\U00110000\"", "1:5: `\\U` escape of an invalid code point");
    ye("unterminated flow sequence", "a:\n  b: [1, 2,\n  3\n",
       "2:6: unterminated flow sequence (`[` has no matching `]`)");
    ye("unterminated flow mapping", "{a: 1",
       "1:1: unterminated flow mapping (`{` has no matching `}`)");
    ye("flow cut by a document marker", "[1,\n---\n]",
       "1:1: unterminated flow sequence (`[` has no matching `]`)");
    ye("empty flow entry", "[1,,2]",
       "1:4: empty entry in a flow sequence (a `,` with nothing before it)");
    ye("leading comma in flow map", "{, a: 1}",
       "1:2: empty entry in a flow mapping (a `,` with nothing before it)");
    ye("pair inside a flow sequence", "[a: 1]",
       "1:3: `key: value` inside [ ] is not supported (use { } for a mapping, or is a `]` "
       "missing?)");
    ye("missing comma in flow", "[a, 'b' c]",
       "1:9: expected `,` or `]` in the flow sequence opened at line 1, column 1");
    ye("missing comma in flow map", "{a: 1 b: 2}",
       "1:8: expected `,` or `}` in the flow mapping opened at line 1, column 1");
    ye("block sequence in flow", "[- a]",
       "1:2: block sequence entries (`- `) cannot be used inside [ ] or { }");
    ye("lone - in flow", "[a, -]", "1:5: a lone `-` must be put in quotes inside [ ] or { }");
    ye("block scalar at the key's indentation", "a:\n|\n  x\n",
       "2:1: expected a mapping key, found `|` (a block scalar goes after its key's `:`, or on the "
       "next line indented more than the key)");
    ye("block scalar in flow", "[|\n a]",
       "1:2: block scalars (| and >) cannot be used inside [ ] or { }");
    ye("stray closing bracket", "a: ]\n",
       "1:4: a plain scalar cannot start with `]` (put the value in quotes)");
    ye("stray closing bracket in flow", "{a: ]}", "1:5: unexpected `]`");
    ye("reserved @", "a: @x\n",
       "1:4: a plain scalar cannot start with `@` (put the value in quotes)");
    ye("reserved backquote", "a: `x`\n",
       "1:4: a plain scalar cannot start with ``` (put the value in quotes)");
    ye("percent value", "a: %x\n",
       "1:4: a plain scalar cannot start with `%` (put the value in quotes)");
    ye("missing key", "a: 1\n: b\n", "2:1: a key is missing before `:`");
    ye("indentation indicator 0", "a: |0\n  x\n", "1:5: the indentation indicator must be 1 to 9");
    ye("junk after block indicator", "a: |x\n  y\n",
       "1:5: unexpected `x` after the block scalar indicator");
    ye("flow key at block key position", "a: 1\n[b]: 2\n",
       "2:1: expected a mapping key, found `[` (complex keys are not supported)");
    ye("multi-line quoted key", "a: 1\n\"b\n c\": 2\n",
       "2:1: a mapping key must be on a single line");
    yen("NUL byte", "a: \0", 4,
        "1:4: character U+0000 is not allowed (write it as an escape such as \\u0000 inside double "
        "quotes)");
    ye("control character", "a: 1\nb: x\x01",
       "2:5: character U+0001 is not allowed (write it as an escape such as \\u0001 inside double "
       "quotes)");
    ye("DEL", "a: \x7f",
       "1:4: character U+007F is not allowed (write it as an escape such as \\u007F inside double "
       "quotes)");
    ye("invalid UTF-8", "a: \"\xC3\x28\"", "1:5: invalid UTF-8 (byte 0xC3)");
    ye("overlong UTF-8", "é: \xC0\xAF", "1:4: invalid UTF-8 (byte 0xC0)");
    ye("UTF-8 surrogate", "a: \xED\xA0\x80", "1:4: invalid UTF-8 (byte 0xED)");
    ye("column counts characters", "é: ü: x",
       "1:5: a mapping cannot start here (a nested mapping goes on its own line, indented under "
       "its key)");
    ye("NUL in a key", "\"a\\0\": 1", "1:1: a NUL character in a mapping key is not supported");
    ye("error on a CRLF line", "a: 1\r\nb: &x 2\r\n", "2:4: anchors (&) are not supported");

    /* Depth: 64 levels parse, 65 do not, 1000 fail cleanly. */
    for (i = 0; i < 64; i++) deep_ok[i] = '[';
    for (i = 0; i < 64; i++) deep_ok[64 + i] = ']';
    yjn("64 nested flow lists", deep_ok, 128,
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]"
        "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]");
    memset(deep, '[', 1000);
    yen("1000 nested flow lists", deep, 1000, "1:65: nesting is too deep (the limit is 64 levels)");
    memset(deep, '{', 1000);
    for (i = 0; i < 1000; i += 4) memcpy(deep + i, "{a: ", 4);
    yen("250 nested flow maps", deep, 1000, "1:257: nesting is too deep (the limit is 64 levels)");
    for (i = 0; i < 70; i++) { /* a:\n  a:\n    a: ... */
        memset(block + k, ' ', 2 * i);
        k += 2 * i;
        memcpy(block + k, "a:\n", 3);
        k += 3;
    }
    yen("70 nested block maps", block, k, "65:129: nesting is too deep (the limit is 64 levels)");
    for (k = 0, i = 0; i < 100; i++) block[k++] = '-', block[k++] = ' ';
    yen("100 compact nested sequences", block, k,
        "1:129: nesting is too deep (the limit is 64 levels)");
}

/* ---- tree API ------------------------------------------------------------------------------- */

static struct yaml_node *P(const char *s)
{
    return yaml_parse(s, strlen(s), "t.yaml", errbuf, sizeof errbuf);
}

static void test_equal(void)
{
    static const struct {
        const char *a, *b;
        int eq;
    } c[] = {
        {"{a: 1, b: [1, 2], c: {x: y, z: w}}", "c: {z: w, x: y}\nb:\n- 1\n- 2\na: 1\n", 1},
        {"[1, 2]", "[2, 1]", 0},
        {"1", "1.0", 0},
        {"1.0", "1.00", 1},
        {"0x10", "16", 1},
        {".nan", ".NaN", 1},
        {"-0.0", "0.0", 0},
        {"'1'", "1", 0},
        {"~", "", 1},
        {"{a: 1}", "{a: 1, b: 2}", 0},
        {"{a: 1, b: 2}", "{a: 1, c: 2}", 0},
        {"{a: ~}", "{a: }", 1},
        {"a: |\n  x\n", "a: \"x\\n\"", 1},
        {"{k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8, k9: 9, k10: 10, k11: 11, "
         "k12: 12, k13: 13, k14: 14, k15: 15, k16: 16, k17: 17}",
         "{k17: 17, k16: 16, k15: 15, k14: 14, k13: 13, k12: 12, k11: 11, k10: 10, k9: 9, "
         "k8: 8, k7: 7, k6: 6, k5: 5, k4: 4, k3: 3, k2: 2, k1: 1}",
         1},
        {"{k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8, k9: 9, k10: 10, k11: 11, "
         "k12: 12, k13: 13, k14: 14, k15: 15, k16: 16, k17: 17}",
         "{k17: 17, k16: 16, k15: 15, k14: 14, k13: 13, k12: 12, k11: 11, k10: 10, k9: 9, "
         "k8: 8, k7: 7, k6: 6, k5: 5, k4: 4, k3: 3, k2: 2, k1: 0}",
         0},
    };
    size_t i;
    char name[64];
    for (i = 0; i < sizeof c / sizeof c[0]; i++) {
        struct yaml_node *a = P(c[i].a), *b = P(c[i].b);
        char *ja = to_json(a), *jb = to_json(b);
        snprintf(name, sizeof name, "yaml_equal case %lu", (unsigned long)i + 1);
        report(a && b && yaml_equal(a, b) == c[i].eq && yaml_equal(b, a) == c[i].eq &&
                   (ja && jb && !strcmp(ja, jb)) == c[i].eq,
               name, "%s vs %s: want %d", c[i].a, c[i].b, c[i].eq);
        xfree(ja);
        xfree(jb);
        yaml_free(a);
        yaml_free(b);
    }
    report(yaml_equal(NULL, NULL) && !yaml_get(NULL, "a"), "yaml_equal / yaml_get on NULL",
           "wrong value");
}

static void test_json(void)
{
    struct yaml_node *n =
        P("z: \"\\u0001\\\"\\\\\\n\"\nb: [true, false, ~, -5, 2.50]\na: {y: 1, x: 2}\n\"\": ''\n");
    char *j = to_json(n);
    report(j && !strcmp(j, "{\"\":\"\",\"a\":{\"x\":2,\"y\":1},\"b\":[true,false,null,-5,2.5],"
                           "\"z\":\"\\u0001\\\"\\\\\\n\"}"),
           "yaml_to_json canonical output", "got %s", j ? j : "(null)");
    xfree(j);
    yaml_free(n);
    {
        struct buf b = {NULL, 0, 0, 0};
        int rc = yaml_to_json(NULL, &b);
        report(rc == 0 && b.len == 4 && !memcmp(b.p, "null", 4), "yaml_to_json of NULL",
               "wrong value");
        buf_free(&b);
    }
}

/* ---- ${VAR} expansion --------------------------------------------------------------------- */

static void xp(const char *name, const char *in, const char *want)
{
    struct buf b = {NULL, 0, 0, 0};
    int rc = cfg_expand(in, strlen(in), &b, errbuf, sizeof errbuf);
    if (want) {
        report(rc == 0 && b.len == strlen(want) && (!b.len || !memcmp(b.p, want, b.len)), name,
               "rc %d, got \"%.*s\", want \"%s\" (%s)", rc, (int)b.len, b.p ? (char *)b.p : "",
               want, rc ? errbuf : "");
    } else {
        report(rc < 0, name, "expected an error");
    }
    buf_free(&b);
}

static void xe(const char *name, const char *in, const char *want)
{
    struct buf b = {NULL, 0, 0, 0};
    int rc = cfg_expand(in, strlen(in), &b, errbuf, sizeof errbuf);
    report(rc < 0 && !strcmp(errbuf, want), name, "rc %d, err \"%s\", want \"%s\"", rc,
           rc ? errbuf : "", want);
    buf_free(&b);
}

static void test_expand(void)
{
    char want[128];
    setenv("IIIT_A", "abc", 1);
    setenv("IIIT_EMPTY", "", 1);
    setenv("IIIT_REF", "${IIIT_A}", 1);
    setenv("IIIT_PORT", "5000", 1);
    unsetenv("IIIT_UNSET");
    xp("set variable", "a: ${IIIT_A}\n", "a: abc\n");
    xp("set but empty wins over default", "a: '${IIIT_EMPTY:x}'", "a: ''");
    xp("default when unset", "${IIIT_UNSET:def}", "def");
    xp("empty default", "[${IIIT_UNSET:}]", "[]");
    xp("default containing ':'", "${IIIT_UNSET:http://h:1}", "http://h:1");
    xp("default with spaces and braces before", "${IIIT_UNSET:a {b}", "a {b");
    snprintf(want, sizeof want, "v=%s", III_VERSION);
    xp("engine version default", "v=${IIIT_UNSET:__III_ENGINE_VERSION__}", want);
    xp("$VAR untouched", "$IIIT_A and $ {IIIT_A}", "$IIIT_A and $ {IIIT_A}");
    xp("unclosed ${X untouched", "a: ${IIIT_A\nb: 1", "a: ${IIIT_A\nb: 1");
    xp("unclosed default untouched", "${IIIT_UNSET:abc", "${IIIT_UNSET:abc");
    xp("${} untouched", "${} ${:x}", "${} ${:x}");
    xp("not rescanned", "${IIIT_REF}", "${IIIT_A}");
    xp("several on one line", "${IIIT_A}-${IIIT_UNSET:z}-${IIIT_A}", "abc-z-abc");
    xp("inside comments too", "# ${IIIT_A}\n", "# abc\n");
    xp("dollar at the end", "cost: 5$", "cost: 5$");
    xe("unset without default", "a: 1\nb: é ${IIIT_UNSET}\n",
       "2:6: environment variable `IIIT_UNSET` is not set and `${IIIT_UNSET}` has no default "
       "(set it, or write `${IIIT_UNSET:default}`)");
    xe("unset after a multi-line match", "${IIIT_UNSET:a\nb} ${IIIT_UNSET}",
       "2:4: environment variable `IIIT_UNSET` is not set and `${IIIT_UNSET}` has no default "
       "(set it, or write `${IIIT_UNSET:default}`)");
    {
        struct cfg c;
        const char *t =
            "workers:\n  - name: iii-worker-manager\n    config: {port: ${IIIT_PORT}}\n";
        int rc = cfg_parse(t, strlen(t), "config.yaml", &c, errbuf, sizeof errbuf);
        report(rc == 0 && c.lis.port == 5000 && c.w[0].config_json &&
                   !strcmp(c.w[0].config_json, "{\"port\":5000}"),
               "expanded value parses as an int", "rc %d %s", rc, rc ? errbuf : "");
        if (rc == 0) cfg_free(&c);
        t = "workers: []\n# ${IIIT_UNSET}\n";
        rc = cfg_parse(t, strlen(t), "config.yaml", &c, errbuf, sizeof errbuf);
        report(rc < 0 &&
                   !strcmp(errbuf, "config.yaml:2:3: environment variable `IIIT_UNSET` is "
                                   "not set and `${IIIT_UNSET}` has no default (set it, or write "
                                   "`${IIIT_UNSET:default}`)"),
               "unset variable in a comment is a config error", "rc %d: %s", rc, errbuf);
    }
}

/* ---- the config model --------------------------------------------------------------------- */

/* Parses a config as /etc/iii/config.yaml and expects success. */
static int cp(const char *name, const char *text, struct cfg *c)
{
    int rc = cfg_parse(text, strlen(text), "/etc/iii/config.yaml", c, errbuf, sizeof errbuf);
    if (rc) report(0, name, "cfg_parse failed: %s", errbuf);
    return rc == 0;
}

/* Expects a config to be refused with exactly `want`. */
static void ce(const char *name, const char *text, const char *want)
{
    size_t live = mem_live_bytes;
    struct cfg c;
    int rc = cfg_parse(text, strlen(text), "config.yaml", &c, errbuf, sizeof errbuf);
    if (rc == 0) cfg_free(&c);
    if (rc == 0 || strcmp(errbuf, want))
        report(0, name, "rc %d, got \"%s\", want \"%s\"", rc, rc ? errbuf : "", want);
    else
        report(mem_live_bytes == live && c.nw == 0 && c.lis.port == III_DEFAULT_PORT, name,
               "leak or non-default output after an error");
}

static int streq_list(char **v, const char *const *want)
{
    size_t i;
    for (i = 0; want[i]; i++)
        if (!v || !v[i] || strcmp(v[i], want[i])) return 0;
    return v[i] == NULL;
}

static void test_cfg(void)
{
    struct cfg c;
    size_t live = mem_live_bytes;
    char *cwd = cfg_getcwd();

    if (cp("empty config", "", &c)) {
        report(c.nw == 0 && !c.has_grace && c.grace_ms == III_DEFAULT_GRACE_MS &&
                   !strcmp(c.lis.host, "127.0.0.1") && c.lis.port == 49134 &&
                   c.lis.handshake_timeout_ms == 10000 && c.lis.max_message_bytes == 64u << 20 &&
                   c.lis.max_frame_bytes == 64u << 20 && c.lis.max_header_bytes == 16384 &&
                   c.lis.max_connections == 10000 && c.lis.max_outbound_bytes == 256u << 20 &&
                   c.lis.ping_interval_ms == 20000 && c.lis.idle_timeout_ms == 60000 &&
                   c.lis.n_origins == 2 && !strcmp(c.lis.allowed_origins[0], "http://localhost") &&
                   !strcmp(c.lis.allowed_origins[1], "http://127.0.0.1"),
               "empty config gives the defaults", "wrong value");
        cfg_free(&c);
    }
    if (cp("starter config", "# comment\nworkers: []\n", &c)) {
        report(c.nw == 0, "starter config has no workers", "wrong value");
        cfg_free(&c);
    }
    if (cp("listener settings",
           "registration_namespace_grace_ms: 250\nworkers:\n"
           "  - name: iii-worker-manager\n    config:\n      host: \"[::1]\"\n      port: 0\n"
           "      handshake_timeout_ms: 500\n      ping_interval_ms: 0\n"
           "      idle_timeout_ms: 0\n      max_message_bytes: 65536\n"
           "      max_frame_bytes: 1024\n      max_header_bytes: 4096\n"
           "      max_connections: 3\n      max_outbound_bytes: 100000\n"
           "      allowed_origins: [\"http://localhost:3000\", \"*\"]\n",
           &c)) {
        report(c.has_grace && c.grace_ms == 250 && c.nw == 1 && c.w[0].builtin &&
                   !strcmp(c.lis.host, "::1") && c.lis.port == 0 &&
                   c.lis.handshake_timeout_ms == 500 && c.lis.ping_interval_ms == 0 &&
                   c.lis.idle_timeout_ms == 0 && c.lis.max_message_bytes == 65536 &&
                   c.lis.max_frame_bytes == 1024 && c.lis.max_header_bytes == 4096 &&
                   c.lis.max_connections == 3 && c.lis.max_outbound_bytes == 100000 &&
                   c.lis.n_origins == 2 &&
                   !strcmp(c.lis.allowed_origins[0], "http://localhost:3000") &&
                   !strcmp(c.lis.allowed_origins[1], "*") && c.w[0].argv == NULL &&
                   c.w[0].env == NULL && c.w[0].cwd == NULL && c.w[0].entry &&
                   c.w[0].entry->kind == YAML_MAP,
               "listener settings are read", "wrong value");
        cfg_free(&c);
    }
    if (cp("contract example",
           "workers:\n  - name: iii-worker-manager\n    config:\n      max_message_bytes: 65536\n"
           "      handshake_timeout_ms: 500\n",
           &c)) {
        report(c.lis.max_message_bytes == 65536 && c.lis.handshake_timeout_ms == 500 &&
                   c.lis.port == 49134 && c.lis.n_origins == 2,
               "contract example", "wrong value");
        cfg_free(&c);
    }
    if (cp("empty origin list",
           "workers:\n- name: iii-worker-manager\n  config:\n    allowed_origins: []\n", &c)) {
        report(c.lis.n_origins == 0, "empty origin list allows no browser", "wrong value");
        cfg_free(&c);
    }
    if (cp("null config and name: null-safe",
           "workers:\n- name: iii-worker-manager\n  config:\n  image: null\n", &c)) {
        report(c.nw == 1 && c.w[0].config_json == NULL && c.lis.port == 49134,
               "null config keeps the defaults", "wrong value");
        cfg_free(&c);
    }
    if (cp("process workers",
           "workers:\n  - name: math\n    command: [\"node\", \"workers/math.mjs\", 3, true]\n"
           "    env: { LOG_LEVEL: debug, N: 1, F: 1.5, B: false, E: \"\" }\n"
           "    cwd: ./workers/./x/\n    restart: on-failure\n"
           "    stop_timeout_ms: 100\n    config: {z: 1, a: {c: 2, b: [1, 2.0]}}\n"
           "  - name: math\n    command: python3 -m math_worker | tee log\n"
           "    cwd: /srv/../w\n    restart: never\nmodules:\n  - name: math\n"
           "    command: [./m]\n    restart: always\n"
           "  - name: iii-telemetry\n  - name: configuration\n"
           "  - name: iii-observability\n  - name: iii-engine-functions\n  - name: iii-telemetry\n",
           &c)) {
        static const char *const a0[] = {"node", "workers/math.mjs", "3", "true", NULL};
        static const char *const e0[] = {"LOG_LEVEL=debug", "N=1", "F=1.5", "B=false", "E=", NULL};
        static const char *const a1[] = {"/bin/sh", "-c", "python3 -m math_worker | tee log", NULL};
        static const char *const a2[] = {"./m", NULL};
        static const char *const none[] = {NULL};
        report(c.nw == 8, "process workers: count", "%lu", (unsigned long)c.nw);
        if (c.nw == 8) {
            report(!strcmp(c.w[0].name, "math") && !strcmp(c.w[1].name, "math#1") &&
                       !strcmp(c.w[2].name, "math#2") && !strcmp(c.w[2].base, "math") &&
                       !strcmp(c.w[3].name, "iii-telemetry") &&
                       !strcmp(c.w[7].name, "iii-telemetry#1") &&
                       !strcmp(c.w[7].base, "iii-telemetry"),
                   "instance ids name#1, name#2 across workers and modules", "wrong value");
            report(!c.w[0].builtin && !c.w[1].builtin && !c.w[2].builtin && c.w[3].builtin &&
                       c.w[4].builtin && c.w[5].builtin && c.w[6].builtin && c.w[7].builtin,
                   "built-in names are built in", "wrong value");
            report(streq_list(c.w[0].argv, a0) && streq_list(c.w[1].argv, a1) &&
                       streq_list(c.w[2].argv, a2),
                   "command as list and as shell string", "wrong value");
            report(streq_list(c.w[0].env, e0) && streq_list(c.w[1].env, none),
                   "env rendered as K=V", "wrong value");
            report(!strcmp(c.w[0].cwd, "/etc/iii/workers/x") && !strcmp(c.w[1].cwd, "/srv/../w") &&
                       !strcmp(c.w[2].cwd, "/etc/iii"),
                   "cwd resolved against the config's directory", "%s %s %s", c.w[0].cwd,
                   c.w[1].cwd, c.w[2].cwd);
            report(c.w[0].restart == CFG_RESTART_ON_FAILURE &&
                       c.w[1].restart == CFG_RESTART_NEVER &&
                       c.w[2].restart == CFG_RESTART_ALWAYS && c.w[0].stop_timeout_ms == 100 &&
                       c.w[1].stop_timeout_ms == 3000,
                   "restart and stop_timeout_ms", "wrong value");
            report(c.w[0].config_json &&
                       !strcmp(c.w[0].config_json, "{\"a\":{\"b\":[1,2.0],\"c\":2},\"z\":1}") &&
                       c.w[1].config_json == NULL,
                   "config as canonical JSON", "%s",
                   c.w[0].config_json ? c.w[0].config_json : "(null)");
        }
        cfg_free(&c);
    }
    if (cwd) {
        const char *t = "workers:\n  - name: w\n    command: x\n  - name: v\n    command: y\n"
                        "    cwd: sub\n";
        char want[4200];
        int rc = cfg_parse(t, strlen(t), NULL, &c, errbuf, sizeof errbuf);
        snprintf(want, sizeof want, "%s/sub", strcmp(cwd, "/") ? cwd : "");
        report(rc == 0 && !strcmp(c.w[0].cwd, cwd) && !strcmp(c.w[1].cwd, want),
               "no path: cwd is the current directory", "%s", rc ? errbuf : c.w[0].cwd);
        if (rc == 0) cfg_free(&c);
        rc = cfg_parse(t, strlen(t), "sub/dir/c.yaml", &c, errbuf, sizeof errbuf);
        snprintf(want, sizeof want, "%s/sub/dir/sub", strcmp(cwd, "/") ? cwd : "");
        report(rc == 0 && !strcmp(c.w[1].cwd, want), "relative config path", "%s",
               rc ? errbuf : c.w[1].cwd);
        if (rc == 0) cfg_free(&c);
        xfree(cwd);
    }
    { /* entries compare structurally for the reload diff */
        struct cfg a, b;
        if (cp("reload diff a", "workers:\n- name: m\n  command: [x]\n  config: {p: 1, q: 2}\n",
               &a)) {
            if (cp("reload diff b",
                   "workers:\n- config:\n    q: 2\n    p: 1\n  command:\n  - x\n  name: m\n", &b)) {
                report(yaml_equal(a.w[0].entry, b.w[0].entry) &&
                           !strcmp(a.w[0].config_json, b.w[0].config_json),
                       "reordered keys are not a change", "wrong value");
                cfg_free(&b);
            }
            if (cp("reload diff c", "workers:\n- name: m\n  command: [x]\n  config: {p: 1, q: 3}\n",
                   &b)) {
                report(!yaml_equal(a.w[0].entry, b.w[0].entry), "a changed value is a change",
                       "wrong value");
                cfg_free(&b);
            }
            cfg_free(&a);
        }
    }

    /* Refusals: each names the file, the position, the entry and the key. */
    ce("unknown top-level key", "workers: []\n\n\nfoo: 1\n",
       "config.yaml:4:1: unknown top-level key `foo` (expected registration_namespace_grace_ms, "
       "on_invalid_reload, routing, workers, modules)");
    ce("top level not a mapping", "- a\n",
       "config.yaml:1:1: the top level must be a mapping "
       "with the keys registration_namespace_grace_ms, workers, modules (got a list)");
    ce("workers: null", "workers:\n",
       "config.yaml:1:1: `workers` must be a list (got nothing "
       "(null); write `workers: []` for none)");
    ce("workers as a mapping", "workers: {a: 1}\n",
       "config.yaml:1:1: `workers` must be a list (got a mapping; write `workers: []` for none)");
    ce("modules not a list", "modules: x\n",
       "config.yaml:1:1: `modules` must be a list (got the "
       "string \"x\"; write `modules: []` for none)");
    ce("negative grace", "registration_namespace_grace_ms: -1\n",
       "config.yaml:1:1: "
       "`registration_namespace_grace_ms` must be an integer from 0 to 2147483647 (got -1)");
    ce("grace as text", "registration_namespace_grace_ms: 5s\n",
       "config.yaml:1:1: "
       "`registration_namespace_grace_ms` must be an integer from 0 to 2147483647 (got the string "
       "\"5s\")");
    ce("worker without command", "workers:\n  - name: math\n",
       "config.yaml:2:5: worker 'math': `command` is required for a worker that is not built in "
       "(add `command: [\"node\", \"math.mjs\"]` or a shell string)");
    ce("reference module without command",
       "workers:\n  - name: iii-http\n    config: {port: 3111}\n",
       "config.yaml:2:5: worker 'iii-http': `iii-http` is a module of the reference iii engine "
       "that this engine does not include; to run your own implementation add `command:` (for "
       "example `command: [\"node\", \"iii-http.mjs\"]`), or remove the entry");
    ce("second instance without command", "workers:\n- name: a\n  command: x\n- name: a\n",
       "config.yaml:4:3: worker 'a#1': `command` is required for a worker that is not built in "
       "(add `command: [\"node\", \"a.mjs\"]` or a shell string)");
    ce("unknown listener key",
       "workers:\n  - name: iii-worker-manager\n    config:\n      prot: 1\n",
       "config.yaml:4:7: worker 'iii-worker-manager': unknown key `prot` in config (expected host, "
       "port, handshake_timeout_ms, ping_interval_ms, idle_timeout_ms, max_message_bytes, "
       "max_frame_bytes, max_header_bytes, max_connections, max_outbound_bytes, "
       "max_pending_registration_bytes, max_pending_registration_frames, "
       "max_inflight_per_connection, max_inflight_total, max_functions_per_connection, "
       "max_triggers_per_connection, max_triggers_per_function, max_triggers, max_memory_bytes, "
       "drain_timeout_ms, allowed_origins, auth_tokens, rbac, middleware_function_id, "
       "allow_unauthenticated, metrics_public, allowed_hosts, worker_token)");
    ce("routing rule without match", "routing:\n  - providers: many\n",
       "config.yaml:2:5: routing rule 1 needs `match` (a glob over function ids)");
    ce("routing rule with a bad balance", "routing:\n  - match: \"a::*\"\n    balance: random\n",
       "config.yaml:3:5: routing rule 1: `balance` must be least-inflight, round-robin or first");
    ce("routing rule with an unknown key", "routing:\n  - match: x\n    providrs: many\n",
       "config.yaml:3:5: routing rule 1: unknown key `providrs` (expected match, namespace, "
       "providers, balance, timeout_ms, max_inflight, max_queue, retry_on_disconnect)");
    ce("instances out of range",
       "workers:\n  - name: w\n    command: x\n    instances: 0\n",
       "config.yaml:4:5: worker 'w': `instances` must be an integer from 1 to 64 (got 0)");
    ce("rbac with an unknown key",
       "workers:\n- name: iii-worker-manager\n  config:\n    rbac: {auth_fn: x}\n",
       "config.yaml:4:5: worker 'iii-worker-manager': `rbac` in config: unknown key \"auth_fn\" "
       "(expected auth_function_id, expose_functions, forbidden_functions)");
    ce("open listener without auth",
       "workers:\n- name: iii-worker-manager\n  config:\n    host: 0.0.0.0\n",
       "config.yaml:4:5: worker 'iii-worker-manager': the listener binds a non-loopback address "
       "with no authentication: add `auth_tokens` (e.g. auth_tokens: [\"${III_TOKEN_SECRET}\"]) "
       "or `rbac` to the iii-worker-manager config, or set `allow_unauthenticated: true` to serve "
       "the network without it");
    ce("auth_tokens entry with an unknown key",
       "workers:\n- name: iii-worker-manager\n  config:\n    auth_tokens: [{token: t, namespace: x}]\n",
       "config.yaml:4:19: worker 'iii-worker-manager': `auth_tokens` entry 1: unknown key "
       "\"namespace\" (expected token, namespaces, allowed_functions, forbidden_functions, "
       "allow_function_registration, allow_trigger_type_registration, "
       "function_registration_prefix, context)");
    ce("port out of range", "workers:\n- name: iii-worker-manager\n  config: {port: 70000}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `port` in config must be an integer from 0 "
       "to 65535 (got 70000)");
    ce("port as a string", "workers:\n- name: iii-worker-manager\n  config: {port: \"80\"}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `port` in config must be an integer from 0 "
       "to 65535 (got the string \"80\")");
    ce("port as a float", "workers:\n- name: iii-worker-manager\n  config: {port: 80.5}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `port` in config must be an integer from 0 "
       "to 65535 (got 80.5)");
    ce("zero handshake timeout",
       "workers:\n- name: iii-worker-manager\n  config: {handshake_timeout_ms: 0}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `handshake_timeout_ms` in config must be an "
       "integer from 1 to 2147483647 (got 0)");
    ce("huge timeout",
       "workers:\n- name: iii-worker-manager\n  config: {idle_timeout_ms: 9999999999}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `idle_timeout_ms` in config must be an "
       "integer from 0 to 2147483647 (got 9999999999)");
    ce("zero max_connections",
       "workers:\n- name: iii-worker-manager\n  config: {max_connections: 0}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `max_connections` in config must be an "
       "integer from 1 to 2147483647 (got 0)");
    ce("max_message_bytes as a list",
       "workers:\n- name: iii-worker-manager\n  config:\n    max_message_bytes: [1]\n",
       "config.yaml:4:5: worker 'iii-worker-manager': `max_message_bytes` in config must be a "
       "positive integer (got a list)");
    ce("empty host", "workers:\n- name: iii-worker-manager\n  config: {host: ''}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `host` in config must be a host name or "
       "address such as \"127.0.0.1\" or \"::\" (got the string \"\")");
    ce("origins not a list",
       "workers:\n- name: iii-worker-manager\n  config: {allowed_origins: \"*\"}\n",
       "config.yaml:3:12: worker 'iii-worker-manager': `allowed_origins` in config must be a list "
       "of "
       "origins such as [\"http://localhost:3000\"] (or [\"*\"] for any) (got the string \"*\")");
    ce("origin with a path",
       "workers:\n- name: iii-worker-manager\n  config:\n    allowed_origins:\n"
       "      - http://a.b\n      - http://localhost:3000/\n",
       "config.yaml:6:9: worker 'iii-worker-manager': each of `allowed_origins` in config must be "
       "\"*\", \"null\" or an origin scheme://host[:port] without a path (got the string "
       "\"http://localhost:3000/\")");
    ce("listener config not a mapping", "workers:\n- name: iii-worker-manager\n  config: [1]\n",
       "config.yaml:3:11: worker 'iii-worker-manager': `config` must be a mapping of listener "
       "settings (got a list)");
    ce("two listeners", "workers:\n- name: iii-worker-manager\n- name: iii-worker-manager\n",
       "config.yaml:3:3: worker 'iii-worker-manager#1': only one `iii-worker-manager` entry is "
       "supported (this engine opens a single listener); merge its settings into the first one");
    ce("entry not a mapping", "workers:\n  - math\n",
       "config.yaml:2:5: entry 1 of `workers` must "
       "be a mapping with at least a `name` (got the string \"math\")");
    ce("null entry", "modules:\n  -\n",
       "config.yaml:2:4: entry 1 of `modules` must be a mapping "
       "with at least a `name` (got nothing (null))");
    ce("entry without name", "workers:\n- name: a\n  command: x\n- command: y\n",
       "config.yaml:4:3: entry 2 of `workers` has no `name`");
    ce("name not a string", "workers:\n- name: 42\n",
       "config.yaml:2:3: entry 1 of `workers`: `name` must be a non-empty string (got 42)");
    ce("name with #", "workers:\n- name: \"a#1\"\n",
       "config.yaml:2:3: entry 1 of `workers`: "
       "`name` must not contain `#` (duplicate names get the instance ids name#1, name#2 "
       "automatically)");
    ce("name with a control character", "workers:\n- name: \"a\\tb\"\n",
       "config.yaml:2:3: entry 1 of `workers`: `name` must not contain control characters");
    ce("unknown entry key ignored, missing command still refused", "workers:\n- name: m\n  comand: x\n",
       "config.yaml:2:3: worker 'm': `command` is required for a worker that is not built in "
       "(add `command: [\"node\", \"m.mjs\"]` or a shell string)");
    ce("image on a builtin", "workers:\n- name: iii-telemetry\n  image: x\n",
       "config.yaml:3:3: worker 'iii-telemetry': `image` cannot be used on a built-in worker");
    ce("image on a process worker", "workers:\n- name: m\n  image: reg/m:1\n",
       "config.yaml:3:3: "
       "worker 'm': `image` (OCI images) is not supported by this engine; start the worker as a "
       "process with `command`");
    ce("command on a builtin", "workers:\n- name: iii-worker-manager\n  command: x\n",
       "config.yaml:3:3: worker 'iii-worker-manager': `command` cannot be used on the built-in "
       "worker `iii-worker-manager`, which runs inside the engine (give your own worker another "
       "name)");
    ce("env on a builtin", "workers:\n- name: configuration\n  env: {A: 1}\n",
       "config.yaml:3:3: "
       "worker 'configuration': `env` cannot be used on the built-in worker `configuration`, which "
       "runs inside the engine (give your own worker another name)");
    ce("empty command list", "workers:\n- name: m\n  command: []\n",
       "config.yaml:3:3: worker 'm': "
       "`command` must be a list such as [\"node\", \"m.mjs\"] or a shell string (got an empty "
       "list)");
    ce("command as a mapping", "workers:\n- name: m\n  command: {a: 1}\n",
       "config.yaml:3:3: "
       "worker 'm': `command` must be a list such as [\"node\", \"m.mjs\"] or a shell string (got "
       "a mapping)");
    ce("empty program", "workers:\n- name: m\n  command: ['', x]\n",
       "config.yaml:3:13: worker "
       "'m': item 1 of `command` must be a non-empty string (got the string \"\")");
    ce("list inside command", "workers:\n- name: m\n  command: [x, [y]]\n",
       "config.yaml:3:16: worker 'm': item 2 of `command` must be a string (got a list)");
    ce("blank shell command", "workers:\n- name: m\n  command: '  '\n",
       "config.yaml:3:3: worker 'm': `command` must not be empty");
    ce("NUL in a command", "workers:\n- name: m\n  command: \"a\\0b\"\n",
       "config.yaml:3:3: worker 'm': `command` must not be empty or contain a NUL character");
    ce("env not a mapping", "workers:\n- name: m\n  command: x\n  env: [A=1]\n",
       "config.yaml:4:3: "
       "worker 'm': `env` must be a mapping such as { LOG_LEVEL: debug } (got a list)");
    ce("env null value", "workers:\n- name: m\n  command: x\n  env:\n    A:\n",
       "config.yaml:5:5: "
       "worker 'm': `env` value of `A` must be a string or a number (got nothing (null); write "
       "\"\" for an empty value)");
    ce("env bad name", "workers:\n- name: m\n  command: x\n  env: {\"A=B\": 1}\n",
       "config.yaml:4:9: worker 'm': `env` name `A=B` is not valid (it must be non-empty and "
       "contain no `=`)");
    ce("cwd not a string", "workers:\n- name: m\n  command: x\n  cwd: 5\n",
       "config.yaml:4:3: worker 'm': `cwd` must be a directory path (got 5)");
    ce("bad restart", "workers:\n- name: m\n  command: x\n  restart: no\n",
       "config.yaml:4:3: "
       "worker 'm': `restart` must be always, on-failure or never (got the string \"no\")");
    ce("negative stop timeout", "workers:\n- name: m\n  command: x\n  stop_timeout_ms: -5\n",
       "config.yaml:4:3: worker 'm': `stop_timeout_ms` must be an integer from 0 to 2147483647 "
       "(got -5)");
    ce("YAML error names the config", "workers:\n  - name: \"m\n",
       "config.yaml:2:11: unterminated double-quoted scalar");
    report(mem_live_bytes == live, "config tests leave no allocation behind", "%lu bytes",
           (unsigned long)(mem_live_bytes - live));
}

static void test_load(void)
{
    struct cfg c;
    int missing = 0, rc;
    char path[128], dir[64];
    FILE *f;
    snprintf(dir, sizeof dir, "/tmp/iii-uy-%ld", (long)getpid());
    snprintf(path, sizeof path, "%s/config.yaml", dir);
    rc = cfg_load("/nonexistent-dir-iii/config.yaml", &c, &missing, errbuf, sizeof errbuf);
    report(rc == 0 && missing == 1 && c.nw == 0 && c.lis.port == 49134,
           "missing file gives defaults", "rc %d missing %d", rc, missing);
    cfg_free(&c);
    if (mkdir(dir, 0700) < 0) {
        report(0, "cfg_load", "mkdir %s: %s", dir, strerror(errno));
        return;
    }
    rc = cfg_load(dir, &c, &missing, errbuf, sizeof errbuf);
    report(rc < 0 && missing == 0 && strstr(errbuf, "is a directory"), "a directory is refused",
           "%s", errbuf);
    f = fopen(path, "w");
    if (f) {
        fputs("workers:\n  - name: w\n    command: [\"true\"]\n    cwd: x\n", f);
        fclose(f);
    }
    rc = cfg_load(path, &c, &missing, errbuf, sizeof errbuf);
    {
        char want[128];
        snprintf(want, sizeof want, "%s/x", dir);
        report(rc == 0 && missing == 0 && c.nw == 1 && !strcmp(c.w[0].cwd, want),
               "cfg_load reads a file", "rc %d %s", rc, rc ? errbuf : c.w[0].cwd);
    }
    if (rc == 0) cfg_free(&c);
    f = fopen(path, "w");
    if (f) {
        fputs("workers:\n  - name: w\n    command: x\n    restart: sometimes\n", f);
        fclose(f);
    }
    rc = cfg_load(path, &c, &missing, errbuf, sizeof errbuf);
    {
        char want[256];
        snprintf(want, sizeof want,
                 "%s:4:5: worker 'w': `restart` must be always, on-failure or never (got the string \"sometimes\")",
                 path);
        report(rc < 0 && !strcmp(errbuf, want), "cfg_load error names the path", "%s", errbuf);
    }
    remove(path);
    rmdir(dir);
}

/* ---- allocation failure sweep --------------------------------------------------------------- */

static void test_oom(void)
{
    static const char *const docs[] = {
        "registration_namespace_grace_ms: 5\nworkers:\n  - name: iii-worker-manager\n"
        "    config: {host: \"::\", port: 1, allowed_origins: [\"http://a\", \"*\"]}\n"
        "  - name: math\n    command: [\"node\", \"m.mjs\"]\n"
        "    env: {A: 1, B: two}\n    cwd: ./w\n"
        "    config: {k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8, k9: 9, k10: 10,\n"
        "             k11: 11, k12: 12, k13: 13, k14: 14, k15: 15, k16: 16, k17: [x, y]}\n"
        "  - name: math\n    command: \"sleep 1\"\nmodules:\n  - name: iii-telemetry\n",
        "a: |\n  text\nb: \"esc\\u00e9\"\nc: 'q'\nd: [1, {e: f}]\n",
        "workers:\n  - name: x\n    comand: 1\n", /* an error path */
    };
    size_t d;
    for (d = 0; d < sizeof docs / sizeof docs[0]; d++) {
        long k;
        int bad = 0, finished = 0;
        size_t live = mem_live_bytes;
        for (k = 0; k < 100000 && !finished && !bad; k++) {
            struct cfg c;
            int rc;
            mem_fail_after = k;
            rc = cfg_parse(docs[d], strlen(docs[d]), "/c/config.yaml", &c, errbuf, sizeof errbuf);
            finished = mem_fail_after >= 0; /* the k-th allocation was never reached */
            mem_fail_after = -1;
            if (rc == 0) cfg_free(&c);
            if (!finished && rc == 0) bad = 1; /* a failed allocation was not reported */
            if (!finished && rc < 0 && !strstr(errbuf, "out of memory") && d != 2) bad = 2;
            if (mem_live_bytes != live) bad = 3;
        }
        {
            char name[128];
            snprintf(name, sizeof name, "allocation failure sweep, document %lu (%ld points)",
                     (unsigned long)d + 1, k);
            report(!bad && finished, name, "failure %d at allocation %ld: %s", bad, k - 1, errbuf);
        }
    }
}

int main(void)
{
    test_valid();
    test_positions();
    test_errors();
    test_equal();
    test_json();
    test_expand();
    test_cfg();
    test_load();
    test_oom();
    printf("# unit_yaml: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
