"""Pictures of a κ table: a heatmap by layer × module kind, and a histogram of log κ.

The heatmap has one row per layer index (:func:`kappatune.refs.layer_index`) and one column
per module kind (:func:`kappatune.refs.module_kind`: ``q_proj``, ``up_proj``, … whatever the
model calls them), coloured by κ on a log scale. Tensors without a layer index (embeddings, the
output head) share a last row, ``other``. A cell that holds several tensors (the experts of a
mixture-of-experts layer, say) shows their geometric mean. When one kind appears under several
parents in the same layer (``attn.c_proj`` and ``mlp.c_proj``), the columns are named with the
parent. Selected tensors get a red frame (dashed: only some of the cell's tensors).
Rank-deficient tensors (κ = ∞) are drawn in black.

matplotlib is imported only when a picture is made, through its object-oriented API: no pyplot, no
backend switch, no change to ``rcParams``.

Example::

    >>> from kappatune.plot import plot_kappa
    >>> plot_kappa(table, table.select(top_fraction=0.1), "kappa.png")
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from .refs import module_kind
from .table import KappaTable

__all__ = ["plot_kappa"]

_INT = re.compile(r"^\d+$")
# Familiar kinds in the order they run through a transformer block; others follow alphabetically.
_ORDER = [
    "embed_tokens", "wte", "wpe", "word_embeddings", "embeddings",
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value", "c_attn", "Wqkv",
    "o_proj", "out_proj", "dense", "c_proj",
    "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "c_fc", "fc1", "dense_h_to_4h",
    "down_proj", "w2", "fc2", "dense_4h_to_h",
    "lm_head",
]
_FORMATS = ("png", "svg", "pdf")
OTHER_ROW = "other"


class KappaGrid:
    """The heatmap data: ``rows`` (labels), ``cols`` (kinds), ``kappa[r][c]`` (geometric mean, or
    ``None`` for an empty cell), ``marks[r][c]`` (0: none, 1: some selected, 2: all selected) and
    ``count[r][c]`` (tensors in the cell)."""

    def __init__(self, rows: List[str], cols: List[str], kappa: List[List[Optional[float]]],
                 marks: List[List[int]], count: List[List[int]]) -> None:
        self.rows, self.cols, self.kappa, self.marks, self.count = rows, cols, kappa, marks, count


def _parent(name: str) -> str:
    parts = [p for p in name.split(".") if not _INT.match(p)]
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-2] if len(parts) > 1 else ""


def _kind_key(kind: str) -> Tuple[int, str]:
    base = kind.rsplit(".", 1)[-1]
    return (_ORDER.index(base) if base in _ORDER else len(_ORDER), kind)


def kappa_grid(table: KappaTable, selected: Iterable[str] = ()) -> KappaGrid:
    """Arrange ``table`` as layers × module kinds (see the module docstring)."""
    sel = set(selected)
    kinds = {e.name: module_kind(e.name) for e in table}
    # Refine a kind by its parent module where one layer holds it under several parents.
    parents: Dict[Tuple[Optional[int], str], set] = {}
    for e in table:
        parents.setdefault((e.layer, kinds[e.name]), set()).add(_parent(e.name))
    ambiguous = {k for (_, k), ps in parents.items() if len(ps) > 1}
    col_of = {e.name: (f"{_parent(e.name)}.{kinds[e.name]}" if kinds[e.name] in ambiguous and _parent(e.name)
                       else kinds[e.name]) for e in table}
    cols = sorted(set(col_of.values()), key=_kind_key)
    layers = sorted({e.layer for e in table if e.layer is not None})
    rows = [str(i) for i in layers] + ([OTHER_ROW] if any(e.layer is None for e in table) else [])
    r_of = {str(i): r for r, i in enumerate(layers)}
    c_of = {c: i for i, c in enumerate(cols)}
    logs: List[List[List[float]]] = [[[] for _ in cols] for _ in rows]
    nsel = [[0] * len(cols) for _ in rows]
    for e in table:
        r = r_of[str(e.layer)] if e.layer is not None else len(rows) - 1
        c = c_of[col_of[e.name]]
        logs[r][c].append(e.kappa)
        nsel[r][c] += e.name in sel
    kappa = [[(None if not v else v[0] if len(v) == 1 else _geomean(v)) for v in row] for row in logs]
    count = [[len(v) for v in row] for row in logs]
    marks = [[0 if n == 0 else (2 if n == count[r][c] else 1) for c, n in enumerate(row)]
             for r, row in enumerate(nsel)]
    return KappaGrid(rows, cols, kappa, marks, count)


def _geomean(values: List[float]) -> float:
    if any(v == 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))  # inf stays inf


def figure_size(n_rows: int, n_cols: int) -> Tuple[float, float]:
    """Figure size in inches for a heatmap of ``n_rows`` layers and ``n_cols`` kinds.

    The height grows with the layers (about 0.22 in per row, 4.5 in at least, 20 in at most); the
    width with the kinds, plus 4.5 in for the histogram.
    """
    heat_w = max(3.5, 1.9 + 0.55 * n_cols)
    height = min(20.0, max(4.5, 1.8 + 0.22 * n_rows))
    return round(heat_w + 4.6, 2), round(height, 2)


def image_format(path: Union[str, "os.PathLike[str]"]) -> str:
    """The image format of an output path by its suffix (``png``, ``pdf``, ``svg``, …).

    Raises:
        ValueError: a suffix matplotlib cannot write, naming the path and the accepted suffixes.
    """
    fmt = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"cannot tell the image format from {os.fspath(path)!r}: use a file name ending in "
                         + ", ".join("." + f for f in _FORMATS))
    return fmt


def _short(x: float) -> str:
    if math.isinf(x):
        return "∞"
    if x >= 1e4:
        return f"{x:.0e}".replace("e+0", "e").replace("e+", "e")
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def plot_kappa(
    table: KappaTable,
    selected: Iterable[str] = (),
    path: Union[None, str, "os.PathLike[str]"] = None,
    *,
    title: Optional[str] = None,
    dpi: int = 100,
) -> Any:
    """Draw the κ heatmap and histogram; save to ``path`` (format from its suffix) if given.

    Returns the ``matplotlib.figure.Figure``. The image is ``figure_size(...)`` inches at ``dpi``.
    A heatmap cell holding tensors :math:`t_1, \\dots, t_k` shows their geometric mean
    :math:`(\\prod_i \\kappa_{t_i})^{1/k}`; the histogram counts :math:`\\log_{10} \\kappa` of the
    finite κ.

    Args:
        table (KappaTable): the κ table to draw (not empty).
        selected (Iterable[str], optional): names in ``table`` to frame in red and stack in red on
            the histogram. Default: ``()`` (none).
        path (str or os.PathLike, optional): where to save the image; its suffix (``.png``,
            ``.pdf``, ``.svg``, …) gives the format. Default: ``None`` (not saved).
        title (str, optional): a title above the figure. Default: ``None``.
        dpi (int, optional): dots per inch, from 20 to 1200. Default: ``100``.

    Raises:
        ValueError: an empty table, a ``dpi`` out of range, a suffix matplotlib cannot write, or a
            selected name not in ``table``.
        ImportError: matplotlib not installed.

    Example::

        >>> plot_kappa(table, names, "kappa.svg", title="SmolLM2-135M")
    """
    if len(table) == 0:
        raise ValueError("the κ table is empty: nothing to plot (check the scan filters)")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 20 <= dpi <= 1200:
        raise ValueError(f"dpi must be an int in [20, 1200], got {dpi!r}")
    fmt = image_format(path) if path is not None else None
    sel = [n for n in selected]
    unknown = [n for n in sel if n not in table]
    if unknown:
        raise ValueError(f"{len(unknown)} selected name(s) are not in the κ table: {unknown[:3]}")
    try:
        import matplotlib
        import numpy as np
        from matplotlib import colors
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or kappatune[plot])") from None

    grid = kappa_grid(table, sel)
    nr, nc = len(grid.rows), len(grid.cols)
    w, h = figure_size(nr, nc)
    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    heat_w = w - 4.6
    hist_h = min(h / 2, 4.0)
    gs = fig.add_gridspec(2, 2, width_ratios=[heat_w, 4.6 - 0.2], height_ratios=[hist_h, h - hist_h])
    ax = fig.add_subplot(gs[:, 0])

    vals = np.array([[np.nan if v is None else v for v in row] for row in grid.kappa], dtype=float)
    finite = vals[np.isfinite(vals) & (vals > 0)]
    lo = float(finite.min()) if finite.size else 1.0
    hi = float(finite.max()) if finite.size else 10.0
    if hi <= lo:
        hi = lo * 1.01
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6", over="black")
    shown = np.ma.masked_invalid(np.where(np.isinf(vals), hi * 10, vals))
    norm = colors.LogNorm(vmin=lo, vmax=hi)
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    has_inf = bool(np.isinf(vals).any())
    cb = fig.colorbar(im, ax=ax, extend="max" if has_inf else "neither", fraction=0.06, pad=0.02)
    cb.set_label("κ (log scale)" + ("; black: ∞" if has_inf else ""))

    ax.set_xticks(range(nc), labels=grid.cols, rotation=45, ha="right", rotation_mode="anchor")
    step = max(1, math.ceil(nr / 45))
    ticks = [i for i in range(nr) if i % step == 0 or grid.rows[i] == OTHER_ROW]
    ax.set_yticks(ticks, labels=[grid.rows[i] for i in ticks])
    ax.set_ylabel("layer")
    ax.set_xlabel("module kind")
    ax.set_xticks(np.arange(-0.5, nc, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, nr, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)

    # κ in the cells when they are big enough to read.
    cell_h_pt = (h - 1.8) * 72 / max(nr, 1)
    if nr <= 40 and nc <= 14 and cell_h_pt >= 9:
        fs = max(5.0, min(8.0, cell_h_pt * 0.5))
        for r in range(nr):
            for c in range(nc):
                v = grid.kappa[r][c]
                if v is None:
                    continue
                dark = math.isinf(v) or norm(min(v, hi)) < 0.6
                ax.text(c, r, _short(v), ha="center", va="center", fontsize=fs,
                        color="white" if dark else "black")
    # Selected cells get a red frame (dashed: only some of the cell's tensors are selected).
    lw = max(1.0, min(2.2, cell_h_pt / 8))
    for r in range(nr):
        for c in range(nc):
            if grid.marks[r][c]:
                ax.add_patch(Rectangle((c - 0.44, r - 0.42), 0.88, 0.84, fill=False, edgecolor="#ff2020",
                                       linewidth=lw, linestyle="-" if grid.marks[r][c] == 2 else "--", zorder=3))
    ax.set_title("κ by layer and module kind", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)

    # Histogram of log10 κ, selected stacked on the rest.
    hx = fig.add_subplot(gs[0, 1])
    selset = set(sel)
    fin = [(math.log10(e.kappa), e.name in selset) for e in table if math.isfinite(e.kappa) and e.kappa > 0]
    n_inf = sum(1 for e in table if not math.isfinite(e.kappa))
    if fin:
        allv = [v for v, _ in fin]
        lo10, hi10 = min(allv), max(allv)
        if hi10 - lo10 < 1e-9:
            lo10, hi10 = lo10 - 0.5, hi10 + 0.5
        bins = np.linspace(lo10, hi10, max(10, min(40, int(2 * math.sqrt(len(allv))))) + 1)
        hx.hist([[v for v, s in fin if not s], [v for v, s in fin if s]], bins=bins, stacked=True,
                color=["#9a9a9a", "#d62728"], label=["not selected", "selected"])
    hx.set_xlabel("log10 κ")
    hx.set_ylabel("tensors")
    hx.set_title("distribution of κ" + (f" ({n_inf} with κ = ∞ not shown)" if n_inf else ""), fontsize=10)
    if sel:
        hx.legend(fontsize=8, frameon=False)

    # Summary text.
    tx = fig.add_subplot(gs[1, 1])
    tx.axis("off")
    sel_numel = sum(table[n].numel for n in sel)
    kap = sorted(e.kappa for e in table)
    med = kap[len(kap) // 2] if len(kap) % 2 else math.sqrt(kap[len(kap) // 2 - 1] * kap[len(kap) // 2])
    lines = [
        f"{len(table)} tensors, {table.total_numel:,} parameters",
        f"κ: lowest {_short(kap[0])}, median {_short(med)}, highest {_short(kap[-1])}",
    ]
    if sel:
        lines.append(f"selected: {len(sel)} tensors, {sel_numel:,} parameters "
                     f"({100 * sel_numel / max(1, table.total_numel):.1f}%)")
        lines.append(f"largest selected κ: {_short(max(table[n].kappa for n in sel))}")
        lines.append("heatmap: selected cells framed in red")
        if any(m == 1 for row in grid.marks for m in row):
            lines.append("(dashed: some of the cell's tensors)")
    lines.append(f"{nr} rows × {nc} kinds; a cell with several tensors")
    lines.append("shows their geometric mean")
    tx.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace",
            transform=tx.transAxes)
    if path is not None:
        fig.savefig(path, format=fmt, dpi=dpi)
    return fig
