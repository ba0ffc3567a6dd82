"""Compatibility with the original kappaTune (arXiv 2506.16289's reference code).

:class:`SelectiveFineTuningOptimizer` keeps the reference's signature and attributes on top of
:class:`~kappatune.KappaTuneOptimizer`. New code should use ``KappaTuneOptimizer`` directly
(guide: "Migrating").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .cache import KappaCache
from .optimizer import KappaTuneOptimizer, OptimizerFactory

__all__ = ["SelectiveFineTuningOptimizer"]


def _cache_path(condition_file: Any) -> str:
    """The κ cache of a reference ``condition_file``: a folder stays the cache folder, a ``.json`` name
    becomes the SQLite database beside it (``x.json`` → ``x.sqlite``), any other path is the database."""
    path = str(condition_file)
    if path.endswith(".json") and not Path(path).is_dir():
        return path[: -len(".json")] + ".sqlite"
    return path


class SelectiveFineTuningOptimizer(KappaTuneOptimizer):
    """Drop-in replacement for the reference ``SelectiveFineTuningOptimizer`` (same signature).

    Maps onto :class:`KappaTuneOptimizer`: ``num_tensors_to_finetune`` → ``num_tensors``,
    ``max_dim_size_to_analyze`` → ``max_dim``, ``condition_file`` → the κ cache database of that
    name with its ``.json`` ending replaced by (any other name followed by) ``.sqlite``, e.g.
    ``condition_numbers.sqlite`` (the reference's own name → κ file is never read nor touched),
    ``optimizer_args`` → the inner optimizer's kwargs. The reference attributes ``optimizer``,
    ``condition_numbers`` and ``trainable_param_names`` are kept; unlike the reference it is a real
    ``torch.optim.Optimizer``.

    Args:
        model (nn.Module): the model to fine-tune.
        base_optimizer_cls (type or Callable[..., torch.optim.Optimizer]): the inner optimizer's
            class (or factory), as ``optimizer`` of :class:`KappaTuneOptimizer`.
        optimizer_args (Dict[str, Any]): its keyword arguments, e.g. ``{"lr": 1e-4}`` (``None``
            counts as ``{}``).
        condition_file (str, optional): names the κ cache: ``name.json`` → the SQLite database
            ``name.sqlite`` (any other name gets ``.sqlite`` appended). Default:
            ``"condition_numbers.json"``.
        num_tensors_to_finetune (int, optional): train the ``k`` lowest-κ tensors. Default: ``100``.
        recompute (bool, optional): ignore cached κ values (fresh ones are still written). Default:
            ``False``.
        max_dim_size_to_analyze (int, optional): skip tensors with a matrix side longer than this.
            Default: ``None`` (no limit, as the reference).

    Raises:
        TypeError: ``optimizer_args`` not a mapping.

    Example::

        >>> opt = SelectiveFineTuningOptimizer(model, torch.optim.AdamW, {"lr": 1e-4},
        ...                                    num_tensors_to_finetune=20, max_dim_size_to_analyze=16384)
    """

    def __init__(self, model: nn.Module, base_optimizer_cls: OptimizerFactory, optimizer_args: Dict[str, Any],
                 condition_file: str = "condition_numbers.json", num_tensors_to_finetune: int = 100,
                 recompute: bool = False, max_dim_size_to_analyze: Optional[int] = None) -> None:
        if optimizer_args is None:
            optimizer_args = {}
        if not isinstance(optimizer_args, Mapping):
            raise TypeError(f"optimizer_args must be a dict of keyword arguments for {base_optimizer_cls!r}, "
                            f"got {type(optimizer_args).__name__}")
        self.condition_file = condition_file
        self.num_tensors_to_finetune = num_tensors_to_finetune
        self.recompute = recompute
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        super().__init__(model, base_optimizer_cls, num_tensors=num_tensors_to_finetune,
                         max_dim=max_dim_size_to_analyze, recompute=recompute, progress=False,
                         cache=KappaCache(_cache_path(condition_file)), **dict(optimizer_args))

    _PICKLED = KappaTuneOptimizer._PICKLED + ("condition_file", "num_tensors_to_finetune", "recompute",
                                              "max_dim_size_to_analyze")

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer (the reference's attribute name for :attr:`inner`)."""
        return self.inner

    @property
    def condition_numbers(self) -> Dict[str, float]:
        """name → κ of every analysed tensor (the reference's attribute)."""
        return self.table.kappas

    @property
    def trainable_param_names(self) -> set:
        """Names of the trained tensors (the reference's attribute)."""
        return set(self.selected)
