"""``ddb-cdc demo``: the whole pipeline on embedded stand-in servers, then end-state checks.

What :func:`run_demo` does, on a machine with no AWS account and no servers installed
beforehand (only the ``demo`` extra: ``pip install 'ddb-cdc[demo]'``):

1. Starts the stand-ins from :mod:`connectors.embedded.servers`, all on ``127.0.0.1`` and free ports:
   moto server (DynamoDB, DynamoDB Streams and S3, in a thread of this process), osmem-server
   (the OpenSearch REST API, a child process) and Redis (``redis-server`` when it is on PATH,
   else fakeredis' TCP server).
2. Creates the table ``demo-orders`` (``pk`` S / ``sk`` N) with a ``NEW_AND_OLD_IMAGES`` stream
   and the S3 bucket ``ddb-cdc-demo-audit``.
3. Plans ``changes`` seeded changes (:class:`connectors.embedded.workload.Workload`: inserts, updates,
   deletes; nested maps and lists, string / number / binary sets, binary values, 38-digit
   numbers, unicode) and stores in Redis every cache key those changes will invalidate
   (rendered with the Redis sink's own key templates,
   :data:`connectors.embedded.workload.CACHE_KEY_TEMPLATES`), plus the unrelated key ``demo:sentinel``.
4. Builds :class:`pipeline.config.Settings` in code (SQLite checkpoints and a dead-letter
   directory in a fresh temp dir; sinks ``search`` → OpenSearch index ``demo-orders``,
   ``audit`` → S3 ``s3://ddb-cdc-demo-audit/audit/``, ``cache`` → Redis) and runs
   :func:`connectors.app.wiring.build_worker`'s worker in a background thread. Worker logs (JSON
   lines) go to ``worker.log`` in the temp dir, not to the console.
5. Writes the planned changes while the worker runs, with a rich progress display; then waits
   (at most ``timeout_s``, default 120 s) until the worker's SQLite checkpoint reaches the
   stream's last sequence number, stops the worker and requires exit code 0.
6. Checks, independently of the worker (:mod:`connectors.embedded.verify`): the OpenSearch documents equal
   the table's items (consistent Scan); the S3 audit log holds one line per stream record (read
   back from TRIM_HORIZON with plain boto3); every change's cache keys are gone from Redis and
   the sentinel is not; the worker exited 0 with an empty dead-letter directory. Prints a table
   of the checks and what to run next.

Returns 0 only if every check holds; 1 otherwise, or on any error (one line on the console, no
traceback; the temp dir with ``worker.log`` is then kept and its path printed). Every server
and the worker thread are stopped before returning.

Isolation from the user's AWS set-up, for the duration of the run (restored afterwards):
static fake credentials (``demo`` / ``demo``, region ``us-east-1``) are both in the settings'
``aws`` section and in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION``; ``AWS_PROFILE``, ``AWS_SESSION_TOKEN`` and ``AWS_ENDPOINT_URL*`` are
removed; ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` point to empty files in the temp
dir; instance metadata is disabled; ``DDB_CDC_*`` variables are removed (they would override the
demo's settings). As a guard that no real AWS endpoint is ever contacted, ``HTTP(S)_PROXY`` is
set to a closed loopback port with ``NO_PROXY=127.0.0.1,localhost``: botocore and urllib send any
request for a non-loopback host to that proxy, where the connection is refused (botocore retries,
then raises ProxyConnectionError) — nothing leaves the machine.

moto's DynamoDB Streams (moto 5.x; checked against its source and by experiment). It supports
what the worker needs — DescribeStream, GetShardIterator (TRIM_HORIZON, LATEST, AT/AFTER_SEQUENCE_NUMBER),
GetRecords with ``NEW_AND_OLD_IMAGES`` — and gives back binary values as bytes, string / number /
binary sets, 38-digit numbers as written, and ``ApproximateCreationDateTime`` as a timestamp
with milliseconds. Quirks, none of which needs a work-around here:

- one shard per table that never closes: ``NextShardIterator`` is always returned, also after an
  empty read, so the demo waits for the checkpoint instead of for SHARD_END
  (``ddb-cdc run --exit-when-idle`` would never exit against moto);
- sequence numbers are consecutive integers from ``1100000000017454423009`` (22 digits), the
  shard id is the same constant for every table, and ``SizeBytes`` is an overestimate;
- a write that changes nothing still produces a MODIFY record (real DynamoDB writes none);
- every GetRecords call creates a new iterator that moto keeps in memory until it stops (fine
  for a demo; the worker waits ``idle_interval_ms`` between empty reads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from connectors.embedded.verify import CheckResult
from pipeline.errors import DemoError  # noqa: F401 (defined in the one error tree)

__all__ = ["run_demo", "DemoError", "TABLE", "INDEX", "BUCKET", "AUDIT_PREFIX", "SENTINEL_KEY", "CHECK_NAMES"]

TABLE = "demo-orders"
INDEX = "demo-orders"
BUCKET = "ddb-cdc-demo-audit"
AUDIT_PREFIX = "audit"
SENTINEL_KEY = "demo:sentinel"
REGION = "us-east-1"
ACCESS_KEY_ID = "demo"
SECRET_ACCESS_KEY = "demo"
#: Names of the rows of the closing check table, in order.
CHECK_NAMES = ("worker", "opensearch", "s3_audit", "redis")

_LOOPBACK_HOSTS = "127.0.0.1,localhost"
#: Nothing listens on TCP port 9 (discard) on loopback: a request sent through this proxy is refused.
_BLACKHOLE_PROXY = "http://127.0.0.1:9"



# --------------------------------------------------------------------------------------------
# entry point


def run_demo(changes: int = 600, seed: int = 7, *, timeout_s: float = 120.0, console: Console | None = None) -> int:
    """Run the demo (see the module doc) and return the exit code: 0 if every check holds, else 1.

    - ``changes``: number of changes to write (≥ 1). The default 600 takes 15–35 s of wall time
      on a 2-core machine (measured: 16 s idle, about 30 s with other work running), most of it
      writing while the worker, moto and the writer share one Python process.
    - ``seed``: workload seed; the same seed plans the same changes (sequence numbers and
      timestamps differ from run to run).
    - ``timeout_s``: how long to wait, after the last write, for the worker to checkpoint the
      stream's last record (seconds).
    - ``console``: where to print (default: a new ``rich.console.Console`` on stdout).

    Never raises for a failed step (prints one line and returns 1); ``KeyboardInterrupt``
    propagates after everything was stopped.
    """
    console = console or Console(highlight=False)
    if changes < 1:
        console.print("[red]demo failed:[/] --changes must be at least 1")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="ddb-cdc-demo-"))
    demo = _Demo(console, workdir, changes=changes, seed=seed, timeout_s=timeout_s)
    ok = False
    try:
        with _isolated_environment(workdir), _logging_to(workdir / "worker.log"):
            try:
                ok = demo.run()
            finally:
                demo.close()
    except Exception as exc:  # noqa: BLE001 - the demo reports every failure in one line
        console.print(f"[red]demo failed:[/] {_one_line(exc)}")
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"Worker log and checkpoint file kept in {workdir} (worker.log).")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class _Demo:
    """State of one demo run; :meth:`run` does the steps, :meth:`close` stops everything it started."""

    console: Console
    workdir: Path
    changes: int
    seed: int
    timeout_s: float
    servers: list[Any] = field(default_factory=list)
    worker: Any = None
    thread: threading.Thread | None = None
    exit_codes: list[int] = field(default_factory=list)
    worker_error: list[BaseException] = field(default_factory=list)

    # -- steps ---------------------------------------------------------------------------------

    def run(self) -> bool:
        """All steps; True if every check holds. Raises DemoError (or a library error) when a step fails."""
        started = time.monotonic()
        moto, search, redis_server = self._start_servers()
        ddb, streams, s3 = (_boto_client(name, moto.endpoint) for name in ("dynamodb", "dynamodbstreams", "s3"))

        from connectors.embedded import workload as wl

        stream_arn = wl.create_table(ddb, TABLE, "NEW_AND_OLD_IMAGES")
        s3.create_bucket(Bucket=BUCKET)
        self.console.print(f"Created table [bold]{TABLE}[/] (stream NEW_AND_OLD_IMAGES) and bucket "
                           f"[bold]{BUCKET}[/].")

        settings = self._settings(moto.endpoint, search.url, redis_server.url)
        from pipeline.registry import build_sinks
        from connectors.redis_cache import RedisCacheSink

        sinks = build_sinks(settings.sinks, "demo")
        cache_sink = next(s for s in sinks if isinstance(s, RedisCacheSink))

        # Plan first, so that every key the changes will invalidate can be cached beforehand.
        workload = wl.Workload(seed=self.seed, items=_item_count(self.changes))
        plan = list(workload.changes(self.changes))
        redis_client = _redis_client(redis_server.url)
        seeded = _seed_cache(redis_client, cache_sink, plan)
        self.console.print(f"Planned {len(plan)} changes on {workload.items} items "
                           f"({_kinds(plan)}); cached {len(seeded)} keys they will invalidate, "
                           f"plus {SENTINEL_KEY!r}.")

        self._start_worker(settings, sinks)
        events = self._write_and_wait(ddb, streams, stream_arn, plan, wl)
        code = self._stop_worker()

        results = [self._check_worker(code, settings, events)]
        results.extend(self._check_sinks(ddb, s3, search.url, redis_client, cache_sink, events, seeded))
        self._print_results(results, time.monotonic() - started)
        self._print_next()
        return all(r.ok for r in results)

    def _start_servers(self) -> tuple[Any, Any, Any]:
        from connectors.embedded.servers import MotoServer, OpenSearchServer, RedisServer

        with self.console.status("Starting embedded stand-ins (moto, osmem-server, Redis)…"):
            moto = MotoServer()
            self.servers.append(moto)
            search = OpenSearchServer()
            self.servers.append(search)
            redis_server = RedisServer()
            self.servers.append(redis_server)
        self.console.print(f"Started moto {_version('moto')} at {moto.endpoint} (DynamoDB, DynamoDB Streams, S3)")
        self.console.print(f"Started osmem-server at {search.url} (OpenSearch API {search.version})")
        self.console.print(f"Started {redis_server.kind} at {redis_server.url}")
        return moto, search, redis_server

    def _settings(self, aws_endpoint: str, search_url: str, redis_url: str) -> Any:
        from connectors.embedded.workload import CACHE_KEY_TEMPLATES
        from pipeline.config import Settings

        return Settings(
            source={"table": TABLE, "start_position": "TRIM_HORIZON", "idle_interval_ms": 100,
                    "discovery_interval_s": 5, "checkpoint_interval_s": 1},
            aws={"region": REGION, "endpoint_url": aws_endpoint, "access_key_id": ACCESS_KEY_ID,
                 "secret_access_key": SECRET_ACCESS_KEY, "max_attempts": 3},
            checkpoints={"store": "sqlite", "sqlite_path": str(self.workdir / "checkpoints.sqlite")},
            dead_letter={"directory": str(self.workdir / "dead-letter")},
            sinks=[
                {"name": "search", "type": "opensearch",
                 "options": {"hosts": [search_url], "index": INDEX, "refresh": False}},
                {"name": "audit", "type": "s3_audit",
                 "options": {"bucket": BUCKET, "prefix": AUDIT_PREFIX, "endpoint_url": aws_endpoint,
                             "region": REGION, "max_buffer_age_s": 2}},
                {"name": "cache", "type": "redis_cache",
                 "options": {"url": redis_url, "key_templates": list(CACHE_KEY_TEMPLATES)}},
            ],
            worker={"id": "ddb-cdc-demo", "shutdown_grace_s": 15},
            log={"level": "INFO", "format": "json"},
        )

    def _start_worker(self, settings: Any, sinks: list[Any]) -> None:
        from connectors.app.wiring import build_worker
        from pipeline.logs import get_logger

        self.worker = build_worker(settings, logger=get_logger(), where="demo", sinks=sinks)

        def target() -> None:
            try:
                self.exit_codes.append(self.worker.run())
            except BaseException as exc:  # noqa: BLE001 - reported by _stop_worker
                self.worker_error.append(exc)

        self.thread = threading.Thread(target=target, name="ddb-cdc-demo-worker", daemon=True)
        self.thread.start()

    def _write_and_wait(self, ddb: Any, streams: Any, stream_arn: str, plan: list[Any], wl: Any) -> list[Any]:
        """Write the plan with progress, read the stream, wait for the checkpoint; return the stream's events."""
        from connectors.sqlite_store import SQLiteLeaseStore
        from connectors.embedded.verify import read_stream_events

        store = SQLiteLeaseStore(str(self.workdir / "checkpoints.sqlite"))
        progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=self.console)
        with progress:
            write = progress.add_task("Writing changes to DynamoDB", total=len(plan))
            read = progress.add_task("Worker reading the stream", total=len(plan))
            for n, change in enumerate(plan, start=1):
                wl.apply_change(ddb, TABLE, change)
                progress.update(write, completed=n)
                if n % 20 == 0 or n == len(plan):
                    progress.update(read, completed=min(self._records_read(), len(plan)))
                    self._require_worker_alive()
            events = read_stream_events(streams, stream_arn, TABLE)
            if not events:
                raise DemoError("the stream holds no records after the writes (moto did not record them)")
            sequence = sorted(int(e.sequence_number) for e in events)
            progress.update(read, total=len(events))
            done = progress.add_task("Worker checkpointed", total=len(events))
            deadline = time.monotonic() + self.timeout_s
            while True:
                position = _checkpoint_of(store, stream_arn)
                delivered = bisect_right(sequence, position) if position is not None else 0
                progress.update(read, completed=min(self._records_read(), len(events)))
                progress.update(done, completed=delivered)
                if delivered == len(events):
                    break
                self._require_worker_alive()
                if time.monotonic() > deadline:
                    raise DemoError(f"the worker checkpointed {delivered} of {len(events)} records within "
                                    f"{self.timeout_s:g} s")
                time.sleep(0.2)
        return events

    def _stop_worker(self) -> int:
        """Stop the worker, wait for its thread, return its exit code. Raises DemoError if it crashed or hung."""
        assert self.worker is not None and self.thread is not None
        self.worker.stop()
        self.thread.join(timeout=self.worker.shutdown_grace_s + 15)
        if self.thread.is_alive():
            raise DemoError("the worker did not stop within its shutdown grace period")
        if self.worker_error:
            exc = self.worker_error[0]
            raise DemoError(f"the worker crashed: {_one_line(exc)}")
        return self.exit_codes[0]

    # -- checks --------------------------------------------------------------------------------

    def _check_worker(self, code: int, settings: Any, events: list[Any]) -> CheckResult:
        from connectors.app.wiring import build_dead_letter

        entries = list(build_dead_letter(settings).list())
        problems = [f"dead-letter entry {e.id}: {e.kind} {e.sink or '-'}: {e.error[:160]}" for e in entries[:20]]
        if code != 0:
            problems.insert(0, f"worker exited with code {code} (see worker.log)")
        return CheckResult("worker", not problems,
                           f"exit code {code}, {len(events)} stream records, {len(entries)} dead-letter entries",
                           problems)

    def _check_sinks(self, ddb: Any, s3: Any, search_url: str, redis_client: Any, cache_sink: Any,
                     events: list[Any], seeded: set[str]) -> list[CheckResult]:
        from connectors.s3.audit import read_audit_objects
        from connectors.embedded.verify import check_opensearch, check_redis, check_s3_audit
        from connectors.embedded.workload import scan_items
        from pipeline.codec import key_id

        items = scan_items(ddb, TABLE)
        search = check_opensearch(search_url, INDEX, items,
                                  key_id_of=lambda item: key_id({"pk": item["pk"], "sk": item["sk"]}))
        audit = check_s3_audit(list(read_audit_objects(s3, BUCKET, f"{AUDIT_PREFIX}/")), events)
        expected = {key for event in events for key in cache_sink.keys_for(event)}
        cache = check_redis(redis_client, expected, SENTINEL_KEY)
        unseeded = sorted(expected - seeded)
        if unseeded:  # a key that never existed proves nothing about its invalidation
            cache.ok = False
            cache.problems = [*(f"cache key {k!r} was never cached before the run" for k in unseeded[:10]),
                              *cache.problems][:20]
        return [search, audit, cache]

    # -- output --------------------------------------------------------------------------------

    def _print_results(self, results: list[CheckResult], elapsed_s: float) -> None:
        passed, failed = _marks(self.console)
        table = Table(title="Checks", title_justify="left", show_lines=False)
        table.add_column("check", no_wrap=True)
        table.add_column("", no_wrap=True)
        table.add_column("summary")
        table.add_column("first problems")
        for r in results:
            mark = f"[green]{passed}[/]" if r.ok else f"[red]{failed}[/]"
            table.add_row(r.name, mark, r.summary, "\n".join(r.problems[:3]) or "-")
        self.console.print()
        self.console.print(table)
        bad = [r.name for r in results if not r.ok]
        if bad:
            self.console.print(f"[red bold]{failed} {len(bad)} of {len(results)} checks failed:[/] {', '.join(bad)}")
        else:
            self.console.print(f"[green bold]{passed} all {len(results)} checks passed[/] in {elapsed_s:.1f} s")

    def _print_next(self) -> None:
        self.console.print()
        self.console.print("[bold]Next:[/]")
        steps = (
            ("Validate a configuration for your own table (starts nothing):",
             "ddb-cdc config check --config examples/config.yaml"),
            ("Run the worker on it (SIGTERM/SIGINT flushes, checkpoints and stops):",
             "ddb-cdc run --config examples/config.yaml"),
            ("List the sink types, built-in and plugins:", "ddb-cdc sinks"),
            ("Inspect events that could not be delivered:", "ddb-cdc dlq list --config examples/config.yaml"),
        )
        for text, command in steps:
            self.console.print(f"  {text}", markup=False)
            self.console.print(f"      {command}", markup=False, soft_wrap=True)
        self.console.print("  Read the README sections \"Configuration\" (every setting, DDB_CDC_* variables) "
                           "and \"Sinks\" (OpenSearch, S3 audit and Redis options; writing a plugin).",
                           markup=False)

    # -- helpers -------------------------------------------------------------------------------

    def _records_read(self) -> int:
        """Records the worker has read so far (sum over its shard consumers; 0 if unknown)."""
        worker = self.worker
        try:
            return sum(c.stats.records_read for c in list(worker.consumers.values()))
        except (AttributeError, RuntimeError):
            return 0

    def _require_worker_alive(self) -> None:
        if self.thread is not None and not self.thread.is_alive():
            if self.worker_error:
                raise DemoError(f"the worker crashed: {_one_line(self.worker_error[0])}")
            code = self.exit_codes[0] if self.exit_codes else "?"
            raise DemoError(f"the worker stopped early with exit code {code} (see worker.log)")

    def close(self) -> None:
        """Stop the worker (if running) and every server started, in reverse order. Never raises."""
        if self.worker is not None and self.thread is not None and self.thread.is_alive():
            self.worker.stop()
            self.thread.join(timeout=30)
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.close()
        self.servers.clear()


# --------------------------------------------------------------------------------------------
# helpers


def _item_count(changes: int) -> int:
    """Distinct items for ``changes`` changes: about three changes per item, 10–200 items."""
    return max(10, min(200, changes // 3))


def _kinds(plan: list[Any]) -> str:
    counts = {"put": 0, "update": 0, "delete": 0}
    for change in plan:
        counts[change.kind] = counts.get(change.kind, 0) + 1
    return f"{counts['put']} puts, {counts['update']} updates, {counts['delete']} deletes"


def _planned_emails(change: Any) -> list[str]:
    """The ``email`` values a planned change writes (its put item's, or its update's SET value)."""
    if change.kind == "put":
        value = change.request["Item"].get("email", {})
    elif change.kind == "update":
        value = change.request.get("ExpressionAttributeValues", {}).get(":e", {})
    else:
        return []
    return [value["S"]] if isinstance(value, dict) and "S" in value else []


def _seed_cache(client: Any, cache_sink: Any, plan: list[Any]) -> set[str]:
    """SET every cache key the planned changes can invalidate, and the sentinel; return the keys.

    Keys are rendered with the sink's own templates (``cache_sink.templates``) from each planned
    key merged with every email that item is given anywhere in the plan — a superset of what
    ``keys_for`` yields for the resulting stream records (whose images hold those values).
    """
    from pipeline.codec import key_id

    emails: dict[str, set[str]] = {}
    keys_by_id: dict[str, dict[str, Any]] = {}
    for change in plan:
        kid = key_id(change.key)
        keys_by_id[kid] = change.key
        emails.setdefault(kid, set()).update(_planned_emails(change))
    seeded: set[str] = set()
    for kid, key in keys_by_id.items():
        for values in [dict(key), *({**key, "email": e} for e in emails[kid])]:
            for template in cache_sink.templates:
                rendered = template.render(values)
                if rendered is not None:
                    seeded.add(rendered)
    pipe = client.pipeline(transaction=False)
    for key in sorted(seeded):
        pipe.set(key, b"cached by ddb-cdc demo")
    pipe.set(SENTINEL_KEY, b"not derived from any change")
    pipe.execute()
    return seeded


def _checkpoint_of(store: Any, stream_arn: str) -> int | None:
    """The highest numeric checkpoint of the stream's leases in ``store`` (None before the first one).

    SHARD_END counts as "everything" (never reached on moto, whose shard stays open).
    """
    try:
        leases = [lease for lease in store.list_leases() if lease.stream_arn == stream_arn]
    except Exception:  # noqa: BLE001 - e.g. sqlite3.OperationalError before the worker created the table
        return None
    best: int | None = None
    for lease in leases:
        cp = lease.checkpoint
        if cp == "SHARD_END":
            return 10**40
        if isinstance(cp, str) and cp.isdigit():
            best = max(best or 0, int(cp))
    return best


def _boto_client(service: str, endpoint: str) -> Any:
    """A boto3 client on ``endpoint`` with the demo's static credentials (never the user's)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION,
    ).client(service, endpoint_url=endpoint,
             config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60))


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _marks(console: Console) -> tuple[str, str]:
    """✓ / ✗ when the console can encode them, else OK / FAIL."""
    try:
        "✓✗".encode(console.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "OK", "FAIL"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    name = type(exc).__name__
    if isinstance(exc, DemoError):
        return text
    return f"{name}: {text}"[:500]


@contextlib.contextmanager
def _isolated_environment(workdir: Path) -> Iterator[None]:
    """Environment for the run (see the module doc): fake static credentials, no user AWS config,
    no DDB_CDC_* overrides, and non-loopback HTTP sent to a black-hole proxy. Restored on exit."""
    config_file = workdir / "aws-config"
    credentials_file = workdir / "aws-credentials"
    config_file.write_text("")
    credentials_file.write_text("")
    removed = [k for k in os.environ
               if k.startswith("DDB_CDC_") or k.startswith("AWS_ENDPOINT_URL")
               or k in {"AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                        "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN"}]
    updates = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(config_file),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials_file),
        "AWS_EC2_METADATA_DISABLED": "true",
        "HTTP_PROXY": _BLACKHOLE_PROXY,
        "HTTPS_PROXY": _BLACKHOLE_PROXY,
        "http_proxy": _BLACKHOLE_PROXY,
        "https_proxy": _BLACKHOLE_PROXY,
        "NO_PROXY": _LOOPBACK_HOSTS,
        "no_proxy": _LOOPBACK_HOSTS,
    }
    saved = {k: os.environ.get(k) for k in [*removed, *updates]}
    try:
        for k in removed:
            os.environ.pop(k, None)
        os.environ.update(updates)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """structlog (JSON lines, INFO) and stdlib warnings into ``path`` for the run; previous set-up restored after."""
    import structlog

    from pipeline.logs import configure_logging

    old_config = structlog.get_config()
    root = logging.getLogger()
    old_handlers = list(root.handlers)
    with open(path, "a", encoding="utf-8") as stream:
        try:
            configure_logging("INFO", "json", stream=stream)
            yield
        finally:
            structlog.configure(**old_config)
            for handler in list(root.handlers):
                if handler not in old_handlers:
                    root.removeHandler(handler)
                    with contextlib.suppress(Exception):
                        handler.close()
