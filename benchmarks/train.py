"""Training-step speed: ours (the trainer's real step) vs transformers' LlamaForCausalLM, one process.

    python benchmarks/train.py                      # 60M preset, batch 4 x 512, the trainer's dtype
    python benchmarks/train.py --dtype bf16         # bf16 autocast whatever the machine measures
    python benchmarks/train.py --hf_compile=False   # without transformers under torch.compile (faster)
    python benchmarks/train.py --profile=True       # + where each row's step spends its time
    python benchmarks/train.py --attention sdpa     # ours with torch's sdpa instead of its CPU default (blocked)
    python benchmarks/train.py --also_attention sdpa   # + a row of ours with sdpa, in the same run

A step is forward, backward, gradient clipping, AdamW step and zero_grad, for the same weights, batch
and dtype policy (fp32 master weights, compute under torch.autocast in the dtype the trainer picks
on this machine unless --dtype says: `llama.env.compute_dtype`, the faster of bf16 and fp32
products as measured; fp32 loss). Ours is
`llama.train.Trainer.train_step` on synthetic tokens. Rows are timed in turns and each keeps its
best of `repeats` steps (other processes share the cores); the peak of the computing dtype is
the best of square matmuls (1024, 2048 and 4096) timed between the rows (`measure_peak_flops`: for
bf16, the faster of bf16 and fp32 products, since bf16 numbers multiply exactly in fp32, which CPUs
without bf16 instructions do). MFU = (6 N + 12 L d T) * tokens/s / peak.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
import time
from pathlib import Path

import fire
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from llama.env import compute_dtype, dtype_name
from llama.formats.hf import hf_config, to_hf
from llama.train import TrainConfig, Trainer, flops_per_token, measure_peak_flops, param_groups
from llama.train.recipe import adamw_kwargs, compiled_cross_entropy, cross_entropy


class SyntheticLoader:
    """The same (inputs, targets) batch every step, in the shape of `llama.data.PackedLoader`."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
        self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def next(self):
        return self.inputs, self.targets

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (no mmap for large blocks, trimming only
    past 2 GB free), as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 would: every step
    allocates and frees hundreds of MB of activations, and returning them to the system costs ~100-170k page faults a
    step (60M), which moved rows by 10-15% from run to run. Applies to every row. False where the
    C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def build_ours(model: str, batch_size: int, seq_len: int, dtype: str, compile: bool, ac: str, tmp: Path,
               attention: str = "auto") -> Trainer:
    """The trainer as a user runs it (compiled blocks and loss with compile=True, fused AdamW), for
    one process on synthetic data."""
    (tmp / "data").mkdir(parents=True)
    (tmp / "data" / "synthetic").write_text("tokens come from SyntheticLoader\n")
    cfg = TrainConfig(model=model, data=str(tmp / "data"), out_dir=str(tmp / "run"), steps=10 ** 6,
                      warmup_steps=10, seq_len=seq_len, micro_batch_size=batch_size,
                      global_batch_tokens=batch_size * seq_len, dtype=dtype, ac=ac, compile=compile,
                      device="cpu", peak_flops=1.0, eval_every=0, eval_batches=0, progress=False,
                      tensorboard=False, resume="never", attention=attention)
    vocab = cfg.model_args().vocab_size
    return Trainer(cfg, make_loader=lambda c, split, r, n, seed: SyntheticLoader(vocab, batch_size, seq_len))


def build_hf(ours: torch.nn.Module, args, trainer: Trainer, dtype: str, compile: bool, fused_adamw: bool,
             attention: str = "sdpa"):
    """transformers' LlamaForCausalLM with our weights (`attention`: its attn_implementation, sdpa by
    default) and a step with the trainer's recipe: autocast, fp32 loss, clip 1.0, the same AdamW."""
    config = LlamaConfig(**{k: v for k, v in hf_config(args, torch.float32).items() if k != "architectures"},
                         attn_implementation=attention)
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(to_hf(ours.state_dict(), args), strict=True)
    cfg = trainer.cfg
    impl = adamw_kwargs("cpu") if fused_adamw else {}
    opt = torch.optim.AdamW(param_groups(hf, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, **impl)
    forward = torch.compile(hf) if compile else hf
    loss_fn = compiled_cross_entropy if compile else cross_entropy
    loader = trainer.train_loader
    amp = torch.bfloat16 if dtype == "bf16" else torch.float32

    def step():
        inputs, targets = loader.next()
        with torch.autocast("cpu", dtype=amp, enabled=amp != torch.float32):
            logits = forward(input_ids=inputs).logits  # (B, T, vocab)
        loss = loss_fn(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return hf, step


def main(model: str = "60M", batch_size: int = 4, seq_len: int = 512, dtype: str = "auto", compile: bool = True,
         ac: str = "none", fused_adamw: bool = True, hf_compile: bool = True,
         repeats: int = 12, threads: int = 0, json_out: str = "", profile: bool = False, attention: str = "auto",
         also_attention: str = "", keep_memory: bool = True):
    """Time one training step of ours and of transformers; print a table of tokens/s, ratio and MFU.
    fused_adamw: transformers' rows use the fused AdamW kernel as ours does. hf_compile: also
    transformers under torch.compile, the strongest peer. profile: then one profiled step per row,
    its time by kind of work (`step_profile`). attention: ours' backend (auto: the trainer's choice);
    also_attention: comma-separated backends, each one more row of ours. keep_memory: the process
    keeps freed memory (`keep_freed_memory`), for all rows alike. dtype: auto (the trainer's own
    choice on this machine, printed with its measurement), bf16 or fp32."""
    kept = keep_memory and keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    if dtype not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"--dtype {dtype!r}: use auto, bf16 or fp32")
    if dtype == "auto":
        chosen, why = compute_dtype("cpu")
        dtype = dtype_name(chosen)
        print(f"dtype {why} (--dtype overrides)")

    amp = torch.bfloat16 if dtype == "bf16" else torch.float32  # MFU against the peak of the computing dtype
    cpu = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    trainer = build_ours(model, batch_size, seq_len, dtype, compile, ac, tmp, attention)
    args = trainer.args
    tokens = batch_size * seq_len
    flops_tok = flops_per_token(args, seq_len)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    _, hf_step = build_hf(trainer.model, args, trainer, dtype, False, fused_adamw)
    rows = {"ours": lambda: trainer.train_step()["loss"], "transformers": hf_step}
    # fire hands "a,b" over as a tuple
    extras = also_attention if isinstance(also_attention, (list, tuple)) else str(also_attention).split(",")
    for extra in dict.fromkeys(a for a in extras if a):  # each backend once
        other = build_ours(model, batch_size, seq_len, dtype, compile, ac, tmp / extra, extra)
        rows[f"ours ({extra} attention)"] = lambda other=other: other.train_step()["loss"]
    if hf_compile:
        rows["transformers (compiled)"] = build_hf(trainer.model, args, trainer, dtype, True, fused_adamw)[1]

    # warm up (compilation, allocator) and check that both compute the same loss
    first = {}
    for name, step in tqdm(rows.items(), desc="warm-up", leave=False):
        first[name] = step()
        step()
    if max(first.values()) - min(first.values()) > 0.02:  # same weights and batch: same loss
        raise RuntimeError(f"the rows disagree on the first loss {first}: they do not compute the same model")
    best = {name: float("inf") for name in rows}
    peak = 0.0
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        peak = max([peak] + [measure_peak_flops(cpu, amp, n, 0.2) for n in (1024, 2048, 4096)])
        for name, step in rows.items():
            t0 = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - t0)
    peak = max(peak, measure_peak_flops(cpu, amp, 4096))

    base = tokens / best["transformers"]
    result = {"model": model, "params": n_params, "batch": [batch_size, seq_len], "dtype": dtype,
              "compile": compile, "ac": ac, "attention": trainer.attention, "kept_freed_memory": kept,
              "fused_adamw": fused_adamw,
              "peak_tflops": peak / 1e12, "first_loss": first, "rows": {}}
    print(f"\n{model}: {n_params / 1e6:.1f}M parameters, batch {batch_size} x {seq_len} = {tokens} tokens, "
          f"{dtype} autocast over fp32 master weights, {torch.get_num_threads()} threads, freed memory kept: {kept}")
    print(f"ours: compile={compile} (compiled blocks and loss) ac={ac}, attention {trainer.attention}, fused AdamW; "
          f"transformers: fused AdamW={fused_adamw}; "
          f"FLOPs/token {flops_tok / 1e6:.1f}M; peak {peak / 1e9:.0f} GFLOP/s ({dtype} products"
          f"{', or fp32 where faster' if dtype == 'bf16' else ''}: `measure_peak_flops`)")
    print("first losses: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    print("| row | step s | tokens/s | vs transformers | MFU |")
    print("|---|---|---|---|---|")
    for name, t in best.items():
        tps = tokens / t
        mfu = tps * flops_tok / peak
        result["rows"][name] = {"step_s": t, "tokens_per_s": tps, "ratio": tps / base, "mfu": mfu}
        print(f"| {name} | {t:.2f} | {tps:.0f} | {tps / base:.2f}x | {100 * mfu:.1f}% |")
    if profile:
        print("\nwhere a step's time goes (one profiled step per row, self CPU time; ms and share):")
        kinds = list(KINDS) + ["other"]
        print("| row | " + " | ".join(kinds) + " | top operators |")
        print("|---" * (len(kinds) + 2) + "|")
        for name, step in rows.items():
            by_kind, top = step_profile(step)
            result["rows"][name]["profile_ms"] = by_kind
            total = sum(by_kind.values())
            cells = " | ".join(f"{by_kind.get(k, 0):.0f} ({100 * by_kind.get(k, 0) / total:.0f}%)" for k in kinds)
            print(f"| {name} | {cells} | {'; '.join(top)} |")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return None


# kinds of work, by the operator names torch's profiler reports (first match wins)
KINDS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn", "onednn", "_weight_", "baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "attention"),
    "optimizer": ("adam", "_foreach", "clip", "norm_"),
    "compiled kernels": ("cpp_fused", "kernel_cpp", "triton", "compiled", "inductor"),
}


def step_profile(step, top: int = 4) -> tuple[dict, list[str]]:
    """({kind: ms of self CPU time}, the `top` operators) of one call of `step` (after a warm call)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_kind: dict[str, float] = {}
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for e in events:
        name = e.key.lower()
        kind = next((k for k, words in KINDS.items() if any(w in name for w in words)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e3
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return by_kind, [f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in events[:top]]


if __name__ == "__main__":
    fire.Fire(main)
