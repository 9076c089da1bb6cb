"""The fused CPU decoding strategy: one C++ call per token (bf16 or fp32, weights in that dtype or
int8; AVX512-BF16, AVX-512, AVX2 or NEON).

Decoding a few rows reads every weight once per token, so its speed is memory bandwidth, and the
eager model spends as long again on ~25 small ops per layer around the products (norms, RoPE,
cache writes, attention, SiLU, residual adds), each a dispatch and a thread fork/join.
`FusedCpuDecoder` runs one whole decoding step - every layer, the final norm and the output projection - in one call
into the C++ kernel in llama/cpu_kernels.cpp (package data, built on first use by llama/cpu_kernels.py), with the model's rounding points (in bf16: bf16
activations, fp32 norms/RoPE/softmax/accumulation). Each layer's projections are packed into one
buffer in the order they are read (wq wk wv wo w1 w3 w2), so q/k/v and w1/w3 are each one
matrix-vector product streaming contiguous memory; the parameters become views of that buffer
(same keys, same values, no extra memory): the packing is a transform of the built model.

Greedy decoding (`greedy_step`) goes further: the embedding look-up, the step, the argmax and the
batch's bookkeeping are one call, since each small torch operation between two steps finds the
caches full of weights (~0.6 ms a token on a 160M model in Python, ~5-10% of its step).

A prompt (many positions at once) is matrix products; the eager forward spends about a quarter of a
prefill around them (RMSNorm, RoPE, SiLU, casts and copies, flash attention at T = 128), and torch's
oneDNN repacks every weight for every product. The kernel's `prefill` runs the whole forward of a
prompt chunk in one call: the products on the packed q|k|v and w1|w3, vectorised passes for the
rest, and attention over the cache (in the AVX-512 builds the blocked attention kernel,
llama/blocked_attention.py, for head sizes a multiple of 32; else torch's sdpa). In the AVX-512
builds the products are its own, for int8 weights too: the positions as vector lanes, K walked in
panels that keep a block of positions in L1, multiplied in fp32 where the CPU has no bf16 dots
(weights widened a panel at a time). In that build fp32 weights, and bf16 and int8 ones from 512
prompt rows on (widened a slice at a time), go to torch's fp32 products (MKL's), which were faster
there. Other builds use torch's at::linear.
Where every position's logits are wanted (logprobs), prefill runs the model's own forward.

The C++ source and its builds (one per instruction set: AVX512-BF16 with and without VBMI, AVX-512
without its bf16 instructions, AVX2 + FMA, NEON) are llama/cpu_kernels.cpp and llama/cpu_kernels.py,
which also hold the training loss's pass, the blocked attention and the benchmarks' bandwidth probe.
LLAMA_CPU_KERNEL=avx512bf16_vbmi|avx512bf16|avx512|avx2|neon forces one build (e.g. to measure AVX2
on an AVX-512 machine).

Where another process keeps a core busy, a step's ~100 fork/joins each wait for the thread that
shares that core: on a 2-core Xeon, 160M's bf16 step took 104 ms on both threads against 27 ms on
one (14.5 ms with both cores free). `ThreadCount` times the steps and moves them to fewer threads
while that is faster, without changing a single logit.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional

import torch
from torch import nn

from llama.blocked_attention import BLOCK
from llama.cpu_kernels import cpu_kernels
from llama.env import cached_measurement, cpu_model_name, default_dtype, dtype_name, machine_key
from llama.inference.decoders import DecodeState, EagerDecoder, greedy_step
from llama.model import LINEARS, KVCache, ModelArgs, Transformer
from llama.quantize import Int8Embedding, Int8Linear

MAX_ROWS = 8  # batch rows per fused step (the kernel is templated up to 8)


class ThreadCount:
    """How many threads the fused decoding steps run on: all of torch's (`full`), unless fewer
    measured faster. The steps are timed. After 3 steps in a row slower than SLOWER times the fastest
    seen on all threads, each other count (full - 1, full / 2, 1) runs one step, and the fastest of those and
    the recent all-thread steps is kept. On fewer threads, all of them get one step again after 16
    steps, then 32, 64, ... 256 while they keep losing. The caller holds the attention's chunks at
    `full` (the kernel's Weights.split): the count then changes no result."""

    SLOWER = 1.5
    FIRST_RETRY, LAST_RETRY = 16, 256

    def __init__(self, full: int, clock: Callable[[], float] = time.perf_counter):
        self.full, self.clock = full, clock
        self.counts = sorted({full, max(1, full - 1), max(1, full // 2), 1}, reverse=True)
        self.cur = full
        self.best = math.inf  # fastest step on all threads since the last trial
        self.recent: list[float] = []  # the current count's last steps
        self.trial: list[int] = []  # counts still to try, one step each
        self.tried: dict[int, float] = {}
        self.retry = self.left = self.FIRST_RETRY

    def run(self, step: Callable):
        """step() on the chosen number of threads (torch's count restored after), timed."""
        n = self.trial[0] if self.trial else self.cur
        before = torch.get_num_threads()
        if n != before:
            torch.set_num_threads(n)
        try:
            t = self.clock()
            out = step()
            self.observe(n, self.clock() - t)
        finally:
            if n != before:
                torch.set_num_threads(before)
        return out

    def observe(self, n: int, seconds: float) -> None:
        if self.trial:
            self.tried[self.trial.pop(0)] = seconds
            if not self.trial:
                self._choose()
            return
        self.recent = (self.recent + [seconds])[-3:]
        if self.cur == self.full:
            self.best = min(self.best, seconds)
            if len(self.recent) == 3 and min(self.recent) > self.SLOWER * self.best:
                self.trial = [c for c in self.counts if c != self.cur]
        else:
            self.left -= 1
            if self.left <= 0:
                self.trial = [self.full]

    def _choose(self) -> None:
        times = dict(self.tried)
        times.setdefault(self.cur, sorted(self.recent)[len(self.recent) // 2])  # the current count: its recent median
        was, self.cur = self.cur, min(times, key=times.get)
        if self.cur == self.full:
            self.best, self.retry = times[self.full], self.FIRST_RETRY  # the new normal: e.g. a longer context
        else:
            self.retry = self.FIRST_RETRY if was == self.full else min(2 * self.retry, self.LAST_RETRY)
        self.left, self.recent, self.tried = self.retry, [], {}


def _pack(mods: list, attr: str) -> list[torch.Tensor]:
    """Moves tensor `attr` of each module in `mods` into one new buffer, in that order (the module's
    tensor becomes a view of it: same values, no copy kept) -> [q|k|v, wo, w1|w3, w2] for a
    block's (wq wk wv wo w1 w3 w2): weights (out, in) as 2-d views, scales (out,) as 1-d."""
    tensors = [getattr(m, attr) for m in mods]
    buf = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    views, off = [], 0
    for t in tensors:
        view = buf[off:off + t.numel()].view_as(t)
        view.copy_(t.detach())
        t.data = view  # the parameter (or buffer) now lives in the packed buffer
        views.append(view)
        off += t.numel()
    q, k, v, wo, w1, w3, w2 = views
    rows = q.shape[1:]  # () for scales, (dim,) for weights
    qkv = buf[:q.numel() + k.numel() + v.numel()].view(-1, *rows)
    w13 = buf[off - w2.numel() - w1.numel() - w3.numel():off - w2.numel()].view(-1, *rows)
    return [qkv, wo, w13, w2]


class FusedCpuDecoder(EagerDecoder):
    """Runs `model(tokens, start_pos, cache)` for one new token per row (up to MAX_ROWS rows) in one
    call into the fused kernel, and prompts through its `prefill` where it has one (`prefills`); the
    rest (larger batches, prompts wanting every position's logits) runs eagerly. Build with
    `FusedCpuDecoder.create(model)`, which packs the layers' weights (the parameters become views
    into the packed buffers, keys and values unchanged) and returns None where the model does not
    qualify (not bf16/fp32 on CPU, sharded, Linears replaced by anything but quantize.py's int8, or
    no kernel). `variant` forces a kernel (see `llama.cpu_kernels.cpu_kernels`); `self.variant` says which one runs.

    An int8 model (`llama.quantize.quantize_int8`) decodes through the same step with its int8
    weights and per-row scales as they are (half the bytes of bf16 to read per token): activations
    stay in the model's dtype and are not quantized; each product is the int8 row widened exactly in
    registers (to bf16 for the native bf16 dot on AVX512-BF16 with bf16 activations, else to fp32
    against the fp32-widened input row), summed in fp32, rounded to the model's dtype and then scaled
    (Int8Linear's rounding points). It differs from the eager int8 model only by the
    order of the fp32 sums (the eager bf16 product may also round differently inside)."""

    name = "fused"

    def __init__(self, model, kernel):
        super().__init__(model)
        self.kernel = kernel
        self.variant: str = kernel.ISA  # what the extension was compiled for
        self.int8 = isinstance(model.output, Int8Linear)
        self.layers: list[torch.Tensor] = []  # 6 per layer, in the kernel's order
        self.scales: list[torch.Tensor] = []  # int8: 4 per layer (q|k|v, wo, w1|w3, w2), then the output's
        for block in model.layers:
            mods = [block.get_submodule(name) for name in LINEARS]  # wq wk wv wo w1 w3 w2
            qkv, wo, w13, w2 = _pack(mods, "weight")
            self.layers += [block.attention_norm.weight, qkv, wo, block.ffn_norm.weight, w13, w2]
            if self.int8:
                self.scales += _pack(mods, "scales")
        if self.int8:
            self.scales.append(model.output.scales)
        self._ptrs = self._pointers()
        self.prefills = hasattr(kernel, "prefill")  # prompts in one call too (every build of this source has it)
        # greedy steps whole in one call (look-up, step, argmax, bookkeeping), and one-token steps
        # from the ids, where the embedding is one the kernel reads: the model's dtype, or
        # quantize.py's int8 rows and scales
        emb = model.tok_embeddings
        dtype = next(model.parameters()).dtype
        self.whole_greedy_steps = hasattr(kernel, "greedy_step") and (
            (type(emb) is nn.Embedding and emb.weight.dtype == dtype) or
            (type(emb) is Int8Embedding and emb.scales.dtype == dtype))
        if self.whole_greedy_steps:  # what a greedy step reads, checked once (the RoPE table as fp32 values)
            a = model.args
            self._weights = kernel.Weights(self.layers, model.norm.weight, model.output.weight, self.scales, emb.weight,
                                           emb.scales if type(emb) is Int8Embedding else emb.weight.new_empty(0),
                                           model.freqs_cis.float().contiguous(), a.norm_eps, a.n_heads, a.n_kv_heads)
        self.threads: Optional[ThreadCount] = None  # for the steps that go through _weights

    def _steps(self) -> Optional[ThreadCount]:
        """The thread count for steps through _weights, anew whenever torch's count changed."""
        if not self.whole_greedy_steps:
            return None
        full = torch.get_num_threads()
        if self.threads is None or self.threads.full != full:
            self.threads = ThreadCount(full)
            self._weights.split = full  # the attention's chunks as on all threads, whatever count runs
        return self.threads

    @staticmethod
    def create(model, variant: Optional[str] = None) -> Optional["FusedCpuDecoder"]:
        params = list(model.parameters())
        if not params or params[0].dtype not in (torch.bfloat16, torch.float32) or any(
                type(p) is not nn.Parameter or p.dtype != params[0].dtype or p.device.type != "cpu" for p in params):
            return None
        # every projection and the output a plain Linear (in the model's dtype), or every one int8
        # with scales in the model's dtype
        projections = [block.get_submodule(n) for block in model.layers for n in LINEARS] + [model.output]
        kind = type(model.output)
        if kind not in (nn.Linear, Int8Linear) or any(type(m) is not kind for m in projections):
            return None
        if kind is Int8Linear and any(m.scales.dtype != params[0].dtype or m.weight.device.type != "cpu"
                                      for m in projections):
            return None
        if (kernel := cpu_kernels(variant)) is None:
            return None
        with torch.inference_mode(False), torch.no_grad():  # packed weights must stay usable outside inference
            return FusedCpuDecoder(model, kernel)

    def _pointers(self) -> tuple:  # parameters and buffers: int8 weights and scales are buffers
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def valid(self) -> bool:
        """False once the model's parameters or buffers were replaced (moved, cast, quantized,
        reassigned)."""
        return self._pointers() == self._ptrs

    def refreshed(self) -> EagerDecoder:
        """Self while the weights are still the packed ones; else packed anew, or eager where the
        model no longer qualifies (e.g. quantized since)."""
        return self if self.valid() else (FusedCpuDecoder.create(self.model, self.variant) or EagerDecoder(self.model))

    def __call__(self, tokens: torch.Tensor, start_pos: int, cache, last_only: bool = False) -> torch.Tensor:
        """(B, T) ids at positions start_pos.. -> float logits, writing the cache; one-token steps of
        up to MAX_ROWS rows run fused, and so do prompts (T > 1) where only the last position's logits
        are wanted and the kernel has `prefill` (see `prefills`)."""
        m = self.model
        if tokens.size(1) > 1 and last_only and self.prefills and start_pos + tokens.size(1) <= m.freqs_cis.size(0):
            h = m.tok_embeddings(tokens).contiguous()  # (B, T, dim)
            freqs = m.freqs_cis[start_pos:start_pos + tokens.size(1)].float().contiguous()  # as the model holds them
            threads, before = self._steps(), torch.get_num_threads()
            n = threads.cur if threads is not None else before  # as many threads as the steps found fastest
            if n != before:
                torch.set_num_threads(n)
            try:
                logits = self.kernel.prefill(h, self.layers, m.norm.weight, m.output.weight, self.scales, cache.k,
                                             cache.v, start_pos, freqs, m.args.norm_eps, m.args.n_heads, BLOCK)
            finally:
                if n != before:
                    torch.set_num_threads(before)
            return logits[:, None]
        if tokens.size(1) != 1 or tokens.size(0) > MAX_ROWS:
            return super().__call__(tokens, start_pos, cache, last_only)
        if self.whole_greedy_steps:  # the kernel holds the weights: the ids go in as they are
            ids, threads = tokens[:, 0].contiguous(), self._steps()

            def step():
                return self.kernel.decode_ids(self._weights, ids, start_pos, cache.k, cache.v)
            return (threads.run(step) if threads else step())[:, None]
        h = m.tok_embeddings(tokens[:, 0]).contiguous()  # (B, dim) in the model's dtype (int8 rows: dequantized)
        logits = self.kernel.decode_step(h, self.layers, m.norm.weight, m.output.weight, self.scales, cache.k, cache.v,
                                         start_pos, m.freqs_cis[start_pos].float(), m.args.norm_eps, m.args.n_heads,
                                         m.args.n_kv_heads)
        return logits[:, None]

    def greedy_step(self, cache: KVCache, state: DecodeState, eos: int) -> Optional[bool]:
        """`decoders.greedy_step` of the whole batch in one call into the kernel (eager beyond
        MAX_ROWS rows); returns whether every row is done (None from the eager step). Between steps
        the dozen small torch operations of a Python step each find the caches full of weights:
        ~0.6 ms a token here, 5-10% of a 160M model's step."""
        if state.tokens.size(0) > MAX_ROWS:
            greedy_step(self.model, cache, state, eos)
            return None
        threads = self._steps()

        def step():
            return self.kernel.greedy_step(self._weights, state.tokens, state.in_prompt, state.done, state.ends,
                                           state.cur, cache.k, cache.v, eos)
        return threads.run(step) if threads else step()


def read_bandwidth(buf: torch.Tensor, variant: Optional[str] = None) -> tuple[float, float]:
    """(bytes/s, sum of the elements) of one read of `buf` (a contiguous fp32 tensor, best several
    times the last-level cache) by the fused kernel's build (`cpu_kernels(variant)`): its vector
    loads on every torch thread, each thread's share read as interleaved streams (2 or 4 by build),
    as a decoding step reads its weights, timed inside the call. The sum is the checksum that the
    whole buffer was read."""
    kernel = cpu_kernels(variant)
    if kernel is None:
        raise RuntimeError("read_bandwidth: no fused CPU kernel builds on this machine (see the warning above)")
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError(f"read_bandwidth reads a contiguous fp32 CPU tensor, got {buf.dtype} on {buf.device} "
                         f"(contiguous: {buf.is_contiguous()})")
    return kernel.read_bandwidth(buf)


PROBE_ARGS = dict(dim=1024, n_layers=2, n_heads=8, vocab_size=8192, multiple_of=256)  # ~42M parameters


def decode_speeds(variant: Optional[str] = None, steps: int = 6) -> Optional[dict[str, float]]:
    """{"bf16": tokens/s, "fp32": tokens/s} of batch-1 fused decoding steps on this CPU with the
    current thread count: a random 2-layer model of ~42M parameters (170 MB in fp32, beyond the
    caches, so the step reads memory as a real model's does), the best of `steps` steps per dtype
    (~0.5 s in all). Decoding reads every weight per token, so bf16 weights can win even on CPUs
    whose bf16 matmuls lose to fp32: this measures it. Cached per CPU model, thread count, torch
    and kernel (llama.env.cached_measurement, decode_speeds.json); None where no kernel builds."""
    kernel = cpu_kernels(variant)
    if kernel is None:
        return None
    chosen = kernel.ISA  # the build that loaded: the variant asked for, $LLAMA_CPU_KERNEL, or the fastest that builds

    def measure() -> dict[str, float]:
        torch.manual_seed(0)
        with torch.inference_mode():
            base = Transformer(ModelArgs(**PROBE_ARGS))
            base.init_weights()
            runs = {}
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                model = copy.deepcopy(base).to(dtype).eval()  # (Module.to works in place)
                runs[name] = (FusedCpuDecoder.create(model, chosen), model.new_cache(1, steps + 2, dtype=dtype))
            token = torch.zeros(1, 1, dtype=torch.long)
            best = {name: float("inf") for name in runs}
            for pos in range(steps + 2):  # alternating, so that load from elsewhere hits both alike
                for name, (decoder, cache) in runs.items():
                    t0 = time.perf_counter()
                    decoder(token, pos, cache)
                    if pos >= 2:  # the first two warm the caches and the thread pool
                        best[name] = min(best[name], time.perf_counter() - t0)
        return {name: 1.0 / t for name, t in best.items()}

    return cached_measurement("decode_speeds", f"{machine_key()} | {chosen} kernel", measure, keep=_conclusive)


def _conclusive(speeds: dict[str, float]) -> bool:
    """bf16 and fp32 apart by more than 5%: a near-tie says little (on a busy machine, other
    processes' time slices can dominate both), so it is not cached."""
    return abs(speeds["bf16"] / speeds["fp32"] - 1) > 0.05


def decode_dtype() -> tuple[torch.dtype, str]:
    """The dtype to hold weights in for decoding on this CPU, and why: the faster of bf16 and fp32
    in `decode_speeds`; without a fused kernel or with a near-tie, `llama.env.default_dtype`'s rule."""
    speeds = decode_speeds()
    if speeds is None:
        dt = default_dtype("cpu")
        return dt, f"{dtype_name(dt)}: no fused decoding kernel on this CPU (bf16 only where it multiplies bf16 natively)"
    if not _conclusive(speeds):
        dt = default_dtype("cpu")
        return dt, (f"{dtype_name(dt)}: decoding measured {speeds['bf16']:.0f} tokens/s with bf16 weights and "
                    f"{speeds['fp32']:.0f} with fp32, too close to choose (a busy machine?), so by the CPU's flags")
    dt = torch.bfloat16 if speeds["bf16"] > speeds["fp32"] else torch.float32
    return dt, (f"{dtype_name(dt)}: measured on {cpu_model_name()} with {torch.get_num_threads()} threads, fused "
                f"decoding step {speeds['bf16']:.0f} tokens/s with bf16 weights vs {speeds['fp32']:.0f} with fp32 "
                f"(a ~42M-parameter probe)")
