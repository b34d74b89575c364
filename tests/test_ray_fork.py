"""A Ray driver's fork (ray_fork.py): vLLM is asked to spawn, and a fork fails fast.

On CPU vLLM always spawns, so the engine path cannot fork here; these tests drive the two hooks
directly, with a real Ray driver in a child process.
"""

import os
import subprocess
import sys
import textwrap
import types

from edgeprompt_vllm import ray_fork

DRIVER = textwrap.dedent("""
    import os, sys
    import ray
    os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    from edgeprompt_vllm import ray_fork
    from edgeprompt_vllm.transport.client import ensure_ray
    assert ray_fork.prefer_spawn(), "a Ray driver did not ask vLLM to spawn"
    print("method", os.environ["VLLM_WORKER_MULTIPROC_METHOD"])
    pid = os.fork()
    if pid == 0:  # the child: a fork of a Ray driver
        try:
            ensure_ray(None, "ep-fork-test")
        except ray_fork.ForkedRayDriver as e:
            print("child refused:", e, flush=True)
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status))
    ensure_ray(None, "ep-fork-test")  # the driver itself may still use Ray
    print("driver ok")
    ray.shutdown()
""")


def test_ray_driver_spawns_and_its_fork_fails_fast():
    proc = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "method spawn" in out
    assert "child refused:" in out and "VLLM_WORKER_MULTIPROC_METHOD=spawn" in out
    assert "child exit 0" in out and "driver ok" in out


def _fake_ray(monkeypatch, initialized: bool):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: initialized))


def test_prefer_spawn_keeps_the_users_choice(monkeypatch):
    _fake_ray(monkeypatch, initialized=True)
    monkeypatch.setenv(ray_fork.START_METHOD_ENV, "fork")
    assert not ray_fork.prefer_spawn()
    assert os.environ[ray_fork.START_METHOD_ENV] == "fork"


def test_prefer_spawn_does_nothing_outside_a_ray_driver(monkeypatch):
    _fake_ray(monkeypatch, initialized=False)
    monkeypatch.delenv(ray_fork.START_METHOD_ENV, raising=False)
    assert not ray_fork.prefer_spawn()
    assert ray_fork.START_METHOD_ENV not in os.environ


def test_no_refusal_in_a_process_that_was_not_forked():
    ray_fork.check_not_forked()  # pytest's process: no fork of a Ray driver
