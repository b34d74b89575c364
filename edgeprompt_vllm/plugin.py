"""What `edgeprompt_vllm.register()` does in each vLLM process."""

import multiprocessing
import os
from pathlib import Path

from edgeprompt_vllm import __version__, ray_fork
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)

# One flag per process: vLLM's own `plugins_loaded` guard covers its loader, but tests and user
# code may call register() again in the same process.
_registered_pid: int | None = None


def is_registered() -> bool:
    return _registered_pid == os.getpid()


def register_all() -> None:
    global _registered_pid
    if is_registered():
        return
    _registered_pid = os.getpid()
    ray_fork.prefer_spawn()  # before vLLM starts its engine process from this one
    _register_attention_backend()
    _leave_trace()
    logger.info(
        "EdgePrompt %s plugin registered in process %s (pid %d)",
        __version__,
        multiprocessing.current_process().name,
        os.getpid(),
    )


def _register_attention_backend() -> None:
    """Relay attention: `--attention-backend CUSTOM` on GPU. The CPU platform ignores that flag
    and always loads CPU_ATTN, so there CPU_ATTN is pointed at a subclass that stays stock
    unless the flag asks for CUSTOM (docs/vllm-api.md §2.1)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "edgeprompt_vllm.attention.backend_cpu.RelayCPUBackend")
    register_backend(AttentionBackendEnum.CUSTOM,
                     "edgeprompt_vllm.attention.backend_cuda.RelayFlashBackend")


def _leave_trace() -> None:
    """With EDGEPROMPT_PLUGIN_TRACE_DIR set, leave a file per process that registered.

    vLLM configures logging in the API server only after plugins load, so a log line cannot show
    that process; this file can (tests/test_plugin_loading.py reads it).
    """
    trace_dir = os.environ.get("EDGEPROMPT_PLUGIN_TRACE_DIR")
    if trace_dir:
        name = multiprocessing.current_process().name
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        (Path(trace_dir) / f"{os.getpid()}.txt").write_text(name + "\n")
