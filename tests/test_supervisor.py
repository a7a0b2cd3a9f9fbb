"""The multi-process supervisor (pipeline/runtime/supervisor.py), driven with a tiny fake child program.

The fake child (written to ``tmp_path``) records ``start-<slot>-<pid>`` (JSON: start time, parent pid,
slot from DDB_CDC_SUPERVISOR_CHILD, a marker variable) and, on SIGTERM/SIGINT, ``term-<slot>-<pid>``
(the signal's name) before exiting with ``FAKE_TERM_CODE``. Environment knobs:
``FAKE_CRASH_AFTER`` seconds / ``FAKE_CRASH_CODE`` / ``FAKE_CRASH_SLOT`` (crash on its own),
``FAKE_IGNORE_TERM_SLOT`` (ignore SIGTERM). Where signals to the supervisor matter, the supervisor
runs in its own process (``python runner.py``) with JSON logs on stderr captured to a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog

from pipeline.errors import ConfigError
from pipeline.runtime.supervisor import CHILD_ENV, Supervisor, resolve_processes, restart_delay, run_supervised

ROOT = Path(__file__).resolve().parents[1]

FAKE_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time

    out = os.environ["FAKE_DIR"]
    slot = os.environ.get("DDB_CDC_SUPERVISOR_CHILD", "?")
    pid = os.getpid()

    def on_signal(signum, _frame):
        with open(os.path.join(out, f"term-{slot}-{pid}"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(int(os.environ.get("FAKE_TERM_CODE", "0")))

    if os.environ.get("FAKE_IGNORE_TERM_SLOT") == slot:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    tmp = os.path.join(out, f".start-{slot}-{pid}")
    with open(tmp, "w") as f:
        json.dump({"t": time.time(), "ppid": os.getppid(), "slot": slot,
                   "mark": os.environ.get("FAKE_MARK")}, f)
    os.rename(tmp, os.path.join(out, f"start-{slot}-{pid}"))

    crash_after = os.environ.get("FAKE_CRASH_AFTER")
    crash_slot = os.environ.get("FAKE_CRASH_SLOT")
    deadline = None
    if crash_after is not None and crash_slot in (None, slot):
        deadline = time.monotonic() + float(crash_after)
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            os._exit(int(os.environ.get("FAKE_CRASH_CODE", "1")))
        time.sleep(0.02)
    """
)

RUNNER = textwrap.dedent(
    """
    import json, sys
    from pipeline.logs import configure_logging, get_logger
    from pipeline.runtime.supervisor import run_supervised

    child, processes, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    configure_logging("INFO", "json")
    sys.exit(run_supervised([sys.executable, child], processes, logger=get_logger(), **options))
    """
)


class Harness:
    """Files and helpers of one test: the fake child, its output directory, the supervisor process."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "out"
        self.dir.mkdir()
        self.child = tmp_path / "fake_child.py"
        self.child.write_text(FAKE_CHILD)
        self.runner = tmp_path / "runner.py"
        self.runner.write_text(RUNNER)
        self.log_path = tmp_path / "supervisor.log"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        env.update(FAKE_DIR=str(self.dir), PYTHONPATH=str(ROOT), **extra)
        return env

    def start(self, processes: int, child_env: dict[str, str] | None = None, **options: Any) -> subprocess.Popen:
        options.setdefault("shutdown_grace_s", 2.0)
        options.setdefault("shutdown_margin_s", 0.5)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.runner), str(self.child), str(processes), json.dumps(options)],
            env=self.env(**(child_env or {})), stderr=self._log, cwd=str(ROOT),
        )
        return self.proc

    def starts(self, slot: int | None = None) -> dict[int, dict]:
        """pid → start record, for every child started so far (optionally of one slot)."""
        found = {}
        for path in self.dir.glob("start-*"):
            _, s, pid = path.name.split("-")
            if slot is None or s == str(slot):
                found[int(pid)] = json.loads(path.read_text())
        return found

    def term(self, pid: int) -> str | None:
        paths = list(self.dir.glob(f"term-*-{pid}"))
        return paths[0].read_text() if paths else None

    def events(self, name: str | None = None) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if name is None or entry.get("event") == name:
                lines.append(entry)
        return lines

    def wait_code(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"supervisor still running after {timeout} s; log:\n{self.log_path.read_text()}")

    def cleanup(self) -> None:
        """Never leave processes behind, even when a test fails half-way."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.starts():
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path)
    yield h
    h.cleanup()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_for_children(h: Harness, n: int, timeout: float = 10) -> dict[int, dict]:
    """Wait until ``n`` children have started; their start records by pid."""
    return wait_for(lambda: (lambda s: s if len(s) == n else None)(h.starts()), timeout, f"{n} children")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead: it holds nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


# -- resolve_processes / restart_delay ------------------------------------------------------------


def test_resolve_processes_auto_is_the_usable_cpu_count():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_processes("auto") == expected >= 1
    assert resolve_processes(" AUTO ") == expected


@pytest.mark.parametrize("value, expected", [("1", 1), ("4", 4), (3, 3), (" 2 ", 2)])
def test_resolve_processes_accepts_positive_integers(value, expected):
    assert resolve_processes(value) == expected


@pytest.mark.parametrize("value", ["0", 0, "-1", -2, "", "two", "1.5", True, None])
def test_resolve_processes_rejects_everything_else_with_one_line(value):
    with pytest.raises(ConfigError) as info:
        resolve_processes(value)
    assert len(info.value.problems) == 1
    assert "--processes" in info.value.problems[0] and "auto" in info.value.problems[0]


def test_restart_delay_doubles_up_to_the_maximum_with_bounded_jitter():
    low = lambda a, b: a  # noqa: E731 - smallest jitter
    high = lambda a, b: b  # noqa: E731 - largest jitter
    assert [restart_delay(n, 1.0, 60.0, rng=low) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert restart_delay(0, 1.0, 60.0, rng=high) == pytest.approx(1.25)
    assert restart_delay(10, 1.0, 60.0, rng=high) == pytest.approx(75.0)
    assert restart_delay(10_000, 1.0, 60.0, rng=low) == 60.0  # no overflow
    samples = {restart_delay(0, 1.0, 60.0) for _ in range(50)}
    assert all(1.0 <= s <= 1.25 for s in samples) and len(samples) > 1


# -- the supervisor in its own process ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_children_start_and_a_signal_reaches_every_child(harness: Harness, signum):
    sup = harness.start(3)
    starts = wait_for_children(harness, 3)
    assert len(set(starts)) == 3 and sup.pid not in starts
    assert sorted(rec["slot"] for rec in starts.values()) == ["0", "1", "2"]
    assert all(rec["ppid"] == sup.pid for rec in starts.values())

    sup.send_signal(signum)
    assert harness.wait_code(10) == 0
    assert {pid: harness.term(pid) for pid in starts} == {pid: signum.name for pid in starts}
    assert not any(alive(pid) for pid in starts)
    assert len(harness.starts()) == 3  # nothing was restarted during the shutdown
    exited = harness.events("child_exited")
    assert len(exited) == 3 and all(e["shutting_down"] and e["clean"] and e["exit_code"] == 0 for e in exited)
    assert harness.events("supervisor_stopped")[0]["exit_code"] == 0


def test_a_child_failing_its_shutdown_makes_the_supervisor_return_1(harness: Harness):
    sup = harness.start(2, {"FAKE_TERM_CODE": "3"})
    starts = wait_for_children(harness, 2)
    sup.terminate()
    assert harness.wait_code(10) == 1
    assert all(harness.term(pid) == "SIGTERM" for pid in starts)


def test_a_sigkilled_child_is_restarted_after_the_backoff(harness: Harness):
    sup = harness.start(2, restart_backoff_initial_s=1.0)
    wait_for(lambda: len(harness.starts()) == 2, 10, "2 children")
    (victim,) = harness.starts(slot=0)
    (survivor,) = harness.starts(slot=1)

    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: [p for p in harness.starts(slot=0) if p != victim], 10, "a new child in slot 0")
    assert len(new) == 1
    replacement = new[0]
    waited = harness.starts(slot=0)[replacement]["t"] - killed_at
    assert 1.0 <= waited < 1.25 + 2.0, waited
    assert list(harness.starts(slot=1)) == [survivor] and alive(survivor)
    assert alive(replacement)

    (exited,) = [e for e in harness.events("child_exited") if e["pid"] == victim]
    assert exited["signal"] == "SIGKILL" and exited["index"] == 0 and 1.0 <= exited["restart_in_s"] <= 1.25
    (restarted,) = harness.events("child_restarted")
    assert restarted["previous_pid"] == victim and restarted["pid"] == replacement and restarted["index"] == 0

    sup.terminate()
    assert harness.wait_code(10) == 0
    assert harness.term(replacement) == "SIGTERM" and harness.term(survivor) == "SIGTERM"


def test_a_crash_looping_child_backs_off_exponentially_up_to_the_maximum(harness: Harness):
    sup = harness.start(1, {"FAKE_CRASH_AFTER": "0", "FAKE_CRASH_CODE": "1"},
                        restart_backoff_initial_s=0.2, restart_backoff_max_s=0.4)
    wait_for(lambda: len(harness.events("child_exited")) >= 4, 15, "4 crashes")
    sup.terminate()
    assert harness.wait_code(10) == 0  # the slot was waiting for a restart or its child stopped cleanly
    delays = [e["restart_in_s"] for e in harness.events("child_exited") if not e.get("shutting_down")][:4]
    assert all(e["exit_code"] == 1 for e in harness.events("child_exited") if not e.get("shutting_down"))
    assert 0.2 <= delays[0] <= 0.25
    assert 0.4 <= delays[1] <= 0.5 and 0.4 <= delays[2] <= 0.5 and 0.4 <= delays[3] <= 0.5
    times = sorted(rec["t"] for rec in harness.starts().values())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.2 and all(g >= 0.4 for g in gaps[1:4]), gaps


def test_the_backoff_resets_after_a_child_stayed_up(harness: Harness):
    sup = harness.start(1, {"FAKE_CRASH_AFTER": "0.5"}, restart_backoff_initial_s=0.1,
                        restart_backoff_max_s=10.0, restart_backoff_reset_s=0.3)
    wait_for(lambda: len(harness.events("child_exited")) >= 3, 15, "3 crashes")
    sup.terminate()
    harness.wait_code(10)
    delays = [e["restart_in_s"] for e in harness.events("child_exited") if not e.get("shutting_down")]
    assert len(delays) >= 3 and all(0.1 <= d <= 0.125 for d in delays), delays  # no doubling


def test_a_configuration_error_stops_everything_and_returns_2(harness: Harness):
    sup = harness.start(3, {"FAKE_CRASH_AFTER": "0.5", "FAKE_CRASH_CODE": "2", "FAKE_CRASH_SLOT": "1"},
                        restart_backoff_initial_s=0.05)
    assert harness.wait_code(10) == 2
    starts = harness.starts()
    assert len(starts) == 3  # slot 1 was not restarted
    (bad,) = harness.starts(slot=1)
    assert harness.term(bad) is None
    others = [pid for pid in starts if pid != bad]
    assert all(harness.term(pid) == "SIGTERM" for pid in others)
    assert not any(alive(pid) for pid in starts)
    assert harness.events("child_config_error")[0]["index"] == 1
    assert harness.events("child_restarted") == []
    assert sup.returncode == 2


def test_a_child_ignoring_sigterm_is_sigkilled_after_the_grace_period(harness: Harness):
    sup = harness.start(2, {"FAKE_IGNORE_TERM_SLOT": "0"}, shutdown_grace_s=0.6, shutdown_margin_s=0.4)
    wait_for(lambda: len(harness.starts()) == 2, 10, "2 children")
    (stubborn,) = harness.starts(slot=0)
    (polite,) = harness.starts(slot=1)
    asked = time.monotonic()
    sup.terminate()
    assert harness.wait_code(10) == 1
    took = time.monotonic() - asked
    assert 1.0 <= took < 5.0, took
    assert not alive(stubborn) and harness.term(stubborn) is None
    assert harness.term(polite) == "SIGTERM"
    (killed,) = harness.events("child_killed")
    assert killed["pid"] == stubborn
    assert [e["signal"] for e in harness.events("child_exited") if e["pid"] == stubborn] == ["SIGKILL"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_stop_when_the_supervisor_is_sigkilled(harness: Harness):
    sup = harness.start(2)
    starts = wait_for_children(harness, 2)
    sup.kill()
    sup.wait()
    wait_for(lambda: not any(alive(pid) for pid in starts), 5, "orphaned children to exit")
    # They got SIGTERM from the kernel (the death signal), i.e. a graceful shutdown, not a kill.
    assert all(harness.term(pid) == "SIGTERM" for pid in starts)


# -- in-process ----------------------------------------------------------------------------------


def test_finite_run_returns_0_when_every_child_finished_and_restores_signal_handlers(tmp_path: Path):
    h = Harness(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    env = h.env(FAKE_CRASH_AFTER="0.2", FAKE_CRASH_CODE="0", FAKE_MARK="from-env-param")
    started = time.monotonic()
    code = run_supervised([sys.executable, str(h.child)], 2, logger=structlog.get_logger(),
                          env=env, restart_clean_exits=False)
    assert code == 0 and time.monotonic() - started < 10
    starts = h.starts()
    assert len(starts) == 2  # exit 0 was not restarted
    assert {rec["mark"] for rec in starts.values()} == {"from-env-param"}
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_child_that_cannot_start_raises_oserror(tmp_path: Path):
    sup = Supervisor([str(tmp_path / "no-such-program")], 2, logger=structlog.get_logger())
    with pytest.raises(OSError):
        sup.run()


def test_stop_from_another_thread_shuts_down(tmp_path: Path):
    import threading

    h = Harness(tmp_path)
    sup = Supervisor([sys.executable, str(h.child)], 2, logger=structlog.get_logger(), env=h.env())
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()))
    thread.start()
    try:
        starts = wait_for_children(h, 2)
        assert all(pid is not None for pid in sup.pids())
        sup.stop()
        thread.join(10)
        assert result == [0]
        assert all(h.term(pid) == "SIGTERM" for pid in starts)
        assert os.environ.get(CHILD_ENV) is None  # the slot variable is set for children only
    finally:
        if thread.is_alive():
            sup.stop(signal.SIGKILL)
            thread.join(10)
        h.cleanup()


def test_invalid_arguments_are_rejected():
    log = structlog.get_logger()
    with pytest.raises(ValueError):
        Supervisor([], 1, logger=log)
    with pytest.raises(ValueError):
        Supervisor(["true"], 0, logger=log)
    with pytest.raises(ValueError):
        Supervisor(["true"], 1, logger=log, shutdown_grace_s=-1)
