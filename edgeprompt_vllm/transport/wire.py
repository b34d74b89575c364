"""The wire format of one cloud-prompt layer, and its checksum.

Per layer, one contiguous buffer holding K then V in logical layout
    kv: [2, num_tokens, num_kv_heads, head_size]   (model dtype; K = kv[0], V = kv[1])
K is post-RoPE (what the attention layer receives). The buffer travels as raw bytes (a uint8
numpy array: Ray stores it zero-copy, and bf16, which numpy lacks, survives), described by a
`LayerHeader` with a checksum over exactly those bytes.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

try:  # ships with vLLM; ~7 GB/s on one core
    from blake3 import blake3 as _hasher

    CHECKSUM_ALGO = "blake3"
except ImportError:  # pragma: no cover
    import hashlib

    def _hasher(data):
        return hashlib.blake2b(data, digest_size=32)

    CHECKSUM_ALGO = "blake2b"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CorruptLayer(RuntimeError):
    """A layer whose bytes, shape or checksum do not match its header."""


def checksum(buf) -> str:
    return f"{CHECKSUM_ALGO}:{_hasher(memoryview(buf).cast('B')).hexdigest()}"


@dataclass(frozen=True)
class LayerHeader:
    prompt_id: str
    layer: int
    num_tokens: int
    num_kv_heads: int
    head_size: int
    dtype: str
    checksum: str
    compute_s: float = 0.0  # cloud compute time of this layer (0 when served warm)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.num_tokens, self.num_kv_heads, self.head_size)

    @property
    def nbytes(self) -> int:
        return 2 * self.num_tokens * self.num_kv_heads * self.head_size * _DTYPES[self.dtype].itemsize

    def to_dict(self) -> dict:
        return asdict(self)


def encode_layer(prompt_id: str, layer: int, key: torch.Tensor, value: torch.Tensor,
                 compute_s: float = 0.0) -> tuple[LayerHeader, np.ndarray]:
    """key, value: [num_tokens, num_kv_heads, head_size] -> (header, raw bytes [nbytes] uint8)."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be [T, H, hs]")
    kv = torch.stack([key, value]).contiguous().cpu()  # [2, T, H, hs]
    raw = kv.view(torch.uint8).reshape(-1).numpy()
    t, h, hs = key.shape
    header = LayerHeader(prompt_id, layer, t, h, hs, str(kv.dtype).removeprefix("torch."),
                         checksum(raw), compute_s)
    return header, raw


def decode_layer(header: LayerHeader, raw: np.ndarray) -> torch.Tensor:
    """Verifies and views the bytes: -> kv [2, num_tokens, num_kv_heads, head_size] (read-only view)."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.nbytes != header.nbytes:
        raise CorruptLayer(f"layer {header.layer} of {header.prompt_id!r}: {raw.nbytes} bytes, "
                           f"header says {header.nbytes}")
    got = checksum(raw)
    if got != header.checksum:
        raise CorruptLayer(f"layer {header.layer} of {header.prompt_id!r}: checksum {got} != {header.checksum}")
    import warnings

    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; we never write them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    return flat.view(_DTYPES[header.dtype]).view(header.shape)
