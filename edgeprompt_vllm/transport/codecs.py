"""Wire codecs for one cloud-prompt layer: none, zstd (lossless), fp8 (lossy, only when asked).

Every codec maps the layer's logical KV  kv: [2, T, Hkv, hs]  (model dtype) to one flat uint8
buffer and back. The checksum (wire.py) covers the *encoded* bytes.

  none  the raw bytes of kv (zero-copy on both ends)
  zstd  byte-shuffled raw bytes (byte i of every element together: the sign/exponent bytes of
        KV values are highly redundant), then zstandard level 1; bit-exact
  fp8   torch.float8_e4m3fn with one fp32 scale per (K/V, head): amax / 448; the buffer is
        [scales: 2 * Hkv fp32][codes: 2 * T * Hkv * hs fp8]; lossy (relative error <= 2^-4
        per element of the head's range), so it is used only when the config asks for it
"""

import numpy as np
import torch

CODECS = ("none", "zstd", "fp8")
LOSSY = frozenset({"fp8"})
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown wire codec {codec!r}; known: {list(CODECS)}")
    if codec == "zstd":
        _zstd()
    if codec == "fp8" and _FP8 is None:  # pragma: no cover
        raise RuntimeError("wire codec 'fp8' needs torch.float8_e4m3fn (torch >= 2.1)")
    return codec


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("wire codec 'zstd' needs the `zstandard` package (pip install zstandard)") from e
    return zstandard


def _raw(kv: torch.Tensor) -> np.ndarray:
    return kv.contiguous().cpu().view(torch.uint8).reshape(-1).numpy()


def encode(kv: torch.Tensor, codec: str) -> np.ndarray:
    """kv: [2, T, H, hs] -> flat uint8 buffer."""
    if codec == "none":
        return _raw(kv)
    if codec == "zstd":
        item = kv.element_size()
        shuffled = np.ascontiguousarray(_raw(kv).reshape(-1, item).T)  # [item, numel]
        return np.frombuffer(_zstd().ZstdCompressor(level=1).compress(shuffled), dtype=np.uint8)
    if codec == "fp8":
        x = kv.float()  # [2, T, H, hs]
        amax = x.abs().amax(dim=(1, 3))  # [2, H]
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        codes = (x / scale[:, None, :, None]).to(_FP8)  # [2, T, H, hs]
        return np.concatenate([scale.contiguous().view(torch.uint8).reshape(-1).numpy(), _raw(codes)])
    raise ValueError(f"unknown wire codec {codec!r}")


def decode(buf: np.ndarray, codec: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """flat uint8 buffer -> kv [2, T, H, hs] of `dtype` (read-only view for `none`).

    Raises ValueError when the buffer does not decode to exactly `shape`."""
    numel = int(np.prod(shape))
    if codec == "none":
        import warnings

        with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(buf)
        return flat.view(dtype).view(shape)
    if codec == "zstd":
        item = torch.empty((), dtype=dtype).element_size()
        raw = _zstd().ZstdDecompressor().decompress(buf.tobytes(), max_output_size=numel * item)
        if len(raw) != numel * item:
            raise ValueError(f"zstd payload decodes to {len(raw)} bytes, expected {numel * item}")
        unshuffled = np.ascontiguousarray(np.frombuffer(raw, np.uint8).reshape(item, -1).T)
        return torch.from_numpy(unshuffled.reshape(-1)).view(dtype).view(shape)
    if codec == "fp8":
        two, t, h, hs = shape
        nscale = two * h * 4
        if buf.nbytes != nscale + numel:
            raise ValueError(f"fp8 payload has {buf.nbytes} bytes, expected {nscale + numel}")
        scale = torch.from_numpy(buf[:nscale].copy()).view(torch.float32).view(two, h)
        codes = torch.from_numpy(buf[nscale:].copy()).view(_FP8).view(shape)
        return (codes.float() * scale[:, None, :, None]).to(dtype)
    raise ValueError(f"unknown wire codec {codec!r}")
