"""Text and chat completion with Meta's API (`Llama.build`, `text_completion`, `chat_completion`) plus
streaming.

Runs a Meta-layout checkpoint with any number of shards on one process or on any number of
tensor-parallel ranks that divides the heads (launched by torchrun; gloo on CPU, nccl on CUDA).
Tensor parallelism is `llama.parallel.apply_tp` applied to a model built on the meta device;
each rank then loads only its slice of every weight. All ranks draw the same token: the sampler's
generator is seeded identically everywhere and rank 0's choice is broadcast for safety. How each
step runs the model is a decoder (llama/inference/decoders.py) chosen once at build time.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.chat import check_dialog, encode_dialog, has_special_tags, uses_llama2_format
from llama.env import compute_dtype, init_distributed, resolve_device, resolve_dtype, say_once, torchrun_ranks
from llama.formats.gguf import load_gguf, load_tokenizer
from llama.formats.hf import hf_chat_template, is_hf_checkpoint, load_hf
from llama.formats.locate import checkpoint_args, find_tokenizer
from llama.formats.meta import load_model, load_tp_slice, tp_slices
from llama.inference.cpu_decode import FusedCpuDecoder, decode_dtype
from llama.inference.decoders import DECODERS, CompiledDecoder, EagerDecoder
from llama.inference.sampling import check_sampling, sample
from llama.model import KVCache, Transformer
from llama.parallel import apply_tp, assign_local_shards, check_tp_degree, tp_mesh
from llama.tokenizer import TextStream, find_stop


UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."  # Meta's answer to such a dialog


def make_decoder(model: Transformer, kind: str = "auto", world_size: int = 1, **compile_options) -> EagerDecoder:
    """The decoding strategy `kind` for `model`: "auto" is the fused CPU step where it applies (one
    process, a bf16/fp32 model - its projections in that dtype or int8 by llama.quantize.quantize_int8 -
    on a CPU with AVX-512, AVX2+FMA or NEON, the kernel built), else eager.
    `compile_options` go to the compiled decoder: `cuda_graphs` (default on for CUDA), `pack` and
    `gemv` (see CompiledDecoder), the rest to torch.compile (e.g. mode="max-autotune")."""
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {DECODERS}")
    if kind == "eager":
        return EagerDecoder(model)
    if kind == "compiled":
        if world_size > 1:
            raise ValueError("the compiled decoder runs on one process; tensor-parallel decoding is eager")
        return CompiledDecoder(model, **compile_options)
    fused = FusedCpuDecoder.create(model) if world_size == 1 else None
    if fused is None and kind == "fused":
        raise ValueError("the fused CPU decoder needs one process, a bf16 or fp32 model on a CPU with "
                         "AVX-512, AVX2+FMA or NEON and a C++ compiler; use decoder='auto' to fall back to eager")
    return fused or EagerDecoder(model)


@dataclass
class _Batch:
    tokens: torch.Tensor  # (B, total_len) prompt then generated ids, pad -1 beyond
    logprobs: Optional[torch.Tensor]  # (B, total_len) logprob of tokens[:, t] given tokens[:, :t]
    ends: list[int]  # per row: end of its prompt + generation (exclusive)


class Llama:
    """A loaded model and tokenizer that completes text. Build with `Llama.build`."""

    def __init__(self, model: Transformer, tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1,
                 rank: int = 0, world_size: int = 1, decoder: str | EagerDecoder = "auto"):
        """`decoder`: a name for `make_decoder`, or a decoder object built for `model`."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.rank, self.world_size = rank, world_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._cache: Optional[KVCache] = None
        self.decoder = decoder if isinstance(decoder, EagerDecoder) else make_decoder(model, decoder, world_size)

    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: Optional[str], max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, decoder: str = "auto") -> "Llama":
        """Load a Meta-layout checkpoint (params.json + consolidated.NN.pth, any number of shards), or a
        transformers LLaMA folder (config.json + safetensors).

        Without torchrun it runs in this process; under torchrun each of the WORLD_SIZE ranks holds
        a tensor-parallel slice (world size must divide the heads). `device` defaults to cuda, then
        mps, then cpu; `dtype` to bf16 where the hardware has it, fp16 on older GPUs; on a CPU (one
        process) the faster as measured once per machine: for the fused decoding step's weights
        (`cpu_decode.decode_dtype`) where that step decodes (decoder "auto" or "fused"), else for whole
        forwards (`env.compute_dtype`'s matmuls; decoder "eager", as scoring and evaluation build, or
        "compiled").
        `decoder`: "auto" (the fused CPU step where it applies, else eager), "eager", "compiled"
        or "fused" (see llama/inference/decoders.py).
        A `.gguf` file (llama.cpp's format) as `ckpt_dir` runs on one process; its tokenizer comes
        from the file unless `tokenizer_path` is given. `tokenizer_path` may also be a vocabulary-only
        .gguf (what scripts/convert_gguf.py writes beside a Meta-layout model with a BPE vocabulary);
        None: the one beside the checkpoint (`find_tokenizer`).
        """
        if max_seq_len < 2 or max_batch_size < 1:
            raise ValueError(f"max_seq_len must be >= 2 and max_batch_size >= 1 (got {max_seq_len}, {max_batch_size})")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
        device = resolve_device(device)
        world = torchrun_ranks().world
        if dtype is None and device.type == "cpu" and world == 1:  # the measurement of what will run
            dtype, why = decode_dtype() if decoder in ("auto", "fused") else compute_dtype("cpu")
            say_once(f"llama: weights in {why}; --dtype overrides")
        dtype = resolve_dtype(dtype, device)
        if model_parallel_size is not None and model_parallel_size != world:
            raise ValueError(f"model_parallel_size {model_parallel_size} != {world} process(es) launched; "
                             f"launch with `torchrun --nproc_per_node {model_parallel_size}` or leave it unset")
        if Path(ckpt_dir).suffix.lower() == ".gguf":
            return Llama._build_gguf(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, world, seed, device,
                                     dtype, decoder)
        if tokenizer_path is None:
            if not Path(ckpt_dir).exists():  # named as the checkpoint's problem, not the tokenizer's
                checkpoint_args(ckpt_dir)
            tokenizer_path = find_tokenizer(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path)  # tokenizer.model, or a vocabulary-only .gguf
        hf = is_hf_checkpoint(ckpt_dir)
        if hf and not tokenizer.chat_template:
            tokenizer.chat_template = hf_chat_template(ckpt_dir)  # tokenizer_config.json's
        args = checkpoint_args(ckpt_dir)  # Meta's vocab_size -1 is read from the shards' output.weight
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model in {ckpt_dir} "
                             f"has vocab_size {args.vocab_size}; use the tokenizer the checkpoint was trained with")
        args.max_seq_len = max_seq_len  # RoPE table length = the context we generate in
        check_tp_degree(args, world)
        ranks = init_distributed(device.type)

        full = load_hf(ckpt_dir)[0] if hf else None  # transformers' safetensors: read whole, then sliced
        if ranks.world == 1 and not hf:
            model = load_model(ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len)
        elif ranks.world == 1:
            with torch.device("meta"):
                model = Transformer(args)
            model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in full.items()}, strict=True,
                                  assign=True)
            model.init_buffers(device)
        else:
            with torch.device("meta"):
                model = Transformer(args)
            mesh = tp_mesh(device.type, ranks.world)
            apply_tp(model, mesh)
            local = tp_slices(full, ranks.rank, ranks.world) if hf else load_tp_slice(ckpt_dir, ranks.rank, ranks.world)
            assign_local_shards(model, local, mesh, device, dtype)
            model.init_buffers(device)
        model.eval().requires_grad_(False)
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed=seed, rank=ranks.rank,
                     world_size=ranks.world, decoder=decoder)

    @staticmethod
    def _build_gguf(path, tokenizer_path, max_seq_len, max_batch_size, world, seed, device, dtype, decoder) -> "Llama":
        if world > 1:
            raise ValueError(f"a .gguf model ({path}) runs on one process; launch without torchrun (or convert it "
                             f"to Meta's layout with scripts/convert_gguf.py)")
        model, tokenizer = load_gguf(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
        if tokenizer_path is not None:
            tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{path} holds no vocabulary; pass --tokenizer_path")
        if tokenizer.n_words != model.args.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model in {path} has "
                             f"vocab_size {model.args.vocab_size}; use the tokenizer the model was trained with")
        model.eval().requires_grad_(False)
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed=seed, decoder=decoder)

    # -----------------------------------------------------------------------------------------

    def kv_cache(self) -> KVCache:
        """The generator's KV cache (max_batch_size x max_seq_len, this rank's heads), allocated once."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch_size, self.max_seq_len,
                                               n_kv_heads=self.model.args.n_kv_heads // self.world_size,
                                               device=self.device, dtype=self.dtype)
        return self._cache

    def _sample(self, logits, temperature, top_p, top_k) -> torch.Tensor:
        nxt = sample(logits, temperature, top_p, top_k, self.generator)
        if self.world_size > 1:  # identical seeds already agree; this guards against any drift
            dist.broadcast(nxt, src=0)
        return nxt

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string; wrap it: [prompt]")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _check_prompts(self, prompt_tokens: list[list[int]], max_gen_len: int | None = None) -> None:
        """Errors for prompts that cannot run; one warning, before any work, when an asked-for
        max_gen_len does not fit after a prompt within max_seq_len (that prompt is cut short)."""
        if max_gen_len is not None and (not isinstance(max_gen_len, numbers.Integral) or isinstance(max_gen_len, bool)
                                        or max_gen_len < 1):
            raise ValueError(f"max_gen_len must be an integer >= 1 (or None: up to max_seq_len), got {max_gen_len!r}")
        vocab = self.model.args.vocab_size
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty (no tokens, not even bos)")
            bad = [x for x in t if not isinstance(x, numbers.Integral) or not 0 <= x < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds {bad[0]!r}, not a token id in [0, {vocab})")
            if len(t) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(t)} tokens, which leaves no room to generate within "
                                 f"max_seq_len {self.max_seq_len}; shorten it or build with a larger max_seq_len")
        if max_gen_len is None:
            return
        short = [i for i, t in enumerate(prompt_tokens) if len(t) + max_gen_len > self.max_seq_len]
        if short:
            i, n = short[0], len(prompt_tokens[short[0]])
            more = f" ({len(short) - 1} more prompt(s) are cut short too)" if len(short) > 1 else ""
            warnings.warn(f"prompt {i} has {n} tokens: only {self.max_seq_len - n} of max_gen_len={max_gen_len} "
                          f"tokens will be generated within max_seq_len {self.max_seq_len}{more}; build with a "
                          f"larger max_seq_len or shorten the prompt", stacklevel=3)

    def steps(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6, top_p: float = 0.9,
              top_k: Optional[int] = None, logprobs: bool = False, stop: Sequence[str] = ()) -> Iterator[tuple[_Batch, int]]:
        """Generate for at most max_batch_size prompts, yielding (batch state, position written) after
        every step: token-level streaming of a batch (`batch.tokens` (B, total_len), -1 beyond).

        Rows are left-aligned; decoding starts at the shortest prompt and, while a row is still
        inside its prompt, its own token is kept instead of the sampled one, so each row sees
        exactly the computation it would see alone. `batch.tokens` may be the decoder's own buffer,
        valid until the next call.
        """
        bsz = len(prompt_tokens)
        if bsz > self.max_batch_size:
            raise ValueError(f"steps() takes at most max_batch_size={self.max_batch_size} prompts, got {bsz}; "
                             f"generate() splits larger lists into batches")
        self.decoder = self.decoder.refreshed()  # the parameters may have been replaced (cast, quantized...)
        lens = [len(t) for t in prompt_tokens]
        ends = [min(n + max_gen_len, self.max_seq_len) for n in lens]
        total_len = max(ends)
        eos = self.tokenizer.eos_id
        dev = self.device
        state = self.decoder.decode_state(bsz, self.max_seq_len, dev)
        state.start(prompt_tokens, ends)
        tokens, done = state.tokens[:, :total_len], state.done
        lp = torch.zeros(bsz, total_len, device=dev) if logprobs else None
        streams = [TextStream(self.tokenizer, stop) for _ in range(bsz)] if stop else None
        batch = _Batch(tokens, lp, ends)
        # greedy steps without logprobs or stop strings can run whole on the device (model, argmax
        # and bookkeeping in one compiled graph) where the decoder does that
        whole = self.decoder.whole_greedy_steps and temperature == 0 and lp is None and streams is None
        # asking whether every row is done waits for the device; on a GPU that stall between steps
        # would leave it idle while the host queues the next one, so there it is asked every 16 steps
        # (a finished row keeps its tokens, so a few extra steps change nothing but time)
        check_every = 1 if dev.type == "cpu" or streams is not None else 16
        start, prev = min(lens), 0
        for cur in range(start, total_len):
            finished = None  # every row done: what a whole step may say without a device read
            if whole and cur > start:
                finished = self.decoder.greedy_step(self.kv_cache(), state, eos)  # reads and moves state.cur == cur
            else:
                self._step(state, prev, cur, temperature, top_p, top_k, lp, streams, batch)
                if whole:
                    state.cur.fill_(cur + 1)
            prev = cur
            yield batch, cur
            if (cur + 1 - start) % check_every == 0 and (bool(done.all()) if finished is None else finished):
                break

    def _step(self, state, prev: int, cur: int, temperature, top_p, top_k, lp, streams, batch: _Batch) -> None:
        """Run tokens[:, prev:cur] (the prompts' common prefix, or the last token) and write the token
        at cur of every row: sampled, or the row's own while it is still inside its prompt."""
        tokens, in_prompt, done, eos = state.tokens, state.in_prompt, state.done, self.tokenizer.eos_id
        chunk = tokens[:, prev:cur].clamp(min=0)  # pads (-1) beyond a prompt are overwritten below anyway
        logits = self.decoder(chunk, prev, self.kv_cache(), last_only=lp is None)  # (B, T or 1, V)
        nxt = self._sample(logits[:, -1], temperature, top_p, top_k)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        tokens[:, cur] = torch.where(done, tokens[:, cur], nxt)
        if lp is not None:  # logprob of tokens[:, prev+1 .. cur] under the logits that predicted them
            target = tokens[:, prev + 1:cur + 1].clamp(min=0)
            lp[:, prev + 1:cur + 1] = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        generated = ~in_prompt[:, cur]
        done |= generated & (nxt == eos)
        if streams is not None:
            for i in range(len(streams)):
                if generated[i] and not done[i]:
                    streams[i].push([int(nxt[i])])
                    if streams[i].stopped:
                        done[i] = True
                        batch.ends[i] = cur + 1
        done |= cur + 1 >= state.ends

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int | None, temperature: float = 0.6,
                 top_p: float = 0.9, top_k: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                 stop: Sequence[str] = ()) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Token-level completion: per prompt, the generated ids (the prompt too with `echo`), cut at
        eos and after the token that completed a stop string, and their logprobs when asked.
        max_gen_len None: up to max_seq_len; a number that does not fit after a prompt is warned about."""
        check_sampling(temperature, top_p, top_k)
        prompt_tokens = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompt_tokens]  # tensors, arrays
        self._check_prompts(prompt_tokens, max_gen_len)
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else int(max_gen_len)
        out_tokens, out_lp = [], []
        for b in range(0, len(prompt_tokens), self.max_batch_size):
            chunk = prompt_tokens[b:b + self.max_batch_size]
            batch = None
            for batch, _ in self.steps(chunk, max_gen_len, temperature, top_p, top_k, logprobs, stop):
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
        prompt_tokens = self._encode(prompts)
        toks, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, stop)
        out = []
        for i, t in enumerate(toks):
            text = self.tokenizer.decode(t)
            if stop:
                prompt_chars = len(self.tokenizer.decode(prompt_tokens[i])) if echo else 0
                cut = find_stop(text, stop, start=prompt_chars)
                text = text if cut is None else text[:cut]
            item = {"generation": text}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = lps[i]
            out.append(item)
        return out

    def chat_completion(self, dialogs: Sequence[list[dict]], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, top_k: Optional[int] = None,
                        stop: Sequence[str] | str | None = None) -> list[dict]:
        """Answer each dialog as the assistant (Meta's Llama 2 API), in the model's own chat template
        when its tokenizer carries one (a GGUF file's), else in Llama 2's chat format: a dialog is a
        list of {"role", "content"} messages, an optional "system" first, then "user" and
        "assistant" alternating, ending with "user". Returns [{"generation": {"role": "assistant",
        "content": str}}] (+ "tokens", "logprobs" with logprobs=True). As Meta's, a dialog whose
        contents hold [INST], [/INST], <<SYS>> or <</SYS>> is not run: its answer is an error text.
        `top_k` and `stop` as in `text_completion`."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if isinstance(dialogs, dict) or (dialogs and isinstance(dialogs[0], dict)):
            raise ValueError("dialogs must be a list of dialogs (each a list of messages); wrap one dialog: [dialog]")
        for i, dialog in enumerate(dialogs):
            try:
                check_dialog(dialog, last="user")
            except ValueError as e:
                raise ValueError(f"dialog {i}: {e}") from None
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else max_gen_len
        llama2 = uses_llama2_format(self.tokenizer)  # Meta's tags only matter in its format
        unsafe = [llama2 and has_special_tags(d) for d in dialogs]
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]
        toks, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, stop=stop)
        out = []
        for i, t in enumerate(toks):
            content = self.tokenizer.decode(t)
            cut = find_stop(content, stop) if stop else None
            content = UNSAFE_ERROR if unsafe[i] else content if cut is None else content[:cut]
            item = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = lps[i]
            out.append(item)
        return out

    def chat_stream(self, dialog: list[dict], temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, top_k: Optional[int] = None,
                    stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Yield the assistant's answer to one dialog (ending with a user message) piece by piece;
        every rank must iterate. See `chat_completion` for the dialog's form."""
        check_dialog(dialog, last="user")
        if uses_llama2_format(self.tokenizer) and has_special_tags(dialog):
            raise ValueError(UNSAFE_ERROR)
        return self._checked_stream(encode_dialog(self.tokenizer, dialog), temperature, top_p, top_k, max_gen_len, stop)

    def stream(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
               max_gen_len: Optional[int] = None, stop: Sequence[str] | str | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated. A piece never ends
        inside a multi-byte UTF-8 character, and a stop string is never shown. Every rank must
        iterate (only rank 0 needs to print)."""
        return self._checked_stream(self._encode([prompt])[0], temperature, top_p, top_k, max_gen_len, stop)

    def _checked_stream(self, prompt_ids, temperature, top_p, top_k, max_gen_len, stop) -> Iterator[str]:
        """`_stream` with its arguments checked now, not at the first piece."""
        check_sampling(temperature, top_p, top_k)
        self._check_prompts([prompt_ids], max_gen_len)
        return self._stream(prompt_ids, temperature, top_p, top_k, max_gen_len, stop)

    @torch.inference_mode()
    def _stream(self, prompt_ids: list[int], temperature: float, top_p: float, top_k: Optional[int],
                max_gen_len: Optional[int], stop: Sequence[str] | str | None) -> Iterator[str]:
        """(Its arguments checked by `_checked_stream`, its only caller.)"""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_tokens = [prompt_ids]
        max_gen_len = self.max_seq_len - 1 if max_gen_len is None else max_gen_len
        text = TextStream(self.tokenizer, stop)
        for batch, cur in self.steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, False, ()):
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
