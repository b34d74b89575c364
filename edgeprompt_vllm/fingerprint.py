"""The model fingerprint: cloud and edge must run the same model (DESIGN.md invariant 3).

Built from the model directory (config.json, weights) plus the engine's dtype and block size,
by the same function on both sides, so that it does not depend on vLLM internals.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
              "partial_rotary_factor", "rope_type")
_MANIFEST = "edgeprompt-model.json"  # models/make_model.py: per-file sha256, already computed


class FingerprintMismatch(RuntimeError):
    """Cloud and edge run different models (or layouts): cloud KV would be silently wrong."""


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str  # "float32", "float16", "bfloat16"
    rope: str  # canonical JSON of the RoPE settings in config.json
    block_size: int
    weights: str  # sha256 over the weight files; "dummy" for --load-format dummy
    # vLLM's quantization method as the engine resolved it ("none"): an edge quantizing the same
    # checkpoint (e.g. --quantization fp8) computes other K and V than an unquantized cloud
    quantization: str = "none"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def kv_bytes_per_token(self) -> int:
        """One token's K and V in one layer, as the cloud ships them: 2 x KV heads x head size."""
        from edgeprompt_vllm.transport.wire import DTYPES

        return 2 * self.num_kv_heads * self.head_size * DTYPES[self.dtype].itemsize

    def diff(self, other: "Fingerprint") -> list[str]:
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def check_same(self, other: "Fingerprint", who: str = "cloud") -> None:
        d = self.diff(other)
        if d:
            raise FingerprintMismatch(f"model fingerprint differs from the {who}'s: " + "; ".join(d))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        return cls(**d)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_checksum(model_dir: Path) -> str:
    manifest = model_dir / _MANIFEST
    names = sorted(p.name for p in model_dir.glob("*.safetensors")) + sorted(
        p.name for p in model_dir.glob("*.bin"))
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        if all(n in files for n in names):
            return hashlib.sha256("".join(f"{n}:{files[n]}\n" for n in names).encode()).hexdigest()
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        with open(model_dir / n, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path, dtype, block_size: int,
                      load_format: str = "auto", quantization: str | None = None) -> Fingerprint:
    """The fingerprint of a local model directory as an engine with `dtype`, `block_size` and
    `quantization` (its model_config's, None: unquantized) runs it."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_size = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = {k: cfg[k] for k in _ROPE_KEYS if k in cfg}
    return Fingerprint(
        architecture=",".join(cfg.get("architectures", [])) or cfg.get("model_type", "?"),
        num_layers=int(cfg["num_hidden_layers"]),
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_size=int(head_size),
        dtype=dtype_name(dtype),
        rope=json.dumps(rope, sort_keys=True),
        block_size=int(block_size),
        weights="dummy" if load_format == "dummy" else _weights_checksum(model_dir),
        quantization=str(quantization or "none"),
    )
