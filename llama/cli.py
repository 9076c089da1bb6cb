"""What every script in scripts/ shares: fire for the flags (checked before any work), and user
errors as one sentence."""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import warnings
from typing import Callable, Iterable

from llama.env import DiskFullError

# Errors a user causes (a wrong path, a bad value, a diverged run, a full disk): printed as one
# line, exit 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, FloatingPointError, DiskFullError)
# fire's own flags (help), always accepted
FIRE_FLAGS = ("help", "h")


def unknown_flag(main: Callable, argv: list[str], extra: Iterable[str] = ()) -> str | None:
    """The sentence for the first `--flag` of `argv` that `main` does not take (None when all are
    known), with the nearest valid flag. Valid: main's parameters (fire's --name, --name=value,
    --no-name / --noname for booleans, hyphens or underscores) plus `extra` (the keys a **kwargs
    main accepts). Arguments after a bare `--` are fire's own and not checked."""
    params = inspect.signature(main).parameters.values()
    valid = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)] + list(extra)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params) and not extra
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) == 2:
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in valid or name in FIRE_FLAGS or takes_any:
            continue
        if name.startswith("no") and name[2:].lstrip("_") in valid:  # fire's --noflag for a boolean
            continue
        near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean --{near[0]}?" if near else f"valid flags: {', '.join('--' + v for v in valid)}"
        return f"unknown flag --{name}: {hint} (nothing was done)"
    return None


def stray_argument(main: Callable, argv: list[str]) -> str | None:
    """The sentence for a bare argument that no positional parameter of `main` takes (fire would bind
    it to the next free parameter, or run main and complain afterwards), else None. As fire reads
    them: `--flag value` takes the next word unless it starts with "--"; `--flag=value` takes none. A
    single-dash word (`-t`) is counted as bare: fire would not read it as a flag of main either."""
    params = inspect.signature(main).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given, bare, i, last_flag = set(), [], 0, "--flag"  # bare: (word, the flag before it)
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            given.add(name)
            last_flag = "--" + name
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1  # its value
        elif arg not in ("-h",):
            bare.append((arg, last_flag))
        i += 1
    free = [p for p in positional if p not in given]
    if len(bare) > len(free):
        extra, flag = bare[len(free)]
        return (f"unexpected argument {extra!r}: each flag takes one value (quote a value with spaces, e.g. "
                f"{flag} \"two words\") (nothing was done)")
    return None


def usage(main: Callable, flags: Iterable[str] = ()) -> str:
    """--help: the script's docstring, then its flags with their defaults (and `flags`, the keys a
    **kwargs main takes), then main's own docstring."""
    params = [p for p in inspect.signature(main).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    lines = [(sys.modules["__main__"].__doc__ or "").strip(), "", "flags:"]
    lines += [f"  --{p.name}" + ("" if p.default is p.empty else f" (default {p.default!r})") for p in params]
    flags = list(flags)
    if flags:
        lines.append("  and any of: " + " ".join(f"--{f}" for f in flags))
    if main.__doc__:
        lines += ["", inspect.cleandoc(main.__doc__)]
    return "\n".join(lines).strip()


def run(main: Callable, flags: Iterable[str] = ()) -> None:
    """`fire.Fire(main)` after checking the command line's flags against main's parameters (and
    `flags`, the keys a **kwargs main takes): a mistyped flag stops the script before any work with
    the nearest valid one, exit 2. Tears down the process group torchrun's ranks may have joined."""
    import fire
    import torch.distributed as dist

    # a warning for the user is one line, not the library's file and source line
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"
    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv[:argv.index("--") if "--" in argv else None]):
        print(usage(main, flags))
        sys.exit(0)
    problem = unknown_flag(main, argv, flags) or stray_argument(main, argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
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
