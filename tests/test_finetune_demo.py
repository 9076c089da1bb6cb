"""scripts/finetune_demo.py's data: instructions from docstrings by hand, a file's records by hand,
and the standard library giving hundreds of them."""

import importlib.util
import json
from pathlib import Path

import pytest

from llama.data.instruct import alpaca_prompt

# the demo is an application (scripts/finetune_demo.py), not part of the library: load it from its file
_spec = importlib.util.spec_from_file_location(
    "finetune_demo", Path(__file__).resolve().parent.parent / "scripts" / "finetune_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


@pytest.mark.parametrize("line, want", [
    ("Return the cosine of x.", "Write a Python function that returns the cosine of x."),
    ("Copy data and mode bits.", "Write a Python function that copies data and mode bits."),
    ("Search for the module.", "Write a Python function that searches for the module."),
    ("Helper for tests.", "Write a Python function whose docstring begins: Helper for tests."),
])
def test_instruction_from_the_first_docstring_line(line, want):
    assert demo.instruction_for(line) == want


def test_records_of_a_file_by_hand(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('import os\n\n\ndef twice(x):\n    """Return x twice, as a list.\n\n    More.\n    """\n'
                   '    y = [x]\n    return y * 2\n\n\ndef _private(x):\n    """Return nothing at all."""\n    return x\n\n\n'
                   'def undocumented(x):\n    return x\n\n\nclass A:\n    def m(self):\n        """Return a method."""\n'
                   '        return 1\n')
    (rec,) = demo.function_records(src)
    assert rec["instruction"] == "Write a Python function that returns x twice, as a list."
    assert rec["output"] == "def twice(x):\n    y = [x]\n    return y * 2\n"
    assert rec["source"] == "mod.py:4"
    # the demo prompts with Stanford Alpaca's template, as the training data renders it
    assert demo.ALPACA_PROMPT.format(instruction="x") == alpaca_prompt({"instruction": "x", "output": ""})


def test_the_standard_library_gives_hundreds_of_examples(tmp_path):
    path = demo.build_dataset(tmp_path / "d.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) > 300
    assert all(r["instruction"].startswith("Write a Python function ") and r["output"].startswith("def ") for r in recs)
    assert all(len(r["output"]) <= demo.MAX_OUTPUT_CHARS + 1 for r in recs)
    compile("\n".join(r["output"] for r in recs[:50]), "<stdlib>", "exec")  # whole functions, still valid code
