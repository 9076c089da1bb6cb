"""The main job: train a tokenizer and a small LLaMA on the Python standard library, then complete code.

    python scripts/demo.py                      # or: make demo
    python scripts/demo.py --data 'my_texts/**/*.txt' --workdir runs/mine
    python scripts/demo.py --steps 100          # any field of configs/train/demo.json
"""

from llama import demo
from llama.cli import run

if __name__ == "__main__":
    run(demo.run)
