"""The AWS Lambda handler: ``connectors.aws_lambda.handler.handler`` for a DynamoDB stream event
source mapping with ``FunctionResponseTypes: [ReportBatchItemFailures]``.

Configuration: the same :class:`pipeline.config.Settings` as the worker — the YAML file named by
``DDB_CDC_CONFIG``, else ``ddb-cdc.yaml`` in the deployment package (``$LAMBDA_TASK_ROOT``) when it
exists, else environment variables only — with ``DDB_CDC_*`` environment variables winning. Used:
``source`` (which tables / stream ARNs the function accepts: a record of any other table fails the
invocation with :class:`pipeline.errors.LambdaEventError`), ``aws``, ``sinks`` (with their
``on_failure`` policies), ``dead_letter`` (must be ``s3_uri``: nothing local outlives an execution
environment) and ``log``. Not used: ``checkpoints`` (the event source mapping keeps the position),
``worker``, ``metrics`` (no HTTP server; use the mapping's CloudWatch metrics, e.g. IteratorAge).
Lambda-only knobs, environment only: ``DDB_CDC_LAMBDA_DEADLINE_MARGIN_S`` (default 3 s) and
``DDB_CDC_LAMBDA_FLUSH_RESERVE_S`` (default 10 s), see :class:`LambdaOptions`.

Lifecycle: the first invocation of an execution environment loads the settings, builds and opens
the sinks and the dead-letter destination (:class:`LambdaApp`); warm invocations reuse them. Every
invocation flushes every sink before it returns, so durability never depends on a later close. On
SIGTERM — which Lambda sends the runtime at shutdown only when an external extension is registered
(aws-samples/graceful-shutdown-with-aws-lambda; the runtime then has ~300 ms) — the sinks are
closed, then the previous SIGTERM disposition runs.

Result: ``{"batchItemFailures": [{"itemIdentifier": "<SequenceNumber>"}, ...]}`` — the first record
not handled and every later record (fail-fast, :mod:`connectors.aws_lambda.delivery`); empty when
every record is durable in every sink or in the dead-letter destination.

Versions: events get the same external version as the worker gives a shard whose parents its lease
table never read (``pipeline.codec.record_version`` with floor 0: whole seconds of
ApproximateCreationDateTime, then the sequence number's counter), so retried and bisected batches
and re-sent records are harmless. No lease table exists here to carry a version floor across a
shard split: two changes of one item in the same second on both sides of a split are ordered by
the counter alone (README, "Deploying").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError, LambdaBatchError, LambdaEventError
from pipeline.logs import configure_logging, get_logger, register_secrets_of
from pipeline.registry import build_sinks
from pipeline.runtime.fanout import FailurePolicy, SinkRunner
from pipeline.sink import SinkContext

from connectors.aws_lambda.delivery import InvocationOutcome, deliver_invocation
from connectors.aws_lambda.event import UNKNOWN_SHARD_ID, batch_item_failures, parse_event

#: The bundled configuration file looked for in the deployment package when DDB_CDC_CONFIG is unset.
BUNDLED_CONFIG = "ddb-cdc.yaml"
#: Remaining time assumed when the context gives none (an in-process call without a context), s.
DEFAULT_REMAINING_S = 60.0


class LambdaOptions(BaseSettings):
    """Lambda-only knobs (environment ``DDB_CDC_LAMBDA_*``).

    - ``deadline_margin_s``: kept back from the invocation's remaining time (the context's
      ``get_remaining_time_in_millis()``) for building the response (s);
    - ``flush_reserve_s``: of the rest, at most this much (and at most half) is for the flush; the
      writes and their retries get the remainder (s). When the writes' time runs out, the record a
      sink has not taken and every later one are reported.
    """

    model_config = SettingsConfigDict(env_prefix="DDB_CDC_LAMBDA_", extra="ignore")

    deadline_margin_s: float = Field(3.0, ge=0)
    flush_reserve_s: float = Field(10.0, ge=0)

    def budgets(self, remaining_s: float) -> tuple[float, float]:
        """(write budget, flush budget) in seconds for an invocation with ``remaining_s`` left."""
        usable = max(0.0, remaining_s - self.deadline_margin_s)
        flush = min(self.flush_reserve_s, usable / 2)
        return usable - flush, flush


def config_path() -> str | None:
    """The YAML file to load: ``$DDB_CDC_CONFIG``, else ``$LAMBDA_TASK_ROOT/ddb-cdc.yaml`` (or
    ``./ddb-cdc.yaml``) when it exists, else None (environment variables only)."""
    named = os.environ.get("DDB_CDC_CONFIG")
    if named:
        return named
    bundled = Path(os.environ.get("LAMBDA_TASK_ROOT", ".")) / BUNDLED_CONFIG
    return str(bundled) if bundled.is_file() else None


class LambdaApp:
    """The sinks and dead-letter destination of one execution environment.

    ``settings``: the loaded configuration; ``sinks`` / ``dead_letter`` replace the configured ones
    (tests). Opens every sink at construction — raises FatalSinkError-like exceptions from a sink's
    ``open`` and ConfigError for a configuration the handler cannot run (no ``dead_letter.s3_uri``
    and no ``dead_letter`` given). ``install_sigterm``: close the sinks on SIGTERM (main thread only).
    """

    def __init__(self, settings: Settings, *, sinks: Sequence[Any] | None = None, dead_letter: Any = None,
                 options: LambdaOptions | None = None, logger: Any = None, install_sigterm: bool = True):
        self.settings = settings
        self.options = options or LambdaOptions()
        self.log = logger or get_logger(component="lambda")
        if dead_letter is None:
            if not settings.dead_letter.s3_uri:
                raise ConfigError(["lambda: dead_letter: set dead_letter.s3_uri (DDB_CDC_DEAD_LETTER__S3_URI="
                                   "s3://bucket/prefix): a local dead-letter directory does not outlive the "
                                   "execution environment"])
            from connectors.app.wiring import build_dead_letter

            dead_letter = build_dead_letter(settings)
        self.dead_letter = dead_letter
        self.sinks = list(sinks) if sinks is not None else build_sinks(settings.sinks, "lambda")
        policies = {c.name: FailurePolicy(on_failure=c.on_failure, retry_budget_s=c.retry_budget_s,
                                          max_backoff_s=c.max_backoff_s) for c in settings.sinks}
        self.runners = [SinkRunner(s, policies.get(s.name, FailurePolicy())) for s in self.sinks]
        self.worker_id = f"lambda:{os.environ.get('AWS_LAMBDA_LOG_STREAM_NAME', os.getpid())}"
        src = settings.source
        self.tables = {t for t in [src.table, *src.tables] if t}
        self.stream_arns = {a for a in [src.stream_arn, *src.stream_arns] if a}
        self.invocations = 0
        self.closed = False
        self._close_lock = threading.Lock()
        opened = []
        try:
            for sink in self.sinks:
                sink.open(SinkContext(sink_name=sink.name, worker_id=self.worker_id, logger=self.log.bind(sink=sink.name),
                                      aws=settings.aws, dead_letter=self.dead_letter))
                opened.append(sink)
        except Exception:
            for sink in opened:
                _close_quietly(sink, self.log)
            raise
        self._previous_sigterm: Any = None
        if install_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.log.info("lambda_started", sinks=[s.name for s in self.sinks], tables=sorted(self.tables))

    def handle(self, event: Any, context: Any = None) -> dict[str, Any]:
        """One invocation: returns the ReportBatchItemFailures response. Raises LambdaEventError for
        an event that is not a DynamoDB stream event of a configured table, LambdaBatchError when a
        failed record has no sequence number to report (the whole batch is retried)."""
        started = time.monotonic()
        records, shard_id = parse_event(event)
        for rec in records:
            if rec.table not in self.tables and rec.stream_arn not in self.stream_arns:
                raise LambdaEventError(f"record {rec.index}: table {rec.table!r} ({rec.stream_arn}) is not in the "
                                       f"configuration's source (source.table / source.tables / source.stream_arns)")
        self.invocations += 1
        if not records:
            return batch_item_failures([])
        remaining = _remaining_s(context)
        write_budget, flush_budget = self.options.budgets(remaining)
        outcome = deliver_invocation(records, shard_id=shard_id or UNKNOWN_SHARD_ID, runners=self.runners,
                                     dead_letter=self.dead_letter, logger=self.log,
                                     write_budget_s=write_budget, flush_budget_s=flush_budget)
        self._log_outcome(outcome, context, started)
        if outcome.failed_from is not None and not outcome.failures:
            raise LambdaBatchError(f"record {outcome.failed_from} failed and it and the records after it have no "
                                   f"sequence number to report; failing the invocation so Lambda retries the batch")
        return batch_item_failures(outcome.failures)

    def close(self) -> None:
        """Close every sink (once; a sink busy in a call is closed when the call returns). Never raises."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        for runner in self.runners:
            runner.close_when_idle(lambda s=runner.sink: _close_quietly(s, self.log))
        self.log.info("lambda_sinks_closed", invocations=self.invocations)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.close()
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _log_outcome(self, outcome: InvocationOutcome, context: Any, started: float) -> None:
        fields = dict(records=outcome.records, delivered=outcome.delivered, dead_lettered=outcome.dead_lettered,
                      decode_errors=outcome.decode_errors, failed_from=outcome.failed_from,
                      reported=len(outcome.failures), elapsed_ms=int((time.monotonic() - started) * 1000),
                      request_id=getattr(context, "aws_request_id", None))
        if outcome.failed_from is None:
            self.log.info("lambda_invocation", **fields)
        else:
            self.log.warning("lambda_invocation_partial", errors=outcome.errors[:5], **fields)


def _remaining_s(context: Any) -> float:
    getter = getattr(context, "get_remaining_time_in_millis", None)
    if callable(getter):
        try:
            return max(0.0, float(getter()) / 1000.0)
        except (TypeError, ValueError):
            pass
    return DEFAULT_REMAINING_S


def _close_quietly(sink: Any, log: Any) -> None:
    try:
        sink.close()
    except Exception as exc:  # noqa: BLE001
        log.warning("sink_close_failed", sink=getattr(sink, "name", "?"), error=f"{type(exc).__name__}: {exc}"[:300])


_APP: LambdaApp | None = None
_APP_LOCK = threading.Lock()


def get_app() -> LambdaApp:
    """The execution environment's :class:`LambdaApp`, created on first use (settings from
    :func:`config_path` and the environment; logging configured from ``log``). Raises ConfigError
    (logged, and the invocation fails) when the configuration is invalid; the next invocation
    tries again."""
    global _APP
    with _APP_LOCK:
        if _APP is None:
            settings = load_settings(config_path())
            configure_logging(settings.log.level, settings.log.format)
            register_secrets_of(settings)
            _APP = LambdaApp(settings)
        return _APP


def reset_app() -> None:
    """Close and forget the cached :class:`LambdaApp` (tests; a new one is built on next use)."""
    global _APP
    with _APP_LOCK:
        app, _APP = _APP, None
    if app is not None:
        app.close()
        if app._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, app._previous_sigterm)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (``Handler: connectors.aws_lambda.handler.handler``): see the module doc."""
    return get_app().handle(event, context)
