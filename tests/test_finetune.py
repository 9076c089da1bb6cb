"""llama.train.finetune through the Trainer: init_from a 2-shard Meta checkpoint, a transformers
folder and a training checkpoint give the step-0 loss of the model loaded directly (the masked loss
computed by hand); a LoRA run moves only the adapters, resumes exactly, checkpoints only the
adapters and exports the merged model (= W + alpha / r B A by hand) with its PEFT adapter, which
transformers + peft load to the same greedy completions as ours; LoRA and full fine-tuning on dp=2
and tp=2 equal one rank (tests/workers/finetune.py); every bad setting's message."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from llama.chat import LLAMA2_CHAT_TEMPLATE, encode_chat, format_dialog
from llama.formats.gguf import gguf_to_meta, load_tokenizer, meta_to_gguf, save_gguf
from llama.formats.hf import hf_to_meta, save_hf
from llama.formats.meta import load_consolidated, load_model, reshard
from llama.inference import Llama
from llama.lora import is_lora_key
from llama.train import TrainConfig, Trainer, export_checkpoint
from llama.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer
from llama.train.finetune import PEFT_DIR, load_peft_adapter
from tests.conftest import torchrun
from tests.helpers import make_checkpoint, make_pattern_loader, randomize_lora_b

WORDS = "the of and to in is that for it as was with be by on not he this are or his from at model data value".split()


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Short instructions whose answers follow a rule (repeat the last word twice): learnable fast."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        rec = {"instruction": "Repeat the last word: " + " ".join(words), "output": f"{words[-1]} {words[-1]}"}
        if i % 3 == 0:
            rec["input"] = "twice"
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    """The tiny model as a 2-shard Meta checkpoint (with its tokenizer), a transformers folder, and
    an Alpaca JSONL file."""
    root = tmp_path_factory.mktemp("finetune")
    model = make_checkpoint(root / "meta2", tiny_tokenizer.model_path, num_shards=2)
    save_hf(model.state_dict(), model.args, root / "hf", dtype=torch.float32, tokenizer_path=tiny_tokenizer.model_path)
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(48)))
    return {"meta": root / "meta2", "hf": root / "hf", "data": data, "model": model,
            "tokenizer": str(tiny_tokenizer.model_path)}


def ft_cfg(base, out, **kw):
    d = dict(init_from=str(base["meta"]), data=str(base["data"]), data_format="alpaca", val_fraction=0.25,
             out_dir=str(out), steps=4, warmup_steps=1, lr=3e-3, seq_len=192, global_batch_tokens=4 * 192,
             micro_batch_size=2, dtype="fp32", eval_every=0, eval_batches=4, ckpt_every=100, peak_flops=1e12,
             progress=False, tensorboard=False, resume="auto", weight_decay=0.0)
    d.update(kw)
    return TrainConfig.from_dict(d)


def masked_loss_by_hand(model, examples) -> float:
    """Sum of -log p(target) over the examples' target tokens / their number, one example at a time."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor(e.ids, dtype=torch.long)
            logp = model(ids[None, :-1])[0].double().log_softmax(-1)  # (T, vocab)
            mask = torch.tensor(e.mask[1:])
            total -= logp[torch.arange(len(ids) - 1), ids[1:]][mask].sum().item()
            n += int(mask.sum())
    return total / n


def test_init_from_any_checkpoint_gives_the_loaded_models_loss(base, tmp_path):
    direct = load_model(base["meta"], dtype=torch.float32)
    trainer = Trainer(ft_cfg(base, tmp_path / "meta"))
    val = trainer.make_loader.data.val
    want = masked_loss_by_hand(direct, val)
    assert trainer.evaluate(100)["val_loss"] == pytest.approx(want, rel=1e-5)
    assert trainer.cfg.tokenizer == str(base["meta"] / "tokenizer.model")  # found next to the weights
    # the transformers folder, and LoRA at step 0 (B = 0) on the same base
    assert Trainer(ft_cfg(base, tmp_path / "hf", init_from=str(base["hf"]))).evaluate(100)["val_loss"] == \
        pytest.approx(want, rel=1e-5)
    # llama.cpp's format: weights and vocabulary from one .gguf file (f32: the same numbers)
    save_gguf(base["model"], base["model"].args, Tokenizer(base["tokenizer"]), tmp_path / "m.gguf", dtype="f32")
    from_gguf = Trainer(ft_cfg(base, tmp_path / "gguf", init_from=str(tmp_path / "m.gguf")))
    assert from_gguf.evaluate(100)["val_loss"] == pytest.approx(want, rel=1e-5)
    assert from_gguf.cfg.tokenizer == str(tmp_path / "m.gguf")
    lora = Trainer(ft_cfg(base, tmp_path / "lora", lora={"r": 4}))
    assert lora.evaluate(100)["val_loss"] == pytest.approx(want, rel=1e-5)
    # a full fine-tuning run's checkpoint (by its run dir: the latest) continues from its weights
    run = ft_cfg(base, tmp_path / "full", steps=2, ckpt_every=2)
    trained = Trainer(run)
    trained.fit()
    again = Trainer(ft_cfg(base, tmp_path / "from_ckpt", init_from=str(tmp_path / "full")))
    for (k, p), q in zip(trained.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), k
    # continued pretraining on token data starts from the checkpoint too
    cont = Trainer(ft_cfg(base, tmp_path / "tokens", data=str(base["data"].parent), data_format="tokens",
                          val_fraction=0.0), make_loader=make_pattern_loader)
    # evaluate(1) scores one global batch: grad_accum micro-batches of the validation stream
    batches = list(make_pattern_loader(cont.cfg, "val", 0, 1, cont.cfg.seed).iter_eval(cont.grad_accum))
    with torch.no_grad():
        ref = sum(F.cross_entropy(direct(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                  for x, y in batches) / sum(y.numel() for _, y in batches)
    assert cont.evaluate(1)["val_loss"] == pytest.approx(ref, rel=1e-5)


def _dcp_keys(ckpt: Path) -> list[str]:
    return list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def test_lora_run_resumes_exactly_and_exports(base, tmp_path):
    cfg = dict(lora={"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["wq", "wv", "w2"]}, steps=6, ckpt_every=3,
               export_dir=str(tmp_path / "export"), export_hf=str(tmp_path / "export_hf"), eval_every=3)
    straight = Trainer(ft_cfg(base, tmp_path / "a", **cfg))
    initial = {k: v.clone() for k, v in straight.model.state_dict().items()}
    full = straight.fit()
    losses = [r["loss"] for r in full["history"]]
    assert losses[-1] < losses[0] and full["val_loss"] is not None
    assert all(0 <= r["padding"] < 1 for r in full["history"])
    # the frozen base did not move; the adapters did
    sd = straight.model.state_dict()
    for k, v in initial.items():
        if not is_lora_key(k):
            assert torch.equal(sd[k], v), k
    assert not torch.equal(sd["layers.0.attention.wq.lora_B.weight"], initial["layers.0.attention.wq.lora_B.weight"])
    # checkpoints hold the adapters (and their optimizer state), not the base
    keys = _dcp_keys(Path(full["checkpoint"]))
    assert any("lora_B" in k for k in keys) and not any(k == "model.output.weight" for k in keys)
    assert not any(k.startswith("model.") and not is_lora_key(k) for k in keys)

    class Stop(Exception):
        pass

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise Stop
    with pytest.raises(Stop):
        Trainer(ft_cfg(base, tmp_path / "b", **{**cfg, "export_dir": None, "export_hf": None})).fit(stop_at_3)
    resumed = Trainer(ft_cfg(base, tmp_path / "b", **{**cfg, "export_dir": None, "export_hf": None}))
    assert resumed.step == 3
    rest = resumed.fit()
    assert [r["loss"] for r in rest["history"]] == losses[3:]  # bit for bit
    assert rest["val_loss"] == full["val_loss"]

    # the export: merged weights = W + (alpha / r) B A by hand, in Meta's layout and transformers'
    merged = load_consolidated(tmp_path / "export")
    for name in ("layers.1.attention.wq", "layers.0.feed_forward.w2", "layers.0.attention.wk"):
        w = sd[name + ".weight"]
        if name + ".lora_A.weight" in sd:
            w = w + 2.0 * sd[name + ".lora_B.weight"] @ sd[name + ".lora_A.weight"]
        torch.testing.assert_close(merged[name + ".weight"].float(), w, atol=2e-3, rtol=2e-3)
    assert (tmp_path / "export_hf" / "config.json").is_file()
    assert json.loads((tmp_path / "export" / PEFT_DIR / "adapter_config.json").read_text())["target_modules"] == \
        ["q_proj", "v_proj", "down_proj"]


def test_exported_peft_adapter_gives_our_greedy_completions_in_transformers(base, tmp_path):
    """transformers' LlamaForCausalLM from the base's transformers folder + peft's PeftModel from the
    adapter the run exported: greedy completions equal ours (the base + the same adapter, and the
    merged export)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    export = tmp_path / "export"
    Trainer(ft_cfg(base, tmp_path / "run", lora={"r": 4, "alpha": 16, "dropout": 0.0, "targets": ["wq", "wk", "wv"]},
                   steps=6, lr=1e-2, export_dir=str(export))).fit()
    prompts = ["Repeat the last word: the model", "Repeat the last word: of data value", "the"]
    ours = Llama.build(str(base["meta"]), base["tokenizer"], 256, 3, dtype="float32", decoder="eager")
    base_out = [ours.tokenizer.decode(t) for t in
                ours.generate([ours.tokenizer.encode(p, True, False) for p in prompts], 12, temperature=0)[0]]
    load_peft_adapter(ours.model, export / PEFT_DIR)
    ids = [ours.tokenizer.encode(p, True, False) for p in prompts]
    mine = ours.generate(ids, 12, temperature=0)[0]
    hf = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base["hf"], torch_dtype=torch.float32),
                                        export / PEFT_DIR).eval()
    theirs = []
    for x in ids:
        with torch.no_grad():
            y = hf.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long), do_sample=False,
                            max_new_tokens=12, eos_token_id=2, pad_token_id=2)[0, len(x):].tolist()
        theirs.append(y[:y.index(2)] if 2 in y else y)
    assert mine == theirs
    assert [ours.tokenizer.decode(t) for t in mine] != base_out, "the adapter must change the completions"
    merged = Llama.build(str(export), base["tokenizer"], 256, 3, dtype="float32", decoder="eager")
    assert merged.generate(ids, 12, temperature=0)[0] == mine


def test_bad_settings_say_what_is_wrong(base, tmp_path):
    with pytest.raises(ValueError, match=r"unknown lora key\(s\) \['rank'\]; valid keys are"):
        ft_cfg(base, tmp_path, lora={"rank": 4})
    with pytest.raises(ValueError, match=r"lora.targets \['wz'\] must be a non-empty list of \['wq'"):
        ft_cfg(base, tmp_path, lora={"targets": "wq wz"})
    with pytest.raises(ValueError, match="base_dtype='bf16': the frozen base of a LoRA run"):
        ft_cfg(base, tmp_path, base_dtype="bf16")
    with pytest.raises(ValueError, match="data_format='jsonl' is not one of"):
        ft_cfg(base, tmp_path, data_format="jsonl")
    with pytest.raises(FileNotFoundError, match="init_from .*nowhere does not exist"):
        Trainer(ft_cfg(base, tmp_path, init_from=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no params.json \(Meta layout\), config.json"):
        Trainer(ft_cfg(base, tmp_path, init_from=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="model.n_layers cannot be overridden"):
        Trainer(ft_cfg(base, tmp_path, **{"model.n_layers": 3}))
    with pytest.raises(ValueError, match="data_format alpaca needs a tokenizer"):
        Trainer(ft_cfg(base, tmp_path, init_from=None, model="tiny"))
    with pytest.raises(ValueError, match="no held-out examples .* set val_fraction > 0"):
        Trainer(ft_cfg(base, tmp_path, val_fraction=0.0))
    with pytest.raises(ValueError, match="val_fraction 0.001 held out none of the 48 records of .*: raise val_fraction"):
        Trainer(ft_cfg(base, tmp_path, val_fraction=0.001))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: an Alpaca record needs .*'output' is missing"):
        Trainer(ft_cfg(base, tmp_path, data=str(_bad_file(tmp_path))))
    with pytest.raises(ValueError, match=r"alpaca.jsonl:1: \"messages\": a dialog must be a non-empty list"):
        Trainer(ft_cfg(base, tmp_path, data_format="chat"))
    # a LoRA run's checkpoint holds no base: not a starting point, and not resumable as full fine-tuning
    Trainer(ft_cfg(base, tmp_path / "lora", lora={"r": 2}, steps=1, ckpt_every=1)).fit()
    with pytest.raises(ValueError, match="is a checkpoint of a LoRA run"):
        Trainer(ft_cfg(base, tmp_path / "x", init_from=str(tmp_path / "lora")))
    with pytest.raises(ValueError, match=r"from another kind of run \(lora \{.*\} != None\)"):
        Trainer(ft_cfg(base, tmp_path / "lora", steps=2))


def test_validation_loss_is_scored_without_dropout(base, tmp_path):
    """evaluate() runs the model in eval mode (and puts training mode back): with LoRA dropout 0.5 the
    validation loss is the same at every call, and equals the same adapters' loss without dropout."""
    trainer = Trainer(ft_cfg(base, tmp_path, lora={"r": 4, "dropout": 0.5}))
    randomize_lora_b(trainer.model)  # a fresh B is zero: dropout on A's input would change nothing
    scores = [trainer.evaluate(2)["val_loss"] for _ in range(3)]
    assert scores[0] == scores[1] == scores[2] and trainer.model.training
    for m in trainer.model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = 0.0
    assert trainer.evaluate(2)["val_loss"] == scores[0]


def test_a_step_counts_the_positions_it_computed(base, tmp_path, capsys):
    """Instruction batches are cut to their longest example: tokens, tokens/s and MFU count those
    positions, not rows x seq_len; the run's first lines say how much data there is and how many
    epochs the steps make."""
    trainer = Trainer(ft_cfg(base, tmp_path))
    loader = trainer.make_loader(trainer.cfg, "train", 0, 1, trainer.cfg.seed)
    want = sum(loader.next()[0].numel() for _ in range(trainer.grad_accum))
    trainer.train_step()
    assert trainer.step_tokens == trainer.tokens_seen == want < trainer.cfg.global_batch_tokens
    out = trainer.fit()
    rec = out["history"][-1]
    assert rec["tokens"] == trainer.tokens_seen < 4 * trainer.cfg.global_batch_tokens
    n_train = len(trainer.make_loader.data.train)
    assert f"48 records -> {n_train} train" in capsys.readouterr().out
    assert f"4 steps x 4 examples = {16 / n_train:.2f} epochs" in trainer.make_loader.describe(trainer.cfg)


def test_exports_never_overwrite_a_model_they_did_not_write(base, tmp_path):
    """export_dir / export_hf may not be init_from, nor a folder holding anything this run did not
    export; both are refused before any training. A run exports to its own folder again."""
    with pytest.raises(ValueError, match="export_dir .*meta2 is init_from: the export would overwrite the model"):
        Trainer(ft_cfg(base, tmp_path / "a", export_dir=str(base["meta"])))
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "params.json").write_text("{}")
    for key in ("export_dir", "export_hf"):
        with pytest.raises(FileExistsError, match=f"{key} .*keep already holds files that this run .* did not"):
            Trainer(ft_cfg(base, tmp_path / "a", **{"export_dir": str(tmp_path / "e"), key: str(keep)}))
    assert (keep / "params.json").read_text() == "{}" and not (tmp_path / "a").exists()
    run = ft_cfg(base, tmp_path / "b", steps=1, ckpt_every=1, export_dir=str(tmp_path / "e"))
    Trainer(run).fit()
    Trainer(run).fit()  # the same command again: resumes at its last step and exports again
    assert json.loads((tmp_path / "e" / "export.json").read_text()) == {"run": str((tmp_path / "b").resolve()),
                                                                      "step": 1}
    assert not (tmp_path / "e" / "chat_template.jinja").exists()  # not a chat run, and the base has none
    # an export from before export.json existed: the run's saved config names the folder
    (tmp_path / "e" / "export.json").unlink()
    Trainer(run).fit()
    assert (tmp_path / "e" / "export.json").is_file()


def test_a_chat_fine_tune_carries_its_chat_format_to_every_export(base, tmp_path):
    """After chat data (Llama 2's format), the exports carry that format as a chat template: beside
    tokenizer.model (read back with it), in the GGUF file, and in transformers' tokenizer_config.json.
    Rendered by our encode_chat and by llama-cpp-python's Jinja formatter with llama.cpp's own
    tokenizer, it gives format_dialog's ids."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in alpaca_records(24)))
    Trainer(ft_cfg(base, tmp_path / "run", data=str(data), data_format="chat", steps=1, eval_batches=0,
                   val_fraction=0.0, export_dir=str(tmp_path / "meta"), export_hf=str(tmp_path / "hf"))).fit()
    assert (tmp_path / "meta" / CHAT_TEMPLATE_FILE).read_text() == LLAMA2_CHAT_TEMPLATE
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == LLAMA2_CHAT_TEMPLATE
    tok = Tokenizer(tmp_path / "meta" / "tokenizer.model")
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    meta_to_gguf(tmp_path / "meta", tmp_path / "m.gguf", dtype="f32", progress=False)
    assert load_tokenizer(tmp_path / "m.gguf").chat_template == LLAMA2_CHAT_TEMPLATE
    dialogs = [[{"role": "user", "content": " the model "}],
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it\n"},
                {"role": "assistant", "content": " data "}, {"role": "user", "content": "and this"}]]
    for dialog in dialogs:
        # the template itself, rendered, gives Llama 2's ids (encode_dialog writes this format directly)
        assert encode_chat(tok, dialog) == format_dialog(Tokenizer(base["tokenizer"]), dialog)
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    for dialog in dialogs:
        prompt = formatter(messages=dialog).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == format_dialog(tok, dialog)


def test_the_chat_template_survives_every_conversion(base, tmp_path):
    """A chat model's template goes through reshard, transformers -> Meta, a transformers folder run
    as it is, and export.py from the run's checkpoint; a GGUF -> Meta conversion over an old folder
    does not leave that folder's template behind."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in alpaca_records(12)))
    out = Trainer(ft_cfg(base, tmp_path / "run", data=str(data), data_format="chat", steps=1, eval_batches=0,
                         val_fraction=0.0, ckpt_every=1, export_dir=str(tmp_path / "meta"),
                         export_hf=str(tmp_path / "hf"))).fit()
    reshard(tmp_path / "meta", tmp_path / "rs", 2)
    hf_to_meta(tmp_path / "hf", tmp_path / "from_hf", dtype=torch.float32)
    export_checkpoint(out["checkpoint"], tmp_path / "exported")
    for folder in ("rs", "from_hf", "exported"):
        assert Tokenizer(tmp_path / folder / "tokenizer.model").chat_template == LLAMA2_CHAT_TEMPLATE, folder
    assert Llama.build(str(tmp_path / "hf"), None, 64, 1, dtype="float32").tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    save_gguf(base["model"], base["model"].args, Tokenizer(base["tokenizer"]), tmp_path / "plain.gguf", dtype="f32")
    gguf_to_meta(tmp_path / "plain.gguf", tmp_path / "rs", dtype="fp32", overwrite=True, progress=False)
    assert not (tmp_path / "rs" / CHAT_TEMPLATE_FILE).exists()
    assert Tokenizer(tmp_path / "rs" / "tokenizer.model").chat_template is None


def _bad_file(tmp_path) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    return p


@pytest.mark.slow
def test_dp2_and_tp2_equal_one_rank(base, tmp_path):
    """LoRA (fp32 adapters on an fp32 base, no dropout) and full fine-tuning from the 2-shard
    checkpoint on Alpaca data: dp=2 and tp=2 step losses and validation loss equal one rank's."""
    settings = {"lora": dict(lora={"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wv", "wo", "w2"]}),
                "full": {}}
    common = dict(steps=3, eval_batches=100)  # every held-out example, whatever the layout
    work = tmp_path / "work"
    work.mkdir()
    (work / "base.json").write_text(json.dumps({k: v for k, v in ft_cfg(base, work, **common).to_dict().items()}))
    torchrun("tests.workers.finetune", 2, work, timeout=300)
    res = json.loads((work / "res.json").read_text())
    for name, kw in settings.items():
        one = Trainer(ft_cfg(base, tmp_path / name, **common, **kw)).fit()
        want = [r["loss"] for r in one["history"]]
        assert want[-1] < want[0], name
        for layout in ("dp2", "tp2"):
            got = res[f"{name}_{layout}"]
            assert got["losses"] == pytest.approx(want, abs=2e-5), (name, layout)
            assert got["val_loss"] == pytest.approx(one["val_loss"], abs=2e-5), (name, layout)
