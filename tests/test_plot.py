"""kappatune.plot: the κ heatmap (layers × module kinds) and histogram."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from kappatune.table import KappaEntry, KappaTable

matplotlib = pytest.importorskip("matplotlib")

from kappatune.plot import figure_size, kappa_grid, plot_kappa  # noqa: E402

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _llama_table(layers, inf_head=False):
    entries = [KappaEntry(f"model.layers.{i}.{k}.weight", float(2 + (7 * i + 3 * j) % 50), (8, 8), 64, "float32")
               for i in range(layers) for j, k in enumerate(KINDS)]
    entries.append(KappaEntry("model.embed_tokens.weight", 9.0, (32, 8), 256, "float32"))
    entries.append(KappaEntry("lm_head.weight", math.inf if inf_head else 11.0, (32, 8), 256, "float32"))
    return KappaTable(entries)


def _png_size(path):
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_grid_layers_kinds_and_marks():
    t = _llama_table(3)
    sel = ["model.layers.1.self_attn.v_proj.weight", "lm_head.weight"]
    g = kappa_grid(t, sel)
    assert g.rows == ["0", "1", "2", "other"]
    assert g.cols == ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "lm_head"]
    assert g.kappa[1][g.cols.index("v_proj")] == t["model.layers.1.self_attn.v_proj.weight"].kappa
    assert g.kappa[0][0] is None and g.kappa[3][0] == 9.0
    assert g.marks[1][g.cols.index("v_proj")] == 2 and g.marks[3][g.cols.index("lm_head")] == 2
    assert sum(m for row in g.marks for m in row) == 4


def test_grid_experts_mean_and_ambiguous_kinds():
    e = [KappaEntry(f"model.layers.0.mlp.experts.{x}.up_proj.weight", k, (4, 4), 16, "float32")
         for x, k in enumerate((2.0, 8.0))]
    e += [KappaEntry("h.0.attn.c_proj.weight", 3.0, (4, 4), 16, "float32"),
          KappaEntry("h.0.mlp.c_proj.weight", 5.0, (4, 4), 16, "float32")]
    g = kappa_grid(KappaTable(e), ["model.layers.0.mlp.experts.0.up_proj.weight"])
    assert g.cols == ["attn.c_proj", "mlp.c_proj", "up_proj"]
    assert g.kappa[0][2] == pytest.approx(4.0)  # geometric mean of 2 and 8
    assert g.count[0][2] == 2 and g.marks[0][2] == 1  # one of the two experts selected
    assert g.kappa[0][:2] == [3.0, 5.0]


@pytest.mark.parametrize("layers", [12, 80])
def test_png_size_and_no_global_matplotlib_state(tmp_path, layers):
    t = _llama_table(layers, inf_head=True)
    rc = matplotlib.rcParams.copy()  # (reading rcParams["backend"] could itself import pyplot)
    out = tmp_path / "k.png"
    fig = plot_kappa(t, t.select(top_fraction=0.1), out, dpi=50)
    w, h = figure_size(layers + 1, 9)
    assert tuple(fig.get_size_inches()) == pytest.approx((w, h))
    width, height = _png_size(out)
    assert abs(width - w * 50) <= 1 and abs(height - h * 50) <= 1
    assert out.stat().st_size > 5_000
    assert matplotlib.rcParams.copy() == rc  # (no pyplot: checked in a fresh process below)
    if layers == 80:
        assert h <= 20.0  # bounded height; 81 rows, every other one labelled
        ax = fig.axes[0]
        assert len(ax.get_yticks()) == 41


def test_svg_and_errors(tmp_path):
    t = _llama_table(2)
    plot_kappa(t, [], tmp_path / "k.svg", title="two layers")
    text = (tmp_path / "k.svg").read_text()
    assert "<svg" in text[:2000] and len(text) > 10_000
    with pytest.raises(ValueError, match=r"ending in \.png, \.svg, \.pdf"):
        plot_kappa(t, [], tmp_path / "k.jpeg")
    with pytest.raises(ValueError, match="empty"):
        plot_kappa(KappaTable([]), [], tmp_path / "e.png")
    with pytest.raises(ValueError, match="not in the κ table"):
        plot_kappa(t, ["nope.weight"])


# In this process pyplot may already be imported (test_cli.py, any earlier test), which would hide a
# pyplot import by the library: the promise is checked in a fresh interpreter.
_NO_PYPLOT = r"""
import json, sys
from kappatune.table import KappaEntry, KappaTable
from kappatune.plot import plot_kappa
from kappatune.cli import main
out, saved = sys.argv[1], sys.argv[2]
table = KappaTable([KappaEntry(f"model.layers.{i}.mlp.up_proj.weight", 2.0 + i, (8, 8), 64, "float32")
                    for i in range(4)])
plot_kappa(table, table.select(num_tensors=2), out + "/lib.png", dpi=30)
assert "matplotlib.pyplot" not in sys.modules, "plot_kappa imported matplotlib.pyplot"
rc = main(["plot", saved, "--num-tensors", "2", "-o", out + "/cli.svg", "--dpi", "30"])
assert rc == 0, rc
assert "matplotlib.pyplot" not in sys.modules, "kappatune plot imported matplotlib.pyplot"
assert "matplotlib.figure" in sys.modules  # it did draw, with the object-oriented API
"""


def test_library_and_cli_draw_without_pyplot(tmp_path):
    from kappatune.cli import SCAN_FORMAT

    t = _llama_table(2)
    saved = tmp_path / "table.json"
    saved.write_text(json.dumps({"format": SCAN_FORMAT, "version": 1, "source": ["tiny"],
                                 "table": t.to_dict()}))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    r = subprocess.run([sys.executable, "-c", _NO_PYPLOT, str(tmp_path), str(saved)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _png_size(tmp_path / "lib.png")[0] > 0
    assert "<svg" in (tmp_path / "cli.svg").read_text()[:2000]
