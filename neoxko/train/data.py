"""Training batches from memory-mapped token shards, drawn without state so that resuming is exact.

Sample g of the run (g = step * global_batch + rank's offset) comes from its own generator seeded with
(seed, g): a source picked by the mixture weights, then a shard by size, then a random window of
seq_len + 1 tokens. Any process can rebuild any batch from the step number alone.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neoxko.data.shards import read_tokens, token_shards
from neoxko.errors import NeoxkoError
from neoxko.model import Step

IGNORE = -100  # the target of a position that carries no loss (cross_entropy's ignore_index)


class TokenSource:
    """All shards of one data folder, as one memory-mapped pool of windows."""

    def __init__(self, folder: str | Path, seq_len: int):
        folder = Path(folder)
        if (folder / "tokens").is_dir():
            folder = folder / "tokens"
        self.shards = [read_tokens(p) for p in token_shards(folder)]
        self.shards = [s for s in self.shards if len(s) > seq_len + 1]
        if not self.shards:
            raise NeoxkoError(f"no shard in {folder} holds more than seq_len + 1 = {seq_len + 1} tokens")
        self.sizes = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.seq_len = seq_len

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.shards))

    def window(self, rng: np.random.Generator) -> np.ndarray:
        shard = self.shards[rng.choice(len(self.shards), p=self.sizes / self.sizes.sum())]
        start = int(rng.integers(0, len(shard) - self.seq_len - 1))
        return np.asarray(shard[start:start + self.seq_len + 1], dtype=np.int64)


class Batches:
    def __init__(self, folders: list, weights: list | None, seq_len: int, seed: int):
        if not folders:
            raise NeoxkoError("no training data: set data to one or more `neoxko data prepare` output folders")
        self.sources = [TokenSource(f, seq_len) for f in folders]
        w = np.array(weights if weights is not None else [1.0] * len(folders), dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise NeoxkoError(f"data_weights must be non-negative and not all zero, got {list(w)}")
        self.weights = w / w.sum()
        self.seed, self.seq_len = seed, seq_len

    def target_count(self, first_sample: int, size: int) -> int:
        return size * self.seq_len  # every token is a target

    def batch(self, first_sample: int, size: int) -> "Batch":
        """Samples first_sample .. first_sample + size - 1 as inputs and next-token targets (size, seq_len)."""
        rows = []
        for g in range(first_sample, first_sample + size):
            rng = np.random.default_rng([self.seed, g])
            source = self.sources[rng.choice(len(self.sources), p=self.weights)]
            rows.append(source.window(rng))
        data = torch.from_numpy(np.stack(rows))
        return Batch(data[:, :-1], data[:, 1:])


class Batch:
    """Inputs and targets (B, T), IGNORE where no loss falls; for packed rows also each token's rotary position
    and its segment (the example it belongs to), from which the attention mask is built."""

    def __init__(self, inputs, targets, positions=None, segments=None, sparse: bool = False):
        self.inputs, self.targets, self.positions, self.segments = inputs, targets, positions, segments
        self.sparse = sparse  # some targets are IGNORE: the head runs on the others only

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None
                       for t in (self.inputs, self.targets, self.positions, self.segments)), sparse=self.sparse)

    def step(self, keep: torch.Tensor | None = None) -> Step:
        """The model's per-call state: for packed rows their positions and a causal mask within each segment."""
        if self.positions is None:
            return Step(keep=keep)
        n = self.inputs.size(1)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.inputs.device).tril()
        same = self.segments[:, :, None] == self.segments[:, None, :]
        return Step(positions=self.positions, mask=(same & causal)[:, None], keep=keep)

    def loss(self, model, scale: float = 1.0) -> torch.Tensor:
        """The summed cross-entropy over the targets, times scale; with sparse targets the head (the vocabulary
        projection and its float32 logits) runs on the target positions alone."""
        if self.sparse:
            keep = self.targets != IGNORE
            logits = model(self.inputs, self.step(keep))
            targets = self.targets[keep]
        else:
            logits, targets = model(self.inputs, self.step()).flatten(0, 1), self.targets.flatten()
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum") * scale
