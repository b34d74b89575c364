"""benchmark_network's analysis: prediction accuracy per run and per grid cell (median of reps)."""

from helpers import load_benchmark


def _row(strategy, rep, ttft_s, predicted_s, chosen=None):
    return {"bandwidth_mbit": 100, "rtt_ms": 1, "tokens": 256, "temp": "cold", "strategy": strategy,
            "rep": rep, "ttft_s": ttft_s, "predicted_s": predicted_s, "chosen": chosen or strategy,
            "prompt_key": 1, "edge_key": 2, "first_token": 7}


def test_a_slow_repetition_misses_per_run_but_not_the_cell_median():
    rows = [_row("layerwise", 0, 1.00, 1.0), _row("layerwise", 1, 1.02, 1.0),
            _row("layerwise", 2, 1.25, 1.0),  # a repetition 25% slower than the others: a miss
            _row("recompute", 0, 2.0, 1.5), _row("recompute", 1, 2.0, 1.5), _row("recompute", 2, 2.1, 1.5),
            _row("auto", 0, 1.01, 1.0, "layerwise")]
    p = load_benchmark("benchmark_network").analyse(rows)["prediction"]
    assert (p["rows"], p["within_15pct"]) == (7, 3)  # misses: the slow rep, recompute's 3 runs
    cells = p["cell_medians"]
    # layerwise: median 1.02 vs 1.0 (2%); recompute: 2.0 vs 1.5 (25%); auto: 1%
    assert (cells["cells"], cells["within_15pct"]) == (3, 2)
    assert abs(cells["max_abs_rel_err"] - 0.25) < 1e-9
