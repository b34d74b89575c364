"""transport/codecs.py through wire.py: lossless codecs are bit-exact, fp8 is bounded, and the
checksum covers the encoded bytes."""

import numpy as np
import pytest
import torch

from edgeprompt_vllm.transport import codecs
from edgeprompt_vllm.transport.wire import CorruptLayer, LayerHeader, decode_layer, encode_layer



def _kv(dtype, t=64, h=2, hs=64, seed=0):
    torch.manual_seed(seed)
    k = torch.randn(t, h, hs) * torch.tensor([0.5, 4.0])[None, :, None]  # heads of other ranges
    v = torch.randn(t, h, hs)
    return k.to(dtype), v.to(dtype)


def _has_zstd() -> bool:
    try:
        import zstandard  # noqa: F401
        return True
    except ImportError:
        return False


lossless = ["none", pytest.param("zstd", marks=pytest.mark.skipif(
    not _has_zstd(), reason="the zstandard package is not installed"))]


@pytest.mark.parametrize("codec", lossless)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lossless_codecs_are_bit_exact(codec, dtype):
    k, v = _kv(dtype)
    header, raw = encode_layer("p", 2, k, v, 0.25, codec=codec)
    header = LayerHeader(**header.to_dict())  # as it travels
    assert header.codec == codec and header.payload_nbytes == raw.nbytes
    kv = decode_layer(header, raw)
    assert kv.dtype == dtype and kv.shape == (2, 64, 2, 64)
    assert torch.equal(kv[0], k) and torch.equal(kv[1], v)


@pytest.mark.skipif(not _has_zstd(), reason="the zstandard package is not installed")
def test_zstd_shrinks_kv_bytes():
    k, v = _kv(torch.float32, t=512)
    header, raw = encode_layer("p", 0, k, v, codec="zstd")
    ratio = raw.nbytes / header.nbytes
    print(f"zstd (byte-shuffled) fp32 KV: {ratio:.3f} of the raw bytes")
    assert ratio < 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_is_within_its_precision_per_head(dtype):
    k, v = _kv(dtype, t=256)
    header, raw = encode_layer("p", 1, k, v, codec="fp8")
    # 1 byte per element + one fp32 scale per (K/V, head)
    assert raw.nbytes == 2 * 256 * 2 * 64 + 2 * 2 * 4
    kv = decode_layer(header, raw)
    assert kv.dtype == dtype
    ref = torch.stack([k, v]).float()
    amax = ref.abs().amax(dim=(1, 3), keepdim=True)  # [2, 1, H, 1]
    err = (kv.float() - ref).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the value, plus subnormals near 0
    bound = ref.abs() * 2 ** -4 + amax / 448 * 2 ** -6 + (ref.abs() * 2 ** -8 if dtype != torch.float32 else 0)
    assert (err <= bound + 1e-6).all()
    # the per-head scale matters: the small head keeps its own precision
    assert err[:, :, 0].max() < err[:, :, 1].max()


@pytest.mark.parametrize("codec", lossless + ["fp8"])
def test_checksum_covers_the_encoded_bytes(codec):
    k, v = _kv(torch.float32)
    header, raw = encode_layer("p", 0, k, v, codec=codec)
    bad = raw.copy()
    bad[len(bad) // 3] ^= 0x10
    with pytest.raises(CorruptLayer, match="checksum"):
        decode_layer(header, bad)
    with pytest.raises(CorruptLayer, match="bytes"):
        decode_layer(header, raw[:-1])


def test_unknown_codec_is_refused():
    k, v = _kv(torch.float32, t=4)
    with pytest.raises(ValueError, match="unknown wire codec"):
        encode_layer("p", 0, k, v, codec="gzip")
    assert set(codecs.CODECS) == {"none", "zstd", "fp8"} and codecs.LOSSY == {"fp8"}


def test_zero_layer_encodes_under_fp8():
    z = torch.zeros(8, 2, 64)
    header, raw = encode_layer("p", 0, z, z, codec="fp8")
    assert torch.equal(decode_layer(header, raw), torch.zeros(2, 8, 2, 64))
    assert np.isfinite(np.frombuffer(raw[:16].tobytes(), np.float32)).all()
