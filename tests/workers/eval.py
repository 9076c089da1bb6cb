"""2-rank worker of tests/test_eval.py, run by `conftest.torchrun` (gloo on CPU) with CKPT TOKENIZER OUT SPEC...:

builds `Llama` on the checkpoint (tensor parallel across the ranks), scores the task specs and
the perplexity of the texts in the first spec's data file with its model, checks that every rank
got the same numbers, and rank 0 writes them as JSON to OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama.eval import evaluate_tasks, perplexity
from llama.inference import Llama
from tests.workers import finish

TEXTS = ["the of and to in is that for it as was with be by on not he this " * 6, "In 1999 it cost 12.50."]


def main(ckpt: str, tokenizer: str, out: str, *specs: str) -> None:
    llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32", device="cpu")
    res = {"world_size": llama.world_size,
           "tasks": evaluate_tasks(llama.model, llama.tokenizer, list(specs), batch_size=3, records=True,
                                   progress=False),
           "perplexity": perplexity(llama.model, llama.tokenizer, TEXTS, stride=20, batch_size=3, progress=False)}
    for r in res["tasks"].values():
        r.pop("seconds"), r.pop("examples_per_s")
    res["perplexity"].pop("seconds")
    everyone = [None] * llama.world_size
    dist.all_gather_object(everyone, res)
    res["ranks_agree"] = all(r == everyone[0] for r in everyone)
    if llama.rank == 0:
        Path(out).write_text(json.dumps(res))
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
