"""One prepared check of the library on one CUDA GPU, in one run of at most `--budget` seconds.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --budget 450 --out $OUT/gpu.json   # see gpu_run.sh
    python3 benchmarks/gpu.py --smoke          # the same code paths on CPU, tiny sizes, < 60 s

Sections, in order (each in its own try/except: an error is recorded and the next section runs):
  environment  versions, the card, a measured bf16 matmul peak (8192^3) and HBM bandwidth (a copy
               of 2 GiB: bytes read + written / time; also a read-only sum), used by the sections below
  decode       batch-1 greedy decoding of the 1B preset in bf16: eager, the compiled decoder (on CUDA
               with its own CUDA graph of the step and its one-row products on llama.gpu_kernels'
               Triton kernel; then on cuBLAS, gemv=False; then with the "math" attention compiled
               by inductor instead of sdpa's kernel), transformers' generate with its static
               cache (compiled by transformers on CUDA), int8 compiled; then the 7B preset, ours on
               both and transformers (`--decode-big-only`: the 7B rows alone; `--decode-small-only`:
               the 1B rows alone); tokens/s and % of the bandwidth ceiling (bandwidth / bytes read per
               token); each one-row product of a step alone, cuBLAS against the kernel, in GB/s
  attention    llama.model.attention's backends (sdpa, xformers) against its naive "math" backend:
               forward and backward, bf16 and fp16, MHA and GQA, prefill, a chunk at start_pos > 0
               over a KV cache, and one decoding token; max abs and relative differences (and, where
               xformers declines, its dispatcher's reasons)
  numerics     our logits against transformers' LlamaForCausalLM on the same weights, fp32 and bf16
  training     the trainer's one-process loss (linear_cross_entropy) against the unfused one: loss,
               gradients and time; FSDP2 over a 1-rank process group (nccl, else gloo: both checked
               against the unsharded model first), then the 1B preset and four layers of the 7B preset's shapes in bf16
               with torch.compile'd blocks, selective activation checkpointing and fused AdamW:
               tokens/s and MFU = flops_per_token * tokens/s / the measured matmul peak

A global time budget skips what would not fit; a section that overruns its share, or a compile-
heavy step its cap, is interrupted (SIGALRM) and recorded as such. Results are written to `--out`
after every step, and a markdown table is printed after each section and at the end (also
written next to the JSON). `--sections decode,numerics` reruns a subset. Nothing here imports fire,
nor gguf (the GPU image has neither; llama imports gguf at its first GGUF operation only), and
xformers only where it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from llama.gpu_kernels import available as gemv_available
from llama.formats.hf import hf_config, to_hf
from llama.inference import CompiledDecoder, Llama
from llama.model import ModelArgs, Transformer, attention, causal_mask
from llama.parallel import apply_ac, apply_fsdp, compile_blocks
from llama.quantize import quantize_int8, weight_bytes
from llama.train import flops_per_token
from llama.train.recipe import compiled_cross_entropy, cross_entropy, linear_cross_entropy

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity), to compare MFU with published
# figures (torchtitan's 33-39% for Llama 3 8B are against these); MFU here is against the measured peak.
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}
# and HBM bandwidth (bytes/s), to compare decoding with published percentages (gpt-fast's ~82%)
DATASHEET_HBM = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12}
# Relative tolerance (max |a - b| / max |b|) for attention backends to count as equal: ~10 units
# in the last place of bf16 (2^-8) and ~20 of fp16 (2^-11).
ATTN_TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclass
class Sizes:
    """Every size the check uses: `FULL` on a GPU, `SMOKE` on a CPU."""

    matmul_n: int = 8192
    copy_bytes: int = 2 * 2**30
    timing_repeats: int = 20
    attn_batch: int = 2
    attn_heads: tuple = (16, 4)  # query heads; key/value heads of the GQA layout
    attn_head_dim: int = 128
    attn_cases: tuple = (("prefill", 256, 0), ("cache", 64, 192), ("decode", 1, 255))  # (name, T, start_pos)
    attn_dtypes: tuple = (torch.bfloat16, torch.float16)
    fsdp_check_args: dict = field(default_factory=lambda: dict(dim=256, n_layers=2, n_heads=4, vocab_size=1024))
    fsdp_check_shape: tuple = (2, 128)  # (batch, seq)
    train_rows: tuple = (("1B", "1B", {}), ("7B layers", "7B", {"n_layers": 4}))  # (row, preset, overrides)
    train_batch: int = 8
    train_seq: int = 2048
    train_compile: bool = True
    train_warmup: int = 2
    train_steps: int = 6
    decode_model: tuple = ("1B", {})
    decode_big_model: tuple = ("7B", {})
    decode_dtype: torch.dtype = torch.bfloat16
    decode_small: bool = True  # the 1B rows (and int8); False: the 7B rows only (--decode-big-only)
    decode_big: bool = True  # the 7B rows; False: the 1B rows only (--decode-small-only)
    prompt_len: int = 128
    new_tokens: int = 256
    agree_tokens: int = 32
    decode_compile: dict = field(default_factory=dict)  # torch.compile options of every compiled decode row
    numerics_model: tuple = ("1B", {"n_layers": 4})
    numerics_shape: tuple = (2, 128)
    loss_shape: tuple = (8192, 2048, 32000)  # (tokens, dim, vocab) of the training-loss check: 1B, 4 x 2048
    # section -> (seconds it may take at most, seconds it needs at least to start)
    shares: dict = field(default_factory=lambda: {"environment": (40, 10), "attention": (50, 10),
                                                  "training": (180, 60), "decode": (420, 40),
                                                  "numerics": (45, 15)})
    # sub-step -> (seconds it needs at least to start, seconds after which it is interrupted); the
    # compiles dominate, and a cap keeps one slow compile from taking the rows after it
    needs: dict = field(default_factory=lambda: {"train_row": (60, 120), "decode_eager": (15, 40),
                                                 "decode_compiled": (45, 100), "decode_transformers": (50, 100)})


FULL = Sizes()
SMOKE = Sizes(
    matmul_n=256, copy_bytes=32 * 2**20, timing_repeats=3,
    attn_batch=1, attn_heads=(4, 2), attn_head_dim=16, attn_cases=(("prefill", 16, 0), ("cache", 8, 12), ("decode", 1, 15)),
    fsdp_check_args=dict(dim=64, n_layers=2, n_heads=4, vocab_size=512), fsdp_check_shape=(2, 32),
    train_rows=(("tiny", "tiny", {}), ("tiny, 7B-like row", "tiny", {"dim": 96, "n_heads": 6})),
    train_batch=2, train_seq=32, train_compile=False, train_warmup=1, train_steps=2,
    decode_model=("tiny", {}), decode_big_model=("tiny", {"n_layers": 1}), decode_dtype=torch.float32, prompt_len=8, new_tokens=24, agree_tokens=16,
    # dynamo + AOT autograd (graph capture, functionalized cache writes) without inductor's C++ build,
    # which costs ~10-20 s per graph here and is not what a GPU runs (tests/test_generation.py covers it)
    decode_compile={"backend": "aot_eager"},
    numerics_model=("tiny", {}), numerics_shape=(2, 16), loss_shape=(64, 32, 97),
    # ~5x what each takes on an idle 2-core CPU: a safety net only, so a loaded machine does not fail the test
    shares={"environment": (60, 1), "attention": (60, 1), "training": (120, 1), "decode": (240, 1), "numerics": (60, 1)},
    needs={k: (1, 120) for k in ("train_row", "decode_eager", "decode_compiled", "decode_transformers")},
)


# ---------------------------------------------------------------------------------------------
# bookkeeping: budget, deadlines, the report


class SectionTimeout(Exception):
    """A section ran past its share: it ends there (raised by SIGALRM, passed through `recorded`)."""


class StepTimeout(Exception):
    """A sub-step ran past its cap: recorded as its error, and the section goes on."""


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.total = time.perf_counter(), seconds
        self.section_end = float("inf")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left for the current section: its own share or the whole budget, whichever ends first."""
        return min(self.total - self.elapsed(), self.section_end - time.perf_counter())

    @contextlib.contextmanager
    def deadline(self, seconds: float):
        """Interrupt the block with SectionTimeout after `seconds` (SIGALRM: main thread, POSIX)."""
        def _raise(signum, frame):
            raise SectionTimeout(f"interrupted after its share of {seconds:.0f} s")

        self.section_end = time.perf_counter() + seconds
        old = signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            self.section_end = float("inf")

    @contextlib.contextmanager
    def step_deadline(self, cap: float):
        """Inside a section's deadline: interrupt the block with StepTimeout after `cap` seconds,
        unless the section ends first; then re-arm the section's own timer."""
        if cap >= self.section_end - time.perf_counter():
            yield
            return

        def _raise(signum, frame):
            raise StepTimeout(f"interrupted after its cap of {cap:.0f} s")

        old = signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if math.isfinite(self.section_end):
                signal.setitimer(signal.ITIMER_REAL, max(self.section_end - time.perf_counter(), 0.01))


class Report:
    """The results as one JSON object, rewritten (atomically) after every step."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def save(self, markdown: bool = False) -> None:
        """Rewrite the JSON (and with `markdown` the .md beside it) by write-then-rename, so an
        interrupted write leaves the previous complete file."""
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        files = {self.path: json.dumps(_jsonable(self.data), indent=2)}
        if markdown:
            files[self.path.with_suffix(".md")] = self.markdown()
        for path, text in files.items():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)

    def markdown(self, names: list[str] | None = None) -> str:
        """The sections (all, or `names`) as markdown tables; tracebacks stay in the JSON only."""
        lines = [f"## GPU check: {self.data['meta'].get('device', '?')}"]
        for name, sec in self.data["sections"].items():
            if names is not None and name not in names:
                continue
            lines += ["", f"### {name}: {sec.get('status', 'running')}"
                      + (f" ({sec['seconds']:.0f} s)" if "seconds" in sec else "")]
            scalars = {k: v for k, v in sec.items() if k not in ("status", "seconds", "traceback")
                       and not (isinstance(v, list) and v and isinstance(v[0], dict))}
            if scalars:
                lines += ["| figure | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(scalars).items() if not k.endswith("traceback")]
            for k, v in sec.items():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    cols = [c for c in dict.fromkeys(c for row in v for c in row) if c != "traceback"]
                    lines += ["", f"{k}:", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |" for row in v]
        return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "/").replace("\n", " ")


def _error(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


@contextlib.contextmanager
def recorded(out: dict, key: str | None = None):
    """Run a sub-step; an exception is recorded in out[key] (or out["error"]) and swallowed. A
    section timeout is re-raised: the section is over."""
    try:
        yield
    except SectionTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - the point of the check is to record and go on
        target = out.setdefault(key, {}) if key else out
        target["error"] = _error(e)
        target["traceback"] = traceback.format_exc(limit=6)[-3000:]


class Ctx:
    """What the sections share: sizes, device, the budget, the report and the measured peaks."""

    def __init__(self, sizes: Sizes, device: torch.device, budget: Budget, report: Report):
        self.sizes, self.device, self.budget, self.report = sizes, device, budget, report
        self.cuda = device.type == "cuda"
        self.peak_flops: float | None = None  # bf16 matmul, measured in `environment`
        self.bandwidth: float | None = None  # bytes/s, measured in `environment`

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def skip_reason(self, step: str) -> str | None:
        """Why sub-step `step` cannot start (too little of the section's time left), or None."""
        need, left = self.sizes.needs[step][0], self.budget.left()
        return None if left >= need else f"skipped: budget ({left:.0f} s left, needs ~{need} s)"

    def capped(self, step: str):
        """A deadline for one run of sub-step `step` (its cap from `Sizes.needs`)."""
        return self.budget.step_deadline(self.sizes.needs[step][1])


def free_memory(ctx: Ctx):
    torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def best_seconds(fn, ctx: Ctx, repeats: int, inner: int = 1) -> float:
    """Fastest of `repeats` timings of `inner` calls of fn, per call (after one warm-up call)."""
    fn()
    ctx.sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ctx.sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def build_model(name: str, overrides: dict, device, dtype=torch.float32, seed: int = 0, **more) -> Transformer:
    """A fresh preset model (init_weights under `seed`) built directly on `device`."""
    args = ModelArgs.from_name(name, **overrides, **more)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. environment


def section_environment(ctx: Ctx, out: dict):
    s = ctx.sizes
    out["python"] = platform.python_version()
    out["torch"] = torch.__version__
    out["cuda_runtime"] = torch.version.cuda
    for pkg in ("transformers", "triton", "xformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["c_compiler"] = shutil.which("cc") or shutil.which("gcc") or "none (inductor/triton need one)"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        out["device"] = p.name
        out["memory_gib"] = p.total_memory / 2**30
        out["sms"] = p.multi_processor_count
        out["capability"] = f"{p.major}.{p.minor}"
        out["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        with recorded(out, "nvidia_smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,"
                                "driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    else:
        cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
               if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        out["device"] = f"cpu: {cpu[0] if cpu else platform.processor()} x {os.cpu_count()}"
    ctx.report.data["meta"]["device"] = out["device"]
    ctx.report.save()

    with recorded(out, "matmul"):
        ctx.peak_flops = matmul_flops(ctx, s.matmul_n, s.timing_repeats)
        out["bf16_matmul_tflops"] = ctx.peak_flops / 1e12
        out["matmul"] = f"{s.matmul_n}^3 bf16, best of {s.timing_repeats} x 5"
    name = out.get("device", "")
    key = next((k for k in DATASHEET_BF16 if k in name), None)  # the most specific name first
    if key:
        out["datasheet"] = key
        out["datasheet_bf16_tflops"] = DATASHEET_BF16[key] / 1e12
        out["datasheet_hbm_gbs"] = DATASHEET_HBM[key] / 1e9
    with recorded(out, "copy"):
        ctx.bandwidth = copy_bandwidth(ctx, s.copy_bytes, s.timing_repeats)
        out["copy_bandwidth_gbs"] = ctx.bandwidth / 1e9
        out["copy"] = f"{s.copy_bytes / 2**30:.2f} GiB device-to-device, (read + written) / time, best of {s.timing_repeats}"
    with recorded(out, "read"):  # what a decoding step does: read only (percentages stay against the copy)
        out["read_bandwidth_gbs"] = read_bandwidth(ctx, s.copy_bytes, s.timing_repeats) / 1e9


def matmul_flops(ctx: Ctx, n: int, repeats: int) -> float:
    """FLOP/s of an (n, n) @ (n, n) bf16 matmul: the best of `repeats` timings of 5 products."""
    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=c), ctx, repeats, inner=5)


def copy_bandwidth(ctx: Ctx, nbytes: int, repeats: int) -> float:
    """Bytes/s of copying `nbytes` to another buffer on the device: each byte read once and written once."""
    src = torch.ones(nbytes // 4, device=ctx.device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), ctx, repeats)


def read_bandwidth(ctx: Ctx, nbytes: int, repeats: int) -> float:
    """Bytes/s of summing `nbytes` of bf16 on the device: each byte read once, nothing written but the sum."""
    src = torch.randn(nbytes // 2, device=ctx.device, dtype=torch.bfloat16)
    total = torch.empty((), device=ctx.device, dtype=torch.float32)
    return nbytes / best_seconds(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=total), ctx, repeats)


# ---------------------------------------------------------------------------------------------
# 2. attention backends


def compare_attention(backend: str, dtype: torch.dtype, n_heads: int, n_kv_heads: int, seqlen: int, start_pos: int,
                      batch: int, head_dim: int, device, attn=attention) -> dict:
    """Output and q/k/v gradients of `attn(..., backend)` against `attn(..., "math")` on the same
    inputs: max abs differences and the largest of them relative to the reference's max |value|."""
    g = torch.Generator().manual_seed(0)
    total = start_pos + seqlen
    q0 = torch.randn(batch, seqlen, n_heads, head_dim, generator=g)  # (B, T, H, D)
    k0 = torch.randn(batch, total, n_kv_heads, head_dim, generator=g)  # (B, S, Hkv, D)
    v0 = torch.randn(batch, total, n_kv_heads, head_dim, generator=g)
    dout = torch.randn(batch, seqlen, n_heads, head_dim, generator=g).to(device, dtype)

    def run(name):
        q, k, v = (t.to(device, dtype).requires_grad_() for t in (q0, k0, v0))
        out = attn(q, k, v, start_pos, name)
        out.backward(dout)
        return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]

    got, ref = run(backend), run("math")
    row = {}
    rel = 0.0
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        diff = (a - b).abs().max().item()
        row[label] = diff
        rel = max(rel, diff / max(b.abs().max().item(), 1e-30))
    row["max_rel"] = rel
    row["ok"] = bool(rel <= ATTN_TOL[dtype])
    return row


def section_attention(ctx: Ctx, out: dict):
    s = ctx.sizes
    h, hkv = s.attn_heads
    layouts = {"MHA": (h, h), "GQA": (h, hkv)}
    have_xformers = importlib.util.find_spec("xformers") is not None
    out["xformers"] = "installed" if have_xformers else "xformers not installed"
    if have_xformers:
        with recorded(out, "xformers_cpp"):
            import xformers  # noqa: F401 - its wheels are built for one torch/CUDA: say whether its kernels loaded
            out["xformers_cpp"] = ("loaded" if getattr(xformers, "_has_cpp_library", False) else
                                   "its C++/CUDA extension did not load (built for another torch or CUDA?)")
    out["reference"] = "backend 'math' (naive fp32 softmax) on the same inputs; tolerance on max_rel: " + \
        ", ".join(f"{str(d).removeprefix('torch.')} {t:g}" for d, t in ATTN_TOL.items() if d in s.attn_dtypes)
    rows = out.setdefault("comparisons", [])
    for backend in ("sdpa", "xformers"):
        if backend == "xformers" and not (ctx.cuda and have_xformers):
            out["xformers_status"] = "skipped: no CUDA" if not ctx.cuda else "skipped: xformers not installed"
            continue
        for dtype in s.attn_dtypes:
            for layout, (nh, nkv) in layouts.items():
                for case, seqlen, start_pos in s.attn_cases:
                    row = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "layout": layout,
                           "case": f"{case} (T={seqlen}, start_pos={start_pos})"}
                    with recorded(row):
                        try:
                            row.update(compare_attention(backend, dtype, nh, nkv, seqlen, start_pos, s.attn_batch,
                                                         s.attn_head_dim, ctx.device))
                        except NotImplementedError as e:  # xformers' dispatcher: why each of its kernels declined
                            row["reasons"] = " ".join(str(e).split())[:1500]
                            raise
                    rows.append(row)
            ctx.report.save()
    done = [r for r in rows if "ok" in r]
    out["all_equal"] = bool(done) and all(r["ok"] for r in done)  # of the comparisons that ran
    out["compared"] = len(done)
    out["failed"] = len(rows) - len(done)  # could not run (e.g. xformers without its CUDA kernels)


# ---------------------------------------------------------------------------------------------
# 3. training


@contextlib.contextmanager
def one_rank_group(backend: str, device: torch.device):
    """A process group of world size 1 in this process (no torchrun, no port: an in-memory store)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class AdamW:
    """torch.optim.AdamW with the fused kernel (the recipe's choice on one CUDA device). Should that
    kernel refuse these (DTensor) parameters, at construction or at the first step, the foreach
    kernel takes over and `kind` says why."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0
        try:
            self.opt, self.kind = self._make(fused=True), "fused"
        except (RuntimeError, ValueError) as e:
            self.opt, self.kind = self._make(foreach=True), f"foreach (fused refused: {_error(e)})"

    def _make(self, **impl):
        return torch.optim.AdamW(self.params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **impl)

    def step(self):
        try:
            self.opt.step()
        except (RuntimeError, NotImplementedError, TypeError) as e:
            if self.steps or self.kind != "fused":
                raise
            self.opt, self.kind = self._make(foreach=True), f"foreach (fused failed: {_error(e)})"
            self.opt.step()
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True):
        self.opt.zero_grad(set_to_none=set_to_none)


def train_step(model, opt, inputs, targets, loss_fn) -> float:
    """What llama.train.Trainer.train_step does under a mesh: forward (FSDP casts to bf16), fp32
    loss, backward, clip the global norm to 1.0, AdamW step, zero_grad."""
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def fsdp_equality(ctx: Ctx, backend: str) -> dict:
    """Three fp32 AdamW steps of a small model, unsharded and under FSDP2 on a 1-rank `backend`
    group, from the same weights on the same batch: the losses must agree."""
    s = ctx.sizes
    row = {"backend": backend}
    b, t = s.fsdp_check_shape
    args = dict(s.fsdp_check_args, max_seq_len=t)
    tokens = torch.randint(0, args["vocab_size"], (b, t + 1), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = {}
    for sharded in (False, True):
        model = build_model("tiny", args, ctx.device)
        if sharded:
            with one_rank_group(backend, ctx.device):
                apply_fsdp(model, init_device_mesh(ctx.device.type, (1,)))
                opt = AdamW(model)
                losses["fsdp"] = [train_step(model, opt, inputs, targets, cross_entropy) for _ in range(3)]
        else:
            opt = AdamW(model)
            losses["plain"] = [train_step(model, opt, inputs, targets, cross_entropy) for _ in range(3)]
        row["adamw_fsdp" if sharded else "adamw_plain"] = opt.kind
        del model, opt
    row["losses_plain"], row["losses_fsdp"] = losses["plain"], losses["fsdp"]
    row["max_diff"] = max(abs(x - y) for x, y in zip(losses["plain"], losses["fsdp"]))
    row["ok"] = bool(row["max_diff"] < 1e-4)
    return row


def train_row(ctx: Ctx, row: dict, preset: str, overrides: dict, backend: str | None, compile: bool):
    """Tokens/s and MFU of one model under compile + selective AC + FSDP2 (1 rank) + fused AdamW."""
    s = ctx.sizes
    free_memory(ctx)
    model = build_model(preset, overrides, ctx.device, max_seq_len=s.train_seq)
    args = model.args
    row.update(params=model.num_params(), batch=f"{s.train_batch} x {s.train_seq}", compile=compile,
               ac="selective", fsdp=backend or "none (no 1-rank process group worked)")
    apply_ac(model, "selective")
    if compile:
        compile_blocks(model)
    group = one_rank_group(backend, ctx.device) if backend else contextlib.nullcontext()
    with group:
        if backend:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            apply_fsdp(model, init_device_mesh(ctx.device.type, (1,)), mp)
            amp = contextlib.nullcontext()
        else:  # no FSDP: bf16 autocast over fp32 weights, as the trainer does on one process
            amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
        opt = AdamW(model)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, args.vocab_size, (s.train_batch, s.train_seq + 1), generator=g).to(ctx.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss_fn = compiled_cross_entropy if compile else cross_entropy
        losses, times = [], []
        for i in range(s.train_warmup + s.train_steps):
            ctx.sync()
            t0 = time.perf_counter()
            with amp:
                losses.append(train_step(model, opt, inputs, targets, loss_fn))
            ctx.sync()
            times.append(time.perf_counter() - t0)
            if i < s.train_warmup:
                row[f"warmup_step_{i}_s"] = times[-1]  # the first includes compilation
                ctx.report.save()
    timed = times[s.train_warmup:]
    tokens_per_step = s.train_batch * s.train_seq
    row["step_s_median"] = statistics.median(timed)
    row["tokens_per_s"] = tokens_per_step / row["step_s_median"]
    row["flops_per_token"] = flops_per_token(args, s.train_seq)
    if ctx.peak_flops:
        row["mfu_measured_peak"] = row["flops_per_token"] * row["tokens_per_s"] / ctx.peak_flops
    datasheet = ctx.report.section("environment").get("datasheet_bf16_tflops")
    if datasheet:
        row["mfu_datasheet_peak"] = row["flops_per_token"] * row["tokens_per_s"] / (datasheet * 1e12)
    row["adamw"] = opt.kind
    row["first_loss"], row["last_loss"] = losses[0], losses[-1]
    row["ln_vocab"] = math.log(args.vocab_size)  # a fresh model's loss: ~uniform over the vocabulary
    if ctx.cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    del model, opt


def loss_check(ctx: Ctx) -> dict:
    """The trainer's loss in one process (linear_cross_entropy: the logits' gradient written over them in
    the forward; on CUDA its two torch passes compiled, on CPU the C++ pass) against compiled
    cross_entropy of F.linear, both under bf16 autocast with the same weights: the loss, the
    gradients (relative to the unfused ones) and the time of forward + backward."""
    rows, dim, vocab = ctx.sizes.loss_shape
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(1, rows, dim, generator=g).to(ctx.device)
    w = (torch.randn(vocab, dim, generator=g) * 0.02).to(ctx.device).requires_grad_()
    targets = torch.randint(0, vocab, (1, rows), generator=g)
    targets[0, :3] = -100  # positions without a target
    targets = targets.to(ctx.device)

    def step(fused: bool):
        h = h0.clone().requires_grad_()
        w.grad = None
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            if fused:  # compiled on CUDA as the trainer compiles; --smoke on CPU leaves inductor out
                loss = linear_cross_entropy(h, w, targets, "sum", compile=ctx.cuda)
            else:
                unfused = compiled_cross_entropy if ctx.cuda else cross_entropy
                loss = unfused(torch.nn.functional.linear(h, w), targets, "sum")
        (loss / rows).backward()
        return loss.detach(), h.grad, w.grad

    (la, ha, wa), (lb, hb, wb) = step(True), step(False)
    row = {"tokens x dim x vocab": f"{rows} x {dim} x {vocab}",
           "loss_rel_diff": (abs(la - lb) / abs(lb)).item(),
           "grad_h_rel_diff": ((ha - hb).norm() / hb.norm()).item(),
           "grad_w_rel_diff": ((wa - wb).norm() / wb.norm()).item()}
    # the same bf16 logits: the loss to fp32 rounding; the gradients to bf16's (~0.3% seen on CPU)
    row["ok"] = bool(row["loss_rel_diff"] < 1e-4 and max(row["grad_h_rel_diff"], row["grad_w_rel_diff"]) < 2e-2)
    row["fused_ms"] = 1e3 * best_seconds(lambda: step(True), ctx, ctx.sizes.timing_repeats)
    row["unfused_ms"] = 1e3 * best_seconds(lambda: step(False), ctx, ctx.sizes.timing_repeats)
    return row


def section_training(ctx: Ctx, out: dict):
    s = ctx.sizes
    loss = out.setdefault("loss", [{}])[0]
    with recorded(loss):
        loss.update(loss_check(ctx))
    ctx.report.save()
    out["loop"] = ("hand loop = Trainer.train_step under a mesh (FSDP2 bf16 params / fp32 reduce, fp32 loss, "
                   "clip 1.0, AdamW); llama.train.Trainer applies FSDP only when world > 1")
    checks = out.setdefault("fsdp_one_rank", [])
    for backend in (("nccl", "gloo") if ctx.cuda else ("gloo",)):
        row = {"backend": backend}
        with recorded(row):
            row.update(fsdp_equality(ctx, backend))
        checks.append(row)
        ctx.report.save()
    working = [r["backend"] for r in checks if r.get("ok")]
    backend = working[0] if working else None
    out["process_group"] = backend or "none"
    rows = out.setdefault("rows", [])
    for label, preset, overrides in s.train_rows:
        row = {"model": label}
        rows.append(row)
        if ctx.skip_reason("train_row"):
            row["status"] = ctx.skip_reason("train_row")
            continue
        with recorded(row), ctx.capped("train_row"):
            train_row(ctx, row, preset, overrides, backend, s.train_compile)
        if "error" in row and s.train_compile and not ctx.skip_reason("train_row"):
            # compilation is the likeliest to fail on a new image (no C compiler, a triton mismatch):
            # an eager row still gives a figure
            retry = {"model": label + " (eager retry)"}
            rows.append(retry)
            with recorded(retry), ctx.capped("train_row"):
                train_row(ctx, retry, preset, overrides, backend, False)
        ctx.report.save()
    free_memory(ctx)


# ---------------------------------------------------------------------------------------------
# 4. decode


class _NoEos:
    """Token-level decoding needs no text: eos never occurs, so every run makes max_gen_len tokens."""

    eos_id = -100


def our_decoder(model: Transformer, max_seq_len: int, decoder: str, **compile_options) -> Llama:
    """Our batch-1 generator around `model`, decoding "eager" or "compiled" (the model's own forward
    under torch.compile with tensor positions; `compile_options` e.g. mode="reduce-overhead")."""
    if decoder not in ("eager", "compiled"):
        raise ValueError(f"unknown decoder {decoder!r}; choose eager or compiled")
    llama = Llama(model, _NoEos(), max_seq_len, 1, decoder="eager")
    if decoder == "compiled":
        if compile_options.get("mode") == "reduce-overhead":
            # CUDA graphs copy every input that is not at a fixed address into their own buffers on
            # each replay; the cache is written in place and int8 weights are buffers, not parameters
            cache = llama.kv_cache()
            for t in (cache.k, cache.v, *model.buffers()):
                torch._dynamo.mark_static_address(t)
        llama.decoder = CompiledDecoder(model, **compile_options)
    return llama


def decode_rate(ctx: Ctx, generate, n: int, repeats: int = 3) -> tuple[float, list[int], float]:
    """(decode tokens/s, the tokens of an n-token run, seconds of the warm-up calls). Decoding time
    is the fastest n-token run minus the fastest 1-token run (prefill and the first sample), runs
    alternating, so that load elsewhere hits both alike."""
    t0 = time.perf_counter()
    generate(2)  # warm-up: compilation, CUDA graphs, allocator
    generate(1)
    warm = time.perf_counter() - t0
    best = {1: float("inf"), n: float("inf")}
    tokens = None
    for _ in range(repeats):
        for k in (1, n):
            ctx.sync()
            t0 = time.perf_counter()
            got = generate(k)
            ctx.sync()
            best[k] = min(best[k], time.perf_counter() - t0)
            tokens = got if k == n else tokens
    if best[n] <= best[1]:
        raise RuntimeError(f"{n} tokens took no longer than 1 ({best[n]:.4f} s vs {best[1]:.4f} s): too few "
                           f"tokens to time")
    return (n - 1) / (best[n] - best[1]), tokens, warm


def step_kernels(ctx: Ctx, generate, n: int = 65, top: int = 12) -> list[dict]:
    """Where a decoding step's time goes: the profiler's device time per kernel name (CPU: per op)
    of an n-token run minus a 1-token run (the prefill and first sample), per step; the `top`
    largest, then the rest as one row."""
    from torch.profiler import ProfilerActivity, profile

    def totals(k: int) -> dict[str, tuple[float, int]]:
        with profile(activities=[ProfilerActivity.CUDA if ctx.cuda else ProfilerActivity.CPU]) as prof:
            generate(k)
            ctx.sync()
        return {e.key: (e.self_device_time_total if ctx.cuda else e.self_cpu_time_total, e.count)
                for e in prof.key_averages()}

    generate(n)  # anything first-call out of the way
    long, short = totals(n), totals(1)
    steps = n - 1
    per = sorted(((name, (us - short.get(name, (0, 0))[0]) / steps, (c - short.get(name, (0, 0))[1]) / steps)
                  for name, (us, c) in long.items()), key=lambda r: -r[1])
    per = [r for r in per if r[1] > 0]
    rows = [{"kernel": name[:90], "us_per_step": us, "calls_per_step": calls} for name, us, calls in per[:top]]
    rest = per[top:]
    rows.append({"kernel": f"the other {len(rest)}", "us_per_step": sum(r[1] for r in rest),
                 "calls_per_step": sum(r[2] for r in rest)})
    rows.append({"kernel": "all", "us_per_step": sum(r[1] for r in per), "calls_per_step": sum(r[2] for r in per)})
    return rows


def section_decode(ctx: Ctx, out: dict):
    s = ctx.sizes
    name, overrides = s.decode_model
    max_len = s.prompt_len + s.new_tokens
    free_memory(ctx)
    args = ModelArgs.from_name(name, **overrides, max_seq_len=max_len)
    prompt = torch.randint(3, args.vocab_size, (1, s.prompt_len), generator=torch.Generator().manual_seed(0))
    # bytes read per decoded token: the weights (bytes_read_per_token) and the keys/values of the
    # positions attended, on average prompt + new / 2
    kv = 2 * args.n_layers * (s.prompt_len + s.new_tokens / 2) * args.n_kv_heads * args.head_dim * s.decode_dtype.itemsize
    if s.decode_small:
        model = build_model(name, overrides, ctx.device, s.decode_dtype, max_seq_len=max_len).eval().requires_grad_(False)
        out.update(model=name, params=model.num_params())
    out.update(dtype=str(s.decode_dtype).removeprefix("torch."),
               prompt=s.prompt_len, new_tokens=s.new_tokens, compile_options=s.decode_compile or "defaults",
               ceiling="% = tokens/s x (weight bytes but the embedding table + KV bytes) / copy bandwidth of environment")
    rows = out.setdefault("rows", [])
    state = {"reference": None}  # the eager row's tokens
    datasheet_bw = ctx.report.section("environment").get("datasheet_hbm_gbs")

    def add(label: str, step: str, make_run, bytes_per_token: float, profile: bool = False):
        """One row: make_run() -> generate(n) returning n token ids, timed by decode_rate; with
        `profile`, where its step's time goes (step_kernels) in out["step_kernels"]."""
        row = {"impl": label}
        rows.append(row)
        if ctx.skip_reason(step):
            row["status"] = ctx.skip_reason(step)
            ctx.report.save()
            return
        with recorded(row), ctx.capped(step):
            generate = make_run()
            tps, tokens, warm = decode_rate(ctx, generate, s.new_tokens)
            row.update(tokens_per_s=tps, ms_per_token=1e3 / tps, first_calls_s=warm, mb_per_token=bytes_per_token / 1e6)
            if ctx.bandwidth:
                row["pct_bandwidth_ceiling"] = 100 * tps * bytes_per_token / ctx.bandwidth
            if datasheet_bw:
                row["pct_datasheet_hbm"] = 100 * tps * bytes_per_token / (datasheet_bw * 1e9)
            if state["reference"] is None:
                state["reference"] = tokens
            else:
                k = min(s.agree_tokens, len(tokens))
                row["agree_with_eager"] = sum(a == b for a, b in zip(tokens[:k], state["reference"][:k])) / k
        if profile and "tokens_per_s" in row:
            with recorded(row, "step_kernels"):
                kernels = out.setdefault("step_kernels", [])
                kernels += [{"row": label, **k} for k in step_kernels(ctx, generate, min(65, s.new_tokens))]
        ctx.report.save()

    def ours(m, decoder, attention="sdpa", **options):
        options = {**s.decode_compile, **options} if decoder == "compiled" else options

        def make():
            m.set_attention_backend(attention)  # (every row sets it: a row's choice ends with it)
            torch._dynamo.reset()  # each compiled variant from scratch (no cache entries of another mode)
            llama = our_decoder(m, max_len, decoder, **options)
            ids = prompt[0].tolist()
            return lambda n: llama.generate([ids], n, temperature=0.0)[0][0]
        return make

    graphs = " (+ its CUDA graph)" if ctx.cuda else ""
    kernel = gemv_available() and ctx.cuda  # the compiled decoder's default on CUDA with Triton
    if s.decode_small:  # (not with --decode-big-only)
        dense = bytes_read_per_token(model) + kv
        add("ours, eager", "decode_eager", ours(model, "eager"), dense)
        add("ours, compiled decoder" + graphs + (", one-row products on llama.gpu_kernels.gemv, attention on "
                                                 "its decode_attention" if kernel else ""),
            "decode_compiled", ours(model, "compiled"), dense, profile=True)
        if kernel:
            add("ours, compiled, one-row products on cuBLAS (gemv=False)", "decode_compiled",
                ours(model, "compiled", gemv=False), dense)
            # the step's attention on sdpa over the whole cache under a mask (cuDNN's flash attention
            # took 8.4 us a layer of a 1B step on an H200) instead of llama.gpu_kernels.decode_attention
            add("ours, compiled, on gemv, attention on sdpa (attention_kernel=False)", "decode_compiled",
                ours(model, "compiled", attention_kernel=False), dense, profile=True)
        add("transformers", "decode_transformers", lambda: hf_generator(ctx, model, prompt, max_len, out), dense)
        if kernel:
            with recorded(out, "one_token_attention"):
                out["one_token_attention"] = one_token_attention(ctx, model.args, s.decode_dtype)
            with recorded(out, "one_row_products"):
                out["one_row_products"] = one_row_products(ctx, model.args, s.decode_dtype)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()

        # int8 weight-only (llama.quantize, per-row scales) of the same weights: its greedy tokens need
        # not equal bf16's, so agreement is informative only
        q = quantize_int8(model)  # in place: `model` is int8 from here on
        add("ours, int8, compiled" + graphs + (", on gemv" if kernel else ""), "decode_compiled", ours(q, "compiled"),
            bytes_read_per_token(q) + kv, profile=True)
        del model, q
        free_memory(ctx)

    if not s.decode_big:  # --decode-small-only
        return
    # the 7B preset (dim 4096, hidden 11008): the model size gpt-fast's published ~82% is measured on
    name, overrides = s.decode_big_model
    state["reference"] = None
    big = build_model(name, overrides, ctx.device, s.decode_dtype, max_seq_len=max_len).eval().requires_grad_(False)
    a = big.args
    kv = 2 * a.n_layers * (s.prompt_len + s.new_tokens / 2) * a.n_kv_heads * a.head_dim * s.decode_dtype.itemsize
    big_bytes = bytes_read_per_token(big) + kv
    label = f"{name} {overrides}" if overrides else name
    out["big_model"] = f"{label}: {big.num_params() / 1e9:.2f}B parameters"
    add(f"{label}: ours, compiled decoder" + graphs + (", on gemv" if kernel else ""), "decode_compiled",
        ours(big, "compiled"), big_bytes)
    if kernel:
        add(f"{label}: ours, compiled, on cuBLAS (gemv=False)", "decode_compiled", ours(big, "compiled", gemv=False),
            big_bytes)
    add(f"{label}: transformers", "decode_transformers",
        lambda: hf_generator(ctx, big, prompt, max_len, out), big_bytes)
    if kernel:
        with recorded(out, "one_row_products_big"):
            out["one_row_products_big"] = one_row_products(ctx, a, s.decode_dtype)
        from llama import gpu_kernels  # the tile sizes Triton's autotuner chose, per (N, K, dtypes)
        out["gemv_configs"] = {str(k): str(v) for k, v in gpu_kernels._gemv_kernel.cache.items()}
    del big
    free_memory(ctx)


def one_row_products(ctx: Ctx, args: ModelArgs, dtype: torch.dtype, pool_bytes: int = 2**30) -> list[dict]:
    """Each one-row product of a decoding step (a layer's packed projections and the output head)
    alone: cuBLAS (F.linear) against llama.gpu_kernels.gemv, and gemv on int8 weights with its two
    ways of widening them; GB/s of weights read, as CUDA-graph replays over enough copies of the
    weight (>= `pool_bytes`) that every read comes from HBM, not L2."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"wq|wk|wv": (q + 2 * kv, args.dim), "wo": (args.dim, q), "w1|w3": (2 * args.ffn_hidden_dim, args.dim),
              "w2": (args.dim, args.ffn_hidden_dim), "output": (args.vocab_size, args.dim)}
    from llama import gpu_kernels

    def int8_gemv(bits: bool):
        def fn(x, w):
            gpu_kernels.INT8_BITS = bits
            return torch.ops.llama.gemv(x, *w)
        return fn

    rows = []
    for name, (n, k) in shapes.items():
        row = {"product": name, "shape": f"{n} x {k}", "mb": n * k * dtype.itemsize / 1e6}
        # bf16 on cuBLAS and on gemv; int8 (per-row scales) on gemv, its int8 widened by conversion
        # instructions and by integer ops (gpu_kernels.INT8_BITS)
        for impl, fn, int8 in (("cublas", F.linear, False), ("gemv", torch.ops.llama.gemv, False),
                               ("int8_cvt", int8_gemv(False), True), ("int8_bits", int8_gemv(True), True)):
            nbytes = n * k + n * dtype.itemsize if int8 else n * k * dtype.itemsize
            copies = max(2, math.ceil(pool_bytes / nbytes))
            if int8:
                ws = [(torch.randint(-127, 128, (n, k), device=ctx.device, dtype=torch.int8),
                       (torch.rand(n, device=ctx.device) / k**0.5).to(dtype)) for _ in range(copies)]
            else:
                ws = [torch.randn(n, k, device=ctx.device, dtype=dtype) for _ in range(copies)]
            x = torch.randn(1, k, device=ctx.device, dtype=dtype)
            with recorded(row, impl):
                ref = F.linear(x, ws[0][0].to(dtype)) * ws[0][1] if int8 else F.linear(x, ws[0])
                ref = ref.float()
                gpu_kernels._gemv_kernel.cache.clear()  # each variant autotuned for itself
                got = fn(x, ws[0]).float()  # autotunes the kernel for this shape
                row[f"{impl}_max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for w in ws:
                        fn(x, w)
                seconds = best_seconds(graph.replay, ctx, 10) / copies
                row[f"{impl}_us"] = 1e6 * seconds
                row[f"{impl}_gbs"] = nbytes / seconds / 1e9
                if ctx.bandwidth:
                    row[f"{impl}_pct_copy_bw"] = 100 * nbytes / seconds / ctx.bandwidth
            del ws
            torch.cuda.empty_cache()
        gpu_kernels.INT8_BITS = True
        rows.append(row)
    # a step's products: each layer's four and the output head, at each implementation's speed
    products = list(rows)
    for impl in ("cublas", "gemv", "int8_cvt", "int8_bits"):
        if all(f"{impl}_us" in r for r in products):
            per_layer = sum(r[f"{impl}_us"] for r in products if r["product"] != "output")
            head = next(r[f"{impl}_us"] for r in products if r["product"] == "output")
            rows.append({"product": f"a step's products, {impl}", "shape": f"{args.n_layers} layers + output",
                         f"{impl}_us": args.n_layers * per_layer + head})
    return rows


def one_token_attention(ctx: Ctx, args: ModelArgs, dtype: torch.dtype,
                        caches: tuple = ((384, 255), (4096, 255), (4096, 2047))) -> list[dict]:
    """A decoding step's attention alone, batch 1, every layer's cache read in turn (a step's
    pattern): sdpa over the whole cache under a mask (what the compiled step runs with
    attention_kernel=False; the mask and the views built before, so only sdpa's own kernels are
    timed) against llama.gpu_kernels' decode_attention, which reads positions 0..pos only, with its
    automatic split size and others (`splitN`: N positions a program). For each (cache length,
    position): the difference from the float64 result relative to its largest value, and us per
    layer as CUDA-graph replays. (384 positions of a 1B's 16 layers are 50 MB in bf16, about an
    H100's or H200's L2: replays may find part of them there. 4,096 are 537 MB.)"""
    rows = []
    h, hkv, d, n = args.n_heads, args.n_kv_heads, args.head_dim, args.n_layers
    for length, pos in caches:
        row = {"cache": length, "pos": pos, "kv_mb_read_by_kernel": 2 * n * (pos + 1) * hkv * d * dtype.itemsize / 1e6}
        g = torch.Generator(device=ctx.device).manual_seed(0)
        k = torch.randn(n, 1, length, hkv, d, device=ctx.device, dtype=dtype, generator=g)
        v = torch.randn(n, 1, length, hkv, d, device=ctx.device, dtype=dtype, generator=g)
        q = torch.randn(1, 1, h, d, device=ctx.device, dtype=dtype, generator=g)
        at = torch.tensor([pos], device=ctx.device)
        rep = h // hkv
        kk, vv = (t[0, 0, :pos + 1].double().repeat_interleave(rep, 1) for t in (k, v))
        ref = ((q[0, 0].double()[:, None, :] * kk.transpose(0, 1)).sum(-1) / d ** 0.5).softmax(-1)  # (H, pos+1)
        ref = (ref[:, :, None] * vv.transpose(0, 1)).sum(1)  # (H, D)
        # sdpa's inputs as llama.model.attention makes them, outside the graph: (B, H, T|S, D) views
        mask = causal_mask(1, at, length, ctx.device).to(dtype)
        qt = q.transpose(1, 2)
        kt, vt = ([t[i].repeat_interleave(rep, 2).transpose(1, 2) if rep > 1 else t[i].transpose(1, 2)
                   for i in range(n)] for t in (k, v))
        impls = {"sdpa": lambda i: F.scaled_dot_product_attention(qt, kt[i], vt[i], attn_mask=mask).transpose(1, 2),
                 "kernel": lambda i: torch.ops.llama.decode_attention(q, k[i], v[i], at)}
        # other split sizes than the automatic one, up to the whole cache in one program a head (no combine)
        for split in (32, 64, 128, 256, length):
            impls[f"split{split}"] = lambda i, split=split: torch.ops.llama.decode_attention(q, k[i], v[i], at, split)
        for impl, fn in impls.items():
            with recorded(row, impl):
                got = fn(0)[0, 0].double()
                row[f"{impl}_max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(n):
                        fn(i)
                row[f"{impl}_us_per_layer"] = 1e6 * best_seconds(graph.replay, ctx, 20) / n
        if "sdpa_us_per_layer" in row and "kernel_us_per_layer" in row:
            row["speedup"] = row["sdpa_us_per_layer"] / row["kernel_us_per_layer"]
        rows.append(row)
        del k, v, kt, vt
        torch.cuda.empty_cache()
    return rows


def bytes_read_per_token(model: Transformer) -> int:
    """Weight bytes one batch-1 decoding step reads: all (quantized or not) but the embedding table,
    of which it reads one row."""
    emb = sum(t.numel() * t.element_size() for t in model.tok_embeddings.state_dict().values())
    return weight_bytes(model) - emb


def hf_generator(ctx: Ctx, model: Transformer, prompt: torch.Tensor, max_len: int, out: dict):
    """transformers' LlamaForCausalLM with our weights, generating greedily with its static cache;
    on CUDA transformers compiles the decoding forward itself (mode reduce-overhead). Falls back to
    plain generate (dynamic cache) if the static one fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = model.args
    dtype = next(model.parameters()).dtype
    config = LlamaConfig(**{k: v for k, v in hf_config(args, dtype).items() if k != "architectures"})
    with torch.device(ctx.device):
        hf = LlamaForCausalLM(config)
    hf = hf.to(dtype).eval().requires_grad_(False)
    hf.load_state_dict(to_hf(model.state_dict(), args), strict=True)
    ids = prompt.to(ctx.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n, extra):
        with torch.inference_mode():
            res = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs, **extra)
        return res[0, ids.size(1):].tolist()

    # static with a fixed length (so 1- and n-token runs share one compiled graph); static without
    # max_cache_len (older transformers); the default dynamic cache
    errors = []
    for extra in (dict(cache_implementation="static", max_cache_len=max_len), dict(cache_implementation="static"), {}):
        try:
            run(2, extra)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"{extra}: {_error(e)}")
            continue
        compiled = getattr(hf, "_compiled_call", None) is not None
        out["transformers_generate"] = (f"{extra or 'dynamic cache'}, "
                                        f"{'compiled by generate' if compiled else 'not compiled (generate compiles on CUDA only)'}"
                                        + (f"; failed first: {errors}" if errors else ""))
        return lambda n: run(n, extra)
    raise RuntimeError(f"transformers' generate failed every way: {errors}")


# ---------------------------------------------------------------------------------------------
# 5. numerics


def section_numerics(ctx: Ctx, out: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = ctx.sizes
    name, overrides = s.numerics_model
    b, t = s.numerics_shape
    free_memory(ctx)
    base = build_model(name, overrides, ctx.device, torch.float32, max_seq_len=t)
    args = base.args
    tokens = torch.randint(0, args.vocab_size, (b, t), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    out.update(model=f"{name}{' ' + str(overrides) if overrides else ''}", params=base.num_params(),
               tokens=f"batch {b} x {t}, prefill logits", reference="transformers' LlamaForCausalLM, same weights")
    rows = out.setdefault("rows", [])
    for dtype in (torch.float32, torch.bfloat16):
        row = {"dtype": str(dtype).removeprefix("torch.")}
        rows.append(row)
        with recorded(row):
            ours = base.to(dtype) if dtype != torch.float32 else base
            config = LlamaConfig(**{k: v for k, v in hf_config(args, dtype).items() if k != "architectures"})
            with torch.device(ctx.device):
                hf = LlamaForCausalLM(config)
            hf = hf.to(dtype).eval()
            hf.load_state_dict(to_hf(ours.state_dict(), args), strict=True)
            with torch.no_grad():
                a = ours(tokens).float()
                r = hf(input_ids=tokens).logits.float()
            row["max_abs_diff"] = (a - r).abs().max().item()
            row["max_abs_logit"] = r.abs().max().item()
            row["greedy_agree"] = (a.argmax(-1) == r.argmax(-1)).float().mean().item()
            del hf, a, r
        ctx.report.save()
    del base
    free_memory(ctx)


# ---------------------------------------------------------------------------------------------


# decode first after the environment: it is what a short lease is most often for
SECTIONS = {"environment": section_environment, "decode": section_decode, "attention": section_attention,
            "numerics": section_numerics, "training": section_training}


def run(sizes: Sizes, device: torch.device, budget_s: float, out_path: Path, smoke: bool,
        only: list[str] | None = None) -> dict:
    budget = Budget(budget_s)
    report = Report(out_path, {"smoke": smoke, "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "device": str(device), "argv": sys.argv[1:]})
    ctx = Ctx(sizes, device, budget, report)
    for name, fn in SECTIONS.items():
        out = report.section(name)
        if only and name not in only:
            out["status"] = "skipped: not selected"
            continue
        share, need = sizes.shares[name]
        left = budget.total - budget.elapsed()
        if left < need:
            out["status"] = f"skipped: budget ({left:.0f} s left, needs ~{need} s)"
            report.save()
            continue
        print(f"[{budget.elapsed():5.0f} s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            with budget.deadline(min(share, left)):
                fn(ctx, out)
            out["status"] = "ok"
        except SectionTimeout as e:
            out["status"] = f"timeout: {e}"
        except Exception as e:  # noqa: BLE001
            out["status"] = _error(e)
            out["traceback"] = traceback.format_exc(limit=8)[-4000:]
        finally:
            out["seconds"] = time.perf_counter() - t0
            if dist.is_available() and dist.is_initialized():  # a section interrupted inside a group
                dist.destroy_process_group()
            report.save(markdown=True)
            print(report.markdown([name]), flush=True)
    report.data["meta"]["elapsed_s"] = budget.elapsed()
    report.save(markdown=True)
    print("\n" + report.markdown(), flush=True)
    return report.data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    default_out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu.json")
    p.add_argument("--out", type=Path, default=default_out, help=f"JSON results (default {default_out})")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the same code paths in well under a minute")
    p.add_argument("--decode-big-only", action="store_true", help="decode: the 7B rows only (no 1B, no int8)")
    p.add_argument("--decode-small-only", action="store_true", help="decode: the 1B rows and int8 only (no 7B)")
    p.add_argument("--sections", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    a = p.parse_args(argv)
    only = [x for x in a.sections.split(",") if x]
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if a.smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", 0), FULL
    else:
        p.error("no CUDA device: run on a GPU, or pass --smoke for the tiny CPU version")
    if a.decode_big_only and a.decode_small_only:
        p.error("--decode-big-only and --decode-small-only exclude each other")
    sizes = dataclasses.replace(sizes, decode_small=not a.decode_big_only, decode_big=not a.decode_small_only)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    run(sizes, device, a.budget, a.out, a.smoke, only)


if __name__ == "__main__":
    main()
