"""A `llm2trt serve` process for the tests: started on a free port, its address read from its first
line, stopped with SIGTERM (and its exit code kept)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    stderr: list[str]

    def metrics(self) -> dict[str, float]:
        text = httpx2.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """The metrics once nothing runs, waits or holds a KV block (or at the timeout)."""
        end = time.monotonic() + timeout
        while True:
            values = self.metrics()
            keys = ("llm2trt_requests_running", "llm2trt_requests_waiting", "llm2trt_kv_blocks_in_use")
            if all(values[k] == 0 for k in keys) or time.monotonic() > end:
                return values
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def serving(artifact: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    command = [sys.executable, "-m", "llm2trt", "serve", str(artifact), "--port", "0", *args]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"serving on (http://\S+)", line)
        if found:
            break
    else:
        process.wait()
        raise AssertionError(f"serve did not start: {''.join(lines)}")
    server = Server(process, found.group(1), lines)
    stream = process.stderr
    # The rest of its stderr is read as it comes, so a chatty server never blocks on a full pipe.
    threading.Thread(target=lambda: lines.extend(stream), daemon=True).start()
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
