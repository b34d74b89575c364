"""Greedy generation of token-id prompts; writes token ids, top-5 logprobs and relay stats.

usage: relay_generate.py MODEL_DIR PROMPTS_JSON|@FILE MODE RESULT_PATH
MODE: "stock" (no EdgePrompt plugin at all) or "relay" (--attention-backend CUSTOM).
Env: EP_ENGINE_ARGS (JSON, merged over the CPU defaults), EP_MAX_TOKENS (default 16).
"""

import json
import os
import sys
from pathlib import Path

CPU_DEFAULTS = dict(dtype="float32", enforce_eager=True, max_model_len=2048, block_size=32,
                    kv_cache_memory_bytes=1 << 30, max_num_seqs=16)

if __name__ == "__main__":
    model, prompts, mode, result = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    prompts = json.loads(Path(prompts[1:]).read_text() if prompts.startswith("@") else prompts)
    # collective_rpc with a function (relay stats) needs pickle; test scripts only.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if mode == "stock":
        os.environ["VLLM_PLUGINS"] = ""  # load no plugin: stock vLLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {**CPU_DEFAULTS, **json.loads(os.environ.get("EP_ENGINE_ARGS", "{}"))}
    if mode == "relay":
        kwargs["attention_backend"] = "CUSTOM"
    llm = LLM(model, seed=0, **kwargs)
    sp = SamplingParams(temperature=0, max_tokens=int(os.environ.get("EP_MAX_TOKENS", "16")), logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp)
    stats = None
    if mode == "relay":
        from edgeprompt_vllm.attention.stats import relay_stats

        stats = llm.collective_rpc(relay_stats)[0]
    Path(result).write_text(json.dumps({
        "relay_stats": stats,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        # per generated position: {token id: logprob} of the top 5 (and the chosen one)
        "top_logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs]
                         for o in outs],
    }))
