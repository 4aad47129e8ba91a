"""The shared chart style (mixq_onnx/plotting.py) and the charts drawn with it: bars centred in sparse groups,
a value label on every bar / point, y-limits that follow the data, atomic PNG writes; sweep.png, bits.png and
tools/plot_quant.py's docs/quant_accuracy.png."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mixq_onnx import plotting as P

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


def _plot_quant():
    spec = importlib.util.spec_from_file_location("plot_quant", ROOT / "tools" / "plot_quant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _bar_centres(ax) -> list[float]:
    from matplotlib.patches import Rectangle

    return sorted(round(p.get_x() + p.get_width() / 2, 9) for p in ax.patches if isinstance(p, Rectangle))


# --- pure helpers --------------------------------------------------------------------------------------------

def test_group_positions_centre_a_sparse_group():
    assert P.group_positions(3.0, 1, 0.16) == [3.0]
    two = P.group_positions(2.0, 2, 0.16)
    assert two == pytest.approx([1.92, 2.08]) and sum(two) / 2 == pytest.approx(2.0)
    five = P.group_positions(1.0, 5, 0.2)
    assert sum(five) / 5 == pytest.approx(1.0) and five[1] - five[0] == pytest.approx(0.2)


def test_methods_have_a_fixed_order_and_colour():
    assert P.order_methods(["qdrop", "mine", "rtn", "genie", "qdrop"]) == ["rtn", "qdrop", "genie", "mine"]
    assert P.method_colour("qdrop") == P.method_colour("qdrop", ["rtn", "qdrop"]) == P.METHOD_COLOURS["qdrop"]
    assert len(set(P.METHOD_COLOURS.values())) == len(P.METHOD_COLOURS)
    a, b = P.method_colour("x", ["x", "y"]), P.method_colour("y", ["x", "y"])
    assert a != b and a not in P.METHOD_COLOURS.values()


def test_value_format():
    assert P.fmt_value(-1.234) == "\u22121.2" and P.fmt_value(0.31, signed=True) == "+0.3"
    assert P.fmt_value(-0.04) == "0.0" and P.fmt_value(0.04, signed=True) == "0.0" and P.fmt_value(79.56) == "79.6"


def test_limits_follow_the_data_and_the_scale_breaks_only_for_outliers():
    lo, hi = P.data_limits([-1.2, -2.3, -0.6], include=[0.0], pad=0.1)
    assert -2.6 < lo < -2.3 and 0 < hi < 0.3
    assert P.data_limits([70, 80], lo=0, hi=100, pad=0.5) == (65.0, 85.0)
    assert P.data_limits([99.0, 99.5], lo=0, hi=100, min_span=5)[1] == 100
    assert P.split_scale([-1, -2, -3, -4, -5, -6]) is None  # evenly spread: one scale
    assert P.split_scale([-0.5, -1.2, -2.3, -6.0, -8.1, -39.6, -69.8]) == 8.1  # W2A4-like outliers
    assert P.split_scale([-1.0, -60.0]) == 1.0 and P.split_scale([-3.0]) is None


# --- saving --------------------------------------------------------------------------------------------------

def test_save_figure_is_atomic(tmp_path):
    with P.style() as plt:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        out = P.save_figure(fig, tmp_path / "a.png")
    assert out.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary sibling left
    assert not plt.get_fignums()  # closed

    # a figure that fails to render leaves the old file as it was, and nothing else
    before = out.read_bytes()
    with P.style() as plt:
        fig, _ = plt.subplots()

        def boom(*a, **k):
            raise RuntimeError("render failed")

        fig.savefig = boom
        with pytest.raises(RuntimeError):
            P.save_figure(fig, out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.png"]

    # a failed rename leaves no temporary file either
    import mixq_onnx.utils as U

    with P.style() as plt:
        fig, _ = plt.subplots()
        orig = U.os.replace
        U.os.replace = lambda *a: (_ for _ in ()).throw(OSError("disk full"))
        try:
            with pytest.raises(OSError):
                P.save_figure(fig, out)
        finally:
            U.os.replace = orig
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --- the accuracy chart (tools/plot_quant.py) ---------------------------------------------------------------

def _rows(fp: float, cells: dict[tuple[int, int, str], float], model: str = "resnet20") -> list[dict]:
    return [{"model": model, "method": m, "wbits": w, "abits": a, "top1": t, "fp_top1": fp, "symmetric": True,
             "source": "real"} for (w, a, m), t in cells.items()]


def test_quant_chart_centres_sparse_groups_labels_every_bar_and_scales_to_the_data():
    Q = _plot_quant()
    rows = _rows(80.0, {(8, 8, "rtn"): 79.9, (4, 8, "rtn"): 78.0, (4, 8, "qdrop"): 79.5,
                        (4, 4, "rtn"): 75.0, (4, 4, "brecq"): 78.8, (4, 4, "qdrop"): 78.2, (4, 4, "genie"): 78.5})
    rows += [{**rows[0], "source": "noise", "top1": 10.0}]  # not plotted: another calibration source
    data = Q.select(rows)
    assert data["resnet20"]["cells"][(8, 8)] == {"rtn": pytest.approx(-0.1)}
    with P.style() as plt:
        fig = Q.draw(data)
        (ax,) = fig.axes  # no outliers: one scale
        # W8A8 (x 0) has one bar and W4A8 (x 1) two: each group centred on its tick
        width = Q.GROUP_WIDTH / 4
        assert _bar_centres(ax) == pytest.approx(sorted(
            [0.0, 1 - width / 2, 1 + width / 2] + P.group_positions(2, 4, width)))
        labels = _texts(ax)
        for v in (-0.1, -2.0, -0.5, -5.0, -1.2, -1.8, -1.5):
            assert P.fmt_value(v, signed=True) in labels
        assert len(labels) == 7
        lo, hi = ax.get_ylim()
        assert -7 < lo < -5 and 0 < hi < 1.5  # follows the data, not 0-90
        assert "80.00" in ax.get_title(loc="left")  # FP top-1 in the title
        plt.close(fig)


def test_quant_chart_breaks_the_scale_for_outliers_and_still_labels_every_bar():
    Q = _plot_quant()
    rows = _rows(81.0, {(4, 4, "rtn"): 75.0, (4, 4, "brecq"): 79.8, (4, 4, "qdrop"): 79.2,
                        (2, 4, "rtn"): 11.2, (2, 4, "qdrop"): 73.5})
    rows += _rows(76.0, {(4, 4, "rtn"): 64.0, (4, 4, "qdrop"): 75.2, (2, 4, "qdrop"): 40.0}, model="resnet8")
    with P.style() as plt:
        fig = Q.draw(Q.select(rows))
        assert len(fig.axes) == 4  # two models, each a fine and a coarse scale
        fine, coarse = fig.axes[0], fig.axes[1]
        assert fine.get_ylim()[0] > -15 and coarse.get_ylim()[0] < -69.8 and coarse.get_ylim()[1] <= -12
        # 0.6 pp between brecq and qdrop at W4A4 spans several pixels on the fine scale
        fig.canvas.draw()
        lo, hi = fine.get_ylim()
        assert 0.5 * fine.get_window_extent().height / (hi - lo) >= 5
        assert sorted(_texts(fine) + _texts(coarse)) == sorted(
            P.fmt_value(v, signed=True) for v in (-6.0, -1.2, -1.8, -69.8, -7.5))
        assert "\u221269.8" in _texts(coarse)
        # methods keep their colours in every panel
        from matplotlib.colors import to_hex

        colours = {to_hex(p.get_facecolor()) for ax in fig.axes for p in ax.patches}
        assert colours == {P.METHOD_COLOURS["rtn"], P.METHOD_COLOURS["brecq"], P.METHOD_COLOURS["qdrop"]}
        plt.close(fig)


def test_plot_quant_main_writes_the_png_atomically(tmp_path):
    Q = _plot_quant()
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({str(i): r for i, r in enumerate(_rows(80.0, {(4, 4, "rtn"): 70.0,
                                                                           (4, 4, "qdrop"): 78.0}))}))
    (tmp_path / "out").mkdir()
    Q.main(["--json", str(src), "--out", str(tmp_path / "out" / "q.png"), "--no-doc"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["q.png"]
    assert (tmp_path / "out" / "q.png").read_bytes()[:8] == PNG


# --- sweep.png and bits.png ----------------------------------------------------------------------------------

def _capture(monkeypatch, name: str) -> list:
    figs: list = []
    orig = getattr(P, name)

    def keep(fig, *a, **k):
        figs.append(fig)
        fig.canvas.draw()
        texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]
        lims = [ax.get_ylim() for ax in fig.axes]
        figs[-1] = (texts, lims, [ax for ax in fig.axes])
        return orig(fig, *a, **k)

    monkeypatch.setattr(P, name, keep)
    return figs


def test_plot_sweep_writes_a_labelled_png_in_the_method_colours(tmp_path, monkeypatch):
    from mixq_onnx.sweep import plot_sweep

    cells = [{"label": lab, "method": m, "bits": b, "seed": s, "top1": t + s * 0.4, "n": 100}
             for lab, off in (("original", 0.0), ("robust", 3.0))
             for m, b, t in (("rtn", "W4A4", 70.0 + off), ("rtn", "W2A4", 40.0 + off), ("qdrop", "W4A4", 75.0 + off),
                             ("qdrop", "W2A4", 60.0 + off))
             for s in (0, 1)]
    cells += [{"label": lab, "method": "fp", "bits": "FP", "seed": 0, "top1": 80.0, "n": 100}
              for lab in ("original", "robust")]
    doc = {"config": {"bits": ["W4A4", "W2A4"], "methods": ["qdrop", "rtn"], "seeds": [0, 1]},
           "models": [{"label": "original"}, {"label": "robust"}], "cells": cells}
    seen = _capture(monkeypatch, "save_figure")
    out = plot_sweep(doc, tmp_path / "sweep.png")
    assert out == tmp_path / "sweep.png" and out.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    texts, lims, axes = seen[0]
    assert len(axes) == 2  # one panel per checkpoint
    assert sorted(texts[0]) == sorted(["70.2", "40.2", "75.2", "60.2"])  # every point: mean over the seeds
    assert sorted(texts[1]) == sorted(["73.2", "43.2", "78.2", "63.2"])
    lo, hi = lims[0]
    assert 30 < lo < 40 and 80 < hi < 90  # follows the data (and FP), not 0-100
    from matplotlib.colors import to_hex

    line_colours = {to_hex(line.get_color()) for line in axes[0].lines if line.get_marker() == "o"}
    assert line_colours == {P.METHOD_COLOURS["rtn"], P.METHOD_COLOURS["qdrop"]}


def test_plot_bits_is_a_labelled_png(monkeypatch):
    from mixq_onnx.qat.report import plot_bits

    rep = {"method": "nipq", "achieved": {"weight_bits": 4.0, "act_bits": 4.5, "gbops": 0.1},
           "quantizers": [{"name": "w0", "kind": "weight", "bits": 8, "learned_bits": 7.8, "placement": "weight"},
                          {"name": "a0", "kind": "act", "bits": 4, "learned_bits": 4.3, "placement": "input"},
                          {"name": "w1", "kind": "weight", "bits": 3, "learned_bits": 3.2, "placement": "weight"},
                          {"name": "r0", "kind": "act", "bits": 5, "learned_bits": 5.1, "placement": "residual"}],
           "layers": [{"name": "conv0", "weight": "w0", "input": None}, {"name": "fc", "weight": "w1", "input": "a0"}]}
    seen = _capture(monkeypatch, "figure_bytes")
    png = plot_bits(rep)
    assert png[:8] == PNG
    texts, lims, _ = seen[0]
    assert sorted(texts[0]) == ["3", "4", "5", "8"]  # every non-empty bar
    assert lims[0] == (0, pytest.approx(9.5))
