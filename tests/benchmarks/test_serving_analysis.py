"""benchmark_serving's analysis: the sustainable rate at a sweep of p99 TPOT SLOs, table and plot."""

from helpers import load_benchmark


def _report(p99_by_scheme: dict) -> dict:
    results = [{"scheme": scheme, "cloud_len": 1024, "rate": rate,
                "metrics": {"tpot_ms": {"p50": p99 / 2, "p99": p99}, "failed": 0,
                            "output_tok_per_s": 100.0 * rate, "ttft_ms": {"p50": 50, "p99": 90},
                            "itl_ms": {"p50": p99 / 2, "p99": p99}}}
               for scheme, points in p99_by_scheme.items() for rate, p99 in points]
    return {"results": results, "workload": {"tpot_slo_ms": 50.0},
            "environment": {"device": "test", "vllm": "-", "commit": "-"}}


def test_the_sweep_reads_the_target_at_every_slo(tmp_path):
    serving = load_benchmark("benchmark_serving")
    # stock's p99 TPOT rises with the rate; edgeprompt's rises later
    report = _report({"paged-pc": [(10, 12.0), (20, 18.0), (30, 40.0)],
                      "edgeprompt": [(10, 11.0), (20, 13.0), (30, 19.0)]})
    report["sustainable_by_slo"] = serving.sustainable_by_slo(report)
    at = {(s["scheme"], s["slo_p99_tpot_ms"]): s for s in report["sustainable_by_slo"]}
    assert sorted({slo for _, slo in at}) == sorted(set(serving.SLO_SWEEP_MS) | {50.0})
    # 15 ms: stock crosses between 10 and 20 req/s (12 -> 18 ms: at 15.0), edgeprompt between
    # 20 and 30 (13 -> 19 ms: at 23.3)
    assert at["paged-pc", 15.0]["interpolated"] == 15.0
    assert round(at["edgeprompt", 15.0]["interpolated"], 1) == 23.3
    assert round(at["edgeprompt", 15.0]["vs_paged_pc"], 2) == 1.56
    assert at["edgeprompt", 20.0]["censored"] and not at["paged-pc", 20.0]["censored"]
    assert at["paged-pc", 10.0]["rate"] == 0  # the lowest rate already misses 10 ms
    table = "\n".join(serving.slo_sweep_table(report))
    assert "| edgeprompt | 1024 |" in table and "23.3 (1.56x)" in table and ">=30.0" in table

    from edgeprompt_vllm.bench.plots import plot_serving

    plot_serving(report, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 0
