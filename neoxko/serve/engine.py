"""Continuous batching: concurrent requests share the decode steps of one batched forward.

One engine thread owns the model and its KV cache of max_batch rows. Running requests hold rows
0..n-1 (a leaving request's row is refilled by moving the last one into it), so a decode step reads
the cache as a view, with no gather. Between steps, waiting requests are prefilled into free rows
and finished or cancelled ones leave. Each request keeps its own sampling settings, generator,
repetition-penalty memory and position; its tokens go to its own queue as events.
"""

import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling, apply_repetition_penalty, sample
from neoxko.model import GPTNeoX


class QueueFull(NeoxkoError):
    """The engine's waiting queue is at its bound; retry later."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    logprobs: int | None = None  # top alternatives to report per token (0: only the chosen token's)
    prompt_logprobs: bool = False  # also the log-probabilities of the prompt tokens (for echo)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    index: int = 0  # which choice of a response it is; events carry it, so choices can share one queue

    def cancel(self) -> None:
        """Stop generating (a stop string was seen, or the client went away); the row frees at the next step."""
        self.cancelled.set()


@dataclass
class Token:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    index: int = 0


@dataclass
class Finished:
    reason: str  # "stop" (end of text), "length" (max_tokens), "cancelled" or "error: ..."
    prompt_logprobs: list[float | None] | None = None
    index: int = 0
    prompt_top: list[list[tuple[int, float]] | None] | None = None  # the top alternatives at each prompt position


class _Running:
    def __init__(self, request: Request, vocab_size: int, device):
        self.request = request
        self.position = len(request.prompt)  # the cache slot the next token takes
        self.generated = 0
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if request.sampling.repetition_penalty != 1:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, request.prompt] = True
        self.last = -1  # the token sampled last, fed at the next step
        self.done: str | None = None  # why it ends, once it does
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top: list[list[tuple[int, float]] | None] | None = None


class Engine:
    def __init__(self, model: GPTNeoX, eos_id: int | None, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None):
        self.model = model
        self.eos_id = eos_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or model.config.max_position_embeddings
        self.device = model.gpt_neox.embed_in.weight.device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[_Running] = []  # row i of the cache belongs to running[i]
        self.stats = Counter()  # requests, finished_<reason>, prompt_tokens, generated_tokens, decode_steps, ...
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="neoxko-engine", daemon=True)
        self.model.setup_cache(max_batch, self.max_len)
        self.thread.start()

    # -- client side --------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise NeoxkoError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) is more "
                              f"than the {self.max_len}-token context")
        with self.lock:
            if self.waiting.qsize() >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{self.waiting.qsize()} requests are waiting (the bound is {self.max_queue})")
            self.waiting.put(request)
            self.stats["requests"] += 1
        self.wake.set()
        return request

    def close(self) -> None:
        self._stop.set()
        self.wake.set()
        self.thread.join(timeout=10)
        self.model.clear_cache()

    @property
    def busy_rows(self) -> int:
        return len(self.running)

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # whatever fails ends the running requests, never the engine
                    self.stats["engine_errors"] += 1
                    for run in self.running:
                        run.request.events.put(Finished(f"error: {e}", index=run.request.index))
                    self.running.clear()

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._drop_cancelled()  # requests that ended at their first token
        if not self.running:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            return
        self._step()

    def _admit(self) -> None:
        while len(self.running) < self.max_batch:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            if request.cancelled.is_set():
                self.stats["finished_cancelled"] += 1
                request.events.put(Finished("cancelled", index=request.index))
                continue
            try:
                self._prefill(request)
            except Exception as e:
                request.events.put(Finished(f"error: {e}", index=request.index))

    def _prefill(self, request: Request) -> None:
        row = len(self.running)
        run = _Running(request, self.model.config.vocab_size, self.device)
        idx = torch.tensor([request.prompt], device=self.device)
        T = idx.size(1)
        hidden = self.model.hidden_states(idx, torch.arange(T, device=self.device)[None],
                                          rows=torch.tensor([row], device=self.device), kv_len=T)
        prompt_logprobs = None
        if request.prompt_logprobs:
            lp = torch.log_softmax(self.model.embed_out(hidden[0, :-1]).float(), dim=-1)  # (T - 1, vocab)
            prompt_logprobs = [None] + lp.gather(1, idx[0, 1:, None])[:, 0].tolist()
            if request.logprobs:  # what lm-eval's local-completions reads to tell a greedy continuation
                values, ids = lp.topk(request.logprobs, dim=-1)  # (T - 1, k)
                run.prompt_top = [None] + [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(),
                                                                                        strict=True)]
        logits = self.model.embed_out(hidden[:, -1])
        self.stats["prompt_tokens"] += T
        self.running.append(run)
        run.prompt_logprobs = prompt_logprobs
        self._emit(run, logits)

    def _step(self) -> None:
        runs = self.running
        tokens = torch.tensor([[r.last] for r in runs], device=self.device)
        positions = torch.tensor([[r.position] for r in runs], device=self.device)
        kv_len = int(positions.max()) + 1
        logits = self.model(tokens, positions, kv_len=kv_len)[:, -1]
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(runs)
        for run in runs:
            run.position += 1
        for i, run in enumerate(list(runs)):
            self._emit(run, logits[i:i + 1])
        self._drop_finished()

    def _emit(self, run: _Running, logits: Tensor) -> None:
        """Sample run's next token from its logits (1, vocab) and send it; mark the run done if it ends."""
        request = run.request
        raw = logits
        if run.seen is not None:
            logits = apply_repetition_penalty(logits, run.seen, request.sampling.repetition_penalty)
        token = int(sample(logits, request.sampling, run.generator)[0])
        event = Token(token, index=request.index)
        if request.logprobs is not None:
            lp = torch.log_softmax(raw.float(), dim=-1)[0]
            event.logprob = float(lp[token])
            if request.logprobs > 0:
                values, ids = lp.topk(request.logprobs)
                event.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        run.generated += 1
        if token == self.eos_id:
            run.done = "stop"
        else:
            request.events.put(event)
            self.stats["generated_tokens"] += 1
            if run.generated >= request.max_tokens:
                run.done = "length"
        if run.seen is not None:
            run.seen[0, token] = True
        run.last = token

    def _drop_finished(self) -> None:
        for run in list(self.running):
            if run.done is not None:
                self._leave(run, run.done)

    def _drop_cancelled(self) -> None:
        for run in list(self.running):
            if run.done is not None:  # ended at its first token, in _prefill
                self._leave(run, run.done)
            elif run.request.cancelled.is_set():
                self._leave(run, "cancelled")

    def _leave(self, run: _Running, reason: str) -> None:
        row, last = self.running.index(run), len(self.running) - 1
        if row != last:  # keep rows 0..n-1 dense: move the last running request into the freed row
            used = self.running[last].position
            for block in self.model.gpt_neox.layers:
                cache = block.attention.kv_cache
                cache.k[row, :, :used].copy_(cache.k[last, :, :used])
                cache.v[row, :, :used].copy_(cache.v[last, :, :used])
            self.running[row] = self.running[last]
        self.running.pop()
        self.stats[f"finished_{reason}"] += 1
        run.request.events.put(Finished(reason, run.prompt_logprobs, run.request.index, run.prompt_top))
