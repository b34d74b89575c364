"""The one tolerance table for EdgePrompt-vs-stock comparisons (logprobs, absolute).

fp32 follows vLLM tests/kernels/allclose_default.py (1e-5 for fp32 kernels), loosened to 1e-4
because a whole 4-layer model and log-softmax sit between (measured: max 5e-6 on tiny-llama).
Half precisions: vLLM's 1e-3 kernel tolerance does not survive a full forward; GPU numbers TBD.
"""

import torch

LOGPROB_ATOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def logprob_atol(dtype: torch.dtype) -> float:
    return LOGPROB_ATOL[dtype]
