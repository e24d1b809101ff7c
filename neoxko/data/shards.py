"""Packed token shards as `neoxko data prepare` writes them (datatrove's .ds format), memory-mapped.

NAME.ds holds little-endian uint16 token ids, documents back to back, each ending in <|endoftext|>;
NAME.ds.index holds the uint64 token offset where each document ends.
"""

from pathlib import Path

import numpy as np

from neoxko.errors import NeoxkoError


def prepare_record(folder: str | Path) -> dict | None:
    """The settings `neoxko data prepare` recorded (prepare.json) for a folder of its output: the folder
    itself, its tokens/ or heldout/ (up to two levels below the run folder); None if there is none."""
    import json

    folder = Path(folder).resolve()
    for candidate in (folder, *list(folder.parents)[:2]):
        if (candidate / "prepare.json").is_file():
            return json.loads((candidate / "prepare.json").read_text(encoding="utf-8"))
    return None


def token_shards(folder: str | Path) -> list[Path]:
    shards = sorted(Path(folder).glob("*.ds"))
    if not shards:
        raise NeoxkoError(f"no token shards (*.ds) in {folder}; run `neoxko data prepare` first")
    return shards


def read_tokens(shard: str | Path) -> np.ndarray:
    """The shard's token ids as a read-only memory map (no copy in memory); an empty shard (a task that
    got no documents) is an empty array."""
    if Path(shard).stat().st_size == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(shard, dtype="<u2", mode="r")


def document_ends(shard: str | Path) -> np.ndarray:
    index = Path(f"{shard}.index")
    if not index.is_file():
        raise NeoxkoError(f"{index} is missing; the shard's document boundaries are unknown")
    return np.fromfile(index, dtype="<u8")


def read_documents(shard: str | Path) -> list[np.ndarray]:
    """The shard split into documents (each with its trailing end-of-text token)."""
    tokens, ends = read_tokens(shard), document_ends(shard)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [tokens[s:e] for s, e in zip(starts, ends.astype(np.int64), strict=True)]
