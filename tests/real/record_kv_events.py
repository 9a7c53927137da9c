"""Record a real vLLM's KV-cache events into tests/fixtures/vllm/kv_events/.

    .venv/bin/python -m tests.real.record_kv_events [OUT_DIR]

Starts one vLLM CPU server (tests/real/engines.py) with ``--kv-events-config``,
subscribes before it is up, sends the chat requests of ``REQUESTS`` one at a
time, then asks the replay socket for batches from seq 0 and from seq 2, then
restarts vLLM on the same ports and sends one more request. Every multipart
message is kept exactly as received (hex of each frame), with what each
request's answer said of its cached tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import zmq

from tests.real.engines import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    _free_port,
    _start_vllm,
    ensure_tiny_model,
    ensure_vllm,
    kv_events_config,
    stop_vllm,
    wait_ready,
)

SYSTEM = " ".join(f"Policy clause {i}: be accurate, cite sources, stay polite." for i in range(20))
LONG = [
    " ".join(f"Chapter {c} line {i}: the quick brown fox jumps." for i in range(60)) for c in "AB"
]
QUESTION = " ".join(f"Also consider point {i} and explain it briefly." for i in range(12))


def _system(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


#: (name, messages, max_tokens)
REQUESTS: list[tuple[str, list[dict[str, str]], int]] = [
    ("system+q1", _system("Hi?"), 4),
    ("repeat", _system("Hi?"), 4),
    ("system+q2", _system("Why?"), 4),
    ("system+long question (extends the cached prefix)", _system(QUESTION), 4),
    ("system+q3, 48 tokens out (decode fills blocks)", _system("How?"), 48),
    ("long A", [{"role": "user", "content": LONG[0]}], 4),
    ("long B (evicts)", [{"role": "user", "content": LONG[1]}], 4),
    ("system+q1 after", _system("Hi?"), 4),
]
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def drain(sub: zmq.Socket[bytes], out: list[list[str]], quiet: float = 1.0) -> None:
    """Receive until nothing came for ``quiet`` seconds."""
    while sub.poll(int(quiet * 1000)):
        out.append([f.hex() for f in sub.recv_multipart()])


def replay(ctx: zmq.Context[zmq.Socket[bytes]], url: str, start: int) -> list[list[str]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(url)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    got: list[list[str]] = []
    try:
        while True:
            if not dealer.poll(10_000):
                raise TimeoutError("no replay answer in 10 s")
            frames = dealer.recv_multipart()
            got.append([f.hex() for f in frames])
            if len(frames) >= 3 and frames[2] == END_SEQ:
                return got
    finally:
        dealer.close(linger=0)


def chat(url: str, messages: list[dict[str, str]], max_tokens: int = 4) -> dict[str, Any]:
    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "messages": messages}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"vLLM answered {r.status_code}: {r.text}")
    answer = r.json()
    return {"request": body, "usage": answer["usage"], "text": answer["choices"][0]["message"]}


def main(out_dir: Path) -> None:
    python, model = ensure_vllm(), ensure_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="kv-events-"))
    pub_port, replay_port, http_port = _free_port(), _free_port(), _free_port()
    config = kv_events_config(f"tcp://*:{pub_port}", f"tcp://*:{replay_port}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    live: list[list[str]] = []
    exchanges: list[dict[str, Any]] = []
    server = _start_vllm(python, model, 0, work, port=http_port, kv_events=config)
    try:
        wait_ready(server, time.monotonic() + 300)
        time.sleep(1.0)  # the subscription reaches the publisher
        for name, messages, max_tokens in REQUESTS:
            exchange = chat(server.url, messages, max_tokens)
            drain(sub, live)
            exchanges.append({"name": name, **exchange, "live_messages_so_far": len(live)})
        replays = {
            "replay_from_0": replay(ctx, f"tcp://127.0.0.1:{replay_port}", 0),
            "replay_from_2": replay(ctx, f"tcp://127.0.0.1:{replay_port}", 2),
        }
        stop_vllm(server)
        restarted: list[list[str]] = []
        server = _start_vllm(python, model, 0, work, port=http_port, kv_events=config)
        wait_ready(server, time.monotonic() + 300)
        time.sleep(1.0)
        drain(sub, restarted)
        after = chat(server.url, REQUESTS[0][1])
        drain(sub, restarted)
    finally:
        stop_vllm(server)
        sub.close(linger=0)
        ctx.term()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "live.json").write_text(json.dumps(live, indent=0) + "\n")
    for name, frames in replays.items():
        (out_dir / f"{name}.json").write_text(json.dumps(frames, indent=0) + "\n")
    (out_dir / "restarted_live.json").write_text(json.dumps(restarted, indent=0) + "\n")
    meta = {
        "block_size": BLOCK_SIZE,
        "num_gpu_blocks_override": NUM_BLOCKS,
        "kv_events_config": json.loads(config),
        "exchanges": exchanges,
        "after_restart": after,
    }
    (out_dir / "requests.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"recorded {len(live)} live messages, {len(restarted)} after restart into {out_dir}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "fixtures" / "vllm" / "kv_events"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
