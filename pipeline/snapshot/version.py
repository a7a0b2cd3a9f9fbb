"""The version of a snapshot event, designed against the stream's (:func:`pipeline.codec.record_version`).

Stream changes get ``version = max(s(ACDT) + 1, floor) << 32 | counter mod 2**32`` where
``s(t)`` is whole seconds since 2012-01-01 (ApproximateCreationDateTime is rounded *down*; to the
second by DynamoDB, to the minute by DynamoDB Local). Every item a snapshot reads gets::

    snapshot_version(T0, margin) = s(T0 - margin) << 32          (low part 0)

``T0`` is the snapshot's start (the wall-clock time of its first Scan, stored with the snapshot so
a resumed snapshot keeps it; for an export, the manifest's ``exportTime``) and ``margin``
(:data:`DEFAULT_MARGIN_S`, 60 s) bounds three things at once: the rounding of ApproximateCreationDateTime
(≤ 1 s on DynamoDB, < 60 s on DynamoDB Local), the clock difference between this host and
DynamoDB, and how long an eventually consistent Scan may miss a write ("usually within a second"
— DynamoDB developer guide, "Read consistency"; 0 with ``--consistent-read`` or an export).

Why every change made after the scan started wins. A change made at true time ``t >= T0`` has
``ACDT >= t - rounding - skew >= T0 - margin``, so its high part is at least
``s(T0 - margin) + 1`` — greater than the snapshot's high part whatever the low parts are (a
lineage floor only raises it). OpenSearch's external versioning keeps the higher version, so
the snapshot never overwrites it, in whichever order the two arrive.

Why a change made before that loses only to the item state the scan itself saw. A change whose
version is not above the snapshot's has ``s(ACDT) + 1 <= s(T0 - margin)``, i.e. it was made
more than ``margin`` before ``T0`` (minus rounding and skew), and every Scan page is read at
``T >= T0``: the page reflects it (the eventual-consistency window is inside the margin). So the
snapshot event that beats it carries that change or a later state of the item. A page read at
``T`` can still be *older* than a stream change with a time just below ``T`` (an eventually
consistent read that missed it): such a change was made after ``T0 - margin`` and wins.
Changes made in ``[T0 - margin, T0)`` also win; that is safe because the stream consumer's
position was taken before ``T0`` (``source.initial_snapshot`` takes it first), so each such
change is either delivered by the stream — the item's last delivered change is its current
state — or lies before the position, where the scan, reading after it, saw it.

Per item the end state is therefore the last stream change when the stream delivered one made
after ``T0 - margin``, else the snapshot's image — the item as it is now — provided the stream
is consumed from a position taken before ``T0``. Deletes: a REMOVE made after ``T0 - margin``
wins over the snapshot image only while OpenSearch remembers its tombstone (``index.gc_deletes``),
so the snapshot raises ``gc_deletes`` on the indices it writes, as a replay does.

Two snapshots of one table: the later one has the larger ``T0`` and so the larger version.
Re-delivering (a resumed snapshot) gives the same version, a 409 no-op in OpenSearch.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pipeline.codec import VERSION_EPOCH_S

#: Default safety margin in seconds (see the module doc); DynamoDB Local's minute rounding needs
#: at least 60.
DEFAULT_MARGIN_S = 60.0

_TIME_MASK = (1 << 31) - 1


def snapshot_version(started_at: datetime, margin_s: float = DEFAULT_MARGIN_S) -> int:
    """The version of every event of a snapshot started at ``started_at`` (timezone-aware; naive
    = UTC): ``s(started_at - margin_s) << 32``, ``s`` = whole seconds since 2012-01-01.
    See the module doc for why stream changes made after the start win over it.
    Raises ValueError for a negative margin."""
    if margin_s < 0:
        raise ValueError("the snapshot version margin must be >= 0 seconds")
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=timezone.utc)
    seconds = int((started_at - timedelta(seconds=margin_s)).timestamp()) - VERSION_EPOCH_S
    return min(max(0, seconds), _TIME_MASK) << 32
