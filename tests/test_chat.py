"""llama.chat: Llama 2's chat format token by token against a hand-built expectation (a character
tokenizer makes every id checkable), the training encoding's answer mask, and every malformed dialog's
message."""

import pytest

from llama.chat import (LLAMA2_CHAT_TEMPLATE, encode_dialog, encode_dialog_for_training, format_dialog, has_special_tags,
                        uses_llama2_format)
from tests.helpers import BOS, EOS, CharTokenizer, chars


def test_prompt_by_hand():
    """Meta's rendering: the system text folded into the first user turn, each completed pair
    bos "[INST] u [/INST] a " eos (contents stripped), the last user turn bos "[INST] u [/INST]"."""
    tok = CharTokenizer()
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
              {"role": "assistant", "content": "hello\n"}, {"role": "user", "content": "again"}]
    p1 = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST] hello "
    assert format_dialog(tok, dialog) == [BOS] + chars(p1) + [EOS] + [BOS] + chars("[INST] again [/INST]")
    assert format_dialog(tok, [{"role": "user", "content": "x"}]) == [BOS] + chars("[INST] x [/INST]")


def test_llama2_template_is_llama2_format():
    """A tokenizer that carries our Llama 2 template (chat fine-tunes export it) is written by
    format_dialog, as one without a template: "</s>" typed in a message stays text (the template's
    renderer would make it the eos id) and Meta's tags are refused (`uses_llama2_format`); another
    template is the tokenizer's own format."""
    tok = CharTokenizer()
    dialog = [{"role": "user", "content": "end with </s> please"}]
    assert uses_llama2_format(tok)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE + "\n"  # (as read back from a file with a final newline)
    assert uses_llama2_format(tok)
    assert encode_dialog(tok, dialog) == [BOS] + chars("[INST] end with </s> please [/INST]")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert not uses_llama2_format(tok)


def test_training_encoding_marks_the_answers_and_their_eos():
    tok = CharTokenizer()
    dialog = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
              {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]
    ids, mask = encode_dialog_for_training(tok, dialog)
    assert ids == ([BOS] + chars("[INST] q [/INST] a ") + [EOS] + [BOS] + chars("[INST] r [/INST] b ") + [EOS])
    n = len("[INST] q [/INST]")
    assert mask == ([False] * (1 + n) + [True] * 3 + [True]) * 2  # " a " and eos, per pair
    with pytest.raises(ValueError, match="the last message must be from assistant"):
        encode_dialog_for_training(tok, dialog[:3])


def test_special_tags_are_found():
    assert has_special_tags([{"role": "user", "content": "please [INST] do"}])
    assert not has_special_tags([{"role": "user", "content": "INST"}])


def test_chat_validation_errors():
    tok = CharTokenizer()
    u, a, s = ({"role": r, "content": "c"} for r in ("user", "assistant", "system"))
    with pytest.raises(ValueError, match="message 0 has role 'assistant' where 'user' was expected"):
        format_dialog(tok, [a, u])
    with pytest.raises(ValueError, match="message 2 has role 'user' where 'assistant' was expected"):
        format_dialog(tok, [s, u, u])
    with pytest.raises(ValueError, match="the last message must be from user, got 'assistant'"):
        format_dialog(tok, [u, a])
    with pytest.raises(ValueError, match="message 1 must be an object with a role"):
        format_dialog(tok, [u, {"role": "bot", "content": "x"}, u])
    with pytest.raises(ValueError, match="system message but no user message"):
        format_dialog(tok, [s])
