"""Synthetic data for the training tests: a learnable token pattern, split across dp ranks so that
the union of what all ranks read at a step is the same rows whatever dp is."""

import torch


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
