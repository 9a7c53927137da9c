"""Client limits over real loopback sockets: misbehaving clients are raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from backends.sim.common import Faults
from router.app import build_app
from router.config import ClientLimits, ServerConfig, parse_config
from router.limits import RequestTimeout, ServerBusy, raw_response
from router.serve import Server, uvicorn_config
from tests.helpers import (
    backend,
    eventually,
    free_socket,
    serve_app,
    set_faults,
    sim_stats,
    simulator,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
BODY = orjson.dumps(
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
)
#: A generous bound on anything that should happen "promptly".
WITHIN = 10.0


@pytest.fixture(params=["in-process", "kvroute-serve"])
def mode(request: pytest.FixtureRequest) -> str:
    """In this test's loop (asyncio), or as ``kvroute serve`` runs (its own process, uvloop)."""
    return str(request.param)


def raw_config(
    sim_url: str, port: int, limits: dict[str, Any], server: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "server": {
            "port": port,
            "access_log": False,
            "watch_config": False,
            "limits": limits,
            **(server or {}),
        },
        "endpoints": [{"id": "sim", "url": sim_url, "kind": "vllm", "models": ["tiny"]}],
        "health": {"enabled": False},
        "scrape": {"enabled": False},
    }


@contextlib.asynccontextmanager
async def in_process(raw: dict[str, Any], sock: socket.socket) -> AsyncIterator[None]:
    cfg = parse_config(yaml.safe_dump(raw))
    port = sock.getsockname()[1]
    uv = uvicorn_config(build_app(cfg), "127.0.0.1", port, quiet=True, server=cfg.server)
    server = Server(uv, owns_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@contextlib.asynccontextmanager
async def kvroute_serve(raw: dict[str, Any], port: int, tmp: Path) -> AsyncIterator[None]:
    path = tmp / "kvroute.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                assert proc.poll() is None, "kvroute exited"
                try:
                    return (await client.get(f"http://127.0.0.1:{port}/health")).is_success
                except httpx.TransportError:
                    return False

            # A new process imports kvroute first: on a loaded machine, seconds.
            await eventually(up, within=60.0)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.asynccontextmanager
async def fleet(
    mode: str,
    tmp: Path,
    faults: Faults | None = None,
    server: dict[str, Any] | None = None,
    **limits: Any,
) -> AsyncIterator[tuple[str, int, str]]:
    """A simulator and the router in front of it, with ``limits``: (url, port, sim url)."""
    async with simulator(faults=faults) as (sim_url, _):
        sock = free_socket()
        port = sock.getsockname()[1]
        raw = raw_config(sim_url, port, limits, server)
        if mode == "in-process":
            router = in_process(raw, sock)
        else:
            sock.close()
            router = kvroute_serve(raw, port, tmp)
        async with router:
            yield f"http://127.0.0.1:{port}", port, sim_url


def request_bytes(path: str = CHAT, body: bytes = BODY, extra: bytes = b"") -> bytes:
    head = (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)
    )
    return head + body


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }

    def error(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)
        assert set(data["error"]) == {"message", "type", "param", "code"}
        return data["error"]  # type: ignore[no-any-return]


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded wait)."""
    chunks = []
    async with asyncio.timeout(WITHIN):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def read_one(reader: asyncio.StreamReader) -> Answer:
    """One response with a content-length, from a connection that stays open."""
    async with asyncio.timeout(WITHIN):
        head = await reader.readuntil(b"\r\n\r\n")
        answer = Answer(head)
        answer.body = await reader.readexactly(int(answer.headers["content-length"]))
    return answer


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


# -- header size -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        b"x-big: " + b"a" * 65536 + b"\r\n",  # one huge header
        b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(64)),  # many headers
    ],
    ids=["one-header", "many-headers"],
)
async def test_a_64_kib_header_gets_431_and_reaches_no_backend(
    extra: bytes, mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path) as (url, port, sim_url):
        reader, writer = await connect(port)
        writer.write(request_bytes(extra=extra))
        answer = Answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 431
        assert answer.headers["connection"] == "close"
        assert answer.headers["content-type"] == "application/json"
        error = answer.error()
        assert error["code"] == "request_header_too_large"
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None
        assert (await sim_stats(sim_url))["requests"] == 0
        # The process serves on.
        async with httpx.AsyncClient() as client:
            assert (await client.post(url + CHAT, content=BODY)).status_code == 200


async def test_a_huge_header_sent_in_pieces_is_cut_off_early(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path) as (_, port, sim_url):
        reader, writer = await connect(port)
        reading = asyncio.create_task(read_until_closed(reader))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nx-big: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < 16 * 1024 * 1024 and not reading.done():
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
                await asyncio.sleep(0)
        answer = Answer(await reading)
        writer.close()
        assert answer.status == 431
        assert sent < 8 * 1024 * 1024  # answered long before 16 MiB were sent
        assert (await sim_stats(sim_url))["requests"] == 0


async def test_headers_within_the_limit_and_split_across_reads_are_served(
    mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path, max_header_bytes=32768, header_timeout=5) as (_, port, _):
        reader, writer = await connect(port)
        raw = request_bytes(extra=b"x-big: " + b"c" * 16000 + b"\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        for i in range(0, len(head), 4000):  # headers in pieces, then the body later
            writer.write(head[i : i + 4000])
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"\r\n\r\n")
        await asyncio.sleep(0.1)
        writer.write(body)
        answer = await read_one(reader)
        assert answer.status == 200, answer.body
        # And the connection stays usable.
        writer.write(request_bytes())
        assert (await read_one(reader)).status == 200
        writer.close()


# -- header and body timeouts ------------------------------------------------------


async def test_headers_sent_a_byte_at_a_time_are_cut_off(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path, header_timeout=0.5) as (_, port, sim_url):
        reader, writer = await connect(port)
        start = asyncio.get_running_loop().time()
        reading = asyncio.create_task(read_until_closed(reader))
        with contextlib.suppress(ConnectionError):
            for byte in request_bytes():  # the headers would take 5 s at this pace
                if reading.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        answer = Answer(await reading)
        elapsed = asyncio.get_running_loop().time() - start
        writer.close()
        assert answer.status == 408
        assert answer.error()["code"] == "request_timeout"
        assert elapsed < WITHIN
        assert (await sim_stats(sim_url))["requests"] == 0


async def test_a_connection_that_sends_nothing_is_closed(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path, header_timeout=0.5) as (_, port, _):
        reader, writer = await connect(port)
        assert await read_until_closed(reader) == b""  # closed, nothing said
        writer.close()


async def test_the_next_request_on_a_keep_alive_connection_has_its_header_deadline(
    mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path, header_timeout=0.5) as (_, port, _):
        reader, writer = await connect(port)
        writer.write(request_bytes())
        assert (await read_one(reader)).status == 200
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and no more
        answer = Answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 408


async def test_a_body_that_stops_arriving_gets_408(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path, body_timeout=0.5) as (_, port, sim_url):
        reader, writer = await connect(port)
        raw = request_bytes()
        writer.write(raw[: raw.index(b"\r\n\r\n") + 4 + 10])  # headers and 10 bytes of body
        answer = Answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 408
        assert answer.headers["connection"] == "close"
        assert "x-request-id" in answer.headers  # answered by the app: logged like any error
        error = answer.error()
        assert error["code"] == "request_timeout"
        assert error["type"] == "invalid_request_error"
        assert (await sim_stats(sim_url))["requests"] == 0


async def test_a_body_that_keeps_arriving_slowly_is_served(mode: str, tmp_path: Path) -> None:
    # 40 bytes/s: past body_total_timeout, but each 8 bytes earn it a second more.
    slow = {"body_timeout": 1.0, "body_total_timeout": 1.0, "body_min_rate": 8}
    async with fleet(mode, tmp_path, **slow) as (_, port, _):
        reader, writer = await connect(port)
        raw = request_bytes()
        cut = raw.index(b"\r\n\r\n") + 4
        writer.write(raw[:cut])
        for i in range(cut, len(raw), 8):  # about twice the body timeout in all
            writer.write(raw[i : i + 8])
            await writer.drain()
            await asyncio.sleep(0.2)
        answer = await read_one(reader)
        writer.close()
        assert answer.status == 200


async def test_a_body_that_keeps_arriving_past_its_whole_time_gets_408(
    mode: str, tmp_path: Path
) -> None:
    # Each piece well within body_timeout; the whole body never within
    # body_total_timeout. The other bounds are long, so that the 408 comes from
    # the whole body's time, when it passes (not at the next timer of 30 s).
    bounds = {"header_timeout": 30.0, "body_timeout": 30.0, "body_total_timeout": 1.0}
    async with fleet(mode, tmp_path, **bounds) as (_, port, sim):
        reader, writer = await connect(port)
        raw = request_bytes()
        cut = raw.index(b"\r\n\r\n") + 4
        writer.write(raw[:cut])

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(cut, len(raw) - 1):
                    writer.write(raw[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.2)

        sending = asyncio.create_task(dribble())
        answer = Answer(await read_until_closed(reader))
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
        assert answer.status == 408
        assert answer.headers["connection"] == "close"
        error = answer.error()
        assert error["code"] == "request_timeout"
        assert "took over 1 s" in error["message"]
        assert (await sim_stats(sim))["requests"] == 0


async def test_uploads_in_progress_do_not_take_the_in_flight_slots(
    mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path, max_in_flight=1, body_timeout=20.0) as (url, port, _):
        raw = request_bytes()
        cut = raw.index(b"\r\n\r\n") + 4
        uploading = [await connect(port) for _ in range(3)]
        for _, writer in uploading:
            writer.write(raw[: cut + 5])  # headers and part of the body, the rest to come
            await writer.drain()
        async with httpx.AsyncClient(timeout=WITHIN) as client:
            for _ in range(2):  # the one slot, taken and given back
                assert (await client.post(url + CHAT, content=BODY)).status_code == 200
        for reader, writer in uploading:  # the uploads end, each in its turn
            writer.write(raw[cut + 5 :])
            await writer.drain()
            assert (await read_one(reader)).status == 200
            writer.close()


def flood_backend(events: int = 2_000, size: int = 10_000) -> Any:
    """An OpenAI backend that streams ``events`` chunks of ``size`` bytes at once."""
    chunk = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": "x" * size}, "finish_reason": None}],
        }
    )
    parts = [b"data: " + chunk + b"\n\n"] * events + [b"data: [DONE]\n\n"]
    return backend(200, [(b"content-type", b"text/event-stream")], parts)


@pytest.mark.parametrize(
    ("limits", "timeouts"),
    [
        ({"send_timeout": 0.5}, {}),  # the connection is dropped
        ({"send_timeout": 30}, {"idle": 0.3}),  # the stream's idle bound passes first
    ],
    ids=["send_timeout", "idle_first"],
)
async def test_a_client_that_stops_reading_is_dropped_and_the_backend_not_blamed(
    limits: dict[str, Any], timeouts: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_app(flood_backend()) as backend_url:
        sock = free_socket()
        port = sock.getsockname()[1]
        raw = raw_config(backend_url, port, limits)
        raw["endpoints"][0]["kind"] = "openai"
        raw["timeouts"] = timeouts
        raw["admin"] = {"open": True}
        async with in_process(raw, sock):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            stream = orjson.dumps({**orjson.loads(BODY), "stream": True})
            client.sendall(request_bytes(body=stream))
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=WITHIN) as http:

                async def in_flight() -> float:
                    text = (await http.get(url + "/metrics")).text
                    line = next(
                        x for x in text.splitlines() if x.startswith("kvroute_requests_in_flight ")
                    )
                    return float(line.split()[1])

                async def streaming() -> bool:
                    return await in_flight() == 1

                async def ended() -> bool:
                    return await in_flight() == 0

                await eventually(streaming, within=WITHIN)
                await eventually(ended, within=WITHIN)
                text = (await http.get(url + "/metrics")).text
                assert "kvroute_upstream_errors_total{" not in text
                (endpoint,) = (await http.get(url + "/admin/endpoints")).json()["endpoints"]
                assert endpoint["circuit"]["state"] == "closed"
                assert endpoint["circuit"]["failures"] == 0
                # Served again at once.
                again = await http.post(url + CHAT, content=BODY)
                assert again.status_code == 200
            client.close()
    # Dropped as a client that left: not an answer uvicorn finds unfinished (an
    # ERROR line per stalled client) and closes, waiting for it to read.
    assert not [r for r in caplog.records if "without completing" in r.getMessage()]


async def test_the_bytes_of_bodies_held_at_once_are_bounded(mode: str, tmp_path: Path) -> None:
    padded = orjson.dumps({**orjson.loads(BODY), "user": "u" * 700})  # about 800 bytes
    one_body = {"max_body_bytes": 1024}
    async with fleet(mode, tmp_path, server=one_body, max_body_bytes_in_flight=1024) as (
        url,
        port,
        _,
    ):
        raw = request_bytes(body=padded)
        cut = raw.index(b"\r\n\r\n") + 4 + 600
        reader, writer = await connect(port)
        writer.write(raw[:cut])  # 600 bytes of its body held, the rest to come
        await writer.drain()
        async with httpx.AsyncClient(timeout=WITHIN) as client:

            async def refused() -> bool:  # 600 + 800 > 1024: refused before reading
                r = await client.post(url + CHAT, content=padded)
                return r.status_code == 503 and r.json()["error"]["code"] == "server_busy"

            await eventually(refused, within=WITHIN)
            # A body over max_body_bytes is never a 503 to retry: 413 whatever is held.
            too_large = await client.post(url + CHAT, content=padded + b" " * 300)
            assert too_large.status_code == 413
            # Chunked, with no length to go by: refused as its bytes pass the bound.
            chunked = await connect(port)
            chunked[1].write(
                b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                % (CHAT.encode(), len(padded), padded)
            )
            answer = await read_one(chunked[0])
            chunked[1].close()
            assert answer.status == 503 and answer.error()["code"] == "server_busy"
            small = await client.post(url + CHAT, content=BODY)  # 600 + ~90 fits
            assert small.status_code == 200
            writer.write(raw[cut:])
            await writer.drain()
            assert (await read_one(reader)).status == 200
            writer.close()
            # Every byte given back: the large body fits again, one at a time.
            for _ in range(3):
                assert (await client.post(url + CHAT, content=padded)).status_code == 200


async def test_a_client_reading_a_large_answer_slowly_but_steadily_is_served() -> None:
    """send_timeout is between two writes the client takes (nginx's), not for
    the whole answer."""
    answer = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "tiny",
            # Past what the kernel's socket buffers hold (some MB on loopback), so
            # that kvroute's own buffer fills and its writes pause.
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x" * (24 << 20)}}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )

    json_type = [(b"content-type", b"application/json")]
    async with serve_app(backend(200, json_type, [answer])) as backend_url:
        sock = free_socket()
        port = sock.getsockname()[1]
        raw = raw_config(backend_url, port, {"send_timeout": 2.0})
        raw["endpoints"][0]["kind"] = "openai"
        async with in_process(raw, sock):
            reader, writer = await connect(port)
            writer.write(request_bytes())
            chunks: list[bytes] = []
            size = 0
            async with asyncio.timeout(60):
                while size < len(answer):
                    # About 5 MB/s: seconds in all, past send_timeout, with
                    # kvroute's buffer going down at least every second or so.
                    chunk = await reader.read(256 * 1024)
                    assert chunk, "dropped"
                    chunks.append(chunk)
                    size += len(chunk)
                    await asyncio.sleep(0.05)
            writer.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == len(answer)


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path, keep_alive_timeout=1) as (_, port, _):
        reader, writer = await connect(port)
        writer.write(request_bytes())
        assert (await read_one(reader)).status == 200
        assert await read_until_closed(reader) == b""
        writer.close()


async def test_pipelined_requests_are_answered_in_order(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path) as (_, port, _):
        reader, writer = await connect(port)
        writer.write(request_bytes() + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first, second = await read_one(reader), await read_one(reader)
        writer.close()
        assert first.status == 200 and b"chat.completion" in first.body
        assert second.status == 200 and orjson.loads(second.body) == {"status": "ok"}


async def test_an_invalid_request_gets_400_in_openai_shape(mode: str, tmp_path: Path) -> None:
    async with fleet(mode, tmp_path) as (_, port, _):
        reader, writer = await connect(port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = Answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 400
        assert answer.error()["type"] == "invalid_request_error"


# -- connections and requests in flight --------------------------------------------


async def test_beyond_the_connection_limit_503_then_the_process_recovers(
    mode: str, tmp_path: Path
) -> None:
    async with fleet(mode, tmp_path, max_connections=3, retry_after=2) as (url, port, sim_url):
        held = [await connect(port) for _ in range(3)]
        for reader, writer in held:
            writer.write(request_bytes())
            assert (await read_one(reader)).status == 200

        reader, writer = await connect(port)
        writer.write(request_bytes())
        answer = Answer(await read_until_closed(reader))
        writer.close()
        assert answer.status == 503
        assert answer.headers["retry-after"] == "2"
        assert answer.headers["connection"] == "close"
        error = answer.error()
        assert error["code"] == "server_busy"
        assert error["type"] == "service_unavailable"
        requests_before = (await sim_stats(sim_url))["requests"]
        assert requests_before == 3

        # Probes are answered even then (and the connection closes after).
        reader, writer = await connect(port)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        probe = Answer(await read_until_closed(reader))
        writer.close()
        assert probe.status == 200

        for _, w in held:
            w.close()
            await w.wait_closed()

        async def served() -> bool:
            async with httpx.AsyncClient() as client:
                return (await client.post(url + CHAT, content=BODY)).status_code == 200

        await eventually(served, within=WITHIN)


async def test_beyond_the_in_flight_limit_503_then_the_process_recovers(
    mode: str, tmp_path: Path
) -> None:
    stream_body = orjson.dumps({**orjson.loads(BODY), "stream": True})
    async with fleet(mode, tmp_path, faults=Faults(stall=-1), max_in_flight=2) as (
        url,
        port,
        sim_url,
    ):
        # Two streams held by a backend that does not answer.
        held = [await connect(port) for _ in range(2)]
        for _, writer in held:
            writer.write(request_bytes(body=stream_body))
            await writer.drain()

        async with httpx.AsyncClient(timeout=WITHIN) as client:

            async def full() -> bool:
                r = await client.post(url + CHAT, content=stream_body)
                return r.status_code == 503

            await eventually(full, within=WITHIN)
            reader, writer = await connect(port)
            writer.write(request_bytes())
            refused = await read_one(reader)
            assert refused.status == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers.get("connection") != "close"
            error = refused.error()
            assert (error["code"], error["type"]) == ("server_busy", "service_unavailable")
            # Not an inference request: never refused for in-flight requests.
            assert (await client.get(url + "/health")).status_code == 200
            assert (await client.get(url + "/metrics")).status_code == 200

            for _, w in held:
                w.close()
            await set_faults(sim_url, stall=0.0)

            async def served() -> bool:
                return (await client.post(url + CHAT, content=BODY)).status_code == 200

            await eventually(served, within=WITHIN)
        # The refused client's connection was kept for its retry.
        writer.write(request_bytes(body=stream_body))
        async with asyncio.timeout(WITHIN):
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            assert (await reader.readuntil(b"data: [DONE]")).endswith(b"data: [DONE]")
        writer.close()


# -- pieces ------------------------------------------------------------------------


def test_defaults_are_documented_ones() -> None:
    limits = ServerConfig().limits
    assert limits == ClientLimits()
    assert limits.max_header_bytes == 32 * 1024
    assert (limits.header_timeout, limits.body_timeout, limits.keep_alive_timeout) == (10, 30, 75)


def test_raw_response_is_one_closing_http_response() -> None:
    raw = raw_response(ServerBusy("busy", 3), [(b"server", b"kvroute")])
    answer = Answer(raw)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert answer.headers["retry-after"] == "3"
    assert answer.headers["connection"] == "close"
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert answer.error()["code"] == "server_busy"
    closing = raw_response(RequestTimeout("late"), [])
    assert closing.count(b"connection:") == 1


class HeldTransport:
    """What ClientProtocol's timer asks of a transport, with bytes the client
    has not taken (``unsent``)."""

    def __init__(self, unsent: int) -> None:
        self.unsent = unsent
        self.closing = self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = self.closing = True


async def test_a_close_waiting_on_a_client_that_never_reads_is_dropped() -> None:
    """A keep-alive (or linger) close with bytes still in kvroute's buffer, too
    few to have paused writing: the close waits for the client to read them, and
    a client holding a zero window would keep the connection for ever."""
    from uvicorn.config import Config as UvicornConfig
    from uvicorn.server import ServerState

    from router.limits import IDLE, Refusals, client_protocol

    loop = asyncio.get_running_loop()
    cls = client_protocol(ClientLimits(send_timeout=0.2), Refusals())
    config = UvicornConfig(app=lambda *_: None, loop="none", log_config=None)
    config.load()

    def closing(unsent: int) -> tuple[Any, HeldTransport]:
        protocol = cls(config, ServerState(), {}, loop)
        transport = protocol.transport = HeldTransport(unsent)
        protocol._phase = IDLE
        protocol._deadline = loop.time()  # the keep-alive time is up
        protocol._on_timer()
        assert transport.closing and not transport.aborted
        return protocol, transport

    def fire(protocol: Any) -> None:
        """The timer, at its write deadline (driven here, not waited for)."""
        protocol._timer.cancel()
        protocol._timer = None
        protocol._write_deadline = loop.time()
        protocol._on_timer()

    stuck_protocol, stuck = closing(1000)
    assert stuck_protocol._timer is not None  # a deadline for the close
    fire(stuck_protocol)
    assert stuck.aborted
    # Taking some of it earns another period; nothing more, the drop.
    reading_protocol, reading = closing(1000)
    reading.unsent = 500
    fire(reading_protocol)
    assert not reading.aborted and reading_protocol._timer is not None
    fire(reading_protocol)
    assert reading.aborted
    # A clean close arms nothing.
    clean_protocol, clean = closing(0)
    assert not clean.aborted and clean_protocol._timer is None
