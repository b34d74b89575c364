"""transport/wire.py: the per-layer wire format and its checksum; fingerprint.py."""

import dataclasses

import numpy as np
import pytest
import torch

from edgeprompt_vllm.fingerprint import FingerprintMismatch, model_fingerprint
from edgeprompt_vllm.transport.wire import CorruptLayer, LayerHeader, decode_layer, encode_layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(dtype):
    torch.manual_seed(0)
    k, v = torch.randn(2, 37, 2, 64, dtype=dtype).unbind(0)  # [T, H, hs] each
    header, raw = encode_layer("p", 3, k, v, compute_s=0.5)
    assert raw.dtype == np.uint8 and raw.nbytes == header.nbytes
    kv = decode_layer(LayerHeader(**header.to_dict()), raw)
    assert kv.shape == (2, 37, 2, 64) and kv.dtype == dtype
    assert torch.equal(kv[0], k) and torch.equal(kv[1], v)


def test_one_flipped_byte_or_truncation_is_detected():
    k, v = torch.randn(2, 32, 2, 64).unbind(0)
    header, raw = encode_layer("p", 0, k, v)
    bad = raw.copy()
    bad[12345] ^= 1
    with pytest.raises(CorruptLayer, match="checksum"):
        decode_layer(header, bad)
    with pytest.raises(CorruptLayer, match="bytes"):
        decode_layer(header, raw[:-4])


def test_fingerprint_differences_are_named(tiny_model):
    a = model_fingerprint(tiny_model, "float32", 32)
    assert a == model_fingerprint(tiny_model, "torch.float32", 32) and len(a.digest()) == 32
    b = dataclasses.replace(a, block_size=64, weights="0" * 64)
    assert [d.split(":")[0] for d in a.diff(b)] == ["block_size", "weights"]
    with pytest.raises(FingerprintMismatch, match="block_size: 32 != 64"):
        a.check_same(b)
    assert model_fingerprint(tiny_model, "bfloat16", 32).digest() != a.digest()
    assert a.quantization == "none"
    with pytest.raises(FingerprintMismatch, match="quantization: 'none' != 'fp8'"):
        a.check_same(model_fingerprint(tiny_model, "float32", 32, quantization="fp8"))
