"""Text completion with Meta's API (`Llama.build`, `text_completion`) plus streaming.

Runs a Meta-layout checkpoint with any number of shards on one process or on any number of
tensor-parallel ranks that divides the heads (launched by torchrun; gloo on CPU, nccl on CUDA).
Tensor parallelism is `llama.parallel.apply_tp` applied to a model built on the meta device;
each rank then loads only its slice of every weight. All ranks draw the same token: the sampler's
generator is seeded identically everywhere and rank 0's choice is broadcast for safety.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama.checkpoint import parse_dtype
from llama.cpu_kernels import MAX_ROWS, CpuDecoder, cpu_has_native_bf16
from llama.model import KVCache, Transformer, apply_rotary_emb
from llama.parallel import check_tp_degree, init_distributed, launched_with_torchrun

# ---------------------------------------------------------------------------------------------
# device and dtype


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """A dtype name ("bf16", "float32", ...) or torch dtype; None picks the device's default."""
    return default_dtype(device) if dtype is None else parse_dtype(dtype)


# ---------------------------------------------------------------------------------------------
# sampling


def check_sampling(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_p is None or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from (B, vocab) logits: argmax at temperature 0, else softmax(logits / T)
    restricted to the top-k tokens and then to the smallest prefix (by probability) whose mass
    reaches top_p, renormalised and sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    if top_k is not None and top_k < probs.size(-1):
        probs_sorted, idx = probs_sorted[:, :top_k], idx[:, :top_k]
    if top_p < 1.0:
        # keep token i if the mass strictly before it is < top_p: the smallest prefix reaching top_p
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sorted, 1, generator=generator)  # (B, 1) index into sorted
    return idx.gather(-1, choice).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# streaming text


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8
    character (a byte-fallback token that splits it) and any tail that could start a stop string.

    `push(ids)` returns the new text that is safe to show; `stopped` turns True once a stop string
    appeared (the text before it has been returned, the stop string is never shown).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def finish(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = _find_stop(text, self.stop, start=max(0, self.shown - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:n]):
                        end = min(end, len(text[:end]) - n)
                        break
        if end <= self.shown:
            return ""
        piece, self.shown = text[self.shown:end], end
        return piece


def _find_stop(text: str, stop: Sequence[str], start: int = 0) -> Optional[int]:
    hits = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


# ---------------------------------------------------------------------------------------------
# building


# ---------------------------------------------------------------------------------------------
# a static-shape decode step (for torch.compile)


def static_decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor) -> torch.Tensor:
    """One decoding step of `model` with fixed shapes: (B, 1) ids at position `pos` (a (1,) long
    tensor) -> (B, vocab) float logits, writing keys/values into the (L, B_max, S, Hkv, D) cache.

    The same math as `Transformer.forward(tokens, start_pos, cache)`, but attention runs over the
    whole cache with positions > pos masked out, and the position is a tensor, so every step has
    the same shapes and a compiled graph serves all of them (no recompiles, no slicing by Python
    ints). Used by `Llama.compile()`; tested against the model's own forward.
    """
    bsz = tokens.size(0)
    max_len = cache_k.size(2)
    h = model.tok_embeddings(tokens)  # (B, 1, dim)
    freqs_cis = model.freqs_cis.index_select(0, pos)  # (1, D/2, 2)
    hidden = torch.arange(max_len, device=tokens.device) > pos  # (S,) not written yet
    bias = torch.zeros(max_len, device=tokens.device).masked_fill(hidden, float("-inf"))  # (S,)
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        x = layer.attention_norm(h)
        hd = attn.head_dim
        xq = attn.wq(x).view(bsz, 1, -1, hd)  # (B, 1, H, D)
        xk = attn.wk(x).view(bsz, 1, -1, hd)  # (B, 1, Hkv, D)
        xv = attn.wv(x).view(bsz, 1, -1, hd)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        keys, values = cache_k[i, :bsz], cache_v[i, :bsz]  # (B, S, Hkv, D) views
        keys[:, pos] = xk  # index_put_, which inductor does in place (index_copy_ copied the cache)
        values[:, pos] = xv
        n_kv = keys.size(2)
        q = xq.view(bsz, n_kv, -1, hd).float()  # (B, Hkv, rep, D): rep query heads per kv head
        scores = torch.einsum("bgrd,bsgd->bgrs", q, keys.float()) / math.sqrt(hd) + bias  # (B, Hkv, rep, S)
        out = torch.einsum("bgrs,bsgd->bgrd", scores.softmax(dim=-1), values.float())  # (B, Hkv, rep, D)
        h = h + attn.wo(out.reshape(bsz, 1, -1).type_as(h))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[:, 0].float()  # (B, vocab)


def _check_paths(ckpt_dir, tokenizer_path) -> None:
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist; pass --ckpt_dir pointing "
                                f"to a folder with params.json and consolidated.*.pth")
    if not (Path(ckpt_dir) / "params.json").is_file():
        raise FileNotFoundError(f"no params.json in {ckpt_dir}; a Meta checkpoint folder holds params.json "
                                f"and consolidated.*.pth")
    if not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer_path} does not exist; pass --tokenizer_path "
                                f"pointing to a SentencePiece tokenizer.model")


def _load_sharded(model: Transformer, local_sd: dict, mesh, device, dtype) -> None:
    """Replace each DTensor parameter of a TP-planned meta model by this rank's slice from `local_sd`."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(local_sd)), sorted(set(local_sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        local = local_sd[name]
        if isinstance(p, DTensor):
            want = p.to_local().shape
            if local.shape != want:
                raise ValueError(f"{name}: this rank's checkpoint slice has shape {tuple(local.shape)}, "
                                 f"the sharded model expects {tuple(want)}")
            value = DTensor.from_local(local.to(device=device, dtype=dtype), mesh, p.placements, run_check=False)
        else:
            if local.shape != p.shape:
                raise ValueError(f"{name}: checkpoint has shape {tuple(local.shape)}, the model expects {tuple(p.shape)}")
            value = local.to(device=device, dtype=dtype)
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(value, requires_grad=False))


@dataclass
class _Batch:
    tokens: torch.Tensor  # (B, total_len) prompt then generated ids, pad -1 beyond
    logprobs: Optional[torch.Tensor]  # (B, total_len) logprob of tokens[:, t] given tokens[:, :t]
    ends: list[int]  # per row: end of its prompt + generation (exclusive)


class Llama:
    """A loaded model and tokenizer that completes text. Build with `Llama.build`."""

    def __init__(self, model: Transformer, tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1,
                 rank: int = 0, world_size: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.rank, self.world_size = rank, world_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._cache: Optional[KVCache] = None
        self._decode_step = None  # set by compile()
        self._cpu_decoder: Optional[CpuDecoder] = None  # set by use_cpu_kernels()
        self._packed: Optional[CpuDecoder] = None  # the last one built, kept while the weights stay

    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, cpu_kernels: bool = True) -> "Llama":
        """Load a Meta-layout checkpoint (params.json + consolidated.NN.pth, any number of shards).

        Without torchrun it runs in this process; under torchrun each of the WORLD_SIZE ranks holds
        a tensor-parallel slice (world size must divide the heads). `device` defaults to cuda, then
        mps, then cpu; `dtype` to bf16 where the hardware has it, fp16 on older GPUs, else fp32.
        `cpu_kernels`: on one CPU process in bf16 or fp32, decode with the fused `CpuDecoder` (built on first
        use; CPUs with AVX512-BF16).
        """
        from llama.checkpoint import load_model, load_params, load_tp_slice
        from llama.tokenizer import Tokenizer

        _check_paths(ckpt_dir, tokenizer_path)
        if max_seq_len < 2 or max_batch_size < 1:
            raise ValueError(f"max_seq_len must be >= 2 and max_batch_size >= 1 (got {max_seq_len}, {max_batch_size})")
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        world = int(os.environ.get("WORLD_SIZE", 1)) if launched_with_torchrun() else 1
        if model_parallel_size is not None and model_parallel_size != world:
            raise ValueError(f"model_parallel_size {model_parallel_size} != {world} process(es) launched; "
                             f"launch with `torchrun --nproc_per_node {model_parallel_size}` or leave it unset")
        tokenizer = Tokenizer(tokenizer_path)
        args = load_params(ckpt_dir)  # vocab_size -1 is read from the shards' output.weight
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model in {ckpt_dir} "
                             f"has vocab_size {args.vocab_size}; use the tokenizer the checkpoint was trained with")
        args.max_seq_len = max_seq_len  # RoPE table length = the context we generate in
        check_tp_degree(args, world)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        rank, world = init_distributed(device.type)

        if world == 1:
            model = load_model(ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            from llama.parallel import apply_tp

            with torch.device("meta"):
                model = Transformer(args)
            mesh = init_device_mesh(device.type, (world,))
            apply_tp(model, mesh)
            _load_sharded(model, load_tp_slice(ckpt_dir, rank, world), mesh, device, dtype)
            model.init_buffers(device)
        model.eval().requires_grad_(False)
        llama = Llama(model, tokenizer, max_seq_len, max_batch_size, seed=seed, rank=rank, world_size=world)
        if cpu_kernels and world == 1:
            llama.use_cpu_kernels()
        return llama

    # -----------------------------------------------------------------------------------------

    def kv_cache(self) -> KVCache:
        """The generator's KV cache (max_batch_size x max_seq_len, this rank's heads), allocated once."""
        if self._cache is None:
            n_kv_local = self.model.args.n_kv_heads // self.world_size
            self._cache = KVCache.for_model(self.model, self.max_batch_size, self.max_seq_len,
                                            n_kv_heads=n_kv_local, device=self.device, dtype=self.dtype)
        return self._cache

    def use_cpu_kernels(self, enable: bool = True) -> bool:
        """Decode with the fused C++ step (`llama.cpu_kernels.CpuDecoder`) where it applies: one process,
        a bf16 or fp32 model on a CPU with AVX512-BF16, the kernel built. Returns whether it is in use."""
        if not enable or self.world_size > 1:
            self._cpu_decoder = None
            return False
        if self._packed is None or not self._packed.valid():  # pack once; again only if the weights changed
            self._packed = CpuDecoder.create(self.model)
        self._cpu_decoder = self._packed
        return self._cpu_decoder is not None

    def compile(self, static: bool = True, compile: bool = True, **compile_options) -> "Llama":
        """Decode with `static_decode_step` (fixed shapes), compiled by torch.compile unless
        compile=False, instead of the fused CPU kernel. Prefill stays eager. Call it again with
        static=False to undo (and `use_cpu_kernels()` to return to the fused CPU step)."""
        if not static:
            self._decode_step = None
            return self
        self._cpu_decoder = None
        step = static_decode_step
        if compile:
            if self.world_size > 1:
                raise ValueError("Llama.compile() runs on one process; tensor-parallel decoding stays eager")
            step = torch.compile(step, fullgraph=True, dynamic=False, **compile_options)
        self._decode_step = step
        return self

    def _forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """(B, T) ids at positions start_pos.. -> (B, T, vocab) float logits, filling the cache;
        (B, 1, vocab) for the last position only with `last_only` (prefill without logprobs)."""
        cache = self.kv_cache()
        if self._cpu_decoder is not None and tokens.size(1) == 1 and tokens.size(0) <= MAX_ROWS:
            return self._cpu_decoder(tokens, start_pos, cache)
        if self._decode_step is not None and tokens.size(1) == 1:
            pos = torch.tensor([start_pos], device=self.device)
            return self._decode_step(self.model, tokens, pos, cache.k, cache.v)[:, None]
        return self.model(tokens, start_pos, cache, last_only=last_only).float()

    def _sample(self, logits, temperature, top_p, top_k) -> torch.Tensor:
        nxt = sample(logits, temperature, top_p, top_k, self.generator)
        if self.world_size > 1:  # identical seeds already agree; this guards against any drift
            dist.broadcast(nxt, src=0)
        return nxt

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string; wrap it: [prompt]")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _check_prompts(self, prompt_tokens: list[list[int]]) -> None:
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty (no tokens, not even bos)")
            if len(t) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens, which leaves no room to generate within "
                                 f"max_seq_len {self.max_seq_len}; shorten it or build with a larger max_seq_len")

    def _steps(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float, top_p: float,
               top_k: Optional[int], logprobs: bool, stop: Sequence[str]) -> Iterator[tuple[_Batch, int]]:
        """Generate for at most max_batch_size prompts, yielding (batch state, position written) per step.

        Rows are left-aligned; decoding starts at the shortest prompt and, while a row is still
        inside its prompt, its own token is kept instead of the sampled one, so each row sees
        exactly the computation it would see alone.
        """
        bsz = len(prompt_tokens)
        assert bsz <= self.max_batch_size
        if self._cpu_decoder is not None and not self._cpu_decoder.valid():
            self.use_cpu_kernels()  # the parameters were replaced since (cast, quantized...): re-pack or drop it
        lens = [len(t) for t in prompt_tokens]
        ends = [min(n + max_gen_len, self.max_seq_len) for n in lens]
        total_len = max(ends)
        eos = self.tokenizer.eos_id
        dev = self.device
        tokens = torch.full((bsz, total_len), -1, dtype=torch.long, device=dev)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=dev)
        in_prompt = tokens != -1
        lp = torch.zeros(bsz, total_len, device=dev) if logprobs else None
        end_t = torch.tensor(ends, device=dev)
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        streams = [TextStream(self.tokenizer, stop) for _ in range(bsz)] if stop else None
        batch = _Batch(tokens, lp, ends)
        prev = 0
        for cur in range(min(lens), total_len):
            chunk = tokens[:, prev:cur].clamp(min=0)  # pads (-1) beyond a prompt are overwritten below anyway
            logits = self._forward(chunk, prev, last_only=lp is None)  # (B, T or 1, V)
            nxt = self._sample(logits[:, -1], temperature, top_p, top_k)
            nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = torch.where(done, tokens[:, cur], nxt)
            if lp is not None:  # logprob of tokens[:, prev+1 .. cur] under the logits that predicted them
                target = tokens[:, prev + 1:cur + 1].clamp(min=0)
                lp[:, prev + 1:cur + 1] = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            generated = ~in_prompt[:, cur]
            done |= generated & (nxt == eos)
            if streams is not None:
                for i in range(bsz):
                    if generated[i] and not done[i]:
                        streams[i].push([int(nxt[i])])
                        if streams[i].stopped:
                            done[i] = True
                            batch.ends[i] = cur + 1
            done |= cur + 1 >= end_t
            prev = cur
            yield batch, cur
            if bool(done.all()):
                break

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, top_k: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                 stop: Sequence[str] = ()) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Token-level completion: per prompt, the generated ids (the prompt too with `echo`), cut at
        eos and after the token that completed a stop string, and their logprobs when asked."""
        check_sampling(temperature, top_p, top_k)
        self._check_prompts(prompt_tokens)
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        out_tokens, out_lp = [], []
        for b in range(0, len(prompt_tokens), self.max_batch_size):
            chunk = prompt_tokens[b:b + self.max_batch_size]
            batch = None
            for batch, _ in self._steps(chunk, max_gen_len, temperature, top_p, top_k, logprobs, stop):
                pass
            toks = batch.tokens.tolist()
            lps = batch.logprobs.tolist() if logprobs else None
            for i, prompt in enumerate(chunk):
                start = 0 if echo else len(prompt)
                row = toks[i][start:batch.ends[i]]
                gen_start = len(prompt) - start
                if self.tokenizer.eos_id in row[gen_start:]:
                    row = row[:gen_start + row[gen_start:].index(self.tokenizer.eos_id)]
                out_tokens.append(row)
                if logprobs:
                    out_lp.append(lps[i][start:start + len(row)])
        return out_tokens, (out_lp if logprobs else None)

    def text_completion(self, prompts: Sequence[str], temperature: float = 0.6, top_p: float = 0.9,
                        top_k: Optional[int] = None, max_gen_len: Optional[int] = None, logprobs: bool = False,
                        echo: bool = False, stop: Sequence[str] | str | None = None) -> list[dict]:
        """Complete each prompt; returns [{"generation": str}] (+ "tokens", "logprobs" with logprobs=True).

        Any number of prompts (run max_batch_size at a time). Generation ends at eos, at a `stop`
        string (not included in the text), or after max_gen_len tokens (default: up to max_seq_len).
        temperature 0 is greedy; otherwise top-k (if given) then top-p (nucleus) sampling.
        """
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else max_gen_len
        prompt_tokens = self._encode(prompts)
        toks, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stop)
        out = []
        for i, t in enumerate(toks):
            text = self.tokenizer.decode(t)
            if stop:
                prompt_chars = len(self.tokenizer.decode(prompt_tokens[i])) if echo else 0
                cut = _find_stop(text, stop, start=prompt_chars)
                text = text if cut is None else text[:cut]
            item = {"generation": text}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = lps[i]
            out.append(item)
        return out

    @torch.inference_mode()
    def stream(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
               max_gen_len: Optional[int] = None, stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated. A piece never ends
        inside a multi-byte UTF-8 character, and a stop string is never shown. Every rank must
        iterate (only rank 0 needs to print)."""
        check_sampling(temperature, top_p, top_k)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else max_gen_len
        prompt_tokens = self._encode([prompt])
        self._check_prompts(prompt_tokens)
        text = TextStream(self.tokenizer, stop)
        for batch, cur in self._steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, False, ()):
            tok = int(batch.tokens[0, cur])
            if tok == self.tokenizer.eos_id:
                break
            piece = text.push([tok])
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.finish()
        if piece:
            yield piece
