"""HTTP details the routes share: the API key and reading a JSON body within its size and time limits."""

import asyncio
import hmac

import orjson
from fastapi import Request

from neoxko.serve.protocol import ApiError, ServeSettings


def authorise(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):  # constant time: no timing oracle
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       kind="authentication_error", code="invalid_api_key")


async def read_json(request: Request, settings: ServeSettings) -> dict:
    kind = request.headers.get("content-type", "")
    if kind.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}")
    limit, length = settings.max_body_bytes, request.headers.get("content-length", "")
    size = f"{int(length):,}" if length.isdigit() else f"more than {limit:,}"
    too_big = ApiError(413, f"the body is {size} bytes; the limit is {limit:,}", headers={"Connection": "close"})
    if length.isdigit() and int(length) > limit:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), settings.body_timeout_s)
    except asyncio.TimeoutError:  # builtin TimeoutError only from 3.11
        raise ApiError(408, f"the body did not arrive within {settings.body_timeout_s:g} s",
                       headers={"Connection": "close"}) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body
