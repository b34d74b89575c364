"""Greedy generation with a real vLLM engine; writes {"token_ids", "logprobs"} as JSON.

usage: greedy_generate.py MODEL_DIR PROMPTS_JSON RESULT_PATH
"""

import json
import sys
from pathlib import Path

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, max_num_seqs=16, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, logprobs=1))
    Path(sys.argv[3]).write_text(json.dumps({
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                     for o in outs],
    }))
