"""Fine-tuning step speed and memory: LoRA and full fine-tuning, ours vs transformers (+ peft).

    python benchmarks/finetune.py                     # 60M preset, batch 4 x 512, bf16
    python benchmarks/finetune.py --dtype fp32 --hf_compile=True
    python benchmarks/finetune.py --device cuda --model 1B --batch_size 4 --seq_len 1024   # one GPU

Rows (same random weights, batch and dtype policy; AdamW, clip 1.0, loss in fp32):
- LoRA, r 8, alpha 16, dropout 0.05 on wq, wv (q_proj, v_proj): ours = `llama.lora.apply_lora` on our
  Transformer, peft = `peft.get_peft_model` on transformers' LlamaForCausalLM. With --dtype bf16 the
  frozen base is held in bf16 and the adapters in fp32 (peft's default), no autocast.
- full fine-tuning: every parameter trains; fp32 weights under bf16 autocast with --dtype bf16.
Ours runs the library's fast path (each block compiled, compiled loss, fused AdamW); transformers
runs eager (its default), or compiled with --hf_compile.

Speed: all rows live in this one process and are stepped in turns, each keeping its best of
`repeats` steps, so load from other processes on the shared cores hits every row alike.
Memory: each row also runs alone in a fresh subprocess (build, warm-up, then `memory_steps` steps);
its peak resident set size (VmHWM from /proc/self/status, reset after the warm-up through
/proc/self/clear_refs so compilation does not count) is the whole process's: weights, gradients,
optimizer state, activations and the Python/torch runtime. RSS after building the model, before any
step, is shown for reference. (tracemalloc cannot see torch's allocations; RSS can.) On CUDA the
memory is torch's peak allocation (max_memory_allocated) over each row's steps, measured with that
row alone on the GPU after the speed rows are freed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

from llama.formats.hf import hf_config, to_hf
from llama.lora import apply_lora
from llama.model import ModelArgs, Transformer
from llama.parallel import compile_blocks
from llama.train.recipe import adamw_kwargs, compiled_cross_entropy

ROWS = ("ours LoRA", "peft LoRA", "ours full", "transformers full")
LORA = dict(r=8, alpha=16, dropout=0.05)


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def base_model(model: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_name(model))


def to_transformers(ours: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ours.args
    cfg = LlamaConfig(**{k: v for k, v in hf_config(args, torch.float32).items() if k != "architectures"})
    hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(to_hf(ours.state_dict(), args), strict=True)
    return hf


def build_row(name: str, model: str, dtype: str, hf_compile: bool, device: torch.device = torch.device("cpu")):
    """A step function for one row: forward, fp32 loss, backward, clip, AdamW, zero_grad -> loss."""
    bf16 = dtype == "bf16"
    ours = base_model(model).to(device)
    amp = torch.bfloat16 if bf16 and name.endswith("full") else None  # full: fp32 master, bf16 compute
    if name == "ours LoRA":
        net = apply_lora(ours.to(torch.bfloat16) if bf16 else ours, targets=("wq", "wv"), **LORA)
        compile_blocks(net)
        forward, loss_fn = net, compiled_cross_entropy
    elif name == "ours full":
        net = compile_blocks(ours)
        forward, loss_fn = net, compiled_cross_entropy
    else:
        hf = to_transformers(ours.cpu()).to(device)
        del ours
        if name == "peft LoRA":
            import peft

            cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            # adapters stay fp32 on a bf16 base (autocast_adapter_dtype, peft's default)
            net = peft.get_peft_model(hf.to(torch.bfloat16) if bf16 else hf, cfg)
        else:
            net = hf
        compiled = torch.compile(net) if hf_compile else net
        forward = lambda x: compiled(input_ids=x).logits  # noqa: E731
        loss_fn = compiled_cross_entropy if hf_compile else cross_entropy
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    # fused AdamW needs one dtype per call; every row's trainable parameters are fp32 here
    opt = torch.optim.AdamW(params, lr=1e-4, **adamw_kwargs(device))

    def step(inputs, targets):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = forward(inputs)  # (B, T, vocab)
        loss = loss_fn(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    n_trainable = sum(p.numel() for p in params)
    return step, n_trainable


def batch(model: str, batch_size: int, seq_len: int):
    vocab = ModelArgs.from_name(model).vocab_size
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_row(name: str, model: str, batch_size: int, seq_len: int, dtype: str, hf_compile: bool,
               warmup: int, memory_steps: int, out: str):
    """Child process: one row alone; writes its RSS figures (MiB) to `out`."""
    inputs, targets = batch(model, batch_size, seq_len)
    step, _ = build_row(name, model, dtype, hf_compile)
    built = _status_kb("VmRSS")
    for _ in range(warmup):
        step(inputs, targets)
    try:  # reset the high-water mark: compilation and warm-up do not count
        Path("/proc/self/clear_refs").write_text("5")
        how = "VmHWM reset after warm-up"
    except OSError:
        how = "ru_maxrss (peak since start, compilation included)"
    for _ in range(memory_steps):
        step(inputs, targets)
    peak = _status_kb("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps({"built_mib": built / 1024, "peak_mib": peak / 1024, "how": how}))


def main(model: str = "60M", batch_size: int = 4, seq_len: int = 512, dtype: str = "bf16",
         hf_compile: bool = False, repeats: int = 6, warmup: int = 2, memory_steps: int = 3,
         threads: int = 0, memory: bool = True, json_out: str = "", device: str = "cpu", _memory_row: str = "",
         _out: str = ""):
    """Time a LoRA and a full fine-tuning step, ours and transformers (+ peft); print a table."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    if _memory_row:
        return memory_row(_memory_row, model, batch_size, seq_len, dtype, hf_compile, warmup, memory_steps, _out)
    from tqdm import tqdm

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    inputs, targets = (t.to(dev) for t in batch(model, batch_size, seq_len))
    tokens = inputs.numel()
    rows, trainable = {}, {}
    for name in tqdm(ROWS, desc="building", leave=False):
        rows[name], trainable[name] = build_row(name, model, dtype, hf_compile, dev)
    first = {}
    for name, step in tqdm(rows.items(), desc="warm-up", leave=False):
        first[name] = step(inputs, targets)
        for _ in range(warmup - 1):
            step(inputs, targets)
    if max(first.values()) - min(first.values()) > 0.05:  # same weights and batch: same first loss
        raise RuntimeError(f"the rows disagree on the first loss {first}: they do not compute the same model")
    best = {name: float("inf") for name in rows}
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        for name, step in rows.items():
            sync()
            t0 = time.perf_counter()
            step(inputs, targets)  # .item() of the loss waits for the step
            best[name] = min(best[name], time.perf_counter() - t0)
    del rows
    print("speed (best step of each row): " + ", ".join(f"{n} {tokens / t:.0f} tokens/s" for n, t in best.items()),
          flush=True)

    mem = {}
    if memory and dev.type == "cuda":  # one row at a time on the GPU, torch's peak allocation
        for name in tqdm(ROWS, desc="memory (one row at a time)", leave=False):
            torch.cuda.empty_cache()
            step, _ = build_row(name, model, dtype, hf_compile, dev)
            for _ in range(warmup):
                step(inputs, targets)
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(memory_steps):
                step(inputs, targets)
            mem[name] = {"peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20,
                         "built_mib": float("nan"), "how": "CUDA max_memory_allocated over the steps after warm-up"}
            del step
    elif memory:
        for name in tqdm(ROWS, desc="memory (one subprocess per row)", leave=False):
            out = Path(f"/tmp/finetune_mem_{os.getpid()}.json")
            cmd = [sys.executable, __file__, f"--_memory_row={name}", f"--_out={out}", f"--model={model}",
                   f"--batch_size={batch_size}", f"--seq_len={seq_len}", f"--dtype={dtype}",
                   f"--hf_compile={hf_compile}", f"--warmup={warmup}", f"--memory_steps={memory_steps}",
                   f"--threads={threads}"]
            subprocess.run(cmd, check=True)
            mem[name] = json.loads(out.read_text())
            out.unlink()

    n_params = ModelArgs.from_name(model)
    policy = ("LoRA: bf16 frozen base + fp32 adapters; full: fp32 weights, bf16 autocast" if dtype == "bf16"
              else "everything fp32")
    print(f"\n{model} (dim {n_params.dim}, {n_params.n_layers} layers, vocab {n_params.vocab_size}), batch "
          f"{batch_size} x {seq_len} = {tokens} tokens, {policy}, {torch.get_num_threads()} threads; "
          f"ours compiled per block, transformers {'compiled' if hf_compile else 'eager'}")
    print("first losses: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    if mem:
        print(f"memory: {next(iter(mem.values()))['how']}")
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    print("| row | trainable params | step s | tokens/s | ours / theirs | peak memory MiB | RSS after build MiB |")
    print("|---|---|---|---|---|---|---|")
    result = {"model": model, "batch": [batch_size, seq_len], "dtype": dtype, "hf_compile": hf_compile,
              "first_loss": first, "rows": {}}
    pairs = {"ours LoRA": "peft LoRA", "ours full": "transformers full"}
    for name, t in best.items():
        tps = tokens / t
        ratio = f"{tps / (tokens / best[pairs[name]]):.2f}x" if name in pairs else ""
        m = mem.get(name, {})
        result["rows"][name] = {"step_s": t, "tokens_per_s": tps, "trainable": trainable[name], **m}
        print(f"| {name} | {trainable[name]:,} | {t:.2f} | {tps:.0f} | {ratio} | "
              f"{m.get('peak_mib', float('nan')):.0f} | {m.get('built_mib', float('nan')):.0f} |")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
