"""Generation speed: our Llama vs transformers' LlamaForCausalLM (and llama.cpp) on the same weights, one process.

For each dtype and batch size: time to first token (prefill of a P-token prompt + first sample),
prefill tokens/s, decode tokens/s (greedy, N new tokens, the first excluded), and how close each
comes to what this machine allows, measured in the same run:

- memory ceiling (decode tok/s): bytes read per step (every weight but the embedding table, plus
  the KV cache of the positions attended) over the highest read bandwidth probed in that dtype and
  batch's block: the probes right before and right after every timed run of every implementation in
  it. The bandwidth is read the way the fused decoding step reads its weights
  (`measure_bandwidth_gbs`: the kernel's own build, its vector loads on every thread, as many
  streams per thread as a one-row product reads, with their software prefetches, over a 256 MB
  buffer), so the fused step cannot beat it. A shared machine's bandwidth moves second to second
  (40-95 GB/s within one run on the AMD EPYC): the two probes around a ~0.1 s run can both miss the
  fast spell it ran in (a row once read 139% of a ceiling taken from them alone), so every row of a
  block is held to the fastest reading of that block; the table also gives the higher of the two
  probes around each row's fastest run.
- compute ceiling (decode tok/s): FLOPs per step (2 x matmul parameters x batch + attention) over
  the dtype's matmul peak (`measure_matmul_flops`: a fresh (2048, 2048) @ (2048, 2048) product by
  torch and by the fused kernel build's own product, the faster, measured before and after each
  dtype/batch block, the higher kept). For bf16 (and int8) weights the peak is the faster of bf16
  and fp32 products (`compute_peak`): they widen exactly to fp32, which is how a CPU without native
  bf16 products computes them fastest (our kernel does), so where fp32 multiplies faster the
  ceiling is fp32's.
- % of roofline: decode tok/s over min(memory ceiling, compute ceiling): memory-bound at batch 1,
  closer to compute-bound at batch 8.
- prefill % of matmul peak: the prompt's FLOPs (2 x layer parameters x tokens + the output
  projection of the last position + causal attention) per TTFT over the dtype's matmul peak;
  and over the speed of the prefill's matmuls alone (`measure_prefill_matmuls`: the model's layer
  weights times the prompt's rows, cold weights, nothing else, by F.linear and by the kernel's own
  product, bf16 weights also as fp32 with the faster kept; before and after each block, the higher
  kept), which is below that peak at short prompts and so is what prefill could reach with
  everything around the matmuls free.

The bandwidth and matmul speed of this shared machine move by 2x from minute to minute, so each run
is compared with its own. Runs alternate between the implementations; the fastest of `repeats` is
kept.

With llama-cpp-python installed (`pip install -e .[llamacpp]`), batch-1 rows "llama.cpp f32" /
"llama.cpp bf16" run the same weights written by llama.formats.gguf.save_gguf (the row's dtype, KV
cache in the same dtype, flash attention on, n_threads = torch's thread count), timed by the same
clock around `Llama.eval` calls (prompt in one call, then one token per call, greedy argmax of the
last logits); "llama.cpp Q8_0" runs the file quantized by llama.cpp's own quantizer
(llama_model_quantize from the f32 file), next to "ours int8" (llama.quantize.quantize_int8 of the
bf16 model, decoded by whatever decoder Llama picks for it).

    python benchmarks/generate.py                       # 160M preset, bf16 and fp32, batch 1 and 8
    python benchmarks/generate.py --model 60M --dtypes bf16 --batches 1 --compile
    python benchmarks/generate.py --dtypes bf16,fp32 --batches 1 --kernels avx2   # + the AVX2 build
    python benchmarks/generate.py --llamacpp=False      # without the llama.cpp / int8 rows
    python benchmarks/generate.py --hf_compile=False    # without transformers under torch.compile

"transformers (compiled)" is transformers' generate with its static cache and its own torch.compile
of the decoding forward (generate does that by itself on GPUs; forced here with
CompileConfig(_compile_all_devices=True)), the strongest transformers configuration.
    LLAMA_CPU_KERNEL=avx2 python benchmarks/generate.py   # "ours" itself on the AVX2 build

`--kernels` adds a row per fused-kernel build named (llama/cpu_kernels.py VARIANTS, e.g.
avx2 on an AVX-512 machine: what a CPU without AVX-512 would run), each on its own copy of the
weights; LLAMA_CPU_KERNEL forces the build that "ours" (Llama.build) uses.
"""

from __future__ import annotations

import copy
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from llama.bpe_tokenizer import BPETokenizer
from llama.env import resolve_dtype
from llama.formats.gguf import save_gguf
from llama.formats.hf import hf_config, to_hf
from llama.inference import Llama
from llama.cpu_kernels import cpu_kernels
from llama.inference.cpu_decode import FusedCpuDecoder, read_bandwidth
from llama.model import ModelArgs, Transformer
from llama.quantize import quantize_int8, weight_bytes

try:
    import llama_cpp
except ImportError as e:  # the optional extra: pip install -e .[llamacpp]
    llama_cpp, LLAMA_CPP_MISSING = None, f"{type(e).__name__}: {e}"


class _NoEos:
    """Token-level benchmarking needs no text: eos never occurs, so every row runs to max_gen_len."""

    eos_id = -100


_PROBE: list[torch.Tensor] = []


def measure_bandwidth_gbs(repeats: int = 3) -> float:
    """Read bandwidth now (GB/s), read the way the fused decoding step reads its weights:
    llama.inference.cpu_decode.read_bandwidth, compiled in the kernel's own build (the ISA "ours"
    decodes with), sums a 256 MB fp32 buffer of ones with vector loads on every torch thread
    (at::parallel_for), each thread's half walked as interleaved streams (as many as a one-row
    product reads), timed inside the C++ call; the best of `repeats`. The sum must come back as the
    element count (every byte read).
    Where no fused kernel builds: torch's sum over the same buffer, timed around the call."""
    if not _PROBE:
        _PROBE.append(torch.ones(256 * 2**20 // 4, dtype=torch.float32))  # touched, so the pages are real
    x = _PROBE[0]
    best = 0.0
    for _ in range(repeats):
        if cpu_kernels() is not None:
            bps, total = read_bandwidth(x)
            if total != x.numel():
                raise RuntimeError(f"read_bandwidth summed {total} over {x.numel()} ones: it did not read the whole buffer")
        else:
            t0 = time.perf_counter()
            x.sum()
            bps = x.numel() * 4 / (time.perf_counter() - t0)
        best = max(best, bps)
    return best / 1e9


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """The dtype's matmul peak now (FLOP/s): the best of `repeats` (n, n) @ (n, n) products on all
    threads, measured afresh (llama.env.cpu_matmul_speeds caches its figure on disk per CPU model
    and uses n = 1024, where this CPU reaches ~2/3 of its 2048 speed), by torch's matmul and, where
    the fused kernel build has it, by prefill's own product (`linear_rows`): the faster. On the AMD
    EPYC with AVX512-BF16 torch's fp32 product ran at ~220 GFLOP/s and the kernel's at ~2x that, so
    a ceiling from torch's alone let our fp32 prefill read 190% of its peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return max(_torch_matmul_flops(a, b, repeats), _kernel_matmul_flops(a, b, repeats))


def _best_flops(run, flops: float, repeats: int) -> float:
    run()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def _torch_matmul_flops(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    return _best_flops(lambda: a @ b, 2 * a.size(0) * a.size(1) * b.size(1), repeats)


def _kernel_matmul_flops(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """FLOP/s of a @ b by the fused kernel build's `linear_rows` (0 where the build has none); it must
    give torch's product (to the dtype's rounding), or the figure is refused."""
    kernel = cpu_kernels()
    if kernel is None or not hasattr(kernel, "linear_rows"):
        return 0.0
    w = b.t().contiguous()  # linear_rows takes the weight as (out, in)
    out = torch.empty(a.size(0), w.size(0), dtype=a.dtype)
    none = a.new_empty(0)
    with torch.inference_mode():
        kernel.linear_rows(a, w, out, False, none)
        expected = (a.float() @ b.float()).to(a.dtype)
        if not torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.float().abs().max().item()):
            raise RuntimeError(f"the fused kernel's linear_rows differs from torch's {a.dtype} matmul "
                               f"(max difference {(out.float() - expected.float()).abs().max().item():.3g}): "
                               "its speed is not a matmul peak")
        return _best_flops(lambda: kernel.linear_rows(a, w, out, False, none), 2 * a.size(0) * a.size(1) * w.size(0),
                           repeats)


def compute_peak(dtype: torch.dtype) -> float:
    """The matmul peak of weights in `dtype` (FLOP/s): bf16's is the faster of bf16 and fp32
    products, bf16 weights being exactly fp32 numbers (see the module docstring)."""
    peak = measure_matmul_flops(dtype)
    return max(peak, measure_matmul_flops(torch.float32)) if dtype == torch.bfloat16 else peak


def measure_prefill_matmuls(model: Transformer, rows: int, repeats: int = 3) -> float:
    """FLOP/s of a prefill's matrix products alone: every layer weight of `model` in its forward's
    order, each times a (rows, in_features) input as F.linear does in the model's dtype; the best of
    `repeats` passes. The weights are as cold as prefill finds them (they do not fit in the cache)
    and nothing else runs (no attention, norms, RoPE or SiLU): a ceiling for prefill % of peak that
    the square-matmul peak, with its hot n x n operands, is not."""
    weights = [p for k, p in model.named_parameters() if k.startswith("layers.") and p.dim() == 2]
    if weights[0].dtype == torch.bfloat16:  # bf16 weights as fp32 too (see compute_peak): the faster
        return max(_prefill_matmuls(weights, rows, repeats), _prefill_matmuls([w.float() for w in weights], rows, repeats))
    return _prefill_matmuls(weights, rows, repeats)


def _prefill_matmuls(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """FLOP/s of the layer products of `rows` inputs by F.linear and, where the fused kernel build
    has it, by prefill's own product (`linear_rows`, what our prefill runs): the faster."""
    dtype = weights[0].dtype
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {w.size(1) for w in weights}}
    flops = 2 * rows * sum(w.numel() for w in weights)
    kernel = cpu_kernels()
    products = [lambda x, w: F.linear(x, w)]
    if kernel is not None and hasattr(kernel, "linear_rows"):
        outs = {w.size(0): torch.empty(rows, w.size(0), dtype=dtype) for w in weights}
        none = torch.empty(0, dtype=dtype)
        products.append(lambda x, w: kernel.linear_rows(x, w, outs[w.size(0)], False, none))
    best = float("inf")
    with torch.inference_mode():
        for product in products:
            for w in weights[:2]:  # warm up the shapes' kernels
                product(inputs[w.size(1)], w)
            for _ in range(repeats):
                t0 = time.perf_counter()
                for w in weights:
                    product(inputs[w.size(1)], w)
                best = min(best, time.perf_counter() - t0)
    return flops / best


def decode_flops(args: ModelArgs, matmul_params: int, bsz: int, context: float) -> float:
    """FLOPs of one decoding step of `bsz` rows: 2 per matmul weight per row (layers and the output
    projection), plus attention over `context` positions: q.k and p.v, 2 x n_heads x head_dim
    each per position, per layer per row. Norms, RoPE, SiLU are O(dim) and left out."""
    return bsz * (2 * matmul_params + 4 * args.n_layers * args.n_heads * args.head_dim * context)


def prefill_flops(args: ModelArgs, layer_params: int, output_params: int, bsz: int, tokens: int) -> float:
    """FLOPs of a `tokens`-long prefill of `bsz` rows: 2 per layer matmul weight per token, the
    output projection of the last position only (what Llama's prefill computes), and causal
    attention (position t attends t + 1 positions: sum 2 x 2 x n_heads x head_dim x (t + 1))."""
    attention = 2 * args.n_layers * args.n_heads * args.head_dim * tokens * (tokens + 1)
    return bsz * (2 * layer_params * tokens + 2 * output_params + attention)


def main(model: str = "160M", dtypes=("bf16", "fp32"), batches=(1, 8), prompt_len: int = 128, new_tokens: int = 32,
         repeats: int = 2, compile: bool = False, threads: int | None = None, out: str | None = None,
         kernels=(), llamacpp: bool = True, hf_compile: bool = True):
    if repeats < 1:
        raise SystemExit(f"--repeats {repeats}: each row needs at least 1 timed run")
    if new_tokens < 2:
        raise SystemExit(f"--new_tokens {new_tokens}: decode speed is timed over the tokens after the first, so at least 2")
    if threads:
        torch.set_num_threads(threads)

    dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    batches = [batches] if isinstance(batches, int) else list(batches)
    kernels = [kernels] if isinstance(kernels, str) else list(kernels)
    args = ModelArgs.from_name(model, max_seq_len=prompt_len + new_tokens)
    torch.manual_seed(0)
    base = Transformer(args).eval().requires_grad_(False)
    n_params = base.num_params()
    # parameter counts for the FLOPs: the layers' matmul weights, the output projection (2-D only:
    # norms do no matmul), the embedding table (a lookup: no FLOPs, one row read)
    layer_params = sum(p.numel() for k, p in base.named_parameters() if k.startswith("layers.") and p.dim() == 2)
    output_params = base.output.weight.numel()
    bw = measure_bandwidth_gbs()
    bw_samples = [bw]
    print(f"model {model} ({n_params / 1e6:.0f}M params), prompt {prompt_len}, new {new_tokens}, "
          f"threads {torch.get_num_threads()}, bandwidth {bw:.1f} GB/s now ("
          f"{'read_bandwidth, the fused kernel build' if cpu_kernels() is not None else 'torch sum'} over 256 MB), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    prompts = {bsz: torch.randint(3, args.vocab_size, (bsz, prompt_len)) for bsz in batches}
    rows, used, peaks = [], {}, {}  # used: (dtype, batch) -> how "ours" decoded; peaks: dtype -> [FLOP/s samples]
    greedy = {}  # (dtype, batch) -> ours' greedy tokens (what the other rows' agreement compares with)
    for dt_name in dtypes:
        dtype = resolve_dtype(dt_name, "cpu")
        ours = Transformer(args).to(dtype).eval().requires_grad_(False)
        ours.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()})
        hf = LlamaForCausalLM(LlamaConfig(**hf_config(args, dtype))).to(dtype).eval()
        hf.load_state_dict({k: v.to(dtype) for k, v in to_hf(base.state_dict(), args).items()})
        # ours: what Llama.build sets up (the fused C++ decoding step on CPU, <= 8 rows);
        # "ours, eager": the model's own forward per step; "ours+compile": the compiled decoder
        variants = {"ours": "auto", "ours, eager": "eager"}
        if compile:
            variants["ours+compile"] = "compiled"
        for kernel in kernels:  # a fused decoder on that kernel build, over its own copy of the weights
            variants[f"ours, {kernel}"] = FusedCpuDecoder.create(copy.deepcopy(ours), kernel)
            if variants[f"ours, {kernel}"] is None:
                raise SystemExit(f"--kernels {kernel}: that fused kernel did not build (see the warning above)")
        weight_bytes_step = sum(p.numel() * p.element_size() for k, p in ours.named_parameters()
                                if "tok_embeddings" not in k)
        for bsz in batches:
            peak_before = compute_peak(dtype)
            mm_before = measure_prefill_matmuls(ours, bsz * prompt_len)
            llamas = {name: Llama(kind.model if isinstance(kind, FusedCpuDecoder) else ours, _NoEos(), args.max_seq_len,
                                  bsz, decoder=kind) for name, kind in variants.items()}
            used[dt_name, bsz] = _decoder_name(llamas["ours"].decoder)
            print(f"{dt_name} batch {bsz}: ours decodes with {used[dt_name, bsz]}", flush=True)
            ids = prompts[bsz].tolist()
            runners = {name: ours_runner(llama, ids, prompt_len) for name, llama in llamas.items()}
            runners["transformers"] = _hf_runner(hf, prompts[bsz])
            if hf_compile:
                runners["transformers (compiled)"] = _hf_runner(hf, prompts[bsz], compiled=True, max_len=args.max_seq_len)
            if bsz == 1 and llamacpp and llama_cpp is not None and dt_name in ("bf16", "fp32"):
                gguf_dtype = {"bf16": "bf16", "fp32": "f32"}[dt_name]
                runners[f"llama.cpp {gguf_dtype}"] = llama_cpp_runner(write_gguf(base, args, gguf_dtype), ids[0], args,
                                                                       kv_dtype=dt_name)
            results = _time_runs(runners, new_tokens, repeats, bw_samples)
            greedy[dt_name, bsz] = results["ours"]["tokens"]
            peaks[dt_name, bsz] = max(peak_before, compute_peak(dtype))
            mm_alone = max(mm_before, measure_prefill_matmuls(ours, bsz * prompt_len))  # as the peak: the higher
            # KV bytes read per step: keys and values of every layer, averaged over the decoded positions
            context = prompt_len + new_tokens / 2
            kv_bytes = 2 * args.n_layers * bsz * context * args.n_kv_heads * args.head_dim * dtype.itemsize
            block = []
            for name, r in results.items():
                block.append(_row(name, dt_name, bsz, r, prompt_len, new_tokens, greedy[dt_name, bsz],
                                  mem_bytes=weight_bytes_step + kv_bytes, peak=peaks[dt_name, bsz],
                                  mm_alone=mm_alone,
                                  step_flops=decode_flops(args, layer_params + output_params, bsz, context),
                                  prompt_flops=prefill_flops(args, layer_params, output_params, bsz, prompt_len)))
            _compare(block)
            rows += block
    # int8: ours (llama.quantize) next to llama.cpp's Q8_0, batch 1, bf16 activations and KV cache
    if llamacpp and 1 in batches:
        if llama_cpp is None:
            print(f"llama.cpp rows skipped: llama-cpp-python is not importable ({LLAMA_CPP_MISSING}); "
                  f"pip install -e .[llamacpp]", flush=True)
        rows += _int8_rows(base, args, prompts[1], prompt_len, new_tokens, repeats, bw_samples, greedy)
    bw = (min(bw_samples), statistics.median(bw_samples), max(bw_samples))
    print(f"load average at the end {os.getloadavg()[0]:.1f}; bandwidth over the run: min {bw[0]:.1f}, "
          f"median {bw[1]:.1f}, max {bw[2]:.1f} GB/s; matmul peak: "
          + ", ".join(f"{d} b{b} {p / 1e9:.0f}" for (d, b), p in peaks.items()) + " GFLOP/s")
    table = _table(rows, model, prompt_len, new_tokens, bw, used)
    print("\n" + table)
    if out:
        Path(out).write_text(table + "\n")
    return None


def _int8_rows(base, args, prompt, prompt_len, new_tokens, repeats, bw_samples, greedy) -> list[dict]:
    """"ours int8" (quantize_int8 of the bf16 model: int8 weights with per-row scales, bf16
    activations) and, where llama-cpp-python is importable, "llama.cpp Q8_0" (int8 blocks of 32
    with an f16 scale, quantized by llama.cpp from the f32 file), bf16 KV caches, batch 1."""
    q = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    q.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    quantize_int8(q)
    llama = Llama(q, _NoEos(), args.max_seq_len, 1)
    print(f"int8 batch 1: ours int8 decodes with {_decoder_name(llama.decoder)}", flush=True)
    ids = prompt.tolist()
    runners = {"ours int8": ours_runner(llama, ids, prompt_len)}
    q8_bytes = None
    if llama_cpp is not None:
        path = write_gguf(base, args, "q8_0")
        runners["llama.cpp Q8_0"] = llama_cpp_runner(path, ids[0], args, kv_dtype="bf16")
        # Q8_0 stores 32 int8 weights and one f16 scale per block: 34 bytes per 32 weights
        q8_bytes = sum(p.numel() for k, p in base.named_parameters() if p.dim() == 2 and "tok_embeddings" not in k) * 34 / 32
    peak = compute_peak(torch.bfloat16)  # int8 weights are widened to bf16 or fp32 (ours) / int8 dots (llama.cpp)
    results = _time_runs(runners, new_tokens, repeats, bw_samples)
    context = prompt_len + new_tokens / 2
    kv_bytes = 2 * args.n_layers * context * args.n_kv_heads * args.head_dim * 2
    emb = sum(t.numel() * t.element_size() for t in q.tok_embeddings.state_dict().values())
    layer_params = sum(p.numel() for k, p in base.named_parameters() if k.startswith("layers.") and p.dim() == 2)
    block = []
    for name, r in results.items():
        w = weight_bytes(q) - emb if name == "ours int8" else q8_bytes
        block.append(_row(name, "int8" if name == "ours int8" else "Q8_0", 1, r, prompt_len, new_tokens,
                          greedy.get(("bf16", 1)), mem_bytes=w + kv_bytes, peak=peak,
                          step_flops=decode_flops(args, layer_params + base.output.weight.numel(), 1, context),
                          prompt_flops=prefill_flops(args, layer_params, base.output.weight.numel(), 1, prompt_len)))
    _compare(block)
    return block


# --- runners: run(n) -> (new token ids per row, [seconds from the start to each new token] or None)


def ours_runner(llama: Llama, ids: list[list[int]], prompt_len: int):
    def run(n):
        stamps, t0 = [], time.perf_counter()
        with torch.inference_mode():
            for batch, _ in llama.steps(ids, n, temperature=0.0):
                stamps.append(time.perf_counter() - t0)
        return [r[prompt_len:] for r in batch.tokens.tolist()], stamps
    return run


class _Clock:  # transformers' streamer interface: put() gets the prompt, then each new token
    def __init__(self):
        self.t0, self.stamps, self.calls = time.perf_counter(), [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.stamps.append(time.perf_counter() - self.t0)

    def end(self):
        pass


def _hf_runner(hf, prompts: torch.Tensor, compiled: bool = False, max_len: int | None = None):
    """transformers' greedy generate; `compiled`: with its static cache and its own torch.compile of
    the decoding forward (which generate does by itself on GPUs only: forced here on the CPU)."""
    bsz, prompt_len = prompts.shape
    extra = {}
    if compiled:
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        config._compile_all_devices = True  # a class attribute transformers reads to compile off the GPU too
        extra = dict(cache_implementation="static", max_cache_len=max_len, compile_config=config)

    def run(n):
        clock = _Clock()
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                              streamer=clock if bsz == 1 else None, **extra)
        if bsz > 1:  # transformers' streamers take batch 1 only: time the whole run instead
            return out[:, prompt_len:].tolist(), None
        return out[:, prompt_len:].tolist(), clock.stamps
    return run


_GGUF_DIR: list[tempfile.TemporaryDirectory] = []


def write_gguf(base: Transformer, args: ModelArgs, dtype: str) -> Path:
    """`base` written as GGUF (f32 or bf16 by save_gguf; q8_0 by llama.cpp's own quantizer from the
    f32 file) in a temporary directory that lives as long as the process; written once per dtype."""
    if not _GGUF_DIR:
        _GGUF_DIR.append(tempfile.TemporaryDirectory(prefix="llama_bench_"))
    path = Path(_GGUF_DIR[0].name) / f"model_{dtype}.gguf"
    if path.exists():
        return path
    if dtype in ("f32", "bf16"):
        return save_gguf(base, args, _token_vocab(args.vocab_size), path, dtype=dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = torch.get_num_threads()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    src = write_gguf(base, args, "f32")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to Q8_0")
    return path


def _token_vocab(n: int) -> BPETokenizer:
    """A vocabulary of `n` tokens for the GGUF file (llama.cpp needs one of the model's size; the
    benchmark feeds token ids, never text): GPT-2's 256 byte symbols, <s>, </s>, one merge, fillers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["<s>", "</s>", "\u0120t"] + [f"<unused{i}>" for i in range(n - len(alphabet) - 3)]
    types = [1] * len(alphabet) + [3, 3, 1] + [4] * (n - len(alphabet) - 3)  # normal, control, user-defined
    return BPETokenizer(tokens, ["\u0120 t"], types, pre="default", bos_id=len(alphabet), eos_id=len(alphabet) + 1)


_GGML_TYPES = {"fp32": 0, "bf16": 30}  # ggml_type of the KV cache: GGML_TYPE_F32, GGML_TYPE_BF16


def llama_cpp_runner(path: Path, ids: list[int], args: ModelArgs, kv_dtype: str):
    """llama.cpp on `path`, batch 1, with as many threads as torch uses and llama.cpp's own default of
    flash attention on a CPU; the prompt in one `eval` call, then one token per call, greedy (argmax
    of the last position's logits, read from the context)."""
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=args.max_seq_len, n_batch=max(len(ids), 32), n_threads=threads,
                          n_threads_batch=threads, type_k=_GGML_TYPES[kv_dtype], type_v=_GGML_TYPES[kv_dtype],
                          flash_attn=True, verbose=False)

    def argmax():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(args.vocab_size,))
        return int(logits.argmax())

    def run(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        new, stamps = [argmax()], [time.perf_counter() - t0]
        while len(new) < n:
            llm.eval([new[-1]])
            new.append(argmax())
            stamps.append(time.perf_counter() - t0)
        return [new], stamps
    return run


def _time_runs(runners: dict, new_tokens: int, repeats: int, bw_samples: list) -> dict:
    """{name: {ttft, dec (seconds for tokens 2..N), bw, bw_run (GB/s: below), tokens}}:
    each runner warmed up, then `repeats` rounds alternating the runners (background load hits all
    alike), the bandwidth probed right before and after every timed run. bw: the highest of all
    those probes (every row's ceiling); bw_run: the higher of the two around the row's fastest run."""

    def timed(run):
        """(TTFT, decode seconds for tokens 2..N, tokens): per-token stamps where there are, else from
        a 1-token run and an N-token run."""
        tokens, stamps = run(new_tokens)
        if stamps is not None:
            return stamps[0], stamps[-1] - stamps[0], tokens
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        tokens, _ = run(new_tokens)
        return t1 - t0, (time.perf_counter() - t1) - (t1 - t0), tokens

    results, probes = {}, []
    for name, run in runners.items():
        run(2)  # warm-up (and compile)
        results[name] = dict(run=run, ttft=float("inf"), dec=float("inf"), bw=float("nan"), bw_run=float("nan"), tokens=None)
    for _ in range(repeats):
        for name, r in results.items():
            before = measure_bandwidth_gbs()
            ttft, dec, r["tokens"] = timed(r["run"])
            after = measure_bandwidth_gbs()
            bw_samples += [before, after]
            probes += [before, after]
            r["ttft"] = min(r["ttft"], ttft)
            if 0 < dec < r["dec"]:
                r["dec"], r["bw_run"] = dec, max(before, after)
    for r in results.values():
        r["bw"] = max(probes)
    return results


def _row(name, dt_name, bsz, r, prompt_len, new_tokens, reference, mem_bytes, peak, step_flops, prompt_flops,
         mm_alone: float = float("nan")) -> dict:
    """One table row: speeds, both ceilings in decode tok/s, % of the roofline, prefill % of peak
    and of `mm_alone` (`measure_prefill_matmuls`), and the share of greedy tokens equal to
    `reference` (ours at this dtype and batch)."""
    decode_tps = bsz * (new_tokens - 1) / r["dec"]
    mem_tps = bsz * r["bw"] * 1e9 / mem_bytes
    compute_tps = bsz * peak / step_flops
    agree = float("nan")
    if reference is not None:
        agree = sum(x == y for ra, rb in zip(r["tokens"], reference) for x, y in zip(ra, rb)) / (new_tokens * bsz)
    return dict(impl=name, dtype=dt_name, batch=bsz, ttft_ms=r["ttft"] * 1e3, prefill_tps=bsz * prompt_len / r["ttft"],
                prefill_pct=100 * prompt_flops / r["ttft"] / peak, mm_alone=mm_alone,
                prefill_pct_mm=100 * prompt_flops / r["ttft"] / mm_alone, decode_tps=decode_tps, bw=r["bw"], bw_run=r["bw_run"], peak=peak,
                mem_tps=mem_tps, compute_tps=compute_tps, pct_roofline=100 * decode_tps / min(mem_tps, compute_tps),
                agree=agree, vs_hf=float("nan"), vs_eager=float("nan"))


def _compare(block: list[dict]):
    """Fill each row's decode speed relative to transformers and to our eager decoder (where the
    block has them) and print the rows."""
    ref = {r["impl"]: r["decode_tps"] for r in block}
    for r in block:
        r["vs_hf"] = r["decode_tps"] / ref.get("transformers", float("nan"))
        r["vs_eager"] = r["decode_tps"] / ref.get("ours, eager", float("nan"))
        _print_row(r)


def _decoder_name(decoder) -> str:
    return f"{decoder.name} ({decoder.variant})" if isinstance(decoder, FusedCpuDecoder) else decoder.name


def _print_row(r):
    ratios = "".join(f"{r[k]:.2f}x {what}, " for k, what in (("vs_hf", "transformers"), ("vs_eager", "eager"))
                     if r[k] == r[k])  # nan: the block has no such row (int8)
    print(f"{r['impl']:>16} {r['dtype']:>5} b{r['batch']:<2} ttft {r['ttft_ms']:7.1f} ms  prefill {r['prefill_tps']:7.0f} "
          f"tok/s ({r['prefill_pct']:.0f}% of matmul peak {r['peak'] / 1e9:.0f} GFLOP/s"
          + (f", {r['prefill_pct_mm']:.0f}% of its matmuls alone at {r['mm_alone'] / 1e9:.0f}" if r["mm_alone"] == r["mm_alone"] else "")
          + ")  "
          f"decode {r['decode_tps']:6.1f} tok/s ({ratios}ceilings: memory {r['mem_tps']:.1f} at {r['bw']:.0f} GB/s "
          f"(the block's fastest probe; {r['bw_run']:.0f} around this row's fastest run), "
          f"compute {r['compute_tps']:.0f} tok/s; {r['pct_roofline']:.0f}% of roofline)  "
          f"greedy agreement {r['agree']:.2f}", flush=True)


def _pct_of(pct: float, flops: float) -> str:
    return "-" if pct != pct else f"{pct:.0f}% ({flops / 1e9:.0f})"


def _table(rows, model, prompt_len, new_tokens, bw, used) -> str:
    lines = ["| impl | dtype | batch | TTFT (ms) | prefill tok/s | prefill % of matmul peak | "
             "prefill % of its matmuls alone (GFLOP/s) | decode tok/s | "
             "decode vs transformers | memory ceiling tok/s (the block's fastest GB/s; around the row's fastest run) | "
             "compute ceiling tok/s (GFLOP/s then) | "
             "% of roofline | greedy agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_hf = "-" if r["vs_hf"] != r["vs_hf"] else f"{r['vs_hf']:.2f}x"
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']} | {r['ttft_ms']:.0f} | {r['prefill_tps']:.0f} | "
                     f"{r['prefill_pct']:.0f}% | {_pct_of(r['prefill_pct_mm'], r['mm_alone'])} | {r['decode_tps']:.1f} | {vs_hf} | {r['mem_tps']:.1f} ({r['bw']:.1f}; {r['bw_run']:.1f}) | "
                     f"{r['compute_tps']:.0f} ({r['peak'] / 1e9:.0f}) | {r['pct_roofline']:.0f}% | {r['agree']:.2f} |")
    lines.append(f"\n{model}, prompt {prompt_len} tokens, {new_tokens} new tokens (greedy); bandwidth over the run "
                 f"{bw[0]:.0f}-{bw[2]:.0f} GB/s (median {bw[1]:.0f}), read as the fused kernel reads; memory ceiling = "
                 f"the fastest bandwidth probed in that dtype and batch's block (before and after every timed run) / (weights "
                 f"except the embedding + KV read per step); compute "
                 f"ceiling = the dtype's (2048)^3 matmul speed in that block / FLOPs per step; roofline = the lower. "
                 f"Prefill's matmuls alone: the model's layer weights times the prompt's rows, nothing else, "
                 f"the weights cold as prefill finds them. "
                 f"Greedy agreement: share of new tokens equal to ours' (bf16 for int8/Q8_0). \"ours\" decoded with: "
                 + ", ".join(f"{d} batch {b}: {name}" for (d, b), name in used.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
