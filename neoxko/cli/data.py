"""`neoxko tokenizer train` and `neoxko data prepare | status`: the Korean data pipeline (`data pii*`: pii.py)."""

import argparse
import sys
from pathlib import Path

from neoxko.cli.pii import add_pii_commands
from neoxko.errors import NeoxkoError


def add_commands(commands) -> None:
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
    add_pii_commands(data_commands)
    prep = data_commands.add_parser("prepare", help="clean, filter, PII, dedup and tokenise text into token shards")
    prep.add_argument("inputs", nargs="*", help=".txt (a document a line), .csv/.tsv/.md (a document a file), "
                                                ".jsonl(.gz), .parquet files or folders")
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
    prep.add_argument("--slurm-partition", default=None, help="with --executor slurm (sinfo lists them)")
    prep.add_argument("--slurm-time", default="24:00:00", help="time limit of each Slurm task")
    prep.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2, help="memory per CPU of each Slurm task")
    prep.add_argument("--no-wait", action="store_true",
                      help="with --executor slurm: return once the jobs are submitted (see neoxko data status)")
    prep.add_argument("--ray-address", default=None,
                      help="with --executor ray: the cluster's host:port (default: Ray on this machine)")
    prep.add_argument("--verbose", action="store_true",
                      help="datatrove's log lines on stderr (default: in OUTPUT/logs/datatrove.log)")
    prep.set_defaults(run=run_prepare)
    status = data_commands.add_parser("status", help="the stages of a prepare run on Slurm: tasks done, jobs queued")
    status.add_argument("output", help="the run folder given to neoxko data prepare --output")
    status.set_defaults(run=run_status)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neoxko.config import pad_vocab_size
    from neoxko.tokenizer import read_texts, save_tokenizer, train_tokenizer

    absent = [p for p in args.inputs if not Path(p).is_file()]
    if absent:
        raise NeoxkoError(f"input file(s) not found: {', '.join(absent)}")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = train_tokenizer(read_texts(args.inputs, args.text_key), args.vocab_size, args.min_frequency)
    for warning in caught:
        print(f"neoxko: warning: {warning.message}", file=sys.stderr)
    save_tokenizer(tokenizer, args.output)
    rows = pad_vocab_size(tokenizer.vocab_size)
    print(f"wrote {args.output}: {tokenizer.vocab_size} tokens (embedding rows: {rows})")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from neoxko.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, tasks=args.tasks or args.workers,
        workers=args.workers, text_key=args.text_key, kobest_dir=args.kobest_dir, executor=args.executor,
        slurm_partition=args.slurm_partition, slurm_time=args.slurm_time, minhash_buckets=args.minhash_buckets,
        slurm_mem_per_cpu_gb=args.slurm_mem_per_cpu_gb, wait=not args.no_wait, ray_address=args.ray_address,
        holdout=args.holdout, hf_dataset=args.hf_dataset, verbose=args.verbose,
        hf_options={"split": args.hf_split} | ({"name": args.hf_config} if args.hf_config else {}),
    )
    prepare(config)
    if args.executor == "slurm" and args.no_wait:
        from neoxko.data.executors import slurm_states, status_table

        print(status_table(slurm_states(Path(args.output))))
        print(f"\nsubmitted; `neoxko data status {args.output}` follows the jobs and writes the report at the end")
        return 0
    report = Path(args.output) / "report.md"
    if report.exists():
        print(report.read_text(encoding="utf-8"))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """The table of stages; when every stage has finished, the report (written if it is not there yet).
    Exits 1 while jobs run, 2 (with the failed stage's log) when one failed, 0 when done."""
    from neoxko.data.executors import raise_failed, slurm_states, status_table
    from neoxko.data.prepare import collect_report, write_report

    out = Path(args.output)
    states = slurm_states(out)
    print(status_table(states))
    raise_failed(states)
    if not all(s.finished for s in states):
        return 1
    if not (out / "report.json").is_file():
        write_report(out, collect_report(out))
    print("\n" + (out / "report.md").read_text(encoding="utf-8"))
    return 0
