"""Model presets: the YAML files in configs/models/, validated into one dataclass."""

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

_REQUIRED_CONFIG_KEYS = (
    "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "torch_dtype",
)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    seed: int
    weights: str  # "random" (write model.safetensors) or "none" (config only)
    init_std: float
    vocab_size: int
    train_chars: int
    config: dict[str, Any]  # config.json fields, without vocab_size / token ids

    def __post_init__(self):
        if self.weights not in ("random", "none"):
            raise ValueError(f"preset {self.name}: weights must be 'random' or 'none', not {self.weights!r}")
        missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in self.config]
        if missing:
            raise ValueError(f"preset {self.name}: config lacks {', '.join(missing)}")
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        if self.config["hidden_size"] % heads or heads % kv_heads:
            raise ValueError(f"preset {self.name}: hidden_size, heads and KV heads do not divide")
        if self.vocab_size < 512:
            raise ValueError(f"preset {self.name}: vocab_size {self.vocab_size} is below 512")

    @property
    def head_size(self) -> int:
        return self.config["hidden_size"] // self.config["num_attention_heads"]


def _configs_dir():
    return resources.files("edgeprompt_vllm.configs").joinpath("models")


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def chat_template() -> str:
    return _configs_dir().joinpath("chat_template.jinja").read_text()


def load_preset(name: str) -> ModelPreset:
    path = _configs_dir().joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
    raw = yaml.safe_load(path.read_text())
    tok = raw.get("tokenizer", {})
    return ModelPreset(
        name=raw["name"], seed=int(raw["seed"]), weights=raw["weights"],
        init_std=float(raw["init_std"]), vocab_size=int(tok["vocab_size"]),
        train_chars=int(tok["train_chars"]), config=dict(raw["config"]),
    )
