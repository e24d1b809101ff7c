"""Chat prompts from jinja templates, as transformers renders a tokenizer's `chat_template`.

The template comes from the tokenizer's tokenizer_config.json, or from --chat-template: a .jinja file or
the name of one shipped here (`koalpaca`, `chat`). Polyglot-Ko is a base model and has none; a chat request
then gets a 400 that says so.
"""

import functools
import json
from datetime import datetime
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from neoxko.errors import NeoxkoError

# name -> the stop strings its turns imply (the next question)
SHIPPED = {"koalpaca": ("### 질문:",), "chat": ("### 사용자:",)}


def load_template(spec: str) -> tuple[str, tuple[str, ...]]:
    """--chat-template's value: a shipped name or a jinja file; its source and its stop strings."""
    if spec in SHIPPED:
        return resources.files("neoxko").joinpath(f"templates/{spec}.jinja").read_text("utf-8"), SHIPPED[spec]
    path = Path(spec)
    if not path.is_file():
        raise NeoxkoError(f"--chat-template {spec!r} is neither a file nor a shipped template "
                          f"({', '.join(SHIPPED)}); give a .jinja file or one of those names")
    source = path.read_text(encoding="utf-8")
    compile_template(source)  # a broken template fails at start, not at the first chat request
    return source, ()


@functools.lru_cache(maxsize=8)  # read once, not at every chat request
def tokenizer_template(folder: Path | None) -> str | None:
    """The chat_template of a tokenizer folder's tokenizer_config.json (transformers' convention), if any."""
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return None
    template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                               ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise NeoxkoError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text; jinja2.TemplateError (with the template's own message) if the template refuses."""
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **variables)


def write_chat_template(folder: Path, source: str) -> None:
    """Put the template into FOLDER/tokenizer_config.json as `chat_template`, where transformers'
    apply_chat_template and `neoxko serve` read it."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = source
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer_template.cache_clear()
