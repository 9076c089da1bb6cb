"""The main job end to end on what every machine has: Python's own standard library as a corpus.

    python scripts/demo.py                      # or: make demo
    python scripts/demo.py --data 'my_texts/**/*.txt' --workdir runs/mine
    python scripts/demo.py --steps 100          # any field of the demo training config

corpus -> tokenizer (the paper's BPE recipe) -> tokenized shards -> pretraining (progress bar,
validation perplexity before and after, loss-curve PNG) -> Meta-layout export -> completions of
code prompts by the exported model (`Llama.build`, as scripts/example.py runs it), scored by the
share that compiles. Each stage leaves
its output in `workdir` and is skipped when that output is already there, so a second run reuses
everything (delete `workdir` or pass `fresh=True` to start over).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from llama.cli import run as run_script
from llama.data import iter_documents, list_files, prepare_data, train_tokenizer
from llama.data.prepare import is_val
from llama.eval import perplexity
from llama.inference import Llama
from llama.train import TrainConfig, Trainer

PROMPTS = ["def fibonacci(n):", "import os", "class Stack:"]
# Directories of the standard library that hold tests, fixtures or vendored tools, not library code.
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (tests and vendored tools left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"found no .py files under the standard library at {root}; pass data=... instead")
    return files


def complete_lines(prompt: str, generation: str) -> str:
    """The prompt and generation cut to whole lines (the last, unfinished line dropped)."""
    text = prompt + generation
    if "\n" not in text:
        return text
    return text[: text.rindex("\n")]


def compiles(code: str) -> bool:
    try:
        compile(code, "<generated>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def compile_share(prompts: list[str], generations: list[str]) -> float:
    snippets = [complete_lines(p, g) for p, g in zip(prompts, generations)]
    return sum(compiles(s) for s in snippets) / max(1, len(snippets))


def plot_losses(metrics_path: Path, png_path: Path, val_loss_before: float | None = None) -> Path | None:
    """Train and validation loss against step, from the trainer's metrics.jsonl (and the validation
    loss of the untrained model at step 0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'llama[demo]')")
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records}  # a resumed run re-logs nothing, but keep the last anyway
    steps = sorted(by_step)
    train = [(s, by_step[s]["loss"]) for s in steps if "loss" in by_step[s]]
    val = [(s, by_step[s]["val_loss"]) for s in steps if "val_loss" in by_step[s]]
    if val_loss_before is not None:
        val.insert(0, (0, val_loss_before))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("demo LLaMA on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _stage(name: str):
    print(f"\n== {name}", flush=True)


def run(workdir: str = "runs/demo", data=None, config: str = "demo", vocab_size: int = 8192,
        fresh: bool = False, samples: int = 8, max_gen_len: int = 64, temperature: float = 0.2,
        top_p: float = 0.95, seed: int = 1, val_fraction: float = 0.02, **overrides) -> dict:
    """Run the demo; returns a summary (also written to `workdir`/summary.json).

    data: files, directories or globs of the user's own text (default: the standard library);
    config: a training config shipped in llama/configs/train, or a JSON path; overrides: its fields
    (e.g. steps=200). samples: completions per prompt scored for the compile share;
    val_fraction: the share of documents held out for validation.
    """
    t_start = time.time()
    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    _stage("corpus")
    if data is None:
        files = stdlib_files()
        source = f"the Python {sys.version_info.major}.{sys.version_info.minor} standard library ({len(files)} files)"
    else:
        files = list_files(data)
        source = f"{len(files)} file(s) from {data}"
    print(f"{source}, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    summary["corpus"] = source
    # what the reusable stages were built from: a rerun with other inputs must not reuse them silently
    inputs = {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "vocab_size": vocab_size,
              "val_fraction": val_fraction}
    built = summary.get("inputs")
    if built is not None and built != inputs:
        raise ValueError(f"{work} was built from other inputs ({built}, now {inputs}); pass --fresh to rebuild "
                         f"it or --workdir for a new one")
    summary["inputs"] = inputs
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    _stage("tokenizer")
    tok_path = work / "tokenizer.model"
    if tok_path.is_file():
        print(f"reusing {tok_path}")
    else:
        t = time.time()
        train_tokenizer(files, tok_path, vocab_size=vocab_size, input_sentence_size=300_000)
        print(f"trained a {vocab_size}-piece BPE tokenizer in {time.time() - t:.0f}s -> {tok_path}")

    _stage("data")
    data_dir = work / "data"
    if (data_dir / "meta.json").is_file():
        print(f"reusing {data_dir}")
    else:
        meta = prepare_data(files, tok_path, data_dir, val_fraction=val_fraction, overwrite=True)
        split = meta["splits"]
        print(f"{split['train']['n_tokens']:,} training and {split['val']['n_tokens']:,} validation tokens "
              f"({split['val']['n_docs']} held-out documents) -> {data_dir}")

    _stage("pretraining")
    cfg = TrainConfig.from_name(config, data=str(data_dir), tokenizer=str(tok_path),
                                out_dir=str(work / "train"), export_dir=str(work / "model"), **overrides)
    trainer = Trainer(cfg)
    if trainer.resume_from is None and "val_ppl_before" not in summary:
        before = trainer.evaluate()
        summary["val_ppl_before"] = before["val_ppl"]
    if "val_ppl_before" in summary:
        print(f"validation perplexity before training: {summary['val_ppl_before']:.1f}")
    t = time.time()
    result = trainer.fit()
    if result["val_loss"] is None:  # nothing was left to train (a rerun): measure the model as it is
        result.update(trainer.evaluate())
    summary["train_seconds"] = summary.get("train_seconds", 0.0) + (time.time() - t)
    summary.update(steps=result["step"], val_loss=result["val_loss"], val_ppl=result["val_ppl"],
                   parameters=trainer.model_size(), model=cfg.model)
    print(f"validation perplexity before training: {summary.get('val_ppl_before', float('nan')):.1f}, "
          f"after: {result['val_ppl']:.2f} (loss {result['val_loss']:.3f}) at step {result['step']}")
    before_loss = math.log(summary["val_ppl_before"]) if "val_ppl_before" in summary else None
    png = plot_losses(Path(cfg.out_dir) / "metrics.jsonl", work / "loss.png", before_loss)
    if png:
        print(f"loss curves -> {png}")
        summary["plot"] = str(png)

    _stage("completions")
    model_dir = Path(result["export"] or cfg.export_dir)
    llm = Llama.build(str(model_dir), str(tok_path), max_seq_len=512, max_batch_size=len(PROMPTS) * samples, seed=seed)
    for prompt, out in zip(PROMPTS, llm.text_completion(PROMPTS, temperature=0, max_gen_len=max_gen_len)):
        print(f"> {prompt}{out['generation']}\n")
    print(f"(greedy; the same model runs with: python scripts/example.py --ckpt_dir {model_dir} "
          f"--tokenizer_path {tok_path})")

    _stage("held-out perplexity (llama.eval: bos-prefixed documents, rolling windows)")
    held_out = [d for f in files for d in iter_documents(f) if d and is_val(d, val_fraction, 0)][:16]
    # scored by whole forwards: weights in the dtype measured faster for matmuls, which on a CPU
    # without native bf16 is fp32 even where bf16 weights decode faster (3x here on such a Xeon)
    scorer = Llama.build(str(model_dir), str(tok_path), max_seq_len=512, max_batch_size=4, decoder="eager")
    ppl = perplexity(scorer.model, scorer.tokenizer, held_out, stride=256, batch_size=4)
    del scorer
    summary["heldout_perplexity"] = ppl["perplexity"]
    print(f"perplexity {ppl['perplexity']:.2f}, {ppl['bits_per_byte']:.3f} bits/byte over {ppl['tokens']:,} tokens "
          f"of {len(held_out)} held-out documents (whole documents, context 512, stride 256)")

    _stage("how Python-like are the completions?")
    prompts = [p for p in PROMPTS for _ in range(samples)]
    outs = llm.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    share = compile_share(prompts, [o["generation"] for o in outs])
    summary["compile_share"] = share
    summary["compile_samples"] = len(prompts)
    print(f"{share:.0%} of {len(prompts)} sampled completions (T={temperature}, top_p={top_p}, "
          f"{max_gen_len} tokens, cut to whole lines) compile as Python")
    summary["total_seconds_last_run"] = time.time() - t_start
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {time.time() - t_start:.0f}s; summary -> {summary_path}")
    return summary


if __name__ == "__main__":
    run_script(run)
