"""LoRA adapters in PEFT's format, for transformers' `LlamaForCausalLM`, both ways.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r); `lm_head` for our `output`. The module names are transformers' (`llama.formats.hf.hf_key`,
from the weights table). transformers' q/k rows are permuted per head relative to Meta's
(rotate-half RoPE), so its W_q = P W_q(Meta) and the same P applies to the adapter:
P (B A) = (P B) A, i.e. lora_B of every weight with `rope_heads` (wq: n_heads, wk: n_kv_heads) is
permuted, lora_A is not.

This module converts state dicts and files only (a format: it imports the core and formats).
`llama.lora` holds the adapters of a built model; `llama.train.finetune.load_peft_adapter` joins
the two.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.env import DirLock, StagedFiles
from llama.formats.hf import hf_key, permute_from_hf, permute_to_hf
from llama.model import LINEARS, TOP_WEIGHTS, ModelArgs, weight_info

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
ADAPTER_KINDS = ("lora_A", "lora_B")
# Config options whose non-default value changes the math or adds weights we do not have.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layer_replication": None, "trainable_token_indices": None,
                "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False}


def peft_module_name(name: str) -> str:
    """Our module name -> transformers': "layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj"."""
    return hf_key(name + ".weight").removesuffix(".weight")


def peft_target(target: str) -> str:
    """A LoRA target short name -> PEFT's target_modules entry: "wq" -> "q_proj", "output" -> "lm_head"."""
    path = next((p for p in LINEARS if p.rsplit(".", 1)[1] == target), target)
    return weight_info(f"layers.0.{path}.weight" if path in LINEARS else f"{path}.weight").hf.rsplit(".", 1)[-1]


def lora_modules_of(args: ModelArgs) -> list[str]:
    """Every module of a model with `args` that can carry an adapter: the projections of each block
    and the output projection."""
    top = [name for name, w in TOP_WEIGHTS.items() if w.tp == "colwise"]
    return [f"layers.{i}.{p}" for i in range(args.n_layers) for p in LINEARS] + top


def _rope_heads(module: str, args: ModelArgs) -> int | None:
    heads = weight_info(module + ".weight").rope_heads
    return None if heads is None else getattr(args, heads)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def to_peft(adapters: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our adapter state dict ("layers.0.attention.wq.lora_B.weight": (out, r), ...) -> PEFT's keys
    and q/k row order."""
    out = {}
    for key, v in adapters.items():
        module, kind = key.rsplit(".", 2)[:2]  # "layers.0.attention.wq", "lora_B"
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"{key!r} is not an adapter key (<module>.lora_A.weight or .lora_B.weight)")
        v = _full(v).detach()
        heads = _rope_heads(module, args)
        if kind == "lora_B" and heads is not None:
            v = permute_to_hf(v, heads)
        out[f"{PREFIX}{peft_module_name(module)}.{kind}.weight"] = v
    return out


def peft_config(lora: dict, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for adapters described by `lora` ({"r", "alpha", "dropout", "targets",
    "scaling"}, as `llama.lora.lora_config` gives)."""
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": [peft_target(t) for t in lora["targets"]],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }
    scaling, alpha, r = lora.get("scaling", lora["alpha"] / lora["r"]), lora["alpha"], lora["r"]
    if abs(scaling - alpha / r) > 1e-12 * abs(scaling):
        if abs(scaling - alpha / r ** 0.5) > 1e-12 * abs(scaling):
            raise ValueError(f"adapter scaling {scaling} is neither alpha / r nor alpha / sqrt(r): PEFT cannot express it")
        cfg["use_rslora"] = True
    return cfg


def save_peft_adapter(adapters: dict[str, torch.Tensor], lora: dict, args: ModelArgs, out_dir: str | os.PathLike,
                      base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write adapters (our keys, full tensors: `llama.lora.lora_state_dict` of an unsharded model, or
    gathered) with their `lora` description as a PEFT LoRA adapter for transformers'
    LlamaForCausalLM: adapter_config.json + adapter_model.safetensors in `out_dir`, moved into place
    together (`StagedFiles`: never new weights beside an older adapter's config, whose alpha would
    scale them)."""
    from safetensors.torch import save_file

    tensors = to_peft(adapters, args)
    out_dir = Path(out_dir)
    tensors = {k: v.to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in tensors.items()}
    with DirLock(out_dir, "adapter export"), StagedFiles(out_dir) as files:
        save_file(tensors, files.path(WEIGHTS), metadata={"format": "pt"})
        files.write_text(json.dumps(peft_config(lora, base_model_name_or_path), indent=2) + "\n", CONFIG)
    return out_dir


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read for a model with given args: `adapters` in our keys and row order
    (full tensors), each module's `alphas`, `rslora`, `dropout`, and the full `base_weights` PEFT
    stores when it targets lm_head / embed_tokens (our keys; they replace the base model's)."""

    config: dict
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    dropout: float = 0.0
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {adapter_dir}; a PEFT adapter folder holds {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    for k, default in _UNSUPPORTED.items():
        v = cfg.get(k, default)
        if v not in (default, [], {}) and not (k == "bias" and v is None):
            raise ValueError(f"{path}: {k}={v!r} is not supported (only plain LoRA: {k}={default!r})")
    return cfg


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(adapter_dir / WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {adapter_dir / WEIGHTS}: it is truncated or corrupt ({e})") from None
    if (adapter_dir / LEGACY_WEIGHTS).is_file():
        return torch.load(adapter_dir / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS} (or {LEGACY_WEIGHTS}) in {adapter_dir}")


def _pattern_value(patterns: dict, peft_name: str, default):
    # PEFT's rule: a pattern key matches a module name that ends with it after a dot (or equals it)
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", peft_name):
            return value
    return default


def read_peft_adapter(adapter_dir: str | os.PathLike, args: ModelArgs) -> PeftAdapter:
    """Read a PEFT LoRA adapter written for transformers' LlamaForCausalLM, for our model with `args`:
    checked to be plain LoRA (clear errors for DoRA, biases, modules_to_save, ...), every key mapped
    to one of the model's projections, alpha from lora_alpha / alpha_pattern, the q/k permutation of
    lora_B undone."""
    adapter_dir = Path(adapter_dir)
    cfg = _read_config(adapter_dir)
    tensors = _read_tensors(adapter_dir)
    names = {peft_module_name(m): m for m in lora_modules_of(args)}
    embed, head = hf_key("tok_embeddings.weight")[:-7], hf_key("output.weight")[:-7]  # model.embed_tokens, lm_head
    out = PeftAdapter(cfg, rslora=bool(cfg.get("use_rslora")), dropout=float(cfg.get("lora_dropout") or 0.0))
    for key, v in tensors.items():
        m = re.fullmatch(rf"(?:{re.escape(PREFIX)})?({re.escape(embed)}|{re.escape(head)})(?:\.base_layer)?\.weight", key)
        if m is not None:  # peft saves the whole lm_head / embed_tokens when targeted
            out.base_weights["tok_embeddings.weight" if m.group(1) == embed else "output.weight"] = v
            continue
        m = re.fullmatch(rf"(?:{re.escape(PREFIX)})?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None or m.group(1) not in names:
            raise ValueError(f"{adapter_dir}: weight {key!r} does not belong to a LoRA projection of this "
                             f"model ({args.n_layers} layers; projections q/k/v/o_proj, gate/up/down_proj, lm_head)")
        module, kind = names[m.group(1)], m.group(2)
        heads = _rope_heads(module, args)
        if kind == "lora_B" and heads is not None:
            v = permute_from_hf(v, heads)
        out.adapters[f"{module}.{kind}.weight"] = v
        out.alphas[module] = float(_pattern_value(cfg.get("alpha_pattern"), m.group(1), cfg.get("lora_alpha", 8)))
    if not out.adapters:
        raise ValueError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return out
