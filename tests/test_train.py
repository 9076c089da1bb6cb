"""llama.train: the recipe (each part checked against a hand-written reference step), configs, bad
input, exact resume, atomic checkpoints, NaN guard, export to Meta's layout; and the same runs on
2 ranks (FSDP2 dp=2, TP tp=2) against one process (tests/workers/train.py)."""

import dataclasses
import json
import math
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama.train.checkpoint as train_checkpoint
import llama.train.recipe as recipe
import llama.train.trainer as trainer_module
from llama.data import prepare_data
from llama.eval import evaluate_tasks
from llama.formats.meta import load_consolidated, load_model
from llama.model import ModelArgs, Transformer
from llama.train import (CheckpointManager, TrainConfig, Trainer, export_checkpoint, flops_per_token, lr_at,
                         param_groups, read_checkpoint_meta)
from llama.train.metrics import truncate_metrics
from llama.train.recipe import cross_entropy, linear_cross_entropy
from tests.conftest import GLOO_ABORT, torchrun
from tests.helpers import make_pattern_loader

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path):
    # the synthetic loader ignores it; the trainer only checks that it exists and is not empty
    d = tmp_path / "data"
    d.mkdir()
    (d / "meta.json").write_text("{}")
    return d


def tiny_cfg(tmp_path, data_dir, **kw):
    base = dict(model="tiny", data=str(data_dir), out_dir=str(tmp_path / "run"), steps=6, warmup_steps=2,
                lr=3e-3, seq_len=32, global_batch_tokens=128, micro_batch_size=2, eval_every=0,
                eval_batches=2, ckpt_every=100, peak_flops=1e12, progress=False, resume="auto")
    base.update(kw)
    return TrainConfig.from_dict(base)


def fit(cfg, callback=None):
    return Trainer(cfg, make_loader=make_pattern_loader).fit(callback)


# ---- the recipe ---------------------------------------------------------------------------------


def test_lr_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1)  # stays at the floor past the end
    paper = TrainConfig.from_name("7B")
    assert lr_at(1999, paper) == pytest.approx(3e-4) and lr_at(paper.steps, paper) == pytest.approx(3e-5)


def test_weight_decay_on_matrices_only():
    model = Transformer(ModelArgs.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n in names.values() if n.endswith("norm.weight"))
    assert {"tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight"} <= {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_counts_the_model():
    args = ModelArgs.from_name("tiny", n_kv_heads=2)
    n = Transformer(args).num_params(exclude_embeddings=True)
    assert flops_per_token(args, 128) == 6 * n + 12 * args.n_layers * args.dim * 128
    # the paper's 7B: 6.74e9 parameters, 6.61e9 without the embedding table
    assert flops_per_token(ModelArgs.from_name("7B"), 0) == 6 * (6_738_415_616 - 32000 * 4096)


# ---- configs ------------------------------------------------------------------------------------


def test_configs_load_with_the_papers_numbers():
    for name, lr, tokens in [("7B", 3e-4, 1.0e12), ("13B", 3e-4, 1.0e12), ("33B", 1.5e-4, 1.4e12), ("65B", 1.5e-4, 1.4e12)]:
        c = TrainConfig.from_name(name)
        assert (c.lr, c.global_batch_tokens, c.seq_len, c.warmup_steps) == (lr, 4 * 2**20, 2048, 2000)
        assert (c.beta1, c.beta2, c.weight_decay, c.grad_clip, c.min_lr_ratio) == (0.9, 0.95, 0.1, 1.0, 0.1)
        assert c.steps == math.ceil(tokens / c.global_batch_tokens)
        assert c.model_args().dim == {"7B": 4096, "13B": 5120, "33B": 6656, "65B": 8192}[name]
    for name in ("tiny", "demo"):
        c = TrainConfig.from_name(name)
        assert c.seq_len <= c.model_args().max_seq_len and c.global_batch_tokens % c.seq_len == 0


def test_config_overrides_and_unknown_keys(tmp_path):
    c = TrainConfig.from_name("tiny", lr=1e-3, **{"model.n_layers": 3})
    assert c.lr == 1e-3 and c.model_args().n_layers == 3 and c.model_args().dim == 64
    with pytest.raises(ValueError, match=r"unknown training config key\(s\) \['learning_rate'\]; valid keys are .*'lr'"):
        TrainConfig.from_name("tiny", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"unknown model field\(s\) \['n_layer'\]"):
        TrainConfig.from_name("tiny", **{"model.n_layer": 3}).model_args()
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": 5, "bogus": 1}))
    with pytest.raises(ValueError, match=r"c.json: unknown training config key\(s\) \['bogus'\]"):
        TrainConfig.from_json(p)
    with pytest.raises(ValueError, match="unknown training config 'nope'; the shipped ones are"):
        TrainConfig.from_name("nope")


def test_command_line_strings_become_the_fields_types(tmp_path):
    """fire hands `--compile false` and `--lr 1e-3x` over as strings: booleans, integers and numbers
    are parsed by the field's type (a string "false" would be truthy), and a value that is none is one
    sentence naming the key and whether the file or an override holds it."""
    c = TrainConfig.from_name("tiny", compile="false", progress="No", tensorboard=0, train_on_input="TRUE",
                              steps="12", lr="3e-4", time_budget_s=5, warmup_steps=4.0, **{"model.n_layers": "3"})
    assert (c.compile, c.progress, c.tensorboard, c.train_on_input) == (False, False, False, True)
    assert (c.steps, c.lr, c.time_budget_s, c.warmup_steps) == (12, 3e-4, 5.0, 4)
    assert TrainConfig.from_name("tiny", eval_tasks="a.json,b.json").eval_tasks == ["a.json", "b.json"]
    assert TrainConfig.from_name("tiny", eval_tasks="a.json").eval_tasks == ["a.json"]  # not ['a', '.', ...]
    # JSON's null on a command line; null for a field that has no None; a number for a path
    n = TrainConfig.from_name("alpaca_lora_7B", export_dir="null", lora="None", base_dtype="null", peak_flops="none", out_dir=2024,
                              time_budget_s=None, **{"model.n_kv_heads": "null"})
    assert (n.export_dir, n.lora, n.peak_flops, n.out_dir, n.time_budget_s) == (None, None, None, "2024", 0)
    assert n.model_overrides == {"n_kv_heads": None}
    assert type(c.steps) is int and type(c.lr) is float and c.model_args().n_layers == 3
    for key, value, want in [("compile", "maybe", "compile must be true or false, got 'maybe'"),
                             ("lr", "1e-3x", "lr must be a number, got '1e-3x'"),
                             ("steps", 2.5, "steps must be an integer, got 2.5"),
                             ("steps", True, "steps must be an integer, got True"),
                             ("model.dim", "wide", "model.dim must be an integer, got 'wide'")]:
        with pytest.raises(ValueError, match=re.escape(want) + r" \(an override of tiny.json"):
            TrainConfig.from_name("tiny", **{key: value})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": "100", "compile": "off"}))
    assert (TrainConfig.from_json(p).steps, TrainConfig.from_json(p).compile) == (100, False)
    p.write_text(json.dumps({"steps": "many"}))
    with pytest.raises(ValueError, match=r"c.json: steps must be an integer, got 'many'$"):
        TrainConfig.from_json(p, lr=1e-3)  # the file is to blame, not the override
    # an override of part of the lora block keeps the rest of the config's
    ft = TrainConfig.from_name("alpaca_lora_7B")
    assert TrainConfig.from_name("alpaca_lora_7B", lora={"r": 4}).lora == {**ft.lora, "r": 4}


# ---- bad input: one sentence, before any work -------------------------------------------------


def test_bad_input_stops_before_any_work(tmp_path, data_dir, monkeypatch):
    built = []  # the trainer checks everything before it builds a model
    monkeypatch.setattr(trainer_module, "Transformer", lambda args: built.append(1))
    cases = [
        (dict(data=str(tmp_path / "missing")), FileNotFoundError, "^data path .*missing does not exist"),
        (dict(data=str(tmp_path)), ValueError, None),  # filled below: an empty directory
        (dict(seq_len=512), ValueError, "seq_len 512 is above the model's max_seq_len 256"),
        (dict(dp=2), ValueError, r"dp 2 x tp 1 = 2 does not equal the world size 1"),
        (dict(tp=3), ValueError, "tensor parallel degree 3 does not divide n_heads=4"),
        (dict(global_batch_tokens=100), ValueError, "global_batch_tokens 100 is not a multiple of"),
        (dict(ac="some"), ValueError, r"ac='some' is not one of \('none', 'full', 'selective'\)"),
        (dict(data={"web": {"path": "nowhere", "weight": 1.0}}), FileNotFoundError,
         r"^mixture source 'web': data path nowhere does not exist.* read from the current folder, "),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[1] = (dict(data=str(empty)), ValueError, "data directory .*empty is empty")
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            Trainer(tiny_cfg(tmp_path, data_dir, **kw), make_loader=make_pattern_loader)
    # with the real loader, a directory that scripts/prepare_data.py did not write
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="empty is not a prepared dataset"):
        Trainer(tiny_cfg(tmp_path, empty))
    assert not built


def test_resume_refuses_another_model(tmp_path, data_dir):
    fit(tiny_cfg(tmp_path, data_dir, steps=1))
    with pytest.raises(ValueError, match=r"checkpoint .*step_00000001 is for another model \(dim 64 != 32; n_heads 4 != 2; n_kv_heads 4 != 2\); use the same model"):
        Trainer(tiny_cfg(tmp_path, data_dir, **{"model.dim": 32, "model.n_heads": 2}), make_loader=make_pattern_loader)
    with pytest.raises(ValueError, match="global batches of 4 sequences and this run has 8"):
        Trainer(tiny_cfg(tmp_path, data_dir, global_batch_tokens=256), make_loader=make_pattern_loader)
    assert Trainer(tiny_cfg(tmp_path, data_dir, resume="never"), make_loader=make_pattern_loader).resume_from is None


# ---- training, resume, checkpoints ------------------------------------------------------------


class Kill(Exception):
    pass


def test_loss_falls_and_resume_is_bit_exact(tmp_path, data_dir):
    # bf16 autocast, grad accumulation 2, checkpoints every 3 steps
    kw = dict(steps=8, ckpt_every=3, global_batch_tokens=256, eval_every=4)
    full = fit(tiny_cfg(tmp_path / "a", data_dir, **kw))
    losses = [r["loss"] for r in full["history"]]
    vals = [r["val_loss"] for r in full["history"] if "val_loss" in r]
    assert losses[0] == pytest.approx(math.log(512), abs=0.2)  # uniform over the vocab at init
    # validation scores 2 global batches (16 windows, 512 tokens) at steps 4 and 8
    assert vals[0] < math.log(512) - 0.5 and vals[1] < vals[0] - 0.1
    assert [r["val_tokens"] for r in full["history"] if "val_loss" in r] == [2 * 256, 2 * 256]
    assert full["val_ppl"] == pytest.approx(math.exp(full["val_loss"]))

    def kill_at_5(rec):
        if rec["step"] == 5:
            raise Kill
    with pytest.raises(Kill):
        fit(tiny_cfg(tmp_path / "b", data_dir, **kw), kill_at_5)
    assert [p.name for p in CheckpointManager(tmp_path / "b" / "run").list()] == ["step_00000003"]
    torch.manual_seed(123)  # the resumed run restores the RNG states itself
    random.seed(5)
    resumed = fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6, 7, 8]
    assert [r["loss"] for r in resumed["history"]] == losses[3:]  # bit-exact
    assert resumed["val_loss"] == full["val_loss"]
    lines = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))  # steps 4 and 5 of the killed run dropped
    meta = read_checkpoint_meta(resumed["checkpoint"])
    assert meta["step"] == 8 and meta["layout"] == {"dp": 1, "tp": 1, "world": 1}
    assert meta["config"]["global_batch_tokens"] == 256 and meta["model_args"]["dim"] == 64
    # metrics.jsonl holds every step once per run, with the fields the progress bar shows
    lines = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"} <= set(lines[0])


def test_a_peak_measured_low_is_measured_again(tmp_path, data_dir, monkeypatch):
    """MFU is against the measured peak; a step faster than that peak (measured while the cores were
    busy) has the peak measured again, at most 3 times, keeping the highest. A configured peak stays."""
    import llama.train.trainer as trainer_module
    # FLOP/s: start-up, then each measurement again; the last, the last trainer's start-up
    peaks = iter([1.0, 2.0, 3.0, 1e18, 1e18])
    calls = []
    monkeypatch.setattr(trainer_module, "measure_peak_flops", lambda *a, **k: calls.append(1) or next(peaks))
    t = Trainer(tiny_cfg(tmp_path, data_dir, peak_flops=None), make_loader=make_pattern_loader)
    assert t.peak_flops == 1.0 and len(calls) == 1
    fpt = t.flops_per_token
    assert t._mfu(100.0) == pytest.approx(100.0 * fpt / 2.0) and t.peak_flops == 2.0
    assert t._mfu(100.0) == pytest.approx(100.0 * fpt / 3.0)
    assert t._mfu(100.0) == pytest.approx(100.0 * fpt / 1e18) and t.peak_flops == 1e18
    assert t._mfu(1e30 / fpt) == pytest.approx(1e12) and len(calls) == 4  # 3 times at most, then as it is
    # a peak from the config is never replaced; below 100% nothing is measured again
    t = Trainer(tiny_cfg(tmp_path / "b", data_dir, peak_flops=1e3), make_loader=make_pattern_loader)
    assert t._mfu(1e6) == pytest.approx(1e6 * fpt / 1e3) and t.peak_flops == 1e3 and len(calls) == 4
    t = Trainer(tiny_cfg(tmp_path / "d", data_dir, peak_flops=None), make_loader=make_pattern_loader)
    assert len(calls) == 5 and t._mfu(100.0) == pytest.approx(100.0 * fpt / 1e18) and len(calls) == 5
    record = fit(tiny_cfg(tmp_path / "c", data_dir, steps=2))
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12) for r in record["history"])


def test_bf16_peak_on_a_cpu_is_the_faster_of_bf16_and_fp32_products(monkeypatch):
    """bf16 numbers multiply exactly in fp32, and CPUs without bf16 instructions multiply them so:
    there MFU of a bf16 run is against the faster of the two products (against the bf16 one, a Xeon
    without AVX512-BF16 printed 102%); fp32 runs and other devices keep their own dtype's peak."""
    from llama.train import recipe

    speeds = {torch.bfloat16: 60e9, torch.float32: 330e9}
    asked = []
    monkeypatch.setattr(recipe, "_matmul_flops", lambda device, dtype, n, s: asked.append(dtype) or speeds[dtype])
    assert recipe.measure_peak_flops(torch.device("cpu"), torch.bfloat16) == 330e9
    assert recipe.measure_peak_flops("cpu", torch.float32) == 330e9 and asked[-1] == torch.float32
    speeds[torch.bfloat16] = 900e9  # a CPU with AVX512-BF16 or AMX: bf16's own
    assert recipe.measure_peak_flops("cpu", torch.bfloat16) == 900e9
    assert recipe.measure_peak_flops("meta", torch.bfloat16) == 900e9 and asked[-1] == torch.bfloat16
    monkeypatch.undo()  # the real products, small: a finite speed, any dtype the CPU multiplies
    assert 0 < recipe.measure_peak_flops("cpu", torch.bfloat16, n=64, seconds=0.01) < float("inf")


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, data_dir, capsys):
    """Ctrl-C (SIGINT) in a one-process run: the step finishes, a checkpoint is saved, the run stops
    (KeyboardInterrupt, exit 130 in the scripts); the same command resumes to the uninterrupted run's
    weights. Without the handler the steps since the last checkpoint (here: all) are lost."""
    full = Trainer(tiny_cfg(tmp_path / "a", data_dir), make_loader=make_pattern_loader)
    full.fit()
    run = tiny_cfg(tmp_path / "b", data_dir)

    def ctrl_c(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run, make_loader=make_pattern_loader).fit(ctrl_c)
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert "stopped by SIGINT at step 3 of 6" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = Trainer(run, make_loader=make_pattern_loader)
    assert resumed.step == 3
    resumed.fit()
    for (k, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), k


def test_an_export_that_fp16_cannot_hold_is_written_in_bf16_and_says_so(tmp_path, data_dir, capsys):
    trainer = Trainer(tiny_cfg(tmp_path, data_dir, steps=1), make_loader=make_pattern_loader)
    with torch.no_grad():
        trainer.model.layers[0].attention.wo.weight[1, 2] = 1e5
    out = trainer.export(tmp_path / "export")
    assert ("the export is bf16, not fp16: layers.0.attention.wo.weight holds 100000, beyond fp16's 65504"
            in capsys.readouterr().err)
    sd = load_consolidated(out)
    assert sd["layers.0.attention.wo.weight"].dtype == torch.bfloat16
    assert sd["layers.0.attention.wo.weight"][1, 2].item() == torch.tensor(1e5).bfloat16().item()
    trainer.model.layers[0].attention.wo.weight.data[1, 2] = 1.0  # within range: Meta's fp16
    assert load_consolidated(trainer.export(tmp_path / "export"))["norm.weight"].dtype == torch.float16


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    kw = dict(steps=4, ckpt_every=2)
    full = fit(tiny_cfg(tmp_path / "a", data_dir, **kw))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the model/optimizer files are written, then the process dies
        if "step_00000004" in str(f):
            raise Kill
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(train_checkpoint, "atomic_save", lambda obj, path: dying_save(obj, path))
    with pytest.raises(Kill):
        fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    monkeypatch.undo()
    root = tmp_path / "b" / "run" / "checkpoints"
    # a save that fails removes its temporary folder (one killed -9 leaves it: tests/test_faults.py)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert CheckpointManager(tmp_path / "b" / "run").latest().name == "step_00000002"
    resumed = fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"]][2:]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]


def test_keep_last_k(tmp_path, data_dir):
    fit(tiny_cfg(tmp_path, data_dir, steps=5, ckpt_every=1, keep_last=2))
    assert [p.name for p in CheckpointManager(tmp_path / "run").list()] == ["step_00000004", "step_00000005"]


def test_nan_guard_skips_then_stops(tmp_path, data_dir, monkeypatch):
    real_loss = Trainer.loss
    bad_steps = {3}

    def loss(self, inputs, targets, *reduction):
        out = real_loss(self, inputs, targets, *reduction)
        return out * float("nan") if self.step + 1 in bad_steps else out
    monkeypatch.setattr(Trainer, "loss", loss)
    trainer = Trainer(tiny_cfg(tmp_path, data_dir, steps=4, max_bad_steps=2), make_loader=make_pattern_loader)
    weights = []
    trainer.fit(lambda rec: weights.append(trainer.model.output.weight.detach().clone()))
    skipped = [r["skipped"] for r in trainer.history]
    assert skipped == [False, False, True, False]
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[2], weights[3])
    assert all(torch.isfinite(w).all() for w in weights)

    bad_steps.update(range(1, 100))
    with pytest.raises(FloatingPointError, match="stopping at step 2: 2 steps in a row had a non-finite loss"):
        fit(tiny_cfg(tmp_path / "b", data_dir, steps=6, max_bad_steps=2))


def test_selective_ac_trains_the_same(tmp_path, data_dir):
    kw = dict(steps=2, dtype="fp32")
    a = fit(tiny_cfg(tmp_path / "a", data_dir, **kw))
    b = fit(tiny_cfg(tmp_path / "b", data_dir, ac="selective", **kw))
    assert [r["loss"] for r in b["history"]] == pytest.approx([r["loss"] for r in a["history"]], abs=1e-6)


@pytest.mark.slow
def test_compile_trains_the_same(tmp_path, data_dir):
    kw = dict(steps=2, dtype="fp32")
    a = fit(tiny_cfg(tmp_path / "a", data_dir, **kw))
    b = fit(tiny_cfg(tmp_path / "b", data_dir, compile=True, ac="full", **kw))
    assert [r["loss"] for r in b["history"]] == pytest.approx([r["loss"] for r in a["history"]], abs=1e-5)


def test_meta_device_init(tmp_path, data_dir):
    # the path for models too big to build whole in each process: meta device, then init_weights()
    trainer = Trainer(tiny_cfg(tmp_path, data_dir, init="meta", steps=2), make_loader=make_pattern_loader)
    assert trainer.model_size() == Transformer(ModelArgs.from_name("tiny")).num_params()
    m = trainer.model
    assert m.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)
    assert m.output.weight.std().item() == pytest.approx(0.02, rel=0.1) and bool((m.norm.weight == 1).all())
    torch.testing.assert_close(m.freqs_cis, Transformer(ModelArgs.from_name("tiny")).freqs_cis)
    summary = trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in summary["history"])
    assert summary["history"][0]["loss"] == pytest.approx(math.log(512), abs=0.2)


# ---- real data and export -----------------------------------------------------------------------


def test_prepared_data_train_export_meta_layout(tmp_path, tiny_tokenizer):
    rng = random.Random(0)
    words = "the of and to in is that for it as was with be by on not he this are or".split()
    (tmp_path / "text").mkdir()
    docs = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))} for _ in range(300)]
    (tmp_path / "text" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    prepare_data([tmp_path / "text"], tiny_tokenizer.model_path, tmp_path / "data", val_fraction=0.1,
                 num_workers=1, progress=False)
    cfg = TrainConfig.from_name("tiny", data=str(tmp_path / "data"), tokenizer=str(tiny_tokenizer.model_path),
                                out_dir=str(tmp_path / "run"), steps=3, eval_every=0, eval_batches=1,
                                ckpt_every=3, peak_flops=1e12, progress=False, dtype="fp32",
                                export_dir=str(tmp_path / "meta"), export_shards=2)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])
    out = Path(summary["export"])
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "context.json",
                                                      "export.json", "params.json", "tokenizer.model"]
    # the exported fp16 weights give the trained model's logits; the offline export of the
    # training checkpoint (scripts/export.py) gives the same files
    tokens = torch.tensor([tiny_tokenizer.encode("the of and to in", bos=True, eos=False)])
    loaded = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        ref = trainer.model(tokens)
        got = loaded(tokens)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    again = export_checkpoint(summary["checkpoint"], tmp_path / "meta2", num_shards=2)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.model").read_bytes() == Path(tiny_tokenizer.model_path).read_bytes()


def test_metrics_cut_off_by_a_kill_are_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ---- the recipe, part by part ------------------------------------------------------------------


def test_cross_entropy_matches_naive():
    """The recipe's loss (compiled by the benchmark and the trainer) vs log-softmax by hand."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 64, (2, 8))
    loss = cross_entropy(logits, targets)
    loss.backward()
    x = logits.detach().double().flatten(0, 1)
    logp = x - x.exp().sum(-1, keepdim=True).log()
    want = -logp[torch.arange(16), targets.flatten()].mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    onehot = F.one_hot(targets.flatten(), 64).double()
    grad = ((logp.exp() - onehot) / 16).view(2, 8, 64)
    torch.testing.assert_close(logits.grad.double(), grad, rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("dtype,impl,reduction", [
    (torch.float32, "kernel", "mean"), (torch.bfloat16, "kernel", "sum"), (torch.bfloat16, "torch", "sum"),
    (torch.bfloat16, "compiled", "mean"), (torch.float32, "compiled", "sum")])
def test_linear_cross_entropy_matches_the_loss_by_hand(dtype, impl, reduction, monkeypatch):
    """The training loss that applies the output projection itself and writes the logits' gradient over
    them in the forward (linear_cross_entropy) = log-softmax of h @ W.T by hand in float64: the loss,
    and the gradients of h and W for a backward scaled by 0.37, with ignored targets (-100). bf16 runs
    under autocast, as the trainer does; a frozen W (a LoRA run) gets no gradient. impl: the C++ pass
    over the logits (CPU), or the torch passes that run without it (eager or compiled)."""
    if impl == "kernel" and recipe._cpu_kernel() is None:
        pytest.skip("no fused CPU kernel builds here (no compiler, or a CPU none of its builds runs on)")
    if impl != "kernel":
        monkeypatch.setattr(recipe, "_cpu_kernel", lambda: None)
    compile = impl == "compiled"
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, reduction, compile=compile)
    (loss * 0.37).backward()

    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    if dtype == torch.bfloat16:  # the logits come from bf16 operands, as under autocast
        hd, wd = (t.detach().to(dtype).double().requires_grad_() for t in (h, w))
    logits = hd.flatten(0, 1) @ wd.t()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    keep = targets.flatten() != -100
    want = -logp[keep].gather(-1, targets.flatten()[keep][:, None]).sum()
    if reduction == "mean":
        want = want / keep.sum()
    (want * 0.37).backward()
    assert loss.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    # bf16: the logits are rounded to bf16 as autocast's F.linear rounds them (~1e-4 of the loss), the
    # same logits as the unfused loss's
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        unfused = cross_entropy(F.linear(h, w), targets, reduction)
    torch.testing.assert_close(loss, unfused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hd.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wd.grad, **tol)
    assert w.grad.dtype == w.dtype and h.grad.dtype == h.dtype

    frozen = w.detach()
    h.grad = None
    linear_cross_entropy(h, frozen, targets, reduction, compile=compile).backward()
    assert frozen.grad is None and h.grad is not None
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, "none")
    with pytest.raises(ValueError, match=r"target token id 50 is outside the model's vocabulary 0..49"):
        linear_cross_entropy(h, w, torch.full_like(targets, 50), reduction, compile=compile)


def reference_steps(cfg: TrainConfig, model: Transformer, loader, n: int) -> list[dict]:
    """The paper's recipe written out by hand, independently of llama.train: Adam moments with
    bias correction, decoupled weight decay 0.1 on matrices only, warmup + cosine learning rate,
    global-norm clipping at 1.0. Returns per step the gradient norm before clipping and the loss."""
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    out = []
    for t in range(1, n + 1):
        inputs, targets = loader.next()
        logits = model(inputs).double()
        logp = logits - logits.logsumexp(-1, keepdim=True)
        loss = -logp.gather(-1, targets[..., None]).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
        step = t - 1
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            frac = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
            lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                g = g * scale
                m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * g
                v[k] = cfg.beta2 * v[k] + (1 - cfg.beta2) * g * g
                if p.ndim >= 2:  # decay on weight matrices (embeddings, output included), not on norms
                    p.mul_(1 - lr * cfg.weight_decay)
                m_hat, v_hat = m[k] / (1 - cfg.beta1 ** t), v[k] / (1 - cfg.beta2 ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + cfg.eps))
        out.append({"grad_norm": norm, "loss": loss.item(), "lr": lr})
    return out


def test_training_steps_equal_the_recipe_by_hand(tmp_path, data_dir):
    """Five fp32 steps of the trainer = the recipe written by hand (reference_steps). Removing any
    part - clipping, a decay group, warmup or cosine, a beta, bias correction - changes the weights
    beyond the tolerance. The paper's clipping at 1.0 acts at every one of these steps (gradient
    norms 1.5-6; the test checks that it did)."""
    cfg = tiny_cfg(tmp_path, data_dir, steps=5, warmup_steps=2, lr=1e-2, dtype="fp32", eval_batches=0,
                   micro_batch_size=4)  # one micro-batch a step, as the reference takes
    trainer = Trainer(cfg, make_loader=make_pattern_loader)
    ref_model = Transformer(trainer.args)
    ref_model.load_state_dict(trainer.model.state_dict())
    ref = reference_steps(cfg, ref_model, make_pattern_loader(cfg, "train", 0, 1, cfg.seed), 5)
    recs = [trainer.train_step() for _ in range(5)]
    assert cfg.grad_clip == 1.0 and all(r["grad_norm"] > 1.2 for r in ref), "clipping must act for the test to see it"
    for got, want in zip(recs, ref):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for name, p in trainer.model.named_parameters():
        # Adam divides by sqrt(v): fp32 rounding in tiny gradients moves weights by up to ~2e-5
        torch.testing.assert_close(p.detach(), dict(ref_model.named_parameters())[name].detach(), rtol=1e-3,
                                   atol=1e-4, msg=name)


def test_each_recipe_part_moves_the_weights(tmp_path, data_dir):
    """The hand-written reference is itself sensitive: with clipping, decay or warmup changed, the
    weights after 5 steps differ from the recipe's by far more than the tolerance above (1e-4)."""
    base = tiny_cfg(tmp_path, data_dir, steps=5, warmup_steps=2, lr=1e-2, dtype="fp32", eval_batches=0,
                    micro_batch_size=4)
    torch.manual_seed(0)
    init = Transformer(base.model_args()).state_dict()

    def weights(**changes):
        cfg = TrainConfig.from_dict(base.to_dict(), **changes)
        model = Transformer(cfg.model_args())
        model.load_state_dict(init)
        reference_steps(cfg, model, make_pattern_loader(cfg, "train", 0, 1, cfg.seed), 5)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    want = weights()
    for changes in ({"grad_clip": 1e9}, {"weight_decay": 0.0}, {"warmup_steps": 0}, {"beta2": 0.999}):
        assert (weights(**changes) - want).abs().max() > 1e-3, changes


# ---- several ranks -----------------------------------------------------------------------------


def one_rank(base, out, **kw):
    s = Trainer(TrainConfig.from_dict(base, out_dir=str(out), **kw), make_loader=make_pattern_loader).fit()
    return [r["loss"] for r in s["history"]], s


def _launch(tmp_path, base) -> Path:
    """Run the 2-rank worker; returns its result file."""
    work = tmp_path / "run"
    work.mkdir()
    (work / "base.json").write_text(json.dumps(base))
    torchrun("tests.workers.train", 2, work, work / "res.json", timeout=400, retry_gloo_abort=False)
    return work / "res.json"


@pytest.mark.slow
@pytest.mark.parametrize("dim", [64, 128])  # head size 16: attention in torch ops; 32: the C++ kernel where it builds
def test_dp2_and_tp2_match_one_rank(tmp_path, dim):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    # 4 sequences of 32 tokens per step: 1 rank does 2 micro-batches of 2, dp=2 one of 2 per rank
    base = dict(model="tiny", model_overrides={"dim": dim}, data=str(tmp_path / "data"), steps=4, warmup_steps=2,
                lr=3e-3, seq_len=32,
                global_batch_tokens=128, micro_batch_size=2, dtype="fp32", eval_every=0, eval_batches=2,
                ckpt_every=100, peak_flops=1e12, progress=False, resume="auto")
    res_file = _launch(tmp_path, base)
    work = res_file.parent  # where the 2-rank runs wrote their checkpoints
    res = json.loads(res_file.read_text())

    ref, ref_summary = one_rank(base, tmp_path / "one")
    ref_bf16, _ = one_rank(base, tmp_path / "one_bf16", dtype="bf16")
    assert ref[-1] < ref[0] - 0.3
    for key in ("dp2", "tp2", "dp2_selective_ac"):
        assert res[key] == pytest.approx(ref, abs=2e-5), key
    assert res["tp2_val"] == pytest.approx(ref_summary["val_loss"], abs=2e-5)
    # validation scores the same windows on any layout: dp=2 (one micro-batch of 2 per rank and
    # step) = one rank (two micro-batches of 2): 2 global batches x 4 windows x 32 tokens
    assert res["dp2_val"] == pytest.approx(ref_summary["val_loss"], abs=1e-5)
    assert res["dp2_val_tokens"] == ref_summary["history"][-1]["val_tokens"] == 2 * 4 * 32
    # bf16: FSDP's bf16 parameters on 2 ranks against autocast in one process
    assert res["dp2_bf16"] == pytest.approx(ref_bf16, abs=2e-2)
    # stopped after step 2 and resumed: exact on the same layout, the same numbers on tp=2
    assert res["dp2_resumed"] == res["dp2"][2:]
    assert res["dp2_to_tp2"] == pytest.approx(res["dp2"][2:], abs=2e-5)

    # meta-device init over dp=2: N(0, 0.02) with distinct shards
    assert not res["meta_halves_equal"] and res["meta_std"] == pytest.approx(0.02, rel=0.1)

    # the sharded checkpoints (FSDP dp=2, TP tp=2) load in one process: same validation loss
    resumed = Trainer(TrainConfig.from_dict(base, out_dir=str(work / "tp2")), make_loader=make_pattern_loader)
    assert resumed.resume_from is not None
    assert resumed.evaluate()["val_loss"] == pytest.approx(res["tp2_val"], abs=2e-5)
    # Meta export gathered from 2 FSDP ranks == offline export of the sharded checkpoint
    offline = export_checkpoint(res["dp2_ckpt"], tmp_path / "offline_meta")
    a = torch.load(work / "dp2_meta" / "consolidated.00.pth", weights_only=True)
    b = torch.load(offline / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and equals the 1-rank run's weights (fp16 export of fp32 training)
    ref_sd = one_rank_weights(base, ref_summary["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k].float(), ref_sd[k].half().float(), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_a_signal_to_torchrun_or_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """2-rank torchrun runs (dp=2), stopped mid-run by Ctrl-C in their terminal (SIGINT to torchrun's
    process group; torchrun passes it on to both workers) and by SIGTERM to rank 1 alone: every rank
    finishes the same step, one checkpoint of that step is saved, and the same command resumes to the
    uninterrupted run's losses. Before, the ranks died with nothing saved since the last periodic
    checkpoint (here: none); without the ranks' agreement rank 0 would go on alone and hang."""
    import contextlib
    import subprocess
    import sys
    import time

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    base = dict(model="tiny", data=str(tmp_path / "data"), steps=8, warmup_steps=2, lr=3e-3, seq_len=32,
                global_batch_tokens=128, micro_batch_size=2, dtype="fp32", eval_every=0, eval_batches=0,
                ckpt_every=100, log_every=1, peak_flops=1e12, progress=False, resume="auto", dp=2, tp=1)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(base))

    def result(out):
        return json.loads((out / "result.json").read_text())

    def interrupted(out, send):
        """A slowed run, signalled by `send(torchrun's pid)` once it is past step 2; its result and output."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.workers.stop", str(config), str(out), "slow"]
        run = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # a terminal's job
        try:
            deadline = time.monotonic() + 240
            while not (out / "ready").exists():
                assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
                time.sleep(0.05)
            send(run.pid)
            log = run.communicate(timeout=120)[0]
        finally:  # a run that hangs (ranks that disagree) is killed, workers too (each in a session of its own)
            if run.poll() is None:
                for pid in [run.pid] + [int(p.read_text()) for p in out.glob("pid_*")]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        stopped = result(out)
        assert stopped["ended"] == "stopped" and 2 <= stopped["step"] < 8, log[-3000:]
        assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{stopped['step']:08d}"], log[-3000:]
        return stopped, log

    def plain(out):  # once: a second run would resume from the first's last checkpoint and train nothing
        proc = torchrun("tests.workers.stop", 2, config, out, "plain", check=False, retry_gloo_abort=False)
        assert (proc.returncode == 0 or GLOO_ABORT in proc.stderr) and (out / "result.json").is_file(), \
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    plain(tmp_path / "full")
    want = result(tmp_path / "full")["losses"]

    stopped, log = interrupted(tmp_path / "ctrl_c", lambda pid: os.killpg(pid, signal.SIGINT))
    assert f"stopped by SIGINT at step {stopped['step']} of 8" in log and "again to stop at once" in log, log[-3000:]
    assert stopped["losses"] == want[:stopped["step"]]

    out = tmp_path / "term_rank_1"
    stopped, log = interrupted(out, lambda pid: os.kill(int((out / "pid_1").read_text()), signal.SIGTERM))
    assert f"stopped by a signal to another rank at step {stopped['step']} of 8" in log, log[-3000:]
    assert stopped["losses"] == want[:stopped["step"]]
    plain(out)
    assert result(out)["first"] == stopped["step"] and result(out)["losses"] == want[stopped["step"]:]


def one_rank_weights(base, ckpt):
    trainer = Trainer(TrainConfig.from_dict(base, out_dir=str(Path(ckpt).parent.parent)), make_loader=make_pattern_loader)
    return trainer.model.state_dict()


# ---- evaluation tasks during training ------------------------------------------------------------


def test_eval_tasks_are_scored_at_each_evaluation(tmp_path, data_dir, tiny_tokenizer):
    """A local multiple-choice task named in the config is scored with the validation loss; the
    logged numbers equal llama.eval's on the trained model (the reference), and a generation task
    cannot run on FSDP ranks (checked before any work)."""
    rows = [{"question": f"the {w} of", "choices": ["and to", "in is", "that for"], "answer": i % 3}
            for i, w in enumerate("model token data train loss value".split())]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "mc.json"
    spec.write_text(json.dumps({"name": "mc", "data": "mc.jsonl"}))
    cfg = tiny_cfg(tmp_path, data_dir, steps=2, eval_every=1, eval_tasks=[str(spec)],
                   tokenizer=str(tiny_tokenizer.model_path), dtype="fp32")
    trainer = Trainer(cfg, make_loader=make_pattern_loader)
    summary = trainer.fit()
    logged = [r for r in summary["history"] if "mc/acc" in r]
    assert [r["step"] for r in logged] == [1, 2]
    want = evaluate_tasks(trainer.model, tiny_tokenizer, [str(spec)], progress=False)["mc"]
    for m in ("acc", "acc_norm", "acc_answer"):
        assert logged[-1][f"mc/{m}"] == want[m]
    with pytest.raises(ValueError, match="eval_tasks need the tokenizer"):
        Trainer(tiny_cfg(tmp_path, data_dir, eval_tasks=[str(spec)]), make_loader=make_pattern_loader)


def test_time_budget_sizes_the_schedule(tmp_path, data_dir, capsys):
    """With a budget no run of 50 steps can meet, the schedule is cut after the timed probe steps
    (the first step compiles and is not timed), it says so, and a rerun resumes to the same end."""
    cfg = tiny_cfg(tmp_path, data_dir, steps=50, time_budget_s=1e-3, ckpt_every=2, progress=False)
    summary = fit(cfg)
    probe = trainer_module.BUDGET_PROBE_STEPS
    assert summary["step"] == probe and len(summary["history"]) == probe
    warmup = round(2 * probe / 50)  # the warmup shrinks with the schedule: a cut run still decays
    assert f"so {probe} steps instead of 50; the learning-rate schedule ends there (warmup 2 -> {warmup} steps)" \
        in capsys.readouterr().out
    meta = read_checkpoint_meta(summary["checkpoint"])
    assert meta["config"]["steps"] == probe and meta["step"] == probe and meta["config"]["warmup_steps"] == warmup
    assert fit(cfg)["step"] == probe  # resumed: the budgeted schedule, nothing left to train
    out = capsys.readouterr().out
    assert f"the run is complete: step {probe} of {probe}" in out and "another schedule" not in out
    # a generous budget changes nothing, and says that the whole schedule fits
    assert fit(tiny_cfg(tmp_path / "b", data_dir, steps=6, time_budget_s=1e6))["step"] == 6
    assert "so all 6 steps fit" in capsys.readouterr().out


def test_validation_off_and_a_changed_schedule_on_resume(tmp_path, data_dir, capsys):
    """eval_batches 0 turns the validation loss off even where eval_every would evaluate (it used to
    open the val split and stop the run there); resuming with more steps says how the learning rate
    moves."""
    summary = fit(tiny_cfg(tmp_path, data_dir, steps=4, eval_every=2, eval_batches=0, ckpt_every=4))
    assert summary["step"] == 4 and summary["val_loss"] is None
    assert not any("val_loss" in r for r in summary["history"])
    capsys.readouterr()
    longer = tiny_cfg(tmp_path, data_dir, steps=8, eval_every=2, eval_batches=0, ckpt_every=4)
    trainer = Trainer(longer, make_loader=make_pattern_loader)
    before = dataclasses.replace(longer, steps=4)
    assert (f"resuming at step 4 with another schedule: steps 4 -> 8; the learning rate goes from "
            f"{lr_at(3, before):.3g} to {lr_at(4, longer):.3g}") in capsys.readouterr().out
    assert trainer.fit()["step"] == 8


def test_time_budget_follows_a_machine_that_slows_down(tmp_path, data_dir, capsys, monkeypatch):
    """Steps that become slow midway (a shared machine): the schedule is cut again at the next
    re-fit, from the latest steps' time, so the run still ends within its budget, the last step
    is evaluated and checkpointed, and the learning rate ends at the schedule's floor."""
    import dataclasses
    import time

    monkeypatch.setattr(trainer_module, "BUDGET_REFIT_EVERY", 3)
    slow_after, sleep = 8, 0.4
    original = Trainer.train_step

    def train_step(self):
        rec = original(self)
        if self.step > slow_after:
            time.sleep(sleep)
        return rec

    monkeypatch.setattr(Trainer, "train_step", train_step)
    cfg = tiny_cfg(tmp_path, data_dir, steps=60, time_budget_s=4.0, eval_every=0, eval_batches=1)
    summary = fit(cfg)
    out = capsys.readouterr().out
    # fast steps alone would fit all 60; 52 slow ones cannot (21 s): cut once the slowdown is timed
    assert slow_after < summary["step"] < slow_after + 3.6 / sleep + 2, out
    assert "steps instead of 60" in out and f"so {summary['step']} steps instead of" in out
    assert summary["val_loss"] is not None and read_checkpoint_meta(summary["checkpoint"])["step"] == summary["step"]
    last = summary["history"][-1]
    assert last["step"] == summary["step"]
    # the last step's rate is the shortened schedule's last (the cosine's end), not the 60-step one's
    warmup = read_checkpoint_meta(summary["checkpoint"])["config"]["warmup_steps"]  # shrunk with each cut
    assert warmup <= cfg.warmup_steps
    end = dataclasses.replace(cfg, steps=summary["step"], warmup_steps=warmup)
    assert last["lr"] == pytest.approx(lr_at(summary["step"] - 1, end), rel=1e-6)
    assert last["lr"] < lr_at(summary["step"] - 1, cfg) * 0.5


def test_empty_validation_split_fails_before_any_step(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("the model returns a value for the data. " * 200)
    data = tmp_path / "prepared"
    prepare_data([tmp_path / "a.txt"], tiny_tokenizer.model_path, data, val_fraction=0.0, num_workers=1, progress=False)
    cfg = tiny_cfg(tmp_path, data, tokenizer=str(tiny_tokenizer.model_path), eval_batches=2)
    with pytest.raises(ValueError, match=r"^eval_batches=2 needs validation data, but the val split of .*prepared "
                                         r"\('prepared'\) has 0 tokens.*; prepare the data with val_fraction > 0 .*or "
                                         r"set eval_batches=0"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # nothing was written
    assert Trainer(tiny_cfg(tmp_path, data, tokenizer=str(tiny_tokenizer.model_path), eval_batches=0)).val_loader is None
