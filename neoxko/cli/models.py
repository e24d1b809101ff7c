"""`neoxko generate | serve | quantize | export | info`: running a model, and writing it for other tools."""

import argparse
import json
import os
import sys

from neoxko.builtin import DEFAULT_MODEL, MODEL_HELP
from neoxko.errors import NeoxkoError


def add_commands(commands) -> None:
    gen = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or nothing reads stdin")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=40, help="0 for no limit")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="weights dtype (default: as stored)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step: a one-off wait, then about 2x faster decoding on CPU")
    gen.add_argument("--quantize", choices=["int8", "int4"], default=None,
                     help="weight-only linear layers: int8 per channel, or int4 in groups (CPU)")
    gen.add_argument("--group-size", type=int, default=64, help="int4: input features per scale (32, 64, 128, 256)")
    gen.add_argument("--mask-pii", action="store_true",
                     help="replace phone, account and resident registration numbers in the output with tokens")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE|JSON",
                       help="hold the output to a JSON schema (a .json file or the schema itself); "
                            "'{\"type\": \"object\"}' for any JSON object ('{}' allows any JSON value)")
    shape.add_argument("--regex", help="hold the output to a regular expression (the whole output matches it)")
    shape.add_argument("--choice", action="append", help="the output is one of these strings (repeat the option)")
    shape.add_argument("--grammar", metavar="FILE|TEXT", help="hold the output to a grammar: Lark, or GBNF "
                                                                "(llama.cpp's 'root ::= ...'); a file or the text")
    gen.set_defaults(run=run_generate)

    srv = commands.add_parser("serve", help="OpenAI-compatible completions server with continuous batching")
    srv.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("NEOXKO_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $NEOXKO_API_KEY, else none)")
    srv.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    srv.add_argument("--quantize", choices=["int8", "int4"], default=None,
                     help="weight-only linear layers: int8 per channel, or int4 in groups (CPU)")
    srv.add_argument("--group-size", type=int, default=64, help="int4: input features per scale (32, 64, 128, 256)")
    srv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    srv.add_argument("--mask-pii", action="store_true", help="mask PII in every response")
    srv.add_argument("--chat-template", default=None,
                     help="jinja chat template for /v1/chat/completions: a .jinja file or a shipped name (koalpaca: "
                          "'### 질문: / ### 답변:'); default: the tokenizer's own, if it has one")
    srv.add_argument("--prefill-chunk", type=int, default=256,
                     help="prompt tokens per prefill forward: a long prompt holds running streams back by one chunk")
    srv.add_argument("--prefix-cache-rows", type=int, default=2,
                     help="KV cache rows that keep recent prompts for reuse (few-shot headers, system prompts)")
    srv.add_argument("--limit-concurrency", type=int, default=1024,
                     help="connections and requests beyond this get 503 at once")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send its request headers")
    srv.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive")
    srv.add_argument("--allow-half-close", action="store_true",
                     help="a client that sends its request and then shuts its side of the socket (shutdown(SHUT_WR)) "
                          "still gets a whole (non-streaming) response; without it such a client is taken for gone, as "
                          "nginx takes it: its row is freed and it gets 499 (streams are served either way: their "
                          "writes tell)")
    srv.add_argument("--lora", "--lora-modules", action="extend", nargs="+", default=[], metavar="NAME=FOLDER",
                     help="serve a LoRA adapter (ours or peft's; a folder or a hub id) unmerged under NAME: a request "
                          "whose model is NAME runs with it, batched with requests for the base and other adapters "
                          "(several after one --lora, or --lora again; a bare FOLDER is named after its last part)")
    srv.add_argument("--max-loras", type=int, default=4,
                     help="adapters held in the model at once; another one evicts the least recently used idle one")
    srv.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    srv.add_argument("--allow-runtime-lora", action="store_true",
                     help="open POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's); set --api-key too")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds running requests may finish before they are ended")
    srv.set_defaults(run=run_serve)

    qz = commands.add_parser("quantize", help="write an int8 or int4 weight-only copy of a model")
    qz.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    qz.add_argument("--output", required=True, help="folder for the quantized model (with the tokenizer)")
    qz.add_argument("--bits", type=int, choices=[8, 4], default=8,
                    help="8: int8 per output channel; 4: int4 per group of --group-size input features (CPU only)")
    qz.add_argument("--group-size", type=int, default=64, help="input features per int4 scale and zero")
    qz.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the scales, embeddings and norms")
    qz.set_defaults(run=run_quantize)

    ex = commands.add_parser("export", help="write a training checkpoint as a Hugging Face folder, or any model as "
                                            "one GGUF file for llama.cpp (Ollama, LM Studio, llama-cpp-python)")
    ex.add_argument("source", help="a training run folder or checkpoints/step-N folder, or a GPT-NeoX .gguf file (to a "
                    "Hugging Face folder); for GGUF also " + MODEL_HELP
                    + ", an adapter folder (merged into its base) or an int8/int4 folder (dequantized, then "
                      "quantized to --quant)")
    ex.add_argument("--output", required=True, help="the folder (hf) or the .gguf file (gguf) to write")
    ex.add_argument("--format", choices=["hf", "gguf"], default=None,
                    help="hf: config.json and model.safetensors; gguf: llama.cpp's file (default: gguf when --output "
                         "ends in .gguf or --quant is given, else hf)")
    ex.add_argument("--quant", choices=["bf16", "f16", "q8_0", "q4_0", "q4_k_m"], default=None, type=str.lower,
                    help="GGUF weights: bf16 (default), f16, q8_0, q4_0 (embedding and head in q8_0), written by "
                         "neoxko through the gguf package; q4_k_m by llama.cpp's quantizer (needs llama-cpp-python)")
    ex.add_argument("--adapter", default=None, help="a LoRA adapter (ours or peft's) merged into the model first")
    ex.add_argument("--tokenizer", default=None, help="hf: the tokenizer to copy beside it (default: the run's)")
    ex.set_defaults(run=run_export)

    info = commands.add_parser("info", help="print a model's config and parameter count")
    info.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--hardware", action="store_true",
                      help="what this CPU can do and the kernels and dtypes neoxko picks on it, with the reasons")
    info.set_defaults(run=run_info)


def compute_dtype(args: argparse.Namespace) -> str | None:
    """--dtype; None lets load_model choose for this CPU (hardware.default_dtype), as the Python API does."""
    return args.dtype


def run_generate(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model
    from neoxko.generate import Sampling, stream
    from neoxko.pii.stream import PIIStream
    from neoxko.tokenizer import load_tokenizer

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    # a piped prompt loses the newline(s) echo and editors end it with, which the model would continue
    prompt = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    tokenizer = load_tokenizer(args.model)
    args.dtype = compute_dtype(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                       group_size=args.group_size)
    guard = PIIStream() if args.mask_pii else None
    if args.compile:
        print("neoxko: compiling the decode step (once per model and prompt length bucket: about 30 s for "
              "ko-small, 1-2 minutes for 1.3B on a CPU); the tokens then come about twice as fast",
              file=sys.stderr, flush=True)
    constraint = {"json_schema": _file_or_text(args.json_schema, "--json-schema"), "regex": args.regex,
                  "choice": args.choice, "grammar": _file_or_text(args.grammar, "--grammar")}
    for piece in stream(model, tokenizer, prompt, args.max_new_tokens, sampling, args.stop, args.compile,
                        **constraint):
        sys.stdout.write(guard.push(piece) if guard else piece)
        sys.stdout.flush()
    sys.stdout.write((guard.flush() if guard else "") + "\n")
    if guard:
        counts = ", ".join(f"{label} {n}" for label, n in sorted(guard.masked.items())) or "none"
        print(f"neoxko: masked {guard.total} PII value(s): {counts}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from neoxko import chat_template as chat
    from neoxko.serve.app import State
    from neoxko.serve.protocol import ServeSettings
    from neoxko.serve.server import Limits, bind, run

    if args.max_batch < 1 or args.max_queue < 0:
        raise NeoxkoError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.prefill_chunk < 1 or args.prefix_cache_rows < 0 or args.limit_concurrency < 1:
        raise NeoxkoError("--prefill-chunk and --limit-concurrency must be at least 1, --prefix-cache-rows at least 0")
    template, stops = chat.load_template(args.chat_template) if args.chat_template else (None, ())
    name = args.served_model_name or str(args.model)
    loras = [_lora_option(option) for option in args.lora]
    if args.max_loras < 1 or args.max_lora_rank < 1:
        raise NeoxkoError(f"--max-loras and --max-lora-rank must be at least 1, got {args.max_loras} and "
                          f"{args.max_lora_rank}")
    if args.allow_runtime_lora and not args.api_key:
        print("neoxko: warning: --allow-runtime-lora without --api-key lets any client that reaches this server load "
              "adapters from any path it can read; set --api-key (or $NEOXKO_API_KEY)", file=sys.stderr)
    if len({n for n, _ in loras} | {name}) != len(loras) + 1:
        raise NeoxkoError(f"--lora names must differ from each other and from the model's ({name!r}): got "
                          f"{', '.join(n for n, _ in loras)}")
    settings = ServeSettings(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                             allow_half_close=args.allow_half_close, allow_runtime_lora=args.allow_runtime_lora,
                             mask_pii=args.mask_pii, body_timeout_s=args.body_timeout, chat_template=template,
                             chat_stop=stops)
    limits = Limits(header_timeout_s=args.header_timeout, limit_concurrency=args.limit_concurrency,
                    shutdown_timeout_s=args.shutdown_timeout)
    args.dtype = compute_dtype(args)
    sock = bind(args.host, args.port)  # a busy port fails now, not after the model has loaded
    host, port = sock.getsockname()[:2]
    print(f"neoxko: loading {name!r}; http://{host}:{port}/health answers 503 until it is ready", file=sys.stderr,
          flush=True)
    state = State(settings)

    def load():
        from neoxko.checkpoint import load_model
        from neoxko.serve.engine import Engine
        from neoxko.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                           group_size=args.group_size)
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id
        adapters = None
        if loras or args.allow_runtime_lora:
            from neoxko.formats.locate import resolve
            from neoxko.serve.adapter_routes import ADAPTER_FILES
            from neoxko.serve.adapters import AdapterSlots

            adapters = AdapterSlots(model, max_loras=args.max_loras, max_rank=args.max_lora_rank)
            for lora_name, folder in loras:
                adapters.register(lora_name, resolve(folder, allow_patterns=ADAPTER_FILES))
        engine = Engine(model, eos, max_batch=args.max_batch, max_queue=args.max_queue,
                        prefill_chunk=args.prefill_chunk, prefix_rows=args.prefix_cache_rows, adapters=adapters)
        return engine, tokenizer

    def ready() -> str:
        engine = state.engine
        cache = engine.model.gpt_neox.layers[0].attention.kv_cache
        cache_gb = 2 * cache.k.numel() * cache.k.element_size() * len(engine.model.gpt_neox.layers) / 1e9
        dtype = args.quantize or str(cache.k.dtype).removeprefix("torch.")
        return (f"neoxko: serving {name!r} on http://{host}:{port}/v1 ({args.max_batch} rows + "
                f"{args.prefix_cache_rows} prefix rows, KV cache {cache_gb:.2f} GB, {dtype})"
                + (f", adapters {', '.join(n for n, _ in loras)}" if loras else "")
                + (", runtime adapter loading on" if args.allow_runtime_lora else "")
                + (f", chat template {args.chat_template}" if args.chat_template else "")
                + (", API key required" if args.api_key else ""))

    run(state, sock, load, limits, ready)
    return 0


def _file_or_text(value: str | None, option: str) -> str | None:
    """The text of a file when value names one, else value itself (a schema or grammar given inline); a value that
    can only be a path (one line ending in .json, .lark, .gbnf, .ebnf, .txt) and names no file is an error."""
    from pathlib import Path

    if value is None or len(value) >= 4096 or value.lstrip().startswith("{"):
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "\n" not in value and path.suffix.lower() in (".json", ".lark", ".gbnf", ".ebnf", ".txt"):
        raise NeoxkoError(f"{option} {value}: no such file")
    return value


def _lora_option(option: str) -> tuple[str, str]:
    """--lora NAME=FOLDER (vLLM's --lora-modules form), or a bare FOLDER named after its last part."""
    from pathlib import Path

    name, sep, folder = option.partition("=")
    if not sep:
        name, folder = Path(option.rstrip("/")).name, option
    if not name or not folder:
        raise NeoxkoError(f"--lora {option!r}: write NAME=FOLDER, e.g. --lora koalpaca=./adapters/koalpaca")
    return name, folder


def run_quantize(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model, save_model

    model = load_model(args.model, dtype=args.dtype, quantize=f"int{args.bits}", group_size=args.group_size)
    out = save_model(model, args.output)  # with the tokenizer of the folder it came from
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    groups = f", groups of {args.group_size}" if args.bits == 4 else ""
    print(f"neoxko: wrote {out} ({size / 1e6:.1f} MB of int{args.bits} weights{groups} and {args.dtype} scales)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from neoxko.cli.train import export_checkpoint
    from neoxko.formats import gguf as gguf_format

    gguf = args.format == "gguf" or args.format is None and (str(args.output).endswith(".gguf") or args.quant)
    if str(args.source).lower().endswith(".gguf") and Path(args.source).is_file() and \
            not gguf_format.detect(Path(args.source)):
        raise NeoxkoError(f"{args.source} is not a GGUF file (it does not start with GGUF's magic bytes)")
    if not gguf and gguf_format.detect(Path(args.source)):  # a GGUF file back into a Hugging Face folder
        if args.quant or args.adapter:
            raise NeoxkoError("a GGUF file is written out as it is: --quant and --adapter apply to models exported "
                              "as GGUF, not read from it")
        folder = gguf_format.read_gguf(args.source, args.output)
        print(f"neoxko: wrote {folder} from {args.source} (the tokenizer rebuilt from the file)")
        return 0
    if not gguf:
        if args.quant or args.adapter:
            raise NeoxkoError("--quant and --adapter are for GGUF files: pass --format gguf (or an --output ending "
                              "in .gguf)")
        hint = "(a model is already a Hugging Face folder; --format gguf writes one for llama.cpp)"
        if not Path(args.source).exists():
            raise NeoxkoError(f"{args.source}: no such folder; pass a training run folder (with checkpoints/latest) "
                              f"or one of its checkpoints/step-N folders {hint}")
        if export_checkpoint(args.source, Path(args.output), args.tokenizer) is None:
            raise NeoxkoError(f"{args.source} has no checkpoint: pass a run folder (with checkpoints/latest) or one of "
                              f"its checkpoints/step-N folders {hint}")
        return 0
    from neoxko.checkpoint import load_model
    from neoxko.formats.gguf import write_gguf

    output = Path(args.output if str(args.output).endswith(".gguf") else f"{args.output}.gguf")
    with tempfile.TemporaryDirectory() as tmp:  # (a training checkpoint: its Hugging Face folder first)
        source = export_checkpoint(args.source, Path(tmp) / "hf", args.tokenizer) or args.source
        model = load_model(source, dtype="float32", adapter=args.adapter)
        path = write_gguf(model, output, args.quant or "bf16", name=Path(str(args.source)).name)
    print(f"neoxko: wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.quant or 'bf16'})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import adapter_base, read_config, resolve
    from neoxko.config import PRESETS

    if args.hardware:
        from dataclasses import asdict

        from neoxko.hardware import describe, detect
        from neoxko.pii import compiled

        hw = detect()
        pii = compiled.describe()
        print(json.dumps(asdict(hw) | {"choices": hw.choices(), "pii_core": pii}, indent=2) if args.json
              else f"{describe(hw)}\nPII core: {pii}")
        return 0
    folder = resolve(args.model, allow_patterns=["config.json", "adapter_config.json"])
    config = read_config(adapter_base(folder) or folder)  # (an adapter folder: its base model's)
    preset = next((name for name, c in PRESETS.items() if c == config), None)
    info = {
        "model": str(args.model), "preset": preset, "parameters": config.num_parameters,
        "head_size": config.head_size, "rotary_ndims": config.rotary_ndims, "config": config.to_hf(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {info['model']}")
    print(f"preset      {preset or '-'}")
    print(f"parameters  {config.num_parameters:,}")
    print(f"head_size   {config.head_size}  (rotary on {config.rotary_ndims} dims)")
    for key, value in config.to_hf().items():
        if key not in ("architectures", "model_type"):
            print(f"{key:<24}{value}")
    return 0
