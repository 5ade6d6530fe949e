# bench/table.awk - turns bench/build/results.txt (lines of key=value written by bench/bench and
# bench/run.sh) into the markdown tables of BENCHMARKS.md. Repeated runs of one (scenario, peer,
# size) are reduced to the median of each figure over its undisturbed runs (other processes
# used under 20 % of a core meanwhile); when every run of it was disturbed, over those, flagged
# ⚠ and without a ratio (as in bench/verdict.awk). Missing figures print as "—".
$1 == "verdict" { next }
{
    scen = ""; peer = ""; size = ""
    for (i = 2; i <= NF; i++) {
        k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v)
        if (k == "scen") scen = v; else if (k == "peer") peer = v; else if (k == "size") size = v
    }
    id = scen "|" peer "|" size
    d = 0
    for (i = 2; i <= NF; i++)
        if ($i ~ /^other_cpu_pct=/) {
            v = $i; sub(/^[^=]*=/, "", v); OTHER[++NO] = v + 0
            if (v + 0 >= 20) d = 1
        }
    if (d) NDIST[id]++; else NCLEAN[id]++
    for (i = 2; i <= NF; i++) {
        k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v)
        if (k == "scen" || k == "peer" || k == "size") continue
        if (k == "kind") { id = scen "|" peer "|" v; continue }
        if (d) VD[id, k] = (VD[id, k] == "" ? v : VD[id, k] " " v)
        else V[id, k] = (V[id, k] == "" ? v : V[id, k] " " v)
    }
}

# med(id, k): the median over the undisturbed runs, or over the disturbed ones when there are
# no others (flag(id) marks those).
function med(id, k,    n, a, i, j, t) {
    if ((id, k) in V) n = split(V[id, k], a, " ")
    else if ((id, k) in VD) n = split(VD[id, k], a, " ")
    else return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return a[int((n + 1) / 2)]
}
# str(id, k): a text figure (the first one recorded).
function str(id, k,    a) {
    if ((id, k) in V) split(V[id, k], a, " ")
    else if ((id, k) in VD) split(VD[id, k], a, " ")
    else return ""
    return a[1]
}
function fmt(v, d) {
    if (v == "") return "—"
    if (d == 0) return sprintf("%.0f", v)
    return sprintf("%." d "f", v)
}
function ratio(a, b) {
    if (a == "" || b == "" || b + 0 == 0 || a == "x" || b == "x") return "—"
    return sprintf("%.2f×", a / b)
}
# row(label, metric, scen, size, key, decimals): one line with the four peers and two ratios.
# flag(id): a mark on figures from runs during which other processes used >= 20 % of a core
# (only when no undisturbed run of that cell is left).
function dis(id) { return NDIST[id] > 0 && !NCLEAN[id] }
function flag(id) { if (dis(id)) { FLAGGED = 1; return " ⚠" } return "" }
# rv(id, v): v, or "x" (no ratio) for a figure from disturbed runs only
function rv(id, v) { return dis(id) ? "x" : v }
function row(label, metric, scen, size, key, d,    e, n, f, x, ie, in_, if_) {
    ie = scen "|engine|" size; in_ = scen "|nats|" size; if_ = scen "|floor|" size
    e = med(ie, key); n = med(in_, key)
    f = med(if_, key); x = med(scen "|direct|" size, key)
    printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", label, metric, fmt(e, d) flag(ie), fmt(n, d) flag(in_),
        fmt(f, d) flag(if_), fmt(x, d) flag(scen "|direct|" size), ratio(rv(ie, e), rv(in_, n)), ratio(rv(ie, e), rv(if_, f))
}
function eng(label, v, note) {
    printf "| %s | %s | %s |\n", label, (v == "" ? "—" : v), note
}
function human(b) {
    if (b >= 1048576) return (b / 1048576) " MiB"
    if (b >= 1024) return (b / 1024) " KiB"
    return b " B"
}

END {
    if (NO) {
        for (i = 2; i <= NO; i++) { t = OTHER[i]; for (j = i - 1; j >= 1 && OTHER[j] > t; j--) OTHER[j + 1] = OTHER[j]; OTHER[j + 1] = t }
        printf "- CPU used by other processes while the %d measured runs went on (from /proc/stat, %% of one core): median %s, max %s\n\n", NO, OTHER[int((NO + 1) / 2)], OTHER[NO]
    }
    print "| scenario | metric | iii engine | NATS | floor (relay) | direct WS | engine/NATS | engine/floor |"
    print "|---|---|---:|---:|---:|---:|---:|---:|"
    s = "serial, 128 B, 1 caller, 1 echo worker, 1 call in flight, same core"
    row(s, "calls/s", "serial", 128, "cps", 0)
    row(s, "p50 latency µs", "serial", 128, "p50_us", 1)
    row(s, "p90 latency µs", "serial", 128, "p90_us", 1)
    row(s, "p99 latency µs", "serial", 128, "p99_us", 1)
    row(s, "router CPU µs/call", "serial", 128, "srv_cpu_us_call", 2)
    s = "serial, 128 B, cross core (router on core 1, generator on core 0)"
    row(s, "calls/s", "serial-cross", 128, "cps", 0)
    row(s, "p50 latency µs", "serial-cross", 128, "p50_us", 1)
    row(s, "p99 latency µs", "serial-cross", 128, "p99_us", 1)
    row(s, "router CPU µs/call", "serial-cross", 128, "srv_cpu_us_call", 2)
    p = "pipelined, 128 B, 4 callers × 32 in flight, 4 echo workers, unpinned"
    row(p, "calls/s", "pipelined", 128, "cps", 0)
    row(p, "p50 latency µs", "pipelined", 128, "p50_us", 1)
    row(p, "p99 latency µs", "pipelined", 128, "p99_us", 1)
    row(p, "router CPU µs/call", "pipelined", 128, "srv_cpu_us_call", 2)
    row(p, "router CPU µs/call, utime+stime", "pipelined", 128, "srv_stat_cpu_us_call", 2)
    row(p, "router CPU % of a core", "pipelined", 128, "srv_cpu_pct", 0)
    row(p, "generator CPU % of a core", "pipelined", 128, "gen_cpu_pct", 0)
    row(p, "router RSS kB after the run", "pipelined", 128, "srv_rss_kb", 0)
    p = "pipelined, 128 B, 4 callers × 32 in flight, pinned (router on core 1, generator on core 0)"
    row(p, "calls/s", "pipelined-pinned", 128, "cps", 0)
    row(p, "p99 latency µs", "pipelined-pinned", 128, "p99_us", 1)
    row(p, "router CPU µs/call, utime+stime", "pipelined-pinned", 128, "srv_stat_cpu_us_call", 2)
    row(p, "router CPU % of a core", "pipelined-pinned", 128, "srv_cpu_pct", 0)
    split("128 1024 16384 65536 1048576", S, " ")
    for (i = 1; i <= 5; i++) {
        z = S[i]
        row("sweep " human(z) ", serial, same core", "calls/s", "sweep-serial", z, "cps", 0)
        row("sweep " human(z) ", serial, same core", "p50 latency µs", "sweep-serial", z, "p50_us", 1)
        row("sweep " human(z) ", 2 callers × 8 in flight, 2 workers", "calls/s", "sweep-pipe", z, "cps", 0)
        row("sweep " human(z) ", 2 callers × 8 in flight, 2 workers", "payload MB/s (each way)", "sweep-pipe", z, "mbps", 1)
    }
    n = med("conns|engine|", "n"); if (n == "") n = med("conns|nats|", "n")
    c = "connections: " n " idle workers, one function (NATS: one subscription) each"
    row(c, "time to register all, s", "conns", "", "secs", 3)
    row(c, "router RSS per connection, B", "conns", "", "rss_per_conn_b", 0)
    row(c, "router CPU µs per connection", "conns", "", "srv_cpu_us_conn", 1)
    q = (med("conns|engine|", "probe_pinned") == 1 ? ", same core" : ", unpinned")
    row(c, "serial 128 B p50 µs before they connect" q, "conns", "", "probe0_p50_us", 1)
    row(c, "serial 128 B p50 µs while they are connected" q, "conns", "", "probeN_p50_us", 1)
    row(c, "serial 128 B calls/s while they are connected" q, "conns", "", "probeN_cps", 0)
    k = "cleanup: worker with 200 functions, 1,000 calls in flight, disconnects"
    row(k, "ms until every caller has invocation_stopped (median)", "cleanup", "", "stop_ms_p50", 2)
    row(k, "ms, worst round", "cleanup", "", "stop_ms_max", 2)
    t = "startup (median of rounds)"
    row(t, "exec → listening, ms", "startup", "", "listen_ms_p50", 2)
    row(t, "exec → first successful call, ms", "startup", "", "first_call_ms_p50", 2)
    print ""
    print "Figures are medians over the undisturbed runs (other processes under 20 % of a core meanwhile)."
    if (FLAGGED) print "⚠ = every run behind this figure was disturbed (other processes used 20 % of a core or more, see other_cpu_pct in bench/build/results.txt): the median of those runs, and no ratio from it.\n"
    else print ""
    print "NATS has no counterpart of the cleanup scenario (a request whose responder vanishes just times out"
    print "at the caller); the floor and the direct hop have no registry, so no connection or cleanup figures."
    print ""
    print "Engine only:"
    print ""
    print "| figure | value | how it was measured |"
    print "|---|---:|---|"
    eng("allocations per routed call (serial)", fmt(med("serial|engine|128", "metric_allocs_call"), 3), "delta of /metrics `" str("serial|engine|128", "metric_allocs_name") "` over the measured calls")
    eng("allocations per routed call (pipelined)", fmt(med("pipelined|engine|128", "metric_allocs_call"), 3), "same, pipelined run")
    eng("syscalls per routed call (serial)", fmt(med("perf-serial|engine|", "syscalls_call"), 2), "perf stat -e raw_syscalls:sys_enter -p ENGINE, separate run")
    eng("syscalls per routed call (pipelined)", fmt(med("perf-pipelined|engine|", "syscalls_call"), 2), "same, pipelined run")
    eng("context switches per routed call (serial)", fmt(med("perf-serial|engine|", "cs_call"), 2), "perf stat -e context-switches")
    eng("context switches per routed call (pipelined)", fmt(med("perf-pipelined|engine|", "cs_call"), 2), "same, pipelined run")
    eng("instructions per routed call (serial, 128 B)", fmt(med("callgrind|engine|", "ir_call"), 0), "valgrind --tool=callgrind, counters zeroed before 20,000 calls (call + result, both hops)")
    eng("engine-accounted bytes per idle connection", fmt(med("conns|engine|", "mem_per_conn_b"), 0), "delta of /metrics `iii_memory_bytes` / connections")
    eng("time for the " med("conns|engine|", "n") " connections to close and be reaped, ms", fmt(med("conns|engine|", "close_all_ms"), 1), "all closed at once; until /metrics shows the baseline")
    eng("RSS after serving the pipelined run, kB", fmt(med("pipelined|engine|128", "srv_rss_kb"), 0), "/proc/PID/status VmRSS")
    eng("stripped binary, default build (glibc, dynamic)", fmt(med("size|engine|default", "bytes"), 0) " B", "cc -std=c99 -O2 (Makefile flags), strip")
    eng("stripped binary, static musl build", fmt(med("size|engine|musl", "bytes"), 0) " B", "musl-gcc -static -std=c99 -O2, strip")
    eng("startup, static musl: exec → listening / first call, ms", fmt(med("startup-musl|engine|", "listen_ms_p50"), 2) " / " fmt(med("startup-musl|engine|", "first_call_ms_p50"), 2), "median of rounds")
    eng("SIGTERM → exit, sent right after the clients disconnected, ms", fmt(med("startup|engine|", "sigterm_exit_ms_p50"), 2), "median of the startup rounds (NATS: " fmt(med("startup|nats|", "sigterm_exit_ms_p50"), 2) " ms)")
}
