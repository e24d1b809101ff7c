"""The ASGI app (FastAPI): routes, the API key, body limits, server-sent events, disconnects.

Endpoints, with vLLM's shapes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /tokenizer_info, POST /tokenize, POST /detokenize, GET /version, GET /metrics and GET /health (the
only one that needs no key; 503 until the model is loaded). Handlers run on the event loop; the
engine thread hands each request's events over with call_soon_threadsafe.
"""

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field

import jinja2
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from neoxko import __version__
from neoxko import chat_template as chat
from neoxko.errors import NeoxkoError
from neoxko.serve.adapter_routes import add_adapter_routes
from neoxko.serve.constraints import constraint_of
from neoxko.serve.engine import Engine, Finished, QueueFull
from neoxko.serve.engine import Request as EngineRequest
from neoxko.serve.http import authorise, read_json
from neoxko.serve.metrics import Metrics
from neoxko.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Job,
    ServeSettings,
    TokenizeRequest,
    chat_job,
    completion_job,
    parse,
)
from neoxko.serve.responses import Choice, Responses, failure
from neoxko.structured import GrammarError, Grammars
from neoxko.tokenizer import Tokenizer

ROUTES = ("POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /tokenizer_info, POST /tokenize, "
          "POST /detokenize, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /version, GET /metrics and "
          "GET /health")


@dataclass
class State:
    settings: ServeSettings
    engine: Engine | None = None  # None while the model loads
    tokenizer: Tokenizer | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    stopping: bool = False
    metrics: Metrics = None
    grammars: Grammars | None = None  # structured outputs' compiler, made at the first request that asks for one

    def __post_init__(self):
        self.metrics = Metrics(self)


class _ClientGone(Exception):
    pass


class _Sink:
    """The engine thread's end of a request's event queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


def build_app(state: State) -> FastAPI:
    app = FastAPI(title="neoxko", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.neoxko = state
    known = set()

    def route(method: str, path: str, auth: bool = True, ready: bool = True):
        known.add(path)

        def wrap(handler):
            async def endpoint(request: Request):
                if auth:
                    authorise(request, state.settings.api_key)
                if ready and state.engine is None:
                    raise ApiError(503, "the model is still loading; retry in a moment", kind="server_error",
                                   code="loading", headers={"Retry-After": "5"})
                try:
                    return await handler(request)
                except (ApiError, _ClientGone):
                    raise
                except NeoxkoError as e:
                    raise ApiError(400, str(e)) from None
                except Exception as e:  # a failing request never takes the server down
                    raise ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error") from None

            app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
            return handler

        return wrap

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        if e.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}")
        elif e.status_code == 404:
            error = ApiError(404, f"no route {request.method} {request.url.path}; the routes are {ROUTES}",
                             code="not_found")
        else:
            error = ApiError(e.status_code, str(e.detail))
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    app.add_middleware(_CountResponses, state=state, known=known)

    @route("GET", "/health", auth=False, ready=False)
    async def health(request: Request):
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        if not state.engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, 503)
        if state.stopping:
            return JSONResponse({"status": "stopping"}, 503)
        return JSONResponse({"status": "ok"})

    @route("GET", "/version", ready=False)
    async def version(request: Request):
        return JSONResponse({"version": __version__})

    @route("GET", "/metrics", ready=False)
    async def metrics(request: Request):
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @route("GET", "/v1/models")
    async def models(request: Request):
        base = state.settings.model_name
        card = {"object": "model", "created": state.started, "owned_by": "neoxko",
                "max_model_len": state.engine.max_len}
        adapters = state.engine.adapters
        loras = [{"id": a.name, "root": str(a.folder), "parent": base} | card
                 for a in (adapters.adapters.copy().values() if adapters is not None else ())]
        return JSONResponse({"object": "list", "data": [{"id": base, "root": base, "parent": None} | card] + loras})

    add_adapter_routes(route, state)

    @route("GET", "/tokenizer_info")
    async def tokenizer_info(request: Request):
        tokenizer = state.tokenizer
        info = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token, "bos_token": None,
                "pad_token": None, "vocab_size": tokenizer.vocab_size, "model_max_length": state.engine.max_len}
        template = _template(state, required=False)
        if template:
            info["chat_template"] = template
        return JSONResponse(info)

    # Parsing, chat-template rendering, tokenizing and detokenizing run in a worker thread, never on the event loop:
    # a 1 MiB body costs a second of CPU there, which would hold up /health and every running stream.
    @route("POST", "/tokenize")
    async def tokenize(request: Request):
        raw = await read_json(request, state.settings)

        def work() -> dict:
            body = parse(TokenizeRequest, raw)
            if (body.prompt is None) == (body.messages is None):
                raise ApiError(400, "send either prompt (a string) or messages (a chat)", "prompt")
            text = body.prompt if body.prompt is not None else _render(state, body.messages,
                                                                         body.add_generation_prompt)
            tokens = state.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
            return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_len}
        return JSONResponse(await run_in_threadpool(work))

    @route("POST", "/detokenize")
    async def detokenize(request: Request):
        raw = await read_json(request, state.settings)

        def work() -> dict:
            size = state.tokenizer.vocab_size
            try:
                body = parse(DetokenizeRequest, raw)
            except ApiError:
                body = None
            if body is None or not all(0 <= t < size for t in body.tokens):
                raise ApiError(400, f"tokens must be a list of token ids from 0 to {size - 1}", "tokens")
            return {"prompt": state.tokenizer.decode(body.tokens)}
        return JSONResponse(await run_in_threadpool(work))

    @route("POST", "/v1/completions")
    async def completions(request: Request):
        raw = await read_json(request, state.settings)

        def work() -> Job:
            engine, body = state.engine, parse(CompletionRequest, raw)
            job = completion_job(body, state.tokenizer, state.settings, engine.max_len, engine.model.config.vocab_size,
                                 engine.adapters)
            return _constrain(state, body, job)
        return await _respond(state, request, await run_in_threadpool(work))

    @route("POST", "/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_json(request, state.settings)

        def work() -> Job:
            body = parse(ChatRequest, raw)
            text = _render(state, body.messages, body.add_generation_prompt, body.chat_template_kwargs or {})
            job = chat_job(body, state.tokenizer.encode(text), state.settings, state.engine.max_len,
                           state.engine.adapters)
            return _constrain(state, body, job)
        return await _respond(state, request, await run_in_threadpool(work))

    return app


class _CountResponses:
    """Every response's status, by route (plain ASGI: it leaves streams and disconnects alone)."""

    def __init__(self, app, state: State, known: set):
        self.app, self.state, self.known = app, state, known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.known else "unmatched"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.state.metrics.response(path, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def _constrain(state: State, body, job: Job) -> Job:
    """The job with the constraint its request asks for (structured outputs) compiled, and a guide per completion."""
    asked = constraint_of(body)
    if asked is None:
        return job
    field, constraint = asked
    if state.grammars is None:
        state.grammars = Grammars(state.tokenizer, state.engine.model.config.vocab_size)
    try:
        grammar = state.grammars.compile(constraint)
        job.guides = [state.grammars.guide(grammar) for _ in range(len(job.prompts) * job.n)]
    except GrammarError as e:
        raise ApiError(400, str(e), field) from None
    return job


def _template(state: State, required: bool = True) -> str | None:
    template = state.settings.chat_template or chat.tokenizer_template(state.tokenizer.source)
    if template is None and required:
        raise ApiError(400, "this model has no chat template (Polyglot-Ko is a base model, not a chat model); "
                            "restart the server with --chat-template koalpaca (the ### 질문: / ### 답변: format of "
                            "Korean instruction-tuned Polyglot-Ko models) or --chat-template FILE.jinja, or use "
                            "/v1/completions", "messages", code="no_chat_template")
    return template


def _render(state: State, messages: list, add_generation_prompt: bool, variables: dict | None = None) -> str:
    try:
        plain = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in messages]
        return chat.render(_template(state), plain, add_generation_prompt,
                           **({"bos_token": "", "eos_token": state.tokenizer.eos_token or ""} | (variables or {})))
    except (ValueError, jinja2.exceptions.TemplateError) as e:
        raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None


async def _respond(state: State, request: Request, job: Job) -> Response:
    engine, sink = state.engine, _Sink(asyncio.get_running_loop())
    asked = len(job.prompts) * job.n
    if asked > engine.max_queue:  # (it could never be queued whole, however idle the server: not a "retry later")
        raise ApiError(400, f"this request asks for {asked} completions ({len(job.prompts)} prompt(s) x n {job.n}); "
                            f"this server queues at most {engine.max_queue} at once (--max-queue)", "n")
    requests = []
    try:
        for p, prompt in enumerate(job.prompts):
            for c in range(job.n):
                seed = job.sampling.seed
                # choice c of n draws with seed + c, so choice 0 is what `neoxko generate --seed` gives
                sampling = job.sampling if seed is None or c == 0 else dataclasses.replace(job.sampling, seed=seed + c)
                requests.append(engine.submit(EngineRequest(
                    prompt, job.max_tokens, sampling, job.logprobs, events=sink, index=p * job.n + c,
                    prompt_logprobs=job.echo and job.logprobs is not None, ignore_eos=job.ignore_eos,
                    adapter=job.adapter, guide=job.guides[p * job.n + c] if job.guides else None)))
    except QueueFull as e:
        for r in requests:
            r.cancel()
        raise ApiError(429 if engine.accepting else 503, f"the server is busy: {e}", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except NeoxkoError as e:
        for r in requests:
            r.cancel()
        raise ApiError(400, str(e), "max_tokens") from None
    choices = [Choice(state.tokenizer, r, job, job.prompt_texts[r.index // job.n]) for r in requests]
    responses = Responses(job, job.model)
    if job.stream:
        return StreamingResponse(_stream(state, requests, choices, sink, responses), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for event in _events(sink.queue, len(choices), request, state.settings.allow_half_close):
            choices[event.index].feed(event)
    finally:
        for r in requests:
            r.cancel()  # no-op for finished ones; frees the rows of a client that went away
    failed = [c.error for c in choices if c.error]
    if failed:
        raise failure(failed[0])
    state.metrics.completed(time.perf_counter() - requests[0].submitted, sum((c.masked for c in choices), Counter()))
    return JSONResponse(responses.whole(choices))


async def _events(queue: asyncio.Queue, n_choices: int, request: Request | None = None,
                  allow_half_close: bool = False):
    """The engine's events until every choice has finished. With request: _ClientGone once the client
    has left (looked at every 0.2 s even while tokens keep coming), or has half-closed its socket unless
    allow_half_close."""
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while n_choices:
        try:
            event = queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                event = await asyncio.wait_for(queue.get(), 0.2)
            except asyncio.TimeoutError:  # builtin TimeoutError only from 3.11
                event = None
        if request is not None and loop.time() - checked >= 0.2:
            checked = loop.time()
            if await request.is_disconnected() or (not allow_half_close and
                                                   "neoxko.half_closed" in request.scope.get("extensions", {})):
                raise _ClientGone
        if event is None:
            continue
        n_choices -= isinstance(event, Finished)
        yield event


async def _stream(state: State, requests: list, choices: list, sink: _Sink, responses: Responses):
    """Server-sent events; starlette cancels this generator when the client leaves, which frees the rows."""
    def frame(body: dict) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    try:
        opening = b"".join(frame(c) for c in responses.first_chunks(len(choices)))
        if opening:
            yield opening
        async for event in _events(sink.queue, len(choices)):
            batch = [event]
            while not sink.queue.empty():  # whatever else is ready goes out in the same write
                batch.append(sink.queue.get_nowait())
            out = []
            for e in batch:
                choice = choices[e.index]
                text, mark = choice.feed(e)
                body = responses.chunk(choice, text, mark, isinstance(e, Finished))
                if body is not None:
                    out.append(frame(body))
            if out:
                yield b"".join(out)
            if all(c.finish_reason for c in choices):
                break
        if responses.job.include_usage:
            yield frame(responses.usage_chunk(choices))
        yield b"data: [DONE]\n\n"
        state.metrics.completed(time.perf_counter() - requests[0].submitted,
                                sum((c.masked for c in choices), Counter()))
    finally:
        for r in requests:
            r.cancel()
