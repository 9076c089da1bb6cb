"""The demo's pieces: corpus discovery, the compile-share score, the plot, and one tiny end-to-end run."""

import json
import math
import random

import importlib.util
from pathlib import Path

import pytest

# the demo is an application (scripts/demo.py), not part of the library: load it from its file
_spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parent.parent / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_stdlib_corpus_is_library_code():
    files = demo.stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "decoder.py", "functools.py"} <= names
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_complete_lines_and_compile_share_by_hand():
    assert demo.complete_lines("def f(x):", "\n    return x\n    y = (") == "def f(x):\n    return x"
    assert demo.complete_lines("import os", "") == "import os"
    prompts = ["def f(x):", "import os", "class A:"]
    gens = ["\n    return x + 1\n    retu", "\nimport sys\n", "\n  def (:\n"]
    # the first and second compile once cut to whole lines; the third is a syntax error
    assert demo.compile_share(prompts, gens) == 2 / 3
    assert demo.compiles("x = 1\n") and not demo.compiles("x = (\n") and not demo.compiles("a\0b")


def test_plot_has_train_and_validation_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 5.0 - s / 10} | ({"val_loss": 5.2 - s / 10} if s % 5 == 0 else {}) for s in range(1, 21)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = demo.plot_losses(metrics, tmp_path / "loss.png", val_loss_before=math.log(300))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_tiny_end_to_end_run_then_reuse(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["value", "result", "items", "count", "name", "data", "index", "total"]
    for i in range(12):
        lines = []
        for j in range(40):
            a, b = rng.choice(words), rng.choice(words)
            lines += [f"def {a}_{j}({b}):", f"    {a} = {b} + {j}", f"    return {a}", ""]
        (corpus / f"m{i}.py").write_text("\n".join(lines))
    work = tmp_path / "work"
    kw = dict(workdir=str(work), data=str(corpus), config="tiny", vocab_size=300, val_fraction=0.25, samples=2, max_gen_len=8,
              steps=6, eval_every=3, eval_batches=1, seq_len=64, global_batch_tokens=512, micro_batch_size=8)
    s = demo.run(**kw)
    assert s["steps"] == 6 and 0.0 <= s["compile_share"] <= 1.0 and s["compile_samples"] == 6
    assert s["val_ppl"] < s["val_ppl_before"]  # it learned something
    assert (work / "loss.png").is_file() and (work / "model" / "params.json").is_file()
    tok_mtime = (work / "tokenizer.model").stat().st_mtime_ns
    s2 = demo.run(**kw)  # a second run reuses every stage
    assert (work / "tokenizer.model").stat().st_mtime_ns == tok_mtime
    assert s2["val_ppl_before"] == s["val_ppl_before"] and s2["steps"] == 6
    with pytest.raises(ValueError, match="built from other inputs.*--fresh"):  # no silent reuse
        demo.run(**{**kw, "vocab_size": 320})
