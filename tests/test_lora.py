"""llama.lora: the adapter by hand (W x + alpha / r B A dropout(x)), step 0 equals the base, only
adapters get gradients, merge equals unmerged, strict loading, bf16 base + fp32 adapters, int8 base,
activation checkpointing replays dropout, bad input; and tp=2 / FSDP dp=2 against one process
(tests/workers/lora.py). PEFT interop is tests/test_formats_peft.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama.lora import (apply_lora, apply_lora_weights, load_base_state_dict, lora_config, lora_state_dict,
                        merge_lora, merged_state_dict, num_lora_params)
from llama.model import Transformer
from llama.parallel import apply_ac
from llama.quantize import Int8Linear, quantize_int8
from tests.conftest import torchrun
from tests.helpers import LORA_TARGETS as ALL
from tests.helpers import lora_base_model as _base
from tests.helpers import randomize_lora_b as _randomize_b


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def test_fresh_adapter_is_the_base_and_only_adapters_train():
    model = _base()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(tokens)
    n_base = model.num_params()
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=ALL)
    # step 0 equals the base model exactly: B is zero
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
    # A like nn.Linear (Kaiming-uniform a=sqrt(5): bound 1/sqrt(in)), B zero
    a = model.layers[0].feed_forward.w2.lora_A.weight  # (r, hidden)
    assert a.shape == (4, model.args.ffn_hidden_dim) and a.dtype == torch.float32
    assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0.4 / math.sqrt(a.shape[1])
    assert not model.layers[0].attention.wq.lora_B.weight.any()
    h = model.args.ffn_hidden_dim  # per layer q, k, v, o (k, v: 2 kv heads of 16), w1, w3, w2; then output
    expect = 2 * 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + 3 * (64 + h)) + 4 * (64 + 96)
    assert num_lora_params(model) == expect and model.num_params() == n_base + expect
    _randomize_b(model)
    _loss(model(tokens), tokens).backward()
    for k, p in model.named_parameters():
        if ".lora_" in k:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, k
        else:
            assert not p.requires_grad and p.grad is None, k


def test_adapter_forward_by_hand():
    # one projection, hand-computed: W x + (alpha / r) B A x
    model = _base()
    apply_lora(model, r=2, alpha=6, dropout=0.0, targets="wv")
    wv = model.layers[1].attention.wv
    _randomize_b(model)
    x = torch.randn(3, 64)
    expect = x @ wv.weight.T + 3.0 * (x @ wv.lora_A.weight.T @ wv.lora_B.weight.T)
    torch.testing.assert_close(wv(x), expect, atol=1e-6, rtol=1e-6)
    # dropout acts on the adapter's input only, in training mode
    wv.lora_dropout = 0.5
    wv.train()
    torch.manual_seed(3)
    got = wv(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, x @ wv.weight.T + 3.0 * (dropped @ wv.lora_A.weight.T @ wv.lora_B.weight.T),
                               atol=1e-6, rtol=1e-6)
    wv.eval()
    torch.testing.assert_close(wv(x), expect, atol=1e-6, rtol=1e-6)


def test_merge_equals_unmerged_and_gives_plain_keys():
    model = _base()
    base_keys = list(model.state_dict())
    apply_lora(model, r=4, alpha=8, dropout=0.05, targets=ALL)
    _randomize_b(model)
    model.eval()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        unmerged = model(tokens)
    merge_lora(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("wq", "w2", "output")))
    assert list(model.state_dict()) == base_keys
    fresh = Transformer(model.args)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), unmerged, atol=1e-5, rtol=1e-5)


def test_merged_state_dict_and_adapters_from_weights():
    """merged_state_dict (the export's merge, the model untouched) equals merge_lora's weights;
    apply_lora_weights rebuilds the same model from the adapter tensors (rank from their shapes,
    scaling alpha / r, or alpha / sqrt(r) with rslora, by hand)."""
    model = apply_lora(_base(), r=4, alpha=8, dropout=0.0, targets=("wq", "w2", "output"))
    _randomize_b(model)
    merged = merged_state_dict(model.state_dict(), lora_config(model)["scaling"])
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = model(tokens)
    assert ".lora_" not in "".join(merged) and ".lora_A.weight" in "".join(model.state_dict())
    merge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-6)
    again = apply_lora_weights(_base(), adapters, {k.rsplit(".", 2)[0]: 8.0 for k in adapters})
    assert lora_config(again) == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "w2", "output"],
                                  "scaling": 2.0}
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), want, atol=1e-5, rtol=1e-5)
    rs = apply_lora_weights(_base(), adapters, {k.rsplit(".", 2)[0]: 8.0 for k in adapters}, rslora=True)
    assert rs.output.lora_scaling == 4.0  # 8 / sqrt(4)
    with pytest.raises(ValueError, match=r"adapter weights for 'layers.7.attention.wq', which is not a module"):
        apply_lora_weights(_base(), {"layers.7.attention.wq.lora_A.weight": torch.zeros(4, 64),
                                     "layers.7.attention.wq.lora_B.weight": torch.zeros(64, 4)},
                           {"layers.7.attention.wq": 8.0})
    with pytest.raises(ValueError, match=r"layers.0.attention.wq has only \['lora_A'\]"):
        apply_lora_weights(_base(), {"layers.0.attention.wq.lora_A.weight": torch.zeros(4, 64)},
                           {"layers.0.attention.wq": 8.0})


def test_state_dicts_and_strict_base_loading():
    model = _base()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, targets=("wq", "wv"))
    assert model.layers[0].attention.wq.weight.data_ptr() != 0 and "layers.0.attention.wq.weight" in model.state_dict()
    lsd = lora_state_dict(model)
    assert sorted(lsd) == sorted(f"layers.{i}.attention.{w}.{ab}.weight" for i in range(2) for w in ("wq", "wv")
                                 for ab in ("lora_A", "lora_B"))
    assert lora_config(model) == {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["wq", "wv"], "scaling": 2.0}
    other = _base(seed=7).state_dict()
    load_base_state_dict(model, other)  # strict on base keys, adapters untouched
    assert torch.equal(model.layers[0].attention.wq.weight, other["layers.0.attention.wq.weight"])
    assert torch.equal(model.layers[0].attention.wq.lora_A.weight, lsd["layers.0.attention.wq.lora_A.weight"])
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\]"):
        load_base_state_dict(model, {k: v for k, v in base_sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="unexpected keys.*rope.freqs"):
        load_base_state_dict(model, {**base_sd, "rope.freqs": torch.zeros(8)})
    # a full checkpoint (base + adapters) loads strictly into a fresh LoRA model
    again = apply_lora(_base(seed=3), targets=("wq", "wv"))
    again.load_state_dict(model.state_dict(), strict=True)


def test_bf16_base_with_fp32_adapters():
    ref = _base()
    model = _base().to(torch.bfloat16)
    apply_lora(ref, r=4, alpha=8, dropout=0.0, targets=ALL)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=ALL)
    _randomize_b(ref)
    model.load_state_dict(ref.state_dict())  # copies cast into each parameter's own dtype
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.wq.lora_A.weight.dtype == torch.float32
    tokens = torch.randint(0, 96, (2, 12))
    out = model(tokens)
    assert out.dtype == torch.bfloat16
    _loss(out, tokens).backward()
    g = model.layers[0].attention.wq.lora_B.weight.grad
    assert g.dtype == torch.float32 and g.abs().sum() > 0
    with torch.no_grad():
        assert (out.float() - ref(tokens)).abs().max() < 0.2 * ref(tokens).abs().max()


def test_lora_on_int8_base():
    model = quantize_int8(_base())
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("wq", "w2"))
    wq = model.layers[0].attention.wq
    assert isinstance(wq, Int8Linear) and "layers.0.attention.wq.scales" in model.state_dict()
    _randomize_b(model)
    x = torch.randn(3, 64)
    w = wq.weight.float() * wq.scales[:, None]  # dequantized base, by hand
    expect = x @ w.T + 2.0 * (x @ wq.lora_A.weight.T @ wq.lora_B.weight.T)
    torch.testing.assert_close(wq(x), expect, atol=1e-5, rtol=1e-5)
    tokens = torch.randint(0, 96, (2, 10))
    _loss(model(tokens), tokens).backward()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in k for k in trainable)
    assert all(p.grad is not None for k, p in model.named_parameters() if ".lora_" in k)
    with pytest.raises(ValueError, match="int8 base"):
        merge_lora(model)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(mode):
    """Dropout on: the recomputation must replay the same masks."""
    grads = {}
    for ac in ("none", mode):
        model = apply_lora(_base(), r=4, alpha=8, dropout=0.3, targets=ALL)
        _randomize_b(model)
        apply_ac(model, ac)
        model.train()
        tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(11)
        _loss(model(tokens), tokens).backward()
        grads[ac] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads["none"].keys() == grads[mode].keys() and len(grads["none"]) == 2 * 15
    for k in grads["none"]:
        torch.testing.assert_close(grads[mode][k], grads["none"][k], atol=1e-6, rtol=1e-5)


def test_bad_input():
    model = _base()
    with pytest.raises(ValueError, match=r"unknown LoRA target.*'wx'.*choose from \['wq'"):
        apply_lora(model, targets=("wq", "wx"))
    with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
        apply_lora(model, r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        apply_lora(model, dropout=1.0)
    apply_lora(model, targets="wq")
    with pytest.raises(ValueError, match="layers.0.attention.wq already has a LoRA adapter"):
        apply_lora(model, targets="wq,wv")


@pytest.mark.slow
def test_tp2_and_fsdp2_match_one_process(tmp_path):
    """tp=2 (apply_tp then apply_lora, with and without activation checkpointing) and FSDP2 dp=2
    (bf16 base + fp32 adapters too): logits, loss and the gradients of every lora_A / lora_B equal
    one process's; the tp=2 adapters gathered equal the one-process ones; merge_lora
    under tp=2 gives the one-process merged weights."""
    model = _base()
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=ALL)
    _randomize_b(model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torchrun("tests.workers.lora", 2, tmp_path, timeout=300)
    res = torch.load(tmp_path / "res.pt", weights_only=True)

    tokens = res["tokens"]
    # adapters sharded like their base (column-wise wq: B on dim 0; row-wise wo: A on dim 1), so the
    # forward needs no collective beyond the base model's
    assert res["placements"] == {
        "layers.0.attention.wq.weight": "(Shard(dim=0),)", "layers.0.attention.wq.lora_A.weight": "(Replicate(),)",
        "layers.0.attention.wq.lora_B.weight": "(Shard(dim=0),)", "layers.0.attention.wo.weight": "(Shard(dim=1),)",
        "layers.0.attention.wo.lora_A.weight": "(Shard(dim=1),)", "layers.0.attention.wo.lora_B.weight": "(Replicate(),)"}
    assert res["comms_lora"] == res["comms_base"] > 0
    logits = model(tokens)
    loss = _loss(logits, tokens)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 30
    for layout in ("tp2", "tp2_ac", "dp2"):
        torch.testing.assert_close(res[layout]["logits"], logits.detach(), atol=1e-5, rtol=1e-5)
        assert res[layout]["loss"] == pytest.approx(loss.item(), abs=1e-6), layout
        assert res[layout]["grads"].keys() == grads.keys(), layout
        for k in grads:
            torch.testing.assert_close(res[layout]["grads"][k], grads[k], atol=1e-5, rtol=1e-4, msg=f"{layout} {k}")
    # bf16 base under FSDP against bf16 base in one process
    ref16 = _base().to(torch.bfloat16)
    apply_lora(ref16, r=4, alpha=8, dropout=0.0, targets=ALL)
    ref16.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    loss16 = _loss(ref16(tokens), tokens)
    loss16.backward()
    assert res["dp2_bf16"]["loss"] == pytest.approx(loss16.item(), abs=1e-3)
    for k, p in ref16.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(res["dp2_bf16"]["grads"][k], p.grad, atol=2e-3, rtol=2e-2)
    # the adapter written from tp=2 equals the one written here
    ours = lora_state_dict(model)
    assert res["tp2_adapters"].keys() == ours.keys() and all(torch.equal(res["tp2_adapters"][k], ours[k]) for k in ours)
    merged = merge_lora(model).state_dict()
    for k, v in res["tp2_merged"].items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5)


def test_training_moves_only_the_adapters():
    """AdamW with weight decay on the whole model's parameters: the frozen base stays bit-identical,
    the adapters learn (the loss on a fixed batch falls)."""
    model = apply_lora(_base(), r=4, alpha=8, dropout=0.0, targets=ALL)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = _loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
