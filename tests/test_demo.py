"""The README's main command, `edgeprompt demo`, runs end to end and exits 0."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_exits_zero(tiny_model):
    exe = Path(sys.executable).parent / "edgeprompt"
    out = subprocess.run([str(exe), "demo"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the plugin loaded in: EngineCore, MainProcess, VllmWorker-0" in out.stdout
    assert "completion: ''" not in out.stdout
    assert out.stdout.rstrip().endswith("demo finished")
