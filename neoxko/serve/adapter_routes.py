"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with vLLM's request and reply shapes.

Both sit behind the API key and answer 403 unless the server was started with --allow-runtime-lora. Loading reads
and checks the adapter off the event loop; it is served from the next request that names it. Unloading removes the
name at once: requests already running with the adapter finish with it.
"""

from pathlib import Path

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from neoxko.errors import NeoxkoError
from neoxko.serve.adapters import AdapterError
from neoxko.serve.http import read_json
from neoxko.serve.protocol import ApiError, parse

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace an adapter loaded under that name


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (vLLM's lora_int_id)
    lora_name: str


def add_adapter_routes(route, state) -> None:
    """Register the two routes with the app's route decorator (key, readiness and error handling included)."""

    def slots():
        if not state.settings.allow_runtime_lora:
            raise ApiError(403, "loading and unloading LoRA adapters at run time is off; restart the server with "
                                "--allow-runtime-lora (and an --api-key), or name adapters at start with --lora "
                                "NAME=FOLDER", code="runtime_lora_disabled")
        if state.engine.adapters is None:
            raise ApiError(403, "this server's engine has no adapter slots: build it with Engine(..., "
                                "adapters=AdapterSlots(model))", code="runtime_lora_disabled")
        return state.engine.adapters

    @route("POST", "/v1/load_lora_adapter")
    async def load(request: Request):
        adapters = slots()
        body = parse(LoadAdapter, await read_json(request, state.settings))
        if body.lora_name == state.settings.model_name:
            raise ApiError(400, f"{body.lora_name!r} is the served model's own name; give the adapter another",
                           "lora_name")

        if Path(body.lora_path).is_file():
            raise ApiError(400, f"lora_path {body.lora_path} is a file; give the adapter's folder (the one holding "
                                "adapter_config.json)", "lora_path")

        def work():
            from neoxko.formats.locate import resolve

            adapters.register(body.lora_name, resolve(body.lora_path, allow_patterns=ADAPTER_FILES),
                              replace=body.load_inplace)

        try:
            await run_in_threadpool(work)
        except AdapterError as e:
            raise ApiError(400, str(e), e.field) from None
        except NeoxkoError as e:
            raise ApiError(400, f"cannot load the adapter in {body.lora_path}: {e}", "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @route("POST", "/v1/unload_lora_adapter")
    async def unload(request: Request):
        adapters = slots()
        body = parse(UnloadAdapter, await read_json(request, state.settings))
        try:
            adapters.unregister(body.lora_name)
        except AdapterError as e:
            raise ApiError(404, f"{e}; GET /v1/models lists the adapters served", "lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
