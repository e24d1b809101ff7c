"""torchrun for batch schedulers: the ranks, not the launcher, answer a preemption notice.

    python -m neoxko.train.launch [torchrun's arguments] -m neoxko train ...

torchrun answers SIGTERM with its own shutdown: it signals its workers, SIGKILLs them after
--shutdown-timeout (30 s) whether or not their checkpoint is written, and exits 1 with a SignalException
traceback, so Slurm records a failure. A scheduler signals every process of the job step, the ranks
included (Slurm's `--signal=TERM@N`, `scancel --signal=TERM`, a preemption's grace time). This launcher
is torchrun with SIGTERM and SIGUSR1 taken out of its hands: it passes them on to its workers (so a signal
that reached only the launcher still reaches the ranks) and keeps waiting, with no deadline of its own. The
ranks agree to stop, save one checkpoint and exit 0, and so does the launcher.
"""

import os
import signal
import sys
from pathlib import Path

PASSED_ON = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_HANDLES = "SIGINT,SIGHUP,SIGQUIT"


def pass_on(signum: int, frame) -> None:
    """Send the signal to the launcher's child processes (the ranks)."""
    print(f"neoxko: the launcher got {signal.Signals(signum).name}: the ranks save a checkpoint and stop",
          file=sys.stderr, flush=True)
    for pid in children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # ended meanwhile
            pass


def children() -> list[int]:
    """PIDs of this process's children (Linux /proc; elsewhere none: the scheduler signals the ranks itself)."""
    pids = []
    for task in Path("/proc/self/task").glob("*/children"):
        pids += [int(p) for p in task.read_text().split()]
    return pids


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for sig in PASSED_ON:
        signal.signal(sig, pass_on)
    args = get_args_parser().parse_args(["--signals-to-handle", TORCHRUN_HANDLES,
                                         *(sys.argv[1:] if argv is None else argv)])
    try:
        run(args)
    except ChildFailedError as e:
        # a rank that refused to start (exit 2) has said why in one line: no launcher traceback after it
        codes = sorted({f.exitcode for f in e.failures.values()})
        first = getattr(e.get_first_failure()[1], "message", "") or "see above"
        print(f"neoxko: {len(e.failures)} rank(s) on this node ended with exit code {', '.join(map(str, codes))}"
              + ("" if codes == [2] else f" (first: {first})"), file=sys.stderr, flush=True)
        return 2 if codes == [2] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
