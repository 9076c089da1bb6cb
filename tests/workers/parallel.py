"""2-rank worker of tests/test_parallel.py, run by `conftest.torchrun`: TP=2 + selective and FSDP2
dp=2 + full activation checkpointing give the 1-rank plain gradients."""

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llama.env import init_distributed
from llama.parallel import apply_ac, apply_tp
from tests.test_parallel import _grads, _loss, _model_and_batch
from tests.workers import finish


def main():
    rank, world, _ = init_distributed("cpu").__dict__.values()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    base, inputs, targets = _model_and_batch(batch=4)
    ref = copy.deepcopy(base)
    _loss(ref, inputs, targets).backward()
    want = _grads(ref)

    def check(model, what):
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")

    for mode in ("selective", "full"):
        # tensor parallel, then activation checkpointing (torchtitan's order); whole batch on both ranks
        tp = apply_ac(apply_tp(copy.deepcopy(base), mesh), mode)
        _loss(tp, inputs, targets).backward()
        check(tp, f"tp + {mode}")
        # FSDP2 over data parallel: each rank gets half the batch, gradients are averaged
        dp = apply_ac(copy.deepcopy(base), mode)
        for block in dp.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(dp, mesh=mesh)
        half = inputs.size(0) // world
        rows = slice(rank * half, (rank + 1) * half)
        _loss(dp, inputs[rows], targets[rows]).backward()
        check(dp, f"fsdp + {mode}")
    print("WORKER OK", flush=True)
    finish()


if __name__ == "__main__":
    main()
