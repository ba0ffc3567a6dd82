"""What every reader of tensors shares: :class:`TensorRef`, the layout rule, matrix dimensions,
and which tensors are eligible (:class:`NameFilter`, :class:`Eligibility`).

A leaf module: it imports nothing else from kappatune, and :mod:`~kappatune.scan`,
:mod:`~kappatune.checkpoint`, :mod:`~kappatune.quant`, :mod:`~kappatune.kappa` and
:mod:`~kappatune.optimizer` import it.

Layouts
-------
A weight tensor is analysed as one or more matrices, by its *layout*:

* ``"matrix"``: a 2-D weight ``(m, n)``, used as is;
* ``"flatten"``: an N-D weight such as a convolution kernel ``(out, in, k…)``, reshaped to
  ``(out, -1)``;
* ``"stack"``: a 3-D parameter that stores a stack of matrices ``(num_matrices, m, n)``, such as
  the fused expert weights of a mixture-of-experts layer; κ is computed per matrix.

:func:`default_layout` is the one rule that picks it, for a model and for a checkpoint alike (so a
checkpoint scanned by the command line and the model loaded from it share cache entries): ≥ 4-D
tensors and convolution kernels are flattened; a 3-D tensor is a convolution kernel when its owner
is a convolution module, or, without a module (a checkpoint), when its name ends in ``weight``
(``nn.Conv1d`` and ``nn.ConvTranspose1d`` store ``weight``; fused expert stacks are bare
parameters such as ``experts.gate_up_proj``) or contains ``conv``; every other 3-D tensor is a stack.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # torch is not imported at run time: the cache and the CLI use this module without it
    import torch

__all__ = ["TensorRef", "NameFilter", "Eligibility", "Patterns", "module_kind", "layer_index", "clean_name",
           "DEFAULT_MAX_DIM"]

Layout = Literal["auto", "matrix", "flatten", "stack"]

# Components that wrappers insert into parameter names (FSDP1, activation checkpointing, compile).
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


@dataclass
class TensorRef:
    """A tensor to analyse, loaded on demand.

    Args:
        name (str): the parameter or checkpoint key.
        shape (Tuple[int, ...]): the logical shape (of the dequantized weight for a quantized one).
        dtype (str): the stored dtype, spelt as ``str(torch.dtype)`` without ``"torch."``.
        load (Callable[[], torch.Tensor]): returns the tensor whose κ is wanted (for a quantized
            weight: its dequantized matrix).
        layout (str): ``"auto"``, ``"matrix"``, ``"flatten"`` or ``"stack"`` (default ``"auto"``:
            see :func:`resolve_layout`).
        digest (Optional[Callable[[], str]]): identifies the stored content for the cache
            (default ``None``: the digest of ``load()``).
        floating (bool): whether the values are floating point (default ``True``); others are skipped.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]
    layout: str = "auto"
    digest: Optional[Callable[[], str]] = None
    floating: bool = True

    @property
    def resolved_layout(self) -> str:
        """:func:`resolve_layout` of this reference's shape and layout."""
        return resolve_layout(self.shape, self.layout, name=self.name)  # type: ignore[arg-type]


def default_layout(name: str, shape: Sequence[int], *, conv: Optional[bool] = None) -> str:
    """The layout of a weight by the rule of the module docstring.

    Args:
        name (str): the parameter or checkpoint name.
        shape (Sequence[int]): its shape.
        conv (Optional[bool]): whether its owner module is a convolution (default ``None``:
            unknown, as in a checkpoint).

    Returns:
        str: ``"flatten"``, or ``"auto"`` (which :func:`resolve_layout` turns into ``"matrix"``
            for 2-D and ``"stack"`` for 3-D).
    """
    if conv:
        return "flatten"
    if len(shape) == 3:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" or "conv" in name.lower():
            return "flatten"
    return "auto"


def resolve_layout(shape: Sequence[int], layout: Layout = "auto", *, name: str = "tensor") -> str:
    """The layout used for a tensor of ``shape``.

    Args:
        shape (Sequence[int]): the tensor's shape (at least 2-D).
        layout (str): ``"auto"`` (default: 2-D → ``"matrix"``, 3-D → ``"stack"``, ≥ 4-D →
            ``"flatten"``), or one of those three, checked against ``shape``.
        name (str): names the tensor in errors (default ``"tensor"``).

    Raises:
        ValueError: fewer than 2 dimensions, an unknown layout, or one that does not fit ``shape``.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name}: κ needs a tensor with at least 2 dimensions, got shape {shape}")
    if layout == "auto":
        return "matrix" if ndim == 2 else ("stack" if ndim == 3 else "flatten")
    if layout not in ("matrix", "flatten", "stack"):
        raise ValueError(f"layout must be 'auto', 'matrix', 'flatten' or 'stack', got {layout!r}")
    if layout == "matrix" and ndim != 2:
        raise ValueError(f"{name}: layout='matrix' needs a 2-D tensor, got shape {shape}; use 'flatten' or 'stack'")
    if layout == "stack" and ndim != 3:
        raise ValueError(f"{name}: layout='stack' needs a 3-D tensor (num_matrices, m, n), got shape {shape}")
    return layout


def matrix_dims(shape: Sequence[int], layout: str = "auto") -> Tuple[int, int]:
    """``(m, n)`` of each matrix a tensor of ``shape`` is analysed as, under ``layout``."""
    shape = tuple(shape)
    lay = resolve_layout(shape, layout)  # type: ignore[arg-type]
    if lay == "stack":
        return shape[1], shape[2]
    return shape[0], math.prod(shape[1:])


def num_matrices(shape: Sequence[int], layout: str = "auto") -> int:
    """How many matrices a tensor of ``shape`` holds under ``layout`` (``shape[0]`` for a stack, else 1)."""
    return tuple(shape)[0] if resolve_layout(shape, layout) == "stack" else 1  # type: ignore[arg-type]


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` (or the string ``"torch.bfloat16"``) → ``"bfloat16"``: the one spelling
    of dtypes in kappatune's records (:attr:`TensorRef.dtype`, κ tables, the cache, deltas).

    Args:
        dtype (torch.dtype or str): the dtype.
    """
    return str(dtype).replace("torch.", "")


#: safetensors dtype codes → (torch dtype name, floating point), the one map of the checkpoint reader,
#: the delta files and ``kappatune apply-delta``.
SAFETENSORS_DTYPES: Dict[str, Tuple[str, bool]] = {
    "F64": ("float64", True), "F32": ("float32", True), "F16": ("float16", True),
    "BF16": ("bfloat16", True),
    # float8: analysed like a float8 parameter of a model (κ of the values upcast; see kappatune.checkpoint).
    "F8_E4M3": ("float8_e4m3fn", True), "F8_E5M2": ("float8_e5m2", True),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", True), "F8_E5M2FNUZ": ("float8_e5m2fnuz", True),
    "I64": ("int64", False), "I32": ("int32", False), "I16": ("int16", False), "I8": ("int8", False),
    "U64": ("uint64", False), "U32": ("uint32", False), "U16": ("uint16", False), "U8": ("uint8", False),
    "BOOL": ("bool", False), "C64": ("complex64", False),
}


def clean_name(name: str) -> str:
    """A parameter name without the components wrappers insert.

    ``_fsdp_wrapped_module.model.layers.0.…`` → ``model.layers.0.…`` (FSDP1, activation
    checkpointing and ``torch.compile`` wrappers).

    Args:
        name (str): a dotted parameter name, e.g. from ``model.named_parameters()``.
    """
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


# -- names -----------------------------------------------------------------------------------------
_PARAM_LEAVES = {"weight", "bias"}
_INT = re.compile(r"^\d+$")


def module_kind(name: str) -> str:
    """The module kind of a parameter name: ``model.layers.3.self_attn.q_proj.weight`` → ``q_proj``.

    A parameter that is not called ``weight``/``bias`` is its own kind
    (``model.layers.0.mlp.experts.gate_up_proj`` → ``gate_up_proj``).

    Args:
        name (str): a parameter name.
    """
    parts = [p for p in name.split(".") if not _INT.match(p)]
    if len(parts) > 1 and parts[-1] in _PARAM_LEAVES:
        return parts[-2]
    return parts[-1] if parts else name


def layer_index(name: str) -> Optional[int]:
    """The first integer component of a parameter name (``model.layers.3.…`` → 3), or ``None``.

    Args:
        name (str): a parameter name.
    """
    for p in name.split("."):
        if _INT.match(p):
            return int(p)
    return None


#: What ``include=``/``exclude=`` accept: ``None``, one regex, or a sequence of them.
Patterns = Union[None, str, Sequence[str]]
#: What ``group_by=`` accepts: ``None``, ``"kind"`` (:func:`module_kind`), ``"layer"``
#: (:func:`layer_index`) or a callable ``name -> key``.
GroupBy = Union[None, str, Callable[[str], Any]]


def _compile(patterns: Patterns, arg: str) -> List["re.Pattern[str]"]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    elif isinstance(patterns, bytes) or not isinstance(patterns, Iterable):
        raise TypeError(f"{arg} must be a regex string or a sequence of them, got {type(patterns).__name__}")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must be a regex string or a sequence of them, got an element of type "
                            f"{type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{arg}: invalid regular expression {p!r}: {e}") from None
    return out


class NameFilter:
    """The include/exclude rule on tensor names, shared by the scan, the table, the optimizer, the
    PEFT bridge and the command line.

    A name passes when it matches (``re.search``) at least one ``include`` pattern (or none are
    given) and no ``exclude`` pattern.

    Args:
        include (None, str or sequence of str): regexes a name must match one of. Default:
            ``None`` (every name).
        exclude (None, str or sequence of str): regexes no name may match. Default: ``None``.
        arg_names (Tuple[str, str], optional): how the two arguments are named in errors. Default:
            ``("include", "exclude")`` (the command line passes ``("--include", "--exclude")``).

    Raises:
        TypeError: a pattern that is not a string.
        ValueError: a pattern that is not a valid regular expression, naming the argument.
    """

    def __init__(self, include: Patterns = None, exclude: Patterns = None, *,
                 arg_names: Tuple[str, str] = ("include", "exclude")) -> None:
        if include is not None and not isinstance(include, (str, bytes)):
            include = list(include) if isinstance(include, Iterable) else include  # read a generator once
        if exclude is not None and not isinstance(exclude, (str, bytes)):
            exclude = list(exclude) if isinstance(exclude, Iterable) else exclude
        self.include = include
        self.exclude = exclude
        self._inc = _compile(include, arg_names[0])
        self._exc = _compile(exclude, arg_names[1])

    def reason(self, name: str) -> Optional[str]:
        """Why ``name`` is filtered out (``"not included"`` or ``"excluded"``), or ``None`` if it passes.

        Args:
            name (str): a tensor name.
        """
        if self._inc and not any(r.search(name) for r in self._inc):
            return "not included"
        if any(r.search(name) for r in self._exc):
            return "excluded"
        return None

    def __call__(self, name: str) -> bool:
        return self.reason(name) is None

    @property
    def active(self) -> bool:
        """Whether any pattern is set."""
        return bool(self._inc or self._exc)

    def __repr__(self) -> str:
        return f"NameFilter(include={self.include!r}, exclude={self.exclude!r})"


#: The default ``max_dim`` of every entry point (the scan, the optimizer, the Trainer factory, the
#: command line, the PEFT bridge, the study): matrices with a side longer than 16384 are not
#: analysed, in practice the token embedding and an untied LM head of a large vocabulary (the
#: reference kappaTune and PEFT's ``max_dim_size_to_analyze`` use the same value). Trained, such a
#: tensor alone would be a large share of the parameters (21 % of SmolLM2-135M's). Pass
#: ``max_dim=None`` to analyse every size.
DEFAULT_MAX_DIM = 16384


class Eligibility:
    """Which tensors are analysed (and so selectable): the scan's filters, in one place.

    A tensor is skipped, with the reason recorded in :attr:`KappaTable.skipped
    <kappatune.table.KappaTable.skipped>`, when its name does not pass ``names``
    (``"not included"``, ``"excluded"``), it has fewer than ``max(min_ndim, 2)`` dimensions
    (``"ndim<k"``), it is not floating point, it is empty, or one side of the matrices it is
    analysed as (:func:`matrix_dims`) is longer than ``max_dim`` (``"max_dim"``).

    Args:
        min_ndim (int, optional): fewer dimensions are skipped; at least 2 always applies.
            Default: ``2`` (biases and norms are skipped).
        max_dim (int, optional): a matrix side longer than this is skipped; ``None``: no limit.
            Default: :data:`DEFAULT_MAX_DIM` (16384).
        names (NameFilter, optional): include/exclude patterns. Default: ``None`` (every name).
        arg_names (Tuple[str, str], optional): how ``min_ndim`` and ``max_dim`` are named in errors.
            Default: ``("min_ndim", "max_dim")`` (PEFT's bridge passes ``max_dim_size_to_analyze``).

    Raises:
        ValueError: ``min_ndim`` not an int >= 1, or ``max_dim`` neither ``None`` nor an int >= 1.
    """

    def __init__(self, min_ndim: int = 2, max_dim: Optional[int] = DEFAULT_MAX_DIM, names: Optional[NameFilter] = None, *,
                 arg_names: Tuple[str, str] = ("min_ndim", "max_dim")) -> None:
        if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 1:
            raise ValueError(f"{arg_names[0]} must be an int >= 1, got {min_ndim!r}")
        if max_dim is not None and (isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1):
            raise ValueError(f"{arg_names[1]} must be None or an int >= 1, got {max_dim!r}")
        self.min_ndim = min_ndim
        self.max_dim = max_dim
        self.names = names if names is not None else NameFilter()

    def reason(self, name: str, shape: Sequence[int], layout: str = "auto", floating: bool = True
               ) -> Optional[str]:
        """Why the tensor is skipped, or ``None`` if it is eligible.

        Args:
            name (str): its name.
            shape (Sequence[int]): its shape.
            layout (str, optional): its layout (:func:`resolve_layout`). Default: ``"auto"``.
            floating (bool, optional): whether it holds floating-point values. Default: ``True``.
        """
        reason = self.names.reason(name)
        if reason:
            return reason
        shape = tuple(shape)
        if len(shape) < max(self.min_ndim, 2):
            return f"ndim<{max(self.min_ndim, 2)}"
        if not floating:
            return "not floating point"
        if math.prod(shape) == 0:
            return "empty"
        if self.max_dim is not None and max(matrix_dims(shape, layout)) > self.max_dim:
            return "max_dim"
        return None

    def split(self, refs: Iterable[TensorRef]) -> Tuple[List[TensorRef], Dict[str, str]]:
        """The eligible refs, and ``name → reason`` for every other one.

        Args:
            refs (Iterable[TensorRef]): the candidates; names must be unique.

        Raises:
            ValueError: a name that appears twice.
        """
        eligible: List[TensorRef] = []
        skipped: Dict[str, str] = {}
        seen = set()
        for ref in refs:
            if ref.name in seen:
                raise ValueError(f"tensor name {ref.name!r} appears twice")
            seen.add(ref.name)
            reason = self.reason(ref.name, ref.shape, ref.layout, ref.floating)
            if reason:
                skipped[ref.name] = reason
            else:
                eligible.append(ref)
        return eligible, skipped

    def __repr__(self) -> str:
        return f"Eligibility(min_ndim={self.min_ndim}, max_dim={self.max_dim}, names={self.names!r})"
