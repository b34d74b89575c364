"""Greedy generation on token-id prompts, stock or EdgePrompt (cloud actor + edge connector).

usage: edge_cloud_generate.py SPEC_JSON RESULT_PATH
SPEC: {"mode": "stock"|"edge", "model", "requests": [{"token_ids", "cloud_prompt"?, "lora"?,
"prompt_logprobs"?}, ...] or a
list of such lists (rounds, run one after another on one engine), "max_tokens",
edge only: "ray_address"? (else a local cluster), "namespace", "actor_name",
"cloud_prompts": {id: token_ids}, "prefill": bool, "corrupt": [[id, layer]],
"cloud_resources"?, "cloud_env"? (env vars of the cloud actor: CUDA_VISIBLE_DEVICES picks its GPU),
"extra_config"?, "failure_policy"? (kv_load_failure_policy, default "recompute")}; both modes:
"engine"? (engine arguments over ENGINE; the cloud takes its dtype, load_format and
max_model_len), "lora"? (a LoRA adapter directory for the requests with "lora": true; the cloud
runs the base model).
Writes {"token_ids", "finish_reasons", "logprobs" (the chosen tokens'), "top_logprobs" (top 5
per position), "prompt_logprobs" (each prompt token's, where asked), "edgeprompt",
"num_cached_tokens", "timeline", "cloud", "edge_node"}.
"""

import json
import sys
from pathlib import Path

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 28, max_num_seqs=16, block_size=32, seed=0)


def start_cloud(spec, engine: dict = ENGINE):
    import ray

    from edgeprompt_vllm.cloud.deploy import start_cloud_service

    if spec.get("ray_address"):
        ray.init(address=spec["ray_address"], namespace=spec["namespace"], log_to_driver=False)
    else:
        ray.init(address="local", namespace=spec["namespace"], include_dashboard=False, num_cpus=2, log_to_driver=False)
    actor = start_cloud_service(spec["model"], name=spec["actor_name"], namespace=spec["namespace"],
                                resources=spec.get("cloud_resources"), detached=False, num_cpus=0,
                                env_vars=spec.get("cloud_env"), block_size=engine["block_size"],
                                dtype=engine["dtype"], max_model_len=engine["max_model_len"],
                                load_format=engine.get("load_format", "auto"), max_kv_bytes=1 << 30,
                                engine_kwargs=spec.get("cloud_engine"))
    for pid, toks in spec["cloud_prompts"].items():
        ray.get(actor.register_prompt.remote(pid, token_ids=toks, prefill=spec.get("prefill", True)))
    for pid, layer in spec.get("corrupt", []):
        ray.get(actor.corrupt_layer_for_testing.remote(pid, layer))
    return actor, ray.get_runtime_context().gcs_address


def main(spec, out):
    from vllm import LLM, SamplingParams, TokensPrompt

    rounds = spec["requests"]
    rounds = rounds if isinstance(rounds[0], list) else [rounds]
    kw = {**ENGINE, **spec.get("engine", {})}
    lora = None
    if spec.get("lora"):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, spec["lora"])
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=8)
    actor = None
    if spec["mode"] == "edge":
        import ray

        actor, address = start_cloud(spec, kw)
        # The load path is what these runs test: a fixed strategy, not the planner's choice
        # (edge/planner.py; a spec may still ask for "auto" in extra_config).
        extra = {"ray_address": address, "namespace": spec["namespace"],
                 "actor_name": spec["actor_name"], "strategy": "layerwise",
                 **spec.get("extra_config", {})}
        kw["kv_transfer_config"] = {
            "kv_connector": "EdgePromptConnector", "kv_role": "kv_consumer",
            "kv_connector_module_path": "edgeprompt_vllm.edge.connector",
            "kv_load_failure_policy": spec.get("failure_policy", "recompute"),
            "kv_connector_extra_config": extra}
    llm = LLM(spec["model"], **kw)
    res = {"token_ids": [], "finish_reasons": [], "logprobs": [], "top_logprobs": [],
           "edgeprompt": [], "num_cached_tokens": []}
    for reqs in rounds:
        prompts = [TokensPrompt(prompt_token_ids=r["token_ids"]) for r in reqs]
        params = [SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 16), logprobs=5,
                                 prompt_logprobs=r.get("prompt_logprobs"),
                                 extra_args={"kv_transfer_params": {"cloud_prompt": r["cloud_prompt"]}}
                                 if r.get("cloud_prompt") and spec["mode"] == "edge" else None)
                  for r in reqs]
        loras = [lora if r.get("lora") else None for r in reqs]
        for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras):
            c = o.outputs[0]
            res["token_ids"].append(list(c.token_ids))
            res["finish_reasons"].append(c.finish_reason)
            lps = c.logprobs or []  # none for a request that failed
            res["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, lps)])
            res["top_logprobs"].append([{str(t): p.logprob for t, p in lp.items()} for lp in lps])
            res["edgeprompt"].append((o.kv_transfer_params or {}).get("edgeprompt"))
            res["num_cached_tokens"].append(o.num_cached_tokens)
            res.setdefault("prompt_logprobs", []).append(  # each prompt token's, if asked
                None if o.prompt_logprobs is None else
                [None if lp is None else lp[t].logprob
                 for t, lp in zip(o.prompt_token_ids, o.prompt_logprobs)])
    if actor is not None:
        import ray

        res["cloud"] = ray.get(actor.stats.remote())
        res["edge_node"] = ray.get_runtime_context().get_node_id()
    tl = spec.get("extra_config", {}).get("timeline_path")
    if tl and Path(tl).exists():
        res["timeline"] = [json.loads(x) for x in Path(tl).read_text().splitlines()]
    Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
