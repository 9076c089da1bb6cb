"""2+ rank worker of tests/test_inference.py, run by `conftest.torchrun`:
`python -m torch.distributed.run --nproc_per_node Q -m tests.workers.generation --tokenizer T --out O CKPT...`
builds `Llama` on every checkpoint directory given, completes the prompts greedily and with seeded
sampling, streams one prompt, checks that all ranks agree and hold only their slice, and rank 0
writes the results as JSON."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama.inference import Llama
from tests.helpers import run_all
from tests.workers import finish

def main(argv):
    tokenizer = argv[argv.index("--tokenizer") + 1]
    out = argv[argv.index("--out") + 1]
    ckpts = [a for i, a in enumerate(argv) if i and argv[i - 1] not in ("--tokenizer", "--out") and not a.startswith("--")]
    results = {}
    for ckpt in ckpts:
        llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=3, dtype="float32", device="cpu")
        res = run_all(llama)
        # each rank holds only its slice: a quarter (on 4 ranks) of wq's rows and of the vocab rows
        wq = llama.model.layers[0].attention.wq.weight
        emb = llama.model.tok_embeddings.weight
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
        res["local_shapes"] = [list(local(wq).shape), list(local(emb).shape)]
        # the KV cache holds this rank's heads only
        res["cache_heads"] = llama.kv_cache().k.size(3)
        everyone = [None] * llama.world_size
        if llama.world_size > 1:
            dist.all_gather_object(everyone, res)
        else:
            everyone = [res]
        res["ranks_agree"] = all(r == everyone[0] for r in everyone)
        results[ckpt] = res
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    finish()


if __name__ == "__main__":
    main(sys.argv)
