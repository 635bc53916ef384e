"""The chaos run's broker replay (``tests.chaos.broker``) on a hand-written AOF."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos.broker import replay

SAGA = "chaos-1-00001"


def _resp(*args: str | bytes) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _message(tag: str, saga_id: str = SAGA, attempt: int = 1) -> bytes:
    headers = {"task": "chaos.reserve", "id": f"task-{tag}",
               "kwargsrepr": f"{{'saga_id': {saga_id!r}, 'step': 'chaos.reserve', 'count': 1, "
                             f"'attempt': {attempt}, 'kind': 'step'}}"}
    return json.dumps({"body": "e30=", "headers": headers,
                       "properties": {"delivery_tag": tag}}).encode()


def _aof(tmp_path: Path, *commands: bytes) -> Path:
    folder = tmp_path / "appendonlydir"
    folder.mkdir()
    (folder / "appendonly.aof.manifest").write_text(
        "file appendonly.aof.1.base.rdb seq 1 type b\n"
        "file appendonly.aof.1.incr.aof seq 1 type i\n")
    (folder / "appendonly.aof.1.incr.aof").write_bytes(b"".join(commands))
    return tmp_path


def _delivered(tag: str, raw: bytes) -> list[bytes]:
    return [_resp("RPOP", "saga.steps"), _resp("MULTI"),
            _resp("ZADD", "unacked_index", "1.0", tag), _resp("HSET", "unacked", tag, raw),
            _resp("EXEC")]


def test_an_acked_message_shows_sent_taken_delivered_acked(tmp_path: Path) -> None:
    """A message delivered and acknowledged (an ack outside MULTI, as a task's own) is acked."""
    raw = _message("t1")
    directory = _aof(tmp_path, b"#TS:1700000000\r\n", _resp("LPUSH", "saga.steps", raw),
                     *_delivered("t1", raw), _resp("ZREM", "unacked_index", "t1"),
                     _resp("HDEL", "unacked", "t1"))
    [line] = replay(directory).history(SAGA)
    assert "sent to saga.steps" in line
    assert line.index("taken") < line.index("delivered") < line.index("acked")
    assert "LOST" not in line


def test_a_restored_message_taken_and_never_delivered_is_lost(tmp_path: Path) -> None:
    """Restored from unacked in one transaction, then popped by a consumer that never
    recorded it: the history says it was lost there."""
    raw = _message("t2")
    directory = _aof(tmp_path, _resp("LPUSH", "saga.steps", raw), *_delivered("t2", raw),
                     _resp("MULTI"), _resp("ZREM", "unacked_index", "t2"),
                     _resp("HDEL", "unacked", "t2"), _resp("RPUSH", "saga.steps", raw),
                     _resp("EXEC"), _resp("RPOP", "saga.steps"))
    [line] = replay(directory).history(SAGA)
    assert "restored" in line and "acked" not in line
    assert line.endswith("LOST: taken by a consumer that never recorded it")


def test_a_message_never_taken_is_still_queued_and_other_sagas_are_left_out(
        tmp_path: Path) -> None:
    """A message still in its queue says so; another saga's messages are not listed."""
    directory = _aof(tmp_path, _resp("LPUSH", "saga.steps", _message("t3", "chaos-1-00002")),
                     _resp("LPUSH", "saga.steps", _message("t4", attempt=2)))
    [line] = replay(directory).history(SAGA)
    assert "step:chaos.reserve#1:2" in line
    assert line.endswith("still queued")


def test_a_saga_whose_messages_never_reached_a_queue_says_so(tmp_path: Path) -> None:
    """A saga with no message in the AOF (its first send failed) gets one line saying so."""
    directory = _aof(tmp_path, _resp("LPUSH", "saga.steps", _message("t5", "chaos-1-00002")))
    assert replay(directory).history(SAGA) == [
        "no message of this saga ever reached a queue"]
