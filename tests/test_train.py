"""Pretraining in one process: recipe, configs, bad input, exact resume, atomic checkpoints, NaN guard,
export to Meta's layout (multi-rank: tests/test_train_multirank.py)."""

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_pattern_loader  # noqa: E402

import llama.train as T  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.train import TrainConfig, Trainer, lr_at, param_groups  # noqa: E402

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
    assert T.flops_per_token(args, 128) == 6 * n + 12 * args.n_layers * args.dim * 128
    # the paper's 7B: 6.74e9 parameters, 6.61e9 without the embedding table
    assert T.flops_per_token(ModelArgs.from_name("7B"), 0) == 6 * (6_738_415_616 - 32000 * 4096)


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
    with pytest.raises(ValueError, match="unknown training config 'nope'; configs are"):
        TrainConfig.from_name("nope")


# ---- bad input: one sentence, before any work -------------------------------------------------


def test_bad_input_stops_before_any_work(tmp_path, data_dir, monkeypatch):
    built = []
    monkeypatch.setattr(Trainer, "_setup", lambda self: built.append(1))
    cases = [
        (dict(data=str(tmp_path / "missing")), FileNotFoundError, "data path .*missing does not exist"),
        (dict(data=str(tmp_path)), ValueError, None),  # filled below: an empty directory
        (dict(seq_len=512), ValueError, "seq_len 512 is above the model's max_seq_len 256"),
        (dict(dp=2), ValueError, r"dp 2 x tp 1 = 2 does not equal the world size 1"),
        (dict(tp=3), ValueError, "tensor parallel degree 3 does not divide n_heads=4"),
        (dict(global_batch_tokens=100), ValueError, "global_batch_tokens 100 is not a multiple of"),
        (dict(ac="some"), ValueError, r"ac='some' is not one of \('none', 'full', 'selective'\)"),
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
    assert vals[0] < math.log(512) - 0.8 and vals[1] < vals[0] - 0.1
    assert full["val_ppl"] == pytest.approx(math.exp(full["val_loss"]))

    def kill_at_5(rec):
        if rec["step"] == 5:
            raise Kill
    with pytest.raises(Kill):
        fit(tiny_cfg(tmp_path / "b", data_dir, **kw), kill_at_5)
    assert [p.name for p in T.list_checkpoints(tmp_path / "b" / "run")] == ["step_00000003"]
    torch.manual_seed(123)  # the resumed run restores the RNG states itself
    random.seed(5)
    resumed = fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6, 7, 8]
    assert [r["loss"] for r in resumed["history"]] == losses[3:]  # bit-exact
    assert resumed["val_loss"] == full["val_loss"]
    lines = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))  # steps 4 and 5 of the killed run dropped
    meta = T.read_checkpoint_meta(resumed["checkpoint"])
    assert meta["step"] == 8 and meta["layout"] == {"dp": 1, "tp": 1, "world": 1}
    assert meta["config"]["global_batch_tokens"] == 256 and meta["model_args"]["dim"] == 64
    # metrics.jsonl holds every step once per run, with the fields the progress bar shows
    lines = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"} <= set(lines[0])


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    kw = dict(steps=4, ckpt_every=2)
    full = fit(tiny_cfg(tmp_path / "a", data_dir, **kw))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the model/optimizer files are written, then the process dies
        if "step_00000004" in str(f):
            raise Kill
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(T.torch, "save", dying_save)
    with pytest.raises(Kill):
        fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    monkeypatch.setattr(T.torch, "save", real_save)
    root = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    assert T.latest_checkpoint(tmp_path / "b" / "run").name == "step_00000002"
    resumed = fit(tiny_cfg(tmp_path / "b", data_dir, **kw))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"]][2:]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]  # temp dir cleaned


def test_keep_last_k(tmp_path, data_dir):
    fit(tiny_cfg(tmp_path, data_dir, steps=5, ckpt_every=1, keep_last=2))
    assert [p.name for p in T.list_checkpoints(tmp_path / "run")] == ["step_00000004", "step_00000005"]


def test_nan_guard_skips_then_stops(tmp_path, data_dir, monkeypatch):
    real_loss = Trainer._loss
    bad_steps = {3}

    def loss(self, inputs, targets):
        out = real_loss(self, inputs, targets)
        return out * float("nan") if self.step + 1 in bad_steps else out
    monkeypatch.setattr(Trainer, "_loss", loss)
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
    assert trainer.model_size() == Transformer(ModelArgs.from_name("tiny")).num_params()  # builds it
    m = trainer.model
    assert m.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)
    assert m.output.weight.std().item() == pytest.approx(0.02, rel=0.1) and bool((m.norm.weight == 1).all())
    torch.testing.assert_close(m.freqs_cis, Transformer(ModelArgs.from_name("tiny")).freqs_cis)
    summary = trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in summary["history"])
    assert summary["history"][0]["loss"] == pytest.approx(math.log(512), abs=0.2)


# ---- real data and export -----------------------------------------------------------------------


def test_prepared_data_train_export_meta_layout(tmp_path, tiny_tokenizer):
    from llama.checkpoint import load_model
    from llama.data import prepare_data

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
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json",
                                                      "tokenizer.model"]
    # the exported fp16 weights give the trained model's logits; the offline export of the
    # training checkpoint (scripts/export.py) gives the same files
    tokens = torch.tensor([tiny_tokenizer.encode("the of and to in", bos=True, eos=False)])
    loaded = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        ref = trainer.model(tokens)
        got = loaded(tokens)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    again = T.export_checkpoint(summary["checkpoint"], tmp_path / "meta2", num_shards=2)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.model").read_bytes() == Path(tiny_tokenizer.model_path).read_bytes()


def test_metrics_cut_off_by_a_kill_are_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    T._truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]

