# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# torch==2.13.0 (a local CPU wheel here) is installed first only where no torch is present, so a
# bare `torch` requirement never pulls a multi-GB CUDA build by accident; GPU users bring their own.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: torch setup test demo finetune-demo bench
torch:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0

setup: torch
	@$(PIP) -e ".[test]"

test: setup
	$(PY) -m pytest -q

demo: torch
	@$(PIP) -e ".[demo]"
	$(PY) scripts/demo.py $(ARGS)

finetune-demo: setup
	$(PY) scripts/finetune_demo.py $(ARGS)

bench: setup
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
