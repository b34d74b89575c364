"""Relay attention inside vLLM: a backend per platform (CUDA: FlashAttention subclass, CPU:
CPU_ATTN subclass), a builder that finds the shared-prefix groups of each batch, and the kernels
of `edgeprompt_vllm.kernels` (GPU) or their torch references over the CPU layout (CPU)."""
