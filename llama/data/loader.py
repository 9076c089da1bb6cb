"""Reading prepared token data: mixtures of datasets, and `PackedLoader`, which packs them into batches.

`PackedLoader` cuts a stream into windows of seq_len + 1 tokens (stride seq_len, so every token
after the first is a target once per epoch), shuffles them per epoch with a keyed permutation, and
mixes sources by weight. Sample g of the run (g = 0, 1, 2, ... over the global batch) is a pure
function of (seed, g), so dp ranks get disjoint rows and a resumed loader continues exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llama.config import config_path, names, read_json_object
from llama.data.prepare import FORMAT, META

def _shipped_or_file(data):
    """`data` with a shipped mixture's name replaced by its file, and a mixture JSON file read."""
    if isinstance(data, str) and not Path(data).exists() and data in names("data"):
        data = config_path("data", data)  # a mixture shipped in llama/configs/data
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".json") and Path(data).is_file():
        data = read_json_object(data)
    return data


def load_mixture(data) -> dict[str, tuple[Path, float]]:
    """{name: (dir, weight)} from a prepared dir, a mixture JSON file ({name: {"path", "weight"}})
    or a dict {name: (dir, weight) | {"path", "weight"}}. Weights are normalised to sum to 1."""
    data = _shipped_or_file(data)
    if isinstance(data, (str, os.PathLike)):
        return {Path(data).name or "data": (Path(data), 1.0)}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"data must be a prepared directory or a non-empty mixture "
                         f"{{name: [dir, weight]}}, got {data!r}")
    mix = {}
    for name, src in data.items():
        if isinstance(src, dict):
            path, weight = src.get("path"), src.get("weight")
        elif isinstance(src, (list, tuple)) and len(src) == 2:
            path, weight = src
        else:
            path, weight = None, None
        if not path or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"mixture source {name!r} must be [dir, weight >= 0] or "
                             f'{{"path": dir, "weight": w}}, got {src!r}')
        mix[name] = (Path(path), float(weight))
    total = sum(w for _, w in mix.values())
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total}; give at least one positive weight")
    return {name: (p, w / total) for name, (p, w) in mix.items()}


def source_problem(data, name: str, path: Path, problem: str) -> str:
    """`problem` (a sentence about `path`) as said of source `name` of `data`: as it is for a prepared
    directory given directly; for a mixture, naming the source and, for a relative path, the folder it
    was read from (the working directory)."""
    if isinstance(_shipped_or_file(data), (str, os.PathLike)):
        return problem
    where = "" if path.is_absolute() else f" (a mixture's relative paths are read from the current folder, {Path.cwd()})"
    return f"mixture source {name!r}: {problem}{where}"


# --- reading a prepared dataset -----------------------------------------------------------------


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a prepared dataset (no {META}): make it with "
                                "scripts/prepare_data.py")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TokenStream:
    """One split of a prepared dataset as a single array-like of tokens over its memmapped shards."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path} has no split {split!r}; it has {list(self.meta['splits'])}")
        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"])
        self.shards = []
        for s in info["shards"]:
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["n_tokens"] * dtype.itemsize:
                raise ValueError(f"shard {f} is missing or truncated (expected {s['n_tokens']} "
                                 f"{dtype.name} tokens); prepare the dataset again")
            if s["n_tokens"]:
                self.shards.append(np.memmap(f, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # shard i covers starts[i:i+2]
        self.n_tokens = int(self.starts[-1])
        self.n_docs = info["n_docs"]

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] as int64, across shard boundaries."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, end = [], start + length
        while start < end:
            lo = start - self.starts[i]
            take = min(end - start, len(self.shards[i]) - lo)
            parts.append(self.shards[i][lo:lo + take])
            start += take
            i += 1
        return np.concatenate(parts).astype(np.int64)


# --- keyed hashing: the loader's randomness is a pure function of (seed, counters) -------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    k = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for p in parts:
            k = _mix64(np.array([k ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return k


def uniform(key: np.uint64, idx: np.ndarray) -> np.ndarray:
    """A uniform float in [0, 1) for each index, keyed."""
    with np.errstate(over="ignore"):
        h = _mix64(idx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def permute(idx: np.ndarray, n: int, key: np.uint64) -> np.ndarray:
    """A keyed bijection of [0, n) applied to idx: a 4-round Feistel network on the smallest even
    number of bits covering n, cycle-walked back into range. O(1) memory for any n (a stored
    permutation of 10^9 windows would not fit)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [_key(int(key), r) for r in range(4)]

    def feistel(x):
        left, right = x >> half, x & mask
        for k in round_keys:
            with np.errstate(over="ignore"):
                f = _mix64(right ^ k) & mask
            left, right = right, left ^ f
        return (left << half) | right

    x = feistel(idx.astype(np.uint64))
    out_of_range = x >= np.uint64(n)
    while out_of_range.any():  # expected < 4 passes: 2^bits < 4n
        x[out_of_range] = feistel(x[out_of_range])
        out_of_range = x >= np.uint64(n)
    return x.astype(np.int64)


# --- the loader ---------------------------------------------------------------------------------


class PackedLoader:
    """Batches of (inputs, targets), int64 (batch_size, seq_len), from prepared data.

    data: a prepared directory, a mixture JSON file, or {name: (dir, weight)}.
    The global batch of a step is samples g = G .. G + batch_size * dp_size - 1 (G counts samples
    of the whole run); rank r takes rows G + r * batch_size + j. Sample g picks a source by weight
    from a hash of (seed, g); the c-th sample drawn from a source is window perm_epoch(c mod n) of
    that source, epoch = c // n, the permutation reshuffled each epoch (split="val": not shuffled).
    So the concatenation of the ranks' batches equals one rank's batch of batch_size * dp_size,
    and `state_dict()` (G and the per-source counts) resumes exactly.
    """

    def __init__(self, data, seq_len: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, split: str = "train", tokenizer_sha256: str | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed, self.split = dp_rank, dp_size, seed, split
        mix = load_mixture(data)
        self.names = list(mix)
        self.weights = np.array([w for _, w in mix.values()])
        self.streams = []
        for name, (path, _) in mix.items():
            try:
                self.streams.append(TokenStream(path, split))
            except FileNotFoundError as e:
                raise FileNotFoundError(source_problem(data, name, path, str(e))) from None
        hashes = {s.meta["tokenizer_sha256"] for s in self.streams}
        if tokenizer_sha256 is not None:
            for s in self.streams:
                if s.meta["tokenizer_sha256"] != tokenizer_sha256:
                    raise ValueError(
                        f"{s.path} was tokenized with a different tokenizer (sha256 "
                        f"{s.meta['tokenizer_sha256'][:12]}..., not {tokenizer_sha256[:12]}...): "
                        "prepare it again with this tokenizer")
        elif len(hashes) > 1:
            raise ValueError(f"the mixture's sources were made with different tokenizers: "
                             f"{ {n: s.meta['tokenizer_sha256'][:12] for n, s in zip(self.names, self.streams)} }")
        # windows of seq_len + 1 tokens at stride seq_len
        self.n_windows = [(s.n_tokens - 1) // seq_len if s.n_tokens else 0 for s in self.streams]
        empty = [name for name, n, w in zip(self.names, self.n_windows, self.weights) if n == 0 and w > 0]
        if split == "val" and empty and len(empty) < sum(self.weights > 0):
            # validation (iter_eval) walks the windows of the sources that have a val split, source after
            # source, whatever the weights; those of the empty ones are zeroed so that sampling this split
            # (next) never picks them
            warnings.warn(f"validation: source(s) {empty} have no val split at seq_len {seq_len}; the validation "
                          f"loss is over the others", stacklevel=2)
            self.weights = np.where([n == 0 for n in self.n_windows], 0.0, self.weights)
            self.weights = self.weights / self.weights.sum()
        for name, s, n, w in zip(self.names, self.streams, self.n_windows, self.weights):
            if n == 0 and w > 0:
                raise ValueError(f"the {split} split of {s.path} ({name!r}) has {s.n_tokens} tokens: "
                                 f"not one full window of seq_len + 1 = {seq_len + 1}; lower seq_len "
                                 "or add data")
        # u in [0, 1) picks the source whose cumulative-weight interval holds it; past the last
        # source with weight > 0 the bound is > 1, so rounding never picks a zero-weight source
        self.cum_weights = np.cumsum(self.weights)
        self.cum_weights[int(np.flatnonzero(self.weights > 0)[-1]):] = 2.0
        self.samples = 0  # G: samples of the global stream consumed
        self.consumed = [0] * len(self.streams)  # samples drawn from each source so far

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def epochs(self) -> dict[str, float]:
        """Epochs of each source consumed so far (by the whole run, all ranks)."""
        return {name: c / n if n else 0.0 for name, c, n in zip(self.names, self.consumed, self.n_windows)}

    def _sources(self, g: np.ndarray) -> np.ndarray:
        if len(self.streams) == 1:
            return np.zeros(len(g), dtype=np.int64)
        u = uniform(_key(self.seed, 0x5EED), g)
        return np.searchsorted(self.cum_weights, u, side="right")

    def _window(self, src: int, c: int) -> np.ndarray:
        n = self.n_windows[src]
        epoch, i = divmod(c, n)
        if self.split != "val":
            i = int(permute(np.array([i]), n, _key(self.seed, src, epoch))[0])
        return self.streams[src].read(i * self.seq_len, self.seq_len + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.batch_size * self.dp_size
        g = np.arange(self.samples, self.samples + global_batch)
        src = self._sources(g)
        # c for each sample: the source's count so far + earlier draws of it in this global batch
        counts = np.zeros(global_batch, dtype=np.int64)
        for s in range(len(self.streams)):
            mine = src == s
            counts[mine] = self.consumed[s] + np.arange(mine.sum())
            self.consumed[s] += int(mine.sum())
        self.samples += global_batch
        lo = self.dp_rank * self.batch_size
        rows = np.stack([self._window(int(s), int(c)) for s, c in
                         zip(src[lo:lo + self.batch_size], counts[lo:lo + self.batch_size])])
        rows = torch.from_numpy(rows)  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    __next__ = next

    def __iter__(self):
        return self

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every window of the split once, in order, source after source, in full global batches
        (rank r takes rows r * batch_size ...); at most max_batches. Independent of the state."""
        windows = [(s, i) for s, n in enumerate(self.n_windows) for i in range(n)]
        global_batch = self.batch_size * self.dp_size
        n_batches = len(windows) // global_batch
        if n_batches == 0:
            raise ValueError(f"the {self.split} split has {len(windows)} windows of {self.seq_len + 1} "
                             f"tokens, fewer than one global batch ({global_batch}); lower seq_len "
                             "or batch_size, or prepare more data")
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            lo = b * global_batch + self.dp_rank * self.batch_size
            rows = torch.from_numpy(np.stack([self.streams[s].read(i * self.seq_len, self.seq_len + 1)
                                              for s, i in windows[lo:lo + self.batch_size]]))
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"samples": self.samples, "consumed": dict(zip(self.names, self.consumed)),
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "n_windows": dict(zip(self.names, self.n_windows)),
                "tokenizers": dict(zip(self.names, (s.meta["tokenizer_sha256"] for s in self.streams)))}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. The batch size and dp size may differ from the saving run's
        (positions count samples of the global stream); seed, seq_len, split and data may not."""
        mine = self.state_dict()
        saved = set((state.get("tokenizers") or {}).values())  # older checkpoints do not say
        if saved and saved != set(mine["tokenizers"].values()):
            raise ValueError(f"the checkpoint's data was tokenized with another tokenizer (sha256 "
                             f"{', '.join(sorted(h[:12] for h in saved))}...) than this data "
                             f"({', '.join(sorted(h[:12] for h in set(mine['tokenizers'].values())))}...); resume with "
                             f"the run's tokenizer and data")
        for k in ("seed", "seq_len", "split", "n_windows"):
            if state.get(k) != mine[k]:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader has "
                                 f"{mine[k]!r}; resume with the same data, seed and seq_len")
        self.samples = int(state["samples"])
        self.consumed = [int(state["consumed"][n]) for n in self.names]
