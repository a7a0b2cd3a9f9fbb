"""SIGTERM during start-up (issue 13 item 12): ``ddb-cdc run`` as PID 1 of its own PID namespace
(as in a container: the kernel drops signals PID 1 has no handler for) ends promptly with exit 0
when SIGTERM arrives while DescribeTable waits for an endpoint that does not answer, or retries
one that refuses connections.

The namespace comes from ``unshare -p -f --mount-proc`` (util-linux; needs root or user
namespaces). Where it cannot be used the test runs the process without it — it then checks the
handler only, not the PID 1 semantics — and says so in its skip-free output (``pid1=False``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        out = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "sh", "-c", "echo $$"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "1"


UNSHARE = _unshare_works()


def _config(tmp_path: Path, port: int) -> Path:
    data = {
        "source": {"table": "orders"},
        "aws": {"region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 2,
                "connect_timeout_s": 30, "read_timeout_s": 60},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "cp.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dlq")},
        "log": {"format": "json"},
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": f"redis://127.0.0.1:{port}/0", "key_templates": ["order:{pk}"]}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(tmp_path: Path, config: Path) -> tuple[subprocess.Popen, int, Path]:
    """Start the worker (in a new PID namespace when possible); returns (process we wait for,
    pid of the Python process in our namespace, log file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDB_CDC_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    argv = [sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config)]
    if UNSHARE:
        argv = ["unshare", "-p", "-f", "--mount-proc"] + argv
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(argv, env=env, cwd=str(tmp_path), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    if not UNSHARE:
        return proc, proc.pid, log
    children: list[int] = []

    def child_started() -> bool:
        try:
            children[:] = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            return False
        return bool(children)

    wait_until(child_started, "unshare started the worker", timeout=10)
    nspid = next(line for line in Path(f"/proc/{children[0]}/status").read_text().splitlines()
                 if line.startswith("NSpid:"))
    assert nspid.split()[-1] == "1", nspid  # the worker is PID 1 of its namespace, as in a container
    return proc, children[0], log


def _stop_and_wait(proc: subprocess.Popen, pid: int, log: Path) -> tuple[int, float]:
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"still running 5 s after SIGTERM (pid1={UNSHARE}); log:\n{log.read_text()[-2000:]}")
    return code, time.monotonic() - started


def test_sigterm_while_describe_table_waits_for_an_endpoint_that_does_not_answer(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(0.1)
    accepted: list[socket.socket] = []
    try:
        proc, pid, log = _start(tmp_path, _config(tmp_path, silent.getsockname()[1]))

        def connected() -> bool:  # DescribeTable sent: the worker now waits for an answer (60 s)
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                pass
            return bool(accepted) or proc.poll() is not None

        wait_until(connected, "the worker's DescribeTable connection", timeout=30)
        assert proc.poll() is None, log.read_text()
        code, took = _stop_and_wait(proc, pid, log)
    finally:
        for conn in accepted:
            conn.close()
        silent.close()
    assert code == 0, (code, log.read_text()[-2000:])
    assert took < 5
    text = log.read_text()
    assert '"phase": "start-up"' in text and "shutdown_requested" in text, text[-2000:]
    assert "Traceback" not in text


def test_sigterm_while_describe_table_retries_a_refused_connection(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, pid, log = _start(tmp_path, _config(tmp_path, port))
    wait_until(lambda: "describe_table_retry" in log.read_text() or proc.poll() is not None,
               "the worker retrying DescribeTable", timeout=30)
    assert proc.poll() is None, log.read_text()
    code, took = _stop_and_wait(proc, pid, log)
    assert code == 0, (code, log.read_text()[-2000:])
    assert took < 5
    assert "Traceback" not in log.read_text()
