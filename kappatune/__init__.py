"""kappatune: selective full-weight fine-tuning by condition number.

Compute κ = σ_max/σ_min of every weight tensor, keep the lowest-κ tensors trainable, freeze the
rest (arXiv 2506.16289).

Example::

    >>> import torch, kappatune
    >>> table = kappatune.scan(model)                    # κ of every weight, cached on disk
    >>> names = table.select(top_fraction=0.1)           # the 10% lowest-κ tensors
    >>> handle = kappatune.freeze_all_but(model, names)
"""

from .cache import KappaCache, default_cache_dir, tensor_digest
from .checkpoint import scan_checkpoint
from .kappa import KappaResult, condition_number, condition_numbers, kappa_of
from .optimizer import KappaTuneOptimizer, SelectiveFineTuningOptimizer
from .scan import TensorRef, scan
from .selection import FreezeHandle, KappaEntry, KappaTable, freeze_all_but

__version__ = "0.1.0"

__all__ = [
    "KappaCache",
    "KappaEntry",
    "KappaResult",
    "KappaTable",
    "KappaTuneOptimizer",
    "FreezeHandle",
    "TensorRef",
    "condition_number",
    "condition_numbers",
    "default_cache_dir",
    "freeze_all_but",
    "kappa_of",
    "scan",
    "scan_checkpoint",
    "SelectiveFineTuningOptimizer",
    "tensor_digest",
    "__version__",
]
