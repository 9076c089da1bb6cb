"""llama/gpu_kernels.py: the Triton one-row product that GPU decoding runs its weights through.

There is no GPU here, so the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set
before Triton is imported: a subprocess): its results against float64 products, and the compiled
decoder's one-token steps with it against the eager model's, counting the kernel's launches so a
step that silently bypassed it would fail. Triton is a test extra here (CUDA builds of torch ship
it); without it these tests skip.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama import gpu_kernels
from llama.inference import CompiledDecoder
from llama.model import Transformer
from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def interpret(code: str) -> str:
    """Run `code` in a fresh interpreter with Triton's CPU interpreter on; returns its stdout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@needs_triton
def test_gemv_matches_float64_products():
    """bf16 and fp16 weights, and int8 ones with per-row scales (both ways of widening them: the same
    results); shapes that fill whole tiles and
    shapes with ragged rows and columns; a row with leading dims of size 1; strided views of the
    weight and of the row. Each output within its
    dtype's rounding of the float64 product (the interpreter rounds bf16 toward zero: one unit)."""
    out = interpret("""
        import torch
        from llama import gpu_kernels
        from llama.quantize import quantize_int8, quantize_per_row
        torch.manual_seed(0)
        worst = {}
        for n, k in [(64, 128), (37, 70), (5, 200), (256, 32)]:
            for dtype in (torch.bfloat16, torch.float16, torch.int8):
                x = torch.randn(1, 1, k).to(torch.bfloat16 if dtype is torch.int8 else dtype)
                w = torch.randn(n, k)
                if dtype is torch.int8:
                    q, s = quantize_per_row(w)
                    y = torch.ops.llama.gemv(x, q, s)
                    gpu_kernels.INT8_BITS = False  # the other way of widening int8 gives the same
                    assert torch.equal(torch.ops.llama.gemv(x, q, s), y)
                    gpu_kernels.INT8_BITS = True
                    ref = x.double() @ (q.double() * s.double()[:, None]).t()
                elif n % 2:  # views: a weight whose rows are longer than k, and a row with a stride of 2
                    w = torch.randn(n + 5, k + 9).to(dtype)[3:3 + n, 4:4 + k]
                    x = torch.randn(1, 1, 2 * k).to(dtype)[..., ::2]
                    y = torch.ops.llama.gemv(x, w)
                    ref = x.double() @ w.double().t()
                else:
                    w = w.to(dtype)
                    y = torch.ops.llama.gemv(x, w)
                    ref = x.double() @ w.double().t()
                assert y.shape == (1, 1, n) and y.dtype == x.dtype, (y.shape, y.dtype)
                unit = 2.0 ** (-10 if x.dtype is torch.float16 else -7)
                excess = ((y.double() - ref).abs() - unit * ref.abs()) / ref.abs().max()
                worst[(n, k, str(dtype))] = excess.max().item()
        print(max(worst.values()))
    """)
    assert float(out.split()[-1]) < 1e-5  # fp32 sums: far below one unit of the output


def test_gemv_names_what_it_cannot_take():
    """One sentence for each input the kernel cannot take, before anything runs."""
    w = torch.randn(8, 16)
    cases = [((torch.randn(2, 16), w), r"one row of 16 values .* got x \(2, 16\)"),
             ((torch.randn(16, 1), w), r"one row of 16 values .* got x \(16, 1\)"),
             ((torch.randn(1, 16), torch.randn(16)), r"2-D weight .* got shape \(16,\)"),
             ((torch.randn(1, 16), w.t().contiguous().t()), r"unit column stride"),
             ((torch.randn(1, 16), w.to(torch.int8)), r"per-row scales of shape \(8,\) .* got None"),
             ((torch.randn(1, 16), w, torch.ones(8)), r"in x's dtype .* got torch.float32 with scales"),
             ((torch.randn(1, 16).half(), w), r"in x's dtype \(torch.float16\)")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            gpu_kernels.gemv(*args)
    if not (torch.cuda.is_available() or gpu_kernels.INTERPRET):
        with pytest.raises(RuntimeError, match="gemv runs on CUDA devices"):
            gpu_kernels.gemv(torch.randn(1, 16), w)


@pytest.mark.skipif(torch.cuda.is_available() or gpu_kernels.INTERPRET, reason="checks the error where there is no GPU")
def test_gemv_option_needs_a_gpu():
    with pytest.raises(ValueError, match="gemv=True needs Triton and the model on a CUDA device"):
        CompiledDecoder(Transformer(tiny_args()), gemv=True)


@needs_triton
def test_compiled_steps_run_their_one_row_products_on_the_kernel():
    """CompiledDecoder(gemv=True): each one-token step's products go to the kernel - the layers'
    packed q|k|v, wo, w1|w3, w2 and the output head, 4 x layers + 1 launches, int8 weights too
    (packed with their scales) - and its logits are the eager model's to bf16 rounding. With gemv=False
    no launch happens."""
    out = interpret("""
        import torch
        from llama import gpu_kernels
        from llama.inference import CompiledDecoder
        from llama.inference.decoders import EagerDecoder
        from llama.model import KVCache, Transformer
        from llama.quantize import quantize_int8
        from tests.helpers import tiny_args

        launches = 0
        kernel = gpu_kernels._gemv_kernel
        class Counting:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    global launches
                    launches += 1
                    return kernel[grid](*args, **kwargs)
                return launch
        gpu_kernels._gemv_kernel = Counting()

        torch.manual_seed(0)
        model = Transformer(tiny_args(n_kv_heads=2)).to(torch.bfloat16).eval().requires_grad_(False)
        model.init_weights(std=0.08)
        L = model.args.n_layers
        prompt = torch.randint(3, model.args.vocab_size, (1, 5))
        nxt = torch.randint(3, model.args.vocab_size, (1, 1))

        def step_logits(decoder):
            a = model.args
            cache = KVCache(a.n_layers, 1, 16, a.n_kv_heads, a.head_dim, dtype=torch.bfloat16)
            decoder(prompt, 0, cache)  # prefill: eager in both
            return decoder(nxt, 5, cache).float()

        for label, want_launches in (("bf16", 4 * L + 1), ("int8", 4 * L + 1)):
            if label == "int8":
                quantize_int8(model)
            want = step_logits(EagerDecoder(model))
            for gemv in (False, True):
                torch._dynamo.reset()
                launches = 0
                got = step_logits(CompiledDecoder(model, cuda_graphs=False, gemv=gemv, backend="aot_eager"))
                err = ((got - want).abs().max() / want.abs().max()).item()
                print(label, gemv, launches, want_launches if gemv else 0, err)

        # autograd recording (a layer being trained): the kernel has no gradient, so F.linear runs
        # and the product differentiates (before, a compile of such a step failed for want of one)
        x, w = torch.randn(1, 32).to(torch.bfloat16), torch.randn(8, 32).to(torch.bfloat16).requires_grad_()
        launches = 0
        with gpu_kernels.OneRowLinears():
            y = torch.nn.functional.linear(x, w)
        y.sum().backward()
        print("grad", True, launches, 0, float(w.grad is None))

        # F.linear by keywords, inside the mode: the kernel, once
        x, w = torch.randn(1, 32).to(torch.bfloat16), torch.randn(8, 32).to(torch.bfloat16)
        launches = 0
        with torch.no_grad(), gpu_kernels.OneRowLinears():
            y = torch.nn.functional.linear(input=x, weight=w)
        print("keywords", True, launches, 1, ((y - x @ w.t()).abs().max() / (x @ w.t()).abs().max()).item())
    """)
    for line in out.strip().splitlines():
        label, gemv, launches, want, err = line.split()
        assert launches == want, line  # every product on the kernel (or none), once per step
        assert float(err) < 2e-2, line  # bf16 rounding of a few layers


@needs_triton
def test_decode_attention_matches_float64_attention():
    """One new token per row over a cache view (rows 0..B-1 of a layer of a larger cache), keys
    0..pos visible: multi-head and grouped-query heads, a head size that is not a power of two,
    positions at 0, at a split's edges and at the cache's end, one split and several (automatic and
    given; 38 splits, which the combine kernel takes in two chunks), a position past the cache's end
    (every key visible, nothing read beyond), bf16, fp16 and fp32. Each output within its dtype's rounding of float64 attention (the
    interpreter rounds bf16 toward zero: one unit). Positions after pos are filled with huge values:
    reading one would show."""
    out = interpret("""
        import math
        import torch
        from llama import gpu_kernels  # noqa: F401 - registers torch.ops.llama.decode_attention
        torch.manual_seed(0)

        def reference(q, k, v, pos):
            rep = q.size(2) // k.size(2)
            k, v = (t.double().repeat_interleave(rep, 2) for t in (k, v))
            scores = torch.einsum("bhd,bshd->bhs", q[:, 0].double(), k) / math.sqrt(q.size(-1))
            scores[:, :, pos + 1:] = float("-inf")
            return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v)[:, None]

        worst = 0.0
        cases = [(2, 4, 2, 16, 40, (0, 15, 16, 39, 50), (0, 16, 48)),  # 50: past the cache, which it all sees (1, 2, 2, 24, 33, (0, 15, 16, 32), (0, 16, 48)),
                 (3, 4, 1, 32, 70, (0, 15, 16, 69), (0, 16, 48)),
                 (1, 2, 1, 16, 600, (0, 300, 599), (16,))]  # 38 splits: the combine takes them 32 at a time
        for b, h, hkv, d, s, positions, splits in cases:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for pos in positions:
                    for split in splits:
                        ck, cv = (torch.randn(2, b + 1, s, hkv, d) for _ in range(2))
                        ck[:, :, pos + 1:] = cv[:, :, pos + 1:] = 1e4  # never visible
                        k, v = ck.to(dtype)[1, :b], cv.to(dtype)[1, :b]
                        q = torch.randn(b, 1, h, d).to(dtype)
                        y = torch.ops.llama.decode_attention(q, k, v, torch.tensor([pos]), split)
                        assert y.shape == q.shape and y.dtype == dtype, (y.shape, y.dtype)
                        ref = reference(q, k, v, pos)
                        unit = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 0.0}[dtype]
                        excess = ((y.double() - ref).abs() - unit * ref.abs()).max() / ref.abs().max()
                        worst = max(worst, excess.item())
        print(worst)
    """)
    assert float(out.split()[-1]) < 1e-5  # fp32 inside: far below one unit of the output


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path, monkeypatch):
    """The interpreter runs a kernel's Python, not Triton's compiler, which rejects some programs the
    interpreter accepts (loop-carried types, shapes). So each kernel is compiled here, ahead of time,
    to an sm_90 (H100/H200) cubin with Triton's own ptxas, for the variants decoding launches: gemv
    on bf16/fp16 and int8 weights, whole tiles or not; decode_attention with one split and several,
    multi-head and grouped-query, a head size that is not a power of two, and its combine kernel.
    Where cuobjdump can read the cubin, no variant spills registers to local memory."""
    import shutil

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, which it warns will change
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def jit(kernel):  # through autotune / heuristics wrappers
        while not isinstance(kernel, JITFunction):
            kernel = kernel.fn
        return kernel

    def compile_(kernel, types: dict, consts: dict):
        sig = {**types, **{name: "constexpr" for name in consts}}
        return triton.compile(ASTSource(jit(kernel), sig, consts), target=GPUTarget("cuda", 90, 32))

    built = []
    for dt, wt, scaled in (("bf16", "bf16", False), ("fp16", "fp16", False), ("bf16", "i8", True)):
        for even in (True, False):
            built.append(compile_(gpu_kernels._gemv_kernel,
                                  {"x_ptr": f"*{dt}", "w_ptr": f"*{wt}", "s_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                                   "N": "i32", "stride_w": "i32"},
                                  {"K": 2048, "SCALED": scaled, "INT8_BITS": True, "BLOCK_N": 8, "BLOCK_K": 512,
                                   "EVEN": even}))
    strides = ("sqb", "sqh", "skb", "sks", "skh", "svb", "svs", "svh", "sob", "soh")
    for dt in ("bf16", "fp16", "fp32"):
        for rep, d, splits, ints in ((1, 128, 12, "i32"), (4, 128, 1, "i32"), (1, 80, 3, "i32"), (1, 64, 4, "i64")):
            block_d = triton.next_power_of_2(d)  # (ints: how Triton passes the strides, by their size)
            types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "pos_ptr": "*i64", "o_ptr": f"*{dt}",
                     "part_ptr": "*fp32", "stats_ptr": "*fp32", "S": "i32", **{n: ints for n in strides},
                     "scale": "fp32"}
            built.append(compile_(gpu_kernels._attend_kernel, types,
                                  {"H": 16, "N_REP": rep, "D": d, "BLOCK_D": block_d, "SPLIT": 64, "SPLITS": splits,
                                   "BLOCK_S": 4096 // block_d}))
            built.append(compile_(gpu_kernels._combine_kernel,
                                  {"part_ptr": "*fp32", "stats_ptr": "*fp32", "o_ptr": f"*{dt}", "sob": "i32",
                                   "soh": "i32"},
                                  {"H": 16, "D": d, "BLOCK_D": block_d, "SPLITS": 12 * splits, "CHUNK": 32}))
    assert all(k.asm.get("cubin") for k in built)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not shutil.which(str(cuobjdump)):
        return
    for i, k in enumerate(built):
        path = tmp_path / f"{i}.cubin"
        path.write_bytes(k.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True).stdout
        assert "LOCAL:0" in usage and "REG:" in usage, (k.name, usage)


def test_decode_attention_names_what_it_cannot_take():
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 16, 2, 8)
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match=r"one new token per row, q \(B, 1, H, D\); got q \(1, 2, 4, 8\)"):
        torch.ops.llama.decode_attention(torch.zeros(1, 2, 4, 8), k, k, pos)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        torch.ops.llama.decode_attention(q, torch.zeros(1, 16, 3, 8), torch.zeros(1, 16, 3, 8), pos)
    with pytest.raises(ValueError, match="unit stride along the head dimension"):
        torch.ops.llama.decode_attention(q, torch.zeros(1, 16, 2, 16)[..., ::2], k, pos)
    with pytest.raises(ValueError, match="one integer tensor"):
        torch.ops.llama.decode_attention(q, k, k, torch.tensor([3.0]))
    if not gpu_kernels.INTERPRET and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runs on CUDA devices"):
            torch.ops.llama.decode_attention(q, k, k, pos)


def test_attention_kernel_option_needs_a_gpu():
    with pytest.raises(ValueError, match="attention_kernel=True needs Triton and the model on a CUDA device"):
        CompiledDecoder(Transformer(tiny_args()), attention_kernel=True)


@needs_triton
def test_compiled_steps_run_their_attention_on_the_kernel():
    """CompiledDecoder(attention_kernel=True): each one-token step's attention goes to
    decode_attention, once a layer (with its combine kernel where the cache is cut into several
    splits) and its logits are the eager step's to bf16 rounding; with attention_kernel=False no
    launch. Greedy generation through whole compiled steps (fp32) gives the eager decoder's tokens
    for 40 positions, past the splits' edge."""
    out = interpret("""
        import torch
        from llama import gpu_kernels
        from llama.inference import CompiledDecoder, Llama
        from llama.inference.decoders import EagerDecoder
        from llama.model import KVCache, Transformer
        from tests.helpers import tiny_args

        launches = {"attend": 0, "combine": 0}
        def counting(name):
            kernel = getattr(gpu_kernels, f"_{name}_kernel")
            class Counting:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launches[name] += 1
                        return kernel[grid](*args, **kwargs)
                    return launch
            setattr(gpu_kernels, f"_{name}_kernel", Counting())
        counting("attend")
        counting("combine")

        torch.manual_seed(0)
        model = Transformer(tiny_args(n_kv_heads=2)).to(torch.bfloat16).eval().requires_grad_(False)
        model.init_weights(std=0.08)
        a = model.args
        L, S = a.n_layers, 48  # 48 positions: two splits of 32 under the interpreter's sizing
        prompt = torch.randint(3, a.vocab_size, (1, 5))
        nxt = torch.randint(3, a.vocab_size, (1, 1))

        def step_logits(decoder):
            cache = KVCache(L, 1, S, a.n_kv_heads, a.head_dim, dtype=torch.bfloat16)
            decoder(prompt, 0, cache)  # prefill: eager in both
            return decoder(nxt, 5, cache).float()

        want = step_logits(EagerDecoder(model))
        for on in (False, True):
            torch._dynamo.reset()
            launches.update(attend=0, combine=0)
            got = step_logits(CompiledDecoder(model, cuda_graphs=False, attention_kernel=on, backend="aot_eager"))
            err = ((got - want).abs().max() / want.abs().max()).item()
            print("step", launches["attend"], L if on else 0, launches["combine"], L if on else 0, err)

        # greedy tokens in fp32 (a random bf16 model's logits nearly tie: the compiled step with sdpa
        # already picks another token than eager's at the 24th), rows of two prompt lengths
        model.float()
        class Tok:  # ids only: no end-of-sequence
            eos_id = -1
        rows = [prompt[0].tolist(), prompt[0, :3].tolist()]
        tokens = {}
        for name in ("eager", "compiled"):
            llama = Llama(model, Tok(), S, 2, decoder="eager")
            if name == "compiled":
                torch._dynamo.reset()
                llama.decoder = CompiledDecoder(model, cuda_graphs=False, attention_kernel=True, backend="aot_eager")
            launches.update(attend=0)
            tokens[name] = llama.generate(rows, 40, temperature=0.0)[0]
            print("greedy", int(launches["attend"] > 0), int(name == "compiled"), 0, 0, 0.0)
        print("tokens", int(tokens["eager"] == tokens["compiled"]), 1, 0, 0, 0.0)
    """)
    for line in out.strip().splitlines():
        label, launches, want, combines, want_combines, err = line.split()
        assert (launches, combines) == (want, want_combines), line  # every layer on the kernel, or none
        assert float(err) < 2e-2, line  # bf16 rounding of a few layers


@pytest.mark.skipif(not (torch.cuda.is_available() and gpu_kernels.available()), reason="needs a CUDA device and Triton")
def test_gemv_on_cuda_and_the_graph_captured_step():
    """On a GPU (run by the GPU check): the compiled kernel against float64 products (round to nearest:
    half a unit), and a CUDA-graph-captured one-token step of a bf16 model on it against the eager step,
    then of the same model in int8."""
    from llama.inference.decoders import EagerDecoder
    from llama.model import KVCache
    from llama.quantize import quantize_int8, quantize_per_row

    torch.manual_seed(0)
    for n, k in [(4096, 4096), (37, 70), (11008, 4096), (4096, 11008)]:
        for dtype in (torch.bfloat16, torch.float16, torch.int8):
            x = torch.randn(1, k, device="cuda").to(torch.bfloat16 if dtype is torch.int8 else dtype)
            w = torch.randn(n, k, device="cuda")
            if dtype is torch.int8:
                q, s = quantize_per_row(w)
                y, ref = torch.ops.llama.gemv(x, q, s), x.double() @ (q.double() * s.double()[:, None]).t()
            else:
                y, ref = torch.ops.llama.gemv(x, w.to(dtype)), x.double() @ w.to(dtype).double().t()
            unit = 2.0 ** (-11 if x.dtype is torch.float16 else -8)
            excess = ((y.double() - ref).abs() - unit * ref.abs()).max() / ref.abs().max()
            assert excess < 1e-5, (n, k, dtype, excess.item())

    model = Transformer(tiny_args(n_kv_heads=2)).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    model.init_weights(std=0.08)
    a = model.args
    prompt = torch.randint(3, a.vocab_size, (1, 5), device="cuda")
    nxt = torch.randint(3, a.vocab_size, (1, 1), device="cuda")
    for int8 in (False, True):
        if int8:
            quantize_int8(model)
        logits = []
        for decoder in (EagerDecoder(model), CompiledDecoder(model)):
            cache = KVCache(a.n_layers, 1, 16, a.n_kv_heads, a.head_dim, device="cuda", dtype=torch.bfloat16)
            decoder(prompt, 0, cache)
            logits.append(decoder(nxt, 5, cache).float().clone())
        assert decoder.gemv and decoder.attention_kernel and decoder.cuda_graphs
        assert len(decoder.packs.packed) == 2 * a.n_layers
        tuned = {key[:2] for key in gpu_kernels._gemv_kernel.cache}  # (N, K, dtypes...) of every shape it ran
        assert (a.vocab_size, a.dim) in tuned and (a.dim, a.ffn_hidden_dim) in tuned  # output head, w2
        assert ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item() < 2e-2, int8


@pytest.mark.skipif(not (torch.cuda.is_available() and gpu_kernels.available()), reason="needs a CUDA device and Triton")
def test_decode_attention_on_cuda():
    """On a GPU (run by the GPU check): the compiled kernel against float64 attention at a 1B model's
    and a 7B's head shapes (16 and 32 heads of 128), a grouped-query one, one split and many (256 at
    8,192 positions: the combine in chunks), each output within half a unit of its dtype's rounding
    (round to nearest) plus fp32 sums' error."""
    torch.manual_seed(0)
    # (batch, heads, kv heads, head size, cache, position, split: 0 automatic, s one program a head;
    # batch 16 x 32 heads gives one split automatically on an H100/H200)
    for b, h, hkv, d, s, pos, split in [(2, 16, 16, 128, 384, 255, 0), (2, 32, 32, 128, 4096, 2047, 0),
                                        (2, 32, 8, 128, 1024, 1023, 0), (2, 16, 16, 128, 384, 0, 0),
                                        (2, 16, 16, 128, 384, 255, 384), (16, 32, 32, 128, 512, 300, 0),
                                        (1, 16, 16, 128, 8192, 8000, 32)]:
        for dtype in (torch.bfloat16, torch.float16):
            k, v = (torch.randn(b, s, hkv, d, device="cuda").to(dtype) for _ in range(2))
            q = torch.randn(b, 1, h, d, device="cuda").to(dtype)
            y = torch.ops.llama.decode_attention(q, k, v, torch.tensor([pos], device="cuda"), split)
            kk, vv = (t[:, :pos + 1].double().repeat_interleave(h // hkv, 2) for t in (k, v))
            scores = torch.einsum("bhd,bshd->bhs", q[:, 0].double(), kk) / d ** 0.5
            ref = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), vv)[:, None]
            unit = 2.0 ** (-11 if dtype is torch.float16 else -8)
            excess = ((y.double() - ref).abs() - unit * ref.abs()).max() / ref.abs().max()
            assert excess < 1e-4, (b, h, hkv, s, pos, split, dtype, excess.item())
