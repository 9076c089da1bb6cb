"""The main job: train a tokenizer and a small LLaMA on the Python standard library, then complete code.

    python scripts/demo.py                      # or: make demo
    python scripts/demo.py --data 'my_texts/**/*.txt' --workdir runs/mine
    python scripts/demo.py --steps 100          # any field of configs/train/demo.json
"""

import fire

from llama.demo import run

if __name__ == "__main__":
    fire.Fire(run)
