"""Where a benchmark ran: device, versions, commit and command, recorded in every result JSON."""

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit(short: bool = True) -> str:
    """The commit of the code that runs: $EDGEPROMPT_COMMIT when set (a copied tree whose git
    metadata is another commit's, as on the lent GPU), else git's HEAD ("" without git)."""
    commit = os.environ.get("EDGEPROMPT_COMMIT") or _git("rev-parse", "HEAD")
    return commit[:7] if short else commit


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(argv: list[str] | None = None) -> dict:
    """Versions are read from the installed packages; importing vllm starts no engine."""
    import torch
    import vllm

    gpu = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if gpu else f"CPU: {cpu_name()}",
        "gpus": torch.cuda.device_count() if gpu else 0,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": source_commit(),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join(["python", *(argv if argv is not None else sys.argv)]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # other work on the machine skews CPU timings: its 1-minute load at start (and end)
        "load_average_at_start": round(os.getloadavg()[0], 2),
        # which of the host's GPUs (several runs may share a host, one GPU each)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cascade_unavailable() -> str | None:
    """Why vLLM's cascade attention cannot run here (None: it can): it needs a CUDA GPU and a
    vLLM that still has it (0.26; removed by 0.32, docs/vllm-api.md §0)."""
    if not has_cuda():
        return "n/a (CPU)"
    from vllm.v1.attention.backend import AttentionMetadataBuilder

    if not hasattr(AttentionMetadataBuilder, "use_cascade_attention"):
        import vllm

        return f"n/a (vLLM {vllm.__version__} has no cascade attention)"
    return None
