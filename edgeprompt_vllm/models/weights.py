"""Deterministic random Llama weights in Hugging Face naming, written as safetensors."""

from pathlib import Path

import torch
from safetensors.torch import save_file

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def llama_weight_shapes(cfg: dict, vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM tensor, in the fixed order they are drawn."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    shapes = [("model.embed_tokens.weight", (vocab_size, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab_size, h)))
    return shapes


def write_random_weights(cfg: dict, vocab_size: int, seed: int, std: float, path: Path) -> None:
    """Norm weights are 1; every other tensor is N(0, std^2) from one generator seeded `seed`."""
    gen = torch.Generator().manual_seed(seed)
    dtype = _DTYPES[cfg["torch_dtype"]]
    tensors = {}
    for name, shape in llama_weight_shapes(cfg, vocab_size):
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
