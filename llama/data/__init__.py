"""Data: documents -> tokenizer and token shards (`prepare`), and shards -> batches (`loader`)."""

from llama.data.loader import PackedLoader, TokenStream, load_mixture, read_meta
from llama.data.prepare import iter_documents, list_files, prepare_data, train_tokenizer

__all__ = ["PackedLoader", "TokenStream", "iter_documents", "list_files", "load_mixture", "prepare_data",
           "read_meta", "train_tokenizer"]
