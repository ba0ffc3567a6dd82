"""kappatune: selective full-weight fine-tuning by condition number.

Compute κ = σ_max/σ_min of every weight tensor, keep the lowest-κ tensors trainable, freeze the
rest (arXiv 2506.16289), and control forgetting directly: decay toward the pretrained values, the
base model on demand, deltas blended back after training, a forgetting monitor.

Example::

    >>> import torch, kappatune
    >>> table = kappatune.scan(model)                    # κ of every weight, cached on disk
    >>> names = table.select(top_fraction=0.1)           # the 10% lowest-κ tensors
    >>> opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.1, lr=3e-4)
"""

import importlib as _importlib
import warnings as _warnings

# The public names and the module that defines each. They are imported on first use (PEP 562), so
# ``import kappatune`` and the ``kappatune`` command's ``--help`` do not import torch.
_LAZY = {
    "scan": "pipeline", "scan_checkpoint": "checkpoint", "condition_number": "kappa",
    "KappaTable": "table", "KappaEntry": "table",
    "SelectionPolicy": "selection", "freeze_all_but": "selection", "FreezeHandle": "selection",
    "NameFilter": "refs",
    "Selection": "resolve", "resolve_selection": "resolve",
    "KappaTuneOptimizer": "optimizer", "KappaCache": "cache",
    "apply_delta": "delta", "AppliedDelta": "delta", "measure_forgetting": "monitor",
}

# Old top-level spellings: still there for one release, with a FutureWarning naming the new one.
# name -> (module, attribute it now is, the spelling the warning tells users to write)
_MOVED = {
    "SelectiveFineTuningOptimizer": ("compat", "SelectiveFineTuningOptimizer",
                                     "kappatune.compat.SelectiveFineTuningOptimizer"),
    "condition_numbers": ("kappa", "condition_numbers", "kappatune.kappa.condition_numbers"),
    "kappa_of": ("kappa", "kappa_of", "kappatune.kappa.kappa_of"),
    "KappaResult": ("table", "KappaEntry", "kappatune.KappaEntry (kappa_of returns one)"),
    "TensorRef": ("refs", "TensorRef", "kappatune.refs.TensorRef"),
    "default_cache_dir": ("cache", "default_cache_dir", "kappatune.cache.default_cache_dir"),
    "tensor_digest": ("cache", "tensor_digest", "kappatune.cache.tensor_digest"),
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None and name in _MOVED:
        mod, attr, new = _MOVED[name]
        _warnings.warn(f"kappatune.{name} is deprecated and leaves the top level in the next release; use {new}",
                       FutureWarning, stacklevel=2)
        return getattr(_importlib.import_module(f".{mod}", __name__), attr)  # not cached: warns each time
    if mod is None:
        raise AttributeError(f"module 'kappatune' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "AppliedDelta",
    "FreezeHandle",
    "KappaCache",
    "KappaEntry",
    "KappaTable",
    "KappaTuneOptimizer",
    "NameFilter",
    "Selection",
    "SelectionPolicy",
    "apply_delta",
    "condition_number",
    "freeze_all_but",
    "measure_forgetting",
    "resolve_selection",
    "scan",
    "scan_checkpoint",
    "__version__",
]
