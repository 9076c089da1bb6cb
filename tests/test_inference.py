"""llama.inference: completion against transformers, batch vs one-by-one, sampling by hand,
stop/eos/logprobs, streaming across split UTF-8 characters, errors, example.py, the decoders (eager,
compiled, fused CPU); and tensor-parallel generation on 2 and 4 ranks (tests/workers/generation.py)."""

import itertools
import json
import os
import platform
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths
from transformers import LlamaConfig, LlamaForCausalLM

from llama.chat import LLAMA2_CHAT_TEMPLATE
from llama.formats.hf import hf_config, save_hf, to_hf
from llama.inference import CompiledDecoder, Llama, make_decoder, sample
from llama.cpu_kernels import VARIANTS, cpu_kernel_variants, cpu_kernels
from llama.inference.cpu_decode import FusedCpuDecoder, ThreadCount, read_bandwidth
from llama.model import Transformer
from llama.quantize import Int8Linear, quantize_int8
from llama.tokenizer import TextStream
from tests.conftest import torchrun
from tests.helpers import GEN_LEN, PROMPTS, make_checkpoint, run_all, tiny_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    """The same random tiny model as a 1-shard and a 2-shard Meta checkpoint."""
    base = tmp_path_factory.mktemp("gen_ckpt")
    model = make_checkpoint(base / "one", tiny_tokenizer.model_path, num_shards=1)
    make_checkpoint(base / "two", tiny_tokenizer.model_path, num_shards=2)
    return {"one": base / "one", "two": base / "two", "model": model, "tokenizer": str(tiny_tokenizer.model_path)}


@pytest.fixture(scope="module")
def llama(ckpts):
    return Llama.build(str(ckpts["one"]), ckpts["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32")


def hf_greedy(model: Transformer, prompt_ids: list[list[int]], n: int, eos: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), on `model`'s weights."""
    cfg = LlamaConfig(**hf_config(model.args, torch.float32))
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf(model.state_dict(), model.args), strict=True)
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                            eos_token_id=eos, pad_token_id=eos)
        gen = y[0, len(ids):].tolist()
        out.append(gen[:gen.index(eos)] if eos in gen else gen)
    return out


def test_greedy_equals_transformers_and_one_by_one(llama, ckpts):
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 2  # ragged on purpose; 5 prompts > max_batch_size 3
    batched, _ = llama.generate(ids, GEN_LEN, temperature=0)
    alone = [llama.generate([i], GEN_LEN, temperature=0)[0][0] for i in ids]
    assert batched == alone
    assert batched == hf_greedy(ckpts["model"], ids, GEN_LEN, llama.tokenizer.eos_id)
    assert any(len(set(b)) > 3 for b in batched)  # not a degenerate repetition of one token


def test_two_shards_on_one_process_equal_one_shard(llama, ckpts):
    two = Llama.build(str(ckpts["two"]), ckpts["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32")
    assert run_all(two) == run_all(llama)


def test_sampling_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    assert sample(logits, 0.0).tolist() == [0] * 4000
    assert set(sample(logits, 1.0, top_k=1, generator=g).tolist()) == {0}
    # top_p 0.5: the prefix {0} already has mass 0.5; 0.6 needs {0, 1}; renormalised 5/8, 3/8
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    s = sample(logits, 1.0, top_p=0.6, generator=g)
    assert set(s.tolist()) == {0, 1}
    assert abs((s == 0).float().mean().item() - 5 / 8) < 0.03
    # top_k 3 then renormalise: 0.5/0.95, 0.3/0.95, 0.15/0.95
    s = sample(logits, 1.0, top_k=3, generator=g)
    freq = torch.bincount(s, minlength=4).float() / len(s)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03, rtol=0)
    # temperature 2 flattens: p ~ sqrt(p) renormalised
    s = sample(logits, 2.0, generator=g)
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(torch.bincount(s, minlength=4).float() / len(s), want / want.sum(), atol=0.03, rtol=0)


def test_sampling_draws_what_a_full_sort_draws():
    """top-k and top-p sample without sorting the whole vocabulary (the k largest by topk; for top-p
    alone, a prefix grown until it holds the nucleus): the same tokens as a full stable descending
    sort for the same generator state, over a 32000-token vocabulary, for peaked and flat
    distributions (a flat one needs the whole sort), a batch of rows, and bf16 logits, whose many
    equal probabilities a sort may order any way (stable: by token id)."""
    def by_full_sort(logits, temperature, top_p, top_k, generator):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        probs_sorted, idx = probs.sort(dim=-1, descending=True, stable=True)
        if top_k is not None:
            probs_sorted, idx = probs_sorted[:, :top_k], idx[:, :top_k]
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
        probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
        return idx.gather(-1, torch.multinomial(probs_sorted, 1, generator=generator)).squeeze(-1)

    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(1)) * 3
    ties = logits.to(torch.bfloat16).float()  # ~250 values per octave: long runs of equal probabilities
    assert ties[0].unique().numel() < 4000
    for x in (logits, ties):
        for temperature, top_p, top_k in ((0.8, 1.0, 40), (0.8, 0.9, 40), (0.8, 0.5, 1000), (0.6, 0.9, None),
                                          (0.3, 0.95, None), (1.0, 0.9, None), (20.0, 0.9, None)):
            for seed in range(3):
                got = sample(x, temperature, top_p, top_k, generator=torch.Generator().manual_seed(seed))
                want = by_full_sort(x, temperature, top_p, top_k, torch.Generator().manual_seed(seed))
                assert torch.equal(got, want), (x.dtype, temperature, top_p, top_k, seed)
            assert len(set(got.tolist())) > 8  # real draws, not one token
    # one row at a time too (generation's usual batch), with its generator carrying on
    g, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for row in ties[:16]:
        for top_k in (None, 40):
            assert torch.equal(sample(row[None], 0.7, 0.9, top_k, generator=g), by_full_sort(row[None], 0.7, 0.9, top_k, g_ref))


def test_seeded_sampling_is_reproducible(llama):
    llama.generator.manual_seed(5)
    a = llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.95, max_gen_len=8)
    llama.generator.manual_seed(5)
    b = llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.95, max_gen_len=8)
    assert a == b


def test_logprobs_echo_and_full_forward(llama):
    out = llama.text_completion(PROMPTS[:3], temperature=0, max_gen_len=6, logprobs=True, echo=True)
    model = llama.model
    for p, o in zip(PROMPTS[:3], out):
        ids = llama.tokenizer.encode(p, bos=True, eos=False)
        gen = llama.generate([ids], 6, temperature=0)[0][0]
        full = torch.tensor([ids + gen])
        with torch.no_grad():
            ref = torch.log_softmax(model(full).float(), -1)[0, :-1].gather(-1, full[0, 1:, None])[:, 0]
        assert len(o["logprobs"]) == len(ids) + len(gen) == len(o["tokens"])
        assert o["logprobs"][0] == 0.0  # bos has no logprob
        torch.testing.assert_close(torch.tensor(o["logprobs"][1:]), ref, atol=1e-4, rtol=0)
        assert o["generation"] == llama.tokenizer.decode(ids + gen)
    # without echo: only the generated tokens, and each logprob is the greedy maximum
    o = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=6, logprobs=True)[0]
    assert len(o["logprobs"]) == 6 and all(lp < 0 for lp in o["logprobs"])


class _EosAt:
    """The tokenizer with eos redefined as a given id, to force an early end."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_eos_stop_strings_and_max_gen_len(llama):
    tok = llama.tokenizer
    ids = [tok.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    greedy = llama.generate(ids, GEN_LEN, temperature=0)[0]
    # eos: the 4th greedy token of row 0 becomes "eos"; row 0 is cut there, the others go on
    forced = Llama(llama.model, _EosAt(tok, greedy[0][3]), 64, 3)
    cut = forced.generate(ids, GEN_LEN, temperature=0)[0]
    assert cut[0] == greedy[0][:3]
    for i in (1, 2):
        g = greedy[i]
        assert cut[i] == (g[:g.index(greedy[0][3])] if greedy[0][3] in g else g)
    # stop string: a piece of row 1's greedy text; the generation ends right before it
    text = tok.decode(greedy[1])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    res = llama.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=GEN_LEN, stop=[stop, "\x00never"])
    assert res[0]["generation"] == text[:text.index(stop)]
    assert "".join(llama.stream(PROMPTS[1], temperature=0, max_gen_len=GEN_LEN, stop=stop)) == text[:text.index(stop)]
    # max_gen_len: exactly that many tokens (no eos in sight), and up to max_seq_len by default
    assert [len(t) for t in llama.generate(ids, 4, temperature=0)[0]] == [4, 4, 4]
    with pytest.warns(UserWarning) as warned:  # asked for more than fits: said once, before generating
        row = llama.generate(ids[:1], 1000, temperature=0)[0][0]
    room = 64 - len(ids[0])
    assert [str(w.message) for w in warned] == [
        f"prompt 0 has {len(ids[0])} tokens: only {room} of max_gen_len=1000 tokens will be generated within "
        f"max_seq_len 64; build with a larger max_seq_len or shorten the prompt"]
    assert len(row) == room or tok.eos_id in greedy[0]
    with pytest.warns(UserWarning, match=r"^prompt 1 has .* \(1 more prompt\(s\) are cut short too\)"):
        llama.generate([ids[0][:1], ids[1], ids[2]], 64 - len(ids[1]) + 1, temperature=0)
    with warnings.catch_warnings():  # the default (up to max_seq_len) and a fitting length say nothing
        warnings.simplefilter("error")
        llama.text_completion(PROMPTS[:1], temperature=0)
        llama.generate(ids, 4, temperature=0)


def test_stream_equals_completion(llama):
    full = llama.text_completion(PROMPTS[2:3], temperature=0, max_gen_len=GEN_LEN)[0]["generation"]
    pieces = list(llama.stream(PROMPTS[2], temperature=0, max_gen_len=GEN_LEN))
    assert "".join(pieces) == full and len(pieces) > 1


def test_stream_text_across_split_utf8(tiny_tokenizer):
    text = "déjà vu: naïve café, 日本語 and ✓ emoji 🦙 end"
    ids = tiny_tokenizer.encode(text, bos=False, eos=False)
    n_byte = sum(tiny_tokenizer.sp.is_byte(i) for i in ids)
    assert n_byte >= 8  # the characters fall back to byte pieces, split over several tokens
    s = TextStream(tiny_tokenizer)
    pieces = [s.push([i]) for i in ids] + [s.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(p == "" for p in pieces) >= 5  # held back while a character was incomplete
    # a stop string is never shown, even when it arrives split over tokens
    s = TextStream(tiny_tokenizer, stop=["日本"])
    shown = "".join(s.push([i]) for i in ids) + s.finish()
    assert shown == text[:text.index("日本")] and s.stopped


def test_bad_inputs_are_clear_errors(llama, ckpts, tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        llama.text_completion(["a"], temperature=-0.1)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        llama.text_completion(["a"], top_p=0)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        llama.text_completion(["a"], top_p=1.5)
    for kw, want in [(dict(top_k=0), "top_k must be an integer >= 1"), (dict(top_k=2.0), "top_k must be an integer"),
                     (dict(temperature="0.5"), "temperature must be a number >= 0"),
                     (dict(max_gen_len=2.5), "max_gen_len must be an integer >= 1"),
                     (dict(max_gen_len=0), "max_gen_len must be an integer >= 1")]:
        with pytest.raises(ValueError, match=want):
            llama.text_completion(["a"], **kw)
        with pytest.raises(ValueError, match=want):  # when called, not at the first piece
            llama.stream("a", **kw)
    # numpy and torch numbers are numbers; a prompt may be a tensor of ids
    want = llama.generate([[1, 5, 6]], 3, temperature=0)[0]
    assert llama.generate([torch.tensor([1, 5, 6])], np.int64(3), temperature=np.float32(0), top_p=np.float32(0.9),
                          top_k=np.int64(4))[0] == want
    assert llama.text_completion(["a"], temperature=torch.tensor(0.0), max_gen_len=2)[0]["generation"] == \
        llama.text_completion(["a"], temperature=0, max_gen_len=2)[0]["generation"]
    for ids, bad in (([1, -5], -5), ([1, 512], 512), ([1, 2.0], 2.0)):
        with pytest.raises(ValueError, match=re.escape(f"prompt 0 holds {bad!r}, not a token id in [0, 512)")):
            llama.generate([ids], 3)
    with pytest.raises(ValueError, match="prompt 1 has .* tokens.*max_seq_len 64"):
        llama.text_completion(["a", "the " * 80])
    with pytest.raises(ValueError, match="list of strings"):
        llama.text_completion("a")
    too_many = [[1, 5]] * (llama.max_batch_size + 1)
    with pytest.raises(ValueError, match=f"at most max_batch_size={llama.max_batch_size} prompts, got {len(too_many)}"):
        next(llama.steps(too_many, 4))
    for tokenizer in (ckpts["tokenizer"], None):  # without one, still the checkpoint named, not a tokenizer sought
        with pytest.raises(FileNotFoundError, match="checkpoint directory .*nope does not exist"):
            Llama.build(str(tmp_path / "nope"), tokenizer, 64, 1)
    with pytest.raises(FileNotFoundError, match="tokenizer model .*nope.model does not exist"):
        Llama.build(str(ckpts["one"]), str(tmp_path / "nope.model"), 64, 1)
    with pytest.raises(ValueError, match="unknown dtype 'f32'; choose one of .*bf16"):
        Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 1, dtype="f32")
    with pytest.raises(ValueError, match="model_parallel_size 2 != 1 process"):
        Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 1, model_parallel_size=2)
    with pytest.raises(NotADirectoryError, match="consolidated.00.pth is a file, not a checkpoint directory"):
        Llama.build(str(ckpts["one"] / "consolidated.00.pth"), ckpts["tokenizer"], 64, 1)
    # a transformers folder loads as it is: the same completions as the Meta-layout checkpoint
    save_hf(ckpts["model"].state_dict(), ckpts["model"].args, tmp_path / "hf", tokenizer_path=ckpts["tokenizer"])
    from_hf = Llama.build(str(tmp_path / "hf"), None, 64, 3, dtype="float32")
    assert run_all(from_hf) == run_all(llama)
    # no tokenizer_path: the one beside the checkpoint, else one folder up (where Meta's releases keep it)
    assert Llama.build(str(ckpts["one"]), None, 64, 1, dtype="float32").tokenizer.sha256 == llama.tokenizer.sha256
    release = tmp_path / "release"
    (release / "7B").mkdir(parents=True)
    for f in ckpts["one"].iterdir():
        if f.name != "tokenizer.model":
            shutil.copy(f, release / "7B" / f.name)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer given for .*7B, and none at .*7B/tokenizer.model, "
                                                r".*7B/tokenizer.gguf, .*release/tokenizer.model: pass --tokenizer_path"):
        Llama.build(str(release / "7B"), None, 64, 1)
    shutil.copy(ckpts["tokenizer"], release / "tokenizer.model")
    found = Llama.build(str(release / "7B"), None, 64, 1, dtype="float32").tokenizer
    assert found.model_path == release / "tokenizer.model"
    # a checkpoint whose vocabulary is not the tokenizer's
    make_checkpoint(tmp_path / "v", ckpts["tokenizer"], vocab_size=256)
    with pytest.raises(ValueError, match="has 512 tokens but the model .* has vocab_size 256"):
        Llama.build(str(tmp_path / "v"), ckpts["tokenizer"], 64, 1)


# --- scripts/example.py end to end ---------------------------------------------------------------


def _example(*args, env=None, launcher=(sys.executable,), input=None):
    return subprocess.run([*launcher, str(ROOT / "scripts" / "example.py"), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          input=input)


def test_example_script_end_to_end(ckpts, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("The\n\nthey were her one\n")
    r = _example("--ckpt_dir", str(ckpts["two"]), "--tokenizer_path", ckpts["tokenizer"], "--prompt_file",
                 str(prompt_file), "--temperature", "0", "--max_gen_len", "8", "--max_seq_len", "64",
                 "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    ids = [[1] + Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 2, dtype="float32").tokenizer.encode(p, False, False)
           for p in ("The", "they were her one")]
    ref = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 2, dtype="float32")
    want = [ref.tokenizer.decode(t) for t in ref.generate(ids, 8, temperature=0)[0]]
    for w in want:
        assert w in r.stdout
    assert r.stdout.count("> The") == 1 and r.stdout.count("> they were her one") == 1
    # interactive: streams, then quits on EOF; int8 runs through the same path
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "example.py"), "--ckpt_dir", str(ckpts["one"]),
                        "--tokenizer_path", ckpts["tokenizer"], "--interactive", "--temperature", "0",
                        "--max_gen_len", "8", "--max_seq_len", "64", "--quantize", "int8"],
                       input="The\n", capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # a prompt longer than the context: said, and the next one is completed
    r = _example("--ckpt_dir", str(ckpts["one"]), "--interactive", "--temperature", "0", "--max_gen_len", "4",
                 "--max_seq_len", "32", "--dtype", "float32", input="the " * 40 + "\nThe\n")
    assert r.returncode == 0 and "(prompt 0 has" in r.stdout and r.stdout.count("prompt> ") == 3, r.stdout + r.stderr
    # bad path and bad option: one clear sentence, exit code 1, no traceback
    r = _example("--ckpt_dir", str(tmp_path / "missing"), "--tokenizer_path", ckpts["tokenizer"])
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _example("--ckpt_dir", str(ckpts["one"]), "--tokenizer_path", ckpts["tokenizer"], "--quantize", "int4")
    assert r.returncode == 1 and "int8" in r.stderr and "Traceback" not in r.stderr


# --- chat ------------------------------------------------------------------------------------------

DIALOGS = [
    [{"role": "user", "content": "what is the model"}],
    [{"role": "system", "content": "Be."}, {"role": "user", "content": "the data"},
     {"role": "assistant", "content": "it was one"}, {"role": "user", "content": "the value"}],
]


@pytest.fixture(scope="module")
def chat_llama(ckpts):
    """A context of 128: the chat format's tags take many pieces of the 512-piece tokenizer."""
    return Llama.build(str(ckpts["one"]), ckpts["tokenizer"], max_seq_len=128, max_batch_size=2, dtype="float32")


def chat_prompt_by_hand(tok, dialog) -> list[int]:
    """Meta's Llama 2 rendering written out: pairs bos "[INST] u [/INST] a " eos, then bos "[INST] u [/INST]"."""
    turns = [dict(m) for m in dialog]
    if turns[0]["role"] == "system":
        turns = [{"role": "user", "content": f"<<SYS>>\n{turns[0]['content']}\n<</SYS>>\n\n{turns[1]['content']}"}] + turns[2:]
    ids = []
    for u, a in zip(turns[:-1:2], turns[1::2]):
        ids += [tok.bos_id] + tok.encode(f"[INST] {u['content'].strip()} [/INST] {a['content'].strip()} ", False, False) + [tok.eos_id]
    return ids + [tok.bos_id] + tok.encode(f"[INST] {turns[-1]['content'].strip()} [/INST]", False, False)


def test_chat_completion_equals_transformers_on_the_chat_prompt(chat_llama, ckpts):
    """Greedy chat_completion = transformers' greedy generate from the hand-rendered chat prompt;
    Meta's return shape; streaming gives the same text; special tags and bad dialogs."""
    llama = chat_llama
    tok = llama.tokenizer
    out = llama.chat_completion(DIALOGS, temperature=0, max_gen_len=GEN_LEN, logprobs=True)
    want = hf_greedy(ckpts["model"], [chat_prompt_by_hand(tok, d) for d in DIALOGS], GEN_LEN, tok.eos_id)
    for o, w in zip(out, want):
        assert o["generation"] == {"role": "assistant", "content": tok.decode(w)}
        assert len(o["tokens"]) == len(o["logprobs"]) == len(w)
    assert "".join(llama.chat_stream(DIALOGS[1], temperature=0, max_gen_len=GEN_LEN)) == out[1]["generation"]["content"]
    unsafe = [{"role": "user", "content": "hi [INST] there"}]
    res = llama.chat_completion([unsafe, DIALOGS[0]], temperature=0, max_gen_len=GEN_LEN)
    assert res[0]["generation"]["content"] == "Error: special tags are not allowed as part of the prompt."
    assert res[1]["generation"] == out[0]["generation"]
    tok.chat_template = LLAMA2_CHAT_TEMPLATE  # a chat fine-tune's export carries it: still Llama 2's format, guarded
    try:
        assert llama.chat_completion([unsafe, DIALOGS[0]], temperature=0, max_gen_len=GEN_LEN) == res
        with pytest.raises(ValueError, match="special tags"):
            llama.chat_stream(unsafe, temperature=0, max_gen_len=GEN_LEN)
    finally:
        tok.chat_template = None
    with pytest.raises(ValueError, match="dialog 0: the last message must be from user"):
        llama.chat_completion([DIALOGS[1][:3]])
    with pytest.raises(ValueError, match="wrap one dialog"):
        llama.chat_completion(DIALOGS[0])


def test_chat_takes_top_k_and_stop_strings(chat_llama):
    """top_k and stop reach chat answers as they reach completions: top_k 1 at a high temperature is
    greedy, and a stop string cuts the answer before it (generation ends there)."""
    llama = chat_llama
    greedy = llama.chat_completion(DIALOGS, temperature=0, max_gen_len=GEN_LEN)
    for _ in range(2):  # Llama's own generator moves on: two different draws, both greedy under top_k 1
        assert llama.chat_completion(DIALOGS, temperature=5.0, top_k=1, max_gen_len=GEN_LEN) == greedy
    text = greedy[1]["generation"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = llama.chat_completion(DIALOGS, temperature=0, max_gen_len=GEN_LEN, stop=stop)
    assert cut[1]["generation"]["content"] == text[:text.index(stop)]
    assert "".join(llama.chat_stream(DIALOGS[1], temperature=0, max_gen_len=GEN_LEN, stop=[stop])) == text[:text.index(stop)]
    assert "".join(llama.chat_stream(DIALOGS[1], temperature=5.0, top_k=1, max_gen_len=GEN_LEN)) == text


def test_example_refuses_what_it_would_ignore_and_sizes_its_cache(ckpts, tmp_path, monkeypatch):
    """scripts/example.py: values the command line read as numbers or dicts, prompts that --interactive
    would drop, a prompt file with no prompt, int8 under torchrun (before loading), a GPU that is not
    there: one sentence each. The KV cache holds as many rows as there are prompts (one when typing)."""
    main = runpy.run_path(str(ROOT / "scripts" / "example.py"))["main"]
    one = str(ckpts["one"])
    for kw, want in [(dict(prompts=3.1), "--prompts must be text or a list of texts, got 3.1"),
                     (dict(prompts={"a": 1}), "--prompts must be text or a list of texts, got {'a': 1}"),
                     (dict(stop=1), "--stop must be text or a list of texts, got 1"),
                     (dict(interactive=True, prompts="hi"), "--interactive reads its prompts as you type them"),
                     (dict(device="cuda"), "sees no CUDA GPU")]:
        if kw.get("device") == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=re.escape(want)):
            main(ckpt_dir=one, max_seq_len=32, **kw)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="prompt file .*blank.txt holds no prompt"):
        main(ckpt_dir=one, prompt_file=str(tmp_path / "blank.txt"))
    with monkeypatch.context() as m:
        m.setenv("RANK", "0")
        m.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="--quantize int8 runs on one process"):
            main(ckpt_dir=str(tmp_path / "not_read"), quantize="int8")
    sizes = []

    def build(*args, max_batch_size, **kw):
        sizes.append(max_batch_size)
        raise KeyboardInterrupt

    monkeypatch.setattr(Llama, "build", build)
    for kw, want in [(dict(prompts=["a", "b"]), 2), (dict(), 4), (dict(max_batch_size=3), 3),
                     (dict(interactive=True), 1), (dict(chat=True), 1)]:
        with pytest.raises(KeyboardInterrupt):
            main(ckpt_dir=one, **kw)
        assert sizes[-1] == want, kw


def test_example_chat_keeps_the_dialog(chat_llama, ckpts):
    """scripts/example.py --chat with two messages on stdin: each answer equals chat_completion of the
    dialog so far (so the first exchange is kept in the second prompt); /reset forgets it; EOF ends."""
    llama = chat_llama
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "example.py"), "--ckpt_dir", str(ckpts["one"]),
                        "--tokenizer_path", ckpts["tokenizer"], "--chat", "--temperature", "0", "--max_gen_len",
                        str(GEN_LEN), "--max_seq_len", "128", "--dtype", "float32", "--system", "Be."],
                       input="the data\nthe value\n/reset\nthe value\n", capture_output=True, text=True,
                       timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "an empty line or Ctrl-D leaves" in r.stdout
    system = {"role": "system", "content": "Be."}
    u1, u2 = ({"role": "user", "content": c} for c in ("the data", "the value"))
    a1 = llama.chat_completion([[system, u1]], temperature=0, max_gen_len=GEN_LEN)[0]["generation"]
    a2 = llama.chat_completion([[system, u1, a1, u2]], temperature=0, max_gen_len=GEN_LEN)[0]["generation"]
    fresh = llama.chat_completion([[system, u2]], temperature=0, max_gen_len=GEN_LEN)[0]["generation"]
    assert a2["content"] != fresh["content"], "the test needs the kept dialog to change the answer"
    answers = [part.split("\nuser> ")[0] for part in r.stdout.split("assistant> ")[1:]]
    assert answers == [a1["content"], a2["content"], fresh["content"]]
    assert "(new dialog)" in r.stdout


# --- the decoders ---------------------------------------------------------------------------------


def test_decoder_choice_and_errors(llama):
    assert make_decoder(llama.model, "eager").name == "eager"
    with pytest.raises(ValueError, match="unknown decoder 'fast'; choose one of"):
        make_decoder(llama.model, "fast")
    with pytest.raises(ValueError, match="the compiled decoder runs on one process"):
        make_decoder(llama.model, "compiled", world_size=2)


@pytest.mark.slow
def test_compiled_decoder_gives_the_same_tokens(llama):
    """torch.compile of the model's own forward with tensor positions: one graph for every step,
    the eager model's tokens (no second copy of the layer to drift from it). Greedy decoding runs
    whole steps (model, argmax, bookkeeping) in one graph: same tokens for ragged batches and rows
    stopping at eos early; sampling runs the compiled one-token forward: same draws as eager."""
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    eager = Llama(llama.model, llama.tokenizer, 64, 3, decoder="eager")
    want = eager.generate(ids, GEN_LEN, temperature=0)[0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Llama(llama.model, llama.tokenizer, 64, 3, decoder=CompiledDecoder(llama.model, cuda_graphs=False), seed=5)
    with mock.patch.object(compiled.decoder, "greedy", wraps=compiled.decoder.greedy) as spy:
        assert compiled.generate(ids, GEN_LEN, temperature=0)[0] == want
        assert compiled.generate(ids[1:], GEN_LEN, temperature=0)[0] == want[1:]
    assert spy.call_count >= 2 * (GEN_LEN - 1)  # the decoding steps went through the whole-step graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # one per batch size, not per position

    early = want[0][2]  # make the third token of row 0 the end of text
    stub = mock.Mock(wraps=llama.tokenizer, eos_id=early)
    cut = [r[:r.index(early)] if early in r else r for r in want]
    assert Llama(llama.model, stub, 64, 3, decoder=compiled.decoder).generate(ids, GEN_LEN, temperature=0)[0] == cut
    assert cut[0] == want[0][:2]

    sampled = Llama(llama.model, llama.tokenizer, 64, 3, decoder="eager", seed=5).generate(ids, GEN_LEN, temperature=1.0)[0]
    with mock.patch.object(compiled.decoder, "step", wraps=compiled.decoder.step) as spy:
        assert compiled.generate(ids, GEN_LEN, temperature=1.0)[0] == sampled != want
    assert spy.call_count >= GEN_LEN - 1


def test_packed_projections_compute_what_the_separate_ones_do():
    """The compiled decoder's packing (wq|wk|wv and w1|w3 as one matrix each): the same logits as the
    unpacked model to rounding, no memory added (the parameters are views of the packed matrices, so
    an in-place update reaches both), the model unchanged outside the decoder's calls, LoRA layers
    left as they are; int8 layers packed with their scales, to the same logits."""
    from llama.inference.decoders import PackedProjections
    from llama.lora import apply_lora

    def storage_bytes(tensors):
        return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())

    torch.manual_seed(0)
    model = Transformer(tiny_args(n_kv_heads=2)).eval()  # grouped-query: wk, wv narrower than wq
    model.init_weights(std=0.08)
    tokens = torch.randint(0, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(tokens)
        names = list(model.state_dict())
        nbytes = storage_bytes(model.parameters())
        packs = PackedProjections(model)
        assert len(packs.packed) == 2 * model.args.n_layers
        att = model.layers[0].attention
        with packs:
            assert att.wqkv is not None and att.wqkv.weight.data_ptr() == att.wq.weight.data_ptr()
            got = model(tokens)
        assert att.wqkv is None and model.layers[0].feed_forward.w13 is None  # unchanged outside
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert list(model.state_dict()) == names
        assert storage_bytes(model.parameters()) == nbytes
        att.wk.weight.mul_(2.0)  # an in-place change of a parameter is what the packed matrix holds
        with packs:
            changed = model(tokens)
        torch.testing.assert_close(changed, model(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, want)

    with torch.inference_mode():  # packed where generation runs, the model still trains afterwards
        PackedProjections(model)
    model(tokens).sum().backward()
    assert att.wq.weight.grad is not None

    lora = apply_lora(Transformer(tiny_args()), r=2, targets=("wq", "wv"))
    assert len(PackedProjections(lora).packed) == lora.args.n_layers  # the feed-forwards only

    int8 = quantize_int8(model.requires_grad_(False))
    with torch.no_grad():
        want, names, nbytes = int8(tokens), list(int8.state_dict()), storage_bytes(int8.buffers())
        packs = PackedProjections(int8)
        assert len(packs.packed) == 2 * int8.args.n_layers
        w13 = int8.layers[1].feed_forward.w13
        with packs:
            w13 = int8.layers[1].feed_forward.w13
            got = int8(tokens)
        assert w13.weight.dtype == torch.int8 and w13.scales.data_ptr() == int8.layers[1].feed_forward.w1.scales.data_ptr()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert list(int8.state_dict()) == names and storage_bytes(int8.buffers()) == nbytes
        int8.layers[1].feed_forward.w3.scales.mul_(0.5)  # the packed scales are the layers' own
        with packs:
            changed = int8(tokens)
        torch.testing.assert_close(changed, int8(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, want)


def test_compiled_step_writes_the_kv_cache_in_place():
    """A compiled one-token step writes its keys and values where they lie in the cache: inductor's
    code allocates no buffer of a layer's cache size (writing through a view of the cache once made
    it copy the whole cache each step, ~11% of a 7B-shaped step on an H200), and the cache holds what
    the eager step writes."""
    from torch._inductor.utils import run_and_get_code

    from llama.inference.decoders import _decode_step
    from llama.model import KVCache

    args = tiny_args(max_seq_len=48)
    torch.manual_seed(0)
    model = Transformer(args).eval().requires_grad_(False)
    caches = [KVCache(args.n_layers, 1, 48, args.n_kv_heads, args.head_dim) for _ in range(2)]
    for c in caches:
        model(torch.tensor([[7, 8, 9]]), 0, c)  # a prompt
    torch._dynamo.reset()
    step = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        _, code = run_and_get_code(step, model, torch.tensor([[5]]), caches[0], torch.tensor([3]))
        model(torch.tensor([[5]]), 3, caches[1])
    code = "".join(code)
    assert "extern_kernels.mm" in code  # the step's code, matrix products and all
    assert f"((1, 48, {args.n_kv_heads}, {args.head_dim})" not in code
    torch.testing.assert_close(caches[0].k, caches[1].k)
    torch.testing.assert_close(caches[0].v, caches[1].v)
    assert caches[0].k[:, 0, 3].abs().sum() > 0


def test_compiled_decoder_refuses_cuda_graphs_off_cuda():
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        make_decoder(Transformer(tiny_args()), "compiled", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the GPU check)")
def test_cuda_graph_decoder_gives_the_cpu_tokens(llama):
    """On CUDA the compiled decoder replays one captured graph per batch size (greedy: the whole
    step) and GPU generation asks whether every row is done only every 16 steps: the CPU's eager
    greedy tokens still come out, for ragged batches, rows that stop at eos early, and after the
    weights change (the graphs are captured again)."""
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    weights = {k: v.cpu() for k, v in llama.model.state_dict().items()}
    cpu_model = Transformer(llama.model.args).eval().requires_grad_(False)
    cpu_model.load_state_dict(weights)
    cpu = Llama(cpu_model, llama.tokenizer, 64, 3, decoder="eager")
    want = cpu.generate(ids, GEN_LEN, temperature=0)[0]
    model = Transformer(llama.model.args).to("cuda").eval().requires_grad_(False)
    model.load_state_dict(weights)
    torch._dynamo.reset()
    gpu = Llama(model, llama.tokenizer, 64, 3, decoder="compiled")
    assert gpu.decoder.cuda_graphs
    replay = torch.cuda.CUDAGraph.replay
    with mock.patch.object(torch.cuda.CUDAGraph, "replay", autospec=True, side_effect=replay) as spy:
        assert gpu.generate(ids, GEN_LEN, temperature=0)[0] == want
        assert gpu.generate(ids[:1], GEN_LEN, temperature=0)[0] == want[:1]  # a second batch size, a second graph
    assert spy.call_count >= 2 * (GEN_LEN - 1)

    early = want[0][2]  # the third token of row 0 made the end of text: cut there, the others as they were
    stub = mock.Mock(wraps=llama.tokenizer, eos_id=early)
    cut = [r[:r.index(early)] if early in r else r for r in want]
    assert Llama(model, stub, 64, 3, decoder=gpu.decoder).generate(ids, GEN_LEN, temperature=0)[0] == cut

    with torch.no_grad():  # new weights at new addresses
        for p in cpu_model.parameters():
            p.mul_(1.5)
    want2 = cpu.generate(ids, GEN_LEN, temperature=0)[0]
    model.load_state_dict({k: v.to("cuda") for k, v in cpu_model.state_dict().items()}, assign=True)
    assert gpu.generate(ids, GEN_LEN, temperature=0)[0] == want2 != want


def _kernel_or_skip(variant=None):
    """The fused CPU kernel (`variant`, default: the one Llama.build picks). Skip where it cannot
    exist (a CPU without its instructions, no C++ compiler); fail where it should but did not build."""
    runnable = cpu_kernel_variants()
    if variant is not None and variant not in runnable:
        pytest.skip(f"this CPU cannot run the {variant} kernel (it runs {runnable})")
    if not runnable or shutil.which("c++") is None:
        pytest.skip("the fused CPU decoding kernel needs AVX512-BF16, AVX2+FMA or NEON and a C++ compiler")
    kernel = cpu_kernels(variant)
    if kernel is None:
        pytest.fail(f"the fused CPU decoding kernel ({variant or runnable}) did not build on a machine that has what "
                    "it needs (see the warning)")
    return kernel


def _decode_logits(model, tokens, decoder=None, prefill=4):
    """Prefill tokens[:, :prefill] eagerly, then decode the rest one position at a time (with the fused
    `decoder` or the model itself) -> (B, T - prefill, V) float logits and the cache."""
    cache = model.new_cache(tokens.size(0) + 1, tokens.size(1), device="cpu", dtype=next(model.parameters()).dtype)
    with torch.inference_mode():
        model(tokens[:, :prefill], 0, cache)
        steps = [(decoder or model)(tokens[:, t:t + 1], t, cache).float() for t in range(prefill, tokens.size(1))]
    return torch.cat(steps, 1), cache


def _fused_tiny(dtype, variant, **shape):
    """A tiny fp64 model (weights at std 0.08: peaked next-token distributions), its copy in `dtype`,
    and the fused decoder (`variant`'s build) of that copy; skips where the build cannot run."""
    ref = Transformer(tiny_args(**shape)).double().eval()
    ref.init_weights(std=0.08)
    model = Transformer(ref.args).to(dtype).eval()
    model.load_state_dict(ref.state_dict())
    _kernel_or_skip(variant)
    return ref, model, FusedCpuDecoder.create(model, variant)


def _fused_step_agrees(model, exact, decoder, tokens, tol) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `tokens` with the fused `decoder`, the eager `model` and the fp64 `exact` model: the fused
    logits and cache equal the eager ones to `tol` of their scale (bf16: a layer's keys round one ulp
    apart where the layer below differed by one), and the fused logits are as
    close to the exact ones as the eager model's are. Returns (fused logits, exact logits)."""
    fused, fused_cache = _decode_logits(model, tokens, decoder)
    eager, eager_cache = _decode_logits(model, tokens)
    want, _ = _decode_logits(exact, tokens)
    scale = want.abs().max()
    assert (fused - eager).abs().max() < tol * scale
    assert (fused - want).abs().max() < 1.5 * (eager - want).abs().max() + tol / 2 * scale
    for got, ref in ((fused_cache.k, eager_cache.k), (fused_cache.v, eager_cache.v)):  # to tol of the cache's scale
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)
    return fused, want


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [dict(), dict(dim=48, n_heads=4, n_kv_heads=2, multiple_of=8, vocab_size=97),
                                   dict(dim=40, n_heads=4, n_kv_heads=1, multiple_of=4, vocab_size=97),
                                   dict(dim=320, n_heads=20, n_kv_heads=4, multiple_of=32, vocab_size=97),
                                   dict(dim=96, n_heads=2, n_kv_heads=1, multiple_of=32, vocab_size=97),
                                   dict(dim=256, n_heads=2, n_kv_heads=1, multiple_of=32, vocab_size=97)])
def test_fused_cpu_decoder_matches_the_model(shape, dtype, variant):
    """The fused C++ decoding step (each instruction-set build this CPU runs: an AVX-512 machine
    checks its AVX2 build too) against the eager model: same rounding points in bf16, so the logits
    and cache agree to bf16 resolution, and both are as close to an exact (fp64) run; in fp32 it
    agrees with the model to fp32 accuracy. The second shape has grouped-query heads, head_dim 12,
    K = 48 (the kernels' tails) and a vocabulary of 97 rows; the third one kv head, head_dim 10 and
    K = 40 and 108 (no whole number of 16- or 32-element blocks); the fourth 20 query heads on 4 kv
    heads (the attention's scores go 16 heads at a time, then 4, and a kv head's 5 query heads straddle
    the two groups); the fifth head_dim 48 (attention's bf16 blocks of 32 or 16 in slot order, then
    a tail of 16 on AVX-512); the sixth head_dim 128 (the scores' dot blocks unrolled for D = 4 W,
    as 64 is for 2 W). 20 positions: the values' blocks of 8 positions end in a part-block."""
    torch.manual_seed(0)
    ref = Transformer(tiny_args(**shape)).double().eval()
    ref.init_weights(std=0.08)
    model = Transformer(ref.args).to(dtype).eval()
    model.load_state_dict(ref.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _kernel_or_skip(variant)
    decoder = FusedCpuDecoder.create(model, variant)
    assert decoder.variant == variant
    # packing is a transform: same keys and values; q/k/v (and w1/w3) share one buffer, not a copy
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    attn = model.layers[1].attention
    assert attn.wk.weight.data_ptr() == attn.wq.weight.data_ptr() + attn.wq.weight.nbytes
    assert decoder.valid()
    tokens = torch.randint(0, ref.args.vocab_size, (3, 20))
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5  # a few bf16 steps, sums in another order
    for rows in (1, 3):
        fused, exact = _fused_step_agrees(model, ref, decoder, tokens[:rows], tol)
        assert (fused.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    # once the parameters are replaced, the decoder says so (Llama then re-packs or decodes eagerly)
    model.double()
    assert not decoder.valid() and FusedCpuDecoder.create(model) is None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cpu_decoder_shares_work_between_threads(dtype, variant):
    """On two threads with 5 rows and up to 40 positions, the step's attention hands whole rows out
    from a shared counter and its products share their rows' units (a thread helps from the back of
    the other's): the logits and cache still match the eager model's (the mutations of either kind
    of sharing tried, a head or a unit left out, fail here)."""
    torch.manual_seed(0)
    ref, model, decoder = _fused_tiny(dtype, variant, dim=256, n_heads=4, multiple_of=64)
    tokens = torch.randint(0, ref.args.vocab_size, (5, 40))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _fused_step_agrees(model, ref, decoder, tokens, 0.02 if dtype == torch.bfloat16 else 1e-5)
    finally:
        torch.set_num_threads(threads)


def test_products_hand_out_every_row_once_and_help_a_slow_thread():
    """shared_rows on two threads, units of 3 rows: every row runs exactly once (-1: never, -2: twice),
    with both threads at full speed and with thread 1 spinning 50 us before each of its units (a core
    another process slows). Then thread 0, done with its half at once, takes halves of what thread 1
    has left from the back: thread 1 keeps its first take (a quarter of its 166 units) and a few
    more, thread 0 runs ~860 of the 1000 rows; split once by halves (no help), it would run 500
    whatever the timing, so more than 600 (a margin for a busy machine's scheduling) means help."""
    kernel = _kernel_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (7, 1000, 1001):
            who = kernel.shared_rows_owners(n, 3, 0.0)
            assert ((who == 0) | (who == 1)).all(), (n, who[(who != 0) & (who != 1)])
        who = kernel.shared_rows_owners(1000, 3, 50.0)
        assert ((who == 0) | (who == 1)).all(), who[(who != 0) & (who != 1)]
        ran = [(who == t).sum().item() for t in (0, 1)]
        assert ran[0] > 600, ran
    finally:
        torch.set_num_threads(threads)


def test_step_team_runs_every_piece_once_and_returns_errors():
    """A decoding step runs as one team of threads (one OpenMP region a step; its parallel pieces
    handed out at spin barriers with at::parallel_for's ranges). On two threads, 20 pieces in a row
    over 1001 items (grain 1), 100 (grain 64: two ranges of 50) and 10 (grain 16: one range, thread
    0's): every item once a piece, by the thread at::parallel_for would give it. An item that throws,
    on either thread, comes back as its RuntimeError, and the next team runs (no thread left behind)."""
    kernel = _kernel_or_skip()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def want(n, first):
            return torch.tensor([0] * first + [1] * (n - first), dtype=torch.int32).expand(20, n)
        for n, grain, first in ((1001, 1, 501), (100, 64, 50), (10, 16, 10)):
            who = kernel.team_owners(n, grain, 20, -1)
            assert torch.equal(who, want(n, first)), (n, grain, who.unique(return_counts=True))
        for fail_at in (900, 3):  # thread 1's item, thread 0's
            with pytest.raises(RuntimeError, match=f"team_owners: item {fail_at} failed"):
                kernel.team_owners(1001, 1, 3, fail_at)
            assert torch.equal(kernel.team_owners(1001, 1, 20, -1), want(1001, 501))
    finally:
        torch.set_num_threads(threads)


def test_fused_step_error_inside_the_team_leaves_it_usable():
    """A layer whose feed-forward is narrower than layer 0's passes the per-layer checks and fails
    inside the step (at layer 1, after layer 0's pieces ran on both threads): the error names the
    layer, and the next step on the same threads gives the logits of a step that never saw it."""
    torch.manual_seed(0)
    _, model, decoder = _fused_tiny(torch.bfloat16, None, dim=64, n_heads=4, n_layers=2, multiple_of=32, max_seq_len=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m, layers = model, list(decoder.layers)
        hidden, h2 = layers[5].size(1), layers[5].size(1) - 32
        layers[10] = torch.cat([layers[10][:h2], layers[10][hidden:hidden + h2]]).contiguous()
        layers[11] = layers[11][:, :h2].contiguous()
        ids = torch.tensor([5, 7])

        def step(ls, cache):
            return decoder.kernel.decode_step(m.tok_embeddings(ids).contiguous(), ls, m.norm.weight, m.output.weight,
                                              decoder.scales, cache.k, cache.v, 0, m.freqs_cis[0].float(),
                                              m.args.norm_eps, m.args.n_heads, m.args.n_kv_heads)
        with torch.inference_mode():
            want = step(decoder.layers, model.new_cache(2, 8, dtype=torch.bfloat16))
            with pytest.raises(RuntimeError, match="layer 1's q\\|k\\|v, wo or w2 do not match"):
                step(layers, model.new_cache(2, 8, dtype=torch.bfloat16))
            assert torch.equal(step(decoder.layers, model.new_cache(2, 8, dtype=torch.bfloat16)), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_steps_do_not_depend_on_the_thread_count(dtype, variant):
    """With the attention's chunks held at 2 threads (Weights.split, as ThreadCount's decoder holds
    them), a step on one thread gives the logits of a step on two to the last bit: 1 and 3 rows at
    100 positions (one row's positions in 2 chunks on 2 threads), a vocabulary of 198 (each thread's
    range of output rows leaves rows outside its units of 4). Then the decoder's own steps on a
    count forced to 1 give its steps' logits on 2."""
    torch.manual_seed(0)
    ref, model, decoder = _fused_tiny(dtype, variant, dim=256, n_heads=4, multiple_of=64, vocab_size=198, max_seq_len=128)
    kernel, threads = decoder.kernel, torch.get_num_threads()
    decoder._weights.split = 2
    try:
        for rows in (1, 3):
            cache = model.new_cache(rows, 128, dtype=dtype)
            cache.k.normal_()
            cache.v.normal_()
            ids = torch.randint(0, 198, (rows,))
            got = []
            for n in (2, 1):
                torch.set_num_threads(n)
                k, v = cache.k.clone(), cache.v.clone()
                got.append(kernel.decode_ids(decoder._weights, ids, 100, k, v))
            assert torch.equal(got[0], got[1]), (rows, (got[0] - got[1]).abs().max())
        torch.set_num_threads(2)
        tokens = torch.randint(0, 198, (1, 90))
        want, _ = _decode_logits(model, tokens, decoder, prefill=60)
        decoder.threads.cur = 1  # as if another process had made one thread faster,
        decoder.threads.left = 10**9  # and kept it so (no trial of both threads)
        got, _ = _decode_logits(model, tokens, decoder, prefill=60)
        assert decoder.threads.cur == 1 and torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("rows", [4, 8])
def test_fused_step_rounds_every_logit(rows, variant):
    """A bf16 step over a vocabulary of 20001: every logit is a bf16 value (a range left unrounded
    would show; rounding is idempotent, so one rounded twice would not), and on two threads the
    logits equal those of one. 4 rows: the rounding is its own pass over the rows, shared between the
    threads past 64K values with AVX-512 (32K with AVX2); 8 rows: it rides on turning the product's
    transposed sums into rows, 16 columns at a time on both threads, the last column alone."""
    torch.manual_seed(0)
    _, model, decoder = _fused_tiny(torch.bfloat16, variant, vocab_size=20001, max_seq_len=16)
    kernel, threads = decoder.kernel, torch.get_num_threads()
    decoder._weights.split = 2
    cache = model.new_cache(rows, 16, dtype=torch.bfloat16)
    ids = torch.randint(0, 20001, (rows,))
    try:
        got = []
        for n in (2, 1):
            torch.set_num_threads(n)
            got.append(kernel.decode_ids(decoder._weights, ids, 0, cache.k.clone(), cache.v.clone()))
        assert got[0].shape == (rows, 20001) and torch.equal(got[0], got[0].bfloat16().float())
        assert torch.equal(got[0], got[1])
    finally:
        torch.set_num_threads(threads)


def test_thread_count_follows_the_measured_step_times():
    """ThreadCount on 4 threads, fed step times: steady steps stay on 4; three steps 2x slower than
    the best start a trial of 3, 2 and 1 threads (a step each), and the fastest is kept; on fewer
    threads, all 4 are tried again after 16 steps, then 32 while they lose, and taken back once
    faster. One slow step alone starts nothing."""
    tc = ThreadCount(4)
    chosen = []

    def steps(times: dict, n: int) -> None:  # n steps, each taking times[threads it ran on]
        for _ in range(n):
            k = tc.trial[0] if tc.trial else tc.cur
            chosen.append(k)
            tc.observe(k, times[k])

    calm = {4: 10.0, 3: 12.0, 2: 16.0, 1: 30.0}
    steps(calm, 10)
    tc.observe(4, 25.0)  # one hiccup
    steps(calm, 5)
    assert set(chosen) == {4} and tc.cur == 4 and not tc.trial
    busy = {4: 100.0, 3: 40.0, 2: 45.0, 1: 27.0}  # another process on one core
    chosen.clear()
    steps(busy, 3 + 3)  # three slow steps, then a step on each of 3, 2 and 1
    assert chosen == [4, 4, 4, 3, 2, 1] and tc.cur == 1
    chosen.clear()
    steps(busy, 16 + 1 + 32 + 1)  # retried after 16 steps (4 loses), then after 32
    assert chosen == [1] * 16 + [4] + [1] * 32 + [4] and tc.cur == 1 and tc.retry == 64
    chosen.clear()
    steps(calm, 64 + 1 + 3)  # the other process gone: 4 wins its next trial and stays
    assert chosen[64] == 4 and tc.cur == 4 and set(chosen[65:]) == {4}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [dict(dim=64, n_heads=2), dict(dim=128, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=97),
                                   dict(dim=30, n_heads=3, n_kv_heads=1, multiple_of=27, vocab_size=97)])
def test_fused_prefill_matches_the_model(shape, dtype, int8, variant):
    """A prompt chunk through the kernel's `prefill` (each build this CPU runs) against the eager
    model and an exact fp64 one: the last position's logits and everything written to the cache.
    Chunks from position 0 (150 positions: a whole block of 128 queries and a ragged one; 7
    positions) and after 20 cached ones; 1 and 3 rows, 4 (600 positions: the bf16 and int8 products
    of the AVX-512 build without bf16 dots go through torch's fp32 ones from 512 on), and 9 (more
    than the decoding step's output product takes: the last positions' logits through the prefill
    products). Head size 32 in the first two shapes (the AVX512-BF16 build's attention kernel),
    grouped-query heads in the second; the third has head size 10, one kv head and hidden size 81 (the vector passes' tails, sdpa
    attention, tails of the product tiles, an odd K). int8 models too (the exact model holds the
    dequantized weights)."""
    _kernel_or_skip(variant)
    torch.manual_seed(0)
    ref = Transformer(tiny_args(n_layers=2, max_seq_len=300, **shape)).double().eval()
    ref.init_weights(std=0.08)
    model = Transformer(ref.args).to(dtype).eval()
    model.load_state_dict(ref.state_dict())
    if int8:
        quantize_int8(model)
        ref.load_state_dict(_dequantized_state(model))
    decoder = FusedCpuDecoder.create(model, variant)
    assert decoder.prefills and decoder.int8 == int8
    tokens = torch.randint(0, ref.args.vocab_size, (9, 170))
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    for rows, start, length in ((3, 0, 150), (1, 0, 7), (4, 20, 150), (9, 0, 5)):
        x = tokens[:rows]
        logits, caches = {}, {}
        for name, run, net in (("fused", decoder, model), ("eager", model, model), ("exact", ref, ref)):
            caches[name] = net.new_cache(rows + 1, 300, dtype=next(net.parameters()).dtype)
            with torch.inference_mode(), mock.patch.object(decoder, "kernel", wraps=decoder.kernel) as spy:
                if start:
                    net(x[:, :start], 0, caches[name])
                logits[name] = run(x[:, start:start + length], start, caches[name], last_only=True).float()
            assert spy.prefill.call_count == (name == "fused")
        fused, eager, want = (logits[k] for k in ("fused", "eager", "exact"))
        assert fused.shape == (rows, 1, ref.args.vocab_size)
        scale = want.abs().max()
        assert (fused - eager).abs().max() < tol * scale
        assert (fused - want).abs().max() < 1.5 * (eager - want).abs().max() + tol / 2 * scale
        end = start + length
        for part in ("k", "v"):  # the chunk's positions, written as the eager model writes them; nothing past them
            got, exp = getattr(caches["fused"], part), getattr(caches["eager"], part)
            torch.testing.assert_close(got[:, :rows, :end].float(), exp[:, :rows, :end].float(), atol=tol * 4, rtol=tol)
            assert not got[:, :, end:].any() and not got[:, rows:].any()


@pytest.mark.parametrize("variant", ["avx512bf16", "avx512"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_products_match_fp64(dtype, variant):
    """The AVX-512 builds' prefill product (`linear_rows`: bf16 pairs in the native bf16 dot, or
    everything widened to fp32 in the build without it) against the fp64 product rounded once to
    the dtype, and with `add` against the residual add the model rounds (out + round(x w^T)). Shapes:
    300 positions at K = 2000 (groups of positions: 256 in bf16 pairs, 128 in fp32, the last ragged;
    8 or 16 panels of K, the last short), 202 weight rows (a last task of 10: tiles of 6 and 4 rows,
    Y columns narrower than 16; the next task's panels prefetched); 7 positions at K = 64 (a single
    16-position vector, one panel); 1013 weight rows (11 tasks: threads take their own range's tasks
    a few at a time, then another's from its back; a task dropped leaves NaN, one run twice adds
    twice). int8 weights with a scale per row too (widened a panel of a task's rows at a time)."""
    kernel = _kernel_or_skip(variant)
    torch.manual_seed(0)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24  # of a result rounded to the dtype
    for M, K, N in ((300, 2000, 202), (7, 64, 48), (20, 64, 1013)):
        x, w = torch.randn(M, K).to(dtype), (torch.randn(N, K) / K**0.5).to(dtype)
        exact = x.double() @ w.double().T
        sums = 2.0**-20 * (x.double().abs() @ w.double().abs().T)  # fp32 accumulation over K terms, a loose bound
        out = torch.full((M, N), float("nan"), dtype=dtype)
        kernel.linear_rows(x, w, out, False, torch.empty(0))
        assert ((out.double() - exact).abs() <= half_ulp * exact.abs() + sums).all()
        y0 = torch.randn(M, N).to(dtype)
        out = y0.clone()
        kernel.linear_rows(x, w, out, True, torch.empty(0))
        want = y0.double() + exact
        assert ((out.double() - want).abs() <= half_ulp * (2 * want.abs() + 2 * exact.abs()) + sums).all()
        # int8 weights with a scale per row: Int8Linear's round(round(x q^T) * scale)
        q, scales = torch.randint(-127, 128, (N, K), dtype=torch.int8), (torch.rand(N) / K**0.5).to(dtype)
        exact = (x.double() @ q.double().T) * scales.double()
        sums = 2.0**-20 * (x.double().abs() @ q.double().abs().T) * scales.double()
        out = torch.full((M, N), float("nan"), dtype=dtype)
        kernel.linear_rows(x, q, out, False, scales)
        assert ((out.double() - exact).abs() <= 2 * half_ulp * exact.abs() + sums).all()


def _dequantized_state(model) -> dict:
    """An int8 model's state dict in fp64 with each int8 weight dequantized (q * its row's scale)
    and the scales dropped: the weights an unquantized model computes exactly what int8 stands for."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        scales = sd.get(k.removesuffix("weight") + "scales") if k.endswith(".weight") else None
        if not k.endswith(".scales"):
            out[k] = v.double() * scales.double()[:, None] if scales is not None else v.double()
    return out


def _greedy(model, prompt, steps, decoder=None):
    """Greedy continuation of prompt (B, P): the prompt through the model, then `steps` one-token
    steps (with `decoder` or the model) each fed its own argmax -> (B, steps) ids and the (B, steps,
    V) logits each id is the argmax of."""
    cache = model.new_cache(prompt.size(0), prompt.size(1) + steps, device="cpu",
                            dtype=next(model.parameters()).dtype)
    with torch.inference_mode():
        ids, logits = [], [model(prompt, 0, cache)[:, -1:].float()]  # (B, 1, V)
        for t in range(steps):
            ids.append(logits[-1].argmax(-1))  # (B, 1)
            logits.append((decoder or model)(ids[-1], prompt.size(1) + t, cache).float())
    return torch.cat(ids, 1), torch.cat(logits[:-1], 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [dict(), dict(dim=48, n_heads=4, n_kv_heads=2, multiple_of=8, vocab_size=97)])
def test_fused_cpu_decoder_runs_int8_models(shape, dtype, variant):
    """An int8 model (quantize_int8: projections, output and embedding) through the fused step,
    against the eager int8 model on the same quantized weights: logits agree to the dtype's
    resolution (bf16: each product rounded to bf16 before its scale, as Int8Linear does; fp32: sums
    in another order), both are as close to an exact fp64 model holding the dequantized weights, and
    16 greedy tokens are the same, batch 1 and 3 (in bf16: up to a step where the eager model itself
    scores the two tokens within bf16 rounding, a near-tie). The second shape has grouped-query
    heads and K = 48 (not a whole number of 32-element int8 pairs of blocks)."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(**shape)).to(dtype).eval()
    model.init_weights(std=0.08)
    partial = Transformer(model.args).to(dtype).eval()
    partial.output = Int8Linear.from_linear(partial.output)  # int8 output, bf16/fp32 layers: no kernel takes it
    assert FusedCpuDecoder.create(partial, variant) is None
    quantize_int8(model)
    exact = Transformer(model.args).double().eval()
    exact.load_state_dict(_dequantized_state(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _kernel_or_skip(variant)
    decoder = FusedCpuDecoder.create(model, variant)
    assert decoder is not None and decoder.int8 and decoder.variant == variant
    # packing moves the int8 weights and the scales (buffers) into one buffer per layer, values unchanged
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    attn = model.layers[1].attention
    assert attn.wk.weight.data_ptr() == attn.wq.weight.data_ptr() + attn.wq.weight.nbytes
    assert attn.wk.scales.data_ptr() == attn.wq.scales.data_ptr() + attn.wq.scales.nbytes
    tokens = torch.randint(0, model.args.vocab_size, (3, 20))
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    for rows in (1, 3):
        _fused_step_agrees(model, exact, decoder, tokens[:rows], tol)
        (ids, _), (want_ids, want_logits) = (_greedy(model, tokens[:rows, :4], 16, d) for d in (decoder, None))
        differ = (ids != want_ids).any(0).nonzero()
        if dtype == torch.float32 or not len(differ):
            assert torch.equal(ids, want_ids)
        else:  # the first step where a row differs: a near-tie of the eager model, at most a step or two of bf16
            t = differ[0, 0]
            scores = want_logits[:, t]  # (rows, V)
            gap = scores.gather(1, want_ids[:, t:t + 1]) - scores.gather(1, ids[:, t:t + 1])
            assert (gap <= 2 * 2.0 ** -7 * scores.abs().max()).all(), (t, gap)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("int8", [False, True])
def test_fused_cpu_decoder_every_batch_size(int8, variant):
    """Batches of 1 to 8 rows (each its own register tiling of the products: up to 4 weight rows per
    tile, the rows left over one by one) against the eager model on the same weights, bf16 or int8
    with bf16 scales: two decoding steps agree to bf16 resolution. dim 40 and hidden 108: K is no
    whole number of vector blocks; q|k|v 80, w1|w3 216, vocabulary 97 output rows: no whole number
    of tiles."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=40, n_heads=4, n_kv_heads=1, multiple_of=4, vocab_size=97)).to(torch.bfloat16).eval()
    model.init_weights(std=0.08)
    if int8:
        quantize_int8(model)
    _kernel_or_skip(variant)
    decoder = FusedCpuDecoder.create(model, variant)
    assert decoder is not None and decoder.int8 == int8
    tokens = torch.randint(0, model.args.vocab_size, (8, 6))
    for rows in range(1, 9):
        fused, fused_cache = _decode_logits(model, tokens[:rows], decoder)
        eager, eager_cache = _decode_logits(model, tokens[:rows])
        assert (fused - eager).abs().max() < 0.02 * eager.abs().max(), rows
        torch.testing.assert_close(fused_cache.k, eager_cache.k, atol=0.02, rtol=0.02)



@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_decoder_attention_over_long_contexts(dtype, variant):
    """Rows fewer than the threads: each row's cache positions are cut into chunks, one per thread,
    whose partial softmax sums are merged (from 64 positions). 1 and 3 rows decoding positions 4 to
    150 with 4 threads (chunks of 2 to 4, ragged; at dim 256 the threads split the (row, chunk,
    head) items mid-row) against the same decoder on one thread (one chunk): the same logits to the
    dtype's resolution, as close to an exact (fp64) model as the eager model's are, and in fp32 the
    eager model's cache (in bf16, 146 steps of other sum orders drift a few cache values by more
    than a bf16 step, on one thread as well)."""
    torch.manual_seed(0)
    ref, model, decoder = _fused_tiny(dtype, variant, dim=256, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=97, n_layers=2)
    tokens = torch.randint(0, ref.args.vocab_size, (3, 150))
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    threads = torch.get_num_threads()
    try:
        for rows in (1, 3):
            torch.set_num_threads(1)
            one, _ = _decode_logits(model, tokens[:rows], decoder)
            torch.set_num_threads(4)
            fused, fused_cache = _decode_logits(model, tokens[:rows], decoder)
            eager, eager_cache = _decode_logits(model, tokens[:rows])
            want, _ = _decode_logits(ref, tokens[:rows])
            scale = want.abs().max()
            assert (fused - one).abs().max() < tol * scale
            assert (fused - want).abs().max() < 1.5 * (eager - want).abs().max() + tol / 2 * scale
            if dtype == torch.float32:
                torch.testing.assert_close(fused_cache.k, eager_cache.k, atol=tol, rtol=tol)
                torch.testing.assert_close(fused_cache.v, eager_cache.v, atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_greedy_step_is_the_python_step(dtype, int8, variant):
    """The kernel's whole greedy step (look-up, decoding step, argmax, bookkeeping in one call)
    against decoders.greedy_step run on the same kernel's logits: the same tokens, done flags,
    position and cache after every step, bit for bit, for rows of different prompt lengths, one
    reaching its end early and one stopping at eos, int8 embeddings and projections included; 5 and
    8 rows take the argmax over the output product's transposed sums; 9 rows (over MAX_ROWS) go
    through the eager model. A token id outside the vocabulary is an error that says so."""
    from llama.inference.decoders import DecodeState, greedy_step
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=48, n_heads=4, n_kv_heads=2, multiple_of=8, vocab_size=97)).to(dtype).eval()
    model.init_weights(std=0.08)
    if int8:
        quantize_int8(model)
    _kernel_or_skip(variant)
    decoder = FusedCpuDecoder.create(model, variant)
    assert decoder.whole_greedy_steps

    def by_python(x, cache=None, input_pos=None):  # decoders.greedy_step's model call, through the kernel
        return decoder(x, int(input_pos[0]), cache)

    def run(rows, eos, step):
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 5, 8, 4, 6, 3, 7, 5, 4)[:rows]]
        ends = [min(len(p) + 12, 20) for p in prompts]
        ends[1] = len(prompts[1]) + 2  # row 1 reaches its end early
        ends[2] = len(prompts[2]) + 8  # and with it every row is done by step 12
        state = DecodeState(rows, 24, "cpu")
        state.start(prompts, ends)
        cache = model.new_cache(rows, 24, dtype=dtype)
        history = []
        with torch.inference_mode():
            model(state.tokens[:, :3], 0, cache)  # the shortest prompt
            state.cur.fill_(3)
            for _ in range(16):
                finished = step(cache, state, eos)  # the kernel's says whether every row is done
                assert finished is None or (step == decoder.greedy_step and finished == bool(state.done.all()))
                history.append([t.clone() for t in (state.tokens, state.done, state.cur, cache.k, cache.v)])
        return history

    torch.manual_seed(1)
    free = run(3, -1, decoder.greedy_step)
    eos = int(free[-1][0][0, 5])  # row 0's token at position 5 (written by step 2) becomes eos: it stops there
    for rows, e in ((3, -1), (5, -1), (8, eos), (9, eos), (3, eos)):
        torch.manual_seed(1)
        got = run(rows, e, decoder.greedy_step)
        torch.manual_seed(1)
        want = run(rows, e, lambda c, s, e: greedy_step(model if rows > 8 else by_python, c, s, e))
        for g, w in zip(got, want):
            assert all(torch.equal(a, b) for a, b in zip(g, w))
    done = torch.stack([h[1] for h in got])  # (step, row) of the last case
    assert done[2:, 0].all() and not done[:2, 0].any()  # row 0 stopped at eos (position 5)
    assert done[3:, 1].all() and not done[:3, 1].any()  # row 1 reached its end (position 6, step 3)
    assert not done[:8, 2].any() and got[-1][0][0, 6] == -1  # row 2 goes on; past eos row 0 writes nothing
    assert done[12:].all() and not done[11].all()
    # a one-token step from the ids (what sampling runs) is decode_step on the looked-up rows, bit for bit
    tokens = torch.randint(0, 97, (3, 6))
    caches = [model.new_cache(3, 8, dtype=dtype) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(tokens[:, :5], 0, cache)
        by_ids = decoder(tokens[:, 5:], 5, caches[0])
        m = model
        by_rows = decoder.kernel.decode_step(m.tok_embeddings(tokens[:, 5]).contiguous(), decoder.layers, m.norm.weight,
                                             m.output.weight, decoder.scales, caches[1].k, caches[1].v, 5,
                                             m.freqs_cis[5].float(), m.args.norm_eps, m.args.n_heads, m.args.n_kv_heads)
    assert torch.equal(by_ids[:, 0], by_rows) and torch.equal(caches[0].k, caches[1].k)
    with pytest.raises(RuntimeError, match="decode_ids: token id 97 of row 0 is outside the embedding's 97 rows"):
        decoder(torch.tensor([[97]]), 5, caches[0])
    if not int8:  # torch.argmax's ties (the first) and NaN (the first, above any number), on rows or transposed
        for (row, fill, want_id), rows in itertools.product(((None, 0.0, 0), (7, float("nan"), 7)), (3, 8)):
            with torch.no_grad():
                model.output.weight.zero_()
                if row is not None:
                    model.output.weight[row:row + 2] = fill
            torch.manual_seed(1)
            got = run(rows, -1, decoder.greedy_step)
            torch.manual_seed(1)
            assert all(torch.equal(a, b) for a, b in zip(got[-1], run(rows, -1, lambda c, s, e: greedy_step(by_python, c, s, e))[-1]))
            assert (got[-1][0][2, 8:16] == want_id).all()  # row 2's generated tokens
    state = DecodeState(1, 8, "cpu")
    state.start([[1, 200]], [6])
    state.cur.fill_(2)
    with pytest.raises(RuntimeError, match="token id 200 of row 0 is outside the embedding's 97 rows"):
        decoder.greedy_step(model.new_cache(1, 8, dtype=dtype), state, -1)

# The fused kernel's vector primitives (cpu_kernels.cpp between "[primitives begin]" and "[primitives
# end]", no torch in them) compiled alone for one instruction set and checked against plain scalar
# code: bf16 rounding (torch's round-to-nearest-even, `f2b`) of arbitrary bit patterns and exact ties,
# bf16 -> fp32 of every bf16 value (in order and as even/odd pairs), the dot blocks (bf16, fp32,
# int8 weights against fp32 and bf16 inputs) against a double sum, the lane sums of 1-37 registers
# against double sums, exp against std::exp.
_PRIMITIVES_CHECK = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>
PRIMITIVES
static uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float fl(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static int fails = 0;
#define CHECK(c, ...) do { if (!(c) && fails++ < 10) { std::printf(__VA_ARGS__); std::printf("\n"); } } while (0)
int main() {
  std::mt19937 g(0);
  std::vector<float> xs;
  for (int i = 0; i < 200000; ++i) xs.push_back(fl(g()));                      // every class of float
  for (int i = 0; i < 2000; ++i) xs.push_back(fl((g() & 0xffff0000u) | 0x8000u));  // exact ties
  for (float x : {INFINITY, -INFINITY, NAN, fl(0x7f800001u), fl(0x7f7fffffu), 0.f, -0.f}) xs.push_back(x);
  while (xs.size() % N) xs.push_back(1.f);
  for (size_t i = 0; i < xs.size(); i += N) {
    bf16 out[N]; float r[N];
    E<bf16>::store(out, V::load(&xs[i]));
    V::store(r, E<bf16>::rnd(V::load(&xs[i])));
    for (int j = 0; j < N; ++j) {
      const float x = xs[i + j];
#ifdef LLAMA_ISA_AVX512BF16
      if (std::fpclassify(x) == FP_SUBNORMAL) continue;  // vcvtneps2bf16 flushes them to zero
#endif
      if (std::isnan(x)) { CHECK(std::isnan(b2f(out[j])) && std::isnan(r[j]), "NaN %08x lost", bits(x)); continue; }
      CHECK(out[j] == f2b(x), "store_bf16(%08x) = %04x, want %04x", bits(x), out[j], f2b(x));
      CHECK(bits(r[j]) == (uint32_t)f2b(x) << 16, "rnd_bf16(%08x) = %08x", bits(x), bits(r[j]));
    }
  }
  for (uint32_t b = 0; b < 65536; b += N) {
    bf16 in[N]; float o[N];
    for (int j = 0; j < N; ++j) in[j] = (bf16)(b + j);
    V::store(o, V::load_bf16(in));
    for (int j = 0; j < N; ++j) CHECK(bits(o[j]) == (b + j) << 16, "load_bf16(%04x) = %08x", b + j, bits(o[j]));
  }
  for (uint32_t b = 0; b < 65536; b += 2 * N) {  // pair_part: 2N bf16 as the even ones, then the odd ones
    bf16 in[2 * N]; float e[N], o[N];
    for (int j = 0; j < 2 * N; ++j) in[j] = (bf16)((b + 2731u * j) & 0xffffu);
    V::store(e, V::pair_part(in, 0));
    V::store(o, V::pair_part(in, 1));
    for (int j = 0; j < N; ++j)
      CHECK(bits(e[j]) == (uint32_t)in[2 * j] << 16 && bits(o[j]) == (uint32_t)in[2 * j + 1] << 16, "pair_part at %04x", in[2 * j]);
  }
  std::normal_distribution<float> normal;
  for (int blocks = 1; blocks <= 9; ++blocks) {
    const int K = blocks * 32;
    std::vector<bf16> wb(K), xb(K);
    std::vector<float> wf(K), xf(K);
    double want_b = 0, want_f = 0, mag_b = 0, mag_f = 0;
    for (int k = 0; k < K; ++k) {
      wf[k] = normal(g); xf[k] = normal(g); wb[k] = f2b(wf[k]); xb[k] = f2b(xf[k]);
      want_b += (double)b2f(wb[k]) * b2f(xb[k]); mag_b += std::fabs((double)b2f(wb[k]) * b2f(xb[k]));
      want_f += (double)wf[k] * xf[k]; mag_f += std::fabs((double)wf[k] * xf[k]);
    }
    F ab = V::zero(), af = V::zero();
    std::vector<E<bf16>::X> xp(K);  // the input row as the products prepare it
    E<bf16>::prep(xb.data(), 1, K, xp.data());
    for (int k = 0; k < K; k += E<bf16>::W) ab = E<bf16>::dot(ab, &wb[k], &xp[k]);
    for (int k = 0; k < K; k += E<float>::W) af = E<float>::dot(af, &wf[k], &xf[k]);
    CHECK(std::fabs(V::sum(ab) - want_b) <= 1e-6 * mag_b, "bf16 dot of %d: %g, want %g", K, V::sum(ab), want_b);
    CHECK(std::fabs(V::sum(af) - want_f) <= 1e-6 * mag_f, "fp32 dot of %d: %g, want %g", K, V::sum(af), want_f);
  }
  for (int blocks = 1; blocks <= 9; ++blocks) {  // int8 weights (the full range, -128 too) . fp32 or bf16 input
    const int K = blocks * 2 * I8_BLOCK;
    std::vector<int8_t> wq(K);
    std::vector<float> xf(K);
    std::vector<bf16> xb(K);
    double want = 0, mag = 0, want_b = 0, mag_b = 0;
    for (int k = 0; k < K; ++k) {
      wq[k] = (int8_t)(g() & 0xff); xf[k] = normal(g); xb[k] = f2b(xf[k]);
      want += (double)wq[k] * xf[k]; mag += std::fabs((double)wq[k] * xf[k]);
      want_b += (double)wq[k] * b2f(xb[k]); mag_b += std::fabs((double)wq[k] * b2f(xb[k]));
    }
    using DF = Dot<int8_t, float>;
    F a = V::zero();
    for (int k = 0; k < K; k += DF::W) a = DF::dot(a, &wq[k], &xf[k]);
    CHECK(std::fabs(V::sum(a) - want) <= 1e-6 * mag, "int8 dot of %d: %g, want %g", K, V::sum(a), want);
    // AVX512-BF16: the bf16 dot on int8 widened to bf16 (one-row products with VBMI: by look-up, 64
    // weights a block, the input reordered by prep); else as DF. Whole blocks, then the tail as is
    auto bf16_dot = [&](auto d) {
      using DB = decltype(d);
      std::vector<typename DB::X> xp(K);  // the bf16 input as the products prepare it
      DB::prep(xb.data(), 1, K, xp.data());
      F ab = V::zero();
      int k = 0;
      for (; k + DB::W <= K; k += DB::W) ab = DB::dot(ab, &wq[k], &xp[k]);
      double got = V::sum(ab);
      for (; k < K; ++k) got += DB::w(wq[k]) * DB::x(xp[k]);
      return got;
    };
    const double got_b = bf16_dot(Dot<int8_t, bf16>()), got_r = bf16_dot(Dot<int8_t, bf16, true>());
    CHECK(std::fabs(got_b - want_b) <= 1e-6 * mag_b, "int8 . bf16 dot of %d: %g, want %g", K, got_b, want_b);
    CHECK(std::fabs(got_r - want_b) <= 1e-6 * mag_b, "int8 . bf16 one-row dot of %d: %g, want %g", K, got_r, want_b);
  }
  for (int i = 0; i < 200000; i += N) {
    float x[N], e[N];
    for (int j = 0; j < N; ++j) x[j] = -87.f + 175.f * (i + j) / 200000;
    V::store(e, vexp(V::load(x)));
    for (int j = 0; j < N; ++j)
      CHECK(std::fabs(e[j] / std::exp((double)x[j]) - 1) < 5e-7, "exp(%.9g) = %.9g", x[j], e[j]);
  }
  for (int n = 1; n <= 37; ++n) {  // lane sums of n registers (AVX-512: trees of 16 and of 4, then one by one)
    std::vector<F> regs(n);
    std::vector<double> want(n, 0.0), mag(n, 0.0);
    for (int i = 0; i < n; ++i) {
      float lanes[N];
      for (int j = 0; j < N; ++j) { lanes[j] = normal(g); want[i] += lanes[j]; mag[i] += std::fabs(lanes[j]); }
      regs[i] = V::load(lanes);
    }
    std::vector<float> got(n);
    lane_sums(regs.data(), n, got.data());
    for (int i = 0; i < n; ++i) CHECK(std::fabs(got[i] - want[i]) <= 1e-6 * mag[i], "lane_sums of %d: [%d] %g, want %g", n, i, got[i], want[i]);
  }
  float big[N], tiny[N];
  V::store(big, vexp(V::set1(1000.f)));
  V::store(tiny, vexp(V::set1(-1000.f)));
  CHECK(std::isfinite(big[0]) && big[0] > 1e38f && tiny[0] >= 0 && tiny[0] < 1e-37f, "exp(+-1000) = %g, %g", big[0], tiny[0]);
  std::printf(fails ? "%d FAILED\n" : "ok\n", fails);
  return fails != 0;
}
"""



@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_greedy_argmax_over_transposed_logits(dtype, variant):
    """From 5 rows the kernel's greedy step takes its argmax over the output product's transposed
    sums, rounding as it goes: 8 rows over a vocabulary of 1100 (two threads' ranges of 32-column
    blocks, 12 columns past the last block) pick what torch.argmax picks on the step's own logit rows,
    with output rows 40 and 700 equal and large (a tie across the two ranges: the first), with row
    1095 (past the blocks) larger still for some rows, and with a NaN or an infinity in the logits."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=48, n_heads=4, n_kv_heads=2, multiple_of=8, vocab_size=1100)).to(dtype).eval()
    model.init_weights(std=0.08)
    _kernel_or_skip(variant)
    w = model.output.weight
    tokens = torch.randint(0, 1100, (8, 6))
    v, w0 = torch.randn(48, dtype=dtype), w.detach().clone()
    for case in ("tie", "tail", "nan", "inf"):
        with torch.no_grad():
            w.copy_(w0)
            w[40] = w[700] = 4 * v  # the largest for the rows whose hidden state leans along v
            if case == "tail":
                w[1095] = 8 * v * (torch.arange(48) % 2)  # larger where v's odd half leans the same way
            if case == "nan":
                w[333, 5] = float("nan")
            if case == "inf":
                w[900] = 1e38 * v
        decoder = FusedCpuDecoder.create(model, variant)
        caches = [model.new_cache(8, 8, dtype=dtype) for _ in range(2)]
        with torch.inference_mode():
            for cache in caches:
                model(tokens[:, :5], 0, cache)
            want = decoder(tokens[:, 5:], 5, caches[0])[:, 0].argmax(-1)  # torch.argmax of the rounded rows
            state = torch.cat([tokens, torch.zeros(8, 2, dtype=torch.long)], 1)
            decoder.kernel.greedy_step(decoder._weights, state, torch.zeros(8, 8, dtype=torch.bool),
                                       torch.zeros(8, dtype=torch.bool), torch.full((8,), 8), torch.tensor([6]),
                                       caches[1].k, caches[1].v, -1)
        assert torch.equal(state[:, 6], want), case
        assert {"tie": (want == 40).any(), "tail": (want == 1095).any(), "nan": (want == 333).all(),
                "inf": (want == 900).any()}[case], (case, want)
        assert not (want == 700).any()

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_vector_primitives_against_scalar_code(variant, tmp_path):
    """Each instruction set's primitives (see _PRIMITIVES_CHECK) where this machine runs them:
    natively, or NEON under qemu-aarch64 when the aarch64 cross compiler and qemu are installed
    (apt-get install g++-aarch64-linux-gnu qemu-user)."""
    if variant in cpu_kernel_variants():
        compiler, run, static = shutil.which("c++"), [], []
    elif variant == "neon":
        compiler, run, static = shutil.which("aarch64-linux-gnu-g++"), [shutil.which("qemu-aarch64")], ["-static"]
    else:
        pytest.skip(f"this CPU cannot run the {variant} kernel")
    if compiler is None or None in run:
        pytest.skip(f"no compiler (or qemu) to check the {variant} primitives here")
    src = (ROOT / "llama" / "cpu_kernels.cpp").read_text()
    primitives = src[src.index("// [primitives begin]"):src.index("// [primitives end]")]
    (tmp_path / "check.cpp").write_text(_PRIMITIVES_CHECK.replace("PRIMITIVES", primitives))
    flags = ["-std=c++17", "-O2", f"-DLLAMA_ISA_{variant.upper()}", *VARIANTS[variant][1], *static]
    subprocess.run([compiler, *flags, str(tmp_path / "check.cpp"), "-o", str(tmp_path / "check")], check=True)
    out = subprocess.run([*run, str(tmp_path / "check")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "neon"])
def test_x86_kernel_builds_that_this_cpu_cannot_run_compile(variant, tmp_path):
    """An x86 build this CPU cannot run (e.g. AVX512-BF16 on a Xeon without it) still compiles here,
    intrinsics and all (-O0: the instruction-set checks of the intrinsics happen when they are
    inlined, which -fsyntax-only skips): the builds this CPU runs are built and checked by the tests
    above, and this one would otherwise first be compiled on its users' machines."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("not an x86 machine")
    if variant in cpu_kernel_variants():
        pytest.skip(f"this CPU runs the {variant} kernel: the tests above build and check it")
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    out = subprocess.run([compiler, "-std=c++20", "-O0", "-c", "-fPIC", "-fopenmp", f"-DLLAMA_ISA_{variant.upper()}",
                          *VARIANTS[variant][1], f"-DTORCH_EXTENSION_NAME=llama_cpu_kernels_{variant}", *includes,
                          str(ROOT / "llama" / "cpu_kernels.cpp"), "-o", str(tmp_path / "kernels.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def _aarch64_compiler(tmp_path) -> list[str] | None:
    """A C++ compiler command for aarch64 Linux: the GNU cross compiler where installed, else the
    clang inside the `ziglang` package (a test extra on x86), which ships no omp.h: the host GCC's
    (declarations only) is put on its include path. None where neither is here."""
    gnu = shutil.which("aarch64-linux-gnu-g++")
    if gnu is not None:
        return [gnu]
    try:
        import ziglang
    except ImportError:
        return None
    host = shutil.which("c++")
    omp = subprocess.run([host, "-print-file-name=include/omp.h"], capture_output=True, text=True).stdout.strip() if host else ""
    if not os.path.isabs(omp) or not os.path.exists(omp):
        return None
    (tmp_path / "omp").mkdir()
    shutil.copy(omp, tmp_path / "omp" / "omp.h")
    return [str(Path(ziglang.__file__).parent / "zig"), "c++", "-target", "aarch64-linux-gnu", f"-I{tmp_path / 'omp'}",
            "-Wno-ignored-attributes", "-Wno-unused-command-line-argument"]


@pytest.mark.slow
def test_neon_kernel_compiles_for_aarch64(tmp_path):
    """The whole NEON build of cpu_kernels.cpp (with torch's headers) compiles for aarch64, to an
    object file (-O0: intrinsics are checked as they are inlined), by the GNU cross compiler or
    zig's clang: this x86 machine cannot link it against an aarch64 torch or run it."""
    compiler = _aarch64_compiler(tmp_path)
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (pip install ziglang, or apt-get install g++-aarch64-linux-gnu)")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    out = subprocess.run([*compiler, "-std=c++20", "-O0", "-c", "-fPIC", "-fopenmp", "-DLLAMA_ISA_NEON",
                          "-DTORCH_EXTENSION_NAME=llama_cpu_kernels_neon", *includes,
                          str(ROOT / "llama" / "cpu_kernels.cpp"), "-o", str(tmp_path / "kernels.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    head = (tmp_path / "kernels.o").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, "not an aarch64 object (e_machine 183)"


def test_avx512bf16_kernel_compiles_where_the_cpu_cannot_run_it():
    """The AVX512-BF16 build of cpu_kernels.cpp (with torch's headers) type-checks on an x86 CPU
    without those instructions (where it runs, the other tests build and run it): the code the
    builds share is changed on whichever machine a session gets."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None:
        pytest.skip("needs an x86 machine with a C++ compiler")
    if "avx512bf16" in cpu_kernel_variants():
        pytest.skip("this CPU builds and runs the AVX512-BF16 kernel itself (the tests above)")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    out = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-DLLAMA_ISA_AVX512BF16",
                          *VARIANTS["avx512bf16"][1], "-DTORCH_EXTENSION_NAME=llama_cpu_kernels_avx512bf16", *includes,
                          str(ROOT / "llama" / "cpu_kernels.cpp")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_kernel_builds_for_each_instruction_set_this_cpu_runs():
    """Every build this CPU can run must build where there is a compiler (an AVX-512 machine builds
    the AVX2 one too; a failure here is a failure, not a skip), and is compiled for its instruction
    set: the AVX2 build holds no AVX-512 register (so it runs on CPUs without it), the AVX-512 builds
    do, the native bf16 dot product is in the AVX512-BF16 builds only (the other runs on AVX-512 CPUs
    without it) and VBMI's byte permutes in the one for VBMI only (AVX512-BF16 CPUs without VBMI,
    e.g. Cooper Lake Xeons, run the other)."""
    runnable = cpu_kernel_variants()
    if not runnable or shutil.which("c++") is None:
        pytest.skip("this CPU runs none of the fused kernel builds, or there is no C++ compiler")
    for variant in runnable:
        kernel = _kernel_or_skip(variant)
        assert kernel.ISA == variant
        if shutil.which("objdump") and variant != "neon":
            asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", kernel.__file__], capture_output=True,
                                 text=True, check=True).stdout
            if variant == "avx2":
                assert "%zmm" not in asm and "%ymm" in asm
            else:  # AVX-512 registers; the bf16 dot only where the CPU has it, VBMI's byte look-ups with VBMI
                assert "%zmm" in asm and ("vdpbf16ps" in asm) == variant.startswith("avx512bf16")
                assert ("vpermi2b" in asm or "vpermt2b" in asm) == (variant == "avx512bf16_vbmi")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_loss_pass_of_each_build(variant, dtype):
    """The training loss's pass (softmax_gradient: logits -> softmax - one_hot(target) in place, the
    summed cross-entropy returned) on each build against float64: 97 columns (no whole number of
    vector blocks), a row without a target (-100) becomes 0, a target outside the vocabulary is refused
    with a sentence naming it."""
    kernel = _kernel_or_skip(variant)
    torch.manual_seed(0)
    logits = (torch.randn(5, 97) * 4).to(dtype)
    targets = torch.tensor([3, -100, 96, 0, 50])
    x = logits.double()
    logp = x - x.logsumexp(-1, keepdim=True)
    keep = targets != -100
    want_loss = -logp[keep].gather(1, targets[keep][:, None]).sum()
    want = logp.exp() - torch.nn.functional.one_hot(targets.clamp(min=0), 97).double()
    want[~keep] = 0
    got = logits.clone()
    loss = kernel.softmax_gradient(got, targets)
    assert loss == pytest.approx(want_loss.item(), rel=1e-6)
    tol = dict(rtol=0, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.double(), want, **tol)
    assert (got[1] == 0).all()
    with pytest.raises(RuntimeError, match="target 97 of row 0 is outside 0..96"):
        kernel.softmax_gradient(logits.clone(), torch.tensor([97, 0, 0, 0, 0]))


def _attention_by_hand(q, k, v, start, grad):
    """Causal attention of q (B, T, H, D) at positions start.. over k, v (B, start + T, Hkv, D) in
    float64 by definition (grouped-query heads repeated), and the gradients of q, k, v for `grad`."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.size(2) // k.size(2)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
    scores = qh @ kh.transpose(-1, -2) / q.size(-1) ** 0.5
    seen = torch.ones(q.size(1), k.size(1), dtype=torch.bool).tril(start)
    out = (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ vh).transpose(1, 2)
    out.backward(grad.double())
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,t,h,hkv,d,start,block", [
    (2, 45, 4, 2, 32, 0, 16),  # two whole blocks and 13 rows (odd), grouped-query heads
    (1, 7, 2, 1, 64, 3, 16),  # one block shorter than `block`, after 3 cached keys (not a multiple of 16)
    (1, 40, 2, 2, 32, 16, 32),  # after 16 cached keys
])
@pytest.mark.parametrize("variant", ["avx512bf16", "avx512"])
def test_training_attention_pass_matches_float64(b, t, h, hkv, d, start, block, dtype, variant):
    """The causal attention of the AVX-512 builds (causal_attention_forward/backward, the `blocked`
    backend's CPU path), bf16 and fp32, against float64 by definition: the output and the gradients
    of q, k, v no further off than twice torch's own attention (sdpa) in that dtype + 1e-3 (bf16) or
    1e-5 (fp32). q comes as a transposed view (strided rows); the probabilities it keeps are the size
    llama.blocked_attention computes in closed form for torch.compile."""
    from llama.blocked_attention import kernel_saved_elements

    kernel = _kernel_or_skip(variant)
    torch.manual_seed(0)
    q = torch.randn(b, h, t, d, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(b, start + t, hkv, d, dtype=dtype) for _ in range(2))
    grad = torch.randn(b, t, h, d, dtype=dtype)
    out, probs = kernel.causal_attention_forward(q, k, v, start, block)
    got = [out, *kernel.causal_attention_backward(grad, q, k, v, probs, start, block)]
    pairs = dtype == torch.bfloat16
    assert probs.numel() == b * h * kernel.causal_attention_saved(t, start, block, 2 if pairs else 1)
    assert probs.numel() == kernel_saved_elements((b, h, t, d), start, block, pairs)
    want = _attention_by_hand(q, k, v, start, grad)
    seen = torch.ones(t, start + t, dtype=torch.bool).tril(start)
    qs, ks, vs = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k.repeat_interleave(h // hkv, 2),
                                                                     v.repeat_interleave(h // hkv, 2)))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen)
    sdpa.backward(grad.transpose(1, 2))
    fold = lambda x: x.unflatten(2, (hkv, h // hkv)).sum(3)  # noqa: E731  gradients of the repeated heads
    theirs = [sdpa.transpose(1, 2), qs.grad.transpose(1, 2), fold(ks.grad.transpose(1, 2)), fold(vs.grad.transpose(1, 2))]
    for name, x, y, r in zip(["out", "dq", "dk", "dv"], got, theirs, want):
        assert x.shape == r.shape and x.dtype == dtype, name
        assert (x.double() - r).abs().max() <= 2 * (y.double() - r).abs().max() + (1e-3 if pairs else 1e-5), name


def test_read_bandwidth_reads_the_whole_buffer_and_times_itself():
    """The benchmarks' memory probe, on each build this CPU runs: the sum it returns equals the sum
    in double precision (small integers: exact in its fp32 lanes, so every element was read once, the
    13-element tail included), and its bytes/s is at least the bytes over the time measured around
    the call and, on the best of 3 calls, at most 2x that (the call's own overhead is small)."""
    runnable = cpu_kernel_variants()
    if not runnable or shutil.which("c++") is None:
        pytest.skip("this CPU runs none of the fused kernel builds, or there is no C++ compiler")
    buf = (torch.arange(16 * 2**20 + 13) % 7).float()  # 64 MB: twice this machine's L3 or more
    want = float(buf.double().sum())
    for variant in runnable:
        _kernel_or_skip(variant)
        inner, outer = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            bw, total = read_bandwidth(buf, variant)
            outer.append(buf.numel() * 4 / (time.perf_counter() - t0))
            inner.append(bw)
            assert total == want, variant
            assert bw >= outer[-1], variant
        assert max(inner) <= 2 * max(outer), (variant, inner, outer)
    with pytest.raises(ValueError, match="read_bandwidth reads a contiguous fp32 CPU tensor, got torch.bfloat16"):
        read_bandwidth(buf.bfloat16())


def test_kernel_choice_by_cpu_and_environment(monkeypatch):
    """Which build runs: by the machine (aarch64 -> NEON; unknown architectures none), and
    LLAMA_CPU_KERNEL forcing one, with one-sentence errors for a name that is no build or one this
    CPU cannot run."""
    with mock.patch("platform.machine", return_value="aarch64"):
        assert cpu_kernel_variants() == ["neon"]
    with mock.patch("platform.machine", return_value="riscv64"):
        assert cpu_kernel_variants() == []
    monkeypatch.setenv("LLAMA_CPU_KERNEL", "sse9")
    with pytest.raises(ValueError, match=r"LLAMA_CPU_KERNEL='sse9' is not a fused CPU decoding kernel; choose one of"):
        cpu_kernels()
    missing = next((v for v in VARIANTS if v not in cpu_kernel_variants()), None)
    if missing:
        monkeypatch.setenv("LLAMA_CPU_KERNEL", missing)
        with pytest.raises(ValueError, match="this CPU .* cannot run that kernel"):
            cpu_kernels()
    runnable = cpu_kernel_variants()
    if not runnable:
        return
    forced = runnable[-1]  # the slowest this CPU runs: avx2 on an AVX-512 machine
    monkeypatch.setenv("LLAMA_CPU_KERNEL", forced)
    _kernel_or_skip(forced)
    model = Transformer(tiny_args()).eval()
    decoder = FusedCpuDecoder.create(model)
    assert decoder.variant == forced
    model.float()  # the same parameters: still packed
    model.layers[0].attention.wq.weight.data = model.layers[0].attention.wq.weight.data.clone()  # replaced
    assert decoder.refreshed().variant == forced  # packed anew on the same build


def test_build_decodes_with_the_fused_kernel_where_it_can(ckpts):
    _kernel_or_skip()
    fused = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="bf16")
    assert fused.decoder.name == "fused"
    assert Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="bf16", decoder="eager").decoder.name == "eager"
    assert Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="fp16").decoder.name == "eager"
    with pytest.raises(ValueError, match="the fused CPU decoder needs"):
        Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="fp16", decoder="fused")
    # fp32 decodes through it too: the `llama` fixture of the greedy-vs-transformers tests is fp32
    assert Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="float32").decoder.name == "fused"
    ids = [fused.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
    with mock.patch.object(fused.decoder, "kernel", wraps=fused.decoder.kernel) as spy:
        out = fused.generate(ids, GEN_LEN, temperature=0)[0]
    assert spy.greedy_step.call_count >= GEN_LEN - 1  # every greedy step went through the kernel, whole
    # every greedy token is the exact (fp32) model's best, or within bf16 noise of it (near-ties)
    exact = ckpts["model"].eval()
    for prompt, gen in zip(ids, out):
        with torch.no_grad():
            logits = exact(torch.tensor([prompt + gen]))[0, len(prompt) - 1:-1]  # predicting each gen token
        chosen = logits.gather(-1, torch.tensor(gen)[:, None])[:, 0]
        assert (chosen >= logits.max(-1).values - 0.05).all(), (chosen, logits.max(-1).values)
    # quantizing after build (as scripts/example.py --quantize int8 does) replaces the Linears: the
    # next generate packs the int8 model anew and decodes it fused, the same text as the eager int8 model
    quantize_int8(fused.model)
    fused.decoder = fused.decoder.refreshed()
    assert fused.decoder.name == "fused" and fused.decoder.int8
    with mock.patch.object(fused.decoder, "kernel", wraps=fused.decoder.kernel) as spy:
        q = fused.generate(ids, GEN_LEN, temperature=0)[0]
    assert spy.greedy_step.call_count >= GEN_LEN - 1
    ref = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 64, 3, dtype="bf16", decoder="eager")
    quantize_int8(ref.model)
    assert q == ref.generate(ids, GEN_LEN, temperature=0)[0]
    assert make_decoder(ref.model, "auto").name == "fused"  # "auto" picks it for an int8 model



def test_generation_prefills_through_the_kernel(tmp_path, tiny_tokenizer):
    """Llama.generate sends each prompt's first chunk through the kernel's `prefill` and the rest
    through its decoding step (head size 32: the AVX512-BF16 build's attention kernel): fp32 greedy
    tokens equal transformers' and the eager decoder's, and seeded sampling and streaming equal the
    eager decoder's too. Prompts with logprobs (every position's logits) prefill eagerly."""
    _kernel_or_skip()
    model = make_checkpoint(tmp_path, tiny_tokenizer.model_path, n_heads=2)
    build = lambda decoder: Llama.build(str(tmp_path), str(tiny_tokenizer.model_path), 64, 3, dtype="float32",
                                        decoder=decoder)
    fused, eager = build("auto"), build("eager")
    assert fused.decoder.name == "fused" and fused.decoder.prefills
    ids = [fused.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    with mock.patch.object(fused.decoder, "kernel", wraps=fused.decoder.kernel) as spy:
        got = run_all(fused)
    # each generate prefilled; greedy steps whole, sampled ones through the decoding step
    assert spy.prefill.call_count >= 4 and spy.greedy_step.call_count >= GEN_LEN - 1 and spy.decode_ids.call_count > GEN_LEN
    assert got == run_all(eager)
    assert got["greedy"] == hf_greedy(model, ids, GEN_LEN, fused.tokenizer.eos_id)
    with mock.patch.object(fused.decoder, "kernel", wraps=fused.decoder.kernel) as spy:
        tokens, logprobs = fused.generate(ids[:3], GEN_LEN, temperature=0, logprobs=True)
    want_tokens, want_logprobs = eager.generate(ids[:3], GEN_LEN, temperature=0, logprobs=True)
    assert spy.prefill.call_count == 0 and tokens == want_tokens
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-5, rtol=0)  # fp32 sums

# --- tensor parallel: 2 and 4 ranks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    base = tmp_path_factory.mktemp("gen_tp")
    model = make_checkpoint(base / "one", tiny_tokenizer.model_path, num_shards=1)
    make_checkpoint(base / "two", tiny_tokenizer.model_path, num_shards=2)
    save_hf(model.state_dict(), model.args, base / "hf", dtype=torch.float32)  # transformers' layout, sliced per rank
    tok = str(tiny_tokenizer.model_path)
    single = run_all(Llama.build(str(base / "one"), tok, max_seq_len=64, max_batch_size=3, dtype="float32", device="cpu"))
    ids = [tiny_tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    return {"base": base, "tok": tok, "single": single, "hf": hf_greedy(model, ids, GEN_LEN, tiny_tokenizer.eos_id)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tp_generation_equals_one_process_and_transformers(setup, world):
    base = setup["base"]
    ckpts = [str(base / "one"), str(base / "two"), str(base / "hf")] if world == 2 else [str(base / "one")]
    out = base / f"out{world}.json"
    torchrun("tests.workers.generation", world, "--tokenizer", setup["tok"], "--out", out, *ckpts, timeout=240)
    results = json.loads(out.read_text())
    assert setup["single"]["greedy"] == setup["hf"]
    for ckpt in ckpts:
        res = results[ckpt]
        assert res["ranks_agree"], ckpt
        for key in ("greedy", "sampled", "streamed"):
            assert res[key] == setup["single"][key], (ckpt, key)
        # tiny: dim 64, 4 heads of 16, vocab 512 -> this rank's rows of wq and of the embedding
        assert res["local_shapes"] == [[64 // world, 64], [512 // world, 64]]
        assert res["cache_heads"] == 4 // world


@pytest.mark.slow
def test_example_script_on_two_ranks(setup):
    base, tok = setup["base"], setup["tok"]
    args = ["--ckpt_dir", str(base / "two"), "--tokenizer_path", tok, "--temperature", "0", "--max_gen_len",
            str(GEN_LEN), "--max_seq_len", "64", "--dtype", "float32", "--prompts", json.dumps(PROMPTS[1:4])]
    r = torchrun(str(ROOT / "scripts" / "example.py"), 2, *args, timeout=240)
    llama = Llama.build(str(base / "one"), tok, max_seq_len=64, max_batch_size=3, dtype="float32", device="cpu")
    want = llama.text_completion(PROMPTS[1:4], temperature=0, max_gen_len=GEN_LEN)
    for p, w in zip(PROMPTS[1:4], want):
        assert r.stdout.count(f"> {p}\n{w['generation']}\n") == 1  # once: only rank 0 prints
    # 3 ranks do not divide 4 heads: one clear sentence per rank, exit code 1
    r = torchrun(str(ROOT / "scripts" / "example.py"), 3, *args, timeout=240, check=False)
    assert r.returncode != 0
    assert "error: tensor parallel degree 3 does not divide n_heads=4" in r.stderr
    assert "Traceback" not in r.stderr.split("error:")[0]


def test_decode_dtype_is_measured_and_chosen_once(monkeypatch, tmp_path, ckpts, capsys):
    """The CPU's weight dtype for decoding comes from timing the fused step in bf16 and fp32
    (cached per machine), and Llama.build without a dtype takes the faster and says so once; built
    for eager forwards (evaluation) it takes the faster dtype of the matmul measurement instead."""
    import llama.env as env
    from llama.inference import cpu_decode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env._MEASURED.clear()
    if cpu_kernels() is None:
        pytest.skip("no fused kernel builds here")
    speeds = cpu_decode.decode_speeds(steps=2)
    assert set(speeds) == {"bf16", "fp32"} and all(v > 1 for v in speeds.values())
    if cpu_decode._conclusive(speeds):  # (a near-tie on a busy machine is not cached)
        assert (tmp_path / "llama" / "decode_speeds.json").is_file()
        env._MEASURED.clear()
        assert cpu_decode.decode_speeds(steps=2) == speeds  # read back, not measured again
    for faster, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setattr(cpu_decode, "decode_speeds", lambda: {"bf16": 200.0 if faster == "bf16" else 100.0,
                                                                  "fp32": 200.0 if faster == "fp32" else 100.0})
        env._SAID.clear()
        built = [Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 32, 1, device="cpu") for _ in range(2)]
        assert all(b.dtype is want for b in built)
        said = capsys.readouterr().err
        assert said.count("weights in") == 1 and f"weights in {faster}: measured" in said and "--dtype overrides" in said
        assert Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 32, 1, device="cpu", dtype="fp32").dtype is torch.float32
        # without the fused step (scoring, evaluation: whole forwards) the matmul measurement decides,
        # here the other way round
        other = "fp32" if faster == "bf16" else "bf16"
        monkeypatch.setattr(env, "cpu_matmul_speeds", lambda: {"bf16": 2e11 if other == "bf16" else 1e11,
                                                               "fp32": 2e11 if other == "fp32" else 1e11})
        eager = Llama.build(str(ckpts["one"]), ckpts["tokenizer"], 32, 1, device="cpu", decoder="eager")
        assert eager.dtype is {"bf16": torch.bfloat16, "fp32": torch.float32}[other]
        assert f"weights in {other}: measured" in capsys.readouterr().err
    monkeypatch.setattr(cpu_decode, "decode_speeds", lambda: None)  # no kernel: the flag rule
    assert cpu_decode.decode_dtype()[0] is env.default_dtype("cpu")
    monkeypatch.setattr(cpu_decode, "decode_speeds", lambda: {"bf16": 100.0, "fp32": 102.0})  # a near-tie: likewise
    dt, why = cpu_decode.decode_dtype()
    assert dt is env.default_dtype("cpu") and "too close to choose" in why
