"""``python -m benchmarks [--quick] [--sections decode,pipeline,scale,memory,latency,snapshot] [--json FILE]``

Prints the machine, then one table per section (medians over the repetitions, ratios from the
same run), then every target with its verdict. ``--quick`` runs small inputs and few repetitions
(a smoke run, not figures to quote). See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from benchmarks import describe_machine, machine, table

SECTIONS = ("decode", "pipeline", "scale", "memory", "latency", "snapshot")


def _parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def _parse_processes(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(","))


def _git_state() -> str:
    """The commit measured, and which tracked source files differ from it (the working tree is measured)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "pipeline", "connectors"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else " (clean)")


def _latency_targets(result: dict[str, Any]) -> dict[str, Any]:
    """benchmarks.latency's targets ({rate, p50_ms, p99_ms, p50_met, p99_met}) as summary rows."""
    t = result.get("targets") or {}
    phase = next((p for p in result.get("phases", []) if p.get("target_rate") == t.get("rate")), None)
    if phase is None or t.get("met") is None:
        return {}
    lat = phase["latency_ms"]
    rows = {f"p50 at {t['rate']}/s (ms)": {"target": f"<= {t['p50_ms']:.0f}", "value": float(lat["p50"]),
                                           "met": bool(t["p50_met"])},
            f"p99 at {t['rate']}/s (ms)": {"target": f"<= {t['p99_ms']:.0f}", "value": float(lat["p99"]),
                                           "met": bool(t["p99_met"])}}
    for name, f in (t.get("fast_sinks") or {}).items():  # Redis and S3 while the others lag
        for q, wanted in (("p50", t["p50_ms"]), ("p99", t["p99_ms"])):
            if f.get(q) is not None:
                rows[f"{name} {q} at {t['rate']}/s (ms)"] = {"target": f"<= {wanted:.0f}", "value": float(f[q]),
                                                             "met": float(f[q]) <= wanted}
    for rate, d in (t.get("drain") or {}).items():
        rows[f"drained at {rate}/s (all but one)"] = {
            "target": "undrained <= 1; OpenSearch >= 0.9 x floor",
            "value": f"undrained {d['undrained'] or 'none'}; sink/floor {d['sink_vs_floor'] or '-'}",
            "met": bool(d["met"])}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small inputs, few repetitions (smoke run)")
    parser.add_argument("--sections", type=_parse_sections, default=list(SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    parser.add_argument("--repetitions", type=int, help="repetitions per measurement (default 5; --quick 3)")
    parser.add_argument("--soak", type=float, help="memory section: seconds (a third idle, two thirds busy; "
                                                   "default 30, --quick 15; 600 for the 10-minute run)")
    parser.add_argument("--memory-rate", type=float, default=1000.0, help="memory section: records/s when busy")
    parser.add_argument("--backlog", type=int, help="memory section: catch-up backlog per shard (default 1000, "
                                                    "--quick 0 = no catch-up phase)")
    parser.add_argument("--max-pages-in-flight", type=int, default=None,
                        help="memory section: the worker's read budget, worker.max_pages_in_flight (default: "
                             "its default; 0 = no bound, the behaviour before it existed)")
    parser.add_argument("--processes", type=_parse_processes, default=(1, 2),
                        help="scale section: process counts to compare (default 1,2)")
    parser.add_argument("--latency-duration", type=float, help="latency section: seconds per rate (default 30, "
                                                                "--quick 10)")
    args = parser.parse_args(argv)

    from pipeline.logs import configure_logging

    configure_logging("WARNING", "json")  # warnings and errors only, to stderr
    import pipeline.runtime.worker  # noqa: F401 — every section runs with a worker's imports loaded

    quick = args.quick
    reps = args.repetitions
    started = time.monotonic()
    info = machine()
    info["code"] = _git_state()
    out: dict[str, Any] = {"command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
                           "machine": info, "quick": quick, "sections": {}}
    print(f"# ddb-cdc benchmarks{' (--quick: smoke run, not figures to quote)' if quick else ''}")
    print()
    print(f"Machine: {describe_machine(info)}")
    print(f"Command: {out['command']}")
    print(f"Code: {info['code']}")
    print(flush=True)
    summary: list[list[str]] = []

    def section(name: str, run, report, targets_of=None) -> None:
        t0 = time.monotonic()
        try:
            result = run()
        except Exception as exc:  # one broken section must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"## {name} — FAILED: {result['error']}\n", flush=True)
        else:
            print(report(result))
            print(f"\n({name}: {time.monotonic() - t0:.0f} s)\n", flush=True)
        out["sections"][name] = result
        targets = targets_of(result) if targets_of and "error" not in result else (result.get("targets") or {})
        for key, t in targets.items():
            if isinstance(t, dict) and "met" in t:
                value = t.get("value")
                shown = f"{value:.2f}" if isinstance(value, float) else str(value)
                summary.append([name, key, shown, str(t.get("target", "")), "MET" if t["met"] else "MISSED"])

    if "decode" in args.sections:
        from benchmarks import decode

        section("decode", lambda: decode.run_decode(pages=1 if quick else 3, repetitions=reps or (3 if quick else 5)),
                decode.report)
    if "pipeline" in args.sections:
        from benchmarks import pipeline_bench

        section("pipeline", lambda: pipeline_bench.run_pipeline(
            records=5_000 if quick else 30_000, repetitions=reps or (3 if quick else 5),
            decode_pages=2 if quick else 10, boto3_records=0 if quick else 5_000,
            render_records=2_000 if quick else 10_000, render_repetitions=reps or 3), pipeline_bench.report)
    if "scale" in args.sections:
        from benchmarks import scale

        section("scale", lambda: scale.run_scale(records=4_000 if quick else 20_000, repetitions=reps or (3 if quick else 5),
                                                 processes=args.processes), scale.report)
    if "memory" in args.sections:
        from benchmarks import memory

        section("memory", lambda: memory.run_memory(soak_s=args.soak or (15.0 if quick else 30.0),
                                                    rate=args.memory_rate,
                                                    backlog=args.backlog if args.backlog is not None
                                                    else (0 if quick else 1000),
                                                    max_pages_in_flight=args.max_pages_in_flight), memory.report)
    if "snapshot" in args.sections:
        from benchmarks import snapshot_bench

        section("snapshot", lambda: snapshot_bench.run_snapshot_bench(items=3_000 if quick else 20_000,
                                                                      repetitions=reps or (1 if quick else 3)),
                snapshot_bench.report)
    if "latency" in args.sections:
        try:
            from benchmarks import latency
        except ImportError as exc:
            if exc.name not in ("benchmarks.latency",):
                raise
            print("## latency — not run: benchmarks/latency.py is not there yet\n", flush=True)
            out["sections"]["latency"] = {"skipped": "benchmarks/latency.py is not there yet"}
        else:
            printed = []

            def run_latency(title: str, **kwargs: Any) -> dict[str, Any]:
                if args.latency_duration or quick:
                    kwargs["duration_s"] = args.latency_duration or 10.0
                try:
                    from rich.console import Console
                    kwargs["console"] = Console(highlight=False, width=140)  # progress and its own tables
                    printed.append(True)
                except ImportError:
                    pass
                print(f"## {title} (benchmarks/latency.py)\n", flush=True)
                return latency.run_latency(**kwargs)

            def report_latency(result: dict[str, Any]) -> str:
                if printed:
                    return ""  # run_latency printed its tables on the console
                return "```\n" + json.dumps(result, indent=2, default=str) + "\n```"

            # issue 15 item 6: the three built-in sinks at 200 and 1,000 changes/s, then an injected
            # sink that sleeps 2 s per batch next to Redis and S3 at 200/s
            section("latency", lambda: run_latency("latency", rates=(200, 1000)), report_latency,
                    targets_of=_latency_targets)
            section("latency, 2 s sink", lambda: run_latency(
                "latency with a sink that sleeps 2 s per batch, next to Redis and S3", rates=(200,),
                sinks=("s3_audit", "redis_cache"), slow_sink_s=2.0), report_latency, targets_of=_latency_targets)

    if summary:
        print("## targets")
        print()
        print(table(["section", "target", "value", "wanted", "verdict"], summary))
        print()
    out["elapsed_s"] = time.monotonic() - started
    out["loadavg_end"] = os.getloadavg()
    print(f"Total {out['elapsed_s']:.0f} s; load average at the end {out['loadavg_end'][0]:.2f} "
          f"{out['loadavg_end'][1]:.2f} {out['loadavg_end'][2]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 1 if any("error" in r for r in out["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
