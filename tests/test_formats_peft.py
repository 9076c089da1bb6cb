"""llama.formats.peft (and llama.train.finetune.load_peft_adapter, which joins it to llama.lora)
against transformers + peft holding the same base and adapter weights, both directions (ours ->
peft, peft -> ours) with GQA so the k permutation is exercised; bad adapters."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama.formats.hf import hf_config, permute_from_hf, to_hf  # noqa: E402
from llama.formats.peft import peft_module_name, peft_target, save_peft_adapter  # noqa: E402
from llama.lora import LoRALinear, apply_lora, is_lora_key, lora_config, lora_state_dict  # noqa: E402
from llama.train.finetune import load_peft_adapter  # noqa: E402
from tests.helpers import LORA_TARGETS as ALL  # noqa: E402
from tests.helpers import lora_base_model as _base  # noqa: E402
from tests.helpers import randomize_lora_b as _randomize_b  # noqa: E402

HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _hf_base(model) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.args, torch.float32)))
    sd = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    hf.load_state_dict(to_hf(sd, model.args), strict=True)
    return hf.eval()


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def save_adapter(model, out_dir):
    return save_peft_adapter(lora_state_dict(model), lora_config(model), model.args, out_dir)


def test_names_come_from_the_weights_table():
    assert [peft_target(t) for t in ALL] == HF_NAMES[:4] + ["gate_proj", "down_proj", "up_proj", "lm_head"]
    assert peft_module_name("layers.3.feed_forward.w2") == "model.layers.3.mlp.down_proj"
    assert peft_module_name("output") == "lm_head"


def test_ours_written_adapter_matches_peft(tmp_path):
    """Our adapter, written in PEFT's format, loaded by peft on the converted base: same logits and
    the same gradients of every lora_A / lora_B (q/k lora_B permuted back)."""
    model = _base()
    hf = _hf_base(model)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=ALL)
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(HF_NAMES)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    tokens = torch.randint(0, 96, (2, 16))
    ours, theirs = model(tokens), pm(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-5 and ours.abs().max() > 1.0
    _loss(ours, tokens).backward()
    _loss(theirs, tokens).backward()
    theirs_grads = {k: p.grad for k, p in pm.named_parameters() if "lora_" in k}
    assert len(theirs_grads) == 2 * (7 * 2 + 1)
    for k, p in model.named_parameters():
        if ".lora_" not in k:
            continue
        name, kind = k.rsplit(".", 2)[:2]
        hk = f"base_model.model.{peft_module_name(name)}.{kind}.default.weight"
        g = theirs_grads[hk]
        if kind == "lora_B" and name.endswith(("wq", "wk")):
            g = permute_from_hf(g, 4 if name.endswith("wq") else 2)
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_peft_written_adapter_loads_here(tmp_path):
    """An adapter made and saved by peft (random nonzero lora_B, rsLoRA off, alpha_pattern on one
    module) applies to our model: same logits as peft's."""
    model = _base(seed=1)
    hf = _hf_base(model)
    lcfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj", "lm_head"],
                           alpha_pattern={"down_proj": 4}, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lcfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.normal_(0.0, 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        theirs = pm(tokens).logits
        base_logits = model(tokens)
    load_peft_adapter(model, tmp_path / "adapter")
    assert model.layers[0].feed_forward.w2.lora_scaling == 1.0 and model.layers[0].attention.wq.lora_scaling == 4.0
    assert isinstance(model.layers[1].attention.wk, LoRALinear) and not isinstance(model.layers[1].attention.wv, LoRALinear)
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - base_logits).abs().max() > 0.1  # the adapter did something


def test_bad_peft_adapters(tmp_path):
    model = apply_lora(_base(), r=4, targets=("wq",))
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_peft_adapter(_base(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(_base(), tmp_path)
    # an adapter for a deeper model: layer 5 does not exist here
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight' "
                                         "does not belong"):
        load_peft_adapter(_base(), tmp_path / "a")


def test_an_adapter_save_failing_halfway_keeps_the_old_adapter(tmp_path):
    """Saving a second adapter over the first fails after its weights were written (its description
    is one PEFT cannot express: a scaling that is neither alpha / r nor alpha / sqrt(r)): peft still
    loads the first adapter whole, same logits as before, not the new weights under the old config."""
    model = _base()
    hf = _hf_base(model)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=ALL)
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter")
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        first = model(tokens)
        for k, p in model.named_parameters():
            if ".lora_B" in k:
                p.mul_(-3.0)
    with pytest.raises(ValueError, match="PEFT cannot express"):
        save_peft_adapter(lora_state_dict(model), {**lora_config(model), "alpha": 16}, model.args, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    with torch.no_grad():
        assert (pm(tokens).logits - first).abs().max() <= 1e-5
