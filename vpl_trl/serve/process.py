"""`python -m vpl_trl.serve` in a child process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(args: Sequence[str], log: str | os.PathLike, timeout: float = 120.0) -> Iterator[str]:
    """Start the server with `args` (no --host/--port) on 127.0.0.1, wait until `/health` answers (at most `timeout`
    seconds), yield its URL, and stop it. Its output goes to `log`."""
    port = free_port()
    command = [sys.executable, "-m", "vpl_trl.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                tail = Path(log).read_text()[-3000:]
                raise RuntimeError(f"the server exited with code {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {url}/health in {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
