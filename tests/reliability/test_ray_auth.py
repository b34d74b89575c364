"""Ray's token authentication stays on in every documented setup: the cluster `edgeprompt cloud`
starts, a cluster started with `RAY_AUTH_MODE=token ray start --head` (the suite's own), and
the edge joining it (the printed command carries RAY_AUTH_MODE=token; the client sets it when
unset). A member without the token is refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprompt_vllm.transport.client import require_token_auth

pytestmark = pytest.mark.slow
PROBE = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, "
         "logging_level='ERROR'); print('CONNECTED', flush=True)")


def probe(address: str, timeout: float, **env) -> bool:
    """Whether a fresh process joins the cluster within `timeout` (Ray retries refused ones)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True,
                             text=True, check=False, timeout=timeout, env={**base, **env})
    except subprocess.TimeoutExpired:  # still retrying the authentication: refused
        return False
    return "CONNECTED" in out.stdout


def test_the_suite_cluster_refuses_members_without_the_token(stack, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert stack.edge_command.startswith("RAY_AUTH_MODE=token vllm serve ")
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    # HOME without a token file: only a process given the cluster's token gets in
    assert probe(stack.address, 60, RAY_AUTH_MODE="token", HOME=str(home), RAY_AUTH_TOKEN=token)
    assert not probe(stack.address, 10, RAY_AUTH_MODE="token", HOME=str(home), RAY_AUTH_TOKEN="0" * 32)
    assert not probe(stack.address, 10, RAY_AUTH_MODE="disabled", HOME=str(home))


def test_clusters_edgeprompt_starts_use_token_auth(tmp_path):
    code = ("from edgeprompt_vllm.cloud.launch import connect_ray; import os, ray;"
            "connect_ray('local', 'auth-test', num_cpus=1);"
            "from ray._raylet import get_authentication_mode, AuthenticationMode;"
            "print('TOKEN' if get_authentication_mode() == AuthenticationMode.TOKEN else 'OPEN',"
            " os.environ['RAY_AUTH_MODE']); ray.shutdown()")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120,
                         env=base)
    assert out.returncode == 0 and "TOKEN token" in out.stdout, out.stderr[-2000:]
    # asked to start one without it, the cloud command refuses, before starting anything
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60,
                         env={**base, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode != 0 and "refusing to start a Ray cluster with RAY_AUTH_MODE='disabled'" \
        in out.stderr


def test_the_edge_joins_with_token_auth(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    require_token_auth(starting=False)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    with pytest.raises(RuntimeError, match="refusing"):
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        require_token_auth(starting=True)
