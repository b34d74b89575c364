"""PNG plots of the benchmark JSONs (matplotlib, Agg: no display needed)."""

from pathlib import Path

LABELS = {
    "paged": "stock vLLM, no prefix caching",
    "paged-pc": "stock vLLM + prefix caching",
    "cascade": "vLLM cascade",
    "relay": "RelayAttention mode (relay, local prefill)",
    "edgeprompt": "EdgePrompt (cloud actor + relay)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: dict, what: str) -> str:
    env = report["environment"]
    return f"{what}\n{env['device']}, vLLM {env['vllm']}, commit {env['commit']}"


def plot_throughput(report: dict, path: Path) -> None:
    """Output tok/s (steady-state pass) versus cloud prompt length; see draw_throughput."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_throughput(ax, [r for r in report["results"] if r.get("output_tok_per_s")])
    w = report["workload"]
    ax.set_title(
        _title(
            report, f"offline throughput: {w['num_requests']} requests, edge prompt {w['edge_len']}"
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_throughput(ax, rows: list[dict]) -> None:
    """One line per scheme over the cloud prompt lengths; with a single length, one labelled bar
    per scheme (a line of one point says little)."""
    lens = sorted({r["cloud_len"] for r in rows})
    if len(lens) == 1:
        names = [LABELS.get(r["scheme"], r["scheme"]) for r in rows]
        bars = ax.barh(names, [r["output_tok_per_s"] for r in rows], color="tab:blue")
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=3)
        ax.invert_yaxis()
        ax.set_xlabel(f"output tokens / s (cloud prompt {lens[0]} tokens)")
        ax.margins(x=0.12)
        return
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        pts = sorted((r["cloud_len"], r["output_tok_per_s"]) for r in rows if r["scheme"] == scheme)
        ax.plot(*zip(*pts), marker="o", label=LABELS.get(scheme, scheme))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [str(x) for x in lens])
    ax.set_xlabel("cloud prompt length (tokens)")
    ax.set_ylabel("output tokens / s")
    ax.legend(fontsize=8)


def plot_serving(report: dict, path: Path) -> None:
    """Per cloud prompt length (rows): output tok/s, p99 TPOT, p99 TTFT, p50 ITL versus rate,
    and (with report["sustainable_by_slo"]) the sustainable rate versus the p99 TPOT SLO."""
    plt = _plt()
    rows = [r for r in report["results"] if "metrics" in r]
    lens = sorted({r["cloud_len"] for r in rows}) or [0]
    panels = [
        ("output_tok_per_s", None, "output tokens / s"),
        ("tpot_ms", "p99", "p99 TPOT (ms)"),
        ("ttft_ms", "p99", "p99 TTFT (ms)"),
        ("itl_ms", "p50", "p50 ITL (ms)"),
    ]
    sweep = report.get("sustainable_by_slo") or []
    fig, axes = plt.subplots(
        len(lens), len(panels) + bool(sweep), figsize=(4.2 * (len(panels) + bool(sweep)), 3.4 * len(lens)),
        squeeze=False
    )
    slo = report["workload"].get("tpot_slo_ms")
    for i, cl in enumerate(lens):
        for j, (key, stat, label) in enumerate(panels):
            ax = axes[i][j]
            for scheme in dict.fromkeys(r["scheme"] for r in rows):
                pts = sorted(
                    (r["rate"], r["metrics"][key] if stat is None else r["metrics"][key][stat])
                    for r in rows
                    if r["scheme"] == scheme and r["cloud_len"] == cl
                )
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS.get(scheme, scheme))
            if key == "tpot_ms" and slo:
                ax.axhline(slo, color="grey", ls="--", lw=1, label=f"SLO {slo:g} ms")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(label)
            ax.set_title(f"cloud prompt {cl} tokens", fontsize=9)
            ax.grid(alpha=0.3)
        if sweep:
            _plot_slo_sweep(axes[i][len(panels)], [s for s in sweep if s["cloud_len"] == cl], cl)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(report, "interactive serving, Poisson arrivals"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_slo_sweep(ax, sweep: list[dict], cloud_len: int) -> None:
    """Sustainable rate (interpolated) versus p99 TPOT SLO per scheme; hollow markers: every
    rate tried passed (a lower bound); dashed: 1.4x paged-pc's (the interactive target)."""
    for scheme in dict.fromkeys(s["scheme"] for s in sweep):
        pts = sorted((s["slo_p99_tpot_ms"], s["interpolated"], s["censored"])
                     for s in sweep if s["scheme"] == scheme)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=LABELS.get(scheme, scheme))
        for x, y, censored in pts:
            ax.plot(x, y, marker="o", color=line.get_color(),
                    markerfacecolor="none" if censored else line.get_color())
        if scheme == "paged-pc":
            ax.plot([p[0] for p in pts], [1.4 * p[1] for p in pts], ls="--", lw=1,
                    color=line.get_color(), label="1.4x paged-pc")
    ax.set_xlabel("p99 TPOT SLO (ms)")
    ax.set_ylabel("sustainable rate (req/s)")
    ax.set_title(f"cloud prompt {cloud_len} tokens", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
