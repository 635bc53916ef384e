"""A finished saga's history in one compact value: its progress, plan and events, compressed.

When a saga of format 4 or later ends, the process that ended it replaces its state hash's
progress, plan and journal and its event stream with one field, ``c``: this module's
``encode_history`` of all three (zlib over one JSON document, with a preset dictionary of
the words every saga's JSON repeats).  ``decode_history`` gives back exactly what was
stored: the run ``load`` returned before, and every event with its stream id, so
``status()``, ``events()`` and a late or duplicate message see what they saw before.

With an archive, the saga's history goes to PostgreSQL instead and Redis keeps a tombstone
(``a``, ``s``: archived, and the status) until its retention runs out (README, "History:
compaction, archive, retention").
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from saga_celery._core.model import Plan, SagaProgress, SagaRun
from saga_celery._store.encoding import encode_progress, with_plan

HISTORY_VERSION = 1
"""The layout of the compacted value (``"h"`` in its JSON)."""

COMPACTED_FORMAT = 4
"""The first saga format that is compacted when it ends (``SagaProgress.format``).  Sagas
of formats 1 to 3 keep their full records, as 0.1.0 and 0.2.0 processes read them (and
the 0.3 processes that write format 3 only while 0.2.0 ones still run)."""

MARKER = b'{"format":4,"compacted":true}'
"""What a compacted or tombstoned record holds in ``d``, where older releases look for the
progress: a 0.2.0 process that reads it refuses it as a newer format (SagaFormatError) and
leaves it untouched, instead of calling it corrupt."""

_ZDICT = (
    b'"attempt_started""attempt_completed""attempt_errored""step_started""step_completed"'
    b'"rollback_step_started""rollback_step_completed""rollback_attempt_started"'
    b'"rollback_attempt_completed""saga_started""saga_completed""saga_errored"'
    b'"saga_terminated""saga_queued""rollback_started""rollback_completed"'
    b'{"type":"saga_id":"timestamp":"step":"count":"attempt":"name":"error":'
    b'"message":"output":"params":"status":"complete","started_at":"ended_at":'
    b'"success":true,"created_at":"steps":"key":"stage":"start_seq":"attempts":'
    b'"next_seq":"format":"stages":"index":"task":"args":[],"kwargs":{},"policy":'
    b'{"limit":0,"delay_ms":"backoff":"constant","max_delay_ms":null,"jitter":false,'
    b'"timeout_ms":"rollback_task":"rollback_policy":"in_group":false,"immutable":false,'
    b'"rollback":{"status":"pending"}"errored""running"+00:00"'
)
"""Words every saga's JSON repeats: a preset dictionary makes a small value compress well."""


class History(NamedTuple):
    """A finished saga as compacted: the run, its stored version, its events with ids."""

    run: SagaRun
    version: int
    events: list[tuple[str, dict[str, Any]]]


def encode_history(run: SagaRun, version: int,
                   events: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    """The compacted value of a finished saga: progress, plan and events, compressed."""
    doc = {
        "h": HISTORY_VERSION,
        "v": version,
        "d": json.loads(encode_progress(run)),
        "p": run.plan.model_dump(mode="json"),
        "e": [[stream_id, event] for stream_id, event in events],
    }
    return _compress(json.dumps(doc, separators=(",", ":")).encode())


class Stored(NamedTuple):
    """A finished saga's compacted value, made from its stored JSON as it is."""

    version: int
    value: bytes


def encode_stored_history(version: int, progress: bytes, plan: bytes,
                          events: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``encode_history`` of a saga's records as stored (progress and plan JSON, and each
    event's JSON with its stream id), spliced into the same document without parsing and
    encoding them again: what the finisher does for every ended saga without a journal.
    ``decode_history`` reads it as it reads the other."""
    doc = [b'{"h":%d,"v":%d,"d":' % (HISTORY_VERSION, version), progress, b',"p":', plan,
           b',"e":[', b",".join(b'["%b",%b]' % entry for entry in events), b"]}"]
    return _compress(b"".join(doc))


def _compress(raw: bytes) -> bytes:
    # Level 1: a third of level 9's time for a value about a fifth larger (about 970 B
    # against 805 B for the bench's five-step saga), well under the 2 KB a saga may keep.
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, _ZDICT)
    return packer.compress(raw) + packer.flush()


def decode_history(blob: bytes) -> History:
    """The run, version and events of a compacted value; ``ValueError`` if it is not one."""
    try:
        unpacker = zlib.decompressobj(15, _ZDICT)
        doc = json.loads(unpacker.decompress(blob) + unpacker.flush())
    except (zlib.error, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a compacted saga history ({exc})") from exc
    return history_of(doc)


def history_of(doc: Any) -> History:
    """A history document (the JSON ``encode_history`` compresses) validated."""
    if not isinstance(doc, dict) or doc.get("h") != HISTORY_VERSION:
        raise ValueError("not a compacted saga history of a layout this release reads")
    progress = SagaProgress.model_validate(doc["d"])
    run = with_plan(progress, Plan.model_validate(doc["p"]))
    events = [(str(stream_id), dict(event)) for stream_id, event in doc["e"]]
    return History(run=run, version=int(doc["v"]), events=events)


def compacts(run: SagaRun) -> bool:
    """Whether the store compacts this saga when it ends (format 4 or later)."""
    return run.format >= COMPACTED_FORMAT


def events_after(events: Sequence[tuple[str, dict[str, Any]]], after: str,
                 count: int | None) -> list[tuple[str, dict[str, Any]]]:
    """The events with a stream id after ``after`` (``"0"``: all), at most ``count``."""
    start = _stream_key(after)
    found = [(i, e) for i, e in events if _stream_key(i) > start]
    return found if count is None else found[:count]


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0
