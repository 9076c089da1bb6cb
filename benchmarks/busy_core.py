"""Decoding while another process keeps one core busy: ours (the fused step with its thread count
measured step by step, `ThreadCount`), ours held on all threads, and transformers (eager and under
torch.compile), on the same weights, first with the cores free, then with a busy loop pinned to the
last core (a process as a browser tab or a build would be). Greedy decoding, batch 1, best of
`repeats` runs of each, rows alternated; the busy process is started after the warm-ups and stopped
at the end.

    python benchmarks/busy_core.py                      # 160M, bf16, 64 new tokens
    python benchmarks/busy_core.py --dtype fp32 --hf_compile False
"""

from __future__ import annotations

import copy
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.env import cpu_model_name, resolve_dtype
from llama.formats.hf import hf_config, to_hf
from llama.inference import Llama
from llama.inference.cpu_decode import FusedCpuDecoder, ThreadCount
from llama.model import ModelArgs, Transformer

_GEN = runpy.run_path(str(Path(__file__).with_name("generate.py")))  # its runners, timing and _NoEos


class _AllThreads(ThreadCount):
    """ThreadCount that never moves: every step on all of torch's threads (the step before ThreadCount)."""

    def observe(self, n: int, seconds: float) -> None:
        pass


def _busy_core() -> subprocess.Popen:
    """A busy loop pinned to the last CPU this process may use."""
    if not hasattr(os, "sched_getaffinity"):
        raise SystemExit("benchmarks/busy_core.py pins its busy loop to a core with os.sched_getaffinity, which "
                         "this OS does not have (Linux only)")
    cpu = max(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def main(model: str = "160M", dtype: str = "bf16", prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3,
         hf_compile: bool = True):
    args = ModelArgs.from_name(model, max_seq_len=prompt_len + new_tokens)
    dt = resolve_dtype(dtype, "cpu")
    torch.manual_seed(0)
    base = Transformer(args).eval().requires_grad_(False)
    ours = Transformer(args).to(dt).eval().requires_grad_(False)
    ours.load_state_dict({k: v.to(dt) for k, v in base.state_dict().items()})
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(args, dt))).to(dt).eval()
    hf.load_state_dict({k: v.to(dt) for k, v in to_hf(base.state_dict(), args).items()})
    prompt = torch.randint(3, args.vocab_size, (1, prompt_len))
    ids = prompt.tolist()

    adaptive = Llama(ours, _GEN["_NoEos"](), args.max_seq_len, 1, decoder="auto")
    if not isinstance(adaptive.decoder, FusedCpuDecoder) or adaptive.decoder._steps() is None:
        raise SystemExit("the fused CPU decoding step did not build here (see the warning above): nothing to compare")
    held = FusedCpuDecoder.create(copy.deepcopy(ours))  # its own copy: packing makes the weights its views
    fixed = Llama(held.model, _GEN["_NoEos"](), args.max_seq_len, 1, decoder=held)
    fixed.decoder._steps()
    fixed.decoder.threads = _AllThreads(torch.get_num_threads())
    runners = {"ours (threads measured)": _GEN["ours_runner"](adaptive, ids, prompt_len),
               "ours, all threads": _GEN["ours_runner"](fixed, ids, prompt_len),
               "transformers": _GEN["_hf_runner"](hf, prompt)}
    if hf_compile:
        runners["transformers (compiled)"] = _GEN["_hf_runner"](hf, prompt, compiled=True, max_len=args.max_seq_len)
    print(f"{cpu_model_name()}, {torch.get_num_threads()} threads; {model} {dtype}, prompt {prompt_len}, "
          f"{new_tokens} new tokens, best of {repeats}", flush=True)
    rows = []
    for condition in ("cores free", "one core busy"):
        busy = _busy_core() if condition == "one core busy" else None
        try:
            time.sleep(0.5)
            results = _GEN["_time_runs"](runners, new_tokens, repeats, [])
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        ref = results["transformers"]
        for name, r in results.items():
            tps = (new_tokens - 1) / r["dec"]
            same = r["tokens"] == results["ours (threads measured)"]["tokens"]
            rows.append((condition, name, r["ttft"] * 1e3, tps, tps / ((new_tokens - 1) / ref["dec"]), same))
            print(f"{condition:>14}  {name:>24}  ttft {r['ttft'] * 1e3:7.1f} ms  decode {tps:6.1f} tok/s  "
                  f"({rows[-1][4]:.2f}x transformers)  tokens {'=' if same else '!='} ours", flush=True)
        if condition == "one core busy":
            print(f"ours ran its steps on {adaptive.decoder.threads.cur} thread(s) at the end", flush=True)
    print("\n| condition | impl | TTFT (ms) | decode tok/s | vs transformers | same tokens as ours |")
    print("|---|---|---|---|---|---|")
    for c, name, ttft, tps, ratio, same in rows:
        print(f"| {c} | {name} | {ttft:.0f} | {tps:.1f} | {ratio:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    fire.Fire(main)
