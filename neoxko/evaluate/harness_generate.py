"""generate_until for the lm-eval model: lm-eval's generation arguments, and batched decoding with stop strings."""

from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling, generate_tokens

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default


def parse_gen_kwargs(gen_kwargs: dict, eos: str) -> tuple[list[str], int, Sampling]:
    """(until, max_gen_toks, sampling) as lm-eval's hf model reads a request's generation arguments: `until` a string
    or a list (the end-of-text text is added), greedy unless do_sample (or a temperature above 0 without it)."""
    if not isinstance(gen_kwargs, dict):
        raise NeoxkoError(f"generate_until's arguments must be a dict, got {type(gen_kwargs).__name__}")
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    if isinstance(until, str):
        until = [until]
    elif until is None:
        until = []
    elif not isinstance(until, list | tuple):
        raise NeoxkoError(f"'until' must be a string or a list of strings, got {until!r}")
    until = list(until) + ([eos] if eos not in until else [])
    max_gen_toks = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature > 0
    if not do_sample:
        return until, max_gen_toks, Sampling()
    return until, max_gen_toks, Sampling(temperature=temperature or 1.0, top_k=kwargs.get("top_k") or None,
                                         top_p=float(kwargs.get("top_p", 1.0)), seed=kwargs.get("seed"))


def generate_batch(model, tokenizer, prompts: list[list[int]], until: list[str], max_gen_toks: int,
                   sampling: Sampling) -> list[str]:
    """Each prompt's continuation, decoded as lm-eval's hf model decodes it (special tokens skipped) and cut at the
    first of the stop strings; a row stops at the end-of-text token or once its text holds a stop string."""
    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    window = model.config.max_position_embeddings
    budget = min(max_gen_toks, window - max(len(p) for p in prompts))
    if budget >= 1:
        for step in generate_tokens(model, prompts, budget, sampling, eos_id=tokenizer.eos_id):
            for row, token in enumerate(step.tolist()):
                if stopped[row]:
                    continue
                if token == tokenizer.eos_id:
                    stopped[row] = True
                    continue
                tokens[row].append(token)
                text = tokenizer.decode(tokens[row][-64:])  # a stop string ends within the last tokens
                stopped[row] = any(term and term in text for term in until)
            if all(stopped):
                break
    out = []
    for row_tokens in tokens:
        text = tokenizer.decode(row_tokens, skip_special_tokens=True)
        for term in until:
            if term:
                text = text.split(term)[0]
        out.append(text)
    return out
