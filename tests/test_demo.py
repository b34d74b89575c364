"""The README's main command, `edgeprompt demo`: cloud actor + `vllm serve` edge + openai client,
end to end, exit 0; and Ctrl-C leaves nothing running."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import interruptible

EXE = str(Path(sys.executable).parent / "edgeprompt")


@pytest.mark.slow
def test_demo_exits_zero(tiny_model):
    out = subprocess.run([EXE, "demo"], capture_output=True, text=True, timeout=600)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    for step in ("[1/6]", "[2/6] the cloud", "[3/6] the edge: ", "[4/6] requests", "[5/6] what crossed",
                 "[6/6] shutting down"):
        assert step in text
    assert "--middleware edgeprompt_vllm.serving.middleware.EdgePromptMiddleware" in text
    assert "(cloud prompt travel-agent: loaded, 320 tokens of cloud KV)" in text
    assert "(cloud prompt travel-agent: cached, 320 tokens of cloud KV)" in text
    assert "(cloud prompt lisbon-guide: loaded, 320 tokens of cloud KV)" in text
    assert "answer: ''" not in text and "(streamed)" in text
    m = re.search(r"cloud KV received: (\d+) bytes in (\d+) layers", text)
    assert m and int(m.group(1)) == 2 * 4 * (2 * 320 * 2 * 64 * 4) and int(m.group(2)) == 8
    assert "cloud prompt hits: 2 loaded from the cloud, 3 already on the edge; misses: 0" in text
    assert len(re.findall(r"load of \S+ \(320 tokens\): 4/4 layers, 1310720 bytes.*overlapped edge compute",
                          text)) == 2
    assert re.search(r"relay attention groups: \d+ over \d+ steps", text)
    assert text.rstrip().endswith("demo finished")


@pytest.mark.slow
def test_demo_ctrl_c_shuts_everything_down(tiny_model):
    proc = subprocess.Popen([EXE, "demo"], **interruptible(stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True))
    lines = []
    try:
        for line in proc.stdout:  # wait until the cloud is up and the edge is starting
            lines.append(line)
            if line.startswith("[3/6]"):
                break
        time.sleep(5)  # mid-startup of `vllm serve`
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the demo should have started the Ray cluster and vllm serve"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest and "[6/6] shutting down" in rest
    deadline = time.monotonic() + 30
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
