"""Synthetic data for the training tests: a learnable token pattern, split across dp ranks so that
the union of what all ranks read at a step is the same rows whatever dp is."""

import torch


class PatternLoader:
    """Row i of the stream is a sequence with token[t + 1] = (a * token[t] + c) % vocab, its start
    and (a, c) drawn from a generator seeded by (seed, split, i). Call k on dp rank r returns rows
    k * batch * dp + r * batch + (0 .. batch - 1)."""

    def __init__(self, vocab, seq_len, batch_size, dp_rank=0, dp_size=1, seed=0, split="train"):
        self.vocab, self.seq_len, self.batch = vocab, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.offset = 0 if split == "train" else 10**6
        self.calls = 0

    def _row(self, i):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.offset + i)
        a = int(torch.randint(1, 4, (), generator=g))
        x = [int(torch.randint(0, self.vocab, (), generator=g))]
        for _ in range(self.seq_len):
            x.append((a * x[-1] + 1) % self.vocab)
        return torch.tensor(x)

    def next(self):
        first = self.calls * self.batch * self.dp_size + self.dp_rank * self.batch
        rows = torch.stack([self._row(first + j) for j in range(self.batch)])  # (B, T + 1)
        self.calls += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, s):
        self.calls = s["calls"]


def make_pattern_loader(cfg, split, dp_rank, dp_size, seed):
    return PatternLoader(cfg.model_args().vocab_size, cfg.seq_len, cfg.micro_batch_size, dp_rank, dp_size, seed, split)
