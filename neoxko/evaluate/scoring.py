"""Log-likelihoods of continuations, as lm-evaluation-harness computes them, for two backends.

- NeoxkoScorer: the context is computed once per document and every choice branches off it: one
  row holds [context, choice 1, choice 2, ...] with a tree-shaped attention mask (each choice sees the
  context and itself) and rotary positions that restart after the context for every choice.
  Documents are batched up to a token budget.
- HFScorer: any transformers causal LM, one row per (context, choice), batched.

Both encode as lm-evaluation-harness does: trailing spaces of the context move to the continuation,
the continuation's tokens are those of encode(context + continuation) after len(encode(context)),
and a pair longer than the window keeps its last max_length + 1 tokens.
"""

from dataclasses import dataclass

import torch

from neoxko.errors import NeoxkoError
from neoxko.model import Step


@dataclass(frozen=True)
class Item:
    """A context and its continuations, as token ids."""

    context: list[int]
    branches: list[list[int]]


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


def encode_item(encode, context: str, continuations: list[str]) -> Item:
    pairs = [encode_pair(encode, context, c) for c in continuations]
    return Item(pairs[0][0], [cont for _, cont in pairs])


def fit_window(item: Item, max_length: int) -> list[tuple[Item, list[int]]]:
    """The item as it fits the window, with the branch indices each part scores.

    One shared context when every (context, choice) fits; otherwise the context is cut from the left
    so that context + choice keeps its last max_length + 1 tokens (lm-eval's rule), once per choice length.
    """
    longest = max(len(b) for b in item.branches)
    if any(len(b) == 0 for b in item.branches):
        raise NeoxkoError("a choice encodes to no tokens; cannot score it")
    if longest > max_length:
        raise NeoxkoError(f"a choice of {longest} tokens does not fit the {max_length}-token window")
    if len(item.context) + longest <= max_length + 1:
        return [(item, list(range(len(item.branches))))]
    by_length: dict[int, list[int]] = {}
    for i, branch in enumerate(item.branches):
        by_length.setdefault(len(branch), []).append(i)
    # Choices of one token length keep the same context tokens, so they still share it.
    return [(Item(item.context[-(max_length + 1 - n):], [item.branches[i] for i in which]), which)
            for n, which in by_length.items()]


class NeoxkoScorer:
    """Scores with a neoxko GPTNeoX model, sharing each context across its choices."""

    def __init__(self, model, tokenizer, batch_tokens: int = 4096):
        self.model, self.tokenizer, self.batch_tokens = model, tokenizer, batch_tokens
        self.max_length = model.config.max_position_embeddings

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def loglikelihoods(self, items: list[Item], progress=None, greedy: bool = False) -> list[list]:
        """Each branch's log-likelihood; with greedy, (log-likelihood, whether greedy decoding gives the branch)."""
        parts = [(n, part, which) for n, item in enumerate(items) for part, which in fit_window(item, self.max_length)]
        results = [[0.0] * len(item.branches) for item in items]
        # Longest first: the batch size settles early and padding stays small.
        parts.sort(key=lambda p: -_row_length(p[1]))
        for batch in _batches(parts, self.batch_tokens, lambda p: _row_length(p[1])):
            scores = self._score_rows([p[1] for p in batch], greedy)
            for (n, _, which), row_scores in zip(batch, scores, strict=True):
                for i, score in zip(which, row_scores, strict=True):
                    results[n][i] = score
            if progress is not None:
                progress.update(len(batch))
        return results

    @torch.inference_mode()
    def _score_rows(self, rows: list[Item], greedy: bool = False) -> list[list]:
        device = self.model.gpt_neox.embed_in.weight.device
        T = max(_row_length(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        positions = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.eye(T, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself
        picks, targets, owners = [], [], []  # (row, column) predicting each scored token
        for r, item in enumerate(rows):
            n = len(item.context)
            idx[r, :n] = torch.tensor(item.context)
            positions[r, :n] = torch.arange(n)
            mask[r, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            start = n
            for b, branch in enumerate(item.branches):
                m = len(branch) - 1  # the last token is only a target
                cols = torch.arange(start, start + m)
                idx[r, cols] = torch.tensor(branch[:-1], dtype=torch.long)
                positions[r, cols] = torch.arange(n, n + m)
                mask[r, start:start + m, :n] = True
                mask[r, start:start + m, start:start + m] = torch.ones(m, m, dtype=torch.bool).tril()
                # the context's last token predicts the first choice token, each choice token the next
                sources = [n - 1] + list(range(start, start + m))
                picks += [(r, c) for c in sources]
                targets += branch
                owners += [(r, b)] * len(branch)
                start += m
        if all(len(item.branches) == 1 for item in rows):
            hidden = self.model.hidden_states(idx.to(device))  # plain causal rows: SDPA's fast causal path
        else:
            hidden = self.model.hidden_states(idx.to(device), Step(positions=positions.to(device),
                                                                   mask=mask[:, None].to(device)))
        rows_i, cols_i = zip(*picks, strict=True)
        h = hidden[torch.tensor(rows_i, device=device), torch.tensor(cols_i, device=device)]
        logprobs = torch.log_softmax(self.model.embed_out(h).float(), dim=-1)
        target = torch.tensor(targets, device=device)
        token_lp = logprobs.gather(1, target[:, None])[:, 0].tolist()
        out = [[0.0] * len(item.branches) for item in rows]
        for (r, b), lp in zip(owners, token_lp, strict=True):
            out[r][b] += lp
        if not greedy:
            return out
        hits = (logprobs.argmax(-1) == target).tolist()
        best = [[True] * len(item.branches) for item in rows]
        for (r, b), hit in zip(owners, hits, strict=True):
            best[r][b] &= hit
        return [list(zip(lls, flags, strict=True)) for lls, flags in zip(out, best, strict=True)]


class HFScorer:
    """Scores with any transformers causal LM: one row per (context, choice), right-padded batches."""

    def __init__(self, model, tokenizer, batch_tokens: int = 4096):
        self.model, self.tokenizer, self.batch_tokens = model, tokenizer, batch_tokens
        config = model.config
        self.max_length = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                                if getattr(config, k, None)), 2048)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihoods(self, items: list[Item], progress=None) -> list[list[float]]:
        rows = []
        for n, item in enumerate(items):
            for i, branch in enumerate(item.branches):
                full = (item.context + branch)[-(self.max_length + 1):]
                rows.append((n, i, full[:-1], branch))
        results = [[0.0] * len(item.branches) for item in items]
        rows.sort(key=lambda r: -len(r[2]))
        for batch in _batches(rows, self.batch_tokens, lambda r: len(r[2])):
            for (n, i, _, _), score in zip(batch, self._score(batch), strict=True):
                results[n][i] = score
            if progress is not None:
                progress.update(len(batch))
        return results

    @torch.inference_mode()
    def _score(self, batch) -> list[float]:
        device = next(self.model.parameters()).device
        T = max(len(r[2]) for r in batch)
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        attention = torch.zeros(len(batch), T, dtype=torch.long)
        for j, (_, _, inp, _) in enumerate(batch):
            idx[j, :len(inp)] = torch.tensor(inp)
            attention[j, :len(inp)] = 1
        logits = self.model(input_ids=idx.to(device), attention_mask=attention.to(device)).logits.float()
        scores = []
        for j, (_, _, inp, cont) in enumerate(batch):
            lp = torch.log_softmax(logits[j, len(inp) - len(cont):len(inp)], dim=-1)
            scores.append(lp.gather(1, torch.tensor(cont, device=device)[:, None]).sum().item())
        return scores


def _row_length(item: Item) -> int:
    return len(item.context) + sum(len(b) - 1 for b in item.branches)


def _batches(rows: list, budget: int, length):
    """Consecutive groups whose padded size (rows x longest) stays within budget tokens."""
    batch, longest = [], 0
    for row in rows:
        size = length(row)
        if batch and max(longest, size) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(row)
        longest = max(longest, size)
    if batch:
        yield batch
