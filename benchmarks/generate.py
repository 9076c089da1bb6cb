"""Generation speed: our Llama vs transformers' LlamaForCausalLM on the same weights, one process.

For each dtype and batch size: time to first token (prefill of a P-token prompt + first sample),
prefill tokens/s, decode tokens/s (greedy, N new tokens, the first excluded), and batch-1 decode
as a percentage of the memory-bandwidth ceiling: bytes read per decoded token (every weight but the
embedding table, plus the KV cache of the positions attended) x steps/s over the bandwidth measured
right before and right after that timed run (the higher of the two; a sum over a 256 MB tensor).
The bandwidth this shared machine gives moves by 2x from minute to minute, so each run is
compared with its own. Runs alternate between the implementations; the fastest of `repeats` is kept.

    python benchmarks/generate.py                       # 160M preset, bf16 and fp32, batch 1 and 8
    python benchmarks/generate.py --model 60M --dtypes bf16 --batches 1 --compile
    python benchmarks/generate.py --dtypes bf16,fp32 --batches 1 --kernels avx2   # + the AVX2 build
    LLAMA_CPU_KERNEL=avx2 python benchmarks/generate.py   # "ours" itself on the AVX2 build

`--kernels` adds a row per fused-kernel build named (llama/inference/cpu_decode.py VARIANTS, e.g.
avx2 on an AVX-512 machine: what a CPU without AVX-512 would run), each on its own copy of the
weights; LLAMA_CPU_KERNEL forces the build that "ours" (Llama.build) uses.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import fire
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.env import resolve_dtype
from llama.formats.hf import hf_config, to_hf
from llama.inference import Llama
from llama.inference.cpu_decode import FusedCpuDecoder
from llama.model import ModelArgs, Transformer


class _NoEos:
    """Token-level benchmarking needs no text: eos never occurs, so every row runs to max_gen_len."""

    eos_id = -100


_PROBE: list[torch.Tensor] = []


def measure_bandwidth_gbs(repeats: int = 3) -> float:
    """Read bandwidth now: the best of `repeats` sums over a 256 MB fp32 tensor (allocated once)."""
    if not _PROBE:
        _PROBE.append(torch.ones(256 * 2**20 // 4, dtype=torch.float32))  # touched, so the pages are real
    x = _PROBE[0]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def main(model: str = "160M", dtypes=("bf16", "fp32"), batches=(1, 8), prompt_len: int = 128, new_tokens: int = 32,
         repeats: int = 2, compile: bool = False, threads: int | None = None, out: str | None = None,
         kernels=()):
    if threads:
        torch.set_num_threads(threads)

    dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    batches = [batches] if isinstance(batches, int) else list(batches)
    kernels = [kernels] if isinstance(kernels, str) else list(kernels)
    args = ModelArgs.from_name(model, max_seq_len=prompt_len + new_tokens)
    torch.manual_seed(0)
    base = Transformer(args).eval().requires_grad_(False)
    n_params = base.num_params()
    bw = measure_bandwidth_gbs()
    bw_samples = [bw]
    print(f"model {model} ({n_params / 1e6:.0f}M params), prompt {prompt_len}, new {new_tokens}, "
          f"threads {torch.get_num_threads()}, bandwidth {bw:.1f} GB/s now (sum over 256 MB), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows, used = [], {}  # used: (dtype, batch) -> how "ours" decoded
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
        weight_bytes = sum(p.numel() * p.element_size() for k, p in ours.named_parameters() if "tok_embeddings" not in k)
        for bsz in batches:
            llamas = {name: Llama(kind.model if isinstance(kind, FusedCpuDecoder) else ours, _NoEos(), args.max_seq_len,
                                  bsz, decoder=kind) for name, kind in variants.items()}
            used[dt_name, bsz] = _decoder_name(llamas["ours"].decoder)
            print(f"{dt_name} batch {bsz}: ours decodes with {used[dt_name, bsz]}", flush=True)
            prompts = torch.randint(3, args.vocab_size, (bsz, prompt_len))
            ids = prompts.tolist()
            # KV bytes read per step: keys and values of every layer, averaged over the decoded positions
            kv_bytes = 2 * args.n_layers * bsz * (prompt_len + new_tokens / 2) * args.n_kv_heads * args.head_dim * dtype.itemsize

            def ours_runner(name):
                def ours_run(n):
                    """(tokens, [time of each new token]) from one run."""
                    stamps, t0 = [], time.perf_counter()
                    with torch.inference_mode():
                        for batch, _ in llamas[name].steps(ids, n, temperature=0.0):
                            stamps.append(time.perf_counter() - t0)
                    return [r[prompt_len:] for r in batch.tokens.tolist()], stamps
                return ours_run

            class _Clock:  # transformers' streamer interface: put() gets the prompt, then each new token
                def __init__(self):
                    self.t0, self.stamps, self.calls = time.perf_counter(), [], 0

                def put(self, value):
                    self.calls += 1
                    if self.calls > 1:
                        self.stamps.append(time.perf_counter() - self.t0)

                def end(self):
                    pass

            def hf_run(n):
                clock = _Clock()
                with torch.inference_mode():
                    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                                      streamer=clock if bsz == 1 else None)
                if bsz > 1:  # transformers' streamers take batch 1 only: time the whole run instead
                    return out[:, prompt_len:].tolist(), None
                return out[:, prompt_len:].tolist(), clock.stamps

            # sanity: share of greedy tokens both implementations agree on
            a, b = ours_runner("ours")(8)[0], hf_run(8)[0]
            agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (8 * bsz)
            results = {}

            def timed(run):
                """(TTFT, decode seconds for tokens 2..N): per-token stamps where there are, else from
                a 1-token run and an N-token run."""
                _, stamps = run(new_tokens)
                if stamps is not None:
                    return stamps[0], stamps[-1] - stamps[0]
                t0 = time.perf_counter()
                run(1)
                t1 = time.perf_counter()
                run(new_tokens)
                return t1 - t0, (time.perf_counter() - t1) - (t1 - t0)

            for name in [*variants, "transformers"]:
                run = ours_runner(name) if name in variants else hf_run
                run(2)  # warm-up (and compile)
                results[name] = dict(run=run, ttft=float("inf"), dec=float("inf"), bw=float("nan"))
            for _ in range(repeats):  # alternate implementations so background load hits all alike
                for name, r in results.items():
                    before = measure_bandwidth_gbs()
                    ttft, dec = timed(r["run"])
                    after = measure_bandwidth_gbs()
                    bw_samples += [before, after]
                    r["ttft"] = min(r["ttft"], ttft)
                    if 0 < dec < r["dec"]:
                        r["dec"], r["bw"] = dec, max(before, after)
            for name, r in results.items():
                decode_tps = bsz * (new_tokens - 1) / r["dec"]
                ceiling_steps = r["bw"] * 1e9 / (weight_bytes + kv_bytes)
                rows.append(dict(impl=name, dtype=dt_name, batch=bsz, ttft_ms=r["ttft"] * 1e3,
                                 prefill_tps=bsz * prompt_len / r["ttft"], decode_tps=decode_tps, bw=r["bw"],
                                 pct_ceiling=100 * (decode_tps / bsz) / ceiling_steps, agree=agree))
            hf_dec = next(r["decode_tps"] for r in rows[-len(results):] if r["impl"] == "transformers")
            eager_dec = next(r["decode_tps"] for r in rows[-len(results):] if r["impl"] == "ours, eager")
            for r in rows[-len(results):]:
                r["vs_hf"], r["vs_eager"] = r["decode_tps"] / hf_dec, r["decode_tps"] / eager_dec
                _print_row(r)
    bw = (min(bw_samples), statistics.median(bw_samples), max(bw_samples))
    print(f"load average at the end {os.getloadavg()[0]:.1f}; bandwidth over the run: min {bw[0]:.1f}, "
          f"median {bw[1]:.1f}, max {bw[2]:.1f} GB/s")
    table = _table(rows, model, prompt_len, new_tokens, bw, used)
    print("\n" + table)
    if out:
        Path(out).write_text(table + "\n")
    return None


def _decoder_name(decoder) -> str:
    return f"{decoder.name} ({decoder.variant})" if isinstance(decoder, FusedCpuDecoder) else decoder.name


def _print_row(r):
    print(f"{r['impl']:>16} {r['dtype']:>5} b{r['batch']:<2} ttft {r['ttft_ms']:7.1f} ms  prefill {r['prefill_tps']:7.0f} tok/s  "
          f"decode {r['decode_tps']:6.1f} tok/s ({r['vs_hf']:.2f}x transformers, {r['vs_eager']:.2f}x eager, "
          f"{r['pct_ceiling']:.0f}% of ceiling "
          f"at {r['bw']:.0f} GB/s)  "
          f"greedy agreement {r['agree']:.2f}", flush=True)


def _table(rows, model, prompt_len, new_tokens, bw, used) -> str:
    lines = ["| impl | dtype | batch | TTFT (ms) | prefill tok/s | decode tok/s | decode vs transformers | "
             "bandwidth then (GB/s) | % of bandwidth ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']} | {r['ttft_ms']:.0f} | {r['prefill_tps']:.0f} | "
                     f"{r['decode_tps']:.1f} | {r['vs_hf']:.2f}x | {r['bw']:.1f} | {r['pct_ceiling']:.0f}% |")
    lines.append(f"\n{model}, prompt {prompt_len} tokens, {new_tokens} new tokens (greedy); bandwidth over the run "
                 f"{bw[0]:.0f}-{bw[2]:.0f} GB/s (median {bw[1]:.0f}); ceiling = bandwidth around that row's fastest run / "
                 f"(weights except the embedding + KV read per step). \"ours\" decoded with: "
                 + ", ".join(f"{d} batch {b}: {name}" for (d, b), name in used.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
