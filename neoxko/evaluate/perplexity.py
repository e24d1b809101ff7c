"""Held-out perplexity of a model over packed token shards, and the unigram baseline on the same tokens.

The shards' tokens are read as one stream and cut into windows of seq_len + 1 tokens that overlap by
one, so every token after the first is predicted exactly once, from up to seq_len tokens of context.
The unigram baseline predicts every token from its training-set frequency (add-one smoothed over the
vocabulary): the floor any language model must clear.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from neoxko.data.shards import read_tokens, token_shards
from neoxko.errors import NeoxkoError


def shard_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder / "tokens" if (folder / "tokens").is_dir() else folder


def stream_tokens(folder: str | Path, max_tokens: int | None = None) -> np.ndarray:
    tokens = np.concatenate([np.asarray(read_tokens(p)) for p in token_shards(shard_folder(folder))])
    tokens = tokens[:max_tokens] if max_tokens else tokens
    if len(tokens) < 2:
        raise NeoxkoError(f"{folder} holds fewer than 2 tokens; nothing to predict")
    return tokens.astype(np.int64)


def check_tokenizer(data: str | Path, model_source: str | Path) -> str | None:
    """Refuse data tokenized by another tokenizer than the model's (its perplexity means nothing).

    The data's tokenizer is the one its `neoxko data prepare` run recorded in prepare.json (in the
    folder or up to two above it). Returns a note when that cannot be checked."""
    from neoxko.checkpoint import resolve
    from neoxko.data.shards import prepare_record
    from neoxko.tokenizer import Tokenizer, tokenizer_folder

    record = prepare_record(data)
    model_folder = resolve(model_source)
    if record is None or not (model_folder / "tokenizer.json").is_file():
        return f"not checked that {data} was tokenized with the model's tokenizer (no prepare.json beside it)"
    data_folder = tokenizer_folder(record["tokenizer"])
    theirs = Tokenizer.from_dir(data_folder).tokenizer.get_vocab()
    ours = Tokenizer.from_dir(model_folder).tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items())) // 2
        raise NeoxkoError(
            f"{data} was tokenized with {data_folder} ({len(theirs):,} tokens), which is not the model's "
            f"tokenizer ({len(ours):,} tokens, about {differ:,} entries differ); its perplexity would mean nothing. "
            "Run `neoxko data prepare` again with --tokenizer set to the model's folder"
        )
    return None


@torch.inference_mode()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, progress: bool = True) -> dict:
    """Mean cross-entropy (nats per token) and perplexity of the model over the token stream."""
    if seq_len > model.config.max_position_embeddings:
        raise NeoxkoError(f"seq_len {seq_len} is longer than the model's context "
                          f"({model.config.max_position_embeddings} tokens)")
    if int(tokens.max()) >= model.config.vocab_size:
        raise NeoxkoError(f"the shards hold token id {int(tokens.max())}, outside the model's vocabulary of "
                          f"{model.config.vocab_size}; were they prepared with this model's tokenizer?")
    device = next(model.parameters()).device
    starts = list(range(0, len(tokens) - 1, seq_len))
    total, count = 0.0, 0
    for i in tqdm(range(0, len(starts), batch_size), desc="perplexity", unit="batch", disable=not progress):
        windows = [torch.from_numpy(tokens[s:s + seq_len + 1]) for s in starts[i:i + batch_size]]
        full = [w for w in windows if len(w) == seq_len + 1]
        for group in (full, [w for w in windows if len(w) != seq_len + 1]):  # the short last window runs alone
            if group:
                batch = torch.stack(group).to(device)
                logits = model(batch[:, :-1]).float()
                total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
                count += batch[:, 1:].numel()
    loss = total / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss)}


def unigram_perplexity(train_folders: list, tokens: np.ndarray, vocab_size: int) -> dict:
    """Perplexity of add-one-smoothed training-set token frequencies on tokens[1:] (the tokens a model predicts)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for folder in train_folders:
        for shard in token_shards(shard_folder(folder)):
            counts += np.bincount(read_tokens(shard), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1) - np.log(counts.sum() + vocab_size)
    loss = float(-logp[tokens[1:]].mean())
    return {"tokens": len(tokens) - 1, "loss": loss, "perplexity": math.exp(loss), "train_tokens": int(counts.sum())}
