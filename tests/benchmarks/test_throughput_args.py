"""benchmark_throughput's engine length: the longest request by default, or --max-model-len."""

from pathlib import Path

import pytest

from helpers import load_benchmark


def test_max_model_len_default_explicit_and_too_short():
    tp = load_benchmark("benchmark_throughput")
    args = tp.parse_args(["--model", "m", "--edge-len", "512", "--output-len", "128"])
    assert tp.model_len(args, [64, 1024], 128) == 1024 + 512 + 128 + 16
    args = tp.parse_args(["--model", "m", "--max-model-len", "2704"])
    assert tp.model_len(args, [64, 1024], 128) == 2704
    with pytest.raises(SystemExit, match="too short.*needs 2705"):
        tp.model_len(args, [2048], 128 + 1)  # one token over


def test_max_model_len_reaches_the_workers():
    tp = load_benchmark("benchmark_throughput")
    args = tp.parse_args(["--model", "m", "--max-model-len", "3000"])
    cmd = tp.worker_command(args, "relay", [1024], Path("r.json"))
    assert cmd[cmd.index("--max-model-len") + 1] == "3000"
    assert "--max-model-len" not in tp.worker_command(tp.parse_args(["--model", "m"]), "relay",
                                                      [1024], Path("r.json"))


def test_lengths_past_the_model_context_become_status_rows(tmp_path):
    tp = load_benchmark("benchmark_throughput")
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    args = tp.parse_args(["--model", str(tmp_path)])  # edge 512, output 128
    too_long = tp.too_long_for_model(args, [1024, 2048, 3440, 3441, 4096])
    # 3440 + 512 + 128 + 16 spare = 4096: the engine model_len sizes fits exactly
    assert sorted(too_long) == [3441, 4096]
    assert tp.model_len(args, [3440], 128) == 4096
    assert "needs 4752 tokens of context, the model has 4096" in too_long[4096]
    assert "--max-position-embeddings" in too_long[4096]
    assert tp.too_long_for_model(tp.parse_args(["--model", "no/such/dir"]), [4096]) == {}
