"""A random LoRA adapter for the tiny model, in the PEFT layout vLLM loads (no peft needed)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads",
           "v_proj": "num_key_value_heads"}


def make_lora_adapter(model_dir: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """Rank-`rank` adapters on q, k and v of every layer, scaled so they change the output."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, head = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj, heads in TARGETS.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) / hidden ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(cfg[heads] * head, rank, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(TARGETS), "base_model_name_or_path": str(model_dir),
        "task_type": "CAUSAL_LM"}))
    return out
