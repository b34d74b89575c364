"""edgeprompt-make-model: deterministic, validated, a working tokenizer and chat template."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from edgeprompt_vllm.models.make_model import make_model, read_manifest
from edgeprompt_vllm.models.presets import load_preset, preset_names
from edgeprompt_vllm.models.weights import llama_weight_shapes


def test_same_seed_same_checksum_other_seed_other_weights(tmp_path):
    a = make_model("tiny-llama", tmp_path / "a")
    b = make_model("tiny-llama", tmp_path / "b")
    c = make_model("tiny-llama", tmp_path / "c", seed=1)
    assert a["checksum"] == b["checksum"]
    assert a["files"] == b["files"]
    assert c["files"]["model.safetensors"] != a["files"]["model.safetensors"]
    assert c["files"]["tokenizer.json"] == a["files"]["tokenizer.json"]


def test_console_script_is_deterministic(tmp_path):
    exe = [sys.executable, "-m", "edgeprompt_vllm.models.make_model", "tiny-llama"]
    sums = []
    for d in ("x", "y"):
        out = subprocess.run([*exe, "--out", str(tmp_path / d)], capture_output=True, text=True, check=True)
        sums.append(out.stdout.split("checksum ")[1].strip())
    assert sums[0] == sums[1] and len(sums[0]) == 64


def test_corrupted_model_is_rebuilt(tmp_path):
    first = make_model("tiny-llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = make_model("tiny-llama", tmp_path)
    assert again["checksum"] == first["checksum"]
    assert read_manifest(tmp_path)["files"]["model.safetensors"] == first["files"]["model.safetensors"]


def test_tiny_llama_shapes_and_config(tiny_model):
    preset = load_preset("tiny-llama")
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}
    assert got == dict(llama_weight_shapes(cfg, preset.vocab_size))


def test_tokenizer_round_trips_and_chat_template_gives_stable_system_prefix(tiny_model):
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert len(tok) == load_preset("tiny-llama").vocab_size
    text = "Ünïcode, emoji 🚀 and code: `x = f(1)`\n\ttabs"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    system = {"role": "system", "content": "You are a careful assistant."}
    prefix = tok.apply_chat_template([system], tokenize=True, return_dict=False)
    for user in ("Hi!", "What is 2+2?", " leading space"):
        full = tok.apply_chat_template([system, {"role": "user", "content": user}],
                                       tokenize=True, add_generation_prompt=True, return_dict=False)
        assert full[: len(prefix)] == prefix
        assert tok.decode(full).endswith("<|assistant|>\n")


def test_llama_2_7b_preset_is_the_paper_shape_without_weights():
    preset = load_preset("llama-2-7b")
    cfg = preset.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (32, 4096, 32)
    assert cfg["intermediate_size"] == 11008 and preset.head_size == 128
    assert preset.vocab_size == 32000 and preset.weights == "none"


@pytest.mark.slow
def test_llama_2_7b_builds_config_and_32k_tokenizer(tmp_path):
    manifest = make_model("llama-2-7b", tmp_path)
    assert "model.safetensors" not in manifest["files"]
    assert len(AutoTokenizer.from_pretrained(str(tmp_path))) == 32000


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'nope'; known: .*tiny-llama"):
        make_model("nope", tmp_path)
    out = subprocess.run([sys.executable, "-m", "edgeprompt_vllm.models.make_model", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model preset" in out.stderr
    assert set(preset_names()) >= {"tiny-llama", "llama-2-7b"}


def test_context_override_is_written_recorded_and_rebuilt_when_changed(tmp_path):
    """A longer context (e.g. the Llama-2-7b shape for 4096-token cloud prompts): the config says
    it, the manifest records it, and a model of another context in its folder is rebuilt."""
    base = make_model("tiny-llama", tmp_path)
    preset_context = load_preset("tiny-llama").config["max_position_embeddings"]
    longer = make_model("tiny-llama", tmp_path, max_position_embeddings=2 * preset_context)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_position_embeddings"] == 2 * preset_context
    assert longer["overrides"] == {"max_position_embeddings": 2 * preset_context}
    assert longer["checksum"] != base["checksum"]
    assert make_model("tiny-llama", tmp_path, max_position_embeddings=2 * preset_context) == longer
    with pytest.raises(ValueError, match="positive"):
        make_model("tiny-llama", tmp_path, max_position_embeddings=0)
