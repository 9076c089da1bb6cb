"""Complete text with a Meta-layout LLaMA checkpoint, on CPU or GPU, with any number of ranks.

    python scripts/example.py --ckpt_dir 7B --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 scripts/example.py --ckpt_dir 13B --tokenizer_path tokenizer.model \
        --prompts '["I believe the meaning of life is"]' --max_gen_len 64
    python scripts/example.py --ckpt_dir 7B --tokenizer_path tokenizer.model --interactive
    python scripts/example.py --ckpt_dir model.gguf --prompts '["What is the capital of France?"]' --chat

A .gguf file (llama.cpp's format) brings its own tokenizer; --chat renders each prompt as one user
message with the file's chat template (tokenizer.chat_template) and prints the assistant's reply.

Prompts come from --prompts (a string or a list), --prompt_file (one per line; blank lines skipped)
or built-in defaults. Only rank 0 prints.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from llama.cli import run
from llama.formats.gguf import encode_chat
from llama.inference import Llama, check_sampling
from llama.quantize import quantize as apply_quantization

DEFAULT_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "Building a website can be done in 10 simple steps:\n",
    "def fibonacci(n):\n",
]


def read_prompts(prompts=None, prompt_file: str | None = None) -> list[str]:
    if prompts is not None and prompt_file is not None:
        raise ValueError("give --prompts or --prompt_file, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        return [line for line in path.read_text().splitlines() if line.strip()]
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]


def main(ckpt_dir: str, tokenizer_path: str | None = None, temperature: float = 0.8, top_p: float = 0.95,
         top_k: int | None = None, max_seq_len: int = 512, max_batch_size: int = 32, max_gen_len: int = 64, prompts=None,
         prompt_file: str | None = None, interactive: bool = False, dtype: str | None = None,
         device: str | None = None, quantize: str | None = None, seed: int = 1, stop=None, decoder: str = "auto",
         chat: bool = False):
    """decoder: how each step runs the model, one of auto (the fused CPU step where it applies, else
    eager), eager, compiled (torch.compile, fixed shapes) or fused."""
    check_sampling(temperature, top_p, top_k)
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"unknown --quantize {quantize!r}; supported: int8 (or leave it out)")
    prompt_list = None if interactive else read_prompts(prompts, prompt_file)
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        seed=seed, device=device, dtype=dtype, decoder=decoder)
    if quantize == "int8" and llama.world_size > 1:
        raise ValueError("--quantize int8 runs on one process; launch without torchrun")
    apply_quantization(llama.model, quantize)
    main_rank = llama.rank == 0
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_gen_len=max_gen_len, stop=stop)

    if interactive:
        _interactive(llama, main_rank, sampling)
        return
    if chat:  # one user message per prompt, rendered with the file's chat template
        dialogs = [encode_chat(llama.tokenizer, [{"role": "user", "content": p}]) for p in prompt_list]
        out, _ = llama.generate(dialogs, max_gen_len, temperature, top_p, top_k)
        results = [{"generation": llama.tokenizer.decode(t)} for t in out]
    else:
        results = llama.text_completion(prompt_list, **sampling)
    if main_rank:
        for prompt, result in zip(prompt_list, results):
            print(f"> {prompt}")
            print(result["generation"])
            print("\n==================================\n")


def _interactive(llama, main_rank: bool, sampling: dict) -> None:
    """Read a prompt, stream its completion; an empty line or EOF ends. Rank 0 reads and shares the
    prompt so every rank runs the same generation."""
    if main_rank:
        print("type a prompt and press Enter; an empty line or Ctrl-D quits", flush=True)
    while True:
        prompt = None
        if main_rank:
            try:
                prompt = input("prompt> ")
            except EOFError:
                prompt = ""
        if llama.world_size > 1:
            box = [prompt]
            dist.broadcast_object_list(box, src=0)
            prompt = box[0]
        if not prompt:
            if main_rank:
                print()
            return
        for piece in llama.stream(prompt, **sampling):
            if main_rank:
                print(piece, end="", flush=True)
        if main_rank:
            print()


if __name__ == "__main__":
    run(main)
