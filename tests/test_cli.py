"""llama.cli: a mistyped flag stops a script before any work, naming the nearest valid flag."""

import subprocess
import sys
from pathlib import Path

from llama.cli import stray_argument, unknown_flag

ROOT = Path(__file__).resolve().parent.parent


def main(ckpt_dir: str, temperature: float = 0.8, max_seq_len: int = 512, interactive: bool = False):
    pass


def test_unknown_flag_names_the_nearest():
    assert unknown_flag(main, ["--ckpt_dir", "x", "--temperature=0", "--max-seq-len", "5", "--nointeractive"]) is None
    assert unknown_flag(main, ["--temprature", "0"]) == "unknown flag --temprature: did you mean --temperature? (nothing was done)"
    assert unknown_flag(main, ["--max-seq-lne=5"]).startswith("unknown flag --max_seq_lne: did you mean --max_seq_len?")
    assert "valid flags: --ckpt_dir, --temperature, --max_seq_len, --interactive" in unknown_flag(main, ["--zzz"])
    assert unknown_flag(main, ["x", "--", "--help"]) is None  # fire's own flags after a bare --
    assert unknown_flag(main, ["--help"]) is None

    def with_overrides(config: str = "tiny", **overrides):
        pass
    assert unknown_flag(with_overrides, ["--anything", "1"]) is None  # no list given: **overrides takes it
    flags = ["steps", "model.n_layers"]
    assert unknown_flag(with_overrides, ["--steps", "3", "--model.n_layers", "2"], flags) is None
    assert "did you mean --model.n_layers?" in unknown_flag(with_overrides, ["--model.n_layrs", "2"], flags)


def script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_scripts_stop_before_any_work(tmp_path):
    # the tokenizer would be written first if the flag were only found at the end
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    out = tmp_path / "tok.model"
    proc = script("train_tokenizer.py", "--inputs", str(tmp_path / "a.txt"), "--out", str(out), "--vocab_sise", "300")
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip() == "error: unknown flag --vocab_sise: did you mean --vocab_size? (nothing was done)"
    proc = script("pretrain.py", "--out_dir", str(tmp_path / "run"), "--stpes", "3")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert "unknown flag --stpes: did you mean --steps?" in proc.stderr


def test_help_shows_the_script_and_its_flags():
    """--help / -h prints the script's docstring and its flags, exit 0: also where main takes
    **overrides (fire passed `help` on as an override, and the config refused the key)."""
    for args in (["--help"], ["--config", "tiny", "-h"]):
        proc = script("finetune.py", *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Fine-tune a LLaMA model, with LoRA or in full")
        assert "--config (default 'alpaca_lora_7B')" in proc.stdout and "--train_on_input" in proc.stdout
    proc = script("example.py", "--help")
    assert proc.returncode == 0 and "--ckpt_dir" in proc.stdout and "--temperature (default 0.8)" in proc.stdout


def test_a_stray_argument_stops_before_any_work():
    """`--prompts hi extra`: fire would bind `extra` to the next free parameter (or run, then complain)."""
    def kw_main(ckpt_dir: str, *, temperature: float = 0.8, interactive: bool = False):
        pass
    assert stray_argument(kw_main, ["--ckpt_dir", "x", "--temperature", "0", "extra"]) == (
        "unexpected argument 'extra': each flag takes one value (quote a value with spaces, e.g. --temperature "
        "\"two words\") (nothing was done)")  # (the flag it followed, not one the script may lack)
    assert stray_argument(kw_main, ["x", "--temperature", "0"]) is None  # ckpt_dir by position
    assert stray_argument(kw_main, ["x", "y"]).startswith("unexpected argument 'y'")
    assert "e.g. --flag \"two words\"" in stray_argument(kw_main, ["x", "y"])  # no flag before it
    assert stray_argument(main, ["--ckpt_dir", "x", "y"]) is None  # main's temperature takes it, as in fire
    assert stray_argument(kw_main, ["x", "--interactive", "y"]) is None  # fire: --interactive's value
    assert stray_argument(kw_main, ["x", "--interactive", "--temperature=0", "y"]).startswith("unexpected argument 'y'")
    proc = script("example.py", "--ckpt_dir", "nowhere", "--prompts", "hi", "extra")
    assert proc.returncode == 2 and "unexpected argument 'extra'" in proc.stderr
