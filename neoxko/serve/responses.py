"""Turning engine events into OpenAI response bodies: each choice's text (UTF-8-safe detokenising, stop
strings, the PII guard), its logprobs in the completions or the chat shape, usage, stream chunks."""

import time
import uuid
from collections import Counter

from neoxko.generate import StopStrings
from neoxko.pii.stream import PIIStream
from neoxko.serve.engine import Finished, Request
from neoxko.serve.protocol import ApiError, Job
from neoxko.serve.runs import CONSTRAINT_FAILED
from neoxko.tokenizer import Tokenizer


class Choice:
    """One choice's text as it is made: detokenised, cut at stop strings, PII-masked."""

    def __init__(self, tokenizer: Tokenizer, request: Request, job: Job, prompt_text: str):
        self.tokenizer, self.request = tokenizer, request
        self.pieces, self.stops = tokenizer.decode_stream(), StopStrings(job.stop)
        self.mask_pii = job.mask_pii
        self.guard = PIIStream() if job.mask_pii else None
        self.text = ""
        self.tokens = 0
        self.finish_reason = ""
        self.error: str | None = None
        self.want_logprobs = job.logprobs is not None
        self.lp_tokens, self.lp_values, self.lp_top, self.lp_offsets = [], [], [], []
        self.echo = prompt_text if job.echo else None
        self.offset = 0

    @property
    def masked(self) -> Counter:
        return self.guard.masked if self.guard else Counter()

    def feed(self, event) -> tuple[str, int]:
        """Take one engine event; return the new text it makes visible and where its logprobs start."""
        new, mark = "", len(self.lp_tokens)
        if self.echo is not None:  # masked as a whole with what follows, its own PII masked whatever follows
            new += self.guard.push_prompt(self.echo) if self.guard and self.echo else self.echo
            self.echo = None
        if isinstance(event, Finished):
            if self.want_logprobs and event.prompt_logprobs is not None:
                self._prepend_prompt_logprobs(event.prompt_logprobs, event.prompt_top)
                mark = 0
            reason = event.reason
            if reason.startswith("error"):
                self.error, reason = reason, "error"
            self.finish_reason = "stop" if self.stops.stopped else reason.replace("cancelled", "stop")
            tail = "" if self.stops.stopped else self.stops.push(self.pieces.flush()) + self.stops.flush()
            new += self._guarded(tail) + (self.guard.flush() if self.guard else "")
        elif not self.stops.stopped:
            self.tokens += 1
            piece = "" if event.eos else self.tokenizer.decode([event.id])
            if self.want_logprobs:
                self.lp_tokens.append(self._token_text(event.id))
                self.lp_values.append(event.logprob)
                self.lp_top.append([(self._token_text(t), v) for t, v in event.top] if event.top else None)
                self.lp_offsets.append(self.offset)
            if not event.eos:  # the end of text is in the usage and the logprobs, as vLLM has it, not the text
                self.offset += len(piece)
                new += self._guarded(self.stops.push(self.pieces.push(event.id)))
                if self.stops.stopped:
                    self.request.cancel()
        self.text += new
        return new, mark

    def _token_text(self, token: int) -> str:
        """The token as text; a piece of a UTF-8 character as its byte-level BPE symbol, so it stays distinct."""
        text = self.tokenizer.decode([token])
        return text if "\ufffd" not in text else self.tokenizer.tokenizer.id_to_token(token)

    def _guarded(self, text: str) -> str:
        return self.guard.push(text) if self.guard and text else text

    def _prepend_prompt_logprobs(self, values: list, tops: list | None) -> None:
        ids = self.request.prompt
        pieces = [self._token_text(t) for t in ids]
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        self.lp_tokens[:0], self.lp_values[:0] = pieces, values
        self.lp_top[:0] = [[(self._token_text(t), v) for t, v in top] if top else None
                           for top in (tops or [None] * len(ids))]
        self.lp_offsets = offsets + [o + at for o in self.lp_offsets]

    def completion_logprobs(self, start: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"tokens": self.lp_tokens[start:], "token_logprobs": self.lp_values[start:],
                "top_logprobs": [dict(t) if t else None for t in self.lp_top[start:]],
                "text_offset": self.lp_offsets[start:]}

    def chat_logprobs(self, start: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"content": [{"token": token, "logprob": value, "bytes": list(token.encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                              for t, v in (top or [])]}
                            for token, value, top in zip(self.lp_tokens[start:], self.lp_values[start:],
                                                         self.lp_top[start:], strict=True)]}

    def error_body(self) -> dict:
        return failure(self.error).body()["error"]


def usage(job: Job, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Responses:
    """The bodies of one response: a whole one, or its stream chunks, in the completions or the chat shape."""

    def __init__(self, job: Job, model_name: str):
        self.job, self.model = job, model_name
        self.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.job.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, choices: list[Choice]) -> dict:
        out = []
        for choice in choices:
            if self.job.chat:
                entry = {"index": choice.request.index, "message": {"role": "assistant", "content": choice.text},
                         "logprobs": choice.chat_logprobs(), "finish_reason": choice.finish_reason}
            else:
                entry = {"text": choice.text, "index": choice.request.index,
                         "logprobs": choice.completion_logprobs(), "finish_reason": choice.finish_reason}
            if choice.mask_pii:
                entry["pii_masked"] = dict(choice.masked)
            out.append(entry)
        return self._head(False) | {"choices": out, "usage": usage(self.job, choices)}

    def first_chunks(self, n_choices: int) -> list[dict]:
        """Chat streams open each choice with its role, as OpenAI's do."""
        if not self.job.chat:
            return []
        return [self._head(True) | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                for i in range(n_choices)]

    def chunk(self, choice: Choice, text: str, mark: int, finished: bool) -> dict | None:
        if not text and not finished:
            return None
        reason = choice.finish_reason if finished else None
        if self.job.chat:
            entry = {"index": choice.request.index, "delta": {"content": text} if text else {},
                     "logprobs": choice.chat_logprobs(mark), "finish_reason": reason}
        else:
            entry = {"text": text, "index": choice.request.index, "logprobs": choice.completion_logprobs(mark),
                     "finish_reason": reason}
        if finished and choice.error:  # the headers are gone: say it in the stream
            entry["error"] = choice.error_body()
        if finished and choice.mask_pii:
            entry["pii_masked"] = dict(choice.masked)
        return self._head(True) | {"choices": [entry]}

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return self._head(True) | {"choices": [], "usage": usage(self.job, choices)}


def failure(error: str) -> ApiError:
    """The error a generation that ended with `error` answers: the request's own constraint that could not go on is
    the client's (400), anything else the server's (500)."""
    if error.startswith(CONSTRAINT_FAILED):
        return ApiError(400, error.removeprefix("error: ") + "; simplify the schema, regex or grammar",
                        "structured_outputs")
    return ApiError(500, f"generation failed: {error}", kind="server_error")
