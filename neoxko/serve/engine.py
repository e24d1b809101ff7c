"""Continuous batching: concurrent requests share the forwards of one engine thread.

The KV cache has max_batch rows for requests plus a few rows that keep the prompts of earlier requests
(the prefix cache). Decoding requests hold rows 0..n-1 (a leaving request's row is refilled by moving
the last one into it), so a decode step reads the cache as a view, with no gather. Each iteration runs
one decode step for every decoding row and one prefill chunk: up to prefill_chunk prompt tokens of the
waiting prompts, several prompts together, so a long prompt holds the decoding rows back by at most one
chunk. A prompt that starts like a kept one copies those slots instead of computing them.

Each request keeps its own sampling settings, generator, repetition-penalty memory and position; rows
with the same settings are sampled together, each from its own generator, so every request gets the
tokens it gets alone. Tokens go to each request's own queue as events.

With adapters (AdapterSlots), a request may name a LoRA adapter: the engine places it in a slot when it admits the
request (a request whose adapter finds no free slot waits at the head of the queue), each forward runs every row
with its own adapter, and the prefix cache keeps prompts apart by adapter.
"""

import queue
import threading
import traceback
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from neoxko.errors import NeoxkoError
from neoxko.generate import apply_repetition_penalty, sample
from neoxko.model import GPTNeoX, Step
from neoxko.serve.adapters import Adapter, AdapterSlots
from neoxko.serve.prefix import PrefixCache
from neoxko.serve.runs import (  # noqa: F401 (Token, QueueFull: re-exported)
    CONSTRAINT_FAILED,
    Finished,
    QueueFull,
    Request,
    Run,
    Token,
)
from neoxko.structured import mask_logits


class Engine:
    def __init__(self, model: GPTNeoX, eos_id: int | None, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefill_chunk: int = 256, prefix_rows: int = 2, prefix_min: int = 16,
                 adapters: AdapterSlots | None = None):
        if prefill_chunk < 1:
            raise NeoxkoError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.eos_id = eos_id
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = max_len or model.config.max_position_embeddings
        self.device = model.gpt_neox.embed_in.weight.device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.blocked: list[Request] = []  # taken from the queue, waiting for an adapter slot to free (in order)
        self.adapters = adapters
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="neoxko-grammar")  # structured outputs' masks
        self._ahead: Future | None = None  # the masks it is computing for the next step
        self.running: list[Run] = []  # decoding; running[i] holds cache row i
        self.prefilling: list[Run] = []  # in any free rows, in arrival order
        self.stats = Counter()  # requests, finished_<reason>, prompt_tokens, generated_tokens, decode_steps, ...
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._abort: str | None = None
        self.last_error: str | None = None  # the traceback of the latest failure, for the log
        self.accepting = True
        self.model.setup_cache(max_batch + prefix_rows, self.max_len)
        self.prefix = PrefixCache(self._layers_kv(), first_row=max_batch, rows=prefix_rows, min_tokens=prefix_min)
        self.thread = threading.Thread(target=self._loop, name="neoxko-engine", daemon=True)
        self.thread.start()

    # -- client side --------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise NeoxkoError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) is more "
                              f"than the {self.max_len}-token context")
        with self.lock:
            if not self.accepting:
                raise QueueFull("the server is shutting down")
            if self.waiting.qsize() >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{self.waiting.qsize()} requests are waiting (the bound is {self.max_queue})")
            self.waiting.put(request)
            self.stats["requests"] += 1
        self.wake.set()
        return request

    def stop_accepting(self) -> None:
        with self.lock:
            self.accepting = False

    def abort_all(self, reason: str = "abort") -> None:
        """End every waiting and running request with `reason` at the next iteration (a shutdown's deadline)."""
        self._abort = reason
        self.wake.set()

    def close(self) -> None:
        self._stop.set()
        self.wake.set()
        self.thread.join(timeout=10)
        self._grammar_thread.shutdown(wait=False)
        self.model.clear_cache()

    @property
    def busy_rows(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def idle(self) -> bool:
        return not self.busy_rows and self.waiting.empty() and not self.blocked

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # whatever fails ends the requests it touched, never the engine
                    self._failed()
                    self._end_all(self.running + self.prefilling, f"error: {e}")

    def _iteration(self) -> None:
        if self._abort is not None:
            self._end_all(self.running + self.prefilling, self._abort)
            for request in self.blocked:
                request.events.put(Finished(self._abort, index=request.index))
            self.blocked = []
            while not self.waiting.empty():
                request = self.waiting.get_nowait()
                request.events.put(Finished(self._abort, index=request.index))
            self._abort = None
        self._drop_cancelled()
        self._admit()
        if not self.running and not self.prefilling:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            return
        if self.running:
            self._guarded(self._step, lambda: self.running)
        if self.prefilling:
            self._guarded(self._prefill_chunk, lambda: self.prefilling)

    def _guarded(self, stage, runs) -> None:
        """Run one stage; if it fails, end the runs it works on (runs() after the failure) with the error."""
        try:
            stage()
        except Exception as e:
            self._failed()
            self._end_all(runs(), f"error: {e}")

    def _failed(self) -> None:
        self.stats["engine_errors"] += 1
        self.last_error = traceback.format_exc()

    def _end_all(self, runs: list[Run], reason: str) -> None:
        for run in runs:
            self._release(run)
            run.request.events.put(Finished(reason, index=run.request.index))
            self.stats[f"finished_{reason.split(':')[0]}"] += 1
        self.running = [r for r in self.running if r not in runs]
        self.prefilling = [r for r in self.prefilling if r not in runs]
        for i, run in enumerate(self.running):  # keep rows 0..n-1 dense
            if run.row != i:
                self._move(run, i)

    def _admit(self) -> None:
        """Start waiting requests in free rows: first those waiting for an adapter slot, in order, then the queue's. A
        request whose adapter finds no slot waits aside (AdapterSlots reserves it the next slot to free) while the
        requests behind it, for the base model or resident adapters, go on."""
        blocked, self.blocked = self.blocked, []
        while self.busy_rows < self.max_batch:
            if blocked:
                request = blocked.pop(0)
            else:
                try:
                    request = self.waiting.get_nowait()
                except queue.Empty:
                    break
            if request.cancelled.is_set():
                self.stats["finished_cancelled"] += 1
                request.events.put(Finished("cancelled", index=request.index))
                continue
            slot = None
            if request.adapter is not None:
                slot = self.adapters.acquire(request.adapter)
                if slot is None:  # every slot serves running requests
                    self.blocked.append(request)
                    continue
            try:
                self.prefilling.append(self._start(request, slot))
            except Exception as e:  # this request ends with the error; the others go on
                if slot is not None:
                    self.adapters.release(slot)
                self._failed()
                self.stats["finished_error"] += 1
                request.events.put(Finished(f"error: {e}", index=request.index))
        self.blocked += blocked  # (no free row left for them this time)
        if self.adapters is not None:
            self.adapters.keep_reservations({r.adapter for r in self.blocked})

    def _start(self, request: Request, slot: int | None) -> "Run":
        """A run for request in a free row, with what the prefix cache has of its prompt already in place."""
        used = {r.row for r in self.running + self.prefilling}
        row = next(i for i in range(self.max_batch) if i not in used)
        run = Run(request, row, self.model.config.vocab_size, self.device)
        run.slot = slot
        reused = self.prefix.lookup(request.prompt, run.top_k if request.prompt_logprobs else None,
                                    _key(request.adapter))
        if reused is not None:
            entry, n = reused
            self.prefix.copy_to(entry, row, n)
            run.prefilled = run.reused = n
            if run.prompt_logprobs is not None:
                run.prompt_logprobs = entry.logprobs[:n + 1]
            if run.prompt_top is not None:
                run.prompt_top = [t[:run.top_k] if t else t for t in entry.top[:n + 1]]
            self.stats["prefix_hits"] += 1
            self.stats["prefix_cached_tokens"] += n
        self.stats["prefix_queries"] += len(request.prompt) > self.prefix.min_tokens
        return run

    def _prefill_chunk(self) -> None:
        """Up to prefill_chunk prompt tokens of the prefilling runs, oldest first, in one forward."""
        budget, parts = self.prefill_chunk, []
        for run in self.prefilling:
            if budget == 0:
                break
            n = min(len(run.request.prompt) - run.prefilled, budget)
            parts.append((run, run.prefilled, n))
            budget -= n
        T = max(n for _, _, n in parts)
        idx = torch.zeros(len(parts), T, dtype=torch.long)
        pos = torch.empty(len(parts), T, dtype=torch.long)
        for i, (run, start, n) in enumerate(parts):
            idx[i, :n] = torch.tensor(run.request.prompt[start:start + n])
            # padding takes the slots after the chunk (written over later), never one a real token holds
            pos[i] = torch.arange(start, start + T).clamp_(max=self.max_len - 1)
        kv_len = int(pos.max()) + 1
        rows = torch.tensor([run.row for run, _, _ in parts])
        self._select([run for run, _, _ in parts])
        hidden = self.model.hidden_states(idx.to(self.device), Step(input_pos=pos.to(self.device),
                                                                    rows=rows.to(self.device), kv_len=kv_len))
        self.stats["prefill_chunks"] += 1
        done, last_hidden = [], []
        for i, (run, start, n) in enumerate(parts):
            prompt = run.request.prompt
            run.prefilled += n
            self.stats["prompt_tokens"] += n
            complete = run.prefilled == len(prompt)
            if run.prompt_logprobs is not None:  # positions start+1 .. start+n predicted by this chunk
                scored = n - 1 if complete else n
                if scored:
                    lp = torch.log_softmax(self.model.embed_out(hidden[i, :scored]).float(), dim=-1)
                    target = torch.tensor(prompt[start + 1:start + 1 + scored], device=lp.device)
                    run.prompt_logprobs += lp.gather(1, target[:, None])[:, 0].tolist()
                    if run.prompt_top is not None:
                        values, ids = lp.topk(run.top_k, dim=-1)
                        run.prompt_top += [list(zip(a, b, strict=True))
                                           for a, b in zip(ids.tolist(), values.tolist(), strict=True)]
            if complete:
                done.append(run)
                last_hidden.append(hidden[i, n - 1])
        if not done:
            return
        logits = self.model.embed_out(torch.stack(last_hidden))
        for run in done:
            self.prefilling.remove(run)
            if run.reused < len(run.request.prompt) // 2:  # mostly new: keep it for later prompts like it
                self.prefix.store(run.request.prompt, run.row, run.prompt_logprobs, run.prompt_top,
                                  _key(run.request.adapter))
            self._move(run, len(self.running))
            self.running.append(run)
        self._emit(done, logits)
        self._drop_finished()

    def _step(self) -> None:
        runs = self.running
        tokens = torch.tensor([[r.last] for r in runs], device=self.device)
        positions = torch.tensor([[r.position] for r in runs], device=self.device)
        kv_len = int(positions.max()) + 1
        self._select(runs)
        logits = self.model(tokens, Step(input_pos=positions, kv_len=kv_len))[:, -1]
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(runs)
        for run in runs:
            run.position += 1
        self._emit(list(runs), logits)
        self._drop_finished()

    def _emit(self, runs: list[Run], logits: Tensor) -> None:
        """Sample each run's next token from its row of logits (B, vocab) and send it; mark the runs that end."""
        raw = logits
        penalised = [i for i, r in enumerate(runs) if r.seen is not None]
        if penalised:
            logits = logits.clone()
            for i in penalised:  # each with its own penalty; elementwise, so the same values as alone
                logits[i:i + 1] = apply_repetition_penalty(logits[i:i + 1], runs[i].seen[None],
                                                           runs[i].request.sampling.repetition_penalty)
        guided = [i for i, r in enumerate(runs) if r.request.guide is not None]
        if self._ahead is not None:  # the masks computed during the forward
            self._ahead.result()
            self._ahead = None
        failed = {}  # row -> why its grammar cannot go on: that run ends, the others go on
        if guided:  # structured outputs: the tokens a row's grammar forbids go to -inf, in that row only
            masked, dead = mask_logits(logits[guided] if len(guided) < len(runs) else logits,
                                       [runs[i].request.guide for i in guided])
            if len(guided) == len(runs):
                logits = masked
            else:
                logits = logits.clone() if logits is raw else logits
                logits[guided] = masked
            failed = {guided[j]: runs[guided[j]].request.guide.error or "no token fits" for j in dead}
        groups = defaultdict(list)  # rows with the same settings draw together, each from its own generator
        for i, run in enumerate(runs):
            s = run.request.sampling
            groups[(s.temperature, s.top_k, s.top_p)].append(i)
        tokens = [0] * len(runs)
        for members in groups.values():
            picked = sample(logits[members], runs[members[0]].request.sampling, [runs[i].generator for i in members])
            for i, token in zip(members, picked.tolist(), strict=True):
                tokens[i] = token
        scored = [i for i, r in enumerate(runs) if r.request.logprobs is not None]
        chosen, tops = {}, {}
        if scored:
            lp = torch.log_softmax(raw[scored].float(), dim=-1)
            picked = lp.gather(1, torch.tensor([tokens[i] for i in scored], device=lp.device)[:, None])[:, 0]
            chosen = dict(zip(scored, picked.tolist(), strict=True))
            k = max(runs[i].top_k for i in scored)
            if k:
                values, ids = lp.topk(k, dim=-1)
                for j, i in enumerate(scored):
                    k_i = runs[i].top_k
                    if k_i:
                        tops[i] = list(zip(ids[j, :k_i].tolist(), values[j, :k_i].tolist(), strict=True))
        for i, (run, token) in enumerate(zip(runs, tokens, strict=True)):
            request = run.request
            if request.guide is not None and i not in failed:
                try:
                    request.guide.advance(token)
                except Exception as e:  # noqa: BLE001 - the grammar's limits (llguidance's), this run's alone
                    failed[i] = str(e)
            if i in failed:
                run.done = f"{CONSTRAINT_FAILED}: {failed[i]}"
                continue
            run.generated += 1
            eos = token == self.eos_id and not request.ignore_eos
            request.events.put(Token(token, chosen.get(i), tops.get(i), request.index, eos))
            self.stats["generated_tokens"] += 1
            if eos or (request.guide is not None and request.guide.finished):
                run.done = "stop"
            elif run.generated >= request.max_tokens:
                run.done = "length"
            if run.seen is not None:
                run.seen[token] = True
            run.last = token
        guides = [r.request.guide for r in runs if r.request.guide is not None and r.done is None]
        if guides:  # the next masks, computed while the next forward runs (llguidance lets go of the GIL)
            self._ahead = self._grammar_thread.submit(lambda: [g.prefetch() for g in guides])

    def _drop_finished(self) -> None:
        for run in list(self.running):
            if run.done is not None:
                self._leave(run, run.done)

    def _drop_cancelled(self) -> None:
        for run in list(self.prefilling):
            if run.request.cancelled.is_set():
                self.prefilling.remove(run)
                self._release(run)
                self.stats["finished_cancelled"] += 1
                run.request.events.put(Finished("cancelled", index=run.request.index))
        for run in list(self.running):
            if run.done is not None:
                self._leave(run, run.done)
            elif run.request.cancelled.is_set():
                self._leave(run, "cancelled")

    def _leave(self, run: Run, reason: str) -> None:
        last = self.running[-1]
        self.running.remove(run)
        if last is not run:  # keep rows 0..n-1 dense: move the last decoding request into the freed row
            self.running.remove(last)
            self.running.insert(run.row, last)
            self._move(last, run.row)
        self._release(run)
        self.stats[f"finished_{reason.split(':')[0]}"] += 1
        run.request.events.put(Finished(reason, run.prompt_logprobs, run.request.index, run.prompt_top))

    # -- adapters -----------------------------------------------------------------------------
    def _select(self, runs: list[Run]) -> None:
        if self.adapters is not None:
            self.adapters.select([run.slot for run in runs])

    def _release(self, run: Run) -> None:
        if run.slot is not None:
            self.adapters.release(run.slot)
            run.slot = None

    # -- cache rows ---------------------------------------------------------------------------
    def _layers_kv(self) -> list:
        return [block.attention.kv_cache for block in self.model.gpt_neox.layers]

    def _move(self, run: Run, row: int) -> None:
        """Give run cache row `row`, copying its slots there; a prefilling run that holds that row swaps."""
        if run.row == row:
            return
        other = next((r for r in self.prefilling if r.row == row), None)
        used = run.position if run.prefilled == len(run.request.prompt) else run.prefilled  # slots it fills
        for cache in self._layers_kv():
            for buffer in (cache.k, cache.v):
                if other is not None:
                    held = buffer[row, :, :other.prefilled].clone()
                buffer[row, :, :used].copy_(buffer[run.row, :, :used])
                if other is not None:
                    buffer[run.row, :, :other.prefilled].copy_(held)
        if other is not None:
            other.row = run.row
        run.row = row


def _key(adapter: Adapter | None) -> int:
    """The prefix cache's key of an adapter: its keys and values differ from the base model's and from each other's."""
    return adapter.uid if adapter is not None else 0
