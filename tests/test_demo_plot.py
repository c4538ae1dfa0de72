"""The demo's plot says what was run and keeps its legends off the data."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from fedledger._demo import report_figure, write_plot

REPORT = {
    "dataset": "breast_cancer", "model": "mlp", "aggregation": "trimmed_mean",
    "codec": "int8", "devices": 3, "alpha": 0.5, "seed": 7, "centralized_accuracy": 0.96,
    "rounds": [
        {"round": r, "accuracy": 0.9 + r / 100, "clinical": {"balanced_accuracy": 0.88}}
        for r in range(4)
    ],
    "device_labels": {"device-01": [10, 90], "device-02": [60, 5], "device-03": [30, 30]},
    "privacy": None,
}  # fmt: skip


def test_the_title_names_the_data_set_model_rule_and_codec():
    fig = report_figure(REPORT)
    try:
        title = fig._suptitle.get_text()
        for word in ("breast_cancer", "mlp", "trimmed_mean", "int8", "3 devices", "α=0.5"):
            assert word in title, title
    finally:
        plt.close(fig)


def test_two_panels_and_legends_below_the_axes():
    fig = report_figure(REPORT)
    try:
        curves, split = fig.axes[:2]
        # accuracy and balanced accuracy per round, rounds numbered from 0 as in the ledger
        assert [list(line.get_xdata()) for line in curves.get_lines()[:2]] == [[0, 1, 2, 3]] * 2
        # one bar per device and class, as long as the device's samples of that class
        widths = sorted(round(p.get_width()) for p in split.patches)
        assert widths == sorted([10, 90, 60, 5, 30, 30])
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for axes in (curves, split):
            legend = axes.get_legend()
            assert legend is not None
            box = legend.get_window_extent(renderer)
            assert box.y1 <= axes.get_window_extent(renderer).y0, "the legend covers the data"
    finally:
        plt.close(fig)


def test_write_plot_writes_a_png(tmp_path):
    path = write_plot(REPORT, tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
