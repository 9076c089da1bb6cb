"""Fine-tuning: what a training run that starts from trained weights needs on top of the loop.

- `init_from`: the initial weights and the architecture come from a Meta checkpoint directory
  (params.json + consolidated.NN.pth, any shard count; this library's exports are such), a
  transformers LLaMA folder (config.json + safetensors), or a training checkpoint of this library
  (`out_dir/checkpoints/step_NNNNNNNN`, or the run's out_dir for its latest). Every rank loads only
  what it holds: its tensor-parallel slice of a Meta checkpoint (`load_tp_slice`), the whole model
  otherwise, which FSDP then shards over dp.
- `lora`: adapters on a frozen base (`llama.lora.apply_lora`), applied after tensor parallel and
  before activation checkpointing, compile and FSDP; the base may be held in bf16 (`base_dtype`)
  while the adapters and their optimizer state stay fp32. Checkpoints then hold the adapters only.
- `data_format` alpaca / chat / documents: examples with loss masks from JSON(L) files
  (`llama.data.instruct`), batched by length (`InstructLoaders` makes the trainer's loaders).
- the export: the merged model in Meta's layout, the adapter in PEFT's format next to it
  (`export_dir/peft`), and a transformers folder on request.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llama.chat import trained_chat_template
from llama.data.instruct import InstructLoader, load_instruct
from llama.env import atomic_write_text, parse_dtype
from llama.formats.gguf import load_tokenizer, open_gguf, read_args, read_state_dict, save_gguf_tokenizer
from llama.formats.hf import CONFIG as HF_CONFIG
from llama.formats.hf import load_hf, read_hf_config, save_hf
from llama.formats.locate import tokenizer_beside
from llama.formats.meta import PARAMS, load_consolidated, load_params, load_tp_slice, \
    save_meta_checkpoint, tp_slices
from llama.formats.peft import read_peft_adapter, save_peft_adapter
from llama.lora import apply_lora, apply_lora_weights, copy_full, is_lora_key, lora_config, \
    mark_only_lora_trainable, merged_state_dict
from llama.model import ModelArgs, Transformer
from llama.parallel import assign_local_shards
from llama.train.checkpoint import CKPT_PREFIX, META, dcp_load, read_checkpoint_meta
from llama.train.config import TrainConfig

PEFT_DIR = "peft"  # the adapter's folder inside export_dir
EXPORT_MARK = "export.json"  # in each export folder: the run (out_dir) that wrote it, and at what step


# -- where the initial weights come from ----------------------------------------------------------


def init_source(path: str | Path) -> tuple[str, Path]:
    """("meta" | "hf" | "checkpoint" | "gguf", path) of an `init_from` path; a run's out_dir means its
    latest checkpoint."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":  # llama.cpp's file: weights and tokenizer in one
        return "gguf", p
    if not p.is_dir():
        raise FileNotFoundError(f"init_from {p} does not exist; give a Meta checkpoint directory, a "
                                f"transformers folder, a .gguf file or a training checkpoint")
    if (p / PARAMS).is_file():
        return "meta", p
    if (p / META).is_file():
        return "checkpoint", p
    if (p / "checkpoints").is_dir():  # a run's out_dir (its config.json is the run's, not transformers')
        ckpts = sorted((c for c in (p / "checkpoints").glob(CKPT_PREFIX + "*") if (c / META).is_file()),
                       key=lambda c: c.name)
        if not ckpts:
            raise FileNotFoundError(f"init_from {p} is a run directory without a complete checkpoint")
        return "checkpoint", ckpts[-1]
    if (p / HF_CONFIG).is_file():
        return "hf", p
    raise FileNotFoundError(f"init_from {p} holds no {PARAMS} (Meta layout), {HF_CONFIG} (transformers) or "
                            f"{META} (training checkpoint), nor a checkpoints/ folder of a run")


def init_args(cfg: TrainConfig) -> ModelArgs:
    """The architecture of `cfg.init_from`. The `model` field is not used; of the model overrides
    only max_seq_len (the RoPE table's length) may change."""
    kind, path = init_source(cfg.init_from)
    other = sorted(set(cfg.model_overrides) - {"max_seq_len"})
    if other:
        raise ValueError(f"init_from {cfg.init_from} fixes the architecture; model.{other[0]} cannot be "
                         f"overridden (only model.max_seq_len)")
    overrides = dict(cfg.model_overrides)
    if kind == "meta":
        return load_params(path, **overrides)
    if kind == "hf":
        return read_hf_config(path, **overrides)
    if kind == "gguf":
        return read_args(open_gguf(path), **overrides)
    meta = read_checkpoint_meta(path)
    if meta["config"].get("lora"):
        raise ValueError(f"init_from {path} is a checkpoint of a LoRA run, which holds only the adapters; start "
                         f"from that run's export (its merged model) or resume the run instead")
    return ModelArgs.from_dict(meta["model_args"], **overrides)


def init_tokenizer(cfg: TrainConfig) -> str | None:
    """The tokenizer of the run: `cfg.tokenizer`, else the one shipped with init_from (inside a
    checkpoint's record or a .gguf; beside a folder: `tokenizer_beside`)."""
    if cfg.tokenizer or not cfg.init_from:
        return cfg.tokenizer
    kind, path = init_source(cfg.init_from)
    if kind == "checkpoint":
        return read_checkpoint_meta(path)["config"].get("tokenizer")
    if kind == "gguf":
        return str(path)  # the vocabulary inside the file (llama.formats.gguf.load_tokenizer reads it)
    found = tokenizer_beside(path)
    return str(found) if found else None


def _full_state_dict(kind: str, path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    if kind == "meta":
        return load_consolidated(path)
    if kind == "hf":
        return load_hf(path)[0]
    if kind == "gguf":
        return read_state_dict(open_gguf(path), args)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp_load(state, path, distributed=False)  # the safe reader: no code runs from the checkpoint
    return state["model"]


def load_initial_weights(model: Transformer, init_from: str | Path, device: torch.device, dtype: torch.dtype,
                         tp_mesh=None, tp_rank: int = 0) -> None:
    """Fill `model` (built on the meta device; tensor-parallel when `tp_mesh` is given) with the
    weights of `init_from`, in `dtype` on `device`, trainable. Under tensor parallelism each rank
    reads only its slice of a Meta checkpoint (other sources are read whole, then sliced)."""
    kind, path = init_source(init_from)
    if tp_mesh is not None and tp_mesh.size() > 1:
        tp = tp_mesh.size()
        if kind == "meta":
            local = load_tp_slice(path, tp_rank, tp)
        else:
            local = tp_slices(_full_state_dict(kind, path, model.args), tp_rank, tp)
        assign_local_shards(model, local, tp_mesh, device, dtype)
    else:
        sd = _full_state_dict(kind, path, model.args)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.requires_grad_(True)
    model.init_buffers(device)


# -- LoRA --------------------------------------------------------------------------------------


def add_lora(model: Transformer, lora: dict, base_dtype: str | None) -> dict:
    """Freeze the base (cast to `base_dtype` if given), add fp32 adapters; returns `lora_config`."""
    if base_dtype is not None:
        model.to(parse_dtype(base_dtype))
    apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"],
               dtype=torch.float32)
    return lora_config(model)


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, dropout: float | None = None,
                      dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Apply a PEFT LoRA adapter written for transformers' LlamaForCausalLM to `model` (a plain
    Transformer, or tensor-parallel after apply_tp) in place: adapters on exactly the modules the
    file holds, rank from the tensors, alpha per module (alpha_pattern, rsLoRA honoured), the q/k
    row permutation undone, full lm_head / embed_tokens the file carries loaded over the base's;
    only the adapters stay trainable. Returns `model`."""
    adapter = read_peft_adapter(adapter_dir, model.args)
    params = dict(model.named_parameters())
    for k, v in adapter.base_weights.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(f"{adapter_dir}: the adapter carries a full {k} of shape {tuple(v.shape)}, which does "
                             f"not fit this model ({tuple(params[k].shape)})")
    apply_lora_weights(model, adapter.adapters, adapter.alphas, rslora=adapter.rslora,
                       dropout=adapter.dropout if dropout is None else dropout, dtype=dtype)
    with torch.no_grad():  # peft loads these over the base model's: so do we
        for k, v in adapter.base_weights.items():
            copy_full(params[k], v.to(params[k].dtype))
    mark_only_lora_trainable(model)
    return model


# -- data ---------------------------------------------------------------------------------------


class InstructLoaders:
    """The trainer's `make_loader` for alpaca / chat / documents data: the files are read and
    tokenized once (split into train and a held-out val by `val_fraction`), then each call gives an
    `InstructLoader` over one split for one dp rank."""

    def __init__(self, cfg: TrainConfig, tokenizer_path: str, progress: bool = True):
        tok = load_tokenizer(tokenizer_path)  # tokenizer.model, or the vocabulary of a .gguf
        self.data = load_instruct(cfg.data, tok, cfg.seq_len, format=cfg.data_format,
                                  train_on_input=cfg.train_on_input, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                  progress=progress)
        if cfg.eval_batches and not self.data.val:  # evaluation runs at least at the end
            if cfg.val_fraction > 0:
                raise ValueError(f"val_fraction {cfg.val_fraction:g} held out none of the {self.data.n_records} "
                                 f"records of {cfg.data} for evaluation: raise val_fraction or set eval_batches 0")
            raise ValueError(f"no held-out examples in {cfg.data} for evaluation: set val_fraction > 0 (e.g. 0.05) "
                             f"or eval_batches 0")
        self.pad_id = 0  # never a target: padded positions carry target -100

    def describe(self, cfg: TrainConfig) -> str:
        """The data and how many passes over it the run makes, for the run's first lines."""
        rows = cfg.global_batch_tokens // cfg.seq_len  # examples a step
        return (f"fine-tuning data: {self.data.summary()}; {cfg.steps} steps x {rows} examples = "
                f"{cfg.steps * rows / len(self.data.train):.2f} epochs")

    def __call__(self, cfg: TrainConfig, split: str, dp_rank: int, dp_size: int, seed: int) -> InstructLoader:
        examples = self.data.train if split == "train" else self.data.val
        return InstructLoader(examples, cfg.seq_len, cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                              seed=seed, pad_id=self.pad_id)


# -- export ---------------------------------------------------------------------------------------


def export_model(state_dict: dict[str, torch.Tensor], args: ModelArgs, cfg: TrainConfig, out_dir: str | Path,
                 num_shards: int = 1, dtype: torch.dtype = torch.float16, lora: dict | None = None,
                 step: int = 0) -> Path:
    """Write a gathered model state dict (full tensors): the merged model in Meta's layout in
    `out_dir`; with `lora`, the adapter alone in PEFT's format in out_dir/peft; and the merged model
    in transformers' format in `cfg.export_hf` when set. Each folder gets `EXPORT_MARK` (this run
    may export there again; `check_export_dirs`)."""
    merged = merged_state_dict(state_dict, lora["scaling"]) if lora else state_dict
    gguf_vocab = bool(cfg.tokenizer) and Path(cfg.tokenizer).suffix.lower() == ".gguf"
    spm_model = None if gguf_vocab else cfg.tokenizer
    # the chat template travels with the model: Llama 2's after chat data (the format it was trained
    # in), else the base's own, if any
    template = trained_chat_template(cfg.data_format)
    out = save_meta_checkpoint(merged, args, out_dir, num_shards=num_shards, dtype=dtype,
                               tokenizer_path=spm_model, overwrite=True, chat_template=template)
    if gguf_vocab:  # the vocabulary travels beside the weights as a vocabulary-only GGUF
        tok = load_tokenizer(cfg.tokenizer)
        tok.chat_template = template or tok.chat_template
        save_gguf_tokenizer(tok, Path(out_dir) / "tokenizer.gguf", overwrite=True)
    elif spm_model:
        template = template or load_tokenizer(spm_model).chat_template  # for export_hf
    if lora:
        save_peft_adapter({k: v for k, v in state_dict.items() if is_lora_key(k)}, lora, args, Path(out_dir) / PEFT_DIR,
                          base_model_name_or_path=cfg.init_from)
    mark_export(out_dir, cfg, step)
    if cfg.export_hf:
        save_hf(merged, args, cfg.export_hf, dtype=dtype, tokenizer_path=spm_model, overwrite=True,
                chat_template=template)
        mark_export(cfg.export_hf, cfg, step)
    return out


def check_export_dirs(cfg: TrainConfig) -> None:
    """Before any training: export_dir and export_hf may be new or empty folders, or ones this run
    (its out_dir) exported to before; never init_from, nor a folder holding anything else (a model
    the user keeps would be overwritten at the end)."""
    for key in ("export_dir", "export_hf"):
        folder = getattr(cfg, key)
        if not folder:
            continue
        d = Path(folder).resolve()
        if cfg.init_from and d == Path(cfg.init_from).resolve():
            raise ValueError(f"{key} {folder} is init_from: the export would overwrite the model this run starts "
                             f"from; choose another {key}")
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{key} {folder} is a file; give a folder to export to")
        if not d.is_dir() or not any(p.name != ".lock" for p in d.iterdir()):
            continue
        if not _exported_by(d, key, cfg):
            raise FileExistsError(f"{key} {folder} already holds files that this run (out_dir {cfg.out_dir}) did "
                                  f"not export; choose a new or empty {key}, or remove it")


def _exported_by(folder: Path, key: str, cfg: TrainConfig) -> bool:
    """Whether this run wrote `folder`: its EXPORT_MARK names this out_dir, or (an export from before
    the mark, or a project moved elsewhere) the config the run saved in out_dir names this folder."""
    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
    if read(folder / EXPORT_MARK).get("run") == str(Path(cfg.out_dir).resolve()):
        return True
    saved = read(Path(cfg.out_dir) / "config.json").get(key)
    return bool(saved) and Path(saved).resolve() == folder


def mark_export(folder: str | Path, cfg: TrainConfig, step: int) -> None:
    atomic_write_text(json.dumps({"run": str(Path(cfg.out_dir).resolve()), "step": step}) + "\n",
                      Path(folder) / EXPORT_MARK)


def describe(cfg: TrainConfig, model: nn.Module) -> str:
    """What is trained, for the run's first line: "LoRA r 8 alpha 16 on wq wv from DIR: 0.08M of 20.14M
    parameters trained"."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"LoRA r {cfg.lora['r']} alpha {cfg.lora['alpha']:g} on {' '.join(cfg.lora['targets'])}" if cfg.lora
            else "full fine-tuning")
    src = f" from {cfg.init_from}" if cfg.init_from else ""
    return f"{what}{src}: {trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained"


def check_resume(meta: dict, cfg: TrainConfig, ckpt: Path) -> None:
    """A checkpoint resumes only the same kind of run (the same LoRA settings and data format)."""
    saved = {k: meta["config"].get(k, d) for k, d in (("lora", None), ("data_format", "tokens"))}
    now = {"lora": cfg.lora, "data_format": cfg.data_format}
    diff = [f"{k} {saved[k]!r} != {now[k]!r}" for k in now if saved[k] != now[k]]
    if diff:
        raise ValueError(f"checkpoint {ckpt} is from another kind of run ({'; '.join(diff)}); use the same "
                         f"settings, another out_dir, or resume=never")


