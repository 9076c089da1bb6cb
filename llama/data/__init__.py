"""Data: documents -> tokenizer and token shards (`prepare`), shards -> batches (`loader`), and
instruction / chat / document examples with loss masks -> length-grouped batches (`instruct`)."""

from llama.data.instruct import InstructData, InstructLoader, load_instruct
from llama.data.loader import PackedLoader, TokenStream, load_mixture, read_meta
from llama.data.prepare import iter_documents, list_files, prepare_data, train_tokenizer

__all__ = ["InstructData", "InstructLoader", "PackedLoader", "TokenStream", "iter_documents", "list_files",
           "load_instruct", "load_mixture", "prepare_data", "read_meta", "train_tokenizer"]
