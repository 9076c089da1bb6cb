"""What every script in scripts/ shares: fire for the flags, and user errors as one sentence."""

from __future__ import annotations

import os
import sys
from typing import Callable

# Errors a user causes (a wrong path, a bad value, a diverged run): printed as one line, exit 1.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, FloatingPointError)


def run(main: Callable) -> None:
    """`fire.Fire(main)`; tears down the process group torchrun's ranks may have joined."""
    import fire
    import torch.distributed as dist

    code = 0
    try:
        fire.Fire(main)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        # gloo's threads sometimes abort the interpreter's teardown ("terminate called without an
        # active exception", exit -6) after all the work is done; everything is written and flushed
        # by now, so leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
