"""llama.cli: a mistyped flag stops a script before any work, naming the nearest valid flag."""

import subprocess
import sys
from pathlib import Path

from llama.cli import unknown_flag

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
