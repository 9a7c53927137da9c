"""The console script as users run it: real processes, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.helpers import free_socket

KVROUTE = Path(sys.executable).with_name("kvroute")


def free_port() -> int:
    sock = free_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free right now."""
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_ready(url: str, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("router did not become ready")


def test_demo_serves_the_openai_sdk_and_stops_cleanly_on_ctrl_c() -> None:
    port = free_port_run(7)
    sim_base = port + 1
    proc = subprocess.Popen(
        [str(KVROUTE), "demo", "--port", str(port), "--sim-base-port", str(sim_base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert {m.id for m in client.models.list()} >= {"demo-chat", "demo-mini"}
        reply = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        stream = client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=3,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {policy: nope}}\n")
    run = subprocess.run(
        [str(KVROUTE), "serve", "--config", str(bad)], capture_output=True, timeout=60
    )
    assert run.returncode == 1
    assert b"models.m.policy: unknown policy 'nope'" in run.stderr


def test_simulate_refuses_a_negative_latency_with_a_usage_error() -> None:
    from router.cli import main

    for flag in ("--step-jitter", "--step-base", "--request-overhead"):
        try:
            main(["simulate", "--port", "0", "--model", "m", flag, "-1"])
        except SystemExit as exc:
            assert exc.code == 2, flag  # argparse's usage error, not a traceback
        else:
            raise AssertionError(f"{flag} -1 was accepted")


def test_simulate_refuses_a_stall_chance_outside_0_to_1_with_a_usage_error() -> None:
    from router.cli import main

    for value in ("-0.1", "1", "2", "nan", "x"):
        try:
            main(["simulate", "--port", "0", "--model", "m", "--step-stall", value])
        except SystemExit as exc:
            assert exc.code == 2, value  # argparse's usage error, not a traceback
        else:
            raise AssertionError(f"--step-stall {value} was accepted")


def test_serve_and_simulate_commands(tmp_path: Path) -> None:
    sim_port, port = free_port(), free_port()
    sim = subprocess.Popen(
        [
            str(KVROUTE),
            "simulate",
            "--kind",
            "vllm",
            "--port",
            str(sim_port),
            "--model",
            "tiny",
            "--zero-latency",
        ],
        stderr=subprocess.PIPE,
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"endpoints: [{{id: s, url: 'http://127.0.0.1:{sim_port}', kind: vllm, models: [tiny]}}]\n"
    )
    router = subprocess.Popen(
        [str(KVROUTE), "serve", "--config", str(cfg), "--port", str(port)],
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, router)
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(
                    url + "/v1/completions",
                    json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
                    timeout=5,
                )
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "simulator did not come up"
            time.sleep(0.1)
        assert r.json()["usage"]["completion_tokens"] == 2
    finally:
        for proc in (router, sim):
            proc.send_signal(signal.SIGTERM)
        router_err = router.communicate(timeout=30)[1]
        sim.communicate(timeout=30)
    assert router.returncode == 0, router_err.decode()
    assert sim.returncode == 0
    # One JSON access-log line for the completion request.
    assert b'"path":"/v1/completions","status":200' in router_err
