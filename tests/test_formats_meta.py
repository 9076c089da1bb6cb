import dataclasses
import json

import pytest
import torch

from llama.formats.meta import (load_consolidated, tp_shard_dim, load_model, load_params, load_tp_slice, reshard,
                              save_meta_checkpoint, shard_paths, tp_slices)
from llama.model import ModelArgs, Transformer

# REFERENCE.md's table, written out independently of llama/checkpoint.py
META_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
              "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
              "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}


def _split_dim(key):
    return META_SPLIT[key.split(".", 2)[2] if key.startswith("layers.") else key]


def _args(**kw):
    return ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 128,
                        "multiple_of": 32, "norm_eps": 1e-5, "max_seq_len": 64, **kw})


def _random_model(**kw):
    model = Transformer(_args(**kw))
    with torch.no_grad():  # norms random too, so a misplaced tensor changes the logits
        for p in model.parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.1)
    return model


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = _random_model(n_kv_heads=2)
    (tmp_path / "tokenizer.model").write_bytes(b"not really a tokenizer")
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "mp1", num_shards=1, dtype=torch.float32,
                         tokenizer_path=tmp_path / "tokenizer.model")
    return model, tmp_path


def test_reshard_round_trip_and_meta_split(ckpt):
    model, tmp = ckpt
    full = model.state_dict()
    reshard(tmp / "mp1", tmp / "mp2", 2)
    reshard(tmp / "mp2", tmp / "mp4", 4)
    reshard(tmp / "mp4", tmp / "back", 1)
    for d, n in (("mp1", 1), ("mp2", 2), ("mp4", 4), ("back", 1)):
        assert [p.name for p in shard_paths(tmp / d)] == [f"consolidated.{i:02d}.pth" for i in range(n)]
        assert (tmp / d / "tokenizer.model").read_bytes() == b"not really a tokenizer"
    back = torch.load(tmp / "back" / "consolidated.00.pth", weights_only=True)
    assert back.keys() == full.keys()
    assert all(torch.equal(back[k], full[k]) for k in full)

    # the 2-shard files hold Meta's halves, checked by hand on the keys that split differently
    s0 = torch.load(tmp / "mp2" / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(tmp / "mp2" / "consolidated.01.pth", weights_only=True)
    emb = full["tok_embeddings.weight"]  # (128, 64): split on the feature dim
    assert s0["tok_embeddings.weight"].shape == (128, 32) and torch.equal(s1["tok_embeddings.weight"], emb[:, 32:])
    assert torch.equal(s0["output.weight"], full["output.weight"][:64])
    assert torch.equal(s1["layers.1.attention.wk.weight"], full["layers.1.attention.wk.weight"][16:])
    assert torch.equal(s1["layers.0.attention.wo.weight"], full["layers.0.attention.wo.weight"][:, 32:])
    assert torch.equal(s0["layers.0.feed_forward.w2.weight"], full["layers.0.feed_forward.w2.weight"][:, :96])
    assert torch.equal(s1["norm.weight"], full["norm.weight"])
    for k in full:  # every key per the table
        d = _split_dim(k)
        assert torch.equal(s1[k], full[k] if d is None else full[k].chunk(2, d)[1]), k

    # a written checkpoint reloads strictly and computes the same logits
    tokens = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = model(tokens)
        assert torch.equal(load_model(tmp / "mp4", max_seq_len=64)(tokens), ref)
    assert load_params(tmp / "mp4") == model.args  # max_seq_len 64 kept in params.json


def test_save_dtypes_and_bf16_reshard(ckpt):
    model, tmp = ckpt
    save_meta_checkpoint(model.state_dict(), model.args, tmp / "h", num_shards=2)  # fp16 by default
    assert torch.load(tmp / "h" / "consolidated.01.pth", weights_only=True)["norm.weight"].dtype == torch.float16
    reshard(tmp / "h", tmp / "b", 1, dtype="bf16")
    sd = load_consolidated(tmp / "b")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    ref = model.state_dict()["layers.0.attention.wq.weight"].half().bfloat16()
    assert torch.equal(sd["layers.0.attention.wq.weight"], ref)


@pytest.mark.parametrize("src_shards", [1, 4])
def test_tp_slice_equals_chunks_of_full_tensors(ckpt, src_shards):
    model, tmp = ckpt
    src = tmp / "mp1"
    if src_shards != 1:
        src = reshard(tmp / "mp1", tmp / f"mp{src_shards}", src_shards)
    full = model.state_dict()
    for rank in range(2):
        local = load_tp_slice(src, rank, 2)
        assert local.keys() == full.keys()
        for k, v in full.items():
            d = tp_shard_dim(k)
            assert torch.equal(local[k], v if d is None else v.chunk(2, d)[rank]), k
        sliced = tp_slices(full, rank, 2)  # the same slices of tensors read whole (other formats)
        assert sliced.keys() == full.keys() and all(torch.equal(sliced[k], local[k]) for k in full)
    # tok_embeddings: our plan splits vocab rows, Meta splits features
    assert load_tp_slice(src, 1, 2)["tok_embeddings.weight"].shape == (64, 64)


def test_truncated_shard_names_the_file(ckpt):
    _, tmp = ckpt
    reshard(tmp / "mp1", tmp / "mp2", 2)
    path = tmp / "mp2" / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.* truncated or corrupt"):
        load_model(tmp / "mp2")


def test_missing_shard_names_the_file(ckpt):
    _, tmp = ckpt
    reshard(tmp / "mp1", tmp / "mp4", 4)
    (tmp / "mp4" / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard\(s\) \['consolidated\.01\.pth'\]"):
        load_consolidated(tmp / "mp4")
    (tmp / "mp4" / "consolidated.03.pth").unlink()  # .00 .02 left
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth"):
        load_tp_slice(tmp / "mp4", 0, 2)
    (tmp / "mp4" / "consolidated.02.pth").unlink()  # only .00: a quarter of each split weight; the count
    with pytest.raises(ValueError, match=r"mp4 holds 1 shard\(s\) of 4 \(params.json's dim 64\): missing "
                                         r"\['consolidated\.01\.pth', 'consolidated\.02\.pth', 'consolidated\.03\.pth'\]"):
        load_model(tmp / "mp4")  # follows from the width of the embedding's slice
    params = json.loads((tmp / "mp4" / "params.json").read_text())
    (tmp / "mp4" / "params.json").write_text(json.dumps({**params, "dim": 40}))  # not a whole number of shards
    with pytest.raises(ValueError, match=r"shape mismatch .*\[128, 16\] vs model \[128, 40\]"):
        load_model(tmp / "mp4")
    (tmp / "mp4" / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "norm_eps"}))
    with pytest.raises(ValueError, match=r"mp4/params.json has no \['norm_eps'\] \(a default would build another"):
        load_model(tmp / "mp4")


def test_the_context_length_travels_beside_params_json(ckpt, tmp_path):
    """A model trained for 64 positions says so in context.json (so evaluation, GGUF's context_length
    and transformers' max_position_embeddings follow), and a reshard keeps it. params.json holds
    Meta's keys only: Meta's loaders call ModelArgs(max_seq_len=..., max_batch_size=..., **params),
    which a max_seq_len in the file would break."""
    model, tmp = ckpt
    params = json.loads((tmp / "mp1" / "params.json").read_text())
    assert "max_seq_len" not in params and json.loads((tmp / "mp1" / "context.json").read_text()) == {"max_seq_len": 64}

    @dataclasses.dataclass
    class MetaArgs:  # the fields of Meta's ModelArgs, called as its loader calls it
        dim: int = 4096
        n_layers: int = 32
        n_heads: int = 32
        n_kv_heads: int | None = None
        vocab_size: int = -1
        multiple_of: int = 256
        norm_eps: float = 1e-5
        max_batch_size: int = 32
        max_seq_len: int = 2048

    assert MetaArgs(max_seq_len=512, max_batch_size=4, **params).dim == 64
    assert load_params(tmp / "mp1").max_seq_len == 64 and load_params(tmp / "mp1", max_seq_len=128).max_seq_len == 128
    reshard(tmp / "mp1", tmp / "mp2", 2)
    assert load_params(tmp / "mp2").max_seq_len == 64
    save_meta_checkpoint(model.state_dict(), _args(n_kv_heads=2, max_seq_len=2048), tmp / "mp1", dtype=torch.float32,
                         overwrite=True)  # the default context: no file, and a stale one goes
    assert not (tmp / "mp1" / "context.json").exists() and load_params(tmp / "mp1").max_seq_len == 2048


def test_wrong_or_invalid_params_json(ckpt):
    _, tmp = ckpt
    params = tmp / "mp1" / "params.json"
    good = json.loads(params.read_text())
    params.write_text(json.dumps({**good, "dim": 96, "n_heads": 4}))
    with pytest.raises(ValueError, match=r"shape mismatch tok_embeddings\.weight: checkpoint .* \[128, 64\] vs model \[128, 96\]"):
        load_model(tmp / "mp1")
    params.write_text(json.dumps({**good, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \['layers\.2\.attention\.wq\.weight"):
        load_consolidated(tmp / "mp1")
    params.write_text(json.dumps({**good, "n_heads": 0}))
    with pytest.raises(ValueError, match=r"params.json: n_heads must be >= 1, got 0"):
        load_model(tmp / "mp1")
    params.write_text(json.dumps({**good, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match=r"params.json: use_scaled_rope: Llama 3.1's scaled RoPE is not supported"):
        load_model(tmp / "mp1")
    params.write_text(json.dumps({**good, "n_head": 4}))
    with pytest.raises(ValueError, match=r"params\.json: unknown model field\(s\) \['n_head'\]"):
        load_model(tmp / "mp1")
    params.write_text('{"dim": 64,')
    with pytest.raises(ValueError, match=r"params\.json is not valid JSON"):
        load_params(tmp / "mp1")
    params.unlink()
    with pytest.raises(FileNotFoundError, match=r"no params\.json in"):
        load_model(tmp / "mp1")


def test_shards_that_disagree(ckpt):
    model, tmp = ckpt
    reshard(tmp / "mp1", tmp / "mp2", 2)
    path = tmp / "mp2" / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shards disagree: replicated norm\.weight differs"):
        load_consolidated(tmp / "mp2")
    sd["norm.weight"] = sd["norm.weight"] - 1
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :32]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shards disagree on layers\.0\.attention\.wq\.weight: consolidated\.01\.pth has \[32, 32\]"):
        load_consolidated(tmp / "mp2")


def test_strict_keys_and_divisibility(ckpt, tmp_path):
    model, tmp = ckpt
    sd = dict(model.state_dict())
    sd["layers.0.attention.bias"] = torch.zeros(3)
    del sd["norm.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['norm\.weight'\]\. unexpected keys \['layers\.0\.attention\.bias'\]"):
        save_meta_checkpoint(sd, model.args, tmp_path / "x")
    with pytest.raises(ValueError, match=r"not divisible by 3"):
        reshard(tmp / "mp1", tmp / "mp3", 3)
    reshard(tmp / "mp1", tmp / "mp1b", 2)
    with pytest.raises(FileExistsError, match="already holds"):
        reshard(tmp / "mp1", tmp / "mp1b", 2)


def test_failed_write_leaves_no_partial_shard(ckpt, monkeypatch):
    model, tmp = ckpt
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:  # half written, then the disk fills up
            fh.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        reshard(tmp / "mp1", tmp / "out", 2)
    assert [p.name for p in (tmp / "out").iterdir()] == []


def test_an_overwrite_failing_halfway_keeps_the_old_checkpoint(ckpt, monkeypatch):
    """Overwriting a 2-shard checkpoint with another model's 2 shards fails at the second shard:
    the folder still holds the old checkpoint, every tensor as it was (not the new shard 0 beside the
    old shard 1, which loads as one model of mixed weights), and no staged file."""
    old, tmp = ckpt
    save_meta_checkpoint(old.state_dict(), old.args, tmp / "out", num_shards=2, dtype=torch.float32)
    before = sorted(p.name for p in (tmp / "out").iterdir())
    torch.manual_seed(1)
    new = _random_model(n_kv_heads=2)
    real_save, calls = torch.save, []

    def fails_second(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fails_second)
    with pytest.raises(OSError, match="No space"):
        save_meta_checkpoint(new.state_dict(), new.args, tmp / "out", num_shards=2, dtype=torch.float32, overwrite=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 2 and sorted(p.name for p in (tmp / "out").iterdir()) == before
    loaded = load_consolidated(tmp / "out")
    assert all(torch.equal(loaded[k], v) for k, v in old.state_dict().items())
    # a write killed outright leaves its staged files; the next write into the folder removes them
    (tmp / "out" / ".consolidated.00.pth.staged").write_bytes(b"half a shard")
    reshard(tmp / "mp1", tmp / "out", 1, overwrite=True)
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["consolidated.00.pth", "context.json", "params.json",
                                                               "tokenizer.model"]


def test_load_tp_slice_memory_is_one_slice(ckpt):
    # the slices of a 1-shard checkpoint narrow the mmapped file: no copy of the full tensor exists
    model, tmp = ckpt
    local = load_tp_slice(tmp / "mp1", 1, 2)
    wq = local["layers.0.attention.wq.weight"]  # rows 32..64: contiguous in the file, a view of it
    assert wq.untyped_storage().nbytes() == 64 * 64 * 4 and wq.storage_offset() == 32 * 64


def _meta_checkpoint_by_hand(sd: dict, args: ModelArgs, out, mp: int):
    """A Meta-layout checkpoint as an unrelated program writes it: plain torch.save, fp16, rope.freqs."""
    out.mkdir()
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "n_layers": args.n_layers, "norm_eps": args.norm_eps, "vocab_size": -1}
    (out / "params.json").write_text(json.dumps(params))
    rope = 1.0 / 10000.0 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
    for r in range(mp):
        shard = {k: (v if _split_dim(k) is None else v.chunk(mp, _split_dim(k))[r]).half().clone() for k, v in sd.items()}
        shard["rope.freqs"] = rope.half()
        torch.save(shard, out / f"consolidated.{r:02d}.pth")


def test_done_means_hand_written_meta_checkpoint_matches_transformers(tmp_path):
    """A random MP=2 fp16 Meta checkpoint with rope.freqs loads here and gives transformers' logits.

    transformers 5.23 no longer ships convert_llama_weights_to_hf.py (neither wheel nor sdist), so
    the reference uses the piece of transformers that still turns Meta-ordered (interleaved-RoPE)
    q/k rows into its own order: LlamaTensorProcessor._reverse_permute_weights, which its GGUF loader
    applies to llama.cpp files (those keep Meta's row order). Key renaming is done here by hand.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    torch.manual_seed(3)
    args = _args(n_kv_heads=2, vocab_size=96)
    sd = {k: v.half() for k, v in _random_model(n_kv_heads=2, vocab_size=96).state_dict().items()}
    _meta_checkpoint_by_hand(sd, args, tmp_path / "7B", mp=2)

    ours = load_model(tmp_path / "7B", dtype=torch.float32)
    assert ours.args.vocab_size == 96 and ours.args.n_kv_heads == 2

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=args.ffn_hidden_dim,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5, max_position_embeddings=64)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    hf_sd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    names = {"attention.wq": ("self_attn.q_proj", "attn_q"), "attention.wk": ("self_attn.k_proj", "attn_k"),
             "attention.wv": ("self_attn.v_proj", None), "attention.wo": ("self_attn.o_proj", None),
             "feed_forward.w1": ("mlp.gate_proj", None), "feed_forward.w3": ("mlp.up_proj", None),
             "feed_forward.w2": ("mlp.down_proj", None), "attention_norm": ("input_layernorm", None),
             "ffn_norm": ("post_attention_layernorm", None)}
    for i in range(2):
        for ours_name, (hf_name, gguf_name) in names.items():
            w = sd[f"layers.{i}.{ours_name}.weight"]
            if gguf_name is not None:
                w = torch.from_numpy(proc.process(w.float().numpy(), f"blk.{i}.{gguf_name}.weight").weights.copy())
            hf_sd[f"model.layers.{i}.{hf_name}.weight"] = w
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in hf_sd.items()}, strict=True)

    tokens = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        theirs, mine = hf(tokens).logits, ours(tokens)
    assert mine.abs().max() > 1.0
    torch.testing.assert_close(mine, theirs, atol=2e-3, rtol=1e-3)


def test_legacy_non_zip_shard_still_loads(ckpt):
    model, tmp = ckpt
    path = tmp / "mp1" / "consolidated.00.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    sd = load_consolidated(tmp / "mp1")
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_reshard_over_an_old_model_leaves_none_of_its_files(ckpt):
    """reshard --overwrite into a folder that held another model: that model's context.json and chat
    template (read as this model's context length and chat format) are gone; this model's are copied."""
    from llama.formats.meta import CONTEXT
    from llama.tokenizer import CHAT_TEMPLATE_FILE

    model, tmp = ckpt
    reshard(tmp / "mp1", tmp / "out", 2)
    (tmp / "out" / CONTEXT).write_text('{"max_seq_len": 4096}\n')
    (tmp / "out" / CHAT_TEMPLATE_FILE).write_text("{{ messages }}")
    reshard(tmp / "mp1", tmp / "out", 1, overwrite=True)
    assert (tmp / "out" / CONTEXT).read_text() == (tmp / "mp1" / CONTEXT).read_text()  # (max_seq_len 64)
    assert not (tmp / "out" / CHAT_TEMPLATE_FILE).exists() and load_params(tmp / "out").max_seq_len == 64
    (tmp / "mp1" / CONTEXT).unlink()  # a model at the default context: no context.json, and none left behind
    reshard(tmp / "mp1", tmp / "out", 2, overwrite=True)
    assert not (tmp / "out" / CONTEXT).exists()
    (tmp / "mp1" / CHAT_TEMPLATE_FILE).write_text("{{ ours }}")
    reshard(tmp / "mp1", tmp / "out", 2, overwrite=True)
    assert (tmp / "out" / CHAT_TEMPLATE_FILE).read_text() == "{{ ours }}"
    assert (tmp / "out" / "tokenizer.model").is_file()
    (tmp / "mp1" / "tokenizer.model").unlink()  # a model without a tokenizer beside it or one folder up
    (tmp / "tokenizer.model").unlink()
    reshard(tmp / "mp1", tmp / "out", 2, overwrite=True)
    assert not (tmp / "out" / "tokenizer.model").exists()  # not the earlier model's
    (tmp / "fresh").mkdir()  # a tokenizer put in a folder without a model stays
    (tmp / "fresh" / "tokenizer.model").write_bytes(b"the user's")
    reshard(tmp / "mp1", tmp / "fresh", 2)
    assert (tmp / "fresh" / "tokenizer.model").read_bytes() == b"the user's"
    # a byte-level BPE model (its vocabulary in tokenizer.gguf) resharded over one with a tokenizer.model,
    # with another tokenizer.model one folder up: its own vocabulary travels, and only that
    (tmp / "mp1" / "tokenizer.gguf").write_bytes(b"bpe vocabulary")
    (tmp / "tokenizer.model").write_bytes(b"another model's")
    reshard(tmp / "mp1", tmp / "fresh", 2, overwrite=True)
    assert (tmp / "fresh" / "tokenizer.gguf").read_bytes() == b"bpe vocabulary"
    assert not (tmp / "fresh" / "tokenizer.model").exists()
    # a save over a model, without a tokenizer: none of the replaced model's is left
    save_meta_checkpoint(model.state_dict(), model.args, tmp / "fresh", num_shards=1, overwrite=True)
    assert not (tmp / "fresh" / "tokenizer.gguf").exists() and not (tmp / "fresh" / "tokenizer.model").exists()


def test_a_training_run_folder_is_not_taken_for_a_transformers_one(ckpt, tmp_path):
    """A run's out_dir holds a config.json of its own (no model_type): it is not a transformers
    folder, and loading it names the exported model inside it; transformers' config.json still is."""
    from llama.formats.hf import is_hf_checkpoint

    _, tmp = ckpt
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "20M", "steps": 220, "out_dir": str(run)}))
    assert not is_hf_checkpoint(run)
    reshard(tmp / "mp1", run / "model", 1)
    with pytest.raises(FileNotFoundError, match=r"training run's folder; its exported model is .*run/model"):
        load_params(run)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert is_hf_checkpoint(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="holds config.json, not params.json: not Meta.s layout. A transformers checkpoint converts"):
        load_params(tmp_path / "hf")
