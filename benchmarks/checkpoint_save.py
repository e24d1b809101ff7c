"""How long one sharded checkpoint save takes, against the time a scheduler gives between its stop signal and
SIGKILL (Slurm: `--signal=TERM@N` seconds before the limit, then KillWait; torchrun: --shutdown-timeout, 30 s).

Saves a model with its AdamW state through neoxko's Checkpointer (DCP, digests, fsync, rename) in one process
on this machine's disk, and projects the card's sizes from the measured rate (the checkpoint is 12 bytes a
parameter: fp32 weights and Adam's two moments).

    python benchmarks/checkpoint_save.py [--layers 12 --hidden 768]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from neoxko.config import PRESETS, ModelConfig
from neoxko.hardware import detect
from neoxko.model import GPTNeoX
from neoxko.train.checkpoint import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    config = ModelConfig(vocab_size=30080, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden)
    model = GPTNeoX(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # the moments exist, as in a run
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        saver = Checkpointer(Path(folder))
        times = []
        for step in (1, 2):
            start = time.perf_counter()
            saved = saver.save(model, optimizer, step)
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in saved.iterdir())
    seconds = min(times)
    rate = size / seconds
    print(f"CPU: {detect().capability}; torch {torch.__version__}")
    print(f"model: {params / 1e6:.0f}M parameters; checkpoint {size / 1e9:.2f} GB (model + AdamW) in {seconds:.2f} s "
          f"(best of {len(times)}): {rate / 1e9:.2f} GB/s written, digested and fsynced\n")
    print("| model | checkpoint GB | save at this rate, one writer s | 32 nodes writing in parallel s |")
    print("|---|---:|---:|---:|")
    for name in ("polyglot-ko-1.3b", "polyglot-ko-12.8b"):
        with torch.device("meta"):
            n = sum(p.numel() for p in GPTNeoX(PRESETS[name]).parameters())
        total = n * size / params
        print(f"| {name} | {total / 1e9:.0f} | {total / rate:.0f} | {total / rate / 32:.1f} |")


if __name__ == "__main__":
    main()
