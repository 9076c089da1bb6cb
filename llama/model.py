"""The LLaMA transformer: math only.

Parameter names are Meta's checkpoint keys, so `load_state_dict(strict=True)` needs no renaming.
Nothing here knows about devices, process groups or checkpoints: tensor parallelism, FSDP,
activation checkpointing, quantization and compile are transforms applied to a built model
(llama/parallel.py, llama/quantize.py). Projections are reshaped with `view(B, T, -1, head_dim)`
so that a tensor-parallel plan may shard heads across ranks. `WEIGHTS` says what each weight is:
the TP plan, Meta's shard layout, transformers' names and the initialisation all derive from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.blocked_attention import blocked_causal_attention
from llama.config import JsonConfig, coerce_fields
from llama.gpu_kernels import one_token_attention_on

ATTENTION_BACKENDS = ("sdpa", "xformers", "math", "blocked")


@dataclass
class ModelArgs(JsonConfig):
    """Architecture of a LLaMA model: the fields of Meta's params.json plus the Llama 2 extensions.
    `ModelArgs.from_name` reads a preset of llama/configs/models ("7B", "13B", "33B" or "30B", "65B",
    "tiny", ...) or a params.json / config JSON path."""

    KIND, WHAT = "models", "model config"  # for JsonConfig (class attributes, not fields)

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention (Llama 2); None means n_heads
    vocab_size: int = 32000  # params.json has -1: filled from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None  # Llama 2
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # Llama 2 / Code Llama
    max_seq_len: int = 2048  # length of the RoPE table; the context the model was trained for
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight (one tensor; no output.weight key)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ModelArgs":
        """From a params.json-like dict; unknown keys are an error, vocab_size -1 keeps the default."""
        d = {**d, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if "use_scaled_rope" in unknown:
            raise ValueError("use_scaled_rope: Llama 3.1's scaled RoPE is not supported (LLaMA 1 and 2 models are)")
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; valid fields are {sorted(known)}")
        d = coerce_fields(cls, d)  # a null vocab_size is the default already
        if d.get("vocab_size", 0) < 0:
            d.pop("vocab_size")
        return cls(**d)


    def to_params_json(self) -> dict:
        """The fields Meta's params.json holds (plus the Llama 2 ones when they are set). Not max_seq_len:
        Meta's loaders pass it beside the file's keys (a second one is a TypeError); it goes in
        llama.formats.meta.CONTEXT beside params.json."""
        d = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
             "n_layers": self.n_layers, "norm_eps": self.norm_eps, "vocab_size": self.vocab_size}
        if self.n_kv_heads != self.n_heads:
            d["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            d["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            d["rope_theta"] = self.rope_theta
        if self.tie_embeddings:
            d["tie_embeddings"] = True
        return d


# ---------------------------------------------------------------------------------------------
# what each weight is


@dataclass(frozen=True)
class Weight:
    """The facts about one weight that every transform and format needs.

    tp: the tensor-parallel style, "colwise" (split the output features / vocabulary rows),
        "rowwise" (split the input features; the embedding: its vocabulary rows) or None (replicated);
    tp_dim: the dimension of the weight that `tp` splits;
    meta_dim: the dimension Meta's consolidated.NN.pth files split across model-parallel shards;
    hf: transformers' LlamaForCausalLM name (after `model.layers.N.` for the weights of a block);
    init: "normal" N(0, std), "residual" N(0, std / sqrt(2 n_layers)) (outputs of a residual
        branch, GPT-2's rule), or "ones";
    rope_heads: for wq / wk, the ModelArgs field counting the heads whose rows carry RoPE pairs
        (transformers' rotate-half order permutes those rows).
    """

    tp: Optional[str]
    tp_dim: Optional[int]
    meta_dim: Optional[int]
    hf: str
    init: str
    rope_heads: Optional[str] = None


# Weights of a block, by module path inside `layers.N`, in the order the fused CPU decoder reads them.
LAYER_WEIGHTS = {
    "attention.wq": Weight("colwise", 0, 0, "self_attn.q_proj", "normal", rope_heads="n_heads"),
    "attention.wk": Weight("colwise", 0, 0, "self_attn.k_proj", "normal", rope_heads="n_kv_heads"),
    "attention.wv": Weight("colwise", 0, 0, "self_attn.v_proj", "normal"),
    "attention.wo": Weight("rowwise", 1, 1, "self_attn.o_proj", "residual"),
    "feed_forward.w1": Weight("colwise", 0, 0, "mlp.gate_proj", "normal"),
    "feed_forward.w3": Weight("colwise", 0, 0, "mlp.up_proj", "normal"),
    "feed_forward.w2": Weight("rowwise", 1, 1, "mlp.down_proj", "residual"),
    "attention_norm": Weight(None, None, None, "input_layernorm", "ones"),
    "ffn_norm": Weight(None, None, None, "post_attention_layernorm", "ones"),
}
# Weights outside the blocks. Meta splits the embedding by features (dim 1); our plan by vocabulary.
TOP_WEIGHTS = {
    "tok_embeddings": Weight("rowwise", 0, 1, "model.embed_tokens", "normal"),
    "norm": Weight(None, None, None, "model.norm", "ones"),
    "output": Weight("colwise", 0, 0, "lm_head", "normal"),
}
LINEARS = tuple(k for k, w in LAYER_WEIGHTS.items() if w.tp is not None)  # the projections of a block


def weight_info(key: str) -> Weight:
    """The `Weight` of a parameter key such as "layers.3.attention.wq.weight" or "output.weight"."""
    module = key.removesuffix(".weight")
    if module in TOP_WEIGHTS:
        return TOP_WEIGHTS[module]
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_WEIGHTS:
        return LAYER_WEIGHTS[parts[2]]
    raise KeyError(f"{key!r} is not a LLaMA weight")


def state_dict_keys(args: ModelArgs) -> list[str]:
    """Every parameter key of a model with `args` (embedding, blocks in table order, norm, output;
    no output.weight when the embeddings are tied)."""
    return ([f"{k}.weight" for k in ("tok_embeddings",)]
            + [f"layers.{i}.{k}.weight" for i in range(args.n_layers) for k in LAYER_WEIGHTS]
            + [f"{k}.weight" for k in ("norm", "output") if not (k == "output" and args.tie_embeddings)])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in float32, then back to the input dtype before the scale (as Meta does)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """cos and sin of pos * theta^(-2j/head_dim): (end, head_dim // 2, 2), float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair (x[2j], x[2j+1]) of x (B, T, H, D) rotated by the angle of (cos, sin) (T, D/2), in
    float32, back in x's dtype. Real arithmetic (compile-friendly)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos, sin = cos.view(1, xs.size(1), 1, xs.size(3)), sin.view(1, xs.size(1), 1, xs.size(3))
    re, im = xs[..., 0], xs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


class _Rotary(torch.autograd.Function):
    """RoPE with its gradient written out: a rotation's gradient is the rotation by minus the angle.
    autograd's own derivation of `_rotate` goes back through the stack and the strided pair selects,
    which inductor compiles into a kernel 2.4x slower than the forward (a 60M training step: 20 of
    its 29 ms of RoPE)."""

    @staticmethod
    def forward(ctx, x, freqs_cis):
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's interleaved RoPE: (x[2j], x[2j+1]) is one complex number, rotated by freqs_cis[:, j].

    x: (B, T, H, D); freqs_cis: (T, D/2, 2) cos and sin. Computed in float32; no gradient flows to
    freqs_cis (a fixed table).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, freqs_cis)
    return _rotate(x, freqs_cis[..., 0], freqs_cis[..., 1])  # inference: no autograd.Function to enter


class KVCache:
    """Keys and values of every layer for up to `max_batch_size` rows of `max_seq_len` positions.

    Allocated by whoever generates, on the device and dtype it needs; `n_kv_heads` is the number
    of key/value heads this rank holds (all of them unless tensor parallel shards them).
    """

    def __init__(self, n_layers, max_batch_size, max_seq_len, n_kv_heads, head_dim, *, device=None, dtype=None):
        shape = (n_layers, max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def update(self, layer: int, pos: int | torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
        """Write (B, T, Hkv, D) keys/values at their positions and return what attention reads.

        `pos` an int: the T positions start there, and the filled prefix (B, pos + T, Hkv, D) is
        returned. `pos` a (T,) tensor of positions: they are written by index and the whole cache
        (B, max_seq_len, Hkv, D) is returned, so every decoding step has the same shapes (one
        torch.compile graph); attention masks the positions not written yet.
        """
        bsz, seqlen = xk.shape[:2]
        if isinstance(pos, int):
            end = pos + seqlen
            self.k[layer, :bsz, pos:end] = xk
            self.v[layer, :bsz, pos:end] = xv
            return self.k[layer, :bsz, :end], self.v[layer, :bsz, :end]
        # index_put_ on the whole cache, not on a view of it: inductor then writes in place instead of
        # copying the cache (a view's write would be functionalized into a full copy back)
        at = (torch.full((1, 1), layer, device=pos.device), torch.arange(bsz, device=pos.device)[:, None], pos[None, :])
        self.k.index_put_(at, xk.to(self.k.dtype))  # indices broadcast to (B, T)
        self.v.index_put_(at, xv.to(self.v.dtype))
        return self.k[layer, :bsz], self.v[layer, :bsz]  # (B, S, Hkv, D)


def causal_mask(seqlen: int, pos: int | torch.Tensor, n_keys: int | None = None, device=None) -> torch.Tensor:
    """Additive (T, S) mask: the new token at position p sees keys 0..p. With an int start position
    the keys are the filled prefix (S = pos + T: every cached key, new keys <= i); with a (T,)
    position tensor they are the whole cache of `n_keys` positions."""
    if isinstance(pos, int):
        mask = torch.full((seqlen, seqlen), float("-inf"), device=device).triu(1)
        return torch.cat([torch.zeros(seqlen, pos, device=device), mask], dim=1)
    hidden = torch.arange(n_keys, device=pos.device) > pos[:, None]  # (T, S) not visible
    return torch.zeros(hidden.shape, device=pos.device).masked_fill(hidden, float("-inf"))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, Hkv * n_rep, D), each kv head serving n_rep query heads."""
    if n_rep == 1:
        return x
    b, s, h, d = x.shape
    return x[:, :, :, None, :].expand(b, s, h, n_rep, d).reshape(b, s, h * n_rep, d)


def attention(q, k, v, pos: int | torch.Tensor = 0, backend: str = "sdpa") -> torch.Tensor:
    """Causal attention of T new queries at positions `pos` (an int start, or a (T,) tensor; see
    `KVCache.update`) over the keys k/v. q: (B, T, H, D), k/v: (B, S, Hkv, D) -> (B, T, H, D)."""
    seqlen, n_keys, n_rep = q.size(1), k.size(1), q.size(2) // k.size(2)
    if backend == "xformers":
        return _xformers_attention(q, k, v, pos)
    if backend == "blocked" and isinstance(pos, int) and seqlen > 1:  # llama/blocked_attention.py, for CPUs
        return blocked_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pos).transpose(1, 2)
    if not isinstance(pos, int) and seqlen == 1 and backend in ("sdpa", "blocked") and one_token_attention_on(q, k, v):
        return torch.ops.llama.decode_attention(q, k, v, pos)  # GPU decoding steps (llama/gpu_kernels.py)
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
    if backend in ("sdpa", "blocked"):  # blocked: one new token, or positions given by a tensor
        if isinstance(pos, int) and seqlen == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new token sees every key
        elif isinstance(pos, int) and pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = causal_mask(seqlen, pos, n_keys, q.device).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif backend == "math":
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
        scores = scores + causal_mask(seqlen, pos, n_keys, q.device)
        out = (scores.softmax(dim=-1) @ v.float()).type_as(q)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    return out.transpose(1, 2)  # (B, T, H, D)


def _xformers_attention(q, k, v, pos):
    from xformers.ops import fmha  # optional GPU extra

    b, t, h, d = q.shape
    s, hkv = k.size(1), k.size(2)
    if h != hkv:  # grouped-query: (B, S, G, H/G, D) with a broadcast view of k/v
        q = q.view(b, t, hkv, h // hkv, d)
        k = k[:, :, :, None, :].expand(b, s, hkv, h // hkv, d)
        v = v[:, :, :, None, :].expand(b, s, hkv, h // hkv, d)
    if not isinstance(pos, int):  # positions by tensor: an explicit additive bias over the whole cache
        shape = (b, t, hkv, h // hkv, s) if h != hkv else (b, h, t, s)
        mask = causal_mask(t, pos, s).to(q.dtype)  # (T, S)
        bias = (mask[None, :, None, None, :] if h != hkv else mask[None, None]).expand(shape)
        bias = bias.permute(0, 2, 3, 1, 4) if h != hkv else bias  # (B, G, H/G, T, S)
    else:
        bias = None if t == 1 else fmha.attn_bias.LowerTriangularFromBottomRightMask()
    out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.backend = "sdpa"
        # wq, wk, wv as one product of their stacked rows, set only while a decoder runs
        # (llama.inference.decoders.PackedProjections)
        self.wqkv: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x, freqs_cis, pos: int | torch.Tensor = 0, cache: KVCache | None = None):
        bsz, seqlen, _ = x.shape
        # -1: a tensor-parallel plan may have sharded the heads
        if self.wqkv is None:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        else:  # one matrix product instead of three
            xq, xk, xv = self.wqkv(x).split([self.wq.weight.size(0), self.wk.weight.size(0), self.wv.weight.size(0)], -1)
        xq = xq.view(bsz, seqlen, -1, self.head_dim)  # (B, T, H, D)
        xk = xk.view(bsz, seqlen, -1, self.head_dim)  # (B, T, Hkv, D)
        xv = xv.view(bsz, seqlen, -1, self.head_dim)  # (B, T, Hkv, D)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        if cache is not None:
            xk, xv = cache.update(self.layer_id, pos, xk, xv)  # (B, S, Hkv, D)
        elif not isinstance(pos, int) or pos:
            raise ValueError("positions after 0 need a KV cache holding the earlier ones")
        out = attention(xq, xk, xv, pos, self.backend)  # (B, T, H, D)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: Callable[[torch.Tensor], torch.Tensor] | None = None  # w1 and w3 stacked, like Attention.wqkv

    def forward(self, x):
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, pos: int | torch.Tensor = 0, cache: KVCache | None = None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def _drop_tied_output(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "output.weight", None)


def _fill_tied_output(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # the output Linear loads the embedding too (strict loading wants its key); _retie_output then
    # makes both modules hold one Parameter again (assign=True wraps each in its own)
    emb, out = state_dict.get(prefix + "tok_embeddings.weight"), state_dict.get(prefix + "output.weight")
    if out is not None and emb is not None and out is not emb and not torch.equal(out, emb):
        error_msgs.append(f"{prefix}output.weight differs from {prefix}tok_embeddings.weight, but the model ties them")
    elif emb is not None:
        state_dict[prefix + "output.weight"] = emb


def _retie_output(module, incompatible_keys):
    module.output.weight = module.tok_embeddings.weight


class Transformer(nn.Module):
    """Decoder-only LLaMA. `forward(tokens, start_pos, cache)` returns (B, T, vocab) logits.

    Build on the meta device and load with `assign=True`, then call `init_buffers(device)`;
    or build on a real device and call `init_weights()` for a fresh model.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:  # one tensor; state_dict holds it once, as tok_embeddings.weight
            self.output.weight = self.tok_embeddings.weight
            self.register_state_dict_post_hook(_drop_tied_output)
            self.register_load_state_dict_pre_hook(_fill_tied_output)
            self.register_load_state_dict_post_hook(_retie_output)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta),
                             persistent=False)
        if self.freqs_cis.device.type != "meta":
            self.init_weights()

    def set_attention_backend(self, backend: str) -> "Transformer":
        """Attention kernel of every block: "sdpa" (default), "math" (plain float32 reference),
        "blocked" (causal attention of several tokens over blocks of queries; on CPUs faster than
        sdpa for training; a C++ kernel in bf16 and fp32 on AVX-512 CPUs; llama/blocked_attention.py) or "xformers"
        (CUDA, the optional GPU extra; check with llama.env.check_attention_device)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        for layer in self.layers:
            layer.attention.backend = backend
        return self

    @property
    def attention_backend(self) -> str:
        return self.layers[0].attention.backend if len(self.layers) else "sdpa"

    def init_buffers(self, device=None) -> None:
        """(Re)compute the RoPE table, e.g. after building on the meta device."""
        a = self.args
        device = device if device is not None else self.tok_embeddings.weight.device
        self.freqs_cis = precompute_freqs_cis(a.head_dim, a.max_seq_len, a.rope_theta).to(device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights as `WEIGHTS` says: N(0, std) for embeddings and projections, the outputs of
        the residual branches (wo, w2) N(0, std / sqrt(2 n_layers)), RMSNorm weights 1. No biases exist."""
        self.init_buffers()
        stds = {"normal": std, "residual": std / math.sqrt(2 * self.args.n_layers)}
        for name, p in self.named_parameters():
            init = weight_info(name).init
            if init == "ones":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=stds[init])

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                last_only: bool = False, *, input_pos: torch.Tensor | None = None,
                hidden: bool = False) -> torch.Tensor:
        """(B, T) ids at positions start_pos.. -> (B, T, vocab) logits; (B, 1, vocab) with `last_only`
        (prefill for sampling: skips T-1 rows of the largest matmul).

        `input_pos`, a (T,) tensor, gives the positions instead of `start_pos` (with a cache): then
        every shape is fixed whatever the position, and `torch.compile` of this forward is a static
        decoding step (see `KVCache.update`).

        `hidden`: the final normed hidden states (B, T, dim) instead of the logits, for a loss that
        applies `output` itself (`llama.train.recipe.linear_cross_entropy`).
        """
        bsz, seqlen = tokens.shape
        if input_pos is not None:
            if cache is None:
                raise ValueError("input_pos needs a KV cache")
            pos, freqs_cis = input_pos, self.freqs_cis.index_select(0, input_pos)  # (T, D/2, 2)
        else:
            if start_pos + seqlen > self.freqs_cis.size(0):
                raise ValueError(f"positions up to {start_pos + seqlen} exceed the model's max_seq_len "
                                 f"{self.freqs_cis.size(0)}")
            pos, freqs_cis = start_pos, self.freqs_cis[start_pos:start_pos + seqlen]  # (T, D/2, 2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, pos, cache)
        if last_only:
            h = h[:, -1:]  # (B, 1, dim)
        h = self.norm(h)
        return h if hidden else self.output(h)  # (B, T or 1, vocab)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def new_cache(self, max_batch_size: int, max_seq_len: int | None = None, *, n_kv_heads: int | None = None,
                  device=None, dtype=None) -> KVCache:
        """A KV cache for this model (`n_kv_heads`: the heads this rank holds, all by default)."""
        a = self.args
        return KVCache(a.n_layers, max_batch_size, max_seq_len or a.max_seq_len, n_kv_heads or a.n_kv_heads,
                       a.head_dim, device=device, dtype=dtype)
