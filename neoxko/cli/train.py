"""`neoxko train | export | plot`: pretraining runs."""

import argparse
import json
import os
from pathlib import Path

from neoxko.cli.settings_help import epilog
from neoxko.errors import NeoxkoError


def add_commands(commands) -> None:
    tr = commands.add_parser("train", help="pretrain or continue pretraining (also under torchrun)",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=epilog("train/config", "TrainConfig", "neoxko train model=polyglot-ko-1.3b "
                                           "data='[shards]' max_steps=2000 lr=2e-4"))
    tr.add_argument("--config", default=None, help="YAML file of TrainConfig settings")
    tr.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the mesh, per-rank memory, FLOPs and speed, and check that it fits; no training")
    tr.add_argument("--world-size", type=int, default=None,
                    help="for --dry-run: ranks to plan for (default: $WORLD_SIZE)")
    tr.add_argument("--ranks-per-node", type=int, default=None,
                    help="for --dry-run: ranks per node, the HSDP shard size (default: $LOCAL_WORLD_SIZE)")
    tr.set_defaults(run=run_train)

    pl = commands.add_parser("plot", help="draw RUN_DIR/loss.png from a training run's log")
    pl.add_argument("run_dir")
    pl.set_defaults(run=run_plot)


def run_train(args: argparse.Namespace) -> int:
    from neoxko.train.config import TrainConfig

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.dry_run:
        from neoxko.train.estimate import dry_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(cfg, world, args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return 0
    return run_job(cfg)


def run_job(cfg, job=None) -> int:
    """Train (pretraining, or the given job), take the process group down, and print the last log row on rank 0."""
    from neoxko.train.loop import train

    try:
        last = train(cfg, job)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and last:
        print(json.dumps(last))
    return 0


def export_checkpoint(source: str, output: Path, tokenizer: str | None) -> Path | None:
    """A training checkpoint (a run folder's latest, or a checkpoints/step-N folder) written as a Hugging Face folder;
    None where source is no training checkpoint."""
    from neoxko.train import checkpoint

    path = Path(source)
    if not path.is_dir():
        return None
    folder = path if (path / "meta.json").is_file() else checkpoint.latest(path)
    if folder is None:
        return None
    run_config = folder.parent.parent / "config.json"
    if tokenizer is None and run_config.is_file():
        tokenizer = json.loads(run_config.read_text(encoding="utf-8")).get("tokenizer")
    dest = checkpoint.export(folder, output, tokenizer)
    print(f"neoxko: wrote {dest} from {folder}")
    return dest


def run_plot(args: argparse.Namespace) -> int:
    from neoxko.train.loop import plot_run

    if not (Path(args.run_dir) / "log.jsonl").is_file():
        raise NeoxkoError(f"{args.run_dir} has no log.jsonl; is it a `neoxko train` run folder?")
    path = plot_run(Path(args.run_dir))
    if path is None:
        raise NeoxkoError("plotting needs matplotlib (pip install matplotlib) and a non-empty log")
    print(path)
    return 0
