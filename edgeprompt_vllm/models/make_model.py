"""`edgeprompt-make-model PRESET`: write a deterministic model directory for a preset.

The directory holds config.json, generation_config.json, the trained tokenizer (with chat
template), model.safetensors for presets with weights, and edgeprompt-model.json: the preset,
the seed, and the sha256 of every file plus one checksum over all of them. The same preset and
seed give the same checksum on every machine.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from edgeprompt_vllm.models.presets import chat_template, load_preset, preset_names
from edgeprompt_vllm.models.tokenizer import BOS, EOS, PAD, train_tokenizer
from edgeprompt_vllm.models.weights import write_random_weights

MANIFEST = "edgeprompt-model.json"


def default_model_dir(name: str) -> Path:
    home = Path(os.environ.get("EDGEPROMPT_HOME", Path.home() / ".cache" / "edgeprompt"))
    return home / "models" / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _files_checksum(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}:{files[n]}\n" for n in sorted(files)).encode()).hexdigest()


def read_manifest(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def make_model(name: str, out_dir: Path, seed: int | None = None, force: bool = False,
               max_position_embeddings: int | None = None) -> dict:
    """Builds (or reuses, when its manifest matches) the model directory; returns the manifest.
    `max_position_embeddings` overrides the preset's context (e.g. the Llama-2-7b shape at 8192
    tokens for 4096-token cloud prompts; RoPE needs no weights for it)."""
    preset = load_preset(name)
    seed = preset.seed if seed is None else seed
    out_dir = Path(out_dir)
    overrides = {}
    if max_position_embeddings is not None:
        if max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
        overrides["max_position_embeddings"] = max_position_embeddings
    old = read_manifest(out_dir)
    if (old and not force and old["preset"] == name and old["seed"] == seed
            and old.get("overrides", {}) == overrides and _intact(out_dir, old)):
        return old
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", MANIFEST):
        (out_dir / stale).unlink(missing_ok=True)

    t0 = time.time()
    train_tokenizer(preset.vocab_size, preset.train_chars, chat_template(), out_dir)
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    # `dtype` is the transformers 5 name of `torch_dtype`; write both for every reader.
    config = dict(preset.config, dtype=preset.config["torch_dtype"], vocab_size=preset.vocab_size,
                  bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], **overrides)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]})
    if preset.weights == "random":
        write_random_weights(config, preset.vocab_size, seed, preset.init_std,
                             out_dir / "model.safetensors")

    files = {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"preset": name, "seed": seed, "overrides": overrides, "weights": preset.weights,
                "files": files,
                "checksum": _files_checksum(files), "build_seconds": round(time.time() - t0, 1)}
    _write_json(out_dir / MANIFEST, manifest)
    return manifest


def _intact(model_dir: Path, manifest: dict) -> bool:
    present = {p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST}
    return present == set(manifest["files"]) and all(
        _sha256(model_dir / n) == h for n, h in manifest["files"].items())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="edgeprompt-make-model", description=__doc__.split("\n")[0])
    parser.add_argument("preset", help=f"one of: {', '.join(preset_names())}")
    parser.add_argument("--out", type=Path, help="output directory (default: ~/.cache/edgeprompt/models/PRESET, "
                        "or $EDGEPROMPT_HOME/models/PRESET)")
    parser.add_argument("--seed", type=int, help="weight seed (default: the preset's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an intact model is there")
    parser.add_argument("--max-position-embeddings", type=int,
                        help="the model's context in tokens (default: the preset's)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        out = args.out or default_model_dir(args.preset)
        print(f"building {args.preset} in {out} ...", file=sys.stderr, flush=True)
        manifest = make_model(args.preset, out, seed=args.seed, force=args.force,
                              max_position_embeddings=args.max_position_embeddings)
    except ValueError as e:
        print(f"edgeprompt-make-model: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}\nchecksum {manifest['checksum']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
