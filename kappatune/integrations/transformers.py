"""Hugging Face ``Trainer`` with :class:`~kappatune.KappaTuneOptimizer`.

Three ways to hand the optimizer to a ``Trainer``:

1. Build it yourself: ``Trainer(..., optimizers=(KappaTuneOptimizer(model, ...), None))``. The
   Trainer makes the LR scheduler from ``TrainingArguments`` over it. Not allowed by the Trainer
   under FSDP (it builds the optimizer after wrapping the model).
2. ``optimizer_cls_and_kwargs=(KappaTuneOptimizer, {"model": model, "optimizer": torch.optim.AdamW,
   "top_fraction": 0.1, "lr": 2e-5})``: ``Trainer.create_optimizer`` calls the class with the
   model when the kwargs carry ``"model"`` (it pops that key), otherwise with its own
   requires-grad parameter groups, which carry no names and which KappaTuneOptimizer therefore
   refuses with a message pointing here.
3. ``optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, torch.optim.AdamW, top_fraction=0.1,
   lr=2e-5)`` (this module): scans, selects and freezes *now*, on the full unwrapped model, and
   returns a factory that the Trainer calls with the model it trains (``optimizer_cls()(model,
   **kwargs)``, its protocol for optimizer factories) once it has wrapped it. The optimizer
   then needs no scan: it is given the names. This is the route for FSDP/DeepSpeed set-ups,
   where the optimizer must be created by the Trainer and κ must be computed before sharding.

``resume_from_checkpoint`` works with all three: the optimizer's state dict carries the
selection, and ``load_state_dict`` restores it even if κ of the loaded checkpoint would select
other tensors.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..optimizer import KappaTuneOptimizer, OptimizerFactory, unwrap_model

__all__ = ["optimizer_cls_and_kwargs", "KappaTuneOptimizerFactory"]


class KappaTuneOptimizerFactory:
    """The optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(KappaTuneOptimizerFactory, kwargs))``.

    transformers instantiates a factory without arguments and calls it with the model it trains
    and the kwargs: ``KappaTuneOptimizerFactory()(model, **kwargs)`` returns
    ``KappaTuneOptimizer(model, **kwargs)``.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> KappaTuneOptimizer:
        return KappaTuneOptimizer(model, **kwargs)

    def __repr__(self) -> str:
        return "KappaTuneOptimizerFactory()"


# KappaTuneOptimizer's own keywords (the selection); everything else goes to the inner optimizer.
_OWN = frozenset(inspect.signature(KappaTuneOptimizer.__init__).parameters) - {"self", "model", "optimizer",
                                                                               "optimizer_kwargs"}


def optimizer_cls_and_kwargs(
    model: nn.Module, optimizer: OptimizerFactory = torch.optim.AdamW, **kwargs: Any
) -> Tuple[type, Dict[str, Any]]:
    """Select (scan + policy) and freeze now; return ``(factory, kwargs)`` for ``optimizer_cls_and_kwargs``.

    Args:
        model (nn.Module): the model the Trainer will train (unwrapped here).
        optimizer (type or callable): as :class:`~kappatune.KappaTuneOptimizer` (default
            ``torch.optim.AdamW``).
        **kwargs: exactly :class:`~kappatune.KappaTuneOptimizer`'s keywords: the selection
            (``top_fraction=``, ``param_budget=``, ``policy=``, ``names=``, ``max_dim=``,
            ``cache=``, …) and the inner optimizer's (``lr=``, ``weight_decay=``, …).

    The selection is resolved as the optimizer resolves it (by
    :func:`kappatune.resolve.resolve_selection`). Invalid optimizer kwargs fail here (a throw-away
    optimizer is built over the selected tensors to check them, as the Trainer's will be), not in
    the middle of ``train()``.

    Example::

        >>> from kappatune.integrations.transformers import optimizer_cls_and_kwargs
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
        ...                       model, torch.optim.AdamW, top_fraction=0.1, lr=2e-5, weight_decay=0.01))
    """
    probe = KappaTuneOptimizer(unwrap_model(model), optimizer, **kwargs)
    optimizer_kwargs = {k: v for k, v in kwargs.items() if k not in _OWN and k != "cache_dir"}
    out: Dict[str, Any] = {"optimizer": optimizer, "names": probe.selected, "table": probe.table,
                           "aggregate": kwargs.get("aggregate", "mean"), "cache": None, "progress": False,
                           **optimizer_kwargs}
    return KappaTuneOptimizerFactory, out
