"""The JSON log handler: whole lines, batched per turn of the event loop."""

from __future__ import annotations

import asyncio
import io
import logging

import orjson

from router.logs import BatchingHandler, JSONFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def logger_with(stream: CountingStream) -> logging.Logger:
    handler = BatchingHandler(stream)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger(f"kvroute.test.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel("INFO")
    return log


async def test_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    stream = CountingStream()
    log = logger_with(stream)
    for i in range(5):
        log.info({"event": "request", "n": i})
    assert stream.getvalue() == ""  # not yet: at the end of this turn
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == [0, 1, 2, 3, 4]
    assert stream.writes == 1
    log.info({"event": "request", "n": 5})
    await asyncio.sleep(0)
    assert stream.writes == 2 and orjson.loads(stream.getvalue().splitlines()[-1])["n"] == 5


def test_outside_a_loop_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    log = logger_with(stream)
    log.warning("plain %s", "text")
    assert orjson.loads(stream.getvalue())["msg"] == "plain text"


async def test_a_line_from_another_thread_is_written_at_once() -> None:
    stream = CountingStream()
    log = logger_with(stream)
    await asyncio.to_thread(log.info, {"event": "from_thread"})
    assert orjson.loads(stream.getvalue())["event"] == "from_thread"
