"""edge_cloud_generate.py for an edge inside a network namespace (edgeprompt_vllm/netlab.py).

usage: netlab_generate.py SPEC_JSON RESULT_PATH
SPEC: as edge_cloud_generate.py (mode "edge", "ray_address" required), plus per request
"params": extra kv_transfer_params (e.g. {"strategy": "bulk"}). The cloud actor is started from
this process (attached to the head, in the cloud namespace); the edge engine's own processes
attach to the edge node through extra_config "ray_node_ip". Also writes "seconds" per round.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from edge_cloud_generate import ENGINE, start_cloud  # noqa: E402


def main(spec, out):
    from vllm import LLM, SamplingParams, TokensPrompt

    actor, address = start_cloud(spec)
    extra = {"ray_address": address, "namespace": spec["namespace"], "actor_name": spec["actor_name"],
             **spec.get("extra_config", {})}
    kw = dict(ENGINE, kv_transfer_config={
        "kv_connector": "EdgePromptConnector", "kv_role": "kv_consumer",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra})
    llm = LLM(spec["model"], **kw)
    res = {"token_ids": [], "logprobs": [], "edgeprompt": [], "seconds": []}
    for reqs in spec["requests"]:
        prompts = [TokensPrompt(prompt_token_ids=r["token_ids"]) for r in reqs]
        params = [SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 4), logprobs=1,
                                 extra_args={"kv_transfer_params": {"cloud_prompt": r["cloud_prompt"],
                                                                    **r.get("params", {})}})
                  for r in reqs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        res["seconds"].append(time.perf_counter() - t0)
        for o in outs:
            c = o.outputs[0]
            res["token_ids"].append(list(c.token_ids))
            res["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            res["edgeprompt"].append((o.kv_transfer_params or {}).get("edgeprompt"))
    import ray

    res["cloud"] = ray.get(actor.stats.remote())
    tl = spec.get("extra_config", {}).get("timeline_path")
    if tl and Path(tl).exists():
        res["timeline"] = [json.loads(x) for x in Path(tl).read_text().splitlines()]
    Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
