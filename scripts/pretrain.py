"""Pretrain a LLaMA model with the paper's recipe (llama.train): one process, or torchrun with
world = dp x tp (FSDP2 over dp, tensor parallel over tp).

The config is a training config shipped in llama/configs/train by name (7B, 13B, 33B, 65B, demo, tiny) or a JSON path;
every field can be overridden with --field value, and model fields with --model.field value.
The resolved config is printed, and saved in out_dir/config.json and in every checkpoint.

One process (CPU, or one GPU):
    python scripts/prepare_data.py --inputs 'corpus/*.txt' --tokenizer tokenizer.model --out data/corpus
    python scripts/pretrain.py --config tiny --data data/corpus --tokenizer tokenizer.model --out_dir runs/tiny

One machine, 2 processes (gloo on CPU, nccl on GPUs), data parallel or tensor parallel:
    torchrun --nproc_per_node 2 scripts/pretrain.py --config demo --data data/demo --out_dir runs/demo
    torchrun --nproc_per_node 2 scripts/pretrain.py --config demo --tp 2 ...

Several nodes (here 4 nodes x 8 GPUs = 32 ranks, tp 8 inside a node, dp 4 across nodes); run the
same line on every node, with a shared filesystem for out_dir and the data:
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \
        --rdzv_id llama65b scripts/pretrain.py --config 65B --data data/pretrain --tokenizer tokenizer.model
  (or, with a static master: --nnodes 4 --node_rank N --master_addr HOST0 --master_port 29500;
  under SLURM: srun --nodes 4 --ntasks-per-node 1 torchrun --nnodes 4 --nproc_per_node 8
  --rdzv_backend c10d --rdzv_endpoint $(scontrol show hostnames | head -1):29500 ...)
The mesh is (dp, tp) with tp innermost, so a tensor-parallel group is 8 consecutive ranks, one node.

Resuming: run the same command again; the latest complete checkpoint of out_dir is picked up
(--resume never starts over, --resume DIR picks one). The layout (dp, tp) may change on resume;
global_batch_tokens and seq_len may not. Export to Meta's layout at the end with
--export_dir DIR [--export_shards N], or later with scripts/export.py.
"""

from llama.cli import run
from llama.train import command_line_flags, train_from_command_line


def main(config: str = "tiny", **overrides):
    """config: a name of llama/configs/train or a JSON path; overrides: any TrainConfig field
    (--lr 1e-3, --steps 500, --tp 2, --model.n_layers 4, ...)."""
    train_from_command_line(config, **overrides)


if __name__ == "__main__":
    run(main, command_line_flags())
