"""Chat formats: Llama 2's, as Meta's reference renders a dialog, and the Jinja chat templates that
model files carry (a GGUF's tokenizer.chat_template); `encode_dialog` picks the model's own.

A dialog is a list of {"role", "content"} messages: an optional "system" message first, then "user"
and "assistant" alternating, starting with "user". The system text is folded into the first user
message as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}". Each completed (user, assistant) pair is one
sequence "[INST] {user} [/INST] {assistant} " encoded with bos and eos (contents stripped); a final
user message, the prompt for the next answer, is "[INST] {user} [/INST]" with bos and no eos.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.bpe_tokenizer import CONTROL, BPETokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


# Llama 2's format as a chat template (Jinja, one line: no renderer's whitespace rules apply), for
# files that carry one (chat_template.jinja beside tokenizer.model, a GGUF's tokenizer.chat_template):
# under `encode_chat` it gives `format_dialog`'s ids.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('after an optional system message, roles must alternate user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


def check_dialog(dialog, last: str = "user") -> None:
    """Raise ValueError unless `dialog` is a list of {"role", "content": str} messages with an
    optional system message first, then user/assistant alternating from user, ending with `last`
    ("user" for a prompt, "assistant" for a training example)."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"a dialog must be a non-empty list of messages, got {dialog!r}"[:300])
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
            raise ValueError(f"message {i} must be an object with a role in {list(ROLES)} and a string "
                             f"content, got {msg!r}"[:300])
    start = 1 if dialog[0]["role"] == "system" else 0
    if start == len(dialog):
        raise ValueError("the dialog has a system message but no user message")
    for i in range(start, len(dialog)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if dialog[i]["role"] != want:
            raise ValueError(f"message {i} has role {dialog[i]['role']!r} where {want!r} was expected: a dialog "
                             "is an optional system message, then user and assistant alternating, starting with user")
    if dialog[-1]["role"] != last:
        raise ValueError(f"the last message must be from {last}, got {dialog[-1]['role']!r}")


def has_special_tags(dialog) -> bool:
    """Whether any content holds [INST], [/INST], <<SYS>> or <</SYS>> (Meta refuses such prompts)."""
    return any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS)


def _fold_system(dialog) -> list[dict]:
    if dialog[0]["role"] != "system":
        return list(dialog)
    first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [first, *dialog[2:]]


def _pair_text(user: str, assistant: str) -> tuple[str, str]:
    """(prompt, answer) of one completed pair; prompt + answer is the text Meta encodes."""
    return f"{B_INST} {user.strip()} {E_INST}", f" {assistant.strip()} "


def format_dialog(tokenizer, dialog) -> list[int]:
    """Token ids of a dialog ending with a user message: the prompt for the assistant's next answer."""
    check_dialog(dialog, last="user")
    turns = _fold_system(dialog)
    ids: list[int] = []
    for user, assistant in zip(turns[:-1:2], turns[1::2]):
        prompt, answer = _pair_text(user["content"], assistant["content"])
        ids += tokenizer.encode(prompt + answer, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def encode_with_mask(tokenizer, prompt: str, answer: str, eos: bool = True) -> tuple[list[int], list[bool]]:
    """bos + encode(prompt + answer) (+ eos), and for each token whether it belongs to the answer.

    The text is encoded whole (as at inference), so the split is the longest common prefix of the
    prompt's own tokens and the whole's: a piece that straddles the boundary counts as answer.
    """
    whole = tokenizer.encode(prompt + answer, bos=True, eos=eos)
    head = tokenizer.encode(prompt, bos=True, eos=False)
    n = 0
    while n < min(len(head), len(whole)) and head[n] == whole[n]:
        n += 1
    return whole, [False] * n + [True] * (len(whole) - n)


def encode_dialog_for_training(tokenizer, dialog) -> tuple[list[int], list[bool]]:
    """(ids, is_answer) of a dialog ending with an assistant message: every pair as in
    `format_dialog` (bos ... eos); is_answer marks each assistant answer and its eos."""
    check_dialog(dialog, last="assistant")
    turns = _fold_system(dialog)
    ids: list[int] = []
    mask: list[bool] = []
    for user, assistant in zip(turns[::2], turns[1::2]):
        a, m = encode_with_mask(tokenizer, *_pair_text(user["content"], assistant["content"]))
        ids += a
        mask += m
    return ids, mask


# ---------------------------------------------------------------------------------------------
# chat templates carried by a model file (GGUF: tokenizer.chat_template)


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                **variables) -> str:
    """The text of a conversation under a chat template (Jinja, as transformers and llama.cpp render
    `tokenizer.chat_template`): `messages` is [{"role": ..., "content": ...}, ...]; `variables`
    (e.g. bos_token, eos_token) are passed to the template."""
    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template cannot be rendered: {e}") from None


def _special_tokens(tokenizer) -> dict[str, int]:
    if isinstance(tokenizer, BPETokenizer):
        return {t: i for i, (t, ty) in enumerate(zip(tokenizer.tokens, tokenizer.token_types)) if ty == CONTROL}
    sp = tokenizer.sp
    return {sp.id_to_piece(i): i for i in range(tokenizer.n_words) if sp.is_control(i)}


def _piece(tokenizer, i: int) -> str:
    """The text of token i as a template writes it ("<s>", "<|im_start|>"); "" for no token (-1)."""
    if i < 0:
        return ""
    return tokenizer.tokens[i] if isinstance(tokenizer, BPETokenizer) else tokenizer.sp.id_to_piece(i)


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                template: str | None = None) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template (or `template`), ready to
    generate the assistant's reply: the template writes the special tokens (bos, <|im_start|>, ...)
    itself, and each is encoded as its own id; the text between them without bos/eos."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"{tokenizer.model_path} has no chat template (tokenizer.chat_template)")
    specials = _special_tokens(tokenizer)
    text = render_chat(template, messages, add_generation_prompt, bos_token=_piece(tokenizer, tokenizer.bos_id),
                       eos_token=_piece(tokenizer, tokenizer.eos_id))
    ids, pos = [], 0
    names = sorted(specials, key=len, reverse=True)  # longest first: "<|im_end|>" before "<|im"
    while pos < len(text):
        hits = [(text.find(s, pos), -len(s), s) for s in names if s]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            ids += tokenizer.encode(text[pos:], bos=False, eos=False)
            break
        start, _, s = min(hits)
        if start > pos:
            ids += tokenizer.encode(text[pos:start], bos=False, eos=False)
        ids.append(specials[s])
        pos = start + len(s)
    return ids


def trained_chat_template(data_format: str | None) -> str | None:
    """The chat template a model fine-tuned on `data_format` data carries into its exports: Llama 2's
    after chat data (the format it was trained in), else none of its own."""
    return LLAMA2_CHAT_TEMPLATE if data_format == "chat" else None


def uses_llama2_format(tokenizer) -> bool:
    """Whether dialogs for this tokenizer are written in Llama 2's format: it carries no chat template,
    or carries ours of that format (`LLAMA2_CHAT_TEMPLATE`, as chat fine-tunes export it). Then
    `format_dialog` writes them (text such as "</s>" in a message stays text) and Meta's tags in a
    message are refused."""
    template = getattr(tokenizer, "chat_template", None)
    return not template or template.strip() == LLAMA2_CHAT_TEMPLATE


def encode_dialog(tokenizer, dialog) -> list[int]:
    """The prompt tokens of a dialog ending with a user message: Llama 2's format (`format_dialog`)
    where `uses_llama2_format`, else the tokenizer's own chat template (a GGUF's
    tokenizer.chat_template)."""
    if uses_llama2_format(tokenizer):
        return format_dialog(tokenizer, dialog)
    return encode_chat(tokenizer, dialog)
