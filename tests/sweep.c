/* sweep.c - allocation-failure sweep, SQLite style, over one scripted two-worker session.
 *
 *   cc -std=c99 -g -O1 -fsanitize=address,undefined -Wno-unused-function tests/sweep.c -o build/sweep
 *   build/sweep            # every allocation point; prints ok / not ok lines
 *   build/sweep -k K       # only the K-th allocation fails, in-process (for a debugger)
 *   build/sweep -v         # the child's sanitizer/invariant report for each failing point
 *
 * The script: A and B connect through a real HTTP upgrade (fd -1, no socket), A announces
 * itself (engine::workers::register, name w1), registers math::add, registers trigger type cron
 * and binds a trigger to math::add (A is the provider, so the binding is delivered back to it),
 * B announces (w2) and calls math::add, A answers, both disconnect; every step is followed by
 * what a loop turn does (discovery tick, reap). The run with no failure counts N allocations;
 * then for each k in 0..N-1 the session is replayed in a forked child with the k-th allocation
 * failing (mem_fail_after = k). Each child must: not crash (ASan/UBSan), keep the registry
 * invariants of fuzz_state.c after every step, drop at most one of the two connections, deliver
 * B's reply if B is still open, and, after both disconnect and the registry is freed, have every
 * byte back (mem_live_bytes at its baseline; LeakSanitizer checks the rest at exit).
 */
#define FZ_NO_ENTRY
#include "fuzz_state.c"

#include <sys/wait.h>

static int sw_verbose;

/* One step of the script: slot i sends the frame in fz_msg (if i is open), then a loop turn. */
static void sw_turn(void)
{
    {
        int64_t nx = INT64_MAX;
        drain_tick();
        ev_functions_tick(now_ms(), &nx);
    }
    fz_reap();
    fz_drain_out();
    fz_check_invariants();
}

static void sw_send(int i)
{
    if (fz_s[i].c && conn_open(fz_s[i].c) && fz_s[i].c->ws) fz_send(i, 0, 0, 0x3c);
    fz_drain_out();
    fz_check_invariants();
    sw_turn();
}

/* Runs the session; fail_at < 0: no failure. Returns the number of allocations the engine made
 * (script + disconnects + reap), and reports problems by exit code when fail_at >= 0:
 * 0 ok, 3 both connections dropped, 4 reply lost, 5 leak. Invariant violations abort(). */
static long sw_session(long fail_at, int *rc)
{
    char x[37] = "5ee5c0de-0000-4000-8000-000000000001";
    *rc = 0;
    fz_begin();
    fz_in = NULL, fz_n = fz_pos = 0;
    fz_step = "sweep setup";
    size_t a0 = mem_allocs_total;
    mem_fail_after = fail_at;
    fz_step = "open A";
    fz_open_slot(0, 1);
    fz_step = "open B";
    fz_open_slot(1, 1);
    fz_drain_out();
    sw_turn();
    fz_step = "A announces";
    fz_len = 0;
    fz_put("{\"type\":\"invokefunction\",\"invocation_id\":\"5ee5c0de-0000-4000-8000-0000000000a1\","
           "\"function_id\":\"engine::workers::register\",\"data\":{\"name\":\"w1\",\"pid\":1,"
           "\"runtime\":\"c\"}}");
    if (fz_s[0].c) fz_expect(0, "5ee5c0de-0000-4000-8000-0000000000a1", NULL, NULL, 1);
    sw_send(0);
    fz_step = "A registers math::add";
    fz_len = 0;
    fz_put("{\"type\":\"registerfunction\",\"id\":\"math::add\",\"description\":\"adds\"}");
    if (fz_s[0].c) snprintf(fz_s[0].fids[fz_s[0].nfids++], 72, "\"math::add\"");
    sw_send(0);
    fz_step = "A registers trigger type cron";
    fz_len = 0;
    fz_put("{\"type\":\"registertriggertype\",\"id\":\"cron\",\"description\":\"d\"}");
    sw_send(0);
    fz_step = "A binds t1";
    fz_len = 0;
    fz_put("{\"type\":\"registertrigger\",\"id\":\"t1\",\"trigger_type\":\"cron\","
           "\"function_id\":\"math::add\",\"config\":{\"e\":1}}");
    sw_send(0);
    fz_step = "B announces";
    fz_len = 0;
    fz_put("{\"type\":\"invokefunction\",\"function_id\":\"engine::workers::register\","
           "\"data\":{\"name\":\"w2\",\"pid\":2},\"action\":{\"type\":\"void\"}}");
    sw_send(1);
    fz_step = "B calls math::add";
    fz_len = 0;
    fz_putf("{\"type\":\"invokefunction\",\"invocation_id\":\"%s\",\"function_id\":\"math::add\","
            "\"data\":{\"a\":1},\"traceparent\":\"00-0af7651916cd43dd8448eb211c80319c-"
            "b7ad6b7169203331-01\"}",
            x);
    int b_open_at_call = fz_s[1].c && conn_open(fz_s[1].c);
    if (b_open_at_call)
        fz_expect(1, x, "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"", NULL, 0);
    sw_send(1);
    fz_step = "A answers";
    fz_len = 0;
    fz_putf("{\"type\":\"invocationresult\",\"invocation_id\":\"%s\",\"function_id\":\"math::add\","
            "\"result\":{\"sum\":2}}",
            x);
    sw_send(0);
    /* the session is over: at most one connection may have been dropped, and an open B got its
     * reply (result or error) */
    int a_ok = fz_s[0].c && conn_open(fz_s[0].c), b_ok = fz_s[1].c && conn_open(fz_s[1].c);
    int replied = 1;
    for (int k = 0; k < fz_s[1].nout; k++)
        if (!memcmp(fz_s[1].out[k].id, x, 36)) replied = 0;
    if (fail_at >= 0 && !a_ok && !b_ok) {
        fprintf(stderr, "sweep: both connections dropped by one allocation failure\n");
        *rc = 3;
    } else if (fail_at >= 0 && b_ok && b_open_at_call && !replied) {
        fprintf(stderr, "sweep: B is open but its call was never answered (A %s)\n",
                a_ok ? "open" : "dropped");
        *rc = 4;
    }
    fz_step = "A and B disconnect";
    if (fz_s[0].c) conn_abort(fz_s[0].c, "eof");
    if (fz_s[1].c) conn_abort(fz_s[1].c, "eof");
    sw_turn();
    long n = (long)(mem_allocs_total - a0);
    mem_fail_after = -1;
    /* the full teardown (the engine's exit path, not under test) and the byte count */
    fz_ignore = "leak";
    fz_end();
    fz_ignore = getenv("FZ_IGNORE");
    if (mem_live_bytes != fz_mem_base) {
        fprintf(stderr, "sweep: %zd bytes leaked\n", (ssize_t)(mem_live_bytes - fz_mem_base));
        if (!*rc) *rc = 5;
    }
    return n;
}

int main(int argc, char **argv)
{
    long only = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-v")) sw_verbose = 1;
        else if (!strcmp(argv[i], "-k") && i + 1 < argc) only = atol(argv[++i]);
    }
    fz_init();
    int rc;
    if (only >= 0) {
        sw_session(only, &rc);
        printf("%s - sweep: allocation %ld failing alone (rc %d)\n", rc ? "not ok" : "ok", only, rc);
        return rc;
    }
    long n = sw_session(-1, &rc);
    if (rc || mem_live_bytes != fz_mem_base) {
        printf("not ok - sweep: the session without failures is not clean (rc %d)\n", rc);
        return 1;
    }
    long bad = 0, shown = 0;
    for (long k = 0; k < n; k++) {
        int pfd[2];
        fflush(stdout), fflush(stderr);
        if (pipe(pfd) < 0) return 2;
        pid_t pid = fork();
        if (pid < 0) return 2;
        if (pid == 0) {
            close(pfd[0]);
            dup2(pfd[1], 2);
            sw_session(k, &rc);
            fflush(stderr);
            _exit(rc);
        }
        close(pfd[1]);
        static char err[1 << 20];
        size_t el = 0;
        ssize_t r;
        while ((r = read(pfd[0], err + el, sizeof err - 1 - el)) > 0) el += (size_t)r;
        err[el] = 0;
        close(pfd[0]);
        int st;
        waitpid(pid, &st, 0);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0) continue;
        bad++;
        if (shown++ >= 12) continue;
        /* the first informative line and the top of the first stack */
        const char *why = strstr(err, "ERROR: AddressSanitizer");
        if (!why) why = strstr(err, "runtime error");
        if (!why) why = strstr(err, "fz: invariant");
        if (!why) why = strstr(err, "sweep: ");
        if (!why) why = err;
        const char *eol = strchr(why, '\n');
        printf("not ok - sweep: allocation %ld of %ld failing: %.*s\n", k, n,
               (int)(eol ? eol - why : (long)strlen(why)) > 300 ? 300 : (int)(eol ? eol - why : (long)strlen(why)), why);
        const char *f = strstr(why, "    #0 ");
        for (int line = 0; f && line < (sw_verbose ? 12 : 4); line++) {
            const char *e = strchr(f, '\n');
            printf("#   %.*s\n", (int)(e ? e - f : (long)strlen(f)), f + 4);
            f = e ? e + 1 : NULL;
            if (f && strncmp(f, "    #", 5)) break;
        }
        if (sw_verbose) fprintf(stdout, "%s\n", err);
    }
    if (bad)
        printf("not ok - sweep: %ld allocation points, %ld of them mishandled (%ld shown above)\n", n,
               bad, shown < 13 ? shown : 13);
    else
        printf("ok - sweep: %ld allocation points, each failing alone: no crash, invariants held, "
               "at most one connection dropped, replies delivered, no leak\n",
               n);
    return bad ? 1 : 0;
}
