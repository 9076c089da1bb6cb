"""Process groups and the tensor-parallel plan, applied to a plain `Transformer`.

Tensor parallelism is Megatron's layout expressed with DTensor: q/k/v and w1/w3 are split by
output features (each rank holds whole heads / a slice of the hidden width), wo and w2 by input
features with an all-reduce after them; the embedding is split by vocabulary rows and the output
projection by vocabulary, gathered back to full logits. Norm weights stay replicated.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str | None = None, timeout_s: int = 1800) -> tuple[int, int]:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise).

    Returns (rank, world_size); (0, 1) with no process group when not launched by torchrun.
    """
    if not launched_with_torchrun():
        return 0, 1
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def check_tp_degree(args, tp: int) -> None:
    """Raise a clear error if a model with `args` cannot be split over `tp` ranks."""
    problems = []
    if args.n_heads % tp:
        problems.append(f"n_heads={args.n_heads}")
    if args.n_kv_heads % tp:
        problems.append(f"n_kv_heads={args.n_kv_heads}")
    if args.ffn_hidden_dim % tp:
        problems.append(f"ffn hidden={args.ffn_hidden_dim}")
    if args.vocab_size % tp:
        problems.append(f"vocab_size={args.vocab_size}")
    if problems:
        raise ValueError(f"tensor parallel degree {tp} does not divide {', '.join(problems)}; "
                         f"use a degree that divides the heads (e.g. one of {divisors(args.n_kv_heads)})")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_plan(model: nn.Module, output_replicated: bool = True) -> dict:
    """The DTensor plan for `parallelize_module`. With `output_replicated=False` the logits stay
    sharded along the vocabulary (for a loss-parallel cross-entropy)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate() if output_replicated else Shard(-1),
                                  use_local_output=output_replicated),
    }
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        plan.update({
            p + "attention.wq": ColwiseParallel(),
            p + "attention.wk": ColwiseParallel(),
            p + "attention.wv": ColwiseParallel(),
            p + "attention.wo": RowwiseParallel(),
            p + "feed_forward.w1": ColwiseParallel(),
            p + "feed_forward.w3": ColwiseParallel(),
            p + "feed_forward.w2": RowwiseParallel(),
        })
    return plan


def apply_tp(model: nn.Module, tp_mesh, output_replicated: bool = True) -> nn.Module:
    """Shard `model` in place over the 1-D device mesh `tp_mesh` (parameters become DTensors)."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_tp_degree(model.args, tp_mesh.size())
    return parallelize_module(model, tp_mesh, tp_plan(model, output_replicated))


# Which dimension of each weight the plan shards (0: output features / vocab rows, 1: input features).
def tp_shard_dim(key: str) -> int | None:
    if key.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                     "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight",
                     "tok_embeddings.weight")):
        return 0
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return None


def build_mesh(dp: int, tp: int, device_type: str | None = None):
    """A 2-D (dp, tp) device mesh over the default process group, tp innermost (the ranks of one
    tensor-parallel group are neighbours, so they share a node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dp * tp != world:
        raise ValueError(f"dp {dp} x tp {tp} = {dp * tp} does not equal the world size {world}")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def apply_fsdp(model: nn.Module, dp_mesh, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard every block of `model.layers`, then the root (embeddings, norm, output), over the
    1-D mesh `dp_mesh`. `mp_policy` is a `MixedPrecisionPolicy` (e.g. bf16 params, fp32 reduce)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again at the start of backward: keep them gathered
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model
