"""Export a SoRA adapter as a standard PEFT LoRA adapter that any LoRA loader reads.

Per module, with kept ranks K = {i : g_i ≠ 0}:

    A' = A[K, :]                       (k × in)
    B' = s · B[:, K] · diag(g_K)       (out × k)
    lora_alpha' = r' = k               (so LoRA's own scale is exactly 1)

so that  B' A' x = s · B (g ⊙ A x).  Layouts:
- "exact": each module keeps its own rank k (through `rank_pattern` / `alpha_pattern`); modules whose
  gates are all zero are left out.
- "uniform": every module zero-padded to the largest k, none left out; for servers that need one rank per
  module type (TGI, LoRAX, SGLang).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save
from torch import nn

from .errors import InputError
from .io import atomic_dir, foreign_entries, name_list
from .layer import SoraLayer
from .optim import adapter_of, sora_layers
from .prox import DTensor
from .prune import _strip
from .ranks import exact_key, exact_targets

LAYOUTS = ("exact", "uniform")
FILES = ("adapter_config.json", "adapter_model.safetensors")  # all an export writes: nothing else is replaced
# The weights' safetensors metadata (which LoRA loaders ignore): how `sora export` tells an earlier export, which it
# may replace, from an adapter of yours with the same two files, which it must not.
MARK = {"format": "pt", "written_by": "soralib.export_lora"}


def lora_factors(layer: SoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of one module: the kept ranks, with gate and scaling folded into B'."""
    gate = layer.sora_gate[adapter].detach()
    keep = gate != 0
    A = layer.sora_A[adapter].weight.detach()[keep]
    B = layer.sora_B[adapter].weight.detach()[:, keep] * (layer.scaling[adapter] * gate[keep])
    return A.contiguous(), B.contiguous()


def _pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - A.shape[0]
    return (torch.cat([A, A.new_zeros(extra, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1))


def export_lora(model: nn.Module, out_dir: str | os.PathLike, layout: str = "exact", adapter: str | None = None) -> Path:
    """Write `out_dir/adapter_config.json` and `out_dir/adapter_model.safetensors` (peft_type "LORA").

    `model` is a PeftModel (or a model with SoRA layers and a `peft_config`). The task head and other
    `modules_to_save` go with it. The directory is replaced whole, never left half-written; one that holds
    anything else (a file of yours, a sub-directory) is refused with InputError and kept as it was.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        # Each rank holds only shards: DTensors refuse the kept-rank indexing, and a gather on rank 0 alone hangs.
        raise ValueError("export_lora needs an unsharded model, got FSDP2-sharded (DTensor) parameters; gather the full "
                         "state dict and export an unsharded copy on rank 0 (docs/distributed.md)")
    in_the_way = foreign_entries(out_dir, FILES)
    if in_the_way:
        raise InputError(f"{out_dir} holds {name_list(in_the_way)}, which an export does not write; "
                         "move them out or choose another directory")
    adapter = adapter_of(model, adapter)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter not in configs:
        have = ", ".join(configs) if isinstance(configs, dict) else "none (not a PEFT model)"
        raise ValueError(f"no SoRA adapter {adapter!r} to export; adapters: {have}")
    config = configs[adapter]
    factors = {_strip(name): lora_factors(layer, adapter) for name, layer in sora_layers(model)
               if adapter in layer.sora_gate}
    if not factors:
        raise ValueError(f"the model has no SoRA layers for adapter {adapter!r}")
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    top = max(max(ranks.values()), 1)  # LoRA refuses r=0: an all-zero uniform export keeps one zero rank
    if layout == "uniform":
        factors = {name: _pad(A, B, top) for name, (A, B) in factors.items()}
        ranks = {name: top for name in factors}
    else:
        factors = {name: f for name, f in factors.items() if ranks[name] > 0}
        ranks = {name: ranks[name] for name in factors}
    if not factors:
        raise ValueError("every gate is zero: the adapter is empty; export with layout='uniform' to get zero LoRA")

    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    # modules_to_save (the task head) are saved by PEFT in a method-independent format: reuse it as is. Not the
    # embedding layers, which PEFT adds whole when lm_head or embed_tokens is a target (for a resized vocabulary):
    # the base model's own weights, a full vocab x hidden copy, which verify_adapter rightly refuses.
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False).items():
        if "sora_" not in key:
            tensors[key] = value.detach().contiguous()

    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a diverged run: verify_adapter and any loader's outputs would reject it anyway
        raise ValueError(f"the adapter holds NaN or Inf in {bad}; nothing exported (the training diverged)")

    is_conv1d = {n for n, layer in sora_layers(model) if adapter in layer.sora_gate and layer.fan_in_fan_out}
    # Each module's own scale (its lora_alpha and r_max, rsLoRA or not) is folded into B', so alpha' = r' = k.
    names = sorted(factors)
    pattern = {exact_key(name): ranks[name] for name in names if ranks[name] != top}
    lora_config = LoraConfig(
        r=top, lora_alpha=top,
        target_modules=exact_targets(names, model),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None,
        fan_in_fan_out=bool(is_conv1d),
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        task_type=config.task_type,
        lora_dropout=0.0,
        bias="none",
    )
    with atomic_dir(out_dir) as tmp:
        (tmp / FILES[1]).write_bytes(sorted_metadata(save({k: v.cpu() for k, v in tensors.items()}, metadata=MARK)))
        lora_config.save_pretrained(str(tmp))
        json.loads((tmp / "adapter_config.json").read_text())  # fail here, not at load time, on a bad config
    return Path(out_dir)


def sorted_metadata(data: bytes) -> bytes:
    """`data` (a safetensors file) with its metadata keys in sorted order.

    safetensors writes the metadata from a Rust HashMap, whose order changes from one call to the next: the
    same adapter exported twice would differ in bytes, and a same-seed rerun would not be bitwise identical.
    Both orders serialise to the same length, so the data offsets and header padding stay as they are.
    """
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size]
    written = json.loads(header).get("__metadata__") or {}
    as_written, ordered = (json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()
                           for m in (written, dict(sorted(written.items()))))
    return data[:8] + header.replace(as_written, ordered, 1) + data[8 + size:]


def written_by_export(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds adapter weights export_lora wrote (their metadata carries MARK)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(directory) / FILES[1]), "pt") as weights:
            return (weights.metadata() or {}).get("written_by") == MARK["written_by"]
    except (OSError, SafetensorError):
        return False
