"""Helpers shared by the tests (tests/ is on sys.path: pyproject.toml `pythonpath`)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(name: str, *args: str, env: dict | None = None, timeout: float = 600) -> dict:
    """Runs tests/scripts/NAME with this Python; it writes its JSON result to the path given last.

    (Not stdout: vLLM logs to stdout.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args, str(result)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def plugin_processes(trace_dir: Path) -> list[str]:
    """Names of the processes that ran edgeprompt_vllm.register() (EDGEPROMPT_PLUGIN_TRACE_DIR)."""
    return sorted(p.read_text().strip() for p in Path(trace_dir).glob("*.txt"))
