"""The wire format of one cloud-prompt layer, and its checksum.

Per layer, one contiguous buffer holding K then V in logical layout
    kv: [2, num_tokens, num_kv_heads, head_size]   (model dtype; K = kv[0], V = kv[1])
K is post-RoPE (what the attention layer receives). The buffer travels as raw bytes (a uint8
numpy array: Ray stores it zero-copy, and bf16, which numpy lacks, survives), described by a
`LayerHeader` with a checksum over exactly those bytes. A codec (codecs.py: none | zstd | fp8)
may encode the buffer; the checksum then covers the encoded bytes, and `wire_nbytes` is their
count (`nbytes` stays the decoded size).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgeprompt_vllm.transport import codecs

try:  # ships with vLLM; ~7 GB/s on one core
    from blake3 import blake3 as _hasher

    CHECKSUM_ALGO = "blake3"
except ImportError:  # pragma: no cover
    import hashlib

    def _hasher(data):
        return hashlib.blake2b(data, digest_size=32)

    CHECKSUM_ALGO = "blake2b"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    codec: str = "none"  # codecs.CODECS
    wire_nbytes: int = -1  # encoded bytes on the wire; -1: the same as nbytes (codec none)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.num_tokens, self.num_kv_heads, self.head_size)

    @property
    def nbytes(self) -> int:
        return 2 * self.num_tokens * self.num_kv_heads * self.head_size * DTYPES[self.dtype].itemsize

    @property
    def payload_nbytes(self) -> int:
        return self.nbytes if self.wire_nbytes < 0 else self.wire_nbytes

    def to_dict(self) -> dict:
        return asdict(self)


def encode_layer(prompt_id: str, layer: int, key: torch.Tensor, value: torch.Tensor,
                 compute_s: float = 0.0, codec: str = "none") -> tuple[LayerHeader, np.ndarray]:
    """key, value: [num_tokens, num_kv_heads, head_size] -> (header, bytes [wire_nbytes] uint8)."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be [T, H, hs]")
    return encode_kv(prompt_id, layer, torch.stack([key, value]), compute_s, codec)


def encode_kv(prompt_id: str, layer: int, kv: torch.Tensor, compute_s: float = 0.0,
              codec: str = "none") -> tuple[LayerHeader, np.ndarray]:
    """kv: [2, T, H, hs] -> (header, encoded bytes uint8)."""
    codecs.check_codec(codec)
    kv = kv.contiguous().cpu()
    raw = codecs.encode(kv, codec)
    _, t, h, hs = kv.shape
    header = LayerHeader(prompt_id, layer, t, h, hs, str(kv.dtype).removeprefix("torch."),
                         checksum(raw), compute_s, codec, -1 if codec == "none" else int(raw.nbytes))
    return header, raw


def decode_layer(header: LayerHeader, raw: np.ndarray) -> torch.Tensor:
    """Verifies and decodes the bytes: -> kv [2, num_tokens, num_kv_heads, head_size]
    (a read-only view for codec none)."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.nbytes != header.payload_nbytes:
        raise CorruptLayer(f"layer {header.layer} of {header.prompt_id!r}: {raw.nbytes} bytes, "
                           f"header says {header.payload_nbytes}")
    got = checksum(raw)
    if got != header.checksum:
        raise CorruptLayer(f"layer {header.layer} of {header.prompt_id!r}: checksum {got} != {header.checksum}")
    try:
        return codecs.decode(raw, header.codec, header.shape, DTYPES[header.dtype])
    except ValueError as e:
        raise CorruptLayer(f"layer {header.layer} of {header.prompt_id!r}: {e}") from e
