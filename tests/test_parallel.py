"""llama.parallel: activation checkpointing (same gradients as the plain model, Meta's keys, real recomputation), the TP plan, per-block compile.

The 2-rank check is tests/workers/parallel.py."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama.model import ModelArgs, Transformer
from llama.parallel import AC_MODES, ac_mode, apply_ac
from tests.conftest import torchrun

ARGS = dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)


def _model_and_batch(seed=0, batch=4, seqlen=16):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS))
    tokens = torch.randint(0, ARGS["vocab_size"], (batch, seqlen + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def _loss(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class _Recorder(TorchDispatchMode):
    """Counts aten ops and keeps weak references to their outputs."""

    def __init__(self):
        super().__init__()
        self.counts, self.outputs = {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.counts[func] = self.counts.get(func, 0) + 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append(weakref.ref(t))
        return out

    def alive_bytes(self):
        """Bytes of distinct storages among the recorded outputs still alive (held for backward)."""
        storages = {}
        for ref in self.outputs:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


@pytest.mark.parametrize("mode", AC_MODES)
def test_gradients_match_plain_model(mode):
    model, inputs, targets = _model_and_batch()
    ref = copy.deepcopy(model)
    _loss(ref, inputs, targets).backward()
    apply_ac(model, mode)
    assert ac_mode(model) == mode
    loss = _loss(model, inputs, targets)
    loss.backward()
    assert torch.allclose(loss, _loss(ref, inputs, targets))
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_keys_stay_meta_and_load_strict():
    model, inputs, _ = _model_and_batch()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("full", "selective"):
        apply_ac(model, mode)
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == names
        assert "layers.0.attention.wq.weight" in keys
    # a checkpoint with Meta's keys loads strictly into a checkpointed model built on the meta device
    with torch.device("meta"):
        fresh = Transformer(ModelArgs(**ARGS))
    apply_ac(fresh, "selective")
    fresh.load_state_dict(sd, strict=True, assign=True)
    fresh.init_buffers("cpu")
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs), model(inputs), rtol=0, atol=0)
    assert ac_mode(apply_ac(fresh, "none")) == "none"


def test_bad_mode_is_one_clear_error():
    model, _, _ = _model_and_batch()
    with pytest.raises(ValueError, match="choose one of"):
        apply_ac(model, "some")


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
def test_modes_really_recompute_and_save_what_they_claim(backend):
    """Forward: bytes held for backward, none > selective > full. Backward: full recomputes the
    matmuls and the attention kernel, selective only the elementwise work (SiLU), none nothing."""
    base, inputs, targets = _model_and_batch()
    base.set_attention_backend(backend)
    kernel = {"sdpa": torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              "blocked": torch.ops.llama.blocked_causal_attention.default}[backend]
    n_layers = ARGS["n_layers"]
    held, mm, silu, att = {}, {}, {}, {}
    for mode in AC_MODES:
        model = apply_ac(copy.deepcopy(base), mode)
        fwd = _Recorder()
        with fwd:
            loss = _loss(model, inputs, targets)
        held[mode] = fwd.alive_bytes()
        bwd = _Recorder()
        with bwd:
            loss.backward()
        mm[mode] = bwd.counts.get(torch.ops.aten.mm.default, 0)
        silu[mode] = bwd.counts.get(torch.ops.aten.silu.default, 0)
        att[mode] = bwd.counts.get(kernel, 0)
    assert held["none"] > held["selective"] > held["full"], held
    assert att == {"none": 0, "full": n_layers, "selective": 0}, att
    # none: backward runs 2 matmuls per linear (input and weight gradients) and no forward op
    assert mm["none"] == 2 * (7 * n_layers + 1) and silu["none"] == 0, (mm, silu)
    # full: recomputes each block up to its last saved tensor (q, k, v, wo, w1, w3; not w2)
    assert mm["full"] == mm["none"] + 6 * n_layers and silu["full"] == n_layers, (mm, silu)
    # selective: the matmul outputs come from the forward, the SiLU is recomputed
    assert mm["selective"] == mm["none"] and silu["selective"] == n_layers, (mm, silu)


def test_no_grad_runs_plain_blocks():
    model, inputs, _ = _model_and_batch()
    with torch.no_grad():
        want = model(inputs)
        apply_ac(model, "selective")
        torch.testing.assert_close(model(inputs), want, rtol=0, atol=0)


@pytest.mark.slow
def test_ac_with_tp_and_fsdp():
    """2 ranks (gloo): TP=2 + selective and FSDP2 dp=2 + full give the 1-rank plain gradients."""
    proc = torchrun("tests.workers.parallel", 2, timeout=180)
    assert proc.stdout.count("WORKER OK") == 2, proc.stdout[-3000:]
