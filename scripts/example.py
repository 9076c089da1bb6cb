"""Complete text with a Meta-layout LLaMA checkpoint, on CPU or GPU, with any number of ranks.

    python scripts/example.py --ckpt_dir 7B --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 scripts/example.py --ckpt_dir 13B --tokenizer_path tokenizer.model \
        --prompts '["I believe the meaning of life is"]' --max_gen_len 64
    python scripts/example.py --ckpt_dir 7B --tokenizer_path tokenizer.model --interactive
    python scripts/example.py --ckpt_dir model.gguf --prompts '["What is the capital of France?"]' --chat

    python scripts/example.py --ckpt_dir llama-2-7b-chat --tokenizer_path tokenizer.model --chat \
        --system "Answer in one sentence."

A .gguf file (llama.cpp's format) brings its own tokenizer. --chat with --prompts answers each
prompt as one user message; without prompts it is an interactive chat that keeps the dialog. Chat
uses the model's own template when its file carries one (tokenizer.chat_template), else Llama 2's.

Prompts come from --prompts (a string or a list), --prompt_file (one per line; blank lines skipped)
or built-in defaults. --chat holds a conversation in Llama 2's chat format (the whole dialog is the
prompt of every answer; the oldest turns are dropped when it outgrows max_seq_len). Only rank 0
reads and prints.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from llama.chat import encode_dialog, uses_llama2_format
from llama.cli import run
from llama.env import torchrun_ranks
from llama.inference import Llama, check_sampling
from llama.quantize import quantize as apply_quantization

DEFAULT_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "Building a website can be done in 10 simple steps:\n",
    "def fibonacci(n):\n",
]


def texts(flag: str, value) -> list[str] | None:
    """--prompts / --stop as a list of strings (None when not given). fire reads a flag's value as a
    Python literal first: a number, a dict or a bare True is refused, not run as something else."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ValueError(f"--{flag} must be text or a list of texts, got {value!r}: the command line read it as "
                         f"{type(value).__name__}; quote it twice, e.g. --{flag} '\"3.10\"'")
    return list(items)


def read_prompts(prompts=None, prompt_file: str | None = None) -> list[str]:
    if prompts is not None and prompt_file is not None:
        raise ValueError("give --prompts or --prompt_file, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {path} holds no prompt (one a line; blank lines are skipped)")
        return lines
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    prompts = texts("prompts", prompts)
    if not prompts:
        raise ValueError("--prompts is an empty list")
    return prompts


def main(ckpt_dir: str, *, tokenizer_path: str | None = None, temperature: float = 0.8, top_p: float = 0.95,
         top_k: int | None = None, max_seq_len: int = 512, max_batch_size: int = 32, max_gen_len: int = 64, prompts=None,
         prompt_file: str | None = None, interactive: bool = False, chat: bool = False, system: str | None = None,
         dtype: str | None = None, device: str | None = None, quantize: str | None = None, seed: int = 1, stop=None,
         decoder: str = "auto"):
    """decoder: how each step runs the model, one of auto (the fused CPU step where it applies, else
    eager), eager, compiled (torch.compile, fixed shapes) or fused. chat: answer each of --prompts
    as one user message, or without prompts an interactive chat that keeps the dialog; `system` is
    the system message. The model's own chat template if its file carries one, else Llama 2's."""
    check_sampling(temperature, top_p, top_k)
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"unknown --quantize {quantize!r}; supported: int8 (or leave it out)")
    if quantize == "int8" and torchrun_ranks().world > 1:  # before minutes of loading
        raise ValueError("--quantize int8 runs on one process; launch without torchrun")
    if interactive and chat:
        raise ValueError("give --interactive (text completion) or --chat, not both")
    if interactive and (prompts is not None or prompt_file is not None):
        raise ValueError("--interactive reads its prompts as you type them: leave out --prompts / --prompt_file")
    if system is not None and not chat:
        raise ValueError("--system is the system message of --chat")
    stop = texts("stop", stop)
    chat_interactively = chat and prompts is None and prompt_file is None
    prompt_list = None if interactive or chat_interactively else read_prompts(prompts, prompt_file)
    # the KV cache holds max_batch_size rows: no more than there are prompts (one when typing)
    batch = 1 if prompt_list is None else min(max_batch_size, len(prompt_list))
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=batch,
                        seed=seed, device=device, dtype=dtype, decoder=decoder)
    apply_quantization(llama.model, quantize)
    main_rank = llama.rank == 0
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_gen_len=max_gen_len, stop=stop)

    if interactive:
        _interactive(llama, main_rank, sampling)
        return
    if chat and prompt_list is None:  # an interactive chat that keeps the dialog
        _chat(llama, main_rank, sampling, system)
        return
    if chat:  # each prompt is one user message (after the system message, if any)
        head = [{"role": "system", "content": system}] if system else []
        answers = llama.chat_completion([head + [{"role": "user", "content": p}] for p in prompt_list], **sampling)
        results = [{"generation": a["generation"]["content"]} for a in answers]
    else:
        results = llama.text_completion(prompt_list, **sampling)
    if main_rank:
        for prompt, result in zip(prompt_list, results):
            print(f"> {prompt}")
            print(result["generation"])
            print("\n==================================\n")


def _read_shared(prompt: str, main_rank: bool, world_size: int) -> str:
    """Rank 0 reads a line ("" at EOF) and every rank gets it."""
    line = None
    if main_rank:
        try:
            line = input(prompt)
        except EOFError:
            line = ""
    if world_size > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def fit_dialog(llama, dialog: list[dict], max_gen_len: int) -> tuple[list[dict], int]:
    """The dialog without its oldest (user, assistant) pairs until its prompt leaves `max_gen_len`
    tokens (at least one) of room in max_seq_len; returns it and the number of pairs dropped."""
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    turns, dropped = dialog[len(head):], 0
    room = lambda d: llama.max_seq_len - len(encode_dialog(llama.tokenizer, d))  # noqa: E731
    while len(turns) > 1 and room(head + turns) < min(max_gen_len, llama.max_seq_len // 2):
        turns, dropped = turns[2:], dropped + 1
    return head + turns, dropped


def _chat(llama, main_rank: bool, sampling: dict, system: str | None) -> None:
    """Read a user message, stream the assistant's answer, keep both in the dialog. An empty line or
    EOF (Ctrl-D) ends; /reset starts a new dialog."""
    if main_rank:
        form = "Llama 2's chat format" if uses_llama2_format(llama.tokenizer) else "its own chat template"
        print(f"Chat with the model ({form}). Type a message and press Enter; /reset starts over; "
              "an empty line or Ctrl-D leaves.")
    dialog = [{"role": "system", "content": system}] if system else []
    while True:
        message = _read_shared("user> ", main_rank, llama.world_size)
        if not message.strip():
            if main_rank:
                print()
            return
        if message.strip() == "/reset":
            dialog = dialog[:1] if system else []
            if main_rank:
                print("(new dialog)")
            continue
        dialog, dropped = fit_dialog(llama, dialog + [{"role": "user", "content": message}],
                                     sampling["max_gen_len"] or llama.max_seq_len)
        if dropped and main_rank:
            print(f"(the dialog outgrew max_seq_len {llama.max_seq_len}: its oldest {dropped} exchange(s) are "
                  f"forgotten)")
        if main_rank:
            print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in llama.chat_stream(dialog, **sampling):
                pieces.append(piece)
                if main_rank:
                    print(piece, end="", flush=True)
        except ValueError as e:  # special tags in a message, or a message longer than the context
            dialog = dialog[:-1]
            if main_rank:
                print(f"({e})")
            continue
        if main_rank:
            print()
        dialog.append({"role": "assistant", "content": "".join(pieces)})


def _interactive(llama, main_rank: bool, sampling: dict) -> None:
    """Read a prompt, stream its completion; an empty line or EOF ends. Rank 0 reads and shares the
    prompt so every rank runs the same generation."""
    if main_rank:
        print("type a prompt and press Enter; an empty line or Ctrl-D quits", flush=True)
    while True:
        prompt = _read_shared("prompt> ", main_rank, llama.world_size)
        if not prompt:
            if main_rank:
                print()
            return
        try:
            for piece in llama.stream(prompt, **sampling):
                if main_rank:
                    print(piece, end="", flush=True)
        except ValueError as e:  # a prompt longer than the context: say so and ask again
            if main_rank:
                print(f"({e})")
            continue
        if main_rank:
            print()


if __name__ == "__main__":
    run(main)
