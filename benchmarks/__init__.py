"""The benchmark suite (issue 7): ``python -m benchmarks [--quick] [--sections ...] [--json FILE]``.

Sections: ``decode`` (boto3 path vs fast path vs bare orjson on the same GetRecords bodies),
``pipeline`` (recorded GetRecords responses through a real Worker: decode, fan-out to three no-op
sinks, SQLite checkpoints), ``scale`` (the pipeline in 1 and 2 processes), ``memory`` (RSS of a
worker holding 100 leases, idle and busy) and ``latency`` (change-to-sink latency against real
servers, :mod:`benchmarks.latency`). See BENCHMARKS.md for the figures of the last full run.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Any, Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def verdict(ok: bool, detail: str) -> str:
    return f"{'MET' if ok else 'MISSED'} ({detail})"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, Python and library versions, load average now."""
    model, mhz, virtual = "unknown", None, False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model == "unknown":
                    model = value
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
                elif key == "flags":
                    virtual = virtual or "hypervisor" in value.split()
    except OSError:
        pass
    mem_mb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    versions = {}
    for name in ("orjson", "botocore", "boto3"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - reported as missing
            versions[name] = "missing"
    return {"cpu_model": model, "cpu_mhz": mhz, "virtual_machine": virtual, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_mb": mem_mb, "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
            "platform": platform.platform(), "loadavg": load, **versions}


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB, from /proc/self/status."""
    rss = hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def profile_lines(profile: Any, limit: int = 15) -> list[str]:
    """The top functions of a cProfile.Profile (or a list of them, merged) by own time, as text lines."""
    import pstats

    profiles = profile if isinstance(profile, list) else [profile]
    stats = pstats.Stats(profiles[0])
    for other in profiles[1:]:
        stats.add(other)
    total = stats.total_tt or 1e-9
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    out = [f"{'own s':>8} {'own %':>6} {'cum s':>8} {'calls':>10}  function"]
    for (filename, line, name), (cc, nc, tt, ct, _) in rows:
        where = filename
        for marker in ("site-packages/", "/work/perf/", "/work/main/", "lib/python3"):
            if marker in where:
                where = where.split(marker, 1)[1]
                break
        out.append(f"{tt:8.3f} {100 * tt / total:5.1f}% {ct:8.3f} {nc:>10}  {name} ({where}:{line})")
    return out


def describe_machine(m: dict[str, Any]) -> str:
    load = m.get("loadavg")
    parts = [f"CPU {m['cpu_model']}" + (f" @ {m['cpu_mhz']:.0f} MHz" if m.get("cpu_mhz") else ""),
             f"{m['cores']} cores ({m['usable_cores']} usable)" + (", virtual machine" if m.get("virtual_machine") else ""),
             f"{m['memory_mb'] / 1024:.1f} GB RAM" if m.get("memory_mb") else "RAM unknown",
             m["python"], f"orjson {m['orjson']}, botocore {m['botocore']}, boto3 {m['boto3']}", m["platform"]]
    if load:
        parts.append(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return "; ".join(parts)


def pyspy_profile(module_argv: list[str], *, markers: Sequence[str], limit: int = 15, rate: int = 250,
                  timeout_s: float = 600) -> list[str] | None:
    """Sample ``python -m <module_argv>`` with py-spy (if installed) and return the top functions by
    own time, then by total time, over the samples whose stack contains one of ``markers`` (so the
    set-up of the workload is left out). None when py-spy is missing or fails."""
    import shutil
    import subprocess
    import tempfile
    from collections import Counter

    exe = shutil.which("py-spy")
    if not exe:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="ddb-cdc-bench-pyspy-") as tmp:
        raw = os.path.join(tmp, "raw.txt")
        try:
            proc = subprocess.run([exe, "record", "--rate", str(rate), "--format", "raw", "--output", raw, "--",
                                   sys.executable, "-m", *module_argv], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0 or not os.path.exists(raw):
            return None
        with open(raw) as f:
            lines = f.read().splitlines()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not any(m in stack for m in markers):
            continue
        count = int(count_text)
        frames = [_frame_name(fr) for fr in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return None
    out = [f"py-spy, {samples} samples at {rate}/s of the measured work; % of those samples", "",
           f"{'own %':>6}  {'total %':>7}  function (by own time)"]
    for name, n in own.most_common(limit):
        out.append(f"{100 * n / samples:5.1f}%  {100 * total[name] / samples:6.1f}%  {name}")
    out += ["", f"{'total %':>7}  function (by total time; of a chain of wrappers within 0.5 % of each other "
                "only the first is shown)"]
    shown = 0
    last = None
    for name, n in total.most_common():
        pct = 100 * n / samples
        if name.startswith(("<module>", "_run_module_as_main", "_run_code", "run_workload", "_bootstrap", "main (")) \
                or "threading.py" in name or "runpy.py" in name:
            continue
        if last is not None and last - pct < 0.5:
            continue
        out.append(f"{pct:6.1f}%  {name}")
        last = pct
        shown += 1
        if shown >= limit:
            break
    return out


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` → ``func (path/file.py)`` (functions, not lines)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/perf/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name
