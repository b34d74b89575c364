"""benchmark_throughput's plot: lines over cloud prompt lengths, labelled bars for one length."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgeprompt_vllm.bench.plots import LABELS, draw_throughput  # noqa: E402


def _rows(lens):
    return [{"scheme": s, "cloud_len": cl, "output_tok_per_s": 1000.0 * (i + 1) + cl}
            for i, s in enumerate(("paged-pc", "edgeprompt")) for cl in lens]


def test_one_length_draws_a_labelled_bar_per_scheme():
    fig, ax = plt.subplots()
    draw_throughput(ax, _rows([1024]))
    assert [t.get_text() for t in ax.get_yticklabels()] == [LABELS["paged-pc"],
                                                            LABELS["edgeprompt"]]
    assert [round(p.get_width()) for p in ax.patches] == [2024, 3024]
    assert [t.get_text() for t in ax.texts] == ["2024", "3024"] and not ax.lines
    plt.close(fig)


def test_several_lengths_draw_a_line_per_scheme():
    fig, ax = plt.subplots()
    draw_throughput(ax, _rows([64, 1024]))
    assert [list(line.get_xdata()) for line in ax.lines] == [[64, 1024], [64, 1024]]
    assert [list(line.get_ydata()) for line in ax.lines][1] == [2064.0, 3024.0]
    assert not ax.patches
    plt.close(fig)
