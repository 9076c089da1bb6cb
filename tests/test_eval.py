"""Evaluation (llama/eval/evaluation.py, llama/eval/harness.py, scripts/eval.py) against independent references:
lm-eval's own HuggingFace model (HFLM) on the same weights in transformers' format, naive
token-by-token computations, and numbers worked out by hand."""

import importlib.util
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

import llama.eval.evaluation as ev
from llama.data import train_tokenizer
from llama.eval.evaluation import (LAST_NUMBER, TaskError, TaskSpec, build_prompts, encode_pair, evaluate_task,
                              evaluate_tasks, extract, fewshot_examples, loglikelihoods, normalize_answer,
                              perplexity, read_examples, rolling_windows)
from llama.formats.hf import save_hf
from llama.formats.meta import save_meta_checkpoint
from llama.model import ModelArgs, Transformer
from llama.tokenizer import N_BYTES, N_SPECIAL, Tokenizer
from tests.conftest import torchrun
from tests.workers.eval import TEXTS

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads the local task file through `datasets`:
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama.eval.harness import LlamaLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CTX = 64  # the test model's context
WORDS = "the of and to in is that for it as was with be by on not he this are or his from at which red blue".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(20)) + f". In {rng.randint(1900, 2024)} it cost "
            f"{rng.random() * 100:.2f}." for _ in range(300)]
    docs += ["Question: which is it?\nAnswer: red", "Q: the of and?\nA: blue"] * 20
    return Tokenizer(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=300))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=CTX)
    m = Transformer(args)
    m.init_weights(std=0.1)  # larger than the default: scores far apart, greedy continuations exist
    with torch.no_grad():  # <unk>, bos, eos and the byte pieces never win greedy decoding (logit 0 against
        m.output.weight[:N_SPECIAL + N_BYTES] = 0  # the max of the others): generated text decodes alike in
    return m.eval().requires_grad_(False)  # transformers' tokenizer (it drops <unk>, joins bytes its own way)


@pytest.fixture(scope="module")
def hflm(model, tok, tmp_path_factory):
    hf_dir = save_hf(model.state_dict(), model.args, tmp_path_factory.mktemp("hf"), dtype=torch.float32,
                     tokenizer_path=tok.model_path)
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4, max_length=CTX)


def mc_records(n=12, seed=1):
    """A 4-choice task of random words (the right answer is arbitrary: a random model is scored)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2))) for _ in range(4)]
        out.append({"question": f"Question: {q}?\nAnswer:", "choices": choices, "answer": rng.randrange(4)})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def check_same_tokens(hflm, tok, strings):
    """HFLM's transformers tokenizer and ours agree on these strings (they differ on a string that
    starts with a space, and on U+2581, which the tests avoid), so both models read the same ids."""
    for s in strings:
        assert hflm.tok_encode(s) == tok.encode(s, bos=True, eos=False), s


# ---------------------------------------------------------------------------------------------
# against lm-eval's HFLM


def test_encode_pair_splits_like_lm_eval(hflm, tok):
    cases = [("Question: the of?\nAnswer:", " red"), ("Question: the of?\nAnswer: ", "red blue"),
             ("In 1999 it cost", " 12.50"), ("In 1999 it co", "st"), ("the of  \n ", "and")]
    check_same_tokens(hflm, tok, [c for c, _ in cases] + [c + x for c, x in cases])
    for ctx, cont in cases:
        assert encode_pair(tok, ctx, cont) == hflm._encode_pair(ctx, cont), (ctx, cont)


def test_loglikelihoods_equal_hflm(hflm, model, tok):
    ctx = "Question: which of the and is it?\nAnswer:"
    greedy = model(torch.tensor([tok.encode(ctx, bos=True, eos=False)]))[0, -1].argmax()
    reqs = [(ctx, " red"), (ctx, " blue or the"), (ctx, " in 1999"), (ctx, tok.decode([int(greedy)])),
            ("In 1999 it cost", " 12.50"), ("", "the of"), ("that for it as ", "was"),
            (" ".join(WORDS) * 3, " the end")]  # the last one is longer than the context: truncated on the left
    assert len(encode_pair(tok, *reqs[-1])[0]) > CTX
    check_same_tokens(hflm, tok, [c + x for c, x in reqs if c])
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    want = hflm.loglikelihood(inst, disable_tqdm=True)
    got = LlamaLM(model, tok, batch_size=3).loglikelihood(inst, disable_tqdm=True)
    torch.testing.assert_close([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert got[3][1] and not got[0][1]  # one greedy continuation, so the flag is checked both ways
    # an empty continuation has probability 1 (HFLM asserts on it): (0.0, True) among the others
    empty = LlamaLM(model, tok).loglikelihood([Instance("loglikelihood", {}, ("abc", ""), 0)] + inst[:1], disable_tqdm=True)
    assert empty[0] == (0.0, True) and empty[1][1] == got[0][1]
    # (another batch's shapes: oneDNN may sum in another order, 2e-6 apart on a Xeon without AVX512-BF16)
    assert empty[1][0] == pytest.approx(got[0][0], abs=1e-4)


def test_a_shorter_max_length_equals_hflms(hflm, model, tok):
    """max_length below the model's max_seq_len: every kind of request reads only that many positions,
    as HFLM's max_length does."""
    short = HFLM(pretrained=hflm.model.name_or_path, device="cpu", dtype="float32", batch_size=4, max_length=24,
                 add_bos_token=False)
    lm = LlamaLM(model, tok, batch_size=3, max_length=24, max_gen_toks=6)
    assert lm.max_length == 24
    text = "the of and to in is that for it as was with be by on not he this " * 3
    full = HFLM(pretrained=hflm.model.name_or_path, device="cpu", dtype="float32", batch_size=4, max_length=24)
    check_same_tokens(full, tok, [text, text + " red"])
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    torch.testing.assert_close(lm.loglikelihood_rolling(rolling, disable_tqdm=True),
                               short.loglikelihood_rolling(rolling, disable_tqdm=True), rtol=0, atol=1e-4)
    pair = [Instance("loglikelihood", {}, (text, " red"), 0)]
    torch.testing.assert_close(lm.loglikelihood(pair, disable_tqdm=True)[0][0],
                               full.loglikelihood(pair, disable_tqdm=True)[0][0], rtol=0, atol=1e-4)
    gen = [Instance("generate_until", {}, (text, {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert lm.generate_until(gen, disable_tqdm=True) == full.generate_until(gen, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"max_length 65 must be in \[2, 64\]"):
        LlamaLM(model, tok, max_length=65)


def test_loglikelihood_rolling_equals_hflm(hflm, model, tok, tmp_path):
    texts = ["the of and to in is that for it as was with be by on not he this " * 8, "In 1999 it cost 12.50.",
             "which red blue"]
    assert len(tok.encode(texts[0], bos=False, eos=False)) > 2 * CTX
    check_same_tokens(hflm, tok, texts)
    inst = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    # HFLM with the tokenizer's own bos would also score bos given bos (its prefix token); without
    # it, HFLM scores the text's tokens after a bos prefix, which is what perplexity means here.
    ref = HFLM(pretrained=hflm.model.name_or_path, device="cpu", dtype="float32", batch_size=4, max_length=CTX,
               add_bos_token=False)
    want = ref.loglikelihood_rolling(inst, disable_tqdm=True)
    got = LlamaLM(model, tok, batch_size=2).loglikelihood_rolling(inst, disable_tqdm=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_generate_until_equals_hflm(hflm, model, tok):
    prompts = ["Question: which is it?\nAnswer:", "In 1999 it cost", "the of and to", "which", "he was",
               ("which red blue the of " * 10).strip()]  # cut: its start goes, bos with it, as in HFLM
    assert len(tok.encode(prompts[-1], bos=True, eos=False)) > CTX - 10
    check_same_tokens(hflm, tok, prompts)
    inst = [Instance("generate_until", {}, (p, {"until": ["\n", "2"], "max_gen_toks": 10, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    want = hflm.generate_until(inst, disable_tqdm=True)
    got = LlamaLM(model, tok, batch_size=2).generate_until(inst, disable_tqdm=True)
    assert got == want
    assert len(set(got)) == len(got) and sum(0 < len(g) < 4 for g in got) >= 2  # varied, some cut at "2"


def test_local_task_accuracy_equals_hflm(hflm, model, tok, checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", mc_records())
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    records = read_examples(data, TaskSpec(name="t", data=str(data)))
    check_same_tokens(hflm, tok, [e.record["question"] + " " + c for e in records for c in e.record["choices"]])
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    runs = {name: lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tm, bootstrap_iters=0)
            for name, lm in [("hf", hflm), ("ours", LlamaLM(model, tok, batch_size=3))]}
    # the registered name, built from a Meta checkpoint as lm-eval's command line would
    by_name = lm_eval.simple_evaluate(model="llama", model_args=f"ckpt_dir={checkpoint},max_seq_len={CTX},"
                                      "dtype=float32,device=cpu,batch_size=2", tasks=["tiny_mc"], task_manager=tm,
                                      bootstrap_iters=0)
    ours = evaluate_tasks(model, tok, [{"name": "tiny_mc", "data": str(data), "template": "{question}",
                                        "metrics": ["acc", "acc_norm"]}], records=True, progress=False)["tiny_mc"]
    hf = runs["hf"]["results"]["tiny_mc"]
    for m in ("acc", "acc_norm"):
        assert ours[m] == hf[f"{m},none"] == runs["ours"]["results"]["tiny_mc"][f"{m},none"]
        assert by_name["results"]["tiny_mc"][f"{m},none"] == ours[m]
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # the two metrics are told apart
    hf_lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in runs["hf"]["samples"]["tiny_mc"]}
    for i, rec in enumerate(ours["examples"]):
        torch.testing.assert_close(rec["loglikelihoods"], [float(x) for x in hf_lls[i]], rtol=0, atol=1e-4)
    n, p = ours["n"], ours["acc"]
    assert ours["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))  # sample std / sqrt(n)


# ---------------------------------------------------------------------------------------------
# against naive computations


def naive_nll(model, ids, max_len, stride):
    """Token by token: target t of [bos, ...] is predicted from the tokens its window shows it."""
    n, nll = len(ids) - 1, 0.0
    for t in range(1, n + 1):
        if t <= max_len:
            start = 0
        else:  # the window that scores t ends at the first multiple of stride past max_len, or at n
            end = min(n, max_len + stride * math.ceil((t - max_len) / stride))
            start = end - max_len
        logits = model(torch.tensor([ids[start:t]]))[0, -1].double()
        nll -= float(logits.log_softmax(-1)[ids[t]])
    return nll


@pytest.mark.parametrize("stride", [CTX, 24, 1])
def test_rolling_perplexity_equals_naive(model, tok, stride):
    texts = ["the of and to in is that for it as was with be by on not he this " * 2 + "In 1999 it cost 12.50.",
             "which red blue"]
    ids = [tok.encode(t, bos=True, eos=False) for t in texts]
    assert len(ids[0]) > CTX + 24  # at least two windows at every stride
    got = perplexity(model, tok, texts, stride=stride, batch_size=3, progress=False)
    nll = sum(naive_nll(model, x, CTX, stride) for x in ids)
    n_tok, n_bytes = sum(len(x) - 1 for x in ids), sum(len(t.encode()) for t in texts)
    assert got["tokens"] == n_tok and got["bytes"] == n_bytes and got["documents"] == 2
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_scoring_builds_no_autograd_graph(model, tok):
    """Every scoring path runs under inference mode, even on a model whose weights require grad (as
    during training's eval_tasks): no graph is kept per batch."""
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_inference_mode_enabled()))
    try:
        with torch.enable_grad():
            model.requires_grad_(True)
            loglikelihoods(model, [(tok.encode("the of", True, False), tok.encode(" and", False, False))])
            loglikelihoods(model, [(tok.encode("the of", True, False), tok.encode(" and", False, False))],
                           shared_context=False)
            perplexity(model, tok, ["the of and to in"], progress=False)
    finally:
        hook.remove()
        model.requires_grad_(False)
    assert len(seen) >= 3 and all(seen)


def test_rolling_windows_score_each_token_once():
    for n, L, s in [(1, 8, 8), (8, 8, 3), (9, 8, 8), (30, 8, 3), (30, 8, 1)]:
        scored = []
        for start, end, new in rolling_windows(n, L, s):
            assert 0 <= start < end <= n and end - start <= L and new <= end - start
            scored += range(end - new + 1, end + 1)
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride must be in"):
        rolling_windows(10, 8, 9)


def test_shared_context_equals_separate_scoring(model, tok):
    rng = random.Random(3)
    reqs = []
    for rec in mc_records(6, seed=5):
        reqs += [encode_pair(tok, rec["question"], " " + c) for c in rec["choices"]]
        reqs += [encode_pair(tok, "Answer:", " " + c) for c in rec["choices"]]  # one context for many rows
    reqs += [([tok.bos_id], tok.encode("the of", bos=False, eos=False))]  # a context of bos alone
    rng.shuffle(reqs)
    separate = loglikelihoods(model, reqs, batch_size=4, shared_context=False)
    for batch_size in (1, 3, 64):
        shared = loglikelihoods(model, reqs, batch_size=batch_size)
        torch.testing.assert_close([s[0] for s in shared], [s[0] for s in separate], rtol=0, atol=1e-5)
        assert [s[1] for s in shared] == [s[1] for s in separate]
    # and separate scoring is the plain definition: one full forward per request
    ctx, cont = reqs[0]
    lp = model(torch.tensor([ctx + cont]))[0].log_softmax(-1)
    want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert separate[0][0] == pytest.approx(want, abs=1e-5)


def naive_greedy(model, tok, prompt, max_new, until):
    ids, out = tok.encode(prompt, bos=True, eos=False), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        out.append(nxt)
        if any(u in tok.decode(out) for u in until):
            break
    text = tok.decode(out)
    cuts = [text.index(u) for u in until if u in text]
    return text[:min(cuts)] if cuts else text


def test_generation_task_equals_naive_greedy(model, tok, tmp_path):
    until = ["\n", " t"]
    questions = ["Question: which is it?\nAnswer:", "In 1999 it cost", "the of and to", "Q: red or blue?\nA:"]
    gens = [naive_greedy(model, tok, q, 8, until) for q in questions]
    assert any(g.strip() for g in gens)
    # answers: the generation restyled (must match after normalisation), or something else
    recs = [{"question": questions[0], "answers": ["nothing", f"The {gens[0].upper()}!"]},
            {"question": questions[1], "answer": "1999"},
            {"question": questions[2], "answers": [gens[2] + " 7"]},
            {"question": questions[3], "answers": [f"  {gens[3]}, "]}]
    data = write_jsonl(tmp_path / "gen.jsonl", recs)
    res = evaluate_task(model, tok, {"name": "gen", "type": "generate", "data": str(data), "until": until,
                                     "max_gen_tokens": 8}, batch_size=3, records=True, progress=False)
    assert [r["generation"] for r in res["examples"]] == gens
    want_em = [float(normalize_answer(g) in {normalize_answer(a) for a in (r.get("answers") or [r["answer"]])})
               for g, r in zip(gens, recs)]
    assert [r["exact_match"] for r in res["examples"]] == want_em
    assert want_em[0] == 1.0 and want_em[3] == 1.0 and want_em[2] == 0.0
    nums = [re.findall(r"-?\d[\d,]*(?:\.\d+)?", g) for g in gens]
    assert [r["extracted"] for r in res["examples"]] == [x[-1] if x else None for x in nums]
    assert res["exact_match"] == sum(want_em) / 4 and res["n"] == 4


# ---------------------------------------------------------------------------------------------
# by hand


def test_metrics_by_hand(tok, tmp_path, monkeypatch):
    # log-likelihoods written down per choice, given the prompt and given "Answer:"
    table = {  # choice: (ll | prompt, ll | "Answer:")
        "a": (-2.0, -1.0), "bbbb": (-4.0, -4.5),  # gold 1: acc picks a; acc_norm -2 vs -1 -> bbbb; answer -1 vs 0.5 -> bbbb
        "cc": (-3.0, -1.0), "d": (-2.0, -5.0),  # gold 0: acc d; acc_norm -1.5 vs -2 -> cc; answer -2 vs 3 -> d
        "ee": (-4.0, -1.0), "ffff": (-6.0, -2.0), "g": (-3.0, -2.5),  # gold 2: acc g; norm -2,-1.5,-3 -> ffff; answer -3,-4,-0.5 -> g
        "hh": (-2.0, -1.0), "i": (-1.1, -3.0),  # gold 0: acc i; norm -1 vs -1.1 -> hh (by len(" hh") it would
    }  # be -0.67 vs -0.55 -> i: the delimiter is not counted, as in lm-eval); answer -1 vs 1.9 -> i
    recs = [{"q": "one", "choices": ["a", "bbbb"], "answer": 1}, {"q": "two", "choices": ["cc", "d"], "answer": 0},
            {"q": "three", "choices": ["ee", "ffff", "g"], "answer": 2}, {"q": "four", "choices": ["hh", "i"], "answer": 0}]

    def fake_loglikelihoods(model, requests, batch_size=16, shared_context=True):
        out = []
        for ctx, cont in requests:
            given_answer = tok.decode(ctx) == "Answer:"
            out.append((table[tok.decode(cont).strip()][given_answer], False))
        return out

    monkeypatch.setattr(ev, "loglikelihoods", fake_loglikelihoods)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=tok.n_words, max_seq_len=CTX))
    spec = {"name": "hand", "data": str(write_jsonl(tmp_path / "hand.jsonl", recs)), "template": "Q: {q}\nA:"}
    res = evaluate_task(model, tok, spec, records=True, progress=False)
    assert [r["acc"] for r in res["examples"]] == [0, 0, 1, 0]
    assert [r["acc_norm"] for r in res["examples"]] == [1, 1, 0, 1]
    assert [r["acc_answer"] for r in res["examples"]] == [1, 0, 1, 0]
    assert (res["acc"], res["acc_norm"], res["acc_answer"]) == (0.25, 0.75, 0.5)
    # standard error: sample standard deviation / sqrt(n); [0,0,1,0]: var 1/4 -> 0.25; [1,0,1,0]: var 1/3
    assert res["acc_stderr"] == pytest.approx(0.25) and res["acc_norm_stderr"] == pytest.approx(0.25)
    assert res["acc_answer_stderr"] == pytest.approx(math.sqrt(1 / 12))


def test_normalisation_and_regex_extraction():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("Theory of the Anne") == "theory of anne"  # articles only as whole words
    assert normalize_answer("  U.S.A.\n") == "usa"
    assert normalize_answer("") == ""
    assert extract("so 3 + 4 = 7, and the total is 1,234.", LAST_NUMBER) == "1,234"
    assert extract("-12.5 then -3.25 apples", LAST_NUMBER) == "-3.25"
    assert extract("no number here", LAST_NUMBER) is None
    assert extract("work... #### 72\n", r"#### (\d+)") == "72"  # a group: its text, not the whole match
    assert extract("answer: B, then answer: C", r"answer: ([A-D])") == "C"


def test_fewshot_deterministic_and_excludes_the_example(tmp_path):
    recs = [{"question": f"q{i}", "choices": ["x", "y"], "answer": i % 2} for i in range(8)]
    recs.append(dict(recs[0]))  # a duplicate of example 0: not a shot for example 0 either
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    spec = {"name": "fs", "data": str(data), "fewshot_data": str(data), "num_fewshot": 3,
            "template": "{question}", "fewshot_separator": "\n\n"}
    task = TaskSpec.load(spec)
    examples = read_examples(data, task)
    prompts = build_prompts(task, examples, examples)
    assert prompts == build_prompts(TaskSpec.load(spec), read_examples(data, task), examples)  # same seed
    assert prompts != build_prompts(TaskSpec.load(spec, fewshot_seed=7), examples, examples)
    assert build_prompts(task, examples[:3], examples) == prompts[:3]  # independent of what else is scored
    for i, (ex, prompt) in enumerate(zip(examples, prompts)):
        shots = fewshot_examples(examples, 3, task.fewshot_seed, i, ex)
        assert len({s.line for s in shots}) == 3 and all(s.record != ex.record for s in shots)
        blocks = prompt.split("\n\n")
        assert blocks[-1] == ex.record["question"]
        assert blocks[:-1] == [f"{s.record['question']} {s.record['choices'][s.record['answer']]}" for s in shots]
        assert f"{ex.record['question']} " not in prompt  # the scored example is never its own shot
    with pytest.raises(TaskError, match="needs 9 other examples"):
        fewshot_examples(examples, 9, 0, 0, examples[0])


def test_bad_inputs_name_file_and_line(model, tok, tmp_path):
    def run(lines, **spec):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(x + "\n" for x in lines))
        evaluate_task(model, tok, {"name": "bad", "data": str(path), **spec}, progress=False)

    good = json.dumps({"question": "the of", "choices": ["red", "blue"], "answer": 0})
    with pytest.raises(TaskError, match=r"bad\.jsonl line 2: missing field 'choices'"):
        run([good, json.dumps({"question": "q", "answer": 0})])
    with pytest.raises(TaskError, match=r"bad\.jsonl line 3: answer index 2 is out of range for 2 choices"):
        run([good, "", json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2})])
    with pytest.raises(TaskError, match=r"bad\.jsonl holds no examples"):
        run(["", "  "])
    with pytest.raises(TaskError, match=r"bad\.jsonl line 2: the prompt and choice 'red' need \d+ positions, "
                                        r"more than the model's context of 64"):
        run([good, json.dumps({"question": "the of and " * 40, "choices": ["red", "blue"], "answer": 0})])
    with pytest.raises(TaskError, match=r"bad\.jsonl line 1: missing field 'question' that the template"):
        run([json.dumps({"prompt": "x", "choices": ["a", "b"], "answer": 0})])
    with pytest.raises(TaskError, match=r"bad\.jsonl:1 is not valid JSON"):
        run(["{'question': 1}"])
    with pytest.raises(TaskError, match=r"bad\.jsonl line 1: the prompt and max_gen_tokens 60 need"):
        run([json.dumps({"question": "the of and to in", "answers": ["x"]})], type="generate", max_gen_tokens=60)
    with pytest.raises(TaskError, match=r"unknown field\(s\) \['shots'\]"):
        run([good], shots=3)
    for key, value, want in [("limit", 0, "limit must be an integer >= 1"), ("limit", -1, "limit must be an integer"),
                             ("limit", "2", "limit must be an integer"), ("num_fewshot", True, "num_fewshot must be"),
                             ("until", None, "until must be a string or a list of strings"),
                             ("regex", 5, "regex must be a string"), ("metrics", [1], "metrics must be")]:
        with pytest.raises(TaskError, match=want):
            run([good], **{key: value})
    assert evaluate_task(model, tok, {"name": "m", "data": str(tmp_path / "bad.jsonl"), "metrics": "acc"},
                         progress=False)["acc"] in (0.0, 1.0)  # one metric as a bare string, as `until` takes
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            evaluate_task(model, tok, {"name": "m", "data": str(tmp_path / "bad.jsonl")}, batch_size=bad)
    with pytest.raises(ValueError, match=r"stride must be in \[1, 64\]"):
        perplexity(model, tok, ["the of and"], stride=0, progress=False)
    docs = ["the of and to in", "which red"]
    assert perplexity(model, tok, (d for d in docs), progress=False)["nll"] == perplexity(model, tok, docs, progress=False)["nll"]
    assert loglikelihoods(model, []) == []
    # and the scripts' way of reporting it: one line, no traceback
    assert issubclass(TaskError, ValueError)


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def checkpoint(model, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    save_meta_checkpoint(model.state_dict(), model.args, out, dtype=torch.float32, tokenizer_path=tok.model_path,
                         overwrite=True)
    return out


def test_eval_script_writes_results(checkpoint, model, tok, tmp_path, capsys):
    spec = tmp_path / "mc.json"
    write_jsonl(tmp_path / "mc.jsonl", mc_records(6))
    spec.write_text(json.dumps({"name": "mc", "data": "mc.jsonl"}))  # relative to the spec file
    text = tmp_path / "val.txt"
    text.write_text("the of and to in is that for it as was with be by on not he this " * 5)
    spec_obj = importlib.util.spec_from_file_location("eval_script", ROOT / "scripts" / "eval.py")
    script = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(script)
    out = tmp_path / "results.json"
    # on a CPU without --dtype: fp32 (the scores do not depend on which CPU ran them)
    script.main(str(checkpoint), text=str(text), tasks=[str(spec)], out=str(out), max_seq_len=CTX, stride=16,
                device="cpu")
    res = json.loads(out.read_text())
    assert res["dtype"] == "float32"
    want_ppl = perplexity(model, tok, [text.read_text()], stride=16, progress=False)
    assert res["perplexity"]["nll"] == pytest.approx(want_ppl["nll"], rel=1e-5)
    want = evaluate_tasks(model, tok, [str(spec)], progress=False)["mc"]
    for m in ("acc", "acc_norm", "acc_answer", "acc_stderr"):
        assert res["tasks"]["mc"][m] == want[m]
    printed = capsys.readouterr().out
    assert "perplexity " in printed and "mc: acc " in printed
    with pytest.raises(ValueError, match="nothing to evaluate"):
        script.main(str(checkpoint))


def test_llamalm_from_a_checkpoint_reads_it_as_trained(checkpoint, model, tok, tmp_path):
    """LlamaLM from a checkpoint: the checkpoint's own context (64 here, not 2048), fp32 on a CPU, the
    tokenizer beside it (or one folder up), lm-eval's batch_size "auto" and max_batch_size taken, and a
    checkpoint path where the model goes is one sentence."""
    lm = LlamaLM.from_checkpoint(str(checkpoint))
    assert lm.max_length == CTX and lm.get_model_info()["model_dtype"] == "torch.float32"
    assert lm.tokenizer.sha256 == tok.sha256
    inst = [Instance("loglikelihood", {}, ("In 1999 it cost", " 12.50"), 0)]
    assert lm.loglikelihood(inst, disable_tqdm=True) == LlamaLM(model, tok).loglikelihood(inst, disable_tqdm=True)
    assert LlamaLM(ckpt_dir=str(checkpoint), max_length=32).max_length == 32
    with pytest.warns(UserWarning, match="batch_size auto -> 8"):
        assert LlamaLM(model, tok, batch_size="auto:4", max_batch_size=8).batch_size == 8
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or 'auto', got 'many'"):
        LlamaLM(model, tok, batch_size="many")
    with pytest.raises(ValueError, match=r"LlamaLM\(model, tokenizer\) takes a Transformer; for the checkpoint"):
        LlamaLM(str(checkpoint), str(tok.model_path))
    release = tmp_path / "release"
    (release / "7B").mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name != "tokenizer.model":
            (release / "7B" / f.name).write_bytes(f.read_bytes())
    (release / "tokenizer.model").write_bytes(Path(tok.model_path).read_bytes())
    assert LlamaLM.from_checkpoint(str(release / "7B")).tokenizer.sha256 == tok.sha256


@pytest.mark.slow
def test_tensor_parallel_equals_one_process(checkpoint, model, tok, tmp_path):
    mc = tmp_path / "mc.json"
    write_jsonl(tmp_path / "mc.jsonl", mc_records(8))
    mc.write_text(json.dumps({"name": "mc", "data": "mc.jsonl"}))
    gen = tmp_path / "gen.json"
    write_jsonl(tmp_path / "gen.jsonl", [{"question": q, "answers": ["red"]} for q in ["the of", "In 1999 it", "which"]])
    gen.write_text(json.dumps({"name": "gen", "type": "generate", "data": "gen.jsonl", "max_gen_tokens": 6}))
    out = tmp_path / "tp.json"
    torchrun("tests.workers.eval", 2, checkpoint, tok.model_path, out, mc, gen, timeout=300)
    tp = json.loads(out.read_text())
    assert tp["world_size"] == 2 and tp["ranks_agree"]
    one = evaluate_tasks(model, tok, [str(mc), str(gen)], batch_size=3, records=True, progress=False)
    for i, rec in enumerate(one["mc"]["examples"]):
        torch.testing.assert_close(tp["tasks"]["mc"]["examples"][i]["loglikelihoods"], rec["loglikelihoods"],
                                   rtol=0, atol=1e-4)
    assert tp["tasks"]["mc"]["acc"] == one["mc"]["acc"] and tp["tasks"]["mc"]["acc_norm"] == one["mc"]["acc_norm"]
    assert [r["generation"] for r in tp["tasks"]["gen"]["examples"]] == [r["generation"] for r in one["gen"]["examples"]]
    ppl = perplexity(model, tok, TEXTS, stride=20, batch_size=3, progress=False)
    assert tp["perplexity"]["nll"] == pytest.approx(ppl["nll"], rel=1e-5)


def test_the_shipped_example_task_scores(model, tok):
    """docs/examples/python_mc.json (the README's example) is a valid task: every record loads and
    is scored, and acc equals the argmax of the recorded log-likelihoods."""
    res = evaluate_tasks(model, tok, [str(ROOT / "docs" / "examples" / "python_mc.json")], records=True,
                         progress=False)["python_mc"]
    assert res["n"] == 8
    hits = [float(max(range(4), key=lambda i: r["loglikelihoods"][i]) == r["answer"]) for r in res["examples"]]
    assert res["acc"] == pytest.approx(sum(hits) / 8)
