"""Initial snapshot and backfill (issue 17): a parallel Scan or a table export delivered into the
sinks as SNAPSHOT events whose version loses to every later stream change.

``version`` (the formula and its proof), ``items`` (events, positions), ``plan`` (segments, ids),
``ratelimit`` (consumed-RCU budget), ``progress`` (resumable checkpoints in the lease store),
``runner`` (readers + delivery loop), ``report``. No service SDK here: the Scan and export
readers are in :mod:`connectors.snapshot`.
"""
