"""benchmarks/generate.py's arithmetic and its llama.cpp runner: the FLOPs per prefill and per
decoding step against torch's FlopCounterMode, and llama.cpp's greedy tokens on our f32 GGUF
against our own model's; benchmarks/train.py's rows and MFU on the tiny preset."""

import runpy
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llama.inference import Llama
from llama.model import Transformer
from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    """benchmarks/generate.py's functions (the script is no package: run as a module, main not called)."""
    return runpy.run_path(str(ROOT / "benchmarks" / "generate.py"))


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_flop_counts_match_torch_flop_counter(bench):
    """The matmul part equals FlopCounterMode over the model's forward (prefill of T tokens with only
    the last position's logits; one decoding step at position T), which does not count the CPU
    flash-attention kernel; the attention part equals FlopCounterMode over a naive causal attention:
    each position's q.k and p.v over the positions it sees (T + 1 of them for the decoding step)."""
    torch.manual_seed(0)
    args = tiny_args(n_kv_heads=2)
    model = Transformer(args).eval()
    layer = sum(p.numel() for k, p in model.named_parameters() if k.startswith("layers.") and p.dim() == 2)
    output = model.output.weight.numel()
    B, T, D, H = 2, 12, args.head_dim, args.n_heads
    cache = model.new_cache(B, 32, device="cpu", dtype=torch.float32)
    prefill_mm = _counted(lambda: model(torch.randint(0, args.vocab_size, (B, T)), 0, cache, last_only=True))
    decode_mm = _counted(lambda: model(torch.randint(0, args.vocab_size, (B, 1)), T, cache))

    def naive_attention(positions):  # (query position, how many positions it sees) per query
        q, k, v = torch.randn(B, H, 1, D), torch.randn(B, H, T + 1, D), torch.randn(B, H, T + 1, D)
        for _ in range(args.n_layers):
            for seen in positions:
                p = q @ k[:, :, :seen].transpose(-1, -2)  # (B, H, 1, seen)
                p @ v[:, :, :seen]  # (B, H, 1, D)

    prefill_att = _counted(lambda: naive_attention([t + 1 for t in range(T)]))
    decode_att = _counted(lambda: naive_attention([T + 1]))
    assert bench["prefill_flops"](args, layer, output, B, T) == prefill_mm + prefill_att
    assert bench["decode_flops"](args, layer + output, B, T + 1) == decode_mm + decode_att
    assert prefill_att > 0 and decode_att > 0


def test_prefill_matmuls_alone_are_the_forwards_layer_matmuls(bench):
    """measure_prefill_matmuls times the FLOPs of the layers' matmuls in a prefill of `rows` tokens
    (FlopCounterMode over the forward, less the output projection), and the table prints its column."""
    torch.manual_seed(0)
    args = tiny_args(n_kv_heads=2)
    model = Transformer(args).eval()
    B, T = 2, 12
    cache = model.new_cache(B, 32, device="cpu", dtype=torch.float32)
    forward = _counted(lambda: model(torch.randint(0, args.vocab_size, (B, T)), 0, cache, last_only=True))
    layers = forward - 2 * B * model.output.weight.numel()

    class Clock:  # every pass over the weights takes exactly one second
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

    fn = bench["measure_prefill_matmuls"]
    real = fn.__globals__["time"]
    fn.__globals__["time"] = Clock()
    try:
        assert fn(model, B * T, repeats=2) == layers
    finally:
        fn.__globals__["time"] = real
    r = dict(ttft=0.01, dec=0.1, bw=10.0, bw_run=8.0, tokens=[[1] * 4] * B)
    row = bench["_row"]("ours", "fp32", B, r, T, 4, None, mem_bytes=1e6, peak=1e11, step_flops=1e6,
                        prompt_flops=5e8, mm_alone=2e11)
    assert row["prefill_pct"] == pytest.approx(50) and row["prefill_pct_mm"] == pytest.approx(25)
    table = bench["_table"]([row], "tiny", T, 4, (1, 2, 3), {})
    assert "prefill % of its matmuls alone" in table and "| 25% (200) |" in table


def test_llama_cpp_runner_decodes_our_greedy_tokens(bench, tmp_path):
    """The llama.cpp rows time what they should: on the same weights (f32 GGUF written by the
    benchmark, its made-up vocabulary), llama.cpp's greedy tokens equal ours, one stamp per token."""
    pytest.importorskip("llama_cpp")
    torch.manual_seed(0)
    args = tiny_args(max_seq_len=48)
    model = Transformer(args).eval().requires_grad_(False)
    prompt = torch.randint(3, args.vocab_size, (1, 16))
    tokens, stamps = bench["llama_cpp_runner"](bench["write_gguf"](model, args, "f32"), prompt[0].tolist(), args,
                                               kv_dtype="fp32")(10)
    ours, _ = bench["ours_runner"](Llama(model, bench["_NoEos"](), args.max_seq_len, 1), prompt.tolist(), 16)(10)
    assert tokens == ours and len(tokens[0]) == 10
    assert len(stamps) == 10 and stamps == sorted(stamps)


def test_train_benchmark_rows_compute_the_same_step(tmp_path):
    """benchmarks/train.py on the tiny preset, eager: ours (the trainer's CPU default, blocked
    attention) and transformers start from the same loss (the script raises otherwise) and the
    table's MFU is tokens/s x FLOPs per token over the peak it measured, in the dtype the trainer
    itself picks on this machine."""
    import json

    from llama.env import compute_dtype, dtype_name

    train = runpy.run_path(str(ROOT / "benchmarks" / "train.py"))
    out = tmp_path / "train.json"
    train["main"](model="tiny", batch_size=2, seq_len=32, compile=False, hf_compile=False, repeats=1,
                  json_out=str(out), keep_memory=False)  # (it would change this process's malloc for good)
    result = json.loads(out.read_text())
    assert result["attention"] == "blocked" and set(result["rows"]) == {"ours", "transformers"}
    assert result["dtype"] == dtype_name(compute_dtype("cpu")[0])
    losses = result["first_loss"]
    assert abs(losses["ours"] - losses["transformers"]) < 1e-3, losses
    flops = train["flops_per_token"](train["TrainConfig"](model="tiny").model_args(), 32)
    for row in result["rows"].values():
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / (result["peak_tflops"] * 1e12))


def test_attention_benchmark_runs_both_kernels(capsys):
    """benchmarks/attention.py on one tiny shape: a table row with both kernels' times, and where the
    C++ kernel runs (this CPU has AVX512-BF16) two more cells for the torch-op version."""
    from llama import blocked_attention

    main = runpy.run_path(str(ROOT / "benchmarks" / "attention.py"))["main"]
    cells = 11 if blocked_attention._kernel_available() else 9
    for shapes in ("1,2,16,32", (1, 2, 16, 32), ["1,2,16,32"]):  # a string, and what fire makes of --shapes 1,2,16,32
        main(shapes=shapes, dtype="fp32", repeats=1)
        row = capsys.readouterr().out.strip().splitlines()[-1]
        assert row.startswith("| 1, 2, 16, 32 |") and row.count("|") == cells, row
    with pytest.raises(ValueError, match="B,H,T,D"):
        main(shapes="1,2,16", repeats=1)
    real = main.__globals__["blocked_causal_attention"]  # a kernel that is off: no times reported
    main.__globals__["blocked_causal_attention"] = lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01
    try:
        with pytest.raises(RuntimeError, match="differ"):
            main(shapes="1,2,16,8", dtype="fp32", repeats=1)
    finally:
        main.__globals__["blocked_causal_attention"] = real


def test_bf16_ceiling_is_the_faster_of_bf16_and_fp32_products(bench, monkeypatch):
    """bf16 weights are exact fp32 numbers, so where fp32 multiplies faster (a CPU without native bf16
    products, whose fused kernel widens bf16 to fp32) the bf16 rows' compute ceiling is fp32's matmul
    peak, not the slower bf16 one; fp32's own ceiling and a faster bf16 peak are left as measured."""
    speeds = {}
    monkeypatch.setitem(bench["compute_peak"].__globals__, "measure_matmul_flops", lambda dtype: speeds[dtype])
    speeds.update({torch.bfloat16: 50e9, torch.float32: 260e9})  # a Xeon without AVX512-BF16
    assert bench["compute_peak"](torch.bfloat16) == 260e9 and bench["compute_peak"](torch.float32) == 260e9
    speeds.update({torch.bfloat16: 440e9, torch.float32: 200e9})  # native bf16 products
    assert bench["compute_peak"](torch.bfloat16) == 440e9 and bench["compute_peak"](torch.float32) == 200e9
    model = Transformer(tiny_args()).to(torch.bfloat16)
    monkeypatch.setitem(bench["measure_prefill_matmuls"].__globals__, "_prefill_matmuls",
                        lambda weights, rows, repeats: {torch.bfloat16: 1.0, torch.float32: 3.0}[weights[0].dtype])
    assert bench["measure_prefill_matmuls"](model, 8) == 3.0
    assert bench["measure_prefill_matmuls"](model.float(), 8) == 3.0


def test_every_row_of_a_block_is_held_to_its_fastest_bandwidth_probe(bench, monkeypatch):
    """The memory ceiling's bandwidth is the highest probe taken around any timed run of the block
    (dtype, batch), the same for every row: the two probes around one short run can both miss the
    fast spell it ran in (on the shared AMD EPYC a row once read 139% of a ceiling taken from them
    alone). bw_run keeps the higher of the two probes around each row's own fastest run."""
    readings = iter([40.0, 41.0, 90.0, 42.0, 43.0, 44.0, 45.0, 46.0])  # (before, after): a, b, a, b
    monkeypatch.setitem(bench["_time_runs"].__globals__, "measure_bandwidth_gbs", lambda: next(readings))
    decode_seconds = {"a": iter([0.5, 0.2]), "b": iter([0.3, 0.4])}

    def runner(name):
        def run(n):
            if n == 2:  # the warm-up
                return [[1, 2]], None
            return [[1, 2, 3]], [0.01, 0.01 + next(decode_seconds[name])]
        return run

    samples = []
    results = bench["_time_runs"]({"a": runner("a"), "b": runner("b")}, 3, 2, samples)
    assert samples == [40.0, 41.0, 90.0, 42.0, 43.0, 44.0, 45.0, 46.0]
    assert results["a"]["dec"] == pytest.approx(0.2) and results["b"]["dec"] == pytest.approx(0.3)
    assert results["a"]["bw"] == results["b"]["bw"] == 90.0
    assert results["a"]["bw_run"] == 44.0 and results["b"]["bw_run"] == 90.0
    row = bench["_row"]("a", "bf16", 1, results["a"], 4, 3, None, mem_bytes=1e9, peak=1e12, step_flops=1e9,
                        prompt_flops=1e9)
    # 2 decoded tokens in 0.2 s against 90 GB/s over 1 GB a step (the compute ceiling: 1,000 a second)
    assert row["mem_tps"] == pytest.approx(90.0) and row["pct_roofline"] == pytest.approx(100 * 10 / 90)


def test_generate_benchmark_refuses_runs_it_cannot_time(bench):
    """No timed run (repeats 0) or no token after the first (new_tokens 1) leaves nothing to measure a
    decode speed or a ceiling from: refused at once, naming the flag, before any model is built."""
    with pytest.raises(SystemExit, match=r"^--repeats 0: each row needs at least 1 timed run$"):
        bench["main"](repeats=0)
    with pytest.raises(SystemExit, match=r"^--new_tokens 1: .*at least 2$"):
        bench["main"](new_tokens=1)


def test_matmul_peak_is_the_faster_of_torch_and_the_kernels_product(bench, monkeypatch):
    """The compute ceiling is the fastest product this process runs: torch's matmul or the fused
    kernel's own (`linear_rows`, where the build has it; on the AMD EPYC torch's fp32 product ran at
    half the kernel's speed). The kernel's figure counts only where its product equals torch's: a
    product that is wrong is refused. Where the build has `linear_rows`, it is really timed."""
    g = bench["measure_matmul_flops"].__globals__
    speeds = {"torch": 200e9, "kernel": 410e9}
    monkeypatch.setitem(g, "_torch_matmul_flops", lambda a, b, r: speeds["torch"])
    monkeypatch.setitem(g, "_kernel_matmul_flops", lambda a, b, r: speeds["kernel"])
    assert bench["measure_matmul_flops"](torch.float32, n=64) == 410e9
    speeds.update(kernel=0.0)  # no kernel build
    assert bench["measure_matmul_flops"](torch.float32, n=64) == 200e9
    monkeypatch.undo()

    a, b = torch.randn(64, 96), torch.randn(96, 32)

    class Wrong:  # a build whose product leaves its output at zero
        @staticmethod
        def linear_rows(x, w, out, add, scales):
            out.zero_()
    monkeypatch.setitem(g, "cpu_kernels", lambda: Wrong)
    with pytest.raises(RuntimeError, match="differs from torch"):
        bench["_kernel_matmul_flops"](a, b, 1)
    monkeypatch.undo()
    from tests.test_inference import _kernel_or_skip
    if not hasattr(_kernel_or_skip(), "linear_rows"):
        pytest.skip("this CPU's kernel build has no linear_rows (AVX-512 builds only)")
    for dtype in (torch.float32, torch.bfloat16):
        assert bench["_kernel_matmul_flops"](a.to(dtype), b.to(dtype), 1) > 0


def test_busy_core_benchmark_compares_the_rows(capsys):
    """benchmarks/busy_core.py on the tiny preset (a busy process really pinned to the last core for
    the second block): a table row per implementation and condition, each with the tokens ours
    decoded (the same weights, greedy); skipped where the fused step cannot build."""
    from tests.test_inference import _kernel_or_skip

    _kernel_or_skip()
    main = runpy.run_path(str(ROOT / "benchmarks" / "busy_core.py"))["main"]
    main(model="tiny", dtype="fp32", prompt_len=8, new_tokens=6, repeats=1, hf_compile=False)
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    names = ["ours (threads measured)", "ours, all threads", "transformers"]
    assert [(r.split(" | ")[0][2:], r.split(" | ")[1]) for r in rows] == [
        (c, n) for c in ("cores free", "one core busy") for n in names]
    assert all(r.endswith("| yes |") for r in rows), rows
