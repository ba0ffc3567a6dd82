"""Optional integrations with other libraries (imported lazily, on use).

* :mod:`kappatune.integrations.transformers`: the Hugging Face ``Trainer`` routes for
  :class:`~kappatune.KappaTuneOptimizer` (``optimizer_cls_and_kwargs``).
* :mod:`kappatune.integrations.peft`: LoRA / QLoRA targets chosen by condition number.

Nothing here is imported by ``import kappatune``; import the submodule you need.
"""
