"""Planning a snapshot: how many segments, and the snapshot's id."""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone

#: One default segment per this many bytes of TableSizeBytes ...
BYTES_PER_SEGMENT = 1 << 30
#: ... and at least MIN / at most MAX default segments.
MIN_DEFAULT_SEGMENTS = 4
MAX_DEFAULT_SEGMENTS = 16


def default_segments(table_size_bytes: int | None, item_count: int | None = None) -> int:
    """``--segments`` when not given: ``ceil(TableSizeBytes / 1 GiB)`` clamped to [4, 16]; 1 for
    a table under 1,000 items (one page or a few: parallel segments would only add calls).

    TableSizeBytes and ItemCount come from DescribeTable, which DynamoDB updates about every six
    hours (DynamoDB API reference, TableDescription). More segments than cores still help: a
    segment spends most of its time waiting for its Scan call."""
    if item_count is not None and item_count < 1000:
        return 1
    wanted = math.ceil((table_size_bytes or 0) / BYTES_PER_SEGMENT)
    return max(MIN_DEFAULT_SEGMENTS, min(MAX_DEFAULT_SEGMENTS, wanted))


def new_snapshot_id(now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ-xxxxxx`` (UTC start time and 6 random hex digits)."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"
