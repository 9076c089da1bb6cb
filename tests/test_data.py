import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llama.data.prepare as data_mod
from tests.conftest import ROOT
from llama.data import PackedLoader, iter_documents, load_mixture, prepare_data, read_meta
from llama.data.loader import permute
from llama.data.prepare import token_dtype

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there one all we their can has been if more").split()


def make_docs(n, seed, words=WORDS):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
        if i % 7 == 0:
            text += f"\n    return x + {rng.randint(0, 9999)}  # 日本 😀\n"
        docs.append(text)
    return docs


def write_corpus(root, docs):
    """First third as .txt files (one doc each), the rest as two .jsonl files."""
    root.mkdir(parents=True, exist_ok=True)
    k = len(docs) // 3
    for i, d in enumerate(docs[:k]):
        (root / f"doc_{i:03d}.txt").write_text(d)
    half = k + (len(docs) - k) // 2
    for name, part in [("part_a.jsonl", docs[k:half]), ("part_b.jsonl", docs[half:])]:
        (root / name).write_text("".join(json.dumps({"text": d, "id": j}) + "\n" for j, d in enumerate(part)))
    return root


def split_docs(tokens, tok):
    """The documents of a stream: [bos] + ids + [eos] each, decoded; asserts the framing."""
    assert tokens.size == 0 or (tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id)
    ends = np.flatnonzero(tokens == tok.eos_id)
    out, start = [], 0
    for e in ends:
        assert tokens[start] == tok.bos_id
        out.append(tokens[start:e + 1].tolist())
        start = e + 1
    return out


def read_split(path, split):
    meta = read_meta(path)
    return np.concatenate([np.fromfile(path / s["file"], dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]] or [np.zeros(0, np.int64)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(150, seed=1)
    return docs, write_corpus(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="module")
def prepared(corpus, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare_data(corpus[1], tiny_tokenizer.model_path, out, val_fraction=0.2, num_workers=1,
                 progress=False, docs_per_chunk=8, shard_tokens=1000)
    return out


def test_tokens_equal_encode_of_each_document(corpus, prepared, tiny_tokenizer):
    docs, _ = corpus
    tok = tiny_tokenizer
    meta = read_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["tokenizer_sha256"] == tok.sha256
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens=1000 rolled over
    # the files are read in sorted order: doc_*.txt, then part_a.jsonl, part_b.jsonl
    expected = [tok.encode(d, bos=True, eos=True) for d in docs]
    train, val = (split_docs(read_split(prepared, s), tok) for s in ("train", "val"))
    assert len(train) + len(val) == len(docs) == meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"]
    # each split is the encoded documents, in input order, and together they are all of them
    ti = vi = 0
    for e in expected:
        if ti < len(train) and train[ti] == e:
            ti += 1
        elif vi < len(val) and val[vi] == e:
            vi += 1
        else:
            raise AssertionError("a document is in neither split, or out of order")
    assert ti == len(train) and vi == len(val)
    assert 0.08 < meta["splits"]["val"]["n_docs"] / len(docs) < 0.35
    assert meta["splits"]["train"]["n_tokens"] == sum(s["n_tokens"] for s in meta["splits"]["train"]["shards"])


def test_workers_and_input_order_do_not_change_output(corpus, prepared, tiny_tokenizer, tmp_path):
    out = tmp_path / "w2"
    prepare_data(corpus[1], tiny_tokenizer.model_path, out, val_fraction=0.2, num_workers=2,
                 progress=False, docs_per_chunk=8, shard_tokens=1000)
    for f in sorted(p.name for p in prepared.iterdir()):
        assert (out / f).read_bytes() == (prepared / f).read_bytes(), f
    # the val choice is a hash of the text: the same documents whatever the order of the inputs
    out2 = tmp_path / "rev"
    files = sorted(corpus[1].iterdir(), reverse=True)
    prepare_data(files, tiny_tokenizer.model_path, out2, val_fraction=0.2, num_workers=1, progress=False)
    tok = tiny_tokenizer
    sets = [sorted(map(tuple, split_docs(read_split(p, "val"), tok))) for p in (prepared, out2)]
    assert sets[0] == sets[1]


def test_token_dtype_and_uint32_data(corpus, prepared, tiny_tokenizer, tmp_path, monkeypatch):
    assert token_dtype(512) == np.uint16 and token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    monkeypatch.setattr(data_mod, "token_dtype", lambda n: np.uint32)
    out = tmp_path / "u32"
    prepare_data(corpus[1], tiny_tokenizer.model_path, out, val_fraction=0.2, num_workers=1, progress=False)
    assert read_meta(out)["dtype"] == "uint32"
    assert (out / "train_00000.bin").stat().st_size == 4 * read_meta(out)["splits"]["train"]["n_tokens"]
    a = PackedLoader(out, 16, 4, seed=3)
    b = PackedLoader(prepared, 16, 4, seed=3)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next(), b.next()))


def test_jsonl_errors_leave_nothing(tiny_tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        prepare_data(src, tiny_tokenizer.model_path, out, progress=False, num_workers=1)
    (src / "bad.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:3 has no "text"'):
        prepare_data(src, tiny_tokenizer.model_path, out, progress=False, num_workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no half dataset, no temp dir


def test_missing_empty_and_existing(tiny_tokenizer, tmp_path, prepared):
    tp = tiny_tokenizer.model_path
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        prepare_data(tmp_path / "nothing_here" / "*.jsonl", tp, tmp_path / "o", progress=False)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="inputs are empty"):
        prepare_data([tmp_path / "empty.txt", tmp_path / "empty.jsonl"], tp, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_data(tmp_path / "empty.txt", tp, prepared, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        prepare_data(tmp_path / "empty.txt", tmp_path / "no.model", tmp_path / "o", progress=False)
    (tmp_path / "one.txt").write_text("a single document")
    prepare_data(tmp_path / "one.txt", tp, tmp_path / "o", progress=False, val_fraction=0)
    prepare_data(tmp_path / "one.txt", tp, tmp_path / "o", progress=False, val_fraction=0, overwrite=True)
    assert read_meta(tmp_path / "o")["splits"]["train"]["n_docs"] == 1
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        PackedLoader(tmp_path, 8, 1)


def test_loader_refuses_other_tokenizer_and_long_seq_len(prepared, tiny_tokenizer, tmp_path):
    PackedLoader(prepared, 8, 2, tokenizer_sha256=tiny_tokenizer.sha256)
    with pytest.raises(ValueError, match="different tokenizer"):
        PackedLoader(prepared, 8, 2, tokenizer_sha256="0" * 64)
    n = read_meta(prepared)["splits"]["val"]["n_tokens"]
    PackedLoader(prepared, n - 1, 1, split="val")  # exactly one window of n tokens
    with pytest.raises(ValueError, match=f"not one full window of seq_len \\+ 1 = {n + 1}"):
        PackedLoader(prepared, n, 1, split="val")
    # a truncated shard is caught when opened
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in prepared.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "train_00001.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="train_00001.bin is missing or truncated"):
        PackedLoader(broken, 8, 2)


def windows_of(stream, seq_len):
    """All windows of seq_len + 1 tokens at stride seq_len, by hand."""
    n = (len(stream) - 1) // seq_len
    return [tuple(stream[i * seq_len:i * seq_len + seq_len + 1].tolist()) for i in range(n)]


def write_stream(path, tokens, sha="f" * 64):
    """A dataset by hand: one train shard holding `tokens`, in the prepared format."""
    path.mkdir()
    np.asarray(tokens, dtype=np.uint16).tofile(path / "train_00000.bin")
    split = {"n_tokens": len(tokens), "n_docs": 1, "shards": [{"file": "train_00000.bin", "n_tokens": len(tokens)}]}
    (path / "meta.json").write_text(json.dumps({"format": data_mod.FORMAT, "tokenizer_sha256": sha, "dtype": "uint16",
                                                "splits": {"train": split, "val": {**split, "shards": []}}}))
    return path


def test_windows_are_consecutive_slices_and_epochs_reshuffle(tmp_path):
    seq_len, bs, n_tokens = 12, 5, 1000
    ds = write_stream(tmp_path / "arange", np.arange(n_tokens))  # token = its position
    n = (n_tokens - 1) // seq_len  # 83 windows of 13 tokens at stride 12
    loader = PackedLoader(ds, seq_len, bs, seed=7)
    assert loader.n_windows == [n]
    seen = []
    for _ in range(2 * n // bs + 1):
        x, y = loader.next()
        assert x.shape == y.shape == (bs, seq_len) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            start = row_x[0]
            assert start % seq_len == 0 and start + seq_len < n_tokens
            assert row_x == list(range(start, start + seq_len))
            assert row_y == list(range(start + 1, start + seq_len + 1))
            seen.append(start // seq_len)
    # each epoch is every window exactly once, and the second epoch is a different order
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n] and seen[:n] != list(range(n))
    # another seed, another order; the same seed, the same batches
    assert PackedLoader(ds, seq_len, bs, seed=8).next()[0].tolist() != PackedLoader(ds, seq_len, bs, seed=7).next()[0].tolist()
    assert PackedLoader(ds, seq_len, bs, seed=7).next()[0].tolist() == PackedLoader(ds, seq_len, bs, seed=7).next()[0].tolist()


def test_dp_ranks_are_disjoint_and_cover_one_rank(tmp_path):
    seq_len, bs, dp = 10, 3, 2
    ds = write_stream(tmp_path / "arange", np.arange(5000))
    one = PackedLoader(ds, seq_len, bs * dp, seed=1)
    ranks = [PackedLoader(ds, seq_len, bs, dp_rank=r, dp_size=dp, seed=1) for r in range(dp)]
    n = one.n_windows[0]
    seen = [[], []]
    for _ in range(n // (bs * dp)):  # the first epoch
        x1, y1 = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        for r, (x, _) in enumerate(parts):
            seen[r] += x[:, 0].tolist()
    assert len(set(seen[0])) == len(seen[0]) == len(seen[1]) and not set(seen[0]) & set(seen[1])
    assert len(seen[0] + seen[1]) == n // (bs * dp) * bs * dp


def test_resume_gives_the_same_batches(prepared, tmp_path):
    mix = {"a": (prepared, 0.6), "b": (prepared, 0.4)}
    ref = PackedLoader(mix, 9, 4, seed=5)
    batches = [ref.next() for _ in range(12)]
    first = PackedLoader(mix, 9, 4, seed=5)
    for _ in range(5):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = PackedLoader(mix, 9, 4, seed=5)
    resumed.load_state_dict(state)
    for x, y in batches[5:]:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(ValueError, match="seq_len=9"):
        PackedLoader(mix, 8, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5"):
        PackedLoader(mix, 9, 4, seed=6).load_state_dict(state)
    # the same data made with another tokenizer (here: the record of it changed) is named as such
    other = {**state, "tokenizers": {"a": "f" * 64, "b": "f" * 64}}
    with pytest.raises(ValueError, match=r"tokenized with another tokenizer \(sha256 ffffffffffff\.\.\.\) than this data"):
        PackedLoader(mix, 9, 4, seed=5).load_state_dict(other)


def test_mixture_proportions(tiny_tokenizer, tmp_path):
    tp = tiny_tokenizer.model_path
    # two sources with disjoint vocabularies, so each row tells its source
    for name, words in [("a", ["alpha", "apple"]), ("b", ["banana", "boat"])]:
        write_corpus(tmp_path / f"src_{name}", make_docs(30 if name == "a" else 10, 2, words))
        prepare_data(tmp_path / f"src_{name}", tp, tmp_path / name, val_fraction=0, progress=False, num_workers=1)
    streams = {n: read_split(tmp_path / n, "train").astype(np.int64) for n in "ab"}
    wins = {n: set(windows_of(s, 8)) for n, s in streams.items()}
    assert not wins["a"] & wins["b"]
    cfg = tmp_path / "mix.json"
    cfg.write_text(json.dumps({"a": {"path": str(tmp_path / "a"), "weight": 8},
                               "b": {"path": str(tmp_path / "b"), "weight": 2}}))
    loader = PackedLoader(cfg, 8, 50, seed=0)
    counts = {"a": 0, "b": 0}
    for _ in range(60):
        x, y = loader.next()
        for row in torch.cat([x, y[:, -1:]], 1).tolist():
            counts["a" if tuple(row) in wins["a"] else "b"] += 1
            assert tuple(row) in wins["a"] | wins["b"]
    frac = counts["a"] / 3000
    assert abs(frac - 0.8) < 0.03, counts
    # the small source wrapped around several epochs
    assert counts["b"] > 3 * len(wins["b"])
    n_wins = {k: len(windows_of(v, 8)) for k, v in streams.items()}
    assert loader.epochs == pytest.approx({k: counts[k] / n_wins[k] for k in "ab"})
    # a source that is not there: named, with the folder its relative path was read from
    cfg.write_text(json.dumps({"a": {"path": str(tmp_path / "a"), "weight": 8}, "b": {"path": "b", "weight": 2}}))
    with pytest.raises(FileNotFoundError, match=r"^mixture source 'b': b is not a prepared dataset .*relative paths "
                                                r"are read from the current folder, " + re.escape(str(Path.cwd()))):
        PackedLoader(cfg, 8, 50)


def test_iter_eval_is_every_val_window_in_order(prepared):
    seq_len, bs = 6, 2
    wins = windows_of(read_split(prepared, "val").astype(np.int64), seq_len)
    one = PackedLoader(prepared, seq_len, 2 * bs, split="val")
    rows = [tuple(r) for x, y in one.iter_eval() for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    assert rows == wins[:len(wins) // (2 * bs) * (2 * bs)]
    assert len(list(one.iter_eval(max_batches=2))) == 2
    r0, r1 = (PackedLoader(prepared, seq_len, bs, dp_rank=r, dp_size=2, split="val") for r in range(2))
    for (x, _), (a, _), (b, _) in zip(one.iter_eval(), r0.iter_eval(), r1.iter_eval()):
        assert torch.equal(torch.cat([a, b]), x)
    # next() on the val split is deterministic and unshuffled: windows in order, then wrapping
    v = PackedLoader(prepared, seq_len, bs, split="val")
    got = [tuple(r) for _ in range(3) for r in v.next()[0].tolist()]
    assert got == [w[:-1] for w in wins[:3 * bs]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(PackedLoader(prepared, seq_len, 10_000, split="val").iter_eval())


def test_permutation_is_a_bijection():
    for n in [1, 2, 3, 5, 64, 1000, 12345]:
        p = permute(np.arange(n), n, np.uint64(n * 31 + 7))
        assert np.array_equal(np.sort(p), np.arange(n))


def test_paper_mixture_config():
    mix = load_mixture("llama_mixture")  # shipped in llama/configs/data
    weights = {k: round(w * 100, 6) for k, (_, w) in mix.items()}
    assert weights == {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5,
                       "arxiv": 2.5, "stackexchange": 2.0}
    with pytest.raises(ValueError, match="mixture source 'x'"):
        load_mixture({"x": {"path": "d"}})


def test_prepare_script(corpus, tiny_tokenizer, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"one": {"inputs": f"{corpus[1]}/*.jsonl", "path": str(tmp_path / "one"), "weight": 1},
                               "two": {"inputs": f"{corpus[1]}/*.txt", "path": str(tmp_path / "two"), "weight": 3}}))
    mod.main(tokenizer=str(tiny_tokenizer.model_path), mixture=str(mix), num_workers=1, val_fraction=0.5)
    assert "one: wrote" in capsys.readouterr().out
    x, y = PackedLoader(mix, 8, 4, tokenizer_sha256=tiny_tokenizer.sha256).next()
    assert x.shape == (4, 8)
    # a source added later: the prepared ones are kept, the new one written; a source without a val
    # split is said at once, and validation scores the others (with a warning)
    spec = json.loads(mix.read_text())
    spec["three"] = {"inputs": f"{corpus[1]}/*.txt", "path": str(tmp_path / "three"), "weight": 1}
    mix.write_text(json.dumps(spec))
    mod.main(tokenizer=str(tiny_tokenizer.model_path), mixture=str(mix), num_workers=1, val_fraction=1e-6)
    out = capsys.readouterr().out
    assert "one: " + str(tmp_path / "one") + " is already prepared with this tokenizer (kept" in out
    assert "three: wrote" in out and "no document was held out for validation (val_fraction 1e-06" in out
    with pytest.warns(UserWarning, match=r"validation: source\(s\) \['three'\] have no val split"):
        val = PackedLoader(mix, 8, 4, split="val")
    assert val.weights.tolist() == pytest.approx([0.25, 0.75, 0.0])
    # a kept source needs no inputs any more (the raw files may be gone)
    spec["one"]["inputs"] = str(tmp_path / "gone" / "*.jsonl")
    mix.write_text(json.dumps(spec))
    mod.main(tokenizer=str(tiny_tokenizer.model_path), mixture=str(mix), num_workers=1)
    assert "one: " + str(tmp_path / "one") + " is already prepared" in capsys.readouterr().out
    # a source whose inputs are missing stops the run before any source is tokenized
    spec["four"] = {"inputs": str(tmp_path / "nowhere" / "*.txt"), "path": str(tmp_path / "four"), "weight": 1}
    spec["zero"] = {"inputs": f"{corpus[1]}/*.txt", "path": str(tmp_path / "zero"), "weight": 1}
    mix.write_text(json.dumps({"zero": spec.pop("zero"), **spec}))
    with pytest.raises(FileNotFoundError, match=r"four: data input .*nowhere/\*\.txt matches no file \(nothing was"):
        mod.main(tokenizer=str(tiny_tokenizer.model_path), mixture=str(mix), num_workers=1)
    assert not (tmp_path / "zero").exists()


def test_zero_weight_source_is_never_drawn(tmp_path):
    big = write_stream(tmp_path / "big", np.arange(2000))
    small = write_stream(tmp_path / "small", np.arange(5) + 60000)  # not one window of 9 tokens
    with pytest.raises(ValueError, match="not one full window"):
        PackedLoader({"big": (big, 1), "small": (small, 1)}, 8, 4)
    loader = PackedLoader({"big": (big, 1), "small": (small, 0)}, 8, 64)
    for _ in range(20):
        assert loader.next()[0].max() < 2000


def test_pool_reads_ahead_a_bounded_number_of_chunks():
    from multiprocessing.pool import ThreadPool

    pulled = []

    def jobs():
        for i in range(100):
            pulled.append(i)
            yield i

    with ThreadPool(2) as pool:
        results = data_mod._ordered_map(pool, lambda x: x * x, jobs(), max_pending=4)
        assert next(results) == 0 and len(pulled) <= 5  # not the whole input
        assert list(results) == [i * i for i in range(1, 100)]


def test_failure_halfway_keeps_the_old_dataset(tiny_tokenizer, tmp_path):
    src = tmp_path / "src"
    write_corpus(src, make_docs(30, 3))
    tp = tiny_tokenizer.model_path
    out = tmp_path / "out"
    prepare_data(src, tp, out, progress=False, num_workers=1)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (src / "zz_last.jsonl").write_text('{"text": "ok"}\n' * 5 + "not json\n")  # read after the rest
    with pytest.raises(ValueError, match="zz_last.jsonl:6"):
        prepare_data(src, tp, out, progress=False, num_workers=2, docs_per_chunk=2, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_invalid_utf8_bytes_become_replacement_characters(tmp_path, tiny_tokenizer):

    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ok".encode("latin-1"))
    assert list(iter_documents(f)) == ["caf\ufffd ok"]


def test_binary_inputs_are_refused_or_skipped_and_counted(tmp_path, tiny_tokenizer, capsys):
    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    text.write_text("the model returns a value for the data. " * 30)
    elf = tmp_path / "in" / "x.txt"  # an executable under a text name: NUL bytes
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    noise = tmp_path / "in" / "y.txt"  # no NUL, but hardly any valid UTF-8 (a compressed file, say)
    noise.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4000)))
    with pytest.raises(ValueError, match=rf"^{elf} is not text \(a NUL byte at offset 7\): remove it .*--skip_binary"):
        prepare_data([tmp_path / "in"], tiny_tokenizer.model_path, tmp_path / "out", num_workers=1, progress=False)
    with pytest.raises(ValueError, match=rf"^{noise} is not text \(\d+% of its first 4,000 bytes are not UTF-8\)"):
        prepare_data([text, noise], tiny_tokenizer.model_path, tmp_path / "out", num_workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    # skipped: the same tokens as preparing the text file alone, and the count stated
    meta = prepare_data([tmp_path / "in"], tiny_tokenizer.model_path, tmp_path / "out", num_workers=1,
                        progress=False, skip_binary=True)
    assert meta["skipped_binary"] == [str(elf), str(noise)] and read_meta(tmp_path / "out")["skipped_binary"] == meta["skipped_binary"]
    assert "skipped 2 binary file(s), e.g." in capsys.readouterr().err
    alone = prepare_data([text], tiny_tokenizer.model_path, tmp_path / "alone", num_workers=1, progress=False)
    assert meta["splits"] == alone["splits"]
    # a Latin-1 file (a few % of its bytes are not UTF-8) is still text
    (tmp_path / "latin1.txt").write_bytes("Le modèle prédit la donnée suivante. ".encode("latin-1") * 20)
    assert data_mod.binary_reason(tmp_path / "latin1.txt") is None
    # the tokenizer trainer refuses them the same way, before writing anything
    with pytest.raises(ValueError, match=rf"^{elf} is not text"):
        data_mod.train_tokenizer([tmp_path / "in"], tmp_path / "tok.model", 300)
    assert not (tmp_path / "tok.model").exists()
