"""llama: a compact, faithful and fast PyTorch library for the LLaMA family of language models.

    from llama import Llama, ModelArgs, Transformer, Tokenizer, train_tokenizer, TrainConfig, Trainer
    from llama.train import train
"""

from llama.checkpoint import load_model, reshard, save_meta_checkpoint
from llama.generation import Llama
from llama.model import KVCache, ModelArgs, Transformer
from llama.tokenizer import Tokenizer, train_tokenizer
from llama.train import Trainer, TrainConfig  # train(): llama.train.train (the name is the module's)

__all__ = ["KVCache", "Llama", "ModelArgs", "Tokenizer", "TrainConfig", "Trainer", "Transformer", "load_model",
           "reshard", "save_meta_checkpoint", "train_tokenizer"]
__version__ = "0.1.0"
