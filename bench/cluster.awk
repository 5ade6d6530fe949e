# bench/cluster.awk - turns the "result ... rep=N" lines of bench/cluster.sh into its two tables:
# one call three ways (local, cross-engine, raw NATS) and 1 engine vs 2 engines. Figures are
# medians over the repetitions; a pair's calls/s is the sum of its two generators in one
# repetition. -v pin=1 when the pinned runs were made. With -v mode=pair-other it reads the two
# result lines of one pair and prints how much of a core other processes used meanwhile (each
# generator's other_cpu_pct counts the other generator: that is taken out; mean of the two).
# A cell is flagged ⚠ when most of its repetitions were disturbed (20 % of a core or more).
/^result / {
    scen = ""; rep = ""
    delete F
    for (i = 2; i <= NF; i++) {
        k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v)
        F[k] = v
    }
    scen = F["scen"]; rep = F["rep"]
    for (k in F) if (k != "scen" && k != "rep" && k != "peer") V[scen, k] = (V[scen, k] == "" ? F[k] : V[scen, k] " " F[k])
    # pairs: scaleX-g1 / scaleX-g2 -> per repetition sums
    if (scen ~ /-g[12]$/) {
        s = scen; sub(/-g[12]$/, "", s)
        g = substr(scen, length(scen))
        PO[s, rep, g] = F["other_cpu_pct"]; PGC[s, rep, g] = F["gen_cpu_pct"]
        PC[s, rep] += F["cps"]; PG[s, rep] += F["gen_cpu_pct"]
        # one engine: both generators see the same engine, count it once
        if (s ~ /^scale1/) { if (scen ~ /-g1$/) PE[s, rep] += F["srv_cpu_pct"] } else PE[s, rep] += F["srv_cpu_pct"]
        REPS[s] = REPS[s] " " rep
    } else {
        NR_[scen]++
        if (F["other_cpu_pct"] + 0 >= 20) ND[scen]++
    }
}
function pother(s, rep,    a, b) {
    a = PO[s, rep, 1] - PGC[s, rep, 2]; b = PO[s, rep, 2] - PGC[s, rep, 1]
    a = (a + b) / 2
    return a > 0 ? a : 0
}
function pdist(s,    n, a, i, seen, d, k) {
    n = split(REPS[s], a, " "); d = 0; k = 0
    for (i = 1; i <= n; i++) if (!(a[i] in seen)) { seen[a[i]] = 1; k++; if (pother(s, a[i]) >= 20) d++ }
    return 2 * d > k
}
function sortmed(list,    n, a, i, j, t) {
    n = split(list, a, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return a[int((n + 1) / 2)]
}
function med(s, k) { return ((s, k) in V) ? sortmed(V[s, k]) : "" }
function pmed(arr, s,    n, a, i, l, seen) {
    l = ""
    n = split(REPS[s], a, " ")
    for (i = 1; i <= n; i++) if (!(a[i] in seen)) { seen[a[i]] = 1; l = l " " (arr == "c" ? PC[s, a[i]] : arr == "g" ? PG[s, a[i]] : PE[s, a[i]]) }
    return sortmed(l)
}
function fmt(v, d) { if (v == "") return "—"; return sprintf("%." d "f", v) }
function ratio(a, b) { if (a == "" || b == "" || b + 0 == 0) return "—"; return sprintf("%.2f×", a / b) }
function cell(s, k, d) { return fmt(med(s, k), d) (2 * ND[s] > NR_[s] ? " ⚠" : "") }
function row(label, metric, base, k, d,    l, c, n) {
    l = med(base "-local", k); c = med(base "-cross", k); n = med(base "-nats", k)
    if (l == "" && c == "" && n == "") return
    printf "| %s | %s | %s | %s | %s | %s | %s |\n", label, metric, cell(base "-local", k, d), cell(base "-cross", k, d),
        cell(base "-nats", k, d), ratio(c, l), ratio(c, n)
}
function srow(label, s1, s2,    c1, c2) {
    c1 = pmed("c", s1); c2 = pmed("c", s2)
    if (c1 == "" && c2 == "") return
    printf "| %s | %s%s | %s%s | %s | %s | %s | %s / %s |\n", label, fmt(c1, 0), pdist(s1) ? " ⚠" : "",
        fmt(c2, 0), pdist(s2) ? " ⚠" : "", ratio(c2, c1),
        fmt(pmed("e", s1), 0), fmt(pmed("e", s2), 0), fmt(pmed("g", s1), 0), fmt(pmed("g", s2), 0)
}
END {
    if (mode == "pair-other") {
        for (k in PO) { split(k, q, SUBSEP); printf "%.0f\n", pother(q[1], q[2]); exit }
        exit
    }
    print "One call, three ways: `local` = worker and caller on engine a; `cross` = worker on engine a, caller on engine b"
    print "(b → NATS → a → worker → a → NATS → b); `NATS` = raw request/reply to a queue group of echo responders."
    print ""
    print "| scenario | metric | one engine (local) | cross-engine | raw NATS | cross / local | cross / NATS |"
    print "|---|---|---:|---:|---:|---:|---:|"
    S1 = "serial, 1 caller, 1 worker, 1 in flight, same core"
    if (pin) {
        row(S1, "calls/s", "serial-same", "cps", 0)
        row(S1, "p50 latency µs", "serial-same", "p50_us", 1)
        row(S1, "p99 latency µs", "serial-same", "p99_us", 1)
        row(S1, "CPU µs/call, all servers", "serial-same", "all_srv_cpu_us_call", 2)
    }
    S2 = "serial, 1 caller, 1 worker, 1 in flight, unpinned"
    row(S2, "calls/s", "serial", "cps", 0)
    row(S2, "p50 latency µs", "serial", "p50_us", 1)
    row(S2, "p99 latency µs", "serial", "p99_us", 1)
    S3 = "pipelined, 4 callers × 32 in flight, 4 workers, unpinned"
    row(S3, "calls/s", "pipelined", "cps", 0)
    row(S3, "p50 latency µs", "pipelined", "p50_us", 1)
    row(S3, "p99 latency µs", "pipelined", "p99_us", 1)
    row(S3, "CPU µs/call, all servers", "pipelined", "all_srv_cpu_us_call", 2)
    row(S3, "CPU % of a core, all servers", "pipelined", "all_srv_cpu_pct", 0)
    row(S3, "generator CPU % of a core", "pipelined", "gen_cpu_pct", 0)
    print ""
    print "1 engine vs 2 engines: two generators side by side, each 2 callers × 32 in flight and 2 echo workers"
    print "(its own function ids); 1 engine = both on one engine (no cluster); 2 engines = one generator on"
    print "each engine of the cluster (calls stay local)."
    print ""
    print "| placement | calls/s, 1 engine | calls/s, 2 engines | 2 engines / 1 | engine CPU % of a core, 1 engine | engines' CPU %, 2 engines | generators' CPU %, 1 / 2 engines |"
    print "|---|---:|---:|---:|---:|---:|---:|"
    srow("unpinned", "scale1", "scale2")
    if (pin) srow("pinned (1: engine core 0, generators core 1; 2: a + its generator core 0, b + its generator core 1)", "scale1-pinned", "scale2-pinned")
}
