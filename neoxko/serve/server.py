"""`neoxko serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health,
GET /metrics (Prometheus text), and vLLM's GET /tokenizer_info, POST /tokenize and POST /detokenize
(lm-eval's local-completions finds a remote tokenizer through them). Python's own threading HTTP
server: a thread per connection turns the engine's token events into text (UTF-8-safe detokenising,
stop strings, the PII guard), while the one engine thread runs the batched forwards. Every error is
an OpenAI-shaped JSON body.
"""

import dataclasses
import json
import math
import queue
import select
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from neoxko.data.pii import PIIStream
from neoxko.errors import NeoxkoError
from neoxko.generate import Sampling, StopStrings
from neoxko.serve.engine import Engine, Finished, QueueFull, Request
from neoxko.tokenizer import Tokenizer

UNSUPPORTED = {"best_of": 1, "logit_bias": None, "suffix": None, "frequency_penalty": 0, "presence_penalty": 0}
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "ko-small"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    mask_pii: bool = False  # mask PII in every response (a request can also ask with "mask_pii": true)


@dataclass
class Completion:
    """What one request asks for, validated."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    n: int
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    mask_pii: bool


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.responses: Counter = Counter()  # by (path, status)
        self.pii: Counter = Counter()
        self.latency_sum, self.latency_count = 0.0, 0
        self.buckets = [0] * len(LATENCY_BUCKETS)

    def response(self, path: str, status: int) -> None:
        with self.lock:
            self.responses[(path, status)] += 1

    def completed(self, seconds: float, masked: Counter) -> None:
        with self.lock:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                self.buckets[i] += seconds <= bound
            self.pii.update(masked)

    def render(self, engine: Engine) -> str:
        lines = ["# TYPE neoxko_http_responses_total counter"]
        with self.lock:
            for (path, status), count in sorted(self.responses.items()):
                lines.append(f'neoxko_http_responses_total{{path="{path}",status="{status}"}} {count}')
            lines.append("# TYPE neoxko_request_seconds histogram")
            for bound, count in zip(LATENCY_BUCKETS, self.buckets, strict=True):
                lines.append(f'neoxko_request_seconds_bucket{{le="{bound}"}} {count}')
            lines += [f'neoxko_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                      f"neoxko_request_seconds_sum {self.latency_sum:.6f}",
                      f"neoxko_request_seconds_count {self.latency_count}",
                      "# TYPE neoxko_pii_masked_total counter"]
            for label in ("tel", "acc", "rrn"):
                lines.append(f'neoxko_pii_masked_total{{label="{label}"}} {self.pii[label]}')
        stats = dict(engine.stats)
        for key in ("requests", "prompt_tokens", "generated_tokens", "decode_steps", "decode_rows",
                    "rejected_queue_full", "finished_stop", "finished_length", "finished_cancelled"):
            lines += [f"# TYPE neoxko_engine_{key}_total counter", f"neoxko_engine_{key}_total {stats.get(key, 0)}"]
        lines += ["# TYPE neoxko_running_requests gauge", f"neoxko_running_requests {engine.busy_rows}",
                  "# TYPE neoxko_waiting_requests gauge", f"neoxko_waiting_requests {engine.waiting.qsize()}",
                  "# TYPE neoxko_batch_rows gauge", f"neoxko_batch_rows {engine.max_batch}"]
        return "\n".join(lines) + "\n"


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the listen backlog; socketserver's 5 refuses bursts of connections

    def __init__(self, address: tuple[str, int], engine: Engine, tokenizer: Tokenizer, settings: ServeSettings):
        super().__init__(address, Handler)
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.metrics = Metrics()
        self.started = int(time.time())

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.engine.close()


class Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"
    server_version = "neoxko"
    timeout = 30  # seconds a socket read may wait: a stalled client cannot hold a thread for ever

    def log_message(self, format: str, *args) -> None:  # quiet: /metrics counts responses
        pass

    # -- routing ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        routes = {("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics,
                  ("GET", "/v1/models"): self._models, ("POST", "/v1/completions"): self._completions,
                  ("GET", "/tokenizer_info"): self._tokenizer_info, ("POST", "/tokenize"): self._tokenize,
                  ("POST", "/detokenize"): self._detokenize}
        try:
            if (method, path) not in routes:
                known = {p for _, p in routes}
                if path in known:
                    raise ApiError(405, f"{method} is not allowed on {path}")
                raise ApiError(404, f"no route {method} {path}; the routes are POST /v1/completions, "
                                    "GET /v1/models, GET /health, GET /metrics, GET /tokenizer_info, POST /tokenize "
                                    "and POST /detokenize", code="not_found")
            if path.startswith("/v1/") or path in ("/tokenizer_info", "/tokenize", "/detokenize"):
                self._authorise()
            routes[(method, path)]()
        except ApiError as e:
            self._drain_body()
            self._json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a failing request never takes the server down
            self._json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body())

    def _authorise(self) -> None:
        key = self.server.settings.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if given != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    # -- simple endpoints ---------------------------------------------------------------------
    def _health(self) -> None:
        self._json(200, {"status": "ok"})

    def _metrics(self) -> None:
        body = self.server.metrics.render(self.server.engine).encode()
        self._send(200, body, "text/plain; version=0.0.4")

    def _models(self) -> None:
        name = self.server.settings.model_name
        self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "created": self.server.started,
                                                      "owned_by": "neoxko",
                                                      "max_model_len": self.server.engine.max_len}]})

    def _tokenizer_info(self) -> None:
        tokenizer = self.server.tokenizer
        self._json(200, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
                         "bos_token": None, "pad_token": None, "vocab_size": tokenizer.vocab_size,
                         "model_max_length": self.server.engine.max_len})

    def _tokenize(self) -> None:
        body = self._read_json()
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        if not isinstance(special, bool):
            raise ApiError(400, "add_special_tokens must be true or false", "add_special_tokens")
        tokens = self.server.tokenizer.encode(prompt, add_special_tokens=special)
        self._json(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.server.engine.max_len})

    def _detokenize(self) -> None:
        tokens, size = self._read_json().get("tokens"), self.server.tokenizer.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < size
                                                   for t in tokens):
            raise ApiError(400, f"tokens must be a list of token ids from 0 to {size - 1}", "tokens")
        self._json(200, {"prompt": self.server.tokenizer.decode(tokens)})

    # -- completions --------------------------------------------------------------------------
    def _completions(self) -> None:
        completion = self._parse(self._read_json())
        engine = self.server.engine
        events_queue = None
        requests = []
        try:
            for p, prompt in enumerate(completion.prompts):
                for c in range(completion.n):
                    seed = completion.sampling.seed
                    # choice c of n draws with seed + c, so choice 0 is what `neoxko generate --seed` gives
                    sampling = completion.sampling if seed is None or c == 0 else \
                        dataclasses.replace(completion.sampling, seed=seed + c)
                    request = Request(prompt, completion.max_tokens, sampling, completion.logprobs,
                                      prompt_logprobs=completion.echo and completion.logprobs is not None,
                                      index=p * completion.n + c)
                    if events_queue is None:
                        events_queue = request.events
                    request.events = events_queue
                    requests.append(engine.submit(request))
        except QueueFull as e:
            for r in requests:
                r.cancel()
            raise ApiError(429, f"the server is busy: {e}", kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NeoxkoError as e:
            for r in requests:
                r.cancel()
            raise ApiError(400, str(e), "max_tokens") from None
        choices = [Choice(self.server.tokenizer, r, completion, completion.prompt_texts[r.index // completion.n])
                   for r in requests]
        try:
            if completion.stream:
                self._stream(completion, requests, choices, events_queue)
            else:
                self._wait(requests, choices, events_queue)
                self._json(200, self._body(completion, requests, choices))
            masked = sum((c.masked for c in choices), Counter())
            self.server.metrics.completed(time.perf_counter() - requests[0].submitted, masked)
        finally:
            for r in requests:
                r.cancel()  # no-op for finished ones; frees the rows of a client that went away

    def _events(self, events: queue.Queue, n_choices: int):
        """The engine's events until every choice has finished; BrokenPipeError if the client goes away."""
        checked = time.monotonic()
        while n_choices:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                event = None
            # looked at every 0.2 s even while tokens keep coming: a client that left frees its row
            if time.monotonic() - checked >= 0.2:
                checked = time.monotonic()
                if self._client_gone():
                    raise BrokenPipeError("client disconnected")
            if event is None:
                continue
            n_choices -= isinstance(event, Finished)
            yield event

    def _wait(self, requests: list, choices: list, events) -> None:
        """Collect every choice's tokens; give up (and free the rows) if the client disconnects."""
        for event in self._events(events, len(choices)):
            choices[event.index].feed(event)
        failed = [c.finish_reason for c in choices if c.finish_reason.startswith("error")]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0]}", kind="server_error")

    def _stream(self, completion: Completion, requests: list, choices: list, events) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.server.metrics.response("/v1/completions", 200)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice: dict) -> None:
            body = {"id": ident, "object": "text_completion", "created": created,
                    "model": self.server.settings.model_name, "choices": [choice]}
            self._event(body)

        for event in self._events(events, len(choices)):
            choice = choices[event.index]
            text, logprobs = choice.feed(event)
            finished = isinstance(event, Finished)
            if text or finished:
                entry = {"text": text, "index": event.index, "logprobs": logprobs,
                         "finish_reason": choice.finish_reason if finished else None}
                if finished and choice.finish_reason.startswith("error"):  # headers are gone: say it in the stream
                    entry["finish_reason"] = "error"
                    entry["error"] = ApiError(500, f"generation failed: {choice.finish_reason}",
                                              kind="server_error").body()["error"]
                if finished and choice.mask_pii:
                    entry["pii_masked"] = dict(choice.masked)
                chunk(entry)
        if completion.include_usage:
            self._event({"id": ident, "object": "text_completion", "created": created,
                         "model": self.server.settings.model_name, "choices": [],
                         "usage": _usage(completion, choices)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _body(self, completion: Completion, requests: list, choices: list) -> dict:
        out = []
        for choice in choices:
            entry = {"text": choice.text, "index": choice.request.index, "logprobs": choice.logprobs_body(),
                     "finish_reason": choice.finish_reason}
            if choice.mask_pii:
                entry["pii_masked"] = dict(choice.masked)
            out.append(entry)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.settings.model_name, "choices": out, "usage": _usage(completion, choices)}

    def _client_gone(self) -> bool:
        """True if the client closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- input --------------------------------------------------------------------------------
    def _read_json(self) -> dict:
        kind = self.headers.get("Content-Type", "")
        if kind.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > self.server.settings.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"the body is {int(length):,} bytes; the limit is "
                                f"{self.server.settings.max_body_bytes:,}")
        raw = self.rfile.read(int(length))
        self._body_read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _drain_body(self) -> None:
        """Read an unread body so that a kept-alive connection stays in step (small bodies only)."""
        length = self.headers.get("Content-Length", "")
        if getattr(self, "_body_read", False) or not length.isdigit():
            return
        if int(length) > self.server.settings.max_body_bytes:
            self.close_connection = True
            return
        self.rfile.read(int(length))

    def _parse(self, body: dict) -> Completion:
        settings, engine, tokenizer = self.server.settings, self.server.engine, self.server.tokenizer
        model = body.get("model")
        if model is not None and model != settings.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {settings.model_name!r}",
                           "model", code="model_not_found")
        for key, default in UNSUPPORTED.items():
            if key in body and body[key] not in (default, None):
                raise ApiError(400, f"{key} is not supported by this server", key)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)) for p in prompt):
            raise ApiError(400, "prompt must be a string, a list of strings, or token ids", "prompt")
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]
        vocab = engine.model.config.vocab_size
        for p in ids:
            if not p:
                raise ApiError(400, "a prompt encodes to no tokens; send at least one character", "prompt")
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        max_tokens = _number(body, "max_tokens", 16, int, minimum=1)
        longest = max(len(p) for p in ids)
        if longest >= engine.max_len:
            raise ApiError(400, f"the prompt is {longest} tokens; this model's context is {engine.max_len} tokens",
                           "prompt", code="context_length_exceeded")
        if longest + max_tokens > engine.max_len:
            raise ApiError(400, f"this model's maximum context length is {engine.max_len} tokens, but you asked for "
                                f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} for the completion); "
                                "lower max_tokens or shorten the prompt", "max_tokens",
                           code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, float, minimum=0, maximum=2)
        top_p = _number(body, "top_p", 1.0, float, minimum=0, maximum=1)
        if top_p == 0:
            raise ApiError(400, "top_p must be greater than 0", "top_p")
        top_k = _number(body, "top_k", -1, int, minimum=-1)
        penalty = _number(body, "repetition_penalty", 1.0, float, minimum=0)
        if penalty == 0:
            raise ApiError(400, "repetition_penalty must be greater than 0 (1 is off)", "repetition_penalty")
        seed = _number(body, "seed", None, int)
        n = _number(body, "n", 1, int, minimum=1, maximum=settings.max_n)
        logprobs = _number(body, "logprobs", None, int, minimum=0, maximum=5)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                                 not all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        flags = {}
        for key in ("echo", "stream", "mask_pii"):
            value = body.get(key, False)
            if not isinstance(value, bool):
                raise ApiError(400, f"{key} must be true or false", key)
            flags[key] = value
        if flags["stream"] and flags["echo"] and logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported when streaming; send stream: false", "echo")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        sampling = Sampling(temperature=temperature, top_k=top_k if top_k > 0 else None, top_p=top_p,
                            repetition_penalty=penalty, seed=seed)
        return Completion(ids, texts, max_tokens, sampling, stop or [], n, flags["echo"], logprobs, flags["stream"],
                          bool(options.get("include_usage")), flags["mask_pii"] or settings.mask_pii)

    # -- output -------------------------------------------------------------------------------
    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.server.metrics.response(self.path.split("?", 1)[0], status)


class Choice:
    """One choice's text as it is made: detokenised, cut at stop strings, PII-masked."""

    def __init__(self, tokenizer: Tokenizer, request: Request, completion: Completion, prompt_text: str):
        self.tokenizer, self.request = tokenizer, request
        self.pieces, self.stops = tokenizer.decode_stream(), StopStrings(completion.stop)
        self.mask_pii = completion.mask_pii
        self.guard = PIIStream() if completion.mask_pii else None
        self.text = ""
        self.tokens = 0
        self.finish_reason = ""
        self.want_logprobs = completion.logprobs is not None
        self.lp_tokens, self.lp_values, self.lp_top, self.lp_offsets = [], [], [], []
        self.echo = prompt_text if completion.echo else None
        self.offset = 0

    @property
    def masked(self) -> Counter:
        return self.guard.masked if self.guard else Counter()

    def feed(self, event) -> tuple[str, dict | None]:
        """Take one engine event; return the new text it makes visible and its logprobs entry."""
        new, mark = "", len(self.lp_tokens)
        if self.echo is not None:  # masked as a whole with what follows, its own PII masked whatever follows
            new += self.guard.push_prompt(self.echo) if self.guard and self.echo else self.echo
            self.echo = None
        if isinstance(event, Finished):
            if self.want_logprobs and event.prompt_logprobs is not None:
                self._prepend_prompt_logprobs(event.prompt_logprobs, event.prompt_top)
                mark = 0
            self.finish_reason = "stop" if self.stops.stopped else event.reason.replace("cancelled", "stop")
            tail = "" if self.stops.stopped else self.stops.push(self.pieces.flush()) + self.stops.flush()
            new += self._guarded(tail) + (self.guard.flush() if self.guard else "")
        elif not self.stops.stopped:
            self.tokens += 1
            piece = self.tokenizer.decode([event.id])
            if self.want_logprobs:
                self.lp_tokens.append(self._token_text(event.id))
                self.lp_values.append(event.logprob)
                self.lp_top.append({self._token_text(t): v for t, v in event.top} if event.top else None)
                self.lp_offsets.append(self.offset)
            self.offset += len(piece)
            new += self._guarded(self.stops.push(self.pieces.push(event.id)))
            if self.stops.stopped:
                self.request.cancel()
        self.text += new
        if not self.want_logprobs:
            return new, None
        return new, self.logprobs_body(mark)

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
        self.lp_top[:0] = [{self._token_text(t): v for t, v in top} if top else None
                           for top in (tops or [None] * len(ids))]
        self.lp_offsets = offsets + [o + at for o in self.lp_offsets]

    def logprobs_body(self, start: int = 0) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"tokens": self.lp_tokens[start:], "token_logprobs": self.lp_values[start:],
                "top_logprobs": self.lp_top[start:], "text_offset": self.lp_offsets[start:]}


def _usage(completion: Completion, choices: list) -> dict:
    prompt = sum(len(p) for p in completion.prompts)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _number(body: dict, key: str, default, kind: type, minimum=None, maximum=None):
    value = body.get(key, default)
    if value is None:
        return default
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    value = kind(value)
    if (isinstance(value, float) and not math.isfinite(value)) or (minimum is not None and value < minimum) or \
            (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ApiError(400, f"{key} must be {bounds}, got {value!r}", key)
    return value


def serve(engine: Engine, tokenizer: Tokenizer, settings: ServeSettings, host: str = "127.0.0.1",
          port: int = 8000) -> CompletionServer:
    """Start serving in a background thread; returns the server (its .server_address has the port)."""
    server = CompletionServer((host, port), engine, tokenizer, settings)
    threading.Thread(target=server.serve_forever, name="neoxko-http", daemon=True).start()
    return server
