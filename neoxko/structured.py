"""Structured outputs: generation held to a JSON schema, any JSON object, a regex, a choice of strings, or a grammar
(Lark, or the GBNF that llama.cpp and vLLM's xgrammar take), through llguidance.

At each step a sequence's Guide gives the tokens its grammar allows next as a bitmask; `mask_logits` sets the others
to -inf in that sequence's row only, so the sampler (greedy, top-k, top-p, seeded) picks among allowed tokens, and the
chosen token moves the guide on. Byte-level BPE tokens that split a Hangul syllable are handled by llguidance, which
matches the grammar on bytes. Once the grammar is complete the guide is `finished`: the sequence ends there.

Why llguidance (benchmarks/grammar_engines.py, on this project's 2-core Xeon, Polyglot-Ko's tokenizer): per token it
costs 17-40 us (p50) against xgrammar's 9-12 us and outlines-core's 9 us, with 0.2-2.3 ms for a grammar's first state;
all three are far below one decode step (several ms for ko-small's batch, ~100 ms for 1.3B), so the per-token cost
does not decide. llguidance is a 3 MB wheel with no dependencies, while xgrammar's pulls triton, transformers and
tvm-ffi, and outlines-core compiles regexes only (no grammars) and took 40 ms to index a JSON schema. JSON is generated
compact (no free whitespace, which a weak model can fill its whole budget with), unless the schema's own
"x-guidance" options say otherwise.
"""

import functools
import json
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from neoxko.errors import NeoxkoError

KINDS = ("json", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(NeoxkoError):
    """A constraint that cannot be compiled: an invalid schema, regex or grammar, or an empty choice."""


@dataclass(frozen=True)
class Constraint:
    """What a request holds its output to. kind json: spec is a JSON schema (a dict, or its text; {"type": "object"}
    for any object); regex: a regular expression the whole output matches; choice: a tuple of strings, one of which
    is the output; grammar: a Lark grammar, or GBNF (rules written `name ::= ...`)."""

    kind: str
    spec: str  # JSON text for a schema, the regex, the grammar, or a JSON list of the choices

    @classmethod
    def of(cls, kind: str, spec) -> "Constraint":
        if kind not in KINDS:
            raise GrammarError(f"unknown constraint {kind!r}; use one of {', '.join(KINDS)}")
        if kind == "json":
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(spec, dict | bool):
                raise GrammarError(f"a JSON schema is an object, got {type(spec).__name__}")
            return cls(kind, json.dumps(spec, ensure_ascii=False))  # (key order kept: properties come in it)
        if kind == "choice":
            if isinstance(spec, str) or not isinstance(spec, list | tuple) or not spec or \
                    not all(isinstance(c, str) and c for c in spec):
                raise GrammarError("choice must be a list of one or more non-empty strings")
            return cls(kind, json.dumps(list(spec), ensure_ascii=False))
        if not isinstance(spec, str) or not spec:
            raise GrammarError(f"{kind} must be a non-empty string")
        return cls(kind, spec)

    def grammar(self) -> str:
        """The constraint as an llguidance grammar (not yet checked: Grammars.compile checks it)."""
        from llguidance import LLMatcher

        if self.kind == "json":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return LLMatcher.grammar_from_regex("(" + "|".join(re.escape(c) for c in json.loads(self.spec)) + ")")
        if re.search(r"^\s*[\w-]+\s*::=", self.spec, re.MULTILINE):  # GBNF (llama.cpp, vLLM's xgrammar)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                return LLMatcher.grammar_from_lark(gbnf_to_lark(self.spec))
            except Exception as e:  # (its parser raises plain exceptions)
                raise GrammarError(f"the GBNF grammar cannot be read: {e}") from None
        return LLMatcher.grammar_from_lark(self.spec)


class Guide:
    """One sequence's place in its grammar. The allowed tokens of its current state can be computed ahead
    (`prefetch`, in any thread: llguidance releases the GIL), so that `fill` at the sampling step only copies them."""

    def __init__(self, matcher, words: int):
        self.matcher, self.words = matcher, words
        self.ahead: np.ndarray | None = None  # the mask of the current state, computed ahead

    def prefetch(self) -> None:
        if self.ahead is None and not self.matcher.is_stopped() and not self.matcher.is_error():
            ahead = np.empty(self.words, dtype=np.int32)
            self.matcher.unsafe_compute_mask_ptr(ahead.ctypes.data, ahead.nbytes)
            self.ahead = ahead

    @property
    def error(self) -> str | None:
        """Why the grammar cannot go on (llguidance's limits, or nothing it allows), first line; None while it can."""
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error().strip().splitlines()[0][:300]

    def fill(self, bitmask: np.ndarray) -> None:
        """Write the allowed next tokens into bitmask ((vocab + 31) // 32 int32 words, contiguous)."""
        if self.ahead is not None:
            bitmask[:] = self.ahead
        else:
            self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def advance(self, token: int) -> None:
        self.ahead = None
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {self.error}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.matcher.is_stopped()


class Grammars:
    """Compiles constraints for one tokenizer and vocabulary (the model's, padding included) and makes guides."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import llguidance
        except ImportError:
            raise GrammarError("structured outputs need llguidance: pip install llguidance") from None
        self.llguidance = llguidance
        self.vocab_size = vocab_size
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._compile = functools.lru_cache(maxsize=256)(self._checked)

    def compile(self, constraint: Constraint) -> str:
        """The constraint's grammar, checked against this tokenizer (cached: a schema sent again costs nothing)."""
        return self._compile(constraint)

    def _checked(self, constraint: Constraint) -> str:
        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise GrammarError(f"the {constraint.kind} constraint is invalid: {e}") from None
        problem = self.llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise GrammarError(f"the {constraint.kind} constraint is invalid: {problem.strip()}")
        return grammar

    def guide(self, grammar: str) -> Guide:
        """A new sequence's guide, its first mask computed (the costliest: 0.3-3 ms), here rather than at sampling."""
        matcher = self.llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot start: {matcher.get_error()}")
        guide = Guide(matcher, (self.vocab_size + 31) // 32)
        guide.prefetch()
        if guide.error is not None:  # e.g. a regex no text matches: not even a first token is allowed
            raise GrammarError(f"the constraint allows no output: {guide.error}")
        return guide


def mask_logits(logits: Tensor, guides: list[Guide]) -> tuple[Tensor, list[int]]:
    """(logits (len(guides), vocab) with every token its row's guide forbids at -inf (a new tensor), the rows whose
    guide failed or allows no token: those rows are left unmasked, so that the batch samples no NaN, and must end)."""
    bitmask = np.empty((len(guides), (logits.size(-1) + 31) // 32), dtype=np.int32)
    for row, guide in enumerate(guides):
        guide.fill(bitmask[row])
    dead = [row for row, guide in enumerate(guides) if guide.error is not None or not bitmask[row].any()]
    bitmask[dead] = -1
    # bit i of 32-bit word w is token 32 w + i: little-endian words, so the bytes unpack little-end first in order
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, count=logits.size(-1), bitorder="little").view(np.bool_)
    return torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf")), dead
