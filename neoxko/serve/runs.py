"""What the engine works on: a request and its settings, the events it sends back (Token, Finished), and the state
of a request the engine has admitted (Run)."""

import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling
from neoxko.serve.adapters import Adapter
from neoxko.structured import Guide

CONSTRAINT_FAILED = "error: the output constraint failed"  # a run's end when its grammar cannot go on


class QueueFull(NeoxkoError):
    """The engine's waiting queue is at its bound (or the engine is stopping); retry later."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: int | None = None  # top alternatives to report per token (0: only the chosen token's)
    prompt_logprobs: bool = False  # also the log-probabilities of the prompt tokens (for echo)
    events: queue.Queue = field(default_factory=queue.Queue)  # anything with put(event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    index: int = 0  # which choice of a response it is; events carry it, so choices can share one queue
    ignore_eos: bool = False  # the end-of-text token is a token like any other
    adapter: Adapter | None = None  # the LoRA adapter it runs with (None: the base model)
    guide: Guide | None = None  # the grammar its tokens follow (structured outputs); it ends when the grammar does

    def cancel(self) -> None:
        """Stop generating (a stop string was seen, or the client went away); the row frees at the next step."""
        self.cancelled.set()


@dataclass
class Token:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    index: int = 0
    eos: bool = False  # the end-of-text token: no text, but counted and scored (lm-eval reads its logprob)


@dataclass
class Finished:
    reason: str  # "stop" (end of text), "length" (max_tokens), "cancelled", "abort" (shutdown) or "error: ..."
    prompt_logprobs: list[float | None] | None = None
    index: int = 0
    prompt_top: list[list[tuple[int, float]] | None] | None = None  # the top alternatives at each prompt position


class Run:
    def __init__(self, request: Request, row: int, vocab_size: int, device):
        self.request = request
        self.row = row
        self.prefilled = 0  # prompt tokens in the cache
        self.position = len(request.prompt)  # the cache slot the next token takes, once decoding
        self.generated = 0
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if request.sampling.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[request.prompt] = True
        self.last = -1  # the token sampled last, fed at the next step
        self.done: str | None = None  # why it ends, once it does
        self.reused = 0  # prompt tokens copied from the prefix cache
        self.prompt_logprobs: list[float | None] | None = [None] if request.prompt_logprobs else None
        self.prompt_top: list | None = [None] if request.prompt_logprobs and request.logprobs else None
        self.slot: int | None = None  # the adapter slot it holds

    @property
    def top_k(self) -> int:
        return self.request.logprobs or 0
