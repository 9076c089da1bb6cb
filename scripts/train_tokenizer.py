"""Train a SentencePiece BPE tokenizer with the LLaMA recipe (digits split, byte fallback, Meta's ids).

    python scripts/train_tokenizer.py --inputs 'data/*.txt' --out tokenizer.model --vocab_size 32000
"""

import time

from llama.cli import run
from llama.data import list_files, train_tokenizer
from llama.tokenizer import Tokenizer


def main(inputs: str, out: str = "tokenizer.model", vocab_size: int = 32000,
         input_sentence_size: int = 2_000_000, seed: int = 0, verbose: bool = False, skip_binary: bool = False):
    """inputs: a file, directory or glob (or a comma-separated list of them); a binary file is an
    error unless --skip_binary (then it is skipped and counted)."""
    if isinstance(inputs, str):
        inputs = [s for s in inputs.split(",") if s]
    inputs = list(inputs)
    files = list_files(inputs)  # every input must name a file, directory or matching glob
    print(f"training a {vocab_size}-piece BPE tokenizer on {len(files)} file(s) from {inputs} "
          f"(at most {input_sentence_size:,} lines, seed {seed}) ...", flush=True)
    t0 = time.time()
    path = train_tokenizer(files, out, vocab_size, input_sentence_size=input_sentence_size,
                           seed=seed, verbose=verbose, skip_binary=skip_binary)
    tok = Tokenizer(path)
    print(f"wrote {path} ({tok.n_words} pieces, sha256 {tok.sha256[:12]}) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run(main)
