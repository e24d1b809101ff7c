"""The `neoxko` command line: one subcommand per stage."""

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from neoxko.checkpoint import DEFAULT_MODEL
from neoxko.errors import NeoxkoError

MODEL_HELP = f"model folder, hub id or built-in name (default: the built-in {DEFAULT_MODEL})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NeoxkoError as e:
        print(f"neoxko: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoxko", description="GPT-NeoX-Ko (Polyglot-Ko) toolkit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    gen.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers")
    gen.add_argument("--mask-pii", action="store_true",
                     help="replace phone, account and resident registration numbers in the output with tokens")
    gen.set_defaults(run=run_generate)

    srv = commands.add_parser("serve", help="OpenAI-compatible completions server with continuous batching")
    srv.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("NEOXKO_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $NEOXKO_API_KEY, else none)")
    srv.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    srv.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers")
    srv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    srv.add_argument("--mask-pii", action="store_true", help="mask PII in every response")
    srv.set_defaults(run=run_serve)

    qz = commands.add_parser("quantize", help="write an int8 weight-only copy of a model")
    qz.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    qz.add_argument("--output", required=True, help="folder for the quantized model (with the tokenizer)")
    qz.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the scales, embeddings and norms")
    qz.set_defaults(run=run_quantize)

    info = commands.add_parser("info", help="print a model's config and parameter count")
    info.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)
    ev = commands.add_parser("eval", help="KoBEST few-shot evaluation (lm-evaluation-harness prompts and metrics)")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ev.add_argument("--tasks", default="kobest", help="comma-separated: kobest or kobest_boolq,kobest_copa,...")
    ev.add_argument("--shots", default="0,5", help="comma-separated shot counts, e.g. 0,5,10,50")
    ev.add_argument("--limit", type=int, default=None, help="first N test documents per task")
    ev.add_argument("--data-dir", default=None, help="local skt/kobest_v1 folder (default: the hub dataset)")
    ev.add_argument("--prompt-style", choices=["harness", "polyglot"], default="harness")
    ev.add_argument("--backend", choices=["neoxko", "hf"], default="neoxko",
                    help="hf scores any transformers causal LM")
    ev.add_argument("--output", default=None, help="folder for results.json, samples.jsonl, results.md, scores.png")
    ev.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ev.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda if there is a GPU; under torchrun cuda:LOCAL_RANK)")
    ev.set_defaults(run=run_eval)

    ppl = commands.add_parser("perplexity", help="held-out perplexity over token shards, with the unigram baseline")
    ppl.add_argument("data", help="token shards from `neoxko data prepare` (a run's heldout/ or tokens/ folder)")
    ppl.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ppl.add_argument("--train-data", action="append", default=None,
                     help="training shards for the unigram baseline (repeatable)")
    ppl.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--json", action="store_true", help="print JSON")
    ppl.set_defaults(run=run_perplexity)

    tr = commands.add_parser("train", help="pretrain or continue pretraining (also under torchrun)")
    tr.add_argument("--config", default=None, help="YAML file of TrainConfig settings")
    tr.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the mesh, per-rank memory, FLOPs and speed, and check that it fits; no training")
    tr.add_argument("--world-size", type=int, default=None,
                    help="for --dry-run: ranks to plan for (default: $WORLD_SIZE)")
    tr.add_argument("--ranks-per-node", type=int, default=None,
                    help="for --dry-run: ranks per node, the HSDP shard size (default: $LOCAL_WORLD_SIZE)")
    tr.set_defaults(run=run_train)

    ex = commands.add_parser("export", help="write a Hugging Face folder from a training checkpoint")
    ex.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoints/step-N folder")
    ex.add_argument("--output", required=True, help="folder for config.json and model.safetensors")
    ex.add_argument("--tokenizer", default=None, help="tokenizer to copy beside it (default: the run's tokenizer)")
    ex.set_defaults(run=run_export)

    pl = commands.add_parser("plot", help="draw RUN_DIR/loss.png from a training run's log")
    pl.add_argument("run_dir")
    pl.set_defaults(run=run_plot)

    tokenizer = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_commands.add_parser("train", help="train from .txt (a document a line) and .jsonl files")
    train.add_argument("inputs", nargs="+", help="text or JSONL files")
    train.add_argument("--output", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    train.add_argument("--vocab-size", type=int, default=30000, help="BPE entries; the 3 PII tokens come after")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--text-key", default="text", help="JSONL field that holds the text")
    train.set_defaults(run=run_tokenizer_train)
    data = commands.add_parser("data", help="the Korean data pipeline")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    pii = data_commands.add_parser("pii", help="replace PII in a stream of text or JSONL lines")
    pii.add_argument("input", nargs="?", default="-", help="file of text (a document a line) or JSONL; - is stdin")
    pii.add_argument("--output", default="-", help="where to write; - is stdout")
    pii.add_argument("--text-key", default=None, help="JSONL field to clean (default: plain text lines)")
    pii.set_defaults(run=run_pii)
    pii_eval = data_commands.add_parser("pii-eval", help="score the PII replacer on a labelled JSONL set")
    pii_eval.add_argument("labelled", help='JSONL of {"text": ..., "spans": [{"start", "end", "label"}]}')
    pii_eval.add_argument("--errors", action="store_true", help="print every line the replacer gets wrong")
    pii_eval.set_defaults(run=run_pii_eval)
    prep = data_commands.add_parser("prepare", help="clean, filter, PII, dedup and tokenise text into token shards")
    prep.add_argument("inputs", nargs="*", help=".txt (a document a line), .jsonl(.gz), .parquet files or folders")
    prep.add_argument("--hf-dataset", default=None, help="read a Hugging Face dataset instead of files")
    prep.add_argument("--hf-split", default="train")
    prep.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    prep.add_argument("--output", required=True, help="run folder (an interrupted run resumes in place)")
    prep.add_argument("--tokenizer", required=True, help="tokenizer folder, tokenizer.json or hub id")
    prep.add_argument("--workers", type=int, default=1, help="parallel processes")
    prep.add_argument("--tasks", type=int, default=None, help="shards of the work (default: --workers)")
    prep.add_argument("--text-key", default="text", help="JSONL/Parquet field with the text")
    prep.add_argument("--kobest-dir", default=None, help="skt/kobest_v1 folder: drop documents overlapping its tests")
    prep.add_argument("--holdout", type=float, default=0.0,
                      help="share of documents kept out of training, in heldout/ (e.g. 0.01)")
    prep.add_argument("--minhash-buckets", type=int, default=14, help="MinHash bands (8 hashes each)")
    prep.add_argument("--executor", choices=["local", "slurm", "ray"], default="local")
    prep.add_argument("--slurm-partition", default=None)
    prep.add_argument("--slurm-time", default="24:00:00")
    prep.set_defaults(run=run_prepare)
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    from neoxko.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, tasks=args.tasks or args.workers,
        workers=args.workers, text_key=args.text_key, kobest_dir=args.kobest_dir, executor=args.executor,
        slurm_partition=args.slurm_partition, slurm_time=args.slurm_time, minhash_buckets=args.minhash_buckets,
        holdout=args.holdout, hf_dataset=args.hf_dataset,
        hf_options={"split": args.hf_split} | ({"name": args.hf_config} if args.hf_config else {}),
    )
    prepare(config)
    report = Path(args.output) / "report.md"
    if report.exists():
        print(report.read_text(encoding="utf-8"))
    return 0


def run_pii(args: argparse.Namespace) -> int:
    import contextlib
    from collections import Counter

    from neoxko.data.pii import replace_pii_counted
    from neoxko.errors import NeoxkoError

    totals: Counter = Counter()
    invalid = 0
    with contextlib.ExitStack() as stack:
        source = sys.stdin.buffer if args.input == "-" else stack.enter_context(_open(args.input, "rb"))
        sink = sys.stdout.buffer if args.output == "-" else stack.enter_context(_open(args.output, "wb"))
        for n, raw in enumerate(source, 1):
            # Bytes that are not UTF-8 pass through untouched (surrogateescape); the line is counted.
            line = raw.decode("utf-8", errors="surrogateescape")
            invalid += line != raw.decode("utf-8", errors="ignore")
            if args.text_key is None:
                text, counts = replace_pii_counted(line)
            else:
                try:
                    row = json.loads(line)
                    row[args.text_key], counts = replace_pii_counted(row[args.text_key])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise NeoxkoError(
                        f"{args.input}:{n}: not a JSON object with a {args.text_key!r} text field") from None
                text = json.dumps(row, ensure_ascii=False) + "\n"
            sink.write(text.encode("utf-8", errors="surrogateescape"))
            totals.update(counts)
    summary = ", ".join(f"{k} {totals[k]}" for k in ("rrn", "tel", "acc"))
    print(f"replaced: {summary}; lines with invalid UTF-8 (passed through): {invalid}", file=sys.stderr)
    return 0


def _open(path: str, mode: str):
    from neoxko.errors import NeoxkoError

    try:
        return open(path, mode)
    except OSError as e:
        raise NeoxkoError(f"cannot open {path}: {e.strerror}") from None


def run_pii_eval(args: argparse.Namespace) -> int:
    from neoxko.data.pii_score import errors, read_labelled, score

    items = read_labelled(args.labelled)
    print(score(items).table())
    if args.errors:
        print("\n".join(errors(items)))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from neoxko.errors import NeoxkoError
    from neoxko.evaluate.kobest import EvalSettings, evaluate, load_scorer, markdown_table, write_outputs
    from neoxko.evaluate.tasks import resolve_tasks

    try:
        shots = [int(s) for s in args.shots.split(",")]
    except ValueError:
        raise NeoxkoError(f"--shots must be comma-separated integers, got {args.shots!r}") from None
    if any(s < 0 for s in shots):
        raise NeoxkoError("--shots must be >= 0")
    settings = EvalSettings(tasks=resolve_tasks(args.tasks.split(",")), shots=shots, data_dir=args.data_dir,
                            prompt_style=args.prompt_style, limit=args.limit, batch_tokens=args.batch_tokens,
                            extra={"backend": args.backend, "dtype": args.dtype})
    scorer = load_scorer(args.model, args.backend, args.dtype, args.device, args.batch_tokens)
    results, samples = evaluate(scorer, settings)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank holds the gathered results; rank 0 writes them
    if args.output:
        write_outputs(args.output, args.model, settings, results, samples)
    print(markdown_table(args.model, settings, results))
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model
    from neoxko.evaluate.perplexity import perplexity, stream_tokens, unigram_perplexity

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = stream_tokens(args.data, args.max_tokens)
    result = {"model": str(args.model), "data": args.data}
    result["model_ppl"] = perplexity(model, tokens, args.seq_len or model.config.max_position_embeddings,
                                     args.batch_size)
    if args.train_data:
        result["unigram_ppl"] = unigram_perplexity(args.train_data, tokens, model.config.vocab_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'':<10}{'tokens':>10}{'nats/token':>12}{'perplexity':>12}")
    for name in ("model_ppl", "unigram_ppl"):
        if name in result:
            r = result[name]
            print(f"{name.removesuffix('_ppl'):<10}{r['tokens']:>10,}{r['loss']:>12.4f}{r['perplexity']:>12.2f}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from neoxko.train.config import TrainConfig
    from neoxko.train.loop import train

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.dry_run:
        from neoxko.train.estimate import dry_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(cfg, world, args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return 0
    try:
        last = train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and last:
        print(json.dumps(last))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from neoxko.train import checkpoint

    path = Path(args.checkpoint)
    folder = path if (path / "meta.json").is_file() else checkpoint.latest(path)
    if folder is None:
        raise NeoxkoError(f"{path} has no checkpoint: pass a run folder (with checkpoints/latest) or one of its "
                          "checkpoints/step-N folders")
    tokenizer = args.tokenizer
    run_config = folder.parent.parent / "config.json"
    if tokenizer is None and run_config.is_file():
        tokenizer = json.loads(run_config.read_text(encoding="utf-8")).get("tokenizer")
    dest = checkpoint.export(folder, Path(args.output), tokenizer)
    print(f"neoxko: wrote {dest} from {folder}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from neoxko.errors import NeoxkoError
    from neoxko.train.loop import plot_run

    if not (Path(args.run_dir) / "log.jsonl").is_file():
        raise NeoxkoError(f"{args.run_dir} has no log.jsonl; is it a `neoxko train` run folder?")
    path = plot_run(Path(args.run_dir))
    if path is None:
        raise NeoxkoError("plotting needs matplotlib (pip install matplotlib) and a non-empty log")
    print(path)
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neoxko.config import pad_vocab_size
    from neoxko.errors import NeoxkoError
    from neoxko.tokenizer import read_texts, save_tokenizer, train_tokenizer

    absent = [p for p in args.inputs if not Path(p).is_file()]
    if absent:
        raise NeoxkoError(f"input file(s) not found: {', '.join(absent)}")
    tokenizer = train_tokenizer(read_texts(args.inputs, args.text_key), args.vocab_size, args.min_frequency)
    save_tokenizer(tokenizer, args.output)
    rows = pad_vocab_size(tokenizer.vocab_size)
    print(f"wrote {args.output}: {tokenizer.vocab_size} tokens (embedding rows: {rows})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model
    from neoxko.data.pii import PIIStream
    from neoxko.generate import Sampling, stream
    from neoxko.tokenizer import load_tokenizer

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    guard = PIIStream() if args.mask_pii else None
    for piece in stream(model, tokenizer, prompt, args.max_new_tokens, sampling, args.stop, args.compile):
        sys.stdout.write(guard.push(piece) if guard else piece)
        sys.stdout.flush()
    sys.stdout.write((guard.flush() if guard else "") + "\n")
    if guard:
        counts = ", ".join(f"{label} {n}" for label, n in sorted(guard.masked.items())) or "none"
        print(f"neoxko: masked {guard.total} PII value(s): {counts}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model
    from neoxko.serve.engine import Engine
    from neoxko.serve.server import ServeSettings, serve
    from neoxko.tokenizer import load_tokenizer

    if args.max_batch < 1 or args.max_queue < 0:
        raise NeoxkoError("--max-batch must be at least 1 and --max-queue at least 0")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    engine = Engine(model, tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id,
                    max_batch=args.max_batch, max_queue=args.max_queue)
    name = args.served_model_name or str(args.model)
    settings = ServeSettings(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                             mask_pii=args.mask_pii)
    try:
        server = serve(engine, tokenizer, settings, args.host, args.port)
    except OSError as e:
        engine.close()
        raise NeoxkoError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    host, port = server.server_address[:2]
    cache = model.gpt_neox.layers[0].attention.kv_cache
    cache_gb = 2 * cache.k.numel() * cache.k.element_size() * len(model.gpt_neox.layers) / 1e9
    print(f"neoxko: serving {name!r} on http://{host}:{port}/v1 ({args.max_batch} rows, KV cache {cache_gb:.2f} GB, "
          f"{'int8' if args.quantize else str(next(model.parameters()).dtype).removeprefix('torch.')})"
          + (", API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a service manager's stop: finish cleanly
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model, resolve, save_model
    from neoxko.tokenizer import copy_tokenizer_files

    model = load_model(args.model, dtype=args.dtype, quantize="int8")
    out = save_model(model, args.output)
    copy_tokenizer_files(resolve(args.model), out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"neoxko: wrote {out} ({size / 1e6:.1f} MB of int8 weights and {args.dtype} scales)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import read_config, resolve
    from neoxko.config import PRESETS

    config = read_config(resolve(args.model, allow_patterns=["config.json"]))
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


if __name__ == "__main__":
    sys.exit(main())
