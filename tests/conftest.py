"""Fixtures shared by the tests, and `torchrun`, the one way every multi-rank test starts its ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.data import train_tokenizer
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
GLOO_ABORT = "terminate called without an active exception"


def torchrun(target: str, nproc: int, *args: str, timeout: float = 300, check: bool = True,
             retry_gloo_abort: bool = True) -> subprocess.CompletedProcess:
    """Run `target` on `nproc` CPU ranks (gloo) with `python -m torch.distributed.run --standalone`:
    a module of tests.workers ("tests.workers.train") or a script path. One thread per rank. With
    `check`, a non-zero exit fails the test with the ranks' output. A rank killed by a rare abort in
    gloo's teardown (GLOO_ABORT, seen about once in ten loaded runs, after the work) gets one retry;
    the results are checked all the same."""
    target_args = ["-m", target] if not target.endswith(".py") else [target]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *target_args, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2 if retry_gloo_abort else 1):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or GLOO_ABORT not in proc.stderr:
            break
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer (the "tiny" preset's vocab) trained once on generated English + Python."""
    import random

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
