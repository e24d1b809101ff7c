"""Text generation: sampling, prefill, cached decoding, streaming with stop strings."""

import functools
import math
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from neoxko.errors import GenerationError
from neoxko.model import GPTNeoX, Step
from neoxko.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise GenerationError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 (or unset for no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


NUCLEUS_PROBE = 256


def sample(logits: Tensor, sampling: Sampling,
           generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """Pick one token per row from logits (B, vocab); returns (B,).

    generator may be one per row: each row then draws from its own, exactly as it would alone (the server
    samples the rows of a batch together, each request with its own seed)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    # Shifted so the best logit is 0 before dividing: any positive temperature, however small, gives
    # finite logits (the others go to -inf, a draw among the best), never inf - inf = NaN.
    logits = logits.float().clamp(max=torch.finfo(torch.float32).max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    candidates = None
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, sampling.top_k, dim=-1)  # (B, k): draw among k, not the vocab
    elif sampling.top_p < 1 and logits.size(-1) > NUCLEUS_PROBE:
        # The nucleus is nearly always within the most likely few hundred tokens; sorting those instead
        # of the whole vocabulary is the same draw, 20x faster. Fall back to the vocabulary if not.
        top, ids = torch.topk(logits, NUCLEUS_PROBE, dim=-1)
        if bool((torch.softmax(logits, dim=-1).gather(-1, ids).sum(-1) >= sampling.top_p).all()):
            logits, candidates = top, ids
    if sampling.top_p < 1:
        logits = _top_p(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Inverse-CDF draw: one uniform number per row and a search in the running sum (in float64, so
    # rounding never moves a boundary noticeably); no host sync, and far cheaper on a CPU than drawing
    # a noise value for every vocabulary entry. right=True never lands on a zero-probability token.
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    if isinstance(generator, list):
        u = torch.cat([torch.rand((1, 1), generator=g, device=probs.device, dtype=torch.float64) for g in generator])
    else:
        u = torch.rand((probs.size(0), 1), generator=generator, device=probs.device, dtype=torch.float64)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1)[:, 0]
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p  # the most likely token always stays (its mass_before is 0)
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided (or, if < 0, multiplied).
    Computed in float64 and clipped to float32's range, so extreme penalties stay finite."""
    wide = logits.double()
    penalised = torch.where(wide < 0, wide * penalty, wide / penalty)
    limit = torch.finfo(torch.float32).max
    return torch.where(seen, penalised.clamp(-limit, limit).to(logits.dtype), logits)


def prefill(model: GPTNeoX, idx: Tensor, left_pad: Tensor | None) -> Tensor:
    """Run the prompts (B, T) through the model, filling the cache; logits of the last position (B, vocab)."""
    input_pos = torch.arange(idx.size(1), device=idx.device)
    return model.embed_out(model.hidden_states(idx, Step(input_pos=input_pos, left_pad=left_pad))[:, -1])


def decode_one_token(model: GPTNeoX, token: Tensor, input_pos: Tensor, left_pad: Tensor | None) -> Tensor:
    """Feed one token per row (B,) at cache slot input_pos (1,); logits (B, vocab)."""
    return model(token[:, None], Step(input_pos=input_pos, left_pad=left_pad))[:, -1]


@functools.cache
def compiled_decode_one_token():
    """decode_one_token through torch.compile, with batch-1 matrix-vector products as fused reductions.

    torch's CPU matrix-vector kernels reach about half the memory bandwidth (fp32 on one core);
    inductor's decompose_mm_pass turns them into multi-threaded reductions, near 2x faster on CPU.
    It is read when inductor first loads its passes, so set it before anything is compiled.
    """
    import torch._inductor.config

    options = torch._inductor.config.post_grad_fusion_options
    options.setdefault("decompose_mm_pass", {"cpu_max_other_dimension_decomposition": 1 << 20})
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False)


@torch.inference_mode()
def generate_tokens(model: GPTNeoX, prompts: list[list[int]], max_new_tokens: int,
                    sampling: Sampling = Sampling(), eos_id: int | None = None,
                    compile: bool = False, guides: list | None = None) -> Iterator[Tensor]:
    """Yield the next token of every prompt, (B,), step by step.

    Prompts of different lengths are left-padded. Stops after max_new_tokens, when every row has
    produced eos_id, or when the context window is full (with a warning). compile=True compiles the
    batch-1 decode step (tens of seconds once per model, then about 1.5-2x faster on CPU); batches
    decode eagerly, where torch's matrix-matrix kernels are already the faster choice. guides (one
    structured.Guide per prompt) hold each row to its grammar; a row whose grammar is complete gives eos_id
    from then on.
    """
    idx, left_pad = _left_pad(model, prompts)
    B, T = idx.shape
    budget = _token_budget(model, T, max_new_tokens)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(sampling.seed)
    seen = _seen_tokens(model, idx, left_pad) if sampling.repetition_penalty != 1 else None
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    decode = decode_one_token
    cache_len = T + budget
    if compile and B == 1:
        decode = compiled_decode_one_token()
        # Rounded up so that prompts of other lengths reuse the compiled graph (the mask hides the rest).
        cache_len = min(-(-cache_len // 256) * 256, model.config.max_position_embeddings)
    model.setup_cache(B, cache_len)
    try:
        logits = prefill(model, idx, left_pad)
        for step in range(budget):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
            if guides is not None:
                logits = _guided(logits, guides, done, eos_id)
            token = sample(logits, sampling, generator)
            if guides is not None:
                token = _advance(guides, token, done, eos_id)
            yield token
            if eos_id is not None:
                done |= token == eos_id
            if step == budget - 1 or bool(done.all()):
                return
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            logits = decode(model, token, torch.tensor([T + step], device=idx.device), left_pad)
    finally:
        model.clear_cache()


def _guided(logits: Tensor, guides: list, done: Tensor, eos_id: int | None) -> Tensor:
    """The logits of the rows still generating, masked to what each row's grammar allows."""
    from neoxko.structured import mask_logits

    live = [i for i, g in enumerate(guides) if not done[i] and not g.finished]
    if live:
        logits = logits.clone()
        logits[live], dead = mask_logits(logits[live], [guides[i] for i in live])
        if dead:
            raise GenerationError(f"the output constraint failed: {guides[live[dead[0]]].error or 'no token fits'}")
    return logits


def _advance(guides: list, token: Tensor, done: Tensor, eos_id: int | None) -> Tensor:
    """Move each live row's guide on by its token; a row whose grammar was already complete gets eos_id."""
    token = token.clone()
    for i, guide in enumerate(guides):
        if done[i]:
            continue
        if guide.finished:
            if eos_id is None:
                raise GenerationError("structured generation needs an end-of-text token to end a row")
            token[i] = eos_id
        else:
            guide.advance(int(token[i]))
    return token


def _left_pad(model: GPTNeoX, prompts: list[list[int]]) -> tuple[Tensor, Tensor | None]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token; got an empty prompt")
    window, vocab = model.config.max_position_embeddings, model.config.vocab_size
    lengths = [len(p) for p in prompts]
    if max(lengths) > window:
        raise GenerationError(
            f"the prompt is {max(lengths)} tokens but the model's context window is {window}; shorten it"
        )
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise GenerationError(f"prompt token ids must be in [0, {vocab}); is the tokenizer the model's own?")
    T = max(lengths)
    device = model.gpt_neox.embed_in.weight.device
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    if min(lengths) == T:
        return idx, None
    return idx, torch.tensor([T - n for n in lengths], device=device)


def _token_budget(model: GPTNeoX, prompt_len: int, max_new_tokens: int) -> int:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    window = model.config.max_position_embeddings
    room = window - prompt_len
    if room < 1:
        raise GenerationError(
            f"the prompt fills the whole {window}-token context window ({prompt_len} tokens); "
            "shorten it to leave room for new tokens"
        )
    if max_new_tokens > room:
        warnings.warn(
            f"the prompt ({prompt_len} tokens) leaves room for {room} new tokens in the {window}-token "
            f"window; generating {room}, not {max_new_tokens}",
            stacklevel=3,
        )
    return min(max_new_tokens, room)


def _seen_tokens(model: GPTNeoX, idx: Tensor, left_pad: Tensor | None) -> Tensor:
    seen = torch.zeros(idx.size(0), model.config.vocab_size, dtype=torch.bool, device=idx.device)
    real = torch.ones_like(idx, dtype=torch.bool)
    if left_pad is not None:
        real = torch.arange(idx.size(1), device=idx.device)[None, :] >= left_pad[:, None]
    return seen.scatter_(1, idx, real)


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is safe to emit now; sets .stopped once a stop string has appeared."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of text that is a proper start of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def stream(model: GPTNeoX, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128,
           sampling: Sampling = Sampling(), stop: list[str] | None = None, compile: bool = False,
           **constraint) -> Iterator[str]:
    """Yield the continuation of prompt as text pieces, each of whole UTF-8 characters. constraint: one of
    json_schema, regex, choice or grammar (see generate)."""
    pieces, stops = tokenizer.decode_stream(), StopStrings(stop)
    eos_id = _eos_id(model, tokenizer)
    guides = _guides(model, tokenizer, constraint, 1)
    tokens = generate_tokens(model, [tokenizer.encode(prompt)], max_new_tokens, sampling, eos_id, compile, guides)
    for token in tokens:
        if int(token[0]) == eos_id:
            break
        text = stops.push(pieces.push(int(token[0])))
        if text:
            yield text
        if stops.stopped:
            return
    if tail := stops.push(pieces.flush()) + stops.flush():
        yield tail


def generate(model: GPTNeoX, tokenizer: Tokenizer, prompt: str | list[str], max_new_tokens: int = 128,
             sampling: Sampling = Sampling(), stop: list[str] | None = None, compile: bool = False,
             *, json_schema: dict | str | bool | None = None, regex: str | None = None, choice: list[str] | None = None,
             grammar: str | None = None) -> str | list[str]:
    """The continuation of a prompt, or of each prompt in a list (generated as one batch).

    At most one of json_schema (a JSON schema, or True for any JSON object), regex, choice (a list of strings) or
    grammar (Lark, or GBNF) holds the output to it (neoxko.structured); it ends when the constraint is complete."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    eos_id = _eos_id(model, tokenizer)
    ids = [tokenizer.encode(p) for p in prompts]
    guides = _guides(model, tokenizer, dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar),
                     len(prompts))
    steps = list(generate_tokens(model, ids, max_new_tokens, sampling, eos_id, compile, guides))
    outputs = []
    for row in torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]:
        if eos_id in row:
            row = row[: row.index(eos_id)]
        text = tokenizer.decode(row)
        cuts = [i for i in (text.find(s) for s in (stop or []) if s) if i >= 0]
        outputs.append(text[: min(cuts)] if cuts else text)
    return outputs[0] if isinstance(prompt, str) else outputs


def _guides(model: GPTNeoX, tokenizer: Tokenizer, constraint: dict, rows: int) -> list | None:
    """A guide per row for the one constraint given (json_schema, regex, choice, grammar), or None."""
    given = {k: v for k, v in constraint.items() if v is not None and v is not False}
    unknown = set(constraint) - {"json_schema", "regex", "choice", "grammar"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    if not given:
        return None
    if len(given) > 1:
        raise GenerationError(f"give one constraint, not {', '.join(sorted(given))}")
    from neoxko.structured import Constraint, Grammars

    (name, spec), = given.items()
    spec = {"type": "object"} if spec is True else spec
    kind = {"json_schema": "json"}.get(name, name)
    grammars = Grammars(tokenizer, model.config.vocab_size)
    grammar = grammars.compile(Constraint.of(kind, spec))
    return [grammars.guide(grammar) for _ in range(rows)]


def _eos_id(model: GPTNeoX, tokenizer: Tokenizer) -> int | None:
    return tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id


class _CallableModule(types.ModuleType):
    """`neoxko.generate` names both this module and its generate(): once the module is imported (`from
    neoxko.generate import stream`), Python binds the package attribute to the module, so the module calls
    generate() too, and `neoxko.generate(model, tokenizer, prompt)` works whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
