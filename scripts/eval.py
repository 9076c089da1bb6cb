"""Evaluate a Meta-layout checkpoint: perplexity of text files and the scores of local tasks.

    python scripts/eval.py --ckpt_dir out/model --text val.txt --tasks tasks/my_task.json
    python scripts/eval.py --ckpt_dir 7B --tokenizer_path tokenizer.model --tasks a.json,b.json --num_fewshot 5
    torchrun --nproc_per_node 2 scripts/eval.py --ckpt_dir 13B ...      (tensor parallel)

--text: .txt files (one document each) or .jsonl files (each line's "text"). --tasks: JSON task
specs (see llama/eval/evaluation.py, TaskSpec). Results go to --out as JSON (rank 0) and are printed.
On a CPU the model runs in fp32 unless --dtype says otherwise, so that scores do not depend on which
CPU ran them (bf16 rounds log-likelihoods by ~0.1 nat, enough to flip a close multiple choice).
"""

from __future__ import annotations


from llama.cli import run
from llama.env import scoring_dtype
from llama.eval import TaskSpec, evaluate_tasks, perplexity, read_documents, write_results
from llama.inference import Llama
from llama.formats.locate import checkpoint_args


def _as_list(x) -> list:
    """fire gives a str for `a.json` or `a.json,b.json` and a list for '["a.json", "b.json"]'."""
    return [] if x is None else [p for p in x.split(",") if p] if isinstance(x, str) else [str(p) for p in x]


def main(ckpt_dir: str, *, tokenizer_path: str | None = None, text=None, tasks=None, out: str = "eval_results.json",
         max_seq_len: int | None = None, stride: int | None = None, batch_size: int = 16,
         num_fewshot: int | None = None, limit: int | None = None, records: bool = False,
         dtype: str | None = None, device: str | None = None) -> None:
    texts, specs = _as_list(text), _as_list(tasks)
    if not texts and not specs:
        raise ValueError("nothing to evaluate: give --text FILE(s) for perplexity and/or --tasks SPEC.json(s)")
    docs = read_documents(texts) if texts else []  # bad files and specs fail before the model loads
    specs = [TaskSpec.load(s, num_fewshot=num_fewshot, limit=limit) for s in specs]
    max_seq_len = max_seq_len or checkpoint_args(ckpt_dir).max_seq_len
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=batch_size,
                        dtype=scoring_dtype(dtype, device), device=device, decoder="eager")
    model, tokenizer = llama.model, llama.tokenizer
    results = {"checkpoint": str(ckpt_dir), "max_seq_len": max_seq_len, "dtype": str(llama.dtype).removeprefix("torch."),
               "world_size": llama.world_size}
    if texts:
        results["perplexity"] = {"files": [str(t) for t in texts],
                                 **perplexity(model, tokenizer, docs, stride=stride, batch_size=batch_size)}
    if specs:
        results["tasks"] = evaluate_tasks(model, tokenizer, specs, batch_size=batch_size, records=records)
    if llama.rank == 0:
        if texts:
            p = results["perplexity"]
            print(f"perplexity {p['perplexity']:.3f}  bits/byte {p['bits_per_byte']:.4f}  "
                  f"({p['tokens']} tokens in {p['documents']} documents, context {p['context']}, stride {p['stride']})")
        for name, r in results.get("tasks", {}).items():
            scores = "  ".join(f"{m} {r[m]:.4f}" + (f" ± {r[m + '_stderr']:.4f}" if r.get(m + "_stderr") is not None else "")
                               for m in r if f"{m}_stderr" in r)
            print(f"{name}: {scores}  (n={r['n']}, {r['num_fewshot']}-shot)")
        print(f"results written to {write_results(results, out)}")


if __name__ == "__main__":
    run(main)
