"""Multi-rank test workers, each run under torchrun by `tests.conftest.torchrun` as a module."""

import os
import sys

import torch.distributed as dist


def finish() -> None:
    """End a worker: barrier, tear the process group down, and leave without the interpreter's
    teardown, where gloo's threads rarely abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
