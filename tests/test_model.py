import math

import pytest
import torch
import torch.nn.functional as F

from llama import blocked_attention
from llama.blocked_attention import blocked_causal_attention
from llama.train import TrainConfig
from llama.model import ModelArgs, Transformer, apply_rotary_emb, causal_mask, precompute_freqs_cis

# Parameter counts of Meta's released models (REFERENCE.md).
META_SIZES = {"7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "30B": 32_528_943_616,
              "65B": 65_285_660_672}


@pytest.mark.parametrize("name", list(META_SIZES))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    assert model.num_params() == META_SIZES[name]
    assert model.args.head_dim == 128


def test_ffn_hidden_dim_by_hand():
    assert ModelArgs(dim=4096).ffn_hidden_dim == 11008
    # Llama 2 70B: dim 8192, multiplier 1.3, multiple_of 4096 -> 28672
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096).ffn_hidden_dim == 28672


def test_bad_config_names_valid_options(tmp_path):
    with pytest.raises(ValueError, match="the shipped ones are .*7B"):
        ModelArgs.from_name("8B")
    with pytest.raises(ValueError, match="unknown model field.*n_layer.*valid fields"):
        ModelArgs.from_dict({"dim": 64, "n_layer": 2})
    p = tmp_path / "params.json"
    p.write_text('{"dim": 64, "n_heads": 4, "n_layers": 2, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}')
    args = ModelArgs.from_name(str(p), vocab_size=100)
    assert (args.dim, args.vocab_size) == (64, 100)
    assert ModelArgs.from_json(p).vocab_size == 32000  # -1 keeps the default until a tokenizer fills it
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelArgs.from_json(p)


def test_rope_matches_complex_multiplication():
    # Meta's convention: adjacent pairs are complex numbers multiplied by exp(i * pos * theta^(-2j/D))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    freqs = precompute_freqs_cis(8, 16)[:5]
    angles = torch.outer(torch.arange(5.0), 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, D/2)
    xc = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2))
    expected = torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)
    torch.testing.assert_close(apply_rotary_emb(x, freqs), expected)


def test_rope_gradient_is_the_derived_one():
    # _Rotary writes the backward by hand (rotation by minus the angle): it must equal what autograd
    # derives from the plain formula (computed in float32 for both), eager and compiled, and in bf16
    # to rounding
    from llama.model import _rotate

    torch.manual_seed(0)
    freqs = precompute_freqs_cis(8, 16)[3:8]  # positions 3..7: angles other than 0
    for dtype, compiled in ((torch.float64, False), (torch.float64, True), (torch.bfloat16, False)):
        x = torch.randn(2, 5, 3, 8, dtype=dtype, requires_grad=True)
        g = torch.randn(2, 5, 3, 8, dtype=dtype)
        f = torch.compile(apply_rotary_emb, fullgraph=True) if compiled else apply_rotary_emb
        (got,) = torch.autograd.grad(f(x, freqs), x, g)
        xr = x.detach().double().requires_grad_()
        (want,) = torch.autograd.grad(_rotate(xr, freqs[..., 0], freqs[..., 1]), xr, g.double())
        tol = dict(rtol=0, atol=1e-6) if dtype == torch.float64 else dict(rtol=0.02, atol=0.02)
        torch.testing.assert_close(got.double(), want, **tol)
        assert got.dtype == dtype


def test_causal_mask_with_offset():
    m = causal_mask(2, 3)
    inf = float("-inf")
    assert m.tolist() == [[0, 0, 0, 0, inf], [0, 0, 0, 0, 0]]


def _naive_forward(model, tokens):
    """Straight from the paper's equations, token loop for attention: an independent reference."""
    a = model.args
    sd = {k: v.double() for k, v in model.state_dict().items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    B, T = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    D, H, Hkv = a.head_dim, a.n_heads, a.n_kv_heads
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / a.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(pos, inv)

    def rope(x):  # x: (B, T, H, D)
        re, im = x[..., 0::2], x[..., 1::2]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = re * c - im * s, re * s + im * c
        return out

    for i in range(a.n_layers):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, T, H, D))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, T, Hkv, D))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, Hkv, D)
        out = torch.zeros(B, T, H, D, dtype=torch.float64)
        for t in range(T):
            for hh in range(H):
                kv = hh // (H // Hkv)
                s = (k[:, : t + 1, kv] @ q[:, t, hh, :, None]).squeeze(-1) / math.sqrt(D)  # (B, t+1)
                out[:, t, hh] = (s.softmax(-1)[:, :, None] * v[:, : t + 1, kv]).sum(1)
        h = h + out.reshape(B, T, H * D) @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        g = x @ sd[p + "feed_forward.w1.weight"].T
        h = h + ((g * torch.sigmoid(g)) * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_forward_matches_naive_reference(n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 9, model.args.vocab_size)
    torch.testing.assert_close(logits.double(), _naive_forward(model, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math", "blocked"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_decoding_equals_full_forward(backend, n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_kv_heads=n_kv_heads)).eval()
    model.set_attention_backend(backend)
    tokens = torch.randint(0, model.args.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        # prefill, then one token at a time
        cache = model.new_cache(max_batch_size=4, max_seq_len=32)
        steps = [model(tokens[:, :7], 0, cache)] + [model(tokens[:, t:t + 1], t, cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
        # chunks that start at start_pos > 0
        cache = model.new_cache(max_batch_size=3, max_seq_len=32)
        chunks = [model(tokens[:, s:e], s, cache) for s, e in [(0, 4), (4, 11), (11, 12), (12, 20)]]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-4)
        # positions given as a tensor (the compiled decoder's fixed shapes): the whole cache is read,
        # the positions not written yet are masked; one token at a time and in chunks
        cache = model.new_cache(max_batch_size=3, max_seq_len=32)
        steps = [model(tokens[:, :7], 0, cache)] + [model(tokens[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))
                                                    for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
        cache = model.new_cache(max_batch_size=3, max_seq_len=32)
        chunks = [model(tokens[:, s:e], cache=cache, input_pos=torch.arange(s, e)) for s, e in [(0, 4), (4, 11), (11, 20)]]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_backends_agree(dtype, tol):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_kv_heads=2)).eval().to(dtype)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    outs = {}
    with torch.no_grad():
        for backend in ["math", "sdpa", "blocked"]:
            model.set_attention_backend(backend)
            cache = model.new_cache(2, 16, dtype=next(model.parameters()).dtype)
            outs[backend] = torch.cat([model(tokens[:, :5], 0, cache), model(tokens[:, 5:], 5, cache)], 1).float()
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=tol, rtol=tol)
    torch.testing.assert_close(outs["blocked"], outs["math"], atol=tol, rtol=tol)


def _attention_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 5])
def test_blocked_attention_matches_float64_sdpa(dtype, start, monkeypatch):
    """Blocks of 4 queries over 13 (not a multiple), keys from `start` cached ones: output and the
    gradients of q, k, v against float64 sdpa with the causal mask; in bf16 no further off than
    sdpa's own bf16 kernel. Then the same under torch.compile (the custom op's fake and autograd
    registrations), and with the probabilities too large to keep (sdpa instead)."""
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 13, 16
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = torch.randn(2, b, h, start + t, d, dtype=dtype)
    grad = torch.randn(b, h, t, d, dtype=dtype)
    mask = torch.ones(t, start + t, dtype=torch.bool).tril(start)  # query i at position start + i
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    blocked = lambda q, k, v: blocked_causal_attention(q, k, v, start, block=4)  # noqa: E731
    ref = _attention_and_grads(sdpa, q.double(), k.double(), v.double(), grad.double())
    got = _attention_and_grads(blocked, q, k, v, grad)
    if dtype == torch.float32:
        for x, r in zip(got, ref):
            torch.testing.assert_close(x.double(), r, atol=1e-5, rtol=1e-5)
    else:
        theirs = _attention_and_grads(sdpa, q, k, v, grad)
        for x, y, r in zip(got, theirs, ref):
            assert (x.double() - r).abs().max() <= 2 * (y.double() - r).abs().max() + 1e-3
    compiled = _attention_and_grads(torch.compile(blocked, fullgraph=True), q, k, v, grad)
    for x, y in zip(compiled, got):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    monkeypatch.setattr(blocked_attention, "MAX_SAVED_BYTES", 0)
    for x, r in zip(_attention_and_grads(blocked, q, k, v, grad), ref):
        torch.testing.assert_close(x.double(), r, atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=1e-2)


def _cpu_attention_kernel_or_skip():
    if not blocked_attention._kernel_available():
        pytest.skip("no C++ CPU kernel with the bf16 attention here (it needs AVX512-BF16 and a compiler)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("start", [0, 5])
def test_blocked_attention_kernel_path(start, dtype, monkeypatch):
    """bf16 and fp32 on a CPU with the C++ kernel: blocked_causal_attention takes it (spied), with
    grouped-query k/v as they are (4 query heads, 2 kv heads), 45 queries in blocks of 16; output and
    gradients against float64 sdpa no further off than twice sdpa's own kernel in that dtype + 1e-3
    (bf16) or 1e-5 (fp32); the same values under torch.compile; and the torch path (kernel refused),
    which rounds the scores to the dtype before the softmax, within three times sdpa's error with the
    grouped heads expanded."""
    _cpu_attention_kernel_or_skip()
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 45, 32
    slack = 1e-3 if dtype == torch.bfloat16 else 1e-5
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = torch.randn(2, b, hkv, start + t, d, dtype=dtype)
    grad = torch.randn(b, h, t, d, dtype=dtype)
    mask = torch.ones(t, start + t, dtype=torch.bool).tril(start)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1), attn_mask=mask)
    blocked = lambda q, k, v: blocked_causal_attention(q, k, v, start, block=16)  # noqa: E731
    ref = _attention_and_grads(sdpa, q.double(), k.double(), v.double(), grad.double())
    theirs = _attention_and_grads(sdpa, q, k, v, grad)
    calls = []
    forward = blocked_attention._cpu_forward
    monkeypatch.setattr(blocked_attention, "_cpu_forward", lambda *a: calls.append(a[3:]) or forward(*a))
    got = _attention_and_grads(blocked, q, k, v, grad)
    assert calls == [(start, 16)]
    for x, y, r in zip(got, theirs, ref):
        assert (x.double() - r).abs().max() <= 2 * (y.double() - r).abs().max() + slack
    monkeypatch.setattr(blocked_attention, "_cpu_forward", forward)
    compiled = _attention_and_grads(torch.compile(blocked, fullgraph=True), q, k, v, grad)
    for x, y in zip(compiled, got):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    monkeypatch.setattr(blocked_attention, "_use_kernel", lambda q, block: False)
    for x, y, r in zip(_attention_and_grads(blocked, q, k, v, grad), theirs, ref):  # its scores are rounded
        assert (x.double() - r).abs().max() <= 3 * (y.double() - r).abs().max() + slack


def test_blocked_backend_bf16_training_runs_the_kernel(monkeypatch):
    """A grouped-query model (head size 32) under bf16 autocast with the blocked backend sends every
    block's attention to the C++ kernel, and its gradients are as close to the float64 math backend's
    as those of the sdpa backend under the same autocast (relative error, within 2x + 1e-3)."""
    _cpu_attention_kernel_or_skip()
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                  max_seq_len=64))
    tokens = torch.randint(0, 256, (2, 41))

    def grads(backend, dtype, autocast):
        m = Transformer(model.args).to(dtype)
        m.load_state_dict(model.state_dict())
        m.set_attention_backend(backend)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    want = grads("math", torch.float64, False)
    calls = []
    forward = blocked_attention._cpu_forward
    monkeypatch.setattr(blocked_attention, "_cpu_forward", lambda *a: calls.append(a[3:]) or forward(*a))
    err = {b: ((grads(b, torch.float32, True) - want).norm() / want.norm()).item() for b in ["blocked", "sdpa"]}
    assert len(calls) == model.args.n_layers
    assert err["blocked"] <= 2 * err["sdpa"] + 1e-3, err


def test_blocked_backend_trains_like_math(monkeypatch):
    """The model's gradients with the blocked backend (blocks of 4 over 11 positions, grouped-query
    heads) equal those of the plain fp32 reference."""
    monkeypatch.setattr(blocked_attention, "BLOCK", 4)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_kv_heads=2))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    grads = {}
    for backend in ["math", "blocked"]:
        model.zero_grad()
        model.set_attention_backend(backend)
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["math"].items():
        torch.testing.assert_close(grads["blocked"][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("q,k,v,start,block,match", [
    ((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), 0, None, "start \\+ T"),  # one key too many
    ((1, 3, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), 0, None, "Hkv dividing H"),  # 2 kv heads for 3 query heads
    ((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 4), 0, None, "start \\+ T"),  # v's head size
    ((2, 5, 8), (2, 5, 8), (2, 5, 8), 0, None, "q \\(B, H, T, D\\)"),  # 3-D
    ((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), 0, 0, "block must be >= 1"),
])
def test_blocked_attention_bad_inputs_are_one_sentence(q, k, v, start, block, match):
    with pytest.raises(ValueError, match=match):
        blocked_causal_attention(torch.randn(q), torch.randn(k), torch.randn(v), start=start, block=block)


def test_blocked_attention_wants_one_dtype():
    with pytest.raises(ValueError, match="one dtype"):
        blocked_causal_attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).double())


def test_blocked_attention_under_autocast_and_changing_lengths():
    """fp32 inputs under bf16 autocast run in fp32 (the op's buffers are the inputs' dtype), and a
    compile with dynamic shapes makes one graph for every length (the saved size is closed-form)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 11, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blocked_causal_attention(q, k, v, block=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    graphs = []
    fn = torch.compile(lambda q, k, v: blocked_causal_attention(q, k, v, block=4), dynamic=True,
                       backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    for t in (9, 10, 11, 7):
        x = [a[:, :, :t].contiguous() for a in (q, k, v)]
        torch.testing.assert_close(fn(*x), F.scaled_dot_product_attention(*x, is_causal=True), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1


def test_blocked_attention_falls_back_to_sdpa_past_its_memory_cap(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(blocked_attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    q, k, v = torch.randn(3, 1, 2, 6, 8)
    blocked_causal_attention(q, k, v)
    assert calls == []
    monkeypatch.setattr(blocked_attention, "MAX_SAVED_BYTES", 0)
    blocked_causal_attention(q, k, v)
    assert calls == [{"is_causal": True}]


def test_unknown_attention_backend_is_one_sentence():
    model = Transformer(ModelArgs.from_name("tiny"))
    with pytest.raises(ValueError, match="choose one of"):
        model.set_attention_backend("flash")


def test_meta_device_build_then_load():
    torch.manual_seed(0)
    ref = Transformer(ModelArgs.from_name("tiny")).eval()
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("tiny"))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    model.init_buffers()
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens))


def test_trainable_and_init():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    tokens = torch.randint(0, 512, (2, 16))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert loss.item() == pytest.approx(math.log(512), rel=0.05)  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_too_long_is_a_clear_error():
    model = Transformer(ModelArgs.from_name("tiny"))
    with pytest.raises(ValueError, match="max_seq_len 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_config_files_that_are_not_json_objects_are_one_sentence(tmp_path):
    for load in (ModelArgs.from_json, TrainConfig.from_json):
        with pytest.raises(FileNotFoundError, match="no .*config at"):
            load(tmp_path / "missing.json")
        (tmp_path / "bad.json").write_text("{dim: 4")
        with pytest.raises(ValueError, match="is not valid JSON"):
            load(tmp_path / "bad.json")
        (tmp_path / "list.json").write_text("[1, 2]")
        with pytest.raises(ValueError, match="must hold a JSON object, not list"):
            load(tmp_path / "list.json")
