# bench/verdict.awk - the engine-vs-NATS verdict of bench/run.sh, from the "result ... rep=N"
# lines of its pipelined 128 B comparison (scen=pipelined: unpinned; scen=pipelined-pinned:
# every server thread on core 1, the generator on core 0) and its "verdict scen=S reps=N stop=WHY"
# lines. Variables: disturb (other processes' CPU, % of one core, from which a run is disturbed;
# 20), minreps (undisturbed repetitions a verdict needs; 3), maxspread (largest spread of a ratio,
# (max - min) / median in %, for it to count as steady; 10), mode:
#   check   (-v scen=S) exit 0 when S's engine/base ratios of calls/s and of CPU per call are both
#           steady over at least minreps undisturbed repetitions, 1 otherwise (run.sh's loop)
#   table   the markdown: every repetition, then each ratio's median, spread and the verdict
#   smoke   "ok - ..." / "not ok - ..." per placement: CPU per call computed and non-zero for
#           every peer, and the load check ran (other_cpu_pct present)
# base = NATS when NATS was run, else the floor. A ratio engine/peer of one repetition exists
# only when both runs (those kept after run.sh's re-runs) were undisturbed.
BEGIN {
    if (disturb == "") disturb = 20
    if (minreps == "") minreps = 3
    if (maxspread == "") maxspread = 10
    PEERS = "engine nats floor"
}
$1 == "verdict" {
    delete F
    for (i = 2; i <= NF; i++) { k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v); F[k] = v }
    STOP[F["scen"]] = F["stop"]; ELAPSED[F["scen"]] = F["secs"]
    next
}
$1 == "result" {
    delete F
    for (i = 2; i <= NF; i++) { k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v); F[k] = v }
    s = F["scen"]
    if ((s != "pipelined" && s != "pipelined-pinned") || F["rep"] == "") next
    r = F["rep"] + 0; p = F["peer"]
    if (!((s, r) in SEEN)) { SEEN[s, r] = 1; NREP[s]++; if (r > MAXREP[s]) MAXREP[s] = r }
    HAVE[s, r, p] = 1
    if (p == "nats") NATS = 1
    CPS[s, r, p] = F["cps"]
    CPU[s, r, p] = ("srv_stat_cpu_us_call" in F) ? F["srv_stat_cpu_us_call"] : F["srv_cpu_us_call"]
    OTH[s, r, p] = F["other_cpu_pct"]
    TRIES[s, r, p] = F["tries"]
}
function base() { return NATS ? "nats" : "floor" }
function bname(b) { return b == "nats" ? "NATS" : "floor" }
function dist(s, r, p) { return OTH[s, r, p] != "" && OTH[s, r, p] + 0 >= disturb }
# clean(s, r): every peer of the comparison ran in repetition r, none of them disturbed
function clean(s, r,    n, a, i) {
    n = split(PEERS, a, " ")
    for (i = 1; i <= n; i++) {
        if (a[i] == "nats" && !NATS) continue
        if (!((s, r, a[i]) in HAVE) || dist(s, r, a[i])) return 0
    }
    return 1
}
# pair(s, r, b): the engine's and b's runs of repetition r both there and undisturbed
function pair(s, r, b) {
    return ((s, r, "engine") in HAVE) && ((s, r, b) in HAVE) && !dist(s, r, "engine") && !dist(s, r, b)
}
function rat(x, y) { return (x == "" || y == "" || y + 0 == 0) ? "" : x / y }
# ratio(s, r, what, b): engine / b of calls/s ("cps") or of CPU per call ("cpu") in repetition r
function ratio(s, r, what, b) {
    if (what == "cps") return rat(CPS[s, r, "engine"], CPS[s, r, b])
    return rat(CPU[s, r, "engine"], CPU[s, r, b])
}
# stats(s, what, b): over the undisturbed repetitions, sets N, MED, MIN, MAX, SPREAD (%)
function stats(s, what, b,    r, v, a, i, j, t) {
    N = 0; MED = MIN = MAX = SPREAD = ""
    for (r = 1; r <= MAXREP[s]; r++) {
        if (!((s, r) in SEEN) || !pair(s, r, b)) continue
        v = ratio(s, r, what, b)
        if (v == "") continue
        a[++N] = v + 0
    }
    if (N == 0) return
    for (i = 2; i <= N; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    MIN = a[1]; MAX = a[N]
    MED = (N % 2) ? a[(N + 1) / 2] : (a[N / 2] + a[N / 2 + 1]) / 2
    SPREAD = MED > 0 ? 100 * (MAX - MIN) / MED : ""
}
function steady() { return N >= minreps && SPREAD != "" && SPREAD < maxspread }
function f(v, d) { return v == "" ? "—" : sprintf("%." d "f", v) }
function x(v) { return v == "" ? "—" : sprintf("%.2f×", v) }
function label(s) { return s == "pipelined" ? "unpinned" : "pinned" }
function cell(s, r, p, what,    v) {
    if (!((s, r, p) in HAVE)) return "—"
    v = what == "cps" ? f(CPS[s, r, p], 0) : f(CPU[s, r, p], 2)
    return v (dist(s, r, p) ? " ⚠" : "")
}
function others(s, r,    n, a, i, m, t) {
    n = split(PEERS, a, " "); m = ""; t = ""
    for (i = 1; i <= n; i++) if (((s, r, a[i]) in HAVE)) {
        m = m (m == "" ? "" : " / ") (OTH[s, r, a[i]] == "" ? "?" : OTH[s, r, a[i]])
        t = t (t == "" ? "" : "/") (TRIES[s, r, a[i]] == "" ? 1 : TRIES[s, r, a[i]])
    }
    return m " | " t
}
END {
    b = base()
    if (mode == "check") {
        stats(scen, "cps", b); if (!steady()) exit 1
        stats(scen, "cpu", b); if (!steady()) exit 1
        exit 0
    }
    if (mode == "smoke") {
        for (si = 1; si <= 2; si++) {
            s = si == 1 ? "pipelined" : "pipelined-pinned"
            if (!NREP[s]) continue
            ok = 1; msg = ""; load = ""
            n = split(PEERS, a, " ")
            for (i = 1; i <= n; i++) {
                p = a[i]
                if (p == "nats" && !NATS) continue
                c = CPU[s, 1, p]
                if (c == "" || c + 0 <= 0) ok = 0
                if (OTH[s, 1, p] == "") ok = 0
                msg = msg (msg == "" ? "" : ", ") p " " (c == "" ? "missing" : c)
                load = load (load == "" ? "" : "/") (OTH[s, 1, p] == "" ? "missing" : OTH[s, 1, p])
            }
            printf "%s - bench: verdict %s: router CPU µs/call (utime+stime) %s; other processes' CPU %% of a core %s (%s)\n",
                ok ? "ok" : "not ok", label(s), msg, load, clean(s, 1) ? "undisturbed" : "disturbed"
            for (what = 1; what <= 2; what++) {
                w = what == 1 ? "cps" : "cpu"
                stats(s, w, b)
                printf "#   (one short run, not a verdict) engine/%s %s: %s\n", bname(b), w == "cps" ? "calls/s" : "CPU per call",
                    N ? x(MED) : "no ratio (disturbed)"
            }
        }
        exit 0
    }
    print "### Verdict: engine vs " bname(b) ", pipelined 128 B (4 callers × 32 in flight, 4 echo workers)"
    print ""
    print "Each repetition runs the engine, " (NATS ? "NATS and the floor" : "the floor") " one after the other in the same placement. CPU µs/call ="
    print "the router's utime+stime (/proc/PID/stat) over the measured window / calls. \"other\" = CPU of"
    print "other processes during each run, % of one core (/proc/stat busy time minus the benchmark's own"
    print "processes); ⚠ = " disturb " % or more even after the re-runs (\"tries\"): no ratio from that run."
    print "Pinned = every thread of the router under test (engine, nats-server, relay) on core 1, the"
    print "generator on core 0; unpinned = the scheduler's choice."
    print ""
    print "| placement | rep | engine calls/s | " (NATS ? "NATS calls/s | " : "") "floor calls/s | engine CPU µs/call | " (NATS ? "NATS CPU µs/call | " : "") "floor CPU µs/call | other % (" (NATS ? "e / n / f" : "e / f") ") | tries | engine/" bname(b) " calls/s | engine/" bname(b) " CPU/call |"
    print "|---|---:|---:|" (NATS ? "---:|" : "") "---:|---:|" (NATS ? "---:|" : "") "---:|---:|---:|---:|---:|"
    for (si = 1; si <= 2; si++) {
        s = si == 1 ? "pipelined" : "pipelined-pinned"
        for (r = 1; r <= MAXREP[s]; r++) {
            if (!((s, r) in SEEN)) continue
            c = pair(s, r, b)
            printf "| %s | %d | %s | %s%s | %s | %s%s | %s | %s | %s |\n", label(s), r, cell(s, r, "engine", "cps"),
                NATS ? cell(s, r, "nats", "cps") " | " : "", cell(s, r, "floor", "cps"), cell(s, r, "engine", "cpu"),
                NATS ? cell(s, r, "nats", "cpu") " | " : "", cell(s, r, "floor", "cpu"), others(s, r),
                c ? x(ratio(s, r, "cps", b)) : "disturbed", c ? x(ratio(s, r, "cpu", b)) : "disturbed"
        }
    }
    print ""
    print "| placement | ratio | median | min – max | spread | reps with both runs undisturbed / reps | steady (spread < " maxspread " %, ≥ " minreps " reps) |"
    print "|---|---|---:|---:|---:|---:|---|"
    for (si = 1; si <= 2; si++) {
        s = si == 1 ? "pipelined" : "pipelined-pinned"
        if (!NREP[s]) continue
        nb = NATS ? 2 : 1
        for (bi = 1; bi <= nb; bi++) {
            bb = (NATS && bi == 1) ? "nats" : "floor"
            for (what = 1; what <= 2; what++) {
                w = what == 1 ? "cps" : "cpu"
                stats(s, w, bb)
                printf "| %s | engine/%s %s | %s | %s | %s | %d / %d | %s |\n", label(s), bname(bb),
                    w == "cps" ? "calls/s" : "CPU per call", N ? x(MED) : "—", N ? x(MIN) " – " x(MAX) : "—",
                    N ? f(SPREAD, 0) " %" : "—", N, NREP[s], steady() ? "yes" : "no"
            }
        }
    }
    print ""
    for (si = 1; si <= 2; si++) {
        s = si == 1 ? "pipelined" : "pipelined-pinned"
        if (!NREP[s]) continue
        why = STOP[s] == "steady" ? "" : STOP[s] == "time" ? ", stopped by the time bound" : STOP[s] == "reps" ? ", stopped after the most repetitions allowed" : ""
        stats(s, "cps", b); nc = N; mc = MED; sc = SPREAD; okc = steady()
        stats(s, "cpu", b); mu = MED; su = SPREAD; oku = steady()
        if (nc == 0) {
            printf "- **%s: no verdict**%s: in none of the %d repetitions were both the engine's and %s's runs undisturbed (other processes < %d %% of a core); figures above, no ratio.\n", label(s), why, NREP[s], bname(b), disturb
        } else if (nc < minreps) {
            printf "- **%s: no verdict**: the engine's and %s's runs were both undisturbed in only %d of %d repetitions (%d needed)%s; engine/%s %s calls/s, %s CPU per call from those, not a verdict.\n", label(s), bname(b), nc, NREP[s], minreps, why, bname(b), x(mc), x(mu)
        } else if (okc && oku) {
            printf "- **%s: the engine does %s %s's calls/s at %s its CPU per call** (medians of %d undisturbed repetitions; spreads %s %% and %s %%).\n", label(s), x(mc), bname(b), x(mu), nc, f(sc, 0), f(su, 0)
        } else {
            printf "- **%s: not steady**%s: over %d undisturbed repetitions engine/%s calls/s spread %s %% (median %s), CPU per call spread %s %% (median %s); %s.\n", label(s), why, nc, bname(b), f(sc, 0), x(mc), f(su, 0), x(mu),
                oku ? "only the CPU-per-call ratio is steady" : okc ? "only the calls/s ratio is steady" : "neither ratio is a verdict"
        }
    }
}
