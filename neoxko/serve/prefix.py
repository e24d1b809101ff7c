"""Prefix caching: the KV slots of recent prompts, kept in spare cache rows, so that a prompt that starts
the same way (a few-shot header, a chat system prompt, lm-eval's context for each choice) copies those
slots instead of computing them again.

Entries are whole prompts in least-recently-used order. A lookup finds the longest common prefix with any
entry and reuses all of it but its last token: the token after the reused slots is always computed, so
its logits (and the prompt log-probabilities that echo asks for) come from a forward as usual. Echoed
log-probabilities of the reused positions come from the entry, so an entry without them (or with fewer
top alternatives) serves only requests that do not ask for them.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)  # entries are compared by identity (their tokens are arrays)
class Entry:
    tokens: np.ndarray
    row: int
    logprobs: list | None
    top: list | None  # top alternatives at each position, or None
    top_k: int
    key: int = 0  # the adapter the slots were computed with (0: the base model)


class PrefixCache:
    def __init__(self, caches: list, first_row: int, rows: int, min_tokens: int = 16):
        self.caches = caches  # each layer's KVCache
        self.free = list(range(first_row, first_row + rows))
        self.entries: list[Entry] = []  # least recently used first
        self.min_tokens = min_tokens

    def lookup(self, prompt: list[int], need_k: int | None, key: int = 0) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with prompt, and how many slots to copy (None if too few).

        need_k None: the request wants no prompt log-probabilities; else it wants them with need_k
        alternatives each. key: the adapter the prompt runs with; only its entries serve it."""
        if not self.entries or len(prompt) <= self.min_tokens:
            return None
        tokens = np.asarray(prompt)
        best, best_n = None, 0
        for entry in self.entries:
            if entry.key != key:
                continue
            if need_k is not None and (entry.logprobs is None or entry.top_k < need_k):
                continue
            m = min(len(tokens), len(entry.tokens))
            differ = np.flatnonzero(tokens[:m] != entry.tokens[:m])
            common = int(differ[0]) if differ.size else m
            if common > best_n:
                best, best_n = entry, common
        n = min(best_n - 1, len(prompt) - 1)
        if best is None or n < self.min_tokens:
            return None
        self.entries.remove(best)
        self.entries.append(best)
        return best, n

    def copy_to(self, entry: Entry, row: int, n: int) -> None:
        for cache in self.caches:
            cache.k[row, :, :n].copy_(cache.k[entry.row, :, :n])
            cache.v[row, :, :n].copy_(cache.v[entry.row, :, :n])

    def store(self, prompt: list[int], row: int, logprobs: list | None, top: list | None, key: int = 0) -> None:
        """Keep the prompt now in cache row `row` (its slots 0..len-1), evicting the least recently used."""
        if len(prompt) <= self.min_tokens or not (self.free or self.entries):
            return
        into = self.free.pop() if self.free else self.entries.pop(0).row
        n = len(prompt)
        for cache in self.caches:
            cache.k[into, :, :n].copy_(cache.k[row, :, :n])
            cache.v[into, :, :n].copy_(cache.v[row, :, :n])
        top_k = len(next((t for t in top if t), [])) if top else 0
        self.entries.append(Entry(np.asarray(prompt), into, list(logprobs) if logprobs else None,
                                  list(top) if top else None, top_k, key))
