"""The selection in the formats other tools read.

* ``names``: one parameter name per line.
* ``json``: the names with their κ, shape and size, plus the policy that chose them.
* ``axolotl``: an ``unfrozen_parameters:`` YAML block for an Axolotl config. Each pattern is
  anchored (``^name$``), so it unfreezes exactly one parameter. Axolotl treats every dot of these
  patterns as a literal dot (it escapes them itself before compiling), so dots are written as they
  are; writing ``\\.`` would be escaped a second time there and match nothing. Any other regex
  metacharacter in a name is escaped.
* ``peft``: a PEFT ``target_modules`` list: the module names (the parameter name minus
  ``.weight``), so LoRA adapters go on exactly the selected matrices. Selected parameters that are
  not a module's ``weight`` (fused 3-D expert parameters, for instance) cannot be module targets;
  :func:`peft_targets` returns them separately (PEFT >= 0.17 can take them as
  ``target_parameters``).

Example::

    >>> names = table.select(top_fraction=0.1)
    >>> print(format_selection(table, names, "axolotl"))
    unfrozen_parameters:
      - '^model.layers.3.mlp.down_proj.weight$'
      ...
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._numbers import encode_float
from .table import KappaTable

__all__ = ["FORMATS", "format_selection"]

FORMATS = ("names", "json", "axolotl", "peft")


def axolotl_pattern(name: str) -> str:
    """An Axolotl ``unfrozen_parameters`` pattern matching exactly ``name`` (see the module docstring)."""
    return "^" + ".".join(re.escape(part) for part in name.split(".")) + "$"


def _yaml_single_quoted(s: str) -> str:
    # Single-quoted YAML scalars have no escapes except '' for a quote: backslashes stay literal.
    return "'" + s.replace("'", "''") + "'"


def axolotl_yaml(names: Sequence[str], comment: Optional[str] = None) -> str:
    """An ``unfrozen_parameters:`` YAML block (with an optional ``#`` comment line above it)."""
    lines = []
    if comment:
        lines.extend("# " + c for c in comment.splitlines())
    lines.append("unfrozen_parameters:")
    lines.extend("  - " + _yaml_single_quoted(axolotl_pattern(n)) for n in names)
    return "\n".join(lines) + "\n"


def peft_targets(names: Iterable[str]) -> Tuple[List[str], List[str]]:
    """``(target_modules, other_parameters)``: module names of the ``*.weight`` names, and the rest."""
    modules, others = [], []
    for n in names:
        if n.endswith(".weight") and len(n) > len(".weight"):
            modules.append(n[: -len(".weight")])
        else:
            others.append(n)
    return modules, others


def format_selection(
    table: KappaTable,
    selected: Sequence[str],
    fmt: str,
    *,
    policy: Optional[Mapping[str, Any]] = None,
    source: Optional[Sequence[str]] = None,
) -> str:
    """The selection ``selected`` (names in ``table``) as text in format ``fmt`` (:data:`FORMATS`).

    ``policy`` (the ``select`` arguments) and ``source`` (where the table came from) are recorded
    in the ``json`` output and in the ``axolotl`` comment.

    Args:
        table (KappaTable): the scan the names come from (κ, shapes and sizes are read from it).
        selected (Sequence[str]): the chosen names, in the order to write them, each in ``table``.
        fmt (str): ``"names"``, ``"json"``, ``"axolotl"`` or ``"peft"`` (see the module docstring).
        policy (Mapping[str, Any], optional): the policy that chose them, e.g.
            ``{"top_fraction": 0.1}`` (``json``: recorded as is; ``axolotl``: its non-``None``
            items in the comment). Default: ``None`` (none recorded).
        source (Sequence[str], optional): where the table came from (model paths), recorded in the
            ``json`` output. Default: ``None``.

    Returns:
        str: the text, ending in a newline. The ``axolotl`` comment gives the selected share of
            the analysed parameters, :math:`100 \\cdot \\sum_{s \\in \\text{selected}} n_s / \\sum_{t
            \\in \\text{table}} n_t` percent, with :math:`n` the number of elements.

    Raises:
        ValueError: an unknown ``fmt``, or a selected name not in ``table``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    missing = [n for n in selected if n not in table]
    if missing:
        raise ValueError(f"{len(missing)} selected name(s) are not in the κ table: {missing[:3]}")
    entries = [table[n] for n in selected]
    sel_numel = sum(e.numel for e in entries)
    total = table.total_numel
    if fmt == "names":
        return "".join(n + "\n" for n in selected)
    if fmt == "json":
        doc: Dict[str, Any] = {
            "format": "kappatune-selection",
            "policy": dict(policy or {}),
            "source": list(source or []),
            "num_selected": len(entries),
            "selected_numel": sel_numel,
            "analysed_tensors": len(table),
            "analysed_numel": total,
            "selected": [e.name for e in entries],
            "tensors": [{"name": e.name, "kappa": encode_float(e.kappa), "shape": list(e.shape), "numel": e.numel}
                        for e in entries],
        }
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if fmt == "axolotl":
        pol = ", ".join(f"{k}={v}" for k, v in (policy or {}).items() if v is not None)
        share = f"{100 * sel_numel / total:.2f}%" if total else "n/a"
        comment = (f"kappatune: {len(entries)} lowest-κ tensors, {sel_numel:,} parameters "
                   f"({share} of the {len(table)} analysed tensors)" + (f"; {pol}" if pol else ""))
        return axolotl_yaml([e.name for e in entries], comment)
    modules, _ = peft_targets(e.name for e in entries)
    return json.dumps(modules, indent=2) + "\n"
