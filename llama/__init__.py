"""llama: a compact, faithful and fast PyTorch library for the LLaMA family of language models.

    from llama import Llama, ModelArgs, Transformer, Tokenizer, train_tokenizer, TrainConfig, Trainer
    from llama.train import train   # (not re-exported here: it would hide the llama.train package)
"""

from llama.data import prepare_data, train_tokenizer
from llama.formats.meta import load_model, reshard, save_meta_checkpoint
from llama.inference import Llama
from llama.model import KVCache, ModelArgs, Transformer
from llama.tokenizer import Tokenizer
from llama.train import Trainer, TrainConfig

__all__ = ["KVCache", "Llama", "ModelArgs", "Tokenizer", "TrainConfig", "Trainer", "Transformer", "load_model",
           "prepare_data", "reshard", "save_meta_checkpoint", "train_tokenizer"]
__version__ = "0.1.0"
