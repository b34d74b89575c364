"""A Ray driver's connection does not survive a fork.

On GPU, vLLM forks its engine process unless CUDA is already initialised or it is told to spawn
(on CPU it always spawns). A process that called `ray.init()` and then starts an `LLM` with the
EdgePrompt connector forks a child that inherits the driver's Ray connection, and the child's
first Ray call hangs (seen on an H100: the edge worker's `ray.get_actor` waited forever in
`_load_actor_class_from_gcs`). So:
- the plugin, loaded by vLLM before it starts the engine process, asks vLLM to spawn when this
  process is a Ray driver (`prefer_spawn`);
- a child forked from a Ray driver anyway fails at its first Ray call with the fix in the message
  (`check_not_forked`), instead of hanging.
"""

import os
import sys

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)

START_METHOD_ENV = "VLLM_WORKER_MULTIPROC_METHOD"

_forked_from_ray_driver = False


class ForkedRayDriver(RuntimeError):
    pass


def ray_initialized() -> bool:
    """Whether this process is connected to Ray (without importing Ray when it is not loaded)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def prefer_spawn() -> bool:
    """In a Ray driver, make vLLM start its processes with spawn (unless the user chose a start
    method). Returns whether it changed the setting."""
    if not ray_initialized() or START_METHOD_ENV in os.environ:
        return False
    os.environ[START_METHOD_ENV] = "spawn"
    logger.info("this process is a Ray driver: vLLM's processes will be spawned, not forked "
                "(%s=spawn; a fork cannot use Ray)", START_METHOD_ENV)
    return True


def check_not_forked() -> None:
    """Raise ForkedRayDriver in a process forked from a Ray driver (its Ray calls would hang)."""
    if _forked_from_ray_driver:
        raise ForkedRayDriver(
            f"process {os.getpid()} was forked from a process connected to Ray, and Ray cannot "
            f"be used in a fork (its calls hang). Start vLLM's processes with spawn: set "
            f"{START_METHOD_ENV}=spawn (the EdgePrompt plugin sets it itself when it loads in a "
            f"process already connected to Ray)."
        )


def _after_fork_in_child() -> None:
    global _forked_from_ray_driver
    _forked_from_ray_driver = _forked_from_ray_driver or ray_initialized()


os.register_at_fork(after_in_child=_after_fork_in_child)
