"""Fine-tune a LLaMA model, with LoRA or in full, from any checkpoint, on instruction, chat or
document data (llama.train with llama/train/finetune.py): one process, or torchrun with
world = dp x tp (FSDP2 over dp, tensor parallel over tp).

The config is a training config of llama/configs/train by name (alpaca_lora_7B, alpaca_full_7B,
finetune_demo, ...) or a JSON path; every field can be overridden with --field value.

    # alpaca-lora's recipe: LoRA r 8 on wq, wv over a frozen bf16 base, Stanford Alpaca's 52k examples
    python scripts/finetune.py --config alpaca_lora_7B --init_from weights/7B --data alpaca_data.json
    # Stanford Alpaca's full fine-tuning on 4 GPUs
    torchrun --nproc_per_node 4 scripts/finetune.py --config alpaca_full_7B --init_from weights/7B \
        --data alpaca_data.json
    # chat data ({"messages": [...]} per line) in Llama 2's format, from a transformers folder
    python scripts/finetune.py --config alpaca_lora_7B --init_from hf/Llama-2-7b-hf --data chats.jsonl \
        --data_format chat --export_hf runs/chat/hf

init_from: a Meta checkpoint directory (any shard count), a transformers folder, or a training
checkpoint / run directory of this library. At the end the merged model is written in Meta's layout
to export_dir (and with LoRA the adapter in PEFT's format to export_dir/peft; with export_hf a
transformers folder). Chat with it: python scripts/example.py --ckpt_dir EXPORT_DIR --tokenizer_path
EXPORT_DIR/tokenizer.model --chat. Run the same command again to resume.
"""

from llama.cli import run
from llama.train import command_line_flags, train_from_command_line


def main(config: str = "alpaca_lora_7B", **overrides):
    """config: a name of llama/configs/train or a JSON path; overrides: any TrainConfig field
    (--init_from DIR, --data FILE, --lora '{"r": 16}', --steps 100, --tp 2, ...)."""
    train_from_command_line(config, **overrides)


if __name__ == "__main__":
    run(main, command_line_flags())
