"""benchmarks/gpu.py, the prepared GPU check, kept from rotting: its --smoke run on CPU (the same
code paths, tiny sizes) must write every section, and the figures it computes must agree with
independent references - the naive attention, the unsharded model, transformers, ln(vocab) for a
fresh model's loss, and the formulas recomputed here. Also: its comparison catches a wrong
attention, and a failing, slow or unaffordable section is recorded without stopping the run.
"""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama.model import ModelArgs, attention
from llama.train import flops_per_token

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu)

# The GPU image has neither fire nor gguf: the run must not import them, even indirectly (llama
# imports gguf at the first GGUF operation only).
_BOOT = ("import runpy, sys; sys.modules['fire'] = None; sys.modules['gguf'] = None; "
         "sys.argv = [sys.argv[1]] + sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke") / "gpu.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _BOOT, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    return {"data": data, "sections": data["sections"], "stdout": proc.stdout, "md": out.with_suffix(".md"),
            "wall": wall}


def test_every_section_ran_and_was_reported(smoke):
    secs = smoke["sections"]
    assert list(secs) == list(gpu.SECTIONS)
    for name, sec in secs.items():
        assert sec["status"] == "ok", (name, sec.get("status"), sec.get("traceback"))
        assert f"### {name}: ok" in smoke["stdout"]  # the table printed after each section
    md = smoke["md"].read_text()
    assert all(f"### {name}: ok" in md for name in secs)
    assert "traceback" not in md
    # ~30 s on an idle 2-core CPU; the bound only catches a smoke run that grew into a benchmark
    assert smoke["data"]["meta"]["elapsed_s"] < 180


def test_environment_measures_peak_and_bandwidth(smoke):
    env = smoke["sections"]["environment"]
    assert env["torch"] == torch.__version__
    assert env["bf16_matmul_tflops"] > 0 and env["copy_bandwidth_gbs"] > 0
    assert env["device"].startswith("cpu") and smoke["data"]["meta"]["device"] == env["device"]


def test_attention_backends_agree_with_the_naive_one(smoke):
    att = smoke["sections"]["attention"]
    rows = att["comparisons"]
    # sdpa vs math: 2 dtypes x (MHA, GQA) x (prefill, cache at start_pos > 0, one decoding token)
    seen = {(r["backend"], r["dtype"], r["layout"], r["case"].split()[0]) for r in rows}
    assert seen == {("sdpa", d, l, c) for d in ("bfloat16", "float16") for l in ("MHA", "GQA")
                    for c in ("prefill", "cache", "decode")}
    tol = {"bfloat16": 4e-2, "float16": 1e-2}
    for r in rows:
        assert "error" not in r, r
        assert r["ok"] and r["max_rel"] <= tol[r["dtype"]], r
        assert all(r[k] < 0.1 for k in ("out", "dq", "dk", "dv")), r
    assert att["all_equal"] is True and att["failed"] == 0
    assert att["xformers_status"] == "skipped: no CUDA"


@pytest.mark.parametrize("wrong", ["no causal mask", "GQA heads interleaved"])
def test_attention_comparison_catches_a_wrong_backend(wrong):
    def broken(q, k, v, start_pos, backend):
        if backend == "math":
            return attention(q, k, v, start_pos, "math")
        rep = q.size(2) // k.size(2)
        if wrong == "no causal mask":  # every query sees every key
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        # query head h served by kv head h % Hkv instead of h // rep
        return attention(q, k.repeat(1, 1, rep, 1), v.repeat(1, 1, rep, 1), start_pos, "sdpa")

    row = gpu.compare_attention("sdpa", torch.float32, 4, 2, 8, 0, 1, 16, "cpu", attn=broken)
    assert row["ok"] is False and row["max_rel"] > 0.05
    good = gpu.compare_attention("sdpa", torch.float32, 4, 2, 8, 0, 1, 16, "cpu")
    assert good["ok"] is True and good["max_rel"] < 1e-5


def test_training_figures(smoke):
    tr = smoke["sections"]["training"]
    (check,) = tr["fsdp_one_rank"]  # CPU: gloo only
    assert check["backend"] == "gloo" and check["ok"]
    assert len(check["losses_fsdp"]) == 3
    for a, b in zip(check["losses_plain"], check["losses_fsdp"]):  # the unsharded model is the reference
        assert abs(a - b) < 1e-4
    assert tr["process_group"] == "gloo"
    env = smoke["sections"]["environment"]
    s = gpu.SMOKE
    assert [r["model"] for r in tr["rows"]] == [label for label, _, _ in s.train_rows]
    for row, (_, preset, overrides) in zip(tr["rows"], s.train_rows):
        assert "error" not in row, row
        assert row["fsdp"] == "gloo" and row["ac"] == "selective" and row["adamw"] == "fused"
        args = ModelArgs.from_name(preset, **overrides)
        assert abs(row["first_loss"] - math.log(args.vocab_size)) < 0.1  # a fresh model is ~uniform
        assert row["last_loss"] < row["first_loss"]  # the same batch every step: it must be learned
        assert row["tokens_per_s"] == pytest.approx(s.train_batch * s.train_seq / row["step_s_median"])
        fpt = flops_per_token(args, s.train_seq)
        assert row["flops_per_token"] == fpt
        assert row["mfu_measured_peak"] == pytest.approx(fpt * row["tokens_per_s"] / (env["bf16_matmul_tflops"] * 1e12))


def test_decode_figures(smoke):
    dec = smoke["sections"]["decode"]
    rows = {r["impl"]: r for r in dec["rows"]}
    bw = smoke["sections"]["environment"]["copy_bandwidth_gbs"] * 1e9
    measured = ["ours, eager", "ours, compiled decoder", "transformers", "ours, int8, compiled"]
    for name in measured:
        r = rows[name]
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0
        assert r["pct_bandwidth_ceiling"] == pytest.approx(100 * r["tokens_per_s"] * r["mb_per_token"] * 1e6 / bw)
    # fp32, same weights: the compiled static step and transformers decode exactly the eager tokens
    assert rows["ours, compiled decoder"]["agree_with_eager"] == 1.0
    # no Triton kernel on a CPU: its rows and the one-row product timings are CUDA-only
    assert not any("gemv" in name for name in rows) and "one_row_products" not in dec
    assert rows["transformers"]["agree_with_eager"] == 1.0
    assert dec["big_model"].startswith("tiny")
    big = [r for r in dec["rows"] if r["impl"].startswith("tiny {'n_layers': 1}")]
    assert len(big) == 2 and all(r["tokens_per_s"] > 0 for r in big)
    assert big[1]["agree_with_eager"] == 1.0
    # int8 reads 1 byte per weight (+ per-row scales) instead of 4: the bytes per token show it
    dense, int8 = rows["ours, eager"]["mb_per_token"], rows["ours, int8, compiled"]["mb_per_token"]
    assert 0.2 < int8 / dense < 0.5
    assert "static" in dec["transformers_generate"]


def test_numerics_against_transformers(smoke):
    rows = {r["dtype"]: r for r in smoke["sections"]["numerics"]["rows"]}
    assert rows["float32"]["max_abs_diff"] < 1e-4 and rows["float32"]["greedy_agree"] == 1.0
    assert rows["bfloat16"]["max_abs_diff"] < 0.05


# -- the run's robustness, with stand-in sections (fast, in process) -------------------------


def _run_fake(monkeypatch, tmp_path, sections, budget=60.0, shares=None):
    monkeypatch.setattr(gpu, "SECTIONS", sections)
    sizes = gpu.Sizes(shares=shares or {name: (5, 0) for name in sections}, needs={"slow step": (0, 1)})
    return gpu.run(sizes, torch.device("cpu"), budget, tmp_path / "g.json", smoke=True)


def test_a_failing_or_slow_section_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def fails(ctx, out):
        out["before"] = 1.0
        raise RuntimeError("CUDA error: something broke")

    def hangs(ctx, out):
        out["started"] = True
        time.sleep(30)

    def fine(ctx, out):
        out["value"] = 2.0

    data = _run_fake(monkeypatch, tmp_path, {"a": fails, "b": hangs, "c": fine},
                     shares={"a": (5, 0), "b": (1, 0), "c": (5, 0)})
    a, b, c = (data["sections"][k] for k in "abc")
    assert a["status"] == "error: RuntimeError: CUDA error: something broke" and a["before"] == 1.0
    assert "RuntimeError" in a["traceback"]
    assert b["status"].startswith("timeout") and b["started"] and b["seconds"] < 5
    assert c["status"] == "ok" and c["value"] == 2.0
    on_disk = json.loads((tmp_path / "g.json").read_text())
    assert on_disk["sections"]["c"]["value"] == 2.0
    assert "### a: error: RuntimeError" in (tmp_path / "g.md").read_text()


def test_a_step_over_its_cap_is_recorded_and_the_section_goes_on(monkeypatch, tmp_path):
    def section(ctx, out):
        rows = out.setdefault("rows", [{}, {}])
        with gpu.recorded(rows[0]), ctx.capped("slow step"):
            time.sleep(30)
        with gpu.recorded(rows[1]), ctx.capped("slow step"):
            rows[1]["value"] = 3.0
        time.sleep(1.5)  # past the step's cap, within the section's share: the section's timer still runs
        out["after"] = True

    data = _run_fake(monkeypatch, tmp_path, {"a": section}, shares={"a": (5, 0)})
    sec = data["sections"]["a"]
    assert sec["status"] == "ok" and sec["after"] and sec["seconds"] < 5
    assert sec["rows"][0]["error"].startswith("error: StepTimeout")
    assert sec["rows"][1] == {"value": 3.0}
    data = _run_fake(monkeypatch, tmp_path, {"a": lambda ctx, out: time.sleep(30)}, shares={"a": (1, 0)})
    assert data["sections"]["a"]["status"].startswith("timeout")


def test_sections_beyond_the_budget_are_skipped(monkeypatch, tmp_path):
    ran = []
    data = _run_fake(monkeypatch, tmp_path, {"a": lambda ctx, out: ran.append("a"), "b": lambda ctx, out: ran.append("b")},
                     budget=5.0, shares={"a": (5, 1), "b": (5, 10)})
    assert ran == ["a"]
    assert data["sections"]["b"]["status"].startswith("skipped: budget")


def test_without_cuda_it_asks_for_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        gpu.main(["--budget", "1"])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_training_loss_check_agrees(smoke):
    """The training section's loss check: the trainer's one-process loss (linear_cross_entropy) against
    the unfused cross_entropy of F.linear on the same weights agrees, and both were timed."""
    row = smoke["sections"]["training"]["loss"][0]
    assert "error" not in row, row.get("traceback")
    assert row["ok"] and row["loss_rel_diff"] < 1e-4 and row["grad_w_rel_diff"] < 2e-2
    assert row["fused_ms"] > 0 and row["unfused_ms"] > 0
