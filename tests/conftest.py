import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer (the "tiny" preset's vocab) trained once on generated English + Python."""
    import random

    from llama.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(0)
    words = ("the of and to in is that for it as was with be by on not he this are or his from at "
             "which but have an they you were her she there one all we their can has been if more "
             "when will would who so no model token data train loss value return").split()
    names = ["x", "y", "total", "items", "value", "result", "i", "n", "self", "data"]
    docs = []
    for _ in range(400):
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))).capitalize()
                    + f". In {rng.randint(1900, 2024)} it cost {rng.random() * 100:.2f} dollars.")
        a, b = rng.sample(names, 2)
        docs.append(f"def f_{rng.randint(0, 99)}({a}, {b}):\n    if {a} > {rng.randint(0, 9)}:\n"
                    f"        return {a} + {b} * {rng.randint(0, 999)}\n    return [{b} for {a} in "
                    f"range({rng.randint(1, 50)})]\n")
    path = train_tokenizer(docs, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", 512)
    return Tokenizer(path)
