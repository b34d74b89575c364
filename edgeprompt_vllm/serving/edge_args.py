"""The one way to start an edge: `vllm serve MODEL` plus these flags (the same on CPU and GPU).

    vllm serve MODEL --dtype float32 --block-size 32 \\
      --attention-backend CUSTOM \\
      --middleware edgeprompt_vllm.serving.middleware.EdgePromptMiddleware \\
      --kv-transfer-config '{"kv_connector":"EdgePromptConnector",
          "kv_connector_module_path":"edgeprompt_vllm.edge.connector","kv_role":"kv_consumer",
          "kv_load_failure_policy":"recompute",
          "kv_connector_extra_config":{"ray_address":"HOST:PORT","namespace":"edgeprompt"}}'

- `--kv-transfer-config`: the EdgePrompt connector (scheduler: matches cloud prompts; worker:
  fetches their KV layer by layer); `kv_connector_extra_config` is an EdgePromptConfig.
- `--attention-backend CUSTOM`: relay attention (on CPU the plugin serves CUSTOM itself).
- `--middleware`: the OpenAI API side: validates `kv_transfer_params`, prepends the cloud prompt
  named by `cloud_prompt`, answers 400 / 503 (serving/middleware.py).
- `--dtype`, `--block-size`: must equal the cloud's (the model fingerprint compares them).

`edgeprompt edge-args` prints them; `edgeprompt cloud` prints the whole command once ready.
"""

import json
import os
import shlex

from edgeprompt_vllm.config import EdgePromptConfig

CONNECTOR_MODULE = "edgeprompt_vllm.edge.connector"
MIDDLEWARE = "edgeprompt_vllm.serving.middleware.EdgePromptMiddleware"


def kv_transfer_config(config: EdgePromptConfig | dict) -> dict:
    if not isinstance(config, EdgePromptConfig):
        config = EdgePromptConfig.from_dict(config)  # validates
    defaults = EdgePromptConfig().to_dict()
    extra = {k: v for k, v in config.to_dict().items()  # where the cloud is, and what differs
             if k in ("ray_address", "namespace") or v != defaults[k]}
    return {"kv_connector": "EdgePromptConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}


def edge_serve_args(config: EdgePromptConfig | dict, *, dtype: str = "float32",
                    block_size: int = 32, relay: bool = True) -> list[str]:
    """The flags to add to `vllm serve MODEL` for an EdgePrompt edge."""
    args = ["--dtype", dtype, "--block-size", str(block_size)]
    if relay:
        args += ["--attention-backend", "CUSTOM"]
    args += ["--middleware", MIDDLEWARE,
             "--kv-transfer-config", json.dumps(kv_transfer_config(config), separators=(",", ":"))]
    return args


def ray_env() -> dict[str, str]:
    """Environment an edge needs to join this process's Ray cluster. Ray >= 2.5x enables token
    authentication for clusters it starts, but a process that joins by an explicit address uses
    it only with RAY_AUTH_MODE=token (the token: ~/.ray/auth_token, or RAY_AUTH_TOKEN)."""
    return {"RAY_AUTH_MODE": "token"} if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else {}


def edge_command(model: str, args: list[str], extra: list[str] = (),
                 env: dict[str, str] | None = None) -> str:
    """A shell command line, ready to paste."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.join(["vllm", "serve", str(model), *args, *extra])])
