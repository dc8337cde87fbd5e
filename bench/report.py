#!/usr/bin/env python3
"""Turn a bench/run.sh result directory into a table, JSON and an SVG chart.

    report.py RUN_DIR   -> prints the summary, writes RUN_DIR/summary.md, results.json, chart.svg

Standard library only. Every figure is the median over the run's reps. "per CPU-s" is work
divided by the utime+stime of the terminator's own process tree during that load run.
"""
import csv
import html
import json
import os
import re
import statistics
import sys

UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
PEERS = ["nginx", "haproxy", "hitch"]
MIB = 1 << 20


def dur_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * UNIT_S[m.group(2)] * 1e3 if m else None


def parse_raw(path, test):
    """Returns dict(work, rate, p50, p99, p999, resumed_seen, errors, proto) from one raw file."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if "paced_rate" in j:
                out.update(work=j["requests"], rate=j["requests"] / max(j["duration_s"], 1e-9),
                           p50=j["p50_ms"], p99=j["p99_ms"], p999=j["p999_ms"],
                           errors=j["errors"], offered=j["paced_rate"])
            elif "mode" in j:
                out.update(work=j["requests"], rate=j["rate"], p50=j["p50_ms"], p99=j["p99_ms"],
                           p999=j["p999_ms"], errors=j["errors"], resumed_seen=j["resumed"])
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                  text)
    if m:  # h2load
        out["work"] = int(m.group(2))
        out["errors"] = int(m.group(3))
        r = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
        out["rate"] = float(r.group(1)) if r else None
        p = re.search(r"TLS Protocol: (\S+)", text)
        out["proto"] = p.group(1) if p else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    if m and "paced_rate" not in text:  # wrk
        out["work"] = int(m.group(1))
        r = re.search(r"Requests/sec:\s+([\d.]+)", text)
        out["rate"] = float(r.group(1)) if r else None
        for q, key in (("50%", "p50"), ("99%", "p99")):
            r = re.search(r"^\s+" + re.escape(q) + r"\s+(\S+)", text, re.M)
            if r:
                out[key] = dur_ms(r.group(1))
        e = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        out["errors"] = (int(e.group(1)) if e else 0) + (sum(map(int, s.groups())) if s else 0)
    if test == "bulk" and "work" in out:
        # one response = 1 MiB of body: work in MiB, rate in MiB/s
        pass
    return out or None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load(run):
    rows = list(csv.DictReader(open(os.path.join(run, "meta.tsv")), delimiter="\t"))
    agg = {}
    for r in rows:
        raw = parse_raw(os.path.join(run, r["raw"]), r["test"])
        if not raw or raw.get("work") is None:
            continue
        cpu = float(r["term_cpu_s"])
        shard = float(r["shard_cpu_s"])
        rec = dict(raw)
        rec["per_cpu"] = raw["work"] / cpu if cpu > 0 else None
        rec["cpu_per_op_us"] = shard * 1e6 / raw["work"] if raw["work"] and shard > 0 else None
        rec["term_cpu_pct"] = 100 * cpu / float(r["wall_s"])
        rec["sys_cpu_pct"] = 100 * float(r["sys_busy_s"]) / float(r["wall_s"])
        rec["rc"] = int(r["rc"])
        foreign = r.get("foreign_cpu_s")
        rec["foreign_pct"] = 100 * float(foreign) / float(r["wall_s"]) if foreign else None
        rec["tool"] = r["tool"]
        for k in ("full13", "res13", "full12", "res12"):
            rec["hs_" + k] = int(r[k])
        agg.setdefault((r["target"], r["test"]), []).append(rec)
    res = {}
    for key, recs in agg.items():
        m = {}
        for field in ("rate", "per_cpu", "p50", "p99", "p999", "cpu_per_op_us", "term_cpu_pct",
                      "sys_cpu_pct", "offered"):
            m[field] = med([x.get(field) for x in recs])
        for field in ("work", "errors", "resumed_seen", "hs_full13", "hs_res13", "hs_full12",
                      "hs_res12"):
            m[field] = sum(x.get(field) or 0 for x in recs)
        m["foreign_pct_max"] = max([x["foreign_pct"] for x in recs
                                    if x.get("foreign_pct") is not None], default=None)
        m["reps"] = len(recs)
        m["tool"] = recs[0]["tool"]
        m["proto"] = recs[0].get("proto")
        m["nonzero_rc"] = sum(1 for x in recs if x["rc"] != 0)
        res[key] = m
    return res


def load_idle(run):
    out = {}
    try:
        for r in csv.DictReader(open(os.path.join(run, "idle.tsv")), delimiter="\t"):
            n = int(r["conns_open"])
            growth = int(r["rss_held_kib"]) - int(r["rss_before_kib"])
            out[r["target"]] = dict(open=n, asked=int(r["conns_asked"]), failed=int(r["failed"]),
                                    kib_per_conn=growth / n if n else None,
                                    rss_before_mib=int(r["rss_before_kib"]) / 1024,
                                    rss_held_mib=int(r["rss_held_kib"]) / 1024)
    except OSError:
        pass
    return out


def fmt(v, digits=0):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def main():
    run = sys.argv[1]
    res = load(run)
    idle = load_idle(run)
    ttfb = None
    if os.path.exists(os.path.join(run, "ttfb.json")):
        try:
            ttfb = json.load(open(os.path.join(run, "ttfb.json")))
        except ValueError:
            ttfb = None
    peers = [p for p in PEERS if any(k[0] == p for k in res) or p in idle]

    # (label, test, ferrule target name, peers compared, target ratio, unit, better)
    specs = [
        ("Full handshake TLS 1.3", "full13", "ferrule", peers, 1.5, "hs", "best"),
        ("Resumed TLS 1.3", "resumed13", "ferrule", peers, 2.0, "hs", "best"),
        ("Resumed TLS 1.2", "resumed12", "ferrule", peers, 3.0, "hs", "best"),
        ("Keep-alive HTTP/1.1", "keepalive", "ferrule", [p for p in peers if p != "hitch"],
         1.3, "req", "all"),
        ("TCP mode keep-alive", "keepalive", "ferrule-tcp", [p for p in peers if p == "hitch"],
         1.2, "req", "all"),
        ("Bulk 1 MiB responses", "bulk", "ferrule", peers, 1.2, "MiB", "best"),
    ]
    results = {"run": os.path.abspath(run), "rows": [], "latency": None, "memory": None,
               "cpu_ratio": {}, "ttfb": ttfb, "raw": {f"{k[0]}/{k[1]}": v for k, v in res.items()}}
    lines = []
    say = lines.append
    env = open(os.path.join(run, "env.txt")).read().strip() if os.path.exists(
        os.path.join(run, "env.txt")) else ""
    say("```\n" + env + "\n```\n")
    hdr = ["row (tool)", "ferrule rate/s", "ferrule per CPU-s"]
    hdr += [f"{p} per CPU-s" for p in peers] + [f"x vs {p}" for p in peers]
    hdr += ["target", "holds"]
    say("### Throughput: work per terminator CPU-second (ratio = ferrule / peer)\n")
    say("| " + " | ".join(hdr) + " |")
    say("|" + "---|" * len(hdr))
    chart = []
    for label, test, me, cmp_peers, goal, unit, how in specs:
        mine = res.get((me, test))
        if not mine:
            continue
        cells = [f"{label} ({mine['tool']})", fmt(mine["rate"]), fmt(mine["per_cpu"])]
        ratios = {}
        for p in peers:
            theirs = res.get((p, test))
            cells.append(fmt(theirs["per_cpu"]) if theirs and p in cmp_peers else "–")
        for p in peers:
            theirs = res.get((p, test))
            if theirs and p in cmp_peers and theirs["per_cpu"] and mine["per_cpu"]:
                ratios[p] = mine["per_cpu"] / theirs["per_cpu"]
                cells.append(f"{ratios[p]:.2f}x")
            else:
                cells.append("–")
        if ratios:
            worst = min(ratios.values())  # "best peer" and "all named peers" both mean this
            ok = worst >= goal
            verdict = "yes" if ok else "NO"
        else:
            worst, ok, verdict = None, None, "n/a"
        scope = "best peer" if how == "best" else " & ".join(cmp_peers)
        cells += [f"≥{goal}x {scope}", verdict]
        say("| " + " | ".join(cells) + " |")
        results["rows"].append(dict(label=label, test=test, ferrule=me, tool=mine["tool"],
                                    ferrule_rate=mine["rate"], ferrule_per_cpu=mine["per_cpu"],
                                    peers={p: res[(p, test)]["per_cpu"] for p in cmp_peers
                                           if (p, test) in res},
                                    peer_rates={p: res[(p, test)]["rate"] for p in cmp_peers
                                                if (p, test) in res},
                                    ratios=ratios, target=goal, holds=ok, unit=unit))
        if worst is not None:
            chart.append((label + f" (vs {'best peer' if how == 'best' else scope})", worst, goal))

    # absolute rates
    say("\n### Absolute rates (whole 2-CPU box incl. load generator; ratio = ferrule / peer)\n")
    hdr2 = ["row", "ferrule"] + peers + [f"x vs {p}" for p in peers] + ["ferrule term CPU%",
                                                                        "errors (ferrule)"]
    say("| " + " | ".join(hdr2) + " |")
    say("|" + "---|" * len(hdr2))
    for label, test, me, cmp_peers, *_ in specs:
        mine = res.get((me, test))
        if not mine:
            continue
        cells = [label, fmt(mine["rate"])]
        cells += [fmt(res[(p, test)]["rate"]) if (p, test) in res and p in cmp_peers else "–"
                  for p in peers]
        for p in peers:
            t = res.get((p, test))
            cells.append(f"{mine['rate'] / t['rate']:.2f}x" if t and p in cmp_peers and
                         t["rate"] else "–")
        cells += [fmt(mine["term_cpu_pct"]), str(mine["errors"])]
        say("| " + " | ".join(cells) + " |")

    # latency at fixed rate, memory
    say("\n### Latency at a fixed offered rate, memory per idle TLS connection\n")
    say("| row | ferrule | " + " | ".join(peers) + " | target | holds |")
    say("|" + "---|" * (4 + len(peers)))
    lat = {t: res.get((t, "paced")) for t in ["ferrule"] + peers}
    if lat["ferrule"]:
        offered = lat["ferrule"]["offered"]
        for q in ("p50", "p99", "p999"):
            cells = [f"{q} ms at {fmt(offered)} req/s (wrk + wrk-paced.lua)"]
            cells += [fmt(lat[t][q], 2) if lat[t] else "–" for t in ["ferrule"] + peers]
            if q == "p99" and lat.get("nginx"):
                ok = lat["ferrule"]["p99"] < lat["nginx"]["p99"]
                cells += ["below nginx", "yes" if ok else "NO"]
                results["latency"] = dict(offered=offered, holds=ok,
                                          **{t: lat[t] for t in lat if lat[t]})
                chart.append(("p99 at fixed rate (nginx / ferrule)",
                              lat["nginx"]["p99"] / max(lat["ferrule"]["p99"], 1e-9), 1.0))
            else:
                cells += ["", ""]
            say("| " + " | ".join(cells) + " |")
        cells = ["achieved req/s"] + [fmt(lat[t]["rate"]) if lat[t] else "–"
                                      for t in ["ferrule"] + peers] + ["", ""]
        say("| " + " | ".join(cells) + " |")
    if "ferrule" in idle:
        cells = [f"RSS growth KiB per idle TLS conn (python ssl, {idle['ferrule']['asked']} conns)"]
        cells += [fmt(idle[t]["kib_per_conn"], 1) + f" ({idle[t]['open']} open)" if t in idle
                  else "–" for t in ["ferrule"] + peers]
        ok = None
        if "nginx" in idle and idle["nginx"]["kib_per_conn"] and idle["ferrule"]["kib_per_conn"]:
            ok = idle["ferrule"]["kib_per_conn"] < idle["nginx"]["kib_per_conn"]
            chart.append(("Memory per idle conn (nginx / ferrule)",
                          idle["nginx"]["kib_per_conn"] / max(idle["ferrule"]["kib_per_conn"],
                                                              1e-9), 1.0))
        cells += ["below nginx", {True: "yes", False: "NO", None: "n/a"}[ok]]
        say("| " + " | ".join(cells) + " |")
        results["memory"] = dict(holds=ok, **idle)

    # ferrule's own resumed/full CPU ratio
    say("\n### ferrule: CPU per handshake on its shard threads (resumed / full)\n")
    say("| TLS | full µs/hs (tool) | resumed µs/hs (tool) | ratio | target | holds |")
    say("|---|---|---|---|---|---|")
    for ver, full, resumed, goal in (("1.3", "full13", "resumed13", 0.4),
                                     ("1.2", "full12", "resumed12", 0.1)):
        f, r = res.get(("ferrule", full)), res.get(("ferrule", resumed))
        if f and r and f["cpu_per_op_us"] and r["cpu_per_op_us"]:
            ratio = r["cpu_per_op_us"] / f["cpu_per_op_us"]
            ok = ratio <= goal
            say(f"| {ver} | {f['cpu_per_op_us']:.0f} ({f['tool']}) | {r['cpu_per_op_us']:.0f} "
                f"({r['tool']}) | {ratio:.2f} | ≤{goal} | {'yes' if ok else 'NO'} |")
            results["cpu_ratio"][ver] = dict(full_us=f["cpu_per_op_us"],
                                             resumed_us=r["cpu_per_op_us"], ratio=ratio,
                                             target=goal, holds=ok)

    # proof of handshake kinds
    say("\n### Which handshakes were measured (ferrule's own counters, summed over reps)\n")
    say("| row | requests done | ferrule full 1.3 | resumed 1.3 | full 1.2 | resumed 1.2 "
        "| client saw resumed |")
    say("|---|---|---|---|---|---|---|")
    for test in ("full13", "resumed13", "full12", "resumed12"):
        m = res.get(("ferrule", test))
        if m:
            say(f"| {test} ({m['tool']}) | {m['work']} | {m['hs_full13']} | {m['hs_res13']} | "
                f"{m['hs_full12']} | {m['hs_res12']} | "
                f"{m['resumed_seen'] if 'loadgen' in m['tool'] else '(h2load: n/a)'} |")
    vpath = os.path.join(run, "verify.txt")
    if os.path.exists(vpath):
        say("\nPeers (a logging nginx, same load generators, from verify.txt):\n")
        say("```\n" + open(vpath).read().strip() + "\n```")
    for p in peers:
        m = res.get((p, "resumed12"))
        if m:
            say(f"- {p} resumed12: loadgen saw {m['resumed_seen']} of {m['work']} resumed")

    if ttfb:
        rtt = ttfb["rtt_ms"]
        say(f"\n### Time to first response byte at {rtt} ms RTT (two netns + delay-wire.py; "
            f"{ttfb['tool']}, n={ttfb['n']}, ping {ttfb.get('ping_ms')} ms)\n")
        say("| target | row | p50 ms | round trips | resumed | 0-RTT accepted | TFO opens |")
        say("|---|---|---|---|---|---|---|")
        for r in ttfb["rows"]:
            lg = r.get("loadgen") or {}
            p50 = lg.get("p50_ms")
            say(f"| {r['target']} | {r['row']} | {fmt(p50, 1)} | "
                f"{fmt(p50 / rtt if p50 else None, 2)} | {lg.get('resumed', '–')}/"
                f"{lg.get('requests', '–')} | {lg.get('early_accepted', '–')} | "
                f"{r['tfo_active']} |")

    noisy = sorted((m["foreign_pct_max"], f"{k[0]}/{k[1]}") for k, m in res.items()
                   if m.get("foreign_pct_max") is not None and m["foreign_pct_max"] > 30)
    say("\n### Noise check\n")
    if noisy:
        say("CPU used by processes outside the bench (another build?) during these runs, in % "
            "of one CPU (user+system CPU of all tasks - terminator - origin - load "
            "generator): " + ", ".join(f"{n} {v:.0f}%" for v, n in noisy)
            + ". Their figures are suspect; rerun on a quiet box.")
    else:
        say("No run saw more than 30% of one CPU used outside the bench's own processes.")
    results["noisy_runs"] = [dict(run=n, foreign_pct=v) for v, n in noisy]

    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(run, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(run, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(run, "chart.svg"), "w") as f:
        f.write(svg(chart, ttfb))


def svg(rows, ttfb):
    """Horizontal bars: ferrule's advantage per row, with the issue's target as a tick."""
    w, left, bar_h, gap = 900, 330, 22, 12
    scale_max = max([3.5] + [max(v, g) * 1.1 for _, v, g in rows])
    x = lambda v: left + (w - left - 40) * v / scale_max  # noqa: E731
    h = 70 + len(rows) * (bar_h + gap)
    tt_rows = [r for r in (ttfb or {}).get("rows", []) if r.get("loadgen")]
    h2 = 60 + len(tt_rows) * 20 if tt_rows else 0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + h2}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="{w}" height="{h + h2}" fill="white"/>',
           '<text x="10" y="22" font-size="16" font-weight="bold">ferrule advantage over peers '
           '(x; per terminator CPU-second, or peer/ferrule for memory and p99)</text>',
           '<text x="10" y="42" fill="#555">bar = ferrule vs the strongest compared peer; '
           'black tick = target from the issue; green = target met, red = missed</text>']
    for v in (1, 2, 3):
        if v < scale_max:
            out.append(f'<line x1="{x(v):.1f}" y1="52" x2="{x(v):.1f}" y2="{h - 10}" '
                       f'stroke="#ccc" stroke-dasharray="4,3"/>'
                       f'<text x="{x(v) - 8:.1f}" y="{h - 0}" fill="#777">{v}x</text>')
    for i, (label, v, goal) in enumerate(rows):
        y = 58 + i * (bar_h + gap)
        color = "#2e8b57" if v >= goal else "#c0392b"
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{html.escape(label)}'
                   f'</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{max(x(v) - left, 1):.1f}" height="{bar_h}" '
                   f'fill="{color}"/>')
        out.append(f'<text x="{x(v) + 6:.1f}" y="{y + 16}">{v:.2f}x</text>')
        out.append(f'<line x1="{x(goal):.1f}" y1="{y - 3}" x2="{x(goal):.1f}" y2="{y + bar_h + 3}" '
                   f'stroke="black" stroke-width="3"/>')
    if tt_rows:
        rtt = ttfb["rtt_ms"]
        y0 = h + 10
        out.append(f'<text x="10" y="{y0 + 12}" font-size="15" font-weight="bold">Time to first '
                   f'byte at {rtt} ms RTT, in round trips (p50)</text>')
        rt_max = 4.0
        for i, r in enumerate(tt_rows):
            y = y0 + 24 + i * 20
            p50 = r["loadgen"].get("p50_ms") or 0
            rts = p50 / rtt
            color = "#1f6fb2" if r["target"] == "ferrule" else "#999"
            out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">'
                       f'{html.escape(r["target"] + " " + r["row"])}</text>')
            width = (w - left - 120) * min(rts, rt_max) / rt_max
            out.append(f'<rect x="{left}" y="{y}" width="{max(width, 1):.1f}" height="15" '
                       f'fill="{color}"/>')
            out.append(f'<text x="{left + width + 6:.1f}" y="{y + 13}">{rts:.2f} RTT '
                       f'({p50:.0f} ms)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
