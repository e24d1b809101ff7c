"""The request fields of structured outputs read into a Constraint: OpenAI's response_format, vLLM's
structured_outputs, and vLLM's older guided_json / guided_regex / guided_choice / guided_grammar.

response_format {"type": "json_object"} asks for any JSON object; {"type": "json_schema", "json_schema": {"name":
..., "schema": {...}}} for one the schema validates; {"type": "text"} for no constraint. structured_outputs holds
exactly one of json (a schema, or its text), regex, choice (a list of strings), grammar (Lark or GBNF) or json_object
(true). A request may use one of the three ways; each problem is a 400 that names its field.
"""

from typing import Any

from neoxko.serve.protocol import ApiError
from neoxko.structured import Constraint, GrammarError

STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# vLLM's options beside the constraint, taken and left to the engine's defaults (JSON is written compact)
VLLM_OPTIONS = {"disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
                "backend", "_backend", "_backend_was_auto"}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def constraint_of(request) -> tuple[str, Constraint] | None:
    """(the field that asks, the constraint) of a completion or chat request (its pydantic model), or None."""
    found = []
    if request.response_format is not None:
        found.append(("response_format", _response_format(request.response_format)))
    if request.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(request.structured_outputs)))
    for name, kind in GUIDED.items():
        value = getattr(request, name)
        if value is not None:
            found.append((name, _make(kind, value, name)))
    found = [(name, c) for name, c in found if c is not None]
    if len(found) > 1:
        raise ApiError(400, f"this request constrains its output twice ({', '.join(n for n, _ in found)}); send one",
                       found[1][0])
    return found[0] if found else None


def _response_format(value: Any) -> Constraint | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _make("json", {"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ApiError(400, 'response_format of type json_schema needs "json_schema": {"name": ..., "schema": '
                                "{...}}", "response_format")
        return _make("json", schema, "response_format.json_schema.schema")
    if kind == "structural_tag":
        raise ApiError(400, "response_format of type structural_tag is not supported; use json_schema, or "
                            "structured_outputs with json, regex, choice or grammar", "response_format")
    raise ApiError(400, 'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                        f'"json_schema", "json_schema": {{...}}}}, got {value!r}'[:300], "response_format")


def _structured_outputs(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise ApiError(400, "structured_outputs must be an object with one of json, regex, choice, grammar, "
                            "json_object", "structured_outputs")
    unknown = sorted(set(value) - {*STRUCTURED_KEYS, "json_object", "structural_tag", *VLLM_OPTIONS})
    if unknown:
        raise ApiError(400, f"structured_outputs has {', '.join(map(repr, unknown))}, which is not one of json, "
                            "regex, choice, grammar, json_object", "structured_outputs")
    given = {k: v for k, v in value.items() if v is not None and v is not False and
             k in (*STRUCTURED_KEYS, "json_object", "structural_tag")}
    if not given:
        raise ApiError(400, "structured_outputs names no constraint: give one of json, regex, choice, grammar, "
                            "json_object", "structured_outputs")
    if len(given) > 1:
        raise ApiError(400, f"structured_outputs holds {', '.join(sorted(given))}; send one of them",
                       "structured_outputs")
    (key, spec), = given.items()
    if key == "structural_tag":
        raise ApiError(400, "structured_outputs.structural_tag is not supported; use json, regex, choice or grammar",
                       "structured_outputs")
    if key == "json_object":
        return _make("json", {"type": "object"}, "structured_outputs.json_object")
    return _make(STRUCTURED_KEYS[key], spec, f"structured_outputs.{key}")


def _make(kind: str, spec: Any, field: str) -> Constraint:
    try:
        return Constraint.of(kind, spec)
    except GrammarError as e:
        raise ApiError(400, f"{field}: {e}", field.split(".")[0]) from None
