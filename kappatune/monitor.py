r"""The forgetting monitor: how far the fine-tuned model has moved from the base, measured while training.

:func:`measure_forgetting` evaluates, on held-out batches the user provides,

* the **control-loss change**: the mean next-token loss of the fine-tuned model on general
  (control) text minus that of the base model, in nats per token; positive means forgetting;
* the **task KL**: the mean per-token forward KL divergence between the base and the fine-tuned
  model's next-token distributions on the task's own batches,

  .. math::

      \mathrm{KL}(p_{\mathrm{base}} \,\|\, p_{\mathrm{tuned}}) = \frac{1}{T} \sum_t \sum_v
      p_{\mathrm{base}}(v \mid x_{<t}) \left[\log p_{\mathrm{base}}(v \mid x_{<t})
      - \log p_{\mathrm{tuned}}(v \mid x_{<t})\right],

  which Shenfeld et al. (2025, "RL's Razor") found to predict forgetting across fine-tuning
  methods better than any weight statistic.

The base model comes from :meth:`kappatune.KappaTuneOptimizer.base_weights` (the pretrained
values swapped in place, no second copy of the model), so each batch costs two forward passes.
Both are run under ``torch.no_grad()`` with the model in eval mode; every module's train/eval
flag is restored afterwards. Before the first optimizer step both quantities are exactly 0.

:class:`kappatune.integrations.transformers.ForgettingCallback` logs the same numbers from a
``transformers`` ``Trainer``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import unwrap_model

__all__ = ["measure_forgetting"]

#: A batch: a tensor of token ids ``(batch, seq)`` or a mapping with ``input_ids`` (and optionally
#: ``attention_mask`` and ``labels``, ``-100`` marking positions that do not count).
Batch = Union[torch.Tensor, Mapping[str, Any]]


def _inputs(batch: Batch, device: torch.device) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The model's keyword inputs and the next-token targets (``-100`` where nothing counts)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise TypeError(f"a batch must be a tensor of token ids or a mapping with 'input_ids', got "
                        f"{type(batch).__name__}")
    ids = batch["input_ids"].to(device)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"a batch's input_ids must be (batch, seq) with seq >= 2, got shape {tuple(ids.shape)}")
    inputs = {"input_ids": ids}
    labels = batch.get("labels")
    labels = ids.clone() if labels is None else labels.to(device).clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = mask.to(device)
        inputs["attention_mask"] = mask
        labels = labels.masked_fill(mask == 0, -100)
    return inputs, labels[:, 1:]


def _logits(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError("measure_forgetting needs a causal LM whose forward returns logits (batch, seq, vocab) "
                        f"or an output with .logits; got {type(out).__name__}")
    return logits[:, :-1].float()


def _base_context(base: Any):
    fn = getattr(base, "base_weights", None)
    if not callable(fn):
        raise TypeError(f"base= must be a KappaTuneOptimizer (or an object with base_weights()), got "
                        f"{type(base).__name__}")
    return fn()


def measure_forgetting(
    model: nn.Module,
    base: Any,
    *,
    control: Optional[Iterable[Batch]] = None,
    task: Optional[Iterable[Batch]] = None,
) -> Dict[str, float]:
    r"""Control-loss change and task KL of ``model`` against its pretrained weights.

    Args:
        model (nn.Module): the model being fine-tuned (a causal LM: its forward takes
            ``input_ids`` and returns logits or an output with ``.logits``).
        base (KappaTuneOptimizer): the optimizer training ``model``; its
            :meth:`~kappatune.KappaTuneOptimizer.base_weights` provides the base model.
        control (Iterable[Batch], optional): held-out batches of general text. Default: ``None``.
        task (Iterable[Batch], optional): held-out batches of the task. Default: ``None``.

    Returns:
        Dict[str, float]: with ``control``: ``control_loss``, ``control_loss_base`` and
            ``control_loss_change`` (tuned − base, nats per token), ``control_tokens``; with ``task``:
            ``task_loss``, ``task_loss_base``, ``task_loss_change``, ``task_kl`` (mean per-token
            :math:`\mathrm{KL}(p_{\mathrm{base}} \| p_{\mathrm{tuned}})`, nats) and ``task_tokens``.
            Means are over tokens (every counted position weighs the same).

    Raises:
        ValueError: if neither ``control`` nor ``task`` is given, or they hold no token to count.

    Example::

        >>> m = kappatune.measure_forgetting(model, opt, control=wiki_batches, task=task_batches)
        >>> m["control_loss_change"], m["task_kl"]
    """
    if control is None and task is None:
        raise ValueError("measure_forgetting needs control= batches, task= batches, or both")
    trained = getattr(base, "model", None)
    if isinstance(trained, nn.Module) and unwrap_model(trained) is not unwrap_model(model):
        raise ValueError(f"measure_forgetting: model is not the {type(unwrap_model(trained)).__name__} this optimizer "
                         "trains, so its base weights would not be swapped into it; pass the optimizer's own model")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = [(m, m.training) for m in model.modules()]
    out: Dict[str, float] = {}
    model.eval()
    try:
        with torch.no_grad():
            for what, batches in (("control", control), ("task", task)):
                if batches is None:
                    continue
                tuned_nll = base_nll = kl = 0.0
                tokens = 0
                for batch in batches:
                    inputs, targets = _inputs(batch, device)
                    keep = targets != -100
                    n = int(keep.sum())
                    if n == 0:
                        continue
                    with _base_context(base):
                        lb = _logits(model, inputs)
                    lt = _logits(model, inputs)
                    lpb = F.log_softmax(lb[keep], dim=-1)
                    lpt = F.log_softmax(lt[keep], dim=-1)
                    del lb, lt
                    t = targets[keep].unsqueeze(-1)
                    base_nll -= float(lpb.gather(-1, t).sum(dtype=torch.float64))
                    tuned_nll -= float(lpt.gather(-1, t).sum(dtype=torch.float64))
                    if what == "task":
                        kl += float((lpb.exp() * (lpb - lpt)).sum(dtype=torch.float64))
                    tokens += n
                if tokens == 0:
                    raise ValueError(f"measure_forgetting: the {what} batches hold no token to score (empty, or "
                                     "every label is -100)")
                out[f"{what}_loss"] = tuned_nll / tokens
                out[f"{what}_loss_base"] = base_nll / tokens
                out[f"{what}_loss_change"] = (tuned_nll - base_nll) / tokens
                out[f"{what}_tokens"] = float(tokens)
                if what == "task":
                    out["task_kl"] = kl / tokens
    finally:
        for m, flag in flags:
            m.training = flag
    return out
