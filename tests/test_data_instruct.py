"""Fine-tuning data: the Alpaca templates and the Llama 2 chat format token by token against hand-built
expectations (a character tokenizer makes every id checkable), the same boundaries with a real
sentencepiece model, the length-grouped loader (dp sharding, exact resume, eval coverage, padding
share counted independently) and every bad input's message."""

import json

import numpy as np
import pytest
import torch

from llama.chat import format_dialog
from llama.data.instruct import IGNORE, Example, InstructLoader, load_instruct
from tests.helpers import BOS, EOS, CharTokenizer, chars


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def one_example(tmp_path, record, name="d.jsonl", **kw):
    data = load_instruct(write_jsonl(tmp_path / name, [record]), CharTokenizer(), 512, progress=False, **kw)
    (ex,) = data.train
    return ex


def as_targets(ex):
    """What the loader feeds the loss: (inputs, targets) of one example, from its own batch."""
    inputs, targets = InstructLoader([ex], 512, 1, pad_multiple=1).next()
    return inputs[0].tolist(), targets[0].tolist()


def test_alpaca_with_input_by_hand(tmp_path):
    ex = one_example(tmp_path, {"instruction": "Add them.", "input": "1 2", "output": "3"})
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "Add them.\n\n### Input:\n1 2\n\n### Response:")
    assert ex.ids.tolist() == [BOS] + chars(prompt) + chars("3") + [EOS]
    assert ex.mask.tolist() == [False] * (1 + len(prompt)) + [True, True]
    inputs, targets = as_targets(ex)
    assert inputs == [BOS] + chars(prompt) + chars("3")
    assert targets == [IGNORE] * len(prompt) + chars("3") + [EOS]
    # train_on_input: every token after bos is a target
    ex = one_example(tmp_path, {"instruction": "Add them.", "input": "1 2", "output": "3"}, train_on_input=True)
    assert as_targets(ex)[1] == chars(prompt) + chars("3") + [EOS]


def test_alpaca_without_input_by_hand(tmp_path):
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nSay hi.\n\n### Response:")
    for record in ({"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Say hi.", "input": "", "output": "Hi!"}):
        ex = one_example(tmp_path, record)
        assert ex.ids.tolist() == [BOS] + chars(prompt) + chars("Hi!") + [EOS]
        assert as_targets(ex)[1] == [IGNORE] * len(prompt) + chars("Hi!") + [EOS]


def test_chat_by_hand(tmp_path):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": " 4 "}]
    ex = one_example(tmp_path, {"messages": dialog})
    # the system text is folded into the first user message before stripping
    p1, a1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST]", " hello "
    p2, a2 = "[INST] 2+2? [/INST]", " 4 "
    assert ex.ids.tolist() == [BOS] + chars(p1 + a1) + [EOS] + [BOS] + chars(p2 + a2) + [EOS]
    assert ex.mask.tolist() == ([False] * (1 + len(p1)) + [True] * (len(a1) + 1)
                                + [False] * (1 + len(p2)) + [True] * (len(a2) + 1))
    _, targets = as_targets(ex)
    assert targets == ([IGNORE] * len(p1) + chars(a1) + [EOS] + [IGNORE] * (1 + len(p2)) + chars(a2) + [EOS])
    # the inference prompt: completed pairs with bos/eos, the last user turn with bos only
    prompt = format_dialog(CharTokenizer(), dialog[:3] + [{"role": "user", "content": "again\n"}])
    assert prompt == [BOS] + chars(p1 + a1) + [EOS] + [BOS] + chars("[INST] again [/INST]")
    assert format_dialog(CharTokenizer(), [{"role": "user", "content": "x"}]) == [BOS] + chars("[INST] x [/INST]")


def test_sentencepiece_boundaries(tmp_path, tiny_tokenizer):
    """With a real tokenizer the text is encoded whole; the prompt tokens decode to the prompt and
    the target tokens to the response (nothing lost or shared at the boundary)."""
    tok = tiny_tokenizer
    rec = {"instruction": "Return the value of x.", "input": "def f(x):", "output": "    return x + 1"}
    data = load_instruct(write_jsonl(tmp_path / "a.jsonl", [rec]), tok, 512, progress=False)
    (ex,) = data.train
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nReturn the value "
              "of x.\n\n### Input:\ndef f(x):\n\n### Response:")
    assert ex.ids.tolist() == tok.encode(prompt + "    return x + 1", bos=True, eos=True)
    # the prompt's tokens decode to exactly the prompt, so the rest hold exactly the response
    n = int((~ex.mask).sum())
    assert tok.decode(ex.ids[1:n]) == prompt and tok.decode(ex.ids[1:-1]) == prompt + "    return x + 1"
    assert ex.mask[n:].all() and ex.ids[-1] == tok.eos_id
    dialog = [{"role": "user", "content": "what is the model"}, {"role": "assistant", "content": "the data"}]
    data = load_instruct(write_jsonl(tmp_path / "c.jsonl", [{"messages": dialog}]), tok, 512, progress=False)
    (ex,) = data.train
    assert ex.ids.tolist() == tok.encode("[INST] what is the model [/INST] the data ", bos=True, eos=True)
    n = int((~ex.mask).sum())
    assert tok.decode(ex.ids[1:n]) == "[INST] what is the model [/INST]"


def test_documents_cut_into_windows(tmp_path):
    text = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 chars -> 80 tokens with bos, eos
    (tmp_path / "doc.txt").write_text(text)
    data = load_instruct(tmp_path / "doc.txt", CharTokenizer(), 16, progress=False)
    ids = [BOS] + chars(text) + [EOS]
    assert [e.ids.tolist() for e in data.train] == [ids[lo:lo + 17] for lo in range(0, 79, 16)]
    # every token after bos is a target exactly once
    targets = [t for e in data.train for t in as_targets(e)[1] if t != IGNORE]
    assert targets == ids[1:] and not data.skipped


def _examples(n, seed=0, lo=4, hi=60):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        ids = np.concatenate([[BOS], rng.integers(3, 290, k - 1)]).astype(np.int32)
        mask = np.arange(k) >= k // 2
        out.append(Example(ids, mask, f"x:{i}"))
    return out


def _rows(inputs, targets):
    """Each row as (inputs, targets) without its right padding (pad_id 0 never occurs in data)."""
    out = []
    for x, t in zip(inputs.tolist(), targets.tolist()):
        n = len(x) - next((i for i, v in enumerate(reversed(x)) if v != 0), len(x))
        assert all(v == IGNORE for v in t[n:])
        out.append((tuple(x[:n]), tuple(t[:n])))
    return out


def test_loader_dp_sharding_resume_and_epochs():
    ex = _examples(37)
    one = InstructLoader(ex, 64, 8, seed=3)
    ranks = [InstructLoader(ex, 64, 4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(6):  # past one epoch (37 examples)
        rows = _rows(*one.next())
        assert rows == _rows(*ranks[0].next()) + _rows(*ranks[1].next())
    # each epoch visits every example once, in a new order
    order = [one.example_index(g) for g in range(74)]
    assert sorted(order[:37]) == sorted(order[37:]) == list(range(37)) and order[:37] != order[37:]
    # exact resume, also onto another batch size (positions count samples of the global stream)
    a = InstructLoader(ex, 64, 4, seed=3)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    b = InstructLoader(ex, 64, 4, seed=3)
    b.load_state_dict(state)
    for _ in range(12):
        x, y = a.next()
        x2, y2 = b.next()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    d = InstructLoader(ex, 64, 8, seed=3)
    d.load_state_dict(state)
    e = InstructLoader(ex, 64, 4, seed=3)
    e.load_state_dict(state)
    assert _rows(*d.next()) == _rows(*e.next()) + _rows(*e.next())
    with pytest.raises(ValueError, match="seed=3 but this loader has 4"):
        InstructLoader(ex, 64, 4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="different examples"):
        InstructLoader(_examples(37, seed=1), 64, 4, seed=3).load_state_dict(state)


def test_loader_padding_share_and_targets():
    ex = _examples(512, hi=120)
    grouped, random_order = InstructLoader(ex, 128, 8, pad_multiple=1), InstructLoader(ex, 128, 8, pad_multiple=1, group_size=1)
    real = positions = 0
    for _ in range(64):
        x, y = grouped.next()
        for row in _rows(x, y):
            e = next(e for e in ex if tuple(e.ids[:-1].tolist()) == row[0])
            # targets: the next token where the mask says so, else ignored
            assert list(row[1]) == [int(t) if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:])]
            real += len(row[0])
        positions += x.numel()
        random_order.next()
    assert grouped.padding_share == pytest.approx(1 - real / positions)
    assert grouped.padding_share < 0.05 < 0.3 < random_order.padding_share


def test_iter_eval_covers_every_example_once():
    ex = _examples(21)
    seen = []
    for r in range(2):
        loader = InstructLoader(ex, 64, 4, dp_rank=r, dp_size=2)
        batches = list(loader.iter_eval())
        assert len(batches) == 3 and loader.padding_share == 0.0  # ceil(21 / 8)
        seen += [row for b in batches for row in _rows(*b)]
    empty = [row for row in seen if not row[0]]
    assert len(empty) == 3 and all(set(t) <= {IGNORE} for _, t in empty)
    assert sorted(row[0] for row in seen if row[0]) == sorted(tuple(e.ids[:-1].tolist()) for e in ex)
    assert len(list(InstructLoader(ex, 64, 4).iter_eval(2))) == 2


def test_val_split_is_held_out(tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(200)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    data = load_instruct(path, CharTokenizer(), 512, val_fraction=0.2, seed=1, progress=False)
    assert len(data.train) + len(data.val) == 200 and 20 < len(data.val) < 60
    again = load_instruct(path, CharTokenizer(), 512, val_fraction=0.2, seed=1, progress=False)
    assert [e.where for e in again.val] == [e.where for e in data.val]
    assert {e.where for e in data.val}.isdisjoint(e.where for e in data.train)


def test_bad_inputs(tmp_path):
    tok = CharTokenizer()
    good = {"instruction": "a", "output": "b"}
    p = write_jsonl(tmp_path / "miss.jsonl", [good, {"instruction": "a"}])
    with pytest.raises(ValueError, match=r"miss.jsonl:2: an Alpaca record needs .*'output' is missing"):
        load_instruct(p, tok, 512, progress=False)
    with pytest.warns(UserWarning, match=r"skipped 1: .*miss.jsonl:2 \(an Alpaca record"):
        data = load_instruct(p, tok, 512, on_bad="skip", progress=False)
    assert len(data.train) == 1 and data.skipped[0][0].endswith("miss.jsonl:2")

    u, a = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [u, a]}, {"messages": [u, u, a]}])
    with pytest.raises(ValueError, match="chat.jsonl:2: \"messages\": message 1 has role 'user' where 'assistant'"):
        load_instruct(p, tok, 512, progress=False)
    p = write_jsonl(tmp_path / "end.jsonl", [{"messages": [u, a, u]}])
    with pytest.raises(ValueError, match="end.jsonl:1: .*last message must be from assistant"):
        load_instruct(p, tok, 512, progress=False)

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        load_instruct(tmp_path / "empty.jsonl", tok, 512, progress=False)
    (tmp_path / "bad.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"bad.json:3 is not valid JSON"):
        load_instruct(tmp_path / "bad.json", tok, 512, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        load_instruct(tmp_path / "bad.jsonl", tok, 512, progress=False)
    p = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"odd.jsonl:1: cannot tell the record's format from its keys \['answer', 'question'\]"):
        load_instruct(p, tok, 512, progress=False)

    # an example longer than the context: a counted, reported skip, or an error
    p = write_jsonl(tmp_path / "long.jsonl", [good, {"instruction": "a" * 300, "output": "b"}, good])
    with pytest.warns(UserWarning, match=r"skipped 1: .*long.jsonl:2 \(\d+ tokens > seq_len \+ 1 = 201\)"):
        data = load_instruct(p, tok, 200, progress=False)
    assert len(data.train) == 2 and len(data.skipped) == 1
    with pytest.raises(ValueError, match=r"long.jsonl:2: the example has \d+ tokens, more than seq_len \+ 1 = 201"):
        load_instruct(p, tok, 200, on_too_long="error", progress=False)
    # all skipped: an error, not an empty dataset
    with pytest.raises(ValueError, match="no usable training examples"), pytest.warns(UserWarning):
        load_instruct(write_jsonl(tmp_path / "all.jsonl", [{"instruction": "a" * 300, "output": "b"}]), tok, 200,
                      progress=False)
    with pytest.raises(ValueError, match="exceed seq_len \\+ 1 = 33 tokens, the first from x:"):
        InstructLoader(_examples(5, lo=40, hi=50), 32, 2)
