"""The workloads of scripts/bench (which starts the cluster and the proxies and calls this).

Each workload runs against a direct connection (A) and through pgsplit (B), alternately,
PAIRS times (A B A B ...), so both see the same machine state; with PGBOUNCER_PORT set, a
PgBouncer run (C) follows each pair as a reference row. Reported per workload:
median throughput of each side, the ratio B/A per pair (median and min-max spread), latency
p50/p99 from pgbench's per-transaction log (of the median run), pgsplit's CPU time per
transaction (utime + stime from /proc, over the B runs) and its RSS.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
ENV = dict(os.environ, PGSSLMODE="disable")


def proc_cpu_us(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_US


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def pgbench(port, user, seconds, extra, password=None, log=True):
    """Run pgbench; returns dict(tps, tx, failed, lat_us sorted list, ok, out). A run is ok
    only when pgbench exited 0, completed transactions and failed none."""
    with tempfile.TemporaryDirectory() as d:
        cmd = ["pgbench", "-n", "-T", str(seconds), "-h", "127.0.0.1", "-p", str(port), "-U", user]
        if log:
            cmd += ["-l", f"--log-prefix={d}/tx"]
        cmd += extra + ["appdb"]
        env = dict(ENV)
        if password:
            env["PGPASSWORD"] = password
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=d)
        out = p.stdout + p.stderr
        tx = re.search(r"number of transactions actually processed: (\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
        lat = []
        if log:
            for name in os.listdir(d):
                if name.startswith("tx"):
                    with open(os.path.join(d, name)) as f:
                        for line in f:
                            # The time column says "failed" or "skipped" for those.
                            fields = line.split()
                            if len(fields) > 2 and fields[2].isdigit():
                                lat.append(int(fields[2]))
        lat.sort()
        n_tx = int(tx.group(1)) if tx else 0
        n_failed = int(failed.group(1)) if failed else 0
        return {
            "tps": float(tps.group(1)) if tps else 0.0,
            "tx": n_tx,
            "failed": n_failed,
            "lat": lat,
            "ok": p.returncode == 0 and tps is not None and n_tx > 0 and n_failed == 0,
            "out": out,
        }


def pct(lat, q):
    """Nearest-rank percentile of a sorted list."""
    if not lat:
        return 0
    return lat[max(0, math.ceil(q * len(lat)) - 1)]


def median_run(runs):
    """The run of median throughput (the lower one of an even count), or None."""
    if not runs:
        return None
    return sorted(runs, key=lambda r: r["tps"])[(len(runs) - 1) // 2]


def figures(run):
    """(tps, p50 µs, p99 µs) of a run, Nones for none."""
    if run is None:
        return None, None, None
    return round(run["tps"]), pct(run["lat"], 0.5), pct(run["lat"], 0.99)


def spread(ratios):
    """(median, min, max) of ratios, rounded; Nones when there are none."""
    if not ratios:
        return None, None, None
    return (round(statistics.median_low(ratios), 3), round(min(ratios), 3),
            round(max(ratios), 3))


# Names of the runs that failed: the figures leave them out, and the bench exits 1.
FAILURES = []


def checked(name, side, run):
    if not run["ok"]:
        FAILURES.append(f"{name} ({side})")
        print(f"  {name}: {side} pgbench run failed ({run['failed']} failed transactions):\n"
              f"{run['out'][-800:]}", file=sys.stderr)
    return run["ok"]


def ab(name, direct_port, proxy_port, pid, args, seconds, pairs, user="trustuser",
       password=None, log=True, bouncer=None):
    """Alternate direct and proxied runs (and PgBouncer's, when given); summarise. A ratio
    is taken only from a pair whose two runs both succeeded."""
    a_runs, b_runs, ratios, cpu, tx = [], [], [], 0.0, 0
    c_runs, c_ratios, c_cpu, c_tx, c_failed = [], [], 0.0, 0, False
    for _ in range(pairs):
        a = pgbench(direct_port, user, seconds, args, password, log)
        c0 = proc_cpu_us(pid)
        b = pgbench(proxy_port, user, seconds, args, password, log)
        b_cpu = proc_cpu_us(pid) - c0
        a_ok, b_ok = checked(name, "direct", a), checked(name, "pgsplit", b)
        if a_ok:
            a_runs.append(a)
        if b_ok:
            b_runs.append(b)
            cpu += b_cpu
            tx += b["tx"]
            if a_ok:
                ratios.append(b["tps"] / a["tps"])
        if bouncer:
            c0 = proc_cpu_us(bouncer[1])
            c = pgbench(bouncer[0], user, seconds, args, password, log)
            c_cpu_run = proc_cpu_us(bouncer[1]) - c0
            # PgBouncer failing a workload is a finding about PgBouncer, not a bench error.
            if c["ok"]:
                c_runs.append(c)
                c_cpu += c_cpu_run
                c_tx += c["tx"]
                if a_ok:
                    c_ratios.append(c["tps"] / a["tps"])
            else:
                c_failed = True
    a_tps, a_p50, a_p99 = figures(median_run(a_runs))
    b_tps, b_p50, b_p99 = figures(median_run(b_runs))
    ratio, ratio_min, ratio_max = spread(ratios)
    result = {
        "workload": name,
        "failed_runs": {"direct": pairs - len(a_runs), "pgsplit": pairs - len(b_runs)},
        "direct_tps": a_tps,
        "pgsplit_tps": b_tps,
        "ratio": ratio,
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "direct_p50_us": a_p50,
        "direct_p99_us": a_p99,
        "pgsplit_p50_us": b_p50,
        "pgsplit_p99_us": b_p99,
        "cpu_us_per_tx": round(cpu / tx, 1) if tx else None,
        "rss_kib": proc_rss_kib(pid),
    }
    if bouncer:
        c_tps, c_p50, c_p99 = figures(median_run(c_runs))
        c_ratio, c_min, c_max = spread(c_ratios)
        # PgBouncer is a reference, not a contender: it pools but neither parses nor splits.
        result["pgbouncer"] = {
            "failed": c_failed,
            "tps": c_tps,
            "ratio": c_ratio,
            "ratio_min": c_min,
            "ratio_max": c_max,
            "p50_us": c_p50,
            "p99_us": c_p99,
            "cpu_us_per_tx": round(c_cpu / c_tx, 1) if c_tx else None,
        }
    return result


def cache_counters(metrics_port):
    """(hits, other lookups) from the caching proxy's /metrics: misses, and lookups that
    bypassed Redis (a timeout, the open breaker), which count as neither hit nor miss.
    (0, 0) with a note when the metrics cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        print(f"  cached: /metrics unreadable: {e}", file=sys.stderr)
        return 0.0, 0.0
    def total(name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{", 1)[0].split(" ", 1)[0] == name)
    others = total("pgsplit_cache_misses_total") + total("pgsplit_cache_bypassed_total")
    return total("pgsplit_cache_hits_total"), others


def cached(env, seconds, pairs):
    """A whitelisted point read: direct, through pgsplit from the replicas, from the cache,
    in rounds (like the A/B pairs), with the cache/replicas ratio of each round and the share
    of the cache runs' lookups that hit."""
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "point.sql")
        with open(script, "w") as f:
            f.write("\\set aid random(1, 1000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n")
        args = ["-f", script, "-M", "prepared", "-c", "16", "-j", "2"]
        # Warm the cache (its entries outlive the bench: the rule's TTL is an hour).
        checked("cached", "warm-up", pgbench(env["CACHE_PORT"], "trustuser", 3, args, log=False))
        labels = (("direct", env["PGSPLIT_PRIMARY_PORT"]),
                  ("pgsplit-replicas", env["PROXY_PORT"]),
                  ("pgsplit-cache", env["CACHE_PORT"]))
        runs = {label: [] for label, _ in labels}
        ratios = []
        hits0, misses0 = cache_counters(env["CACHE_METRICS_PORT"])
        for _ in range(pairs):
            round_runs = {}
            for label, port in labels:
                r = pgbench(port, "trustuser", seconds, args)
                if checked("cached", label, r):
                    runs[label].append(r)
                    round_runs[label] = r
            if "pgsplit-cache" in round_runs and "pgsplit-replicas" in round_runs:
                ratios.append(round_runs["pgsplit-cache"]["tps"]
                              / round_runs["pgsplit-replicas"]["tps"])
        hits1, misses1 = cache_counters(env["CACHE_METRICS_PORT"])
        rows = {}
        for label, _ in labels:
            tps, p50, p99 = figures(median_run(runs[label]))
            rows[label] = {"tps": tps, "p50_us": p50, "p99_us": p99}
        ratio, ratio_min, ratio_max = spread(ratios)
        rows["cache_vs_replicas"] = ratio
        rows["cache_vs_replicas_min"] = ratio_min
        rows["cache_vs_replicas_max"] = ratio_max
        lookups = (hits1 - hits0) + (misses1 - misses0)
        # Every transaction of a cache run is one lookup: fewer counted means the metrics
        # missed some.
        cache_tx = sum(r["tx"] for r in runs["pgsplit-cache"])
        lookups = max(lookups, cache_tx)
        rows["hit_ratio"] = round((hits1 - hits0) / lookups, 4) if lookups else None
        if rows["hit_ratio"] is None or rows["hit_ratio"] < 0.99:
            FAILURES.append("cached (hit ratio)")
            print(f"  cached: the cache runs hit {rows['hit_ratio']} of their lookups, "
                  "expected nearly all", file=sys.stderr)
        return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated workload names")
    opts = ap.parse_args()
    if opts.pairs < 1 or opts.seconds < 1:
        raise SystemExit("--pairs and --seconds must be at least 1")
    if opts.pairs < 3:
        print(f"note: {opts.pairs} pair(s): the ratios carry no meaningful spread "
              "(issue #8 asks for at least 3)", file=sys.stderr)
    env = {k: os.environ[k] for k in
           ("PGSPLIT_PRIMARY_PORT", "PROXY_PORT", "PROXY_PID", "CACHE_PORT",
            "CACHE_METRICS_PORT")}
    primary, proxy, pid = env["PGSPLIT_PRIMARY_PORT"], env["PROXY_PORT"], int(env["PROXY_PID"])
    bouncer = None
    if os.environ.get("PGBOUNCER_PORT"):
        bouncer = (os.environ["PGBOUNCER_PORT"], int(os.environ["PGBOUNCER_PID"]))
    T, P = opts.seconds, opts.pairs
    workloads = [
        ("select-simple", ["-S", "-M", "simple", "-c", "16", "-j", "2"], {}),
        ("select-extended", ["-S", "-M", "extended", "-c", "16", "-j", "2"], {}),
        ("select-prepared", ["-S", "-M", "prepared", "-c", "16", "-j", "2"], {}),
        ("tpcb-prepared", ["-M", "prepared", "-c", "16", "-j", "2"],
         {"user": "app", "password": "app_pw"}),
        ("select-1-client", ["-S", "-M", "prepared", "-c", "1", "-j", "1"], {}),
        ("churn-scram", ["-S", "-C", "-c", "4", "-j", "2"],
         {"user": "app", "password": "app_pw", "log": False}),
        ("churn-md5", ["-S", "-C", "-c", "4", "-j", "2"],
         {"user": "md5user", "password": "md5_pw", "log": False}),
    ]
    only = {w.strip() for w in opts.only.split(",")} if opts.only else None
    results = []
    header = (f"{'workload':<17} {'direct':>8} {'pgsplit':>8} {'ratio':>6} {'spread':>12} "
              f"{'p50 d/p':>12} {'p99 d/p':>13} {'cpu_us/tx':>9} {'rss_MiB':>7}")
    print(header)
    for name, args, kw in workloads:
        if only and name not in only:
            continue
        r = ab(name, primary, proxy, pid, args, T, P, bouncer=bouncer, **kw)
        results.append(r)
        spread_text = f"{r['ratio_min']}-{r['ratio_max']}" if r["ratio"] is not None else "-"
        print(f"{name:<17} {str(r['direct_tps']):>8} {str(r['pgsplit_tps']):>8} "
              f"{str(r['ratio']):>6} {spread_text:>12} "
              f"{str(r['direct_p50_us']):>5}/{str(r['pgsplit_p50_us']):<6} "
              f"{str(r['direct_p99_us']):>6}/{str(r['pgsplit_p99_us']):<6} "
              f"{str(r['cpu_us_per_tx']):>9} {r['rss_kib'] / 1024:>7.1f}", flush=True)
        if bouncer:
            c = r["pgbouncer"]
            if c["failed"]:
                print(f"{'  pgbouncer':<17} {'':>8} {'fails':>8}", flush=True)
            else:
                c_spread = f"{c['ratio_min']}-{c['ratio_max']}" if c["ratio"] is not None else "-"
                print(f"{'  pgbouncer':<17} {'':>8} {c['tps']:>8} {str(c['ratio']):>6} "
                      f"{c_spread:>12} {'':>5} {c['p50_us']:<6} {'':>6} {c['p99_us']:<6} "
                      f"{str(c['cpu_us_per_tx']):>9}", flush=True)
    one = next((r for r in results if r["workload"] == "select-1-client"), None)
    if one and None not in (one["pgsplit_p50_us"], one["direct_p50_us"]):
        # Direct runs read the primary, pgsplit's the replicas (as the ratios do).
        print(f"added latency, 1 client: p50 {one['pgsplit_p50_us'] - one['direct_p50_us']} us, "
              f"p99 {one['pgsplit_p99_us'] - one['direct_p99_us']} us")
    cache = None
    if not only or "cached" in only:
        cache = cached(env, T, P)
        print("whitelisted point read, 16 clients (median of rounds):")
        for label in ("direct", "pgsplit-replicas", "pgsplit-cache"):
            c = cache[label]
            print(f"  {label:<18} {str(c['tps']):>8} tps  p50 {c['p50_us']} us  "
                  f"p99 {c['p99_us']} us")
        print(f"  cache / replicas: {cache['cache_vs_replicas']}x "
              f"(spread {cache['cache_vs_replicas_min']}-{cache['cache_vs_replicas_max']}), "
              f"hit ratio {cache['hit_ratio']}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"machine_cores": os.cpu_count(), "seconds_per_run": T, "pairs": P,
                       "failures": FAILURES, "workloads": results, "cached_point_read": cache},
                      f, indent=1)
    if FAILURES:
        print(f"FAILED runs (left out of the figures): {', '.join(FAILURES)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
