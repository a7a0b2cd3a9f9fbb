"""``ddb-cdc workload``: write a seeded, mixed workload of changes into a table (demo writer).

::

    ddb-cdc workload --table orders --changes 500            # 500 changes, as fast as the table takes them
    ddb-cdc workload --table orders --rate 20                # 20 changes/s until SIGTERM / SIGINT
    ddb-cdc workload --table orders --changes 0 --rate 5 --seed 3

The changes come from connectors.embedded.workload.Workload (puts, UpdateItem calls and deletes
over items of every DynamoDB type), so the table needs its key schema: ``pk`` (S, hash) and
``sk`` (N, range). DynamoDB is reached with the ``aws`` settings of the configuration
(``--config`` / ``$DDB_CDC_CONFIG`` and ``DDB_CDC_AWS__*``); only that section is used, so
``DDB_CDC_AWS__*`` variables alone are enough. ``--changes 0`` (or no ``--changes``) writes until
SIGTERM or SIGINT, at ``--rate`` (default 10 changes/s in that mode; unthrottled with
``--changes N`` unless ``--rate`` is given). A stop signal ends the run after the change in
flight; exit 0. The number of changes written is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from pipeline.errors import ConfigError
from pipeline.errors import WorkloadError  # noqa: F401 (defined in the one error tree)

EXIT_OK = 0
UNBOUNDED_DEFAULT_RATE = 10.0
PROGRESS_EVERY_S = 10.0



class _Stop(Exception):
    """Raised from the per-change callback once a stop signal arrived."""


def _aws_settings(config: str | None) -> Any:
    """The ``aws`` settings from the file and environment. Source and sinks are irrelevant here;
    placeholders let a call without a configuration file (``DDB_CDC_AWS__*`` only) load."""
    from pipeline.config import load_settings

    overrides: dict[str, Any] = {}
    if not config:
        overrides = {"source": {"table": "unused"}, "sinks": [{"name": "unused", "type": "unused"}]}
    return load_settings(config, overrides=overrides).aws


def _check_table(client: Any, table: str) -> None:
    from connectors.embedded.workload import TABLE_ATTRIBUTES, TABLE_KEY_SCHEMA

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        described = client.describe_table(TableName=table)["Table"]
    except client.exceptions.ResourceNotFoundException:
        raise WorkloadError(f"table {table!r} not found at {client.meta.endpoint_url}: create it "
                            "(pk S hash, sk N range) or check --table and aws.region / aws.endpoint_url") from None
    except (BotoCoreError, ClientError) as exc:
        raise WorkloadError(f"cannot describe table {table!r} at {client.meta.endpoint_url}: {exc}; "
                            "check aws.endpoint_url / aws.region and the credentials") from None
    types = {a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])}
    want = {a["AttributeName"]: a["AttributeType"] for a in TABLE_ATTRIBUTES}
    keys = [(k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]]
    if keys != [(k["AttributeName"], k["KeyType"]) for k in TABLE_KEY_SCHEMA] or any(types.get(n) != t for n, t in want.items()):
        have = ", ".join(f"{n} {types.get(n, '?')} {kt}" for n, kt in keys)
        raise WorkloadError(f"table {table!r} has key schema ({have}); the workload needs pk S HASH, sk N RANGE")


def cmd_workload(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    if args.changes < 0:
        raise ConfigError([f"--changes must be 0 (until stopped) or more, got {args.changes}"])
    if args.rate is not None and args.rate <= 0:
        raise ConfigError([f"--rate must be above 0 changes/s, got {args.rate}"])
    if args.items < 1:
        raise ConfigError([f"--items must be 1 or more, got {args.items}"])
    from pipeline.logs import configure_logging, get_logger

    aws = _aws_settings(args.config)
    configure_logging("INFO", "auto")
    log = get_logger(command="workload", table=args.table)

    from connectors.aws import make_client
    from connectors.embedded.workload import Workload, write_changes

    client = make_client("dynamodb", aws)
    _check_table(client, args.table)
    unbounded = args.changes == 0
    rate = args.rate if args.rate is not None else (UNBOUNDED_DEFAULT_RATE if unbounded else None)
    count = sys.maxsize if unbounded else args.changes

    stop: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)  # checked after each change

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    written = 0
    last_report = time.monotonic()

    def on_change(n: int) -> None:
        nonlocal written, last_report
        written = n
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            log.info("workload_progress", changes=n)
        if stop:
            raise _Stop

    log.info("workload_start", changes=args.changes or "until stopped", rate_per_s=rate, seed=args.seed)
    try:
        write_changes(client, args.table, Workload(seed=args.seed, items=args.items), count,
                      on_change=on_change, rate_per_s=rate)
    except _Stop:
        log.info("workload_stopped", signal=signal.Signals(stop[0]).name, changes=written)
    except (BotoCoreError, ClientError) as exc:
        raise WorkloadError(f"writing to table {args.table!r} failed after {written} changes: {exc}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"wrote {written} changes to {args.table}", flush=True)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register ``workload`` on the main parser's sub-parsers."""
    p = sub.add_parser("workload", help="write a seeded mixed workload of changes into a table (demo writer)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                   help="YAML configuration file for the aws settings (default: $DDB_CDC_CONFIG; optional)")
    p.add_argument("--table", required=True, help="table to write to (key schema pk S hash, sk N range)")
    p.add_argument("--changes", type=int, default=0, metavar="N",
                   help="number of changes; 0 (default) = until SIGTERM/SIGINT")
    p.add_argument("--rate", type=float, default=None, metavar="PER_S",
                   help=f"changes per second (default {UNBOUNDED_DEFAULT_RATE:g} when unbounded, else unthrottled)")
    p.add_argument("--seed", type=int, default=7, help="random seed: the same seed gives the same changes")
    p.add_argument("--items", type=int, default=200, help="number of distinct items the changes touch (default 200)")
    p.set_defaults(func=cmd_workload)
