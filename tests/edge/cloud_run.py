"""Shared by the edge tests: token-id workloads with marker tokens, and the run helper."""

import json
import random
import uuid
from pathlib import Path

from helpers import run_script

CLOUD_TOKENS = (5, 3000)  # cloud prompts draw token ids from here
EDGE_TOKENS = (3000, 4090)  # private edge prompts only from here: any leak is recognisable


def tokens(rng: random.Random, n: int, lo_hi: tuple[int, int]) -> list[int]:
    return [rng.randrange(*lo_hi) for _ in range(n)]


def run(model, mode: str, requests, tmp_path: Path, *, env=None, timeout=400, **spec) -> dict:
    tag = uuid.uuid4().hex[:8]
    spec = {"mode": mode, "model": str(model), "requests": requests,
            "namespace": f"ep-test-{tag}", "actor_name": f"cloud-{tag}", **spec}
    path = tmp_path / f"spec-{mode}-{tag}.json"
    path.write_text(json.dumps(spec))
    return run_script("edge_cloud_generate.py", str(path), env=env, timeout=timeout)
