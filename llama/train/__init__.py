"""Pretraining and fine-tuning with the paper's recipe: config, recipe, checkpoints, metrics, loop."""

from llama.train.checkpoint import CheckpointManager, export_checkpoint, read_checkpoint_meta
from llama.train.config import TrainConfig
from llama.train.recipe import clip_grad_norm, flops_per_token, lr_at, measure_peak_flops, param_groups
from llama.train.trainer import Trainer, command_line_flags, train, train_from_command_line

__all__ = ["CheckpointManager", "TrainConfig", "Trainer", "clip_grad_norm", "export_checkpoint", "flops_per_token",
           "lr_at", "measure_peak_flops", "param_groups", "read_checkpoint_meta", "train", "command_line_flags",
           "train_from_command_line"]
