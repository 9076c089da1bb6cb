"""llama.quantize: int8 weight-only quantization against the unquantized model."""

import pytest
import torch

from llama.inference import Llama
from llama.model import Transformer
from llama.quantize import Int8Embedding, Int8Linear, quantize_int8, weight_bytes
from tests.helpers import PROMPTS, make_checkpoint, tiny_args


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("q_ckpt")
    make_checkpoint(base / "one", tiny_tokenizer.model_path, num_shards=1)
    return {"one": base / "one", "tokenizer": str(tiny_tokenizer.model_path)}


def test_int8_halves_weight_bytes_and_stays_close():
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=128, n_layers=2, vocab_size=512)).to(torch.bfloat16).eval()
    model.init_weights(std=0.08)
    ref = Transformer(model.args).to(torch.bfloat16).eval()
    ref.load_state_dict(model.state_dict())
    bf16_bytes = weight_bytes(ref)
    quantize_int8(model)
    assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()) == 2 * 7 + 2
    assert model.layers[0].attention.wq.weight.dtype == torch.int8
    ratio = weight_bytes(model) / bf16_bytes
    assert 0.5 <= ratio < 0.53, ratio  # int8 weights + one bf16 scale per output row, norms as they were
    # dequantized weights are within half a quantization step of the originals
    w, q = ref.layers[1].feed_forward.w2.weight.float(), model.layers[1].feed_forward.w2
    err = (q.weight.float() * q.scales.float()[:, None] - w).abs()
    assert (err <= q.scales.float()[:, None] * 0.5 + 1e-2 * w.abs()).all()
    # next-token distributions on random prompts: small KL from the bf16 model
    tokens = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        p = torch.log_softmax(ref(tokens).float(), -1)
        q_ = torch.log_softmax(model(tokens).float(), -1)
    kl = (p.exp() * (p - q_)).sum(-1)  # (B, T)
    assert kl.mean() < 2e-3 and kl.max() < 2e-2, (kl.mean(), kl.max())
    # and measurably different from no quantization at all, so the test can fail
    assert kl.mean() > 0


def test_int8_generation_through_build(ckpts):
    fp = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="bf16")
    q = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="bf16")
    quantize_int8(q.model)
    ids = [fp.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    a, b = fp.generate(ids, 6, temperature=0)[0], q.generate(ids, 6, temperature=0)[0]
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert same >= 0.6 * sum(map(len, a))  # greedy text mostly unchanged on a random model


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_one_row_under_compile_equals_eager(dtype):
    """A one-row input under torch.compile takes the reduction form (one pass over the int8
    weight); it gives the eager cast-and-matmul result, and more rows keep the matmul."""
    torch.manual_seed(0)
    lin = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False).to(dtype))
    compiled = torch.compile(lin, fullgraph=True)
    for shape in [(1, 1, 96), (3, 1, 96)]:
        x = torch.randn(shape, dtype=dtype)
        want = (x.float() @ (lin.weight.float() * lin.scales.float()[:, None]).T)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
        torch.testing.assert_close(compiled(x).float(), want, **tol)
        torch.testing.assert_close(compiled(x), lin(x), **tol)
