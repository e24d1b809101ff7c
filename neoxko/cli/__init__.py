"""The `neoxko` command line: one subcommand per stage."""

import argparse
import os
import sys

from neoxko import __version__
from neoxko.cli import data, evaluate, finetune, models, train
from neoxko.errors import EveryRankError, NeoxkoError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        if argv[:1] == ["harness"]:  # every argument after it is lm-eval's own
            return evaluate.run_harness(argv[1:])
        args = parser.parse_args(argv)
        return args.run(args)
    except NeoxkoError as e:
        if not isinstance(e, EveryRankError) or int(os.environ.get("RANK", "0")) == 0:
            print(f"neoxko: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.filename is None:
            raise
        print(f"neoxko: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoxko", description="GPT-NeoX-Ko (Polyglot-Ko) toolkit")
    parser.add_argument("--version", action="version", version=f"neoxko {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage in (models, evaluate, train, finetune, data):
        stage.add_commands(commands)
    return parser
