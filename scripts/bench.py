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
import os
import re
import statistics
import subprocess
import sys
import tempfile

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
    """Run pgbench; returns dict(tps, tx, lat_us sorted list, ok, out)."""
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
        tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
        lat = []
        if log:
            for name in os.listdir(d):
                if name.startswith("tx"):
                    with open(os.path.join(d, name)) as f:
                        lat.extend(int(line.split()[2]) for line in f if line.strip())
        lat.sort()
        return {
            "tps": float(tps.group(1)) if tps else 0.0,
            "tx": int(tx.group(1)) if tx else 0,
            "lat": lat,
            "ok": p.returncode == 0 and tps is not None,
            "out": out,
        }


def pct(lat, q):
    if not lat:
        return 0
    return lat[min(len(lat) - 1, int(q * len(lat)))]


def ab(name, direct_port, proxy_port, pid, args, seconds, pairs, user="trustuser",
       password=None, log=True, bouncer=None):
    """Alternate direct and proxied runs (and PgBouncer's, when given); summarise."""
    a_runs, b_runs, ratios, cpu, tx = [], [], [], 0.0, 0
    c_runs, c_ratios, c_cpu, c_tx, c_failed = [], [], 0.0, 0, False
    for _ in range(pairs):
        a = pgbench(direct_port, user, seconds, args, password, log)
        c0 = proc_cpu_us(pid)
        b = pgbench(proxy_port, user, seconds, args, password, log)
        cpu += proc_cpu_us(pid) - c0
        tx += b["tx"]
        for r in (a, b):
            if not r["ok"]:
                print(f"  {name}: pgbench failed:\n{r['out'][-800:]}", file=sys.stderr)
        a_runs.append(a)
        b_runs.append(b)
        if a["tps"] > 0:
            ratios.append(b["tps"] / a["tps"])
        if bouncer:
            c0 = proc_cpu_us(bouncer[1])
            c = pgbench(bouncer[0], user, seconds, args, password, log)
            c_cpu += proc_cpu_us(bouncer[1]) - c0
            c_tx += c["tx"]
            c_failed |= not c["ok"]
            c_runs.append(c)
            if a["tps"] > 0:
                c_ratios.append(c["tps"] / a["tps"])
    med = lambda runs: sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
    a_med, b_med = med(a_runs), med(b_runs)
    result = {
        "workload": name,
        "direct_tps": round(a_med["tps"]),
        "pgsplit_tps": round(b_med["tps"]),
        "ratio": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_min": round(min(ratios), 3) if ratios else None,
        "ratio_max": round(max(ratios), 3) if ratios else None,
        "direct_p50_us": pct(a_med["lat"], 0.5),
        "direct_p99_us": pct(a_med["lat"], 0.99),
        "pgsplit_p50_us": pct(b_med["lat"], 0.5),
        "pgsplit_p99_us": pct(b_med["lat"], 0.99),
        "cpu_us_per_tx": round(cpu / tx, 1) if tx else None,
        "rss_kib": proc_rss_kib(pid),
    }
    if bouncer:
        c_med = med(c_runs)
        # PgBouncer is a reference, not a contender: it pools but neither parses nor splits.
        result["pgbouncer"] = {
            "failed": c_failed,
            "tps": round(c_med["tps"]),
            "ratio": round(statistics.median(c_ratios), 3) if c_ratios else None,
            "ratio_min": round(min(c_ratios), 3) if c_ratios else None,
            "ratio_max": round(max(c_ratios), 3) if c_ratios else None,
            "p50_us": pct(c_med["lat"], 0.5),
            "p99_us": pct(c_med["lat"], 0.99),
            "cpu_us_per_tx": round(c_cpu / c_tx, 1) if c_tx else None,
        }
    return result


def cached(env, seconds, pairs):
    """A whitelisted point read: direct, through pgsplit from the replicas, from the cache."""
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "point.sql")
        with open(script, "w") as f:
            f.write("\\set aid random(1, 1000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n")
        args = ["-f", script, "-M", "prepared", "-c", "16", "-j", "2"]
        # Warm the cache.
        pgbench(env["CACHE_PORT"], "trustuser", 3, args, log=False)
        rows = {}
        for label, port in (("direct", env["PGSPLIT_PRIMARY_PORT"]),
                            ("pgsplit-replicas", env["PROXY_PORT"]),
                            ("pgsplit-cache", env["CACHE_PORT"])):
            runs = [pgbench(port, "trustuser", seconds, args) for _ in range(pairs)]
            m = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
            rows[label] = {"tps": round(m["tps"]), "p50_us": pct(m["lat"], 0.5),
                           "p99_us": pct(m["lat"], 0.99)}
        rows["cache_vs_replicas"] = round(
            rows["pgsplit-cache"]["tps"] / max(1, rows["pgsplit-replicas"]["tps"]), 2)
        return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated workload names")
    opts = ap.parse_args()
    env = {k: os.environ[k] for k in
           ("PGSPLIT_PRIMARY_PORT", "PROXY_PORT", "PROXY_PID", "CACHE_PORT")}
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
    only = set(opts.only.split(",")) if opts.only else None
    results = []
    header = (f"{'workload':<17} {'direct':>8} {'pgsplit':>8} {'ratio':>6} {'spread':>12} "
              f"{'p50 d/p':>12} {'p99 d/p':>13} {'cpu_us/tx':>9} {'rss_MiB':>7}")
    print(header)
    for name, args, kw in workloads:
        if only and name not in only:
            continue
        r = ab(name, primary, proxy, pid, args, T, P, bouncer=bouncer, **kw)
        results.append(r)
        spread = f"{r['ratio_min']}-{r['ratio_max']}" if r["ratio"] is not None else "-"
        print(f"{name:<17} {r['direct_tps']:>8} {r['pgsplit_tps']:>8} {str(r['ratio']):>6} "
              f"{spread:>12} {r['direct_p50_us']:>5}/{r['pgsplit_p50_us']:<6} "
              f"{r['direct_p99_us']:>6}/{r['pgsplit_p99_us']:<6} {str(r['cpu_us_per_tx']):>9} "
              f"{r['rss_kib'] / 1024:>7.1f}", flush=True)
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
    if one:
        print(f"added latency, 1 client: p50 {one['pgsplit_p50_us'] - one['direct_p50_us']} us, "
              f"p99 {one['pgsplit_p99_us'] - one['direct_p99_us']} us")
    cache = None
    if not only or "cached" in only:
        cache = cached(env, T, P)
        print("whitelisted point read, 16 clients (median of runs):")
        for label in ("direct", "pgsplit-replicas", "pgsplit-cache"):
            c = cache[label]
            print(f"  {label:<18} {c['tps']:>8} tps  p50 {c['p50_us']} us  p99 {c['p99_us']} us")
        print(f"  cache / replicas: {cache['cache_vs_replicas']}x")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"machine_cores": os.cpu_count(), "seconds_per_run": T, "pairs": P,
                       "workloads": results, "cached_point_read": cache}, f, indent=1)


if __name__ == "__main__":
    main()
