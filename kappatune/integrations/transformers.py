"""Hugging Face ``Trainer`` with :class:`~kappatune.KappaTuneOptimizer`, and the forgetting monitor as a callback.

This module imports ``transformers`` (``pip install kappatune[hf]``).

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
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from transformers import TrainerCallback

from ..monitor import Batch, measure_forgetting
from ..optimizer import KappaTuneOptimizer, OptimizerFactory, unwrap_model

__all__ = ["optimizer_cls_and_kwargs", "KappaTuneOptimizerFactory", "ForgettingCallback"]


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


# The forgetting controls: the optimizer built by the Trainer must carry them too.
_CONTROLS = ("decay_to_init", "keep_base")


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
    # the probe only selects and checks the kwargs: it need not keep the pretrained values
    probe_kw = kwargs if kwargs.get("decay_to_init") else {**kwargs, "keep_base": False}
    probe = KappaTuneOptimizer(unwrap_model(model), optimizer, **probe_kw)
    optimizer_kwargs = {k: v for k, v in kwargs.items() if k not in _OWN and k != "cache_dir"}
    out: Dict[str, Any] = {"optimizer": optimizer, "names": probe.selected, "table": probe.table,
                           "aggregate": kwargs.get("aggregate", "mean"), "cache": None, "progress": False,
                           **{k: kwargs[k] for k in _CONTROLS if k in kwargs}, **optimizer_kwargs}
    return KappaTuneOptimizerFactory, out


def _kappatune_optimizer(opt: Any) -> Optional[KappaTuneOptimizer]:
    """The KappaTuneOptimizer inside accelerate's / the Trainer's optimizer wrappers, if any."""
    seen = set()
    while opt is not None and id(opt) not in seen:
        if isinstance(opt, KappaTuneOptimizer):
            return opt
        seen.add(id(opt))
        opt = getattr(opt, "optimizer", None)
    return None


class ForgettingCallback(TrainerCallback):
    """A ``transformers`` ``TrainerCallback`` that logs :func:`kappatune.measure_forgetting` every N steps.

    Every ``every_n_steps`` optimizer steps (and at step 0 when training starts, where both values
    are exactly 0), it measures on the batches given the control-loss change against the base
    model and the task KL, and logs them through the Trainer's own ``log``, so they reach
    ``trainer.state.log_history``, TensorBoard, W&B and every other reporting callback under the
    keys ``forgetting/control_loss_change``, ``forgetting/task_kl``, ``forgetting/control_loss``,
    ``forgetting/task_loss`` and the ``…_base`` values. The Trainer's optimizer must be a
    :class:`~kappatune.KappaTuneOptimizer` that keeps the base values (the default).

    Args:
        trainer (transformers.Trainer): the trainer to log through; add the callback with
            ``trainer.add_callback(callback)``.
        control (Iterable[Batch], optional): held-out batches of general text (re-iterated at each
            measurement: a list, or a ``DataLoader``). Default: ``None``.
        task (Iterable[Batch], optional): held-out batches of the task. Default: ``None``.
        every_n_steps (int, optional): the measurement interval in optimizer steps. Default: ``50``.
        at_start (bool, optional): measure once when training begins. Default: ``True``.

    Example::

        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, top_fraction=0.1, lr=2e-5))
        >>> trainer.add_callback(ForgettingCallback(trainer, control=wiki_batches, task=task_batches,
        ...                                         every_n_steps=100))
    """

    def __init__(self, trainer: Any, *, control: Optional[Iterable[Batch]] = None,
                 task: Optional[Iterable[Batch]] = None, every_n_steps: int = 50, at_start: bool = True) -> None:
        if control is None and task is None:
            raise ValueError("ForgettingCallback needs control= batches, task= batches, or both")
        for what, batches in (("control", control), ("task", task)):
            if batches is not None and iter(batches) is batches:
                raise TypeError(f"ForgettingCallback measures {what}= again every {every_n_steps} steps, and a "
                                f"{type(batches).__name__} can be read only once; pass a list of batches or a "
                                "DataLoader")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a whole number >= 1, got {every_n_steps!r}")
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be the transformers Trainer to log through, got {type(trainer).__name__}")
        self.trainer = trainer
        self.control_batches = control
        self.task_batches = task
        self.every_n_steps = every_n_steps
        self.at_start = at_start

    def measure(self, model: Any, optimizer: Any) -> Dict[str, float]:
        r"""Measure now and log; returns the logged ``forgetting/…`` values.

        The values are those of :func:`kappatune.measure_forgetting` (token counts left out), e.g.
        ``forgetting/control_loss_change`` :math:`= L_{\mathrm{control}}(\theta) -
        L_{\mathrm{control}}(\theta_0)` and ``forgetting/task_kl``, the mean per-token
        :math:`\mathrm{KL}(p_{\theta_0} \| p_\theta)` on the task batches, in nats.

        Args:
            model (nn.Module): the model being trained.
            optimizer (Any): the Trainer's optimizer: a :class:`~kappatune.KappaTuneOptimizer`,
                or a wrapper of one (accelerate's ``AcceleratedOptimizer``).

        Raises:
            TypeError: ``optimizer`` holds no :class:`~kappatune.KappaTuneOptimizer`.
        """
        opt = _kappatune_optimizer(optimizer)
        if opt is None:
            raise TypeError("ForgettingCallback needs the Trainer's optimizer to be a KappaTuneOptimizer (it provides "
                            f"the base weights), got {type(optimizer).__name__}; build it with "
                            "kappatune.integrations.transformers.optimizer_cls_and_kwargs(model, ...)")
        values = measure_forgetting(model, opt, control=self.control_batches, task=self.task_batches)
        logs = {f"forgetting/{k}": v for k, v in values.items() if not k.endswith("_tokens")}
        self.trainer.log(logs)
        return logs

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer's hook at the start of training: :meth:`measure` when ``at_start`` and at
        step 0 (not when resuming from a checkpoint).

        Args:
            args (transformers.TrainingArguments): the Trainer's arguments (unused).
            state (transformers.TrainerState): its state; ``state.global_step`` is read.
            control (transformers.TrainerControl): its control flags (unused).
            **kwargs: the Trainer's ``model`` and ``optimizer`` among others.
        """
        if self.at_start and state.global_step == 0:
            self.measure(kwargs["model"], kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer's hook after each optimizer step: :meth:`measure` when ``state.global_step``
        is a multiple of ``every_n_steps``.

        Args:
            args (transformers.TrainingArguments): the Trainer's arguments (unused).
            state (transformers.TrainerState): its state; ``state.global_step`` is read.
            control (transformers.TrainerControl): its control flags (unused).
            **kwargs: the Trainer's ``model`` and ``optimizer`` among others.
        """
        if state.global_step % self.every_n_steps == 0:
            self.measure(kwargs["model"], kwargs.get("optimizer"))
