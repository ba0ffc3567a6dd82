"""kappatune: selective full-weight fine-tuning by condition number.

Compute κ = σ_max/σ_min of every weight tensor, keep the lowest-κ tensors trainable, freeze the
rest (arXiv 2506.16289).

Example::

    >>> import torch, kappatune
    >>> table = kappatune.scan(model)                    # κ of every weight, cached on disk
    >>> names = table.select(top_fraction=0.1)           # the 10% lowest-κ tensors
    >>> handle = kappatune.freeze_all_but(model, names)
"""

import importlib as _importlib
import sys as _sys
import types as _types

# The public names and the module that defines each. They are imported on first use (PEP 562), so
# ``import kappatune`` and the ``kappatune`` command's ``--help`` do not import torch.
_LAZY = {
    "KappaCache": "cache", "default_cache_dir": "cache", "tensor_digest": "cache",
    "scan_checkpoint": "checkpoint",
    "KappaResult": "kappa", "condition_number": "kappa", "condition_numbers": "kappa", "kappa_of": "kappa",
    "KappaTuneOptimizer": "optimizer", "SelectiveFineTuningOptimizer": "optimizer",
    "TensorRef": "refs", "scan": "scan",
    "FreezeHandle": "selection", "KappaEntry": "selection", "KappaTable": "selection",
    "freeze_all_but": "selection", "SelectionPolicy": "selection", "NameFilter": "selection",
    "Selection": "resolve", "resolve_selection": "resolve",
    "apply_delta": "delta", "AppliedDelta": "delta", "measure_forgetting": "monitor",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kappatune' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{mod}", __name__), name)
    _types.ModuleType.__setattr__(_sys.modules[__name__], name, value)
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})


class _Package(_types.ModuleType):
    """Keeps ``kappatune.scan`` the function when the submodule ``kappatune.scan`` gets imported
    (the import system would otherwise bind the module to the package attribute)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, _types.ModuleType):
            return  # resolved by __getattr__ to the function of that name
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = [
    "AppliedDelta",
    "KappaCache",
    "KappaEntry",
    "KappaResult",
    "KappaTable",
    "KappaTuneOptimizer",
    "FreezeHandle",
    "NameFilter",
    "Selection",
    "SelectionPolicy",
    "TensorRef",
    "apply_delta",
    "condition_number",
    "condition_numbers",
    "default_cache_dir",
    "freeze_all_but",
    "kappa_of",
    "measure_forgetting",
    "resolve_selection",
    "scan",
    "scan_checkpoint",
    "SelectiveFineTuningOptimizer",
    "tensor_digest",
    "__version__",
]
