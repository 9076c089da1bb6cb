"""What every script in scripts/ shares: fire for the flags, and user errors as one sentence."""

from __future__ import annotations

import sys
from typing import Callable

# Errors a user causes (a wrong path, a bad value, a diverged run): printed as one line, exit 1.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, FloatingPointError)


def run(main: Callable) -> None:
    """`fire.Fire(main)`; tears down the process group torchrun's ranks may have joined."""
    import fire
    import torch.distributed as dist

    try:
        fire.Fire(main)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
