"""Shared test helpers: a learnable synthetic data loader for training, and tiny checkpoints and
prompts for generation."""

import torch

from llama.formats.meta import save_meta_checkpoint
from llama.model import ModelArgs, Transformer

class PatternLoader:
    """Row i of the stream is a sequence with token[t + 1] = (a * token[t] + 1) % vocab, its start
    and a (1..3) drawn from a generator seeded by (seed, split, i). Each call reads the next
    batch * dp rows of the stream; dp rank r takes rows r * batch + (0 .. batch - 1) of them (as llama.data.PackedLoader)."""

    def __init__(self, vocab, seq_len, batch_size, dp_rank=0, dp_size=1, seed=0, split="train"):
        self.vocab, self.seq_len, self.batch = vocab, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.offset = 0 if split == "train" else 10**6
        self.samples = 0  # rows of the global stream consumed: the same on every rank, any dp

    def _row(self, i):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.offset + i)
        a = int(torch.randint(1, 4, (), generator=g))
        x = [int(torch.randint(0, self.vocab, (), generator=g))]
        for _ in range(self.seq_len):
            x.append((a * x[-1] + 1) % self.vocab)
        return x

    def next(self):
        first = self.samples + self.dp_rank * self.batch
        rows = torch.tensor([self._row(first + j) for j in range(self.batch)])  # (B, T + 1)
        self.samples += self.batch * self.dp_size
        return rows[:, :-1], rows[:, 1:]

    def iter_eval(self, max_batches):
        """The first max_batches batches of the stream, whatever the state."""
        saved, self.samples = self.samples, 0
        batches = [self.next() for _ in range(max_batches)]
        self.samples = saved
        return iter(batches)

    def state_dict(self):
        return {"samples": self.samples}

    def load_state_dict(self, s):
        self.samples = s["samples"]


def make_pattern_loader(cfg, split, dp_rank, dp_size, seed):
    return PatternLoader(cfg.model_args().vocab_size, cfg.seq_len, cfg.micro_batch_size, dp_rank, dp_size, seed, split)


# Different lengths on purpose (ragged batches); one repeated to check batch-chunking.
PROMPTS = ["The", "def f(x, y):\n    return", "In 1999 it cost 12.50 dollars and the model",
           "they were her one", "The"]
GEN_LEN = 10
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=40)


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **overrides)


def make_checkpoint(out_dir, tokenizer_path, num_shards: int = 1, seed: int = 0, **overrides) -> Transformer:
    """A random tiny model saved in Meta's layout (fp32, `num_shards` files); returns the model."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    model.init_weights(std=0.08)  # larger than the default: peaked next-token distributions
    save_meta_checkpoint(model.state_dict(), model.args, out_dir, num_shards=num_shards, dtype=torch.float32,
                         tokenizer_path=tokenizer_path)
    return model


def run_all(llama, prompts=PROMPTS) -> dict:
    """Greedy and seeded-sampling completions of `prompts` plus a streamed completion."""
    tok = llama.tokenizer
    ids = [tok.encode(p, bos=True, eos=False) for p in prompts]
    greedy, _ = llama.generate(ids, GEN_LEN, temperature=0.0)
    llama.generator.manual_seed(123)
    sampled, _ = llama.generate(ids, GEN_LEN, **SAMPLING)
    llama.generator.manual_seed(7)
    streamed = list(llama.stream(prompts[2], max_gen_len=GEN_LEN, **SAMPLING))
    return {"greedy": greedy, "sampled": sampled, "streamed": streamed}


# LoRA tests: every target, and a small GQA model (2 kv heads of 4) so the q/k permutations differ
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def lora_base_model(seed: int = 0, **overrides) -> Transformer:
    """A small GQA model with random weights, norms included (a misplaced tensor shows)."""
    torch.manual_seed(seed)
    args = ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96,
                        "multiple_of": 32, "norm_eps": 1e-5, "max_seq_len": 32, **overrides})
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def randomize_lora_b(model, std: float = 0.2) -> None:
    """Nonzero lora_B everywhere (a fresh adapter's B is zero and hides every mistake)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("lora_B.weight"):
                p.normal_(0.0, std)


BOS, EOS = 1, 2


class CharTokenizer:
    """One id per character (ord + 3): every expected id of a prompt format can be written by hand."""

    bos_id, eos_id, n_words = BOS, EOS, 300

    def encode(self, s, bos=False, eos=False):
        return [BOS] * bos + [ord(c) + 3 for c in s] + [EOS] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def chars(s):
    return [ord(c) + 3 for c in s]
