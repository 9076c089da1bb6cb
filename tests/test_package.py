"""The package as a whole: configs ship inside it (a wheel install has the presets), the layout's
dependency rule holds (the core imports nothing above it; no import cycles), no import-path hacks in tests, scripts or benchmarks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llama.config import CONFIG_DIR, config_path, names, read_json_object

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llama"
CORE = {"llama.model", "llama.blocked_attention", "llama.tokenizer", "llama.bpe_tokenizer", "llama.config",
        "llama.env", "llama.chat", "llama.cpu_kernels", "llama.gpu_kernels"}
TRANSFORMS = {"llama.parallel", "llama.quantize", "llama.lora"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def llama_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported llama module, whether the import is inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "llama":
                found.append((child.module, inner))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "llama")
            visit(child, inner)
    visit(tree, False)
    return found


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[module_name(path)] = {m for m, _ in llama_imports(path)}
    return graph


def test_core_imports_only_the_core():
    """llama/model.py (and its attention kernels), tokenizer, config, env and chat import nothing from
    the package beyond the core; transforms import only the core and other transforms (LoRA wraps
    int8 projections), formats only the core and other formats."""
    graph = package_graph()
    for mod in CORE:
        assert graph[mod] <= CORE, (mod, graph[mod] - CORE)
    # its attention kernels: the blocked one (torch and C++) for CPUs, the one-token Triton one for GPU decoding
    assert graph["llama.model"] <= {"llama.config", "llama.blocked_attention", "llama.gpu_kernels"}
    assert graph["llama.blocked_attention"] <= {"llama.cpu_kernels"}
    assert graph["llama.gpu_kernels"] == set()
    assert graph["llama.cpu_kernels"] <= {"llama.env"}
    assert graph["llama.chat"] <= {"llama.tokenizer", "llama.bpe_tokenizer"}
    for mod in TRANSFORMS & set(graph):
        assert graph[mod] <= CORE | TRANSFORMS, (mod, graph[mod] - CORE - TRANSFORMS)
    for mod in (m for m in graph if m.startswith("llama.formats")):
        assert graph[mod] <= CORE | {m for m in graph if m.startswith("llama.formats")}, mod


def test_no_import_cycles_and_no_function_local_llama_imports():
    graph = package_graph()
    for path in PACKAGE.rglob("*.py"):
        local = [m for m, inner in llama_imports(path) if inner]
        assert not local, f"{path} imports {local} inside a function"

    def resolve(mod):  # "from llama.data import x" depends on the package llama.data
        return mod if mod in graph else mod.rsplit(".", 1)[0]

    state = {}

    def dfs(mod, stack):
        state[mod] = "open"
        for dep in graph.get(mod, ()):
            dep = resolve(dep)
            if dep == mod or dep in ("llama",) and mod.startswith("llama."):
                continue
            # a package's __init__ importing its own submodules is not a cycle
            if mod.startswith(dep + ".") or dep.startswith(mod + "."):
                continue
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [mod, dep]))
            if dep not in state:
                dfs(dep, stack + [mod])
        state[mod] = "done"
    for mod in graph:
        if mod not in state:
            dfs(mod, [])


def test_no_import_path_hacks():
    """The package is installed (editable for development), so nothing edits the module search path."""
    hack = "sys." + "path"  # spelled apart so that this file passes its own check (and a plain grep)
    for folder in ("tests", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert hack not in path.read_text(), path


def test_presets_and_configs_ship_in_the_package():
    assert CONFIG_DIR.parent == PACKAGE
    assert {"7B", "13B", "33B", "65B", "tiny", "20M", "60M", "160M"} <= set(names("models"))
    assert {"7B", "demo", "tiny"} <= set(names("train")) and "llama_mixture" in names("data")
    assert config_path("models", "30B") == CONFIG_DIR / "models" / "33B.json"  # Meta's folder name
    with pytest.raises(ValueError, match="unknown model preset 'nope'; the shipped ones are"):
        config_path("models", "nope")
    assert read_json_object(config_path("train", "7B"))["lr"] == 3e-4


@pytest.mark.slow
def test_a_wheel_install_has_the_presets(tmp_path):
    """`pip install . --target DIR` (a wheel, not editable): 7B and the demo training config load
    from DIR, and the fused decoder's C++ source is there."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import llama, llama.config; from llama import ModelArgs, TrainConfig; "
            "import pathlib; assert pathlib.Path(llama.__file__).is_relative_to(pathlib.Path(r'%s')); "
            "a = ModelArgs.from_name('7B'); c = TrainConfig.from_name('demo'); "
            "assert (pathlib.Path(llama.__file__).parent / 'cpu_kernels.cpp').is_file(); "
            "print(a.dim, a.n_layers, c.model)" % target)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["4096", "32", read_json_object(config_path("train", "demo"))["model"]]
