import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama.formats.hf import (args_from_hf_config, hf_to_meta, load_hf, permute_from_hf, permute_to_hf,  # noqa: E402
                              save_hf)
from llama.formats.meta import load_consolidated, load_model, save_meta_checkpoint  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402


def _random_model(**kw) -> Transformer:
    args = ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 96, "multiple_of": 32,
                        "norm_eps": 1e-5, "max_seq_len": 64, **kw})
    model = Transformer(args)
    with torch.no_grad():  # every weight random, norms included, so any misplaced tensor shows
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def _hf_logits(hf_dir, tokens):
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(tokens).logits


def test_permutation_by_hand():
    # one head of head_dim 6: Meta's rows are pairs (0,1) (2,3) (4,5); transformers wants the
    # first members of each pair, then the second members
    w = torch.arange(12.0).view(12, 1)  # two heads
    assert permute_to_hf(w, 2).flatten().tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    assert torch.equal(permute_from_hf(permute_to_hf(w, 2), 2), w)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "rope_theta": 500000.0, "ffn_dim_multiplier": 1.3}],
                         ids=["mha", "gqa"])
def test_ours_to_transformers_same_logits(tmp_path, kw):
    torch.manual_seed(0)
    model = _random_model(**kw)
    # small max_shard_size: sharded safetensors with an index
    save_hf(model.state_dict(), model.args, tmp_path, dtype=torch.float32, max_shard_size=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_key_value_heads"] == model.args.n_kv_heads
    tokens = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(tmp_path, tokens)
    assert (ours - theirs).abs().max() <= 1e-4
    assert ours.abs().max() > 1.0  # not trivially small logits


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_transformers_to_ours_same_logits(tmp_path, n_kv_heads):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=20000.0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 80, (2, 13))
    with torch.no_grad():
        theirs = hf(tokens).logits

    sd, args = load_hf(tmp_path / "hf")
    assert (args.n_kv_heads, args.rope_theta, args.ffn_hidden_dim, args.max_seq_len) == (n_kv_heads, 20000.0, 160, 64)
    with torch.device("meta"):
        ours = Transformer(args)
    ours.load_state_dict(sd, strict=True, assign=True)
    ours.init_buffers("cpu")
    with torch.no_grad():
        assert (ours(tokens) - theirs).abs().max() <= 1e-4

    # through Meta's layout, two shards, fp32
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=2, dtype=torch.float32)
    with torch.no_grad():
        assert (load_model(tmp_path / "meta")(tokens) - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("change, words", [
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unrepresentable_configs_are_refused(change, words):
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 32}
    assert args_from_hf_config(base).ffn_hidden_dim == 172
    with pytest.raises(ValueError, match=words):
        args_from_hf_config({**base, **change})


def test_scripts_round_trip_with_tokenizer(tmp_path, tiny_tokenizer):
    import runpy


    scripts = Path(__file__).resolve().parent.parent / "scripts"
    convert = runpy.run_path(str(scripts / "convert_hf.py"))["main"]
    reshard = runpy.run_path(str(scripts / "reshard.py"))["main"]
    torch.manual_seed(2)
    model = _random_model(vocab_size=tiny_tokenizer.n_words, n_layers=1, n_kv_heads=2)
    # Meta's layout: tokenizer.model one level above the model folder
    (tmp_path / "tokenizer.model").write_bytes(open(tiny_tokenizer.model_path, "rb").read())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "tiny", num_shards=2, dtype=torch.float32)

    convert(to="hf", src=str(tmp_path / "tiny"), dst=str(tmp_path / "hf"), dtype="fp32")
    text = "The model returns 1234 tokens: def f(x): return x * 2"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text)["input_ids"] == tiny_tokenizer.encode(text, bos=True, eos=False)
    tokens = torch.tensor([tiny_tokenizer.encode(text, bos=True, eos=False)])
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(tmp_path / "hf", tokens)).abs().max() <= 1e-4

    # the hf direction refuses an existing model folder as --to meta does (files untouched)
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"hf already holds a model .*\(--overwrite\)"):
        convert(to="hf", src=str(tmp_path / "tiny"), dst=str(tmp_path / "hf"), dtype="fp16")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before

    convert(to="meta", src=str(tmp_path / "hf"), dst=str(tmp_path / "back2"), num_shards=2, dtype="fp32")
    reshard(in_dir=str(tmp_path / "back2"), out_dir=str(tmp_path / "back1"), num_shards=1)
    back = load_consolidated(tmp_path / "back1")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "back1" / "tokenizer.model").read_bytes() == (tmp_path / "tokenizer.model").read_bytes()


def test_hf_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_hf(tmp_path)
    model = _random_model(n_layers=1)
    save_hf(model.state_dict(), model.args, tmp_path, max_shard_size=100_000)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists model-00002-of-00003\.safetensors, which is missing"):
        load_hf(tmp_path)
    save_hf(model.state_dict(), model.args, tmp_path, overwrite=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true but an lm_head\.weight that differs"):
        load_hf(tmp_path)


def test_resaving_into_one_file_drops_a_stale_sharded_index(tmp_path):
    args = ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    old, new = Transformer(args).state_dict(), Transformer(args).state_dict()
    save_hf(old, args, tmp_path, dtype=torch.float32, max_shard_size=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError, match=r"already holds a model \(config\.json, model-00001-of-.*overwrite"):
        save_hf(new, args, tmp_path, dtype=torch.float32)
    save_hf(new, args, tmp_path, dtype=torch.float32, overwrite=True)
    loaded, _ = load_hf(tmp_path)
    assert all(torch.equal(loaded[k], new[k]) for k in new)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_hf(tmp_path)


def test_resaving_one_file_as_shards_leaves_no_stale_single_file(tmp_path):
    """A model.safetensors from an earlier one-file save is gone once the folder holds shards:
    transformers reads model.safetensors before an index, so it would load the old weights."""
    torch.manual_seed(0)
    old, new = _random_model(), _random_model()
    save_hf(old.state_dict(), old.args, tmp_path, dtype=torch.float32)
    save_hf(new.state_dict(), new.args, tmp_path, dtype=torch.float32, max_shard_size=100_000, overwrite=True)
    assert not (tmp_path / "model.safetensors").exists()
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert (_hf_logits(tmp_path, tokens) - new(tokens)).abs().max() <= 1e-4


def test_an_overwrite_failing_halfway_keeps_the_old_model(tmp_path, monkeypatch):
    """The disk fills while the second of the new model's files is written: the folder still holds
    the old model whole (transformers loads it), and no staged file is left."""
    import safetensors.torch

    torch.manual_seed(0)
    old, new = _random_model(), _random_model()
    save_hf(old.state_dict(), old.args, tmp_path, dtype=torch.float32, max_shard_size=100_000)
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = safetensors.torch.save_file, []

    def fails_second(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_second)
    with pytest.raises(OSError, match="No space"):
        save_hf(new.state_dict(), new.args, tmp_path, dtype=torch.float32, max_shard_size=100_000, overwrite=True)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == before
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert (_hf_logits(tmp_path, tokens) - old(tokens)).abs().max() <= 1e-4


def test_special_tokens_come_from_the_tokenizer(tmp_path):
    """A tokenizer whose bos/eos are not Meta's 1/2 (bos 0, eos 1, pad 2, unk 3): config.json and
    tokenizer_config.json name its own ids and pieces, so transformers' tokenizer adds the model's
    bos, not a new token past the vocabulary."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"the quick fox {i} jumps over the lazy dog\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "odd"), vocab_size=64,
                                   bos_id=0, eos_id=1, pad_id=2, unk_id=3, bos_piece="<|begin|>",
                                   eos_piece="<|end|>", model_type="bpe", minloglevel=2)
    from llama.tokenizer import Tokenizer
    tok = Tokenizer(tmp_path / "odd.model")
    model = _random_model(vocab_size=tok.n_words)
    save_hf(model.state_dict(), model.args, tmp_path / "hf", tokenizer_path=tmp_path / "odd.model")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<|begin|>", "<|end|>", "<unk>")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = theirs("the fox")["input_ids"]
    assert ids[0] == 0 and max(ids) < tok.n_words
