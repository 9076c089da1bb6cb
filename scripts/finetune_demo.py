"""Instruction tuning end to end on what every machine has: the Python standard library's documented
functions as instructions.

    python scripts/finetune_demo.py                    # or: make finetune-demo
    python scripts/finetune_demo.py --minutes 5        # a smaller time budget

Data: for every public top-level function of the standard library with a docstring, the record
{"instruction": "Write a Python function that <first docstring line>", "output": <its source without
the docstring>} (inspect/ast over sysconfig's stdlib path). A seeded 5% of the records is held out.
Model: the demo's pretrained model (runs/demo/model from `make demo`) when it is there, else a small
model pretrained here on the standard library's files for a few minutes (documents data format).
Then LoRA (llama/configs/train/finetune_demo.json) for a time-bounded number of steps; printed: the
held-out response loss before and after, and greedy completions of 3 held-out instructions before
and after. The pretraining corpus is the standard library itself, which holds the held-out functions'
source: the held-out loss measures learning the instruction -> code format, not unseen code.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import time
from pathlib import Path

from llama.cli import run as run_script
from llama.data import train_tokenizer
from llama.formats.meta import PARAMS
from llama.inference import Llama
from llama.tokenizer import Tokenizer
from llama.train import TrainConfig, Trainer
from llama.train.finetune import InstructLoaders

# Directories of the standard library that hold tests, fixtures or vendored tools, not library code.
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
# First words of docstrings in the imperative ("Return the ..."), conjugated after "that" ("returns").
VERBS = ("return", "create", "convert", "get", "set", "check", "compute", "calculate", "make", "build", "read",
         "write", "parse", "find", "remove", "add", "split", "join", "open", "close", "format", "encode", "decode",
         "copy", "load", "save", "update", "generate", "run", "call", "print", "determine", "construct", "escape",
         "quote", "unquote", "normalize", "translate", "apply", "extract", "initialize", "register", "wrap", "raise",
         "handle", "change", "produce", "send", "search", "match", "compare", "delete", "list", "yield", "iterate",
         "emit", "test", "strip", "replace", "turn", "tell", "guess", "walk", "fetch", "process", "display", "show")
MAX_OUTPUT_CHARS = 600


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (tests and vendored tools left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"found no .py files under the standard library at {root}")
    return files


def instruction_for(doc_line: str) -> str:
    """'Return the cosine of x.' -> 'Write a Python function that returns the cosine of x.'"""
    first, _, rest = doc_line.partition(" ")
    word = first.lower()
    if word in VERBS:
        if word.endswith(("s", "sh", "ch", "x", "z")):
            word += "es"
        elif word.endswith("y") and word[-2:-1] not in "aeiou":
            word = word[:-1] + "ies"
        else:
            word += "s"
        return f"Write a Python function that {word} {rest}".rstrip()
    return f"Write a Python function whose docstring begins: {doc_line}"


def function_records(path: Path) -> list[dict]:
    """The instruction records of one file's public, documented top-level functions whose source
    (without the docstring) is at most MAX_OUTPUT_CHARS characters."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if len(first) < 12 or len(node.body) < 2:
            continue
        doc_node, body_start = node.body[0], node.body[1]
        # the def line(s), then the body after the docstring, as written in the file
        source = "".join(lines[node.lineno - 1:doc_node.lineno - 1]) + "".join(lines[body_start.lineno - 1:node.end_lineno])
        if len(source) <= MAX_OUTPUT_CHARS:
            out.append({"instruction": instruction_for(first), "output": source.rstrip() + "\n",
                        "source": f"{path.name}:{node.lineno}"})
    return out


def build_dataset(out: Path) -> Path:
    """Write the standard library's function records to `out` (JSONL); returns it."""
    records = [r for f in stdlib_files() for r in function_records(f)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "output")}) + "\n" for r in records))
    return out


def _stage(name: str):
    print(f"\n== {name}", flush=True)


def pretrain_small(work: Path, seconds: float) -> tuple[Path, Path]:
    """A small model pretrained on the standard library's files for about `seconds`; returns (model
    dir in Meta's layout, tokenizer)."""
    files = stdlib_files()
    tok = work / "tokenizer.model"
    if not tok.is_file():
        t = time.time()
        train_tokenizer(files, tok, vocab_size=4096, input_sentence_size=100_000)
        print(f"trained a 4096-piece tokenizer in {time.time() - t:.0f}s")
    model_dir = work / "pretrained"
    if (model_dir / PARAMS).is_file():
        print(f"reusing {model_dir}")
        return model_dir, tok
    # a fixed, spread-out subset of the files (~4 MB) as documents ({"text"} lines): no preparation step
    corpus = work / "stdlib_documents.jsonl"
    files = [f for f in files if f.stat().st_size > 2000]
    corpus.write_text("".join(json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n"
                              for f in files[::max(1, len(files) // 300)]))
    cfg = TrainConfig.from_name("finetune_demo", lora=None, data=str(corpus), data_format="documents",
                                val_fraction=0.0, tokenizer=str(tok), out_dir=str(work / "pretrain"),
                                export_dir=str(model_dir), model="20M", eval_batches=0, lr=3e-3, warmup_steps=10,
                                **{"model.dim": 192, "model.n_layers": 4, "model.n_heads": 4})
    loaders = InstructLoaders(cfg, str(tok))
    cfg = TrainConfig.from_dict(cfg.to_dict(), steps=steps_for(cfg, loaders, seconds))
    print(f"pretraining {cfg.steps} steps of {cfg.global_batch_tokens} tokens (~{seconds / 60:.0f} min)")
    Trainer(cfg, make_loader=loaders).fit()
    return model_dir, tok


def steps_for(cfg: TrainConfig, loaders, seconds: float) -> int:
    """How many steps of `cfg` fit in `seconds`, from two timed steps of a throwaway trainer."""
    probe = Trainer(TrainConfig.from_dict(cfg.to_dict(), steps=1000, out_dir=cfg.out_dir + "_probe", resume="never",
                                          export_dir=None, export_hf=None, progress=False),
                    make_loader=loaders)
    probe.train_step()  # warm-up
    t = time.perf_counter()
    probe.train_step()
    return max(10, int(seconds / (time.perf_counter() - t)))


def held_out_records(data_file: Path, val_wheres: list[str], n: int) -> list[dict]:
    lines = data_file.read_text().splitlines()
    return [json.loads(lines[int(w.rsplit(":", 1)[1]) - 1]) for w in val_wheres[:n]]


def complete(llm: Llama, records: list[dict], max_gen_len: int) -> list[str]:
    prompts = [ALPACA_PROMPT.format(instruction=r["instruction"]) for r in records]
    return [o["generation"] for o in llm.text_completion(prompts, temperature=0, max_gen_len=max_gen_len)]


ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def run(workdir: str = "runs/finetune_demo", base: str = "runs/demo", minutes: float = 9.0, examples: int = 3,
        max_gen_len: int = 96, **overrides) -> dict:
    """Run the demo in about `minutes`; returns a summary (also in workdir/summary.json).

    base: the `make demo` workdir whose model/ and tokenizer.model are used when present.
    overrides: fields of the finetune_demo training config (e.g. lr=1e-3)."""
    t_start = time.time()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)

    _stage("data: the standard library's documented functions")
    data_file = build_dataset(work / "stdlib_functions.jsonl")
    print(f"{sum(1 for _ in data_file.open())} instructions -> {data_file}")

    _stage("base model")
    base_dir = Path(base)
    if (base_dir / "model" / PARAMS).is_file() and (base_dir / "tokenizer.model").is_file():
        model_dir, tok = base_dir / "model", base_dir / "tokenizer.model"
        print(f"the demo's pretrained model: {model_dir}")
    else:
        print(f"no pretrained demo model in {base_dir}/model (`make demo` makes one): pretraining a small one")
        model_dir, tok = pretrain_small(work, seconds=minutes * 60 * 0.45)

    _stage("LoRA fine-tuning")
    cfg = TrainConfig.from_name("finetune_demo", init_from=str(model_dir), tokenizer=str(tok), data=str(data_file),
                                out_dir=str(work / "lora"), export_dir=str(work / "model"), resume="never", **overrides)
    loaders = InstructLoaders(cfg, str(tok))
    print(loaders.data.summary())
    budget = max(30.0, minutes * 60 - (time.time() - t_start) - 60)  # leave a minute for evaluation and completions
    cfg = TrainConfig.from_dict(cfg.to_dict(), steps=min(cfg.steps, steps_for(cfg, loaders, budget)))
    trainer = Trainer(cfg, make_loader=loaders)
    held_out = held_out_records(data_file, [e.where for e in loaders.data.val], examples)
    before = trainer.evaluate(1000)["val_loss"]
    llm = Llama(trainer.model, Tokenizer(tok), max_seq_len=cfg.seq_len + max_gen_len, max_batch_size=examples,
                decoder="eager")
    trainer.model.eval()
    gens_before = complete(llm, held_out, max_gen_len)
    trainer.model.train()
    print(f"held-out response loss before: {before:.3f} ({len(loaders.data.val)} held-out examples)")
    result = trainer.fit()
    after = trainer.evaluate(1000)["val_loss"]
    print(f"held-out response loss: {before:.3f} -> {after:.3f} after {result['step']} LoRA steps")

    _stage("held-out instructions, before -> after")
    tuned = Llama.build(str(work / "model"), str(tok), max_seq_len=cfg.seq_len + max_gen_len, max_batch_size=examples)
    gens_after = complete(tuned, held_out, max_gen_len)
    for rec, b, a in zip(held_out, gens_before, gens_after):
        print(f"### {rec['instruction']}\n--- before:\n{b.strip() or '(nothing)'}\n--- after:\n{a.strip()}\n"
              f"--- the standard library's:\n{rec['output'].strip()}\n")
    summary = {"base": str(model_dir), "examples": len(loaders.data.train), "held_out": len(loaders.data.val),
               "steps": result["step"], "val_loss_before": before, "val_loss_after": after,
               "seconds": time.time() - t_start, "model": str(work / "model"), "adapter": str(work / "model" / "peft")}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds'] / 60:.1f} min. Chat with it: python scripts/example.py --ckpt_dir "
          f"{work / 'model'} --tokenizer_path {tok} --chat; the adapter alone (PEFT format): {work / 'model' / 'peft'}")
    return summary


if __name__ == "__main__":
    run_script(run)
