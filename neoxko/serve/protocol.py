"""The OpenAI / vLLM wire format: request models, their validation into engine jobs, error shapes.

No sockets here: the ASGI app (app.py) reads a body, `parse` checks it against a pydantic model and
turns every failure into an OpenAI-shaped 400 that names the field; `completion_job` and `chat_job`
tokenise and check the request against the model's context.
"""

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from neoxko.generate import Sampling

UNSUPPORTED = {"best_of": 1, "logit_bias": None, "suffix": None, "frequency_penalty": 0, "presence_penalty": 0}


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
    body_timeout_s: float = 30.0  # a body that takes longer to arrive gets 408
    allow_half_close: bool = False  # a non-streaming client that half-closes its socket still gets its response
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter are open (with the key)
    chat_template: str | None = None  # jinja source; None: the tokenizer's own, if it has one
    chat_stop: tuple[str, ...] = ()  # stop strings the template implies (the next turn's header)


# -- field types: lax about 10.0 for 10, strict about "10" and true ------------------------------
def _integer(value):
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not float(value).is_integer():
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _number(value):
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_flag)]


class StreamOptions(BaseModel):
    include_usage: Bool = False


class _Sampled(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=-1)] = -1
    repetition_penalty: Annotated[Float, Field(gt=0)] = 1.0
    seed: Annotated[Int, Field(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None  # (torch's generators take 64 bits)
    n: Int = 1  # its bound is the server's --max-n
    stop: Any = Field(default_factory=list)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    mask_pii: Bool = False
    ignore_eos: Bool = False  # vLLM's: generate past the end of text (benchmarks want every request max_tokens long)
    response_format: Any = None  # structured outputs (serve/constraints.py reads these five)
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    best_of: Any = None
    logit_bias: Any = None
    suffix: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        value = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(value, list) or len(value) > 4 or
                                  not all(isinstance(s, str) and s for s in value)):
            raise ValueError("must be a string or a list of up to 4 non-empty strings")
        return value or []


class CompletionRequest(_Sampled):
    prompt: Any
    echo: Bool = False
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        def ids(p):
            return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        if isinstance(value, str) or (ids(value) and value):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(p, str) or ids(p) for p in value):
            raise ValueError("must be a string, a list of strings, or token ids")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the template may use them

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as one string; parts of type "text" joined (other parts cannot be shown to this model)."""
        if isinstance(self.content, list):
            kinds = {p.get("type") for p in self.content} - {"text"}
            if kinds:
                raise ValueError(f"content parts of type {sorted(map(str, kinds))} are not supported; send text")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: Bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value):
        taken = sorted(set(value or {}) & {"messages", "add_generation_prompt"})
        if taken:
            raise ValueError(f"may not set {' or '.join(taken)}: send them as the request's own fields")
        return value


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[Int]


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """body checked against model; the first problem as a 400 that names its field."""
    for key, default in UNSUPPORTED.items():
        if key in body and body[key] not in (default, None):
            raise ApiError(400, f"{key} is not supported by this server", key)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        raise ApiError(400, _message(model, error), ".".join(map(str, error["loc"][:1])) or None) from None


def _message(model: type[BaseModel], error: dict) -> str:
    loc = error["loc"]
    name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    if error["type"] == "missing":
        return f"{name} is required"
    if error["type"] == "value_error":
        return f"{name} {error['msg'].removeprefix('Value error, ')}"
    if error["type"] in ("greater_than_equal", "greater_than", "less_than_equal", "less_than") and len(loc) == 1:
        low, high = _bounds(model, str(loc[0]))
        if error["type"] == "greater_than" and high is None:
            return f"{name} must be greater than {low}, got {error['input']!r}"
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        return f"{name} must be {bounds}, got {error['input']!r}"
    return f"{name}: {error['msg']}"


def _bounds(model: type[BaseModel], name: str) -> tuple:
    low = high = None
    for meta in model.model_fields[name].metadata + _union_metadata(model, name):
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            low = meta.ge if isinstance(meta, annotated_types.Ge) else meta.gt
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            high = meta.le if isinstance(meta, annotated_types.Le) else meta.lt
    return low, high


def _union_metadata(model: type[BaseModel], name: str) -> list:
    """Constraints inside `Annotated[...] | None`, where pydantic keeps them on the union's member."""
    out = []
    for arg in getattr(model.model_fields[name].annotation, "__args__", ()):
        for meta in getattr(arg, "__metadata__", ()):  # (a Field(...) inside Annotated keeps its bounds in .metadata)
            out += [m for m in getattr(meta, "metadata", [meta]) if isinstance(m, annotated_types.BaseMetadata)]
    return out


# -- engine jobs ---------------------------------------------------------------------------------
@dataclass
class Job:
    """What one request asks of the engine, checked against the served model."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    n: int
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    mask_pii: bool = False
    chat: bool = False
    ignore_eos: bool = False
    model: str = ""  # the name the response gives: the served model's, or the adapter's the request named
    adapter: Any = None  # the LoRA adapter (serve.adapters.Adapter) it runs with; None: the base model
    guides: list = field(default_factory=list)  # structured outputs: a structured.Guide per completion (prompts x n)


def completion_job(request: CompletionRequest, tokenizer, settings: ServeSettings, max_len: int, vocab: int,
                   adapters=None) -> Job:
    """adapters: the server's AdapterSlots, if it serves LoRA adapters (a request's model may name one)."""
    adapter = _check_model(request, settings, adapters)
    if any(not isinstance(p, str) and not all(0 <= t < vocab for t in p) for p in request.prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")  # (before any is decoded)
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in request.prompt]
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in request.prompt]
    for p in ids:
        if not p:
            raise ApiError(400, "a prompt encodes to no tokens; send at least one character", "prompt")
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    max_tokens = _fit(request.max_tokens or 16, max(len(p) for p in ids), max_len)
    if request.stream and request.echo and request.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported when streaming; send stream: false", "echo")
    return Job(ids, texts, max_tokens, _sampling(request), request.stop, _n(request, settings), request.echo,
               request.logprobs, request.stream, _usage_wanted(request), request.mask_pii or settings.mask_pii,
               ignore_eos=request.ignore_eos, model=request.model or settings.model_name, adapter=adapter)


def chat_job(request: ChatRequest, prompt_ids: list[int], settings: ServeSettings, max_len: int,
             adapters=None) -> Job:
    adapter = _check_model(request, settings, adapters)
    if not prompt_ids:
        raise ApiError(400, "the chat template made an empty prompt", "messages")
    asked = request.max_completion_tokens or request.max_tokens
    max_tokens = _fit(asked, len(prompt_ids), max_len) if asked else max_len - len(prompt_ids)
    if max_tokens < 1:
        raise ApiError(400, f"the messages are {len(prompt_ids)} tokens; this model's context is {max_len} tokens",
                       "messages", code="context_length_exceeded")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    if request.top_logprobs and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    stop = request.stop + [s for s in settings.chat_stop if s not in request.stop]
    return Job([prompt_ids], [""], max_tokens, _sampling(request), stop, _n(request, settings), logprobs=logprobs,
               stream=request.stream, include_usage=_usage_wanted(request),
               mask_pii=request.mask_pii or settings.mask_pii, chat=True, ignore_eos=request.ignore_eos,
               model=request.model or settings.model_name, adapter=adapter)


def _check_model(request: _Sampled, settings: ServeSettings, adapters) -> Any:
    """The adapter the request's model names (None: the served model itself); a name not served is a 404."""
    if request.model is None or request.model == settings.model_name:
        return None
    adapter = adapters.get(request.model) if adapters is not None else None
    if adapter is None:
        names = [settings.model_name] + (adapters.names() if adapters is not None else [])
        raise ApiError(404, f"model {request.model!r} is not served here; this server serves "
                            f"{', '.join(map(repr, names))} (GET /v1/models lists them)", "model",
                       code="model_not_found")
    return adapter


def _fit(max_tokens: int, longest: int, max_len: int) -> int:
    if longest >= max_len:
        raise ApiError(400, f"the prompt is {longest} tokens; this model's context is {max_len} tokens",
                       "prompt", code="context_length_exceeded")
    if longest + max_tokens > max_len:
        raise ApiError(400, f"this model's maximum context length is {max_len} tokens, but you asked for "
                            f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} for the completion); "
                            "lower max_tokens or shorten the prompt", "max_tokens", code="context_length_exceeded")
    return max_tokens


def _sampling(request: _Sampled) -> Sampling:
    return Sampling(temperature=request.temperature, top_k=request.top_k if request.top_k > 0 else None,
                    top_p=request.top_p, repetition_penalty=request.repetition_penalty, seed=request.seed)


def _n(request: _Sampled, settings: ServeSettings) -> int:
    if not 1 <= request.n <= settings.max_n:
        raise ApiError(400, f"n must be between 1 and {settings.max_n}, got {request.n}", "n")
    return request.n


def _usage_wanted(request: _Sampled) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)
