"""Run N ordinary worker processes side by side and keep them running (``ddb-cdc run --processes N``).

One Python process is one core (DESIGN.md, "Performance facts"), so more throughput means more
processes holding leases. The supervisor starts ``processes`` copies of one child command line;
each child is a complete, independent worker: it picks its own worker id (default
``host:pid:random``) and takes and renews its own shard leases, so the lease table spreads the shards
over the children exactly as it would over separate containers. The supervisor itself holds no
lease and never talks to AWS; it only starts, watches, restarts and stops children.

Behaviour
---------
- **Start**: ``subprocess.Popen(child_argv, env=...)`` once per slot ``0 .. processes-1``. Each child
  inherits stdin/stdout/stderr and the environment (or ``env``), plus ``DDB_CDC_SUPERVISOR_CHILD=<slot>``
  so its log lines can be told apart. (pydantic-settings ignores that variable: no setting is named
  ``supervisor_child``.)
- **Shutdown**: SIGTERM or SIGINT sent to the supervisor is forwarded (the same signal) to every
  running child. The supervisor then waits up to ``shutdown_grace_s + 5`` seconds (the children's own
  grace period plus a margin) for them to exit, SIGKILLs the stragglers and returns 0 when every child
  stopped cleanly, else 1. "Cleanly" means exit code 0, or killed by the very signal that was
  forwarded (a child still importing, before it installed its handler, dies of the default action; it
  held no lease yet). A slot that was waiting for a restart when the shutdown began has no child and
  does not change the result. A second signal during the shutdown is forwarded again.
- **Restart**: a child that exits (any code but 2) or is killed while the supervisor is not shutting
  down is restarted after a per-slot exponential backoff (see :func:`restart_delay`). A child that
  stayed up for at least ``restart_backoff_reset_s`` (60 s) counts as healthy: its slot's backoff
  starts again from ``restart_backoff_initial_s``. Log lines: ``child_exited`` (slot, pid, exit_code or
  signal, uptime_s, restart_in_s) and ``child_restarted`` (slot, pid, previous_pid, attempt).
- **Configuration error**: a child exiting with code 2 (the CLI's "invalid configuration") is not
  restarted - every restart would fail the same way. The supervisor stops the other children as on
  SIGTERM and returns 2.
- **Finite runs**: with ``restart_clean_exits=False`` (for ``--exit-when-idle``) a child exiting 0 is
  done, not restarted; once every slot is done the supervisor returns 0.
- **Orphans**: on Linux each child is started with ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (through
  ctypes, in ``preexec_fn``), so if the supervisor dies without a chance to forward anything
  (SIGKILL, OOM killer, crash) the kernel sends every child SIGTERM and it shuts down gracefully,
  releasing its leases instead of holding them until they expire. Elsewhere there is no such
  guarantee (documented limitation). The kernel ties the death signal to the *thread* that started
  the child, so run the supervisor in a thread that outlives its children (the main thread, normally).
  ``preexec_fn`` is not safe when the calling process has other
  threads that may hold locks at fork time; the supervisor process starts no threads.
- **Waiting** never busy-loops: the main loop sleeps in ``select`` on a self-pipe, woken at once by
  a signal handler and otherwise every 0.2 s to poll the children (``Popen.poll``).

Signal handlers can only be installed from the main thread. :meth:`Supervisor.run` installs them
when called there (and restores the previous handlers when it returns); from another thread it
installs none, and :meth:`Supervisor.stop` is the way to ask for a shutdown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipeline.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

#: Environment variable set in every child: its slot index (``"0"``, ``"1"``, ...).
CHILD_ENV = "DDB_CDC_SUPERVISOR_CHILD"
#: Seconds added to ``shutdown_grace_s`` before stragglers are SIGKILLed.
SHUTDOWN_MARGIN_S = 5.0
#: Longest sleep of the main loop between two polls of the children, in seconds.
POLL_INTERVAL_S = 0.2
#: Jitter: a restart delay is the exponential delay plus up to this fraction of it.
JITTER_FRACTION = 0.25

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def resolve_processes(value: str | int) -> int:
    """Number of worker processes from a ``--processes`` value.

    ``"auto"`` (any case) → the number of CPUs this process may run on
    (``len(os.sched_getaffinity(0))`` where available, else ``os.cpu_count()``; at least 1).
    A positive integer, or a string of one (``"4"``), → that integer.

    Raises :class:`~pipeline.errors.ConfigError` (one line) for 0, negative numbers, booleans and
    anything else that is not ``auto`` or a positive integer.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cpus()
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            number = None
    if number is None or number < 1:
        raise ConfigError([f"--processes: {value!r} is not valid; pass a positive integer (1, 2, ...) "
                           f"or 'auto' for one process per usable CPU ({usable_cpus()} here)"])
    return number


def usable_cpus() -> int:
    """CPUs this process may run on (scheduler affinity where the OS has it), at least 1."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:  # pragma: no cover - exotic kernels
            pass
    return max(1, os.cpu_count() or 1)


def restart_delay(failures: int, initial_s: float, max_s: float, *, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before restarting a slot whose child failed ``failures`` times in a row
    before this one (0 for the first failure).

    The exponential part is ``min(max_s, initial_s * 2**failures)``; a random jitter of up to
    ``JITTER_FRACTION`` (25 %) of it is added on top, so children crash-looping against the same
    outage do not restart in lockstep. The result is therefore never below ``initial_s`` and never
    above ``1.25 * max_s``. (Computed directly rather than through tenacity's
    ``wait_exponential_jitter``, which needs a retry state and caps the jitter away at the maximum.)
    """
    base = min(max_s, initial_s * (2.0 ** min(failures, 62)))
    return base + rng(0.0, base * JITTER_FRACTION)


def _describe_exit(returncode: int) -> dict[str, Any]:
    """``{"exit_code": n}`` for a normal exit, ``{"signal": "SIGKILL"}`` for a death by signal."""
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": f"signal {-returncode}"}
    return {"exit_code": returncode}


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the Linux kernel to SIGTERM the child when its parent dies.

    The libc function is looked up here, in the parent: the child between fork and exec should do as
    little as possible. Returns None where ``prctl`` is not available (non-Linux).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent_pid = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        # The parent may have died between fork and prctl: then no death signal will ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sigterm)

    return preexec


@dataclass
class _Slot:
    """One of the N places a child runs in."""

    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0          # monotonic seconds
    failures: int = 0                # consecutive failed runs (reset after a stable run)
    restarts: int = 0                # restarts so far (for logs)
    restart_at: float | None = None  # monotonic time of the pending restart
    previous_pid: int | None = None
    done: bool = False               # exited 0 with restart_clean_exits=False
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    """Starts ``processes`` children running ``child_argv`` and keeps them running until stopped.

    Parameters (all durations in seconds):

    - ``child_argv``: the command line of one child (e.g. ``[sys.executable, "-m", "connectors.app.cli",
      "run", "--config", path]``); non-empty list of strings.
    - ``processes``: number of children, >= 1 (see :func:`resolve_processes`).
    - ``logger``: a structlog (bound) logger; the supervisor logs ``supervisor_started``,
      ``child_started``, ``child_exited``, ``child_restarted``, ``child_spawn_failed``,
      ``child_config_error``, ``shutdown_requested``, ``child_killed``, ``supervisor_stopped``.
    - ``shutdown_grace_s``: the children's shutdown grace; stragglers are SIGKILLed
      ``shutdown_margin_s`` (default ``SHUTDOWN_MARGIN_S``, 5 s) after it.
    - ``restart_backoff_initial_s`` / ``restart_backoff_max_s``: see :func:`restart_delay`.
    - ``restart_backoff_reset_s``: a child up at least this long resets its slot's backoff.
    - ``env``: the children's base environment (default: this process's ``os.environ``).
    - ``restart_clean_exits``: restart children that exit 0 (default True; False for finite runs).

    Raises ValueError for an empty ``child_argv``, ``processes < 1`` or negative durations.
    """

    def __init__(
        self,
        child_argv: Sequence[str],
        processes: int,
        *,
        logger: Any,
        shutdown_grace_s: float = 30.0,
        restart_backoff_initial_s: float = 1.0,
        restart_backoff_max_s: float = 60.0,
        restart_backoff_reset_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        restart_clean_exits: bool = True,
        shutdown_margin_s: float = SHUTDOWN_MARGIN_S,
    ) -> None:
        if not child_argv:
            raise ValueError("child_argv is empty; pass the command line of one worker")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, not {processes!r}")
        for name, value in (("shutdown_grace_s", shutdown_grace_s),
                            ("restart_backoff_initial_s", restart_backoff_initial_s),
                            ("restart_backoff_max_s", restart_backoff_max_s),
                            ("restart_backoff_reset_s", restart_backoff_reset_s),
                            ("shutdown_margin_s", shutdown_margin_s)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value!r}")
        self.child_argv = [str(arg) for arg in child_argv]
        self.processes = processes
        self.log = logger
        self.shutdown_grace_s = float(shutdown_grace_s)
        self.shutdown_margin_s = float(shutdown_margin_s)
        self.backoff_initial_s = float(restart_backoff_initial_s)
        self.backoff_max_s = max(float(restart_backoff_max_s), self.backoff_initial_s)
        self.backoff_reset_s = float(restart_backoff_reset_s)
        self.env = dict(os.environ if env is None else env)
        self.restart_clean_exits = restart_clean_exits
        self.slots = [_Slot(index=i) for i in range(processes)]
        self._preexec = _pdeathsig_preexec()
        self._stop_signal: int | None = None   # signal number asked for, set by stop()/handlers
        self._stop_seen: int = 0               # how many stop requests were handled
        self._stop_count: int = 0              # how many stop requests arrived
        self._wake_r = self._wake_w = -1       # self-pipe, open only while run() runs

    # -- public ---------------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a shutdown: ``signum`` is forwarded to every child. Safe from signal handlers and
        other threads; returns at once."""
        self._stop_signal = int(signum)
        self._stop_count += 1
        self._wake()

    def pids(self) -> list[int | None]:
        """The pid of each slot's running child (None while a slot waits for a restart)."""
        return [slot.proc.pid if slot.proc is not None else None for slot in self.slots]

    def run(self) -> int:
        """Start the children and supervise them until a shutdown; returns the exit code.

        0: shut down on request and every child stopped cleanly (or, with
        ``restart_clean_exits=False``, every child finished with 0); 1: some child failed to stop
        cleanly or had to be SIGKILLed; 2: a child reported a configuration error (exit code 2).
        Raises OSError when a child cannot be started at all on the first attempt (after stopping
        the children already started).
        """
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous = self._install_signal_handlers()
        try:
            self.log.info("supervisor_started", processes=self.processes, pid=os.getpid(),
                          argv=self.child_argv, pdeathsig=self._preexec is not None)
            for slot in self.slots:
                if self._stop_signal is not None:
                    break
                try:
                    self._spawn(slot)
                except OSError as exc:
                    self.log.error("child_spawn_failed", index=slot.index, error=str(exc))
                    self._shutdown(signal.SIGTERM, reason="spawn_failed")
                    raise
            code = self._supervise()
            self.log.info("supervisor_stopped", exit_code=code)
            return code
        finally:
            self._restore_signal_handlers(previous)
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)

    # -- main loop -------------------------------------------------------------------------------

    def _supervise(self) -> int:
        while True:
            if self._stop_signal is not None:
                self._stop_seen = self._stop_count
                self.log.info("shutdown_requested", signal=signal.Signals(self._stop_signal).name,
                              grace_s=self.shutdown_grace_s)
                return self._shutdown(self._stop_signal, reason="signal")
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None:
                    continue
                returncode = slot.proc.poll()
                if returncode is None:
                    continue
                if returncode == EXIT_CONFIG:
                    self._log_exit(slot, returncode, now)
                    slot.proc = None
                    self.log.error("child_config_error", index=slot.index,
                                   hint="a child reported invalid configuration (exit code 2); "
                                        "not restarting, stopping every child")
                    self._shutdown(signal.SIGTERM, reason="config_error")
                    return EXIT_CONFIG
                self._on_unexpected_exit(slot, returncode, now)
            if not self.restart_clean_exits and all(slot.done for slot in self.slots):
                return EXIT_OK
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now and self._stop_signal is None:
                    self._restart(slot)
            self._sleep(self._next_wait())

    def _on_unexpected_exit(self, slot: _Slot, returncode: int, now: float) -> None:
        uptime = now - slot.started_at
        slot.previous_pid = slot.proc.pid if slot.proc else None
        slot.proc = None
        if returncode == 0 and not self.restart_clean_exits:
            slot.done = True
            self._log_exit(slot, returncode, now, restart_in_s=None, pid=slot.previous_pid)
            return
        if uptime >= self.backoff_reset_s:
            slot.failures = 0
        delay = restart_delay(slot.failures, self.backoff_initial_s, self.backoff_max_s)
        slot.failures += 1
        slot.restart_at = now + delay
        self._log_exit(slot, returncode, now, restart_in_s=round(delay, 3), pid=slot.previous_pid)

    def _restart(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.restarts += 1
        try:
            self._spawn(slot)
        except OSError as exc:
            delay = restart_delay(slot.failures, self.backoff_initial_s, self.backoff_max_s)
            slot.failures += 1
            slot.restart_at = time.monotonic() + delay
            self.log.error("child_spawn_failed", index=slot.index, error=str(exc), restart_in_s=round(delay, 3))
            return
        self.log.info("child_restarted", index=slot.index, pid=slot.proc.pid,
                      previous_pid=slot.previous_pid, attempt=slot.restarts,
                      consecutive_failures=slot.failures)

    def _next_wait(self) -> float:
        wait = POLL_INTERVAL_S
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None:
                wait = min(wait, max(0.0, slot.restart_at - now))
        return wait

    # -- shutdown --------------------------------------------------------------------------------

    def _shutdown(self, signum: int, *, reason: str) -> int:
        """Forward ``signum`` to every running child, wait for them, SIGKILL stragglers. Returns 0
        when every child stopped cleanly, else 1."""
        for slot in self.slots:
            slot.restart_at = None
        self._forward(signum)
        clean = True
        deadline = time.monotonic() + self.shutdown_grace_s + self.shutdown_margin_s
        while True:
            for slot in self.slots:
                if slot.proc is None:
                    continue
                returncode = slot.proc.poll()
                if returncode is None:
                    continue
                ok = returncode == 0 or returncode == -signum
                clean = clean and ok
                self._log_exit(slot, returncode, time.monotonic(), restart_in_s=None, shutting_down=True,
                               clean=ok)
                slot.proc = None
            if all(slot.proc is None for slot in self.slots):
                return EXIT_OK if clean else EXIT_FAILED
            if time.monotonic() >= deadline:
                break
            if self._stop_count != self._stop_seen and self._stop_signal is not None:
                self._stop_seen = self._stop_count
                self.log.info("shutdown_signal_repeated", signal=signal.Signals(self._stop_signal).name)
                self._forward(self._stop_signal)
            self._sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        for slot in self.slots:
            if slot.proc is None:
                continue
            self.log.warning("child_killed", index=slot.index, pid=slot.proc.pid,
                             reason=f"still running {self.shutdown_grace_s + self.shutdown_margin_s:g} s "
                                    f"after {signal.Signals(signum).name} ({reason})")
            try:
                slot.proc.kill()
            except OSError:  # already gone
                pass
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                returncode = slot.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                self.log.error("child_unreaped", index=slot.index, pid=slot.proc.pid)
                continue
            self._log_exit(slot, returncode, time.monotonic(), restart_in_s=None, shutting_down=True, clean=False)
            slot.proc = None
        return EXIT_FAILED

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                try:
                    slot.proc.send_signal(signum)
                except OSError:  # exited in between
                    pass

    # -- helpers ---------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        env = dict(self.env)
        env[CHILD_ENV] = str(slot.index)
        slot.proc = subprocess.Popen(self.child_argv, env=env, preexec_fn=self._preexec)
        slot.started_at = time.monotonic()
        slot.history.append(slot.proc.pid)
        self.log.info("child_started", index=slot.index, pid=slot.proc.pid)

    def _log_exit(self, slot: _Slot, returncode: int, now: float, *, pid: int | None = None, **extra: Any) -> None:
        pid = pid if pid is not None else (slot.proc.pid if slot.proc is not None else None)
        level = self.log.info if extra.get("shutting_down") or returncode == 0 else self.log.warning
        level("child_exited", index=slot.index, pid=pid, **_describe_exit(returncode),
              uptime_s=round(now - slot.started_at, 3), **extra)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # pipe full (already woken) or closed
            pass

    def _sleep(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, or until :meth:`stop` / a signal handler wakes us."""
        if self._wake_r < 0:  # pragma: no cover - only inside run()
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # pragma: no cover - fd closed
            time.sleep(timeout)
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _install_signal_handlers(self) -> dict[int, Any] | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}

        def handler(signum, _frame):
            self.stop(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any] | None) -> None:
        for signum, old in (previous or {}).items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def run_supervised(
    child_argv: list[str],
    processes: int,
    *,
    logger: Any,
    shutdown_grace_s: float = 30.0,
    restart_backoff_initial_s: float = 1.0,
    restart_backoff_max_s: float = 60.0,
    restart_backoff_reset_s: float = 60.0,
    env: Mapping[str, str] | None = None,
    restart_clean_exits: bool = True,
    shutdown_margin_s: float = SHUTDOWN_MARGIN_S,
) -> int:
    """Run ``processes`` copies of ``child_argv`` under a :class:`Supervisor` until SIGTERM/SIGINT
    (or a child's configuration error); returns the exit code (0 clean shutdown, 1 some child did not
    stop cleanly, 2 a child exited with a configuration error). Call it from the main thread so it
    can install its SIGTERM/SIGINT handlers. Parameters and errors as for :class:`Supervisor`.
    """
    return Supervisor(
        child_argv, processes, logger=logger, shutdown_grace_s=shutdown_grace_s,
        restart_backoff_initial_s=restart_backoff_initial_s, restart_backoff_max_s=restart_backoff_max_s,
        restart_backoff_reset_s=restart_backoff_reset_s, env=env, restart_clean_exits=restart_clean_exits,
        shutdown_margin_s=shutdown_margin_s,
    ).run()
