"""Conversion to and from transformers' LLaMA format (config.json + safetensors).

transformers names the weights differently and applies RoPE to halves (j, j + head_dim/2) of each
head instead of Meta's adjacent pairs (2j, 2j+1); its checkpoints therefore hold wq/wk with the
rows of every head permuted. `to_hf` / `from_hf` rename and (un)permute; wk uses n_kv_heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llama.config import read_json_object
from llama.env import DirLock, StagedFiles, parse_dtype
from llama.formats.meta import TOKENIZER, cast_weight, check_state_dict, load_consolidated, load_params, own_storage, \
    save_meta_checkpoint
from llama.model import ModelArgs, state_dict_keys, weight_info
from llama.tokenizer import Tokenizer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

def hf_key(key: str) -> str:
    """transformers' name of our (Meta's) parameter `key`."""
    hf = weight_info(key).hf + ".weight"
    if key.startswith("layers."):
        return f"model.layers.{key.split('.')[1]}.{hf}"
    return hf


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved RoPE pairs to transformers' rotate-half order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our (Meta's) state dict -> transformers' LlamaForCausalLM state dict."""
    sd = {k: v for k, v in state_dict.items() if k != "rope.freqs"}
    check_state_dict({k: v.shape for k, v in sd.items()}, args, what="state dict")
    out = {}
    for k, v in sd.items():
        heads = weight_info(k).rope_heads
        out[hf_key(k)] = v if heads is None else permute_to_hf(v, getattr(args, heads))
    if args.tie_embeddings:  # transformers' own state dict lists the tied lm_head too
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf(hf_state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers' LlamaForCausalLM state dict -> ours (Meta's keys). Strict: extra or missing keys
    are an error (rotary inv_freq buffers are ignored)."""
    names = {hf_key(k): k for k in state_dict_keys(args)}
    hf = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_embeddings and "lm_head.weight" in hf:  # a tied lm_head may be listed; it must be the embedding
        lm_head = hf.pop("lm_head.weight")
        if "model.embed_tokens.weight" in hf and not torch.equal(lm_head, hf["model.embed_tokens.weight"]):
            raise ValueError("transformers checkpoint has tie_word_embeddings=true but an lm_head.weight that "
                             "differs from model.embed_tokens.weight; set tie_word_embeddings to false")
    missing = [k for k in names if k not in hf]
    unexpected = [k for k in hf if k not in names]
    if missing or unexpected:
        raise ValueError(f"transformers checkpoint does not match config.json: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    out = {}
    for hk, k in names.items():
        heads = weight_info(k).rope_heads
        out[k] = hf[hk] if heads is None else permute_from_hf(hf[hk], getattr(args, heads))
    check_state_dict({k: v.shape for k, v in out.items()}, args, what="transformers checkpoint")
    return out


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float16, bos_id: int = 1, eos_id: int = 2) -> dict:
    """The config.json of transformers' LlamaConfig for `args` (bos/eos: Meta's ids unless given)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def ffn_fields(dim: int, hidden: int) -> dict:
    # ModelArgs derives the hidden width from dim: find multiple_of / ffn_dim_multiplier giving `hidden`
    base = int(2 * 4 * dim / 3)
    for multiple_of, mult in ((256, None), (hidden, None), (hidden, hidden / base)):
        h = base if mult is None else int(mult * base)
        if h > 0 and multiple_of * math.ceil(h / multiple_of) == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise ValueError(f"intermediate_size {hidden} cannot be expressed with hidden_size {dim}")


def args_from_hf_config(cfg: dict, **overrides) -> ModelArgs:
    """ModelArgs from a transformers LlamaConfig dict; configs this architecture cannot represent
    (biases, RoPE scaling, another activation or model type) are refused."""
    problems = []
    if cfg.get("model_type", "llama") != "llama":
        problems.append(f"model_type {cfg['model_type']!r} (only 'llama')")
    for k in ("attention_bias", "mlp_bias"):
        if cfg.get(k, False):
            problems.append(f"{k}=true (LLaMA has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (only 'silu')")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {cfg.get('rope_scaling') or rope} (only plain RoPE)")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // heads) or dim % heads:
        problems.append(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError("cannot represent this transformers config as a LLaMA model: " + "; ".join(problems))
    fields = dict(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **ffn_fields(dim, cfg["intermediate_size"]),
    )
    args = ModelArgs(**{**fields, **overrides})
    if args.ffn_hidden_dim != cfg["intermediate_size"]:
        raise ValueError(f"intermediate_size {cfg['intermediate_size']} cannot be expressed with hidden_size {dim}")
    return args


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
            dtype: torch.dtype | None = None, tokenizer_path: str | Path | None = None,
            max_shard_size: int | None = None, overwrite: bool = False, chat_template: str | None = None) -> Path:
    """Write our state dict as a transformers LLaMA checkpoint: config.json and model.safetensors
    (or model-0000i-of-0000n.safetensors + index past `max_shard_size` bytes), and
    tokenizer.model with a tokenizer_config.json when `tokenizer_path` is given (its chat_template:
    `chat_template`, else the one beside tokenizer_path, if any). A folder that already holds a model
    is only replaced with `overwrite`; the files move into place together once all are written
    (`StagedFiles`: a write that fails halfway leaves the folder as it was)."""
    out_dir = Path(out_dir)
    with DirLock(out_dir, "conversion"), StagedFiles(out_dir) as staged:
        old = sorted(p.name for p in out_dir.iterdir() if p.name == CONFIG or p.name.endswith(".safetensors")
                     or p.name == INDEX)
        if old and not overwrite:
            raise FileExistsError(f"{out_dir} already holds a model ({', '.join(old)}); choose an empty directory "
                                  f"or pass overwrite=True (--overwrite)")
        _write_hf(state_dict, args, staged, dtype, tokenizer_path, max_shard_size, chat_template)
    return out_dir


def _write_hf(state_dict, args, staged: StagedFiles, dtype, tokenizer_path, max_shard_size, chat_template=None) -> None:
    from safetensors.torch import save_file

    hf = to_hf(state_dict, args)
    if args.tie_embeddings:  # safetensors stores no shared tensors; transformers re-ties on load
        del hf["lm_head.weight"]
    dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = next(iter(hf.values())).dtype
    groups, size = [[]], 0  # keys per file, in order
    for k, v in hf.items():
        n = v.numel() * dtype.itemsize
        if max_shard_size and groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    files = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                               for i in range(len(groups))]
    # the earlier model's weight files that this one does not overwrite: a stale index would win over
    # a single file written now (ours reads the index first), a stale model.safetensors over new
    # shards (transformers reads it first)
    for old in [SINGLE, INDEX, *(p.name for p in staged.folder.glob("model-*-of-*.safetensors"))]:
        if old not in files and not (old == INDEX and len(files) > 1):
            staged.remove(old)
    for name, keys in zip(files, groups):
        tensors = {k: own_storage(cast_weight(hf[k].detach().cpu(), dtype, k)) for k in keys}
        save_file(tensors, staged.path(name), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * dtype.itemsize for v in hf.values())},
                 "weight_map": {k: name for name, keys in zip(files, groups) for k in keys}}
        staged.write_text(json.dumps(index, indent=2) + "\n", INDEX)
    tok = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    ids = {} if tok is None else {"bos_id": tok.bos_id, "eos_id": tok.eos_id}  # the tokenizer's own ids
    staged.write_text(json.dumps(hf_config(args, dtype, **ids), indent=2) + "\n", CONFIG)
    if tok is not None:
        staged.copy(tokenizer_path, TOKENIZER)
        piece = lambda i: tok.sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
                   "unk_token": piece(tok.sp.unk_id()), "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": args.max_seq_len}
        template = chat_template or tok.chat_template
        if template:
            tok_cfg["chat_template"] = template
        staged.write_text(json.dumps(tok_cfg, indent=2) + "\n", "tokenizer_config.json")


def is_hf_checkpoint(path: str | Path) -> bool:
    """A transformers folder: no params.json, and a config.json that is transformers' (it names a
    model_type or architectures; a training run's folder holds a config.json of its own)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or (path / "params.json").is_file():
        return False
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return True  # (read_hf_config then says what is wrong with it)
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def read_hf_config(hf_dir: str | Path, **overrides) -> ModelArgs:
    path = Path(hf_dir) / CONFIG
    cfg = read_json_object(path, f"no {CONFIG} in {hf_dir}; a transformers checkpoint holds config.json and "
                                 f"model.safetensors")
    try:
        return args_from_hf_config(cfg, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_hf(hf_dir: str | Path, **overrides) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """(state dict with our keys, ModelArgs) from a transformers LLaMA checkpoint directory
    (model.safetensors, or shards listed in model.safetensors.index.json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    args = read_hf_config(hf_dir, **overrides)
    if (hf_dir / INDEX).is_file():
        try:
            files = sorted(set(json.loads((hf_dir / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{hf_dir / INDEX} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    elif (hf_dir / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {hf_dir} (only safetensors checkpoints are read)")
    hf = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{INDEX} lists {name}, which is missing from {hf_dir}")
        try:
            hf.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: it is truncated or corrupt ({e})") from None
    return from_hf(hf, args), args


def meta_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
               tokenizer_path: str | Path | None = None, max_shard_size: int | None = None,
               overwrite: bool = False) -> Path:
    """Convert a Meta checkpoint directory to transformers' format. The tokenizer defaults to
    tokenizer.model in `ckpt_dir` or its parent (Meta's layout), when present."""
    ckpt_dir = Path(ckpt_dir)
    args = load_params(ckpt_dir)
    sd = load_consolidated(ckpt_dir)
    if tokenizer_path is None:
        tokenizer_path = next((p for p in (ckpt_dir / TOKENIZER, ckpt_dir.parent / TOKENIZER) if p.is_file()), None)
    return save_hf(sd, args, out_dir, dtype=dtype, tokenizer_path=tokenizer_path, max_shard_size=max_shard_size,
                   overwrite=overwrite)


def hf_to_meta(hf_dir: str | Path, out_dir: str | Path, num_shards: int = 1,
               dtype: torch.dtype | None = torch.float16, tokenizer_path: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Convert a transformers LLaMA checkpoint to Meta's layout with `num_shards` shards. The
    tokenizer defaults to `hf_dir/tokenizer.model` when present."""
    sd, args = load_hf(hf_dir)
    if tokenizer_path is None and (Path(hf_dir) / TOKENIZER).is_file():
        tokenizer_path = Path(hf_dir) / TOKENIZER
    return save_meta_checkpoint(sd, args, out_dir, num_shards=num_shards, dtype=dtype,
                                tokenizer_path=tokenizer_path, overwrite=overwrite, chat_template=hf_chat_template(hf_dir))


def hf_chat_template(hf_dir: str | Path) -> str | None:
    """The chat template a transformers folder carries: tokenizer_config.json's "chat_template" (a
    string; the named-template list form gives its "default"), else chat_template.jinja."""
    hf_dir = Path(hf_dir)
    try:
        template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not template and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    return template or None
