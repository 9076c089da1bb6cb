"""The C++ CPU kernels (cpu_kernels.cpp, package data): one source built on first use, by torch's
extension loader, as one extension per instruction set (`VARIANTS`): AVX512-BF16 (native bf16 dot
products; with VBMI, int8 weights widened to bf16 by byte look-ups), AVX-512 without them (bf16
widened to fp32 in registers; e.g. Skylake and Cascade Lake Xeons), AVX2 + FMA and NEON. It holds
the fused decoding step (llama/inference/cpu_decode.py), the training loss's pass over the logits
(llama.train.recipe.linear_cross_entropy), the causal
attention of the `blocked` backend (llama/blocked_attention.py; bf16 and fp32, AVX-512 builds
only), generation's prefill (the whole forward of a prompt chunk) and the benchmarks' bandwidth
probe. The fastest build this CPU runs is used; the environment variable
LLAMA_CPU_KERNEL=avx512bf16_vbmi|avx512bf16|avx512|avx2|neon forces one (e.g. to measure AVX2 on an
AVX-512 machine).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Optional

from llama.env import cpu_model_name

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV_VAR = "LLAMA_CPU_KERNEL"
# variant -> (/proc/cpuinfo flags it needs, compiler flags), fastest first; each builds as the
# extension "llama_cpu_kernels_<variant>_<hash of the source>" with -DLLAMA_ISA_<VARIANT> choosing its
# vector code (the hash: a build of another version of the source is never loaded in its place)
VARIANTS = {
    # AVX512-BF16 with VBMI (e.g. AMD Zen 4/5, Intel Sapphire Rapids): int8 weights widened by byte look-ups
    "avx512bf16_vbmi": (("avx512f", "avx512bw", "avx512_bf16", "avx512vbmi"),
                        ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vbmi"]),
    # AVX512-BF16 without VBMI (e.g. Cooper Lake Xeons)
    "avx512bf16": (("avx512f", "avx512bw", "avx512_bf16"), ["-mavx512f", "-mavx512bw", "-mavx512bf16"]),
    "avx512": (("avx512f", "avx512bw"), ["-mavx512f", "-mavx512bw"]),  # e.g. Skylake/Cascade Lake Xeons
    "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"]),
    "neon": ((), []),  # aarch64: NEON is part of the base instruction set
}


def cpu_kernel_variants() -> list[str]:
    """The kernel variants this CPU can run, fastest first (x86 from /proc/cpuinfo's flags; every
    aarch64 CPU runs NEON)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["neon"]
    if machine not in ("x86_64", "amd64"):
        return []
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return []
    x86 = ("avx512bf16_vbmi", "avx512bf16", "avx512", "avx2")
    return [v for v in x86 if all(f in flags for f in VARIANTS[v][0])]


_modules: dict = {}  # variant -> built module, or False where its build failed


WITHOUT = "decoding runs eagerly, the training loss and attention in torch ops"  # what happens where no variant builds


def _build(variant: str, then: str = WITHOUT):
    if variant not in _modules:
        _modules[variant] = False
        name = f"llama_cpu_kernels_{variant}_{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            built = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
            if not built.is_file():  # say why the first generation waits (torch's build cache is per version)
                print(f"building the C++ CPU kernels (decoding, prefill, training loss, attention; {variant}; first use only, "
                      "~50 s on 2 cores)...", file=sys.stderr, flush=True)
            flags = ["-O3", "-fopenmp", f"-DLLAMA_ISA_{variant.upper()}", *VARIANTS[variant][1]]
            _modules[variant] = load(name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, old toolchain...: the next variant, or the eager model decodes
            warnings.warn(f"C++ CPU kernels ({variant}) unavailable, {then} ({type(e).__name__}: {e})")
    return _modules[variant] or None


def cpu_kernels(variant: Optional[str] = None):
    """The compiled C++ extension (built on first use, cached by torch in ~/.cache/torch_extensions)
    for `variant` (a name in VARIANTS), by default the one $LLAMA_CPU_KERNEL names, else the fastest
    this CPU runs that builds; None where none does (each failed build warns)."""
    source = "variant"
    if variant is None and os.environ.get(ENV_VAR):
        variant, source = os.environ[ENV_VAR], ENV_VAR
    runnable = cpu_kernel_variants()
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"{source}={variant!r} is not a fused CPU decoding kernel; choose one of {list(VARIANTS)}")
        if variant not in runnable:
            raise ValueError(f"{source}={variant!r}: this CPU ({cpu_model_name()}, {platform.machine()}) cannot run that "
                             f"kernel; it runs {runnable or 'none of them (decoder=eager)'}")
        return _build(variant)
    for i, v in enumerate(runnable):
        module = _build(v, f"trying the {runnable[i + 1]} kernel" if i + 1 < len(runnable) else WITHOUT)
        if module is not None:
            return module
    return None
