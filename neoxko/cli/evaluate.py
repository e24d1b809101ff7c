"""`neoxko eval | perplexity`: KoBEST and held-out perplexity."""

import argparse
import functools
import importlib
import json
import os
import sys

from neoxko.builtin import DEFAULT_MODEL, MODEL_HELP
from neoxko.errors import NeoxkoError


def add_commands(commands) -> None:
    ev = commands.add_parser("eval", help="KoBEST few-shot evaluation (lm-evaluation-harness prompts and metrics)")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ev.add_argument("--tasks", default="kobest",
                    help="comma-separated: kobest or kobest_boolq,kobest_copa,...; any other lm-eval task name "
                         "(KMMLU, HAE-RAE, a local YAML's) runs through lm-evaluation-harness with --model neoxko")
    ev.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs (for tasks of your own)")
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

    commands.add_parser("harness", help="lm-evaluation-harness's own command line with --model neoxko registered: "
                        "neoxko harness --model neoxko --model_args pretrained=DIR --tasks ...", add_help=False)

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


def run_eval(args: argparse.Namespace) -> int:
    _quiet_other_ranks()
    from neoxko.evaluate.kobest import EvalSettings, evaluate, load_scorer, markdown_table, write_outputs
    from neoxko.evaluate.tasks import GROUPS, TASKS, resolve_tasks

    try:
        shots = [int(s) for s in args.shots.split(",")]
    except ValueError:
        raise NeoxkoError(f"--shots must be comma-separated integers, got {args.shots!r}") from None
    if any(s < 0 for s in shots):
        raise NeoxkoError("--shots must be >= 0")
    names = [t for t in args.tasks.split(",") if t]
    if args.include_path or any(t not in TASKS and t not in GROUPS for t in names):
        return _eval_with_lm_eval(args, names, shots)
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


def _eval_with_lm_eval(args: argparse.Namespace, tasks: list[str], shots: list[int]) -> int:
    """Tasks neoxko eval does not define itself: lm-evaluation-harness runs them with --model neoxko."""
    if args.backend != "neoxko" or args.prompt_style != "harness" or args.data_dir:
        raise NeoxkoError("lm-eval tasks run with lm-eval's own prompts and data on the neoxko backend; drop "
                          "--backend, --prompt-style and --data-dir (point the task's YAML at local data instead)")
    # first: it registers --model neoxko, and says how to install lm-eval where it is missing
    harness = importlib.import_module("neoxko.evaluate.harness")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    lm = harness.NeoxkoLM(pretrained=args.model, dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens)
    manager = _task_manager(TaskManager, args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise NeoxkoError(f"lm-eval knows no task {', '.join(unknown)}; neoxko eval's own are "
                          f"kobest_boolq, kobest_copa, kobest_hellaswag, kobest_sentineg, kobest_wic and the group "
                          "kobest; for a task of your own pass --include-path FOLDER_OF_YAMLS")
    for n in shots:
        result = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=n, limit=args.limit, task_manager=manager)
        if result is None:
            continue  # not rank 0
        print(f"{args.model}, {n}-shot (lm-evaluation-harness {lm_eval.__version__}, --model neoxko)")
        print(make_table(result))
        if args.output:
            from pathlib import Path

            folder = Path(args.output)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"lm_eval_{n}shot.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


@functools.cache
def _task_manager(cls, include_path: str | None):
    """lm-eval's task index (it reads every task's YAML: seconds), built once per process and folder."""
    return cls(include_path=include_path)


def run_harness(argv: list[str]) -> int:
    """lm-eval's own command line (`lm_eval ...`), with neoxko's model registered first."""
    _quiet_other_ranks()
    importlib.import_module("neoxko.evaluate.harness")  # first: registers --model neoxko (or says what is missing)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _quiet_other_ranks() -> None:
    """Under torchrun every rank runs the whole evaluation and rank 0 reports it: on the others lm-eval logs only
    errors, and progress bars that do not check the rank stay off (tqdm reads TQDM_DISABLE when first imported)."""
    if int(os.environ.get("RANK", "0")) > 0:
        os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")
        os.environ.setdefault("TQDM_DISABLE", "1")


def run_perplexity(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model
    from neoxko.evaluate.perplexity import check_tokenizer, perplexity, stream_tokens, unigram_perplexity

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = stream_tokens(args.data, args.max_tokens)
    note = check_tokenizer(args.data, args.model)
    if note:
        print(f"neoxko: {note}", file=sys.stderr)
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
