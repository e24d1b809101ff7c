"""PII replacement: neoxko against ko-pii (pip install ko-pii) on quality and single-core speed.

Quality: strict and lenient per-label scores (POLICY.md conventions) on the shared dev set and on the
repo's own cases. Speed: MB/s of finding PII over a sample of the shared corpus, one core, both tools.

    python benchmarks/pii.py [--shared ../shared] [--sample-mb 4]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from neoxko.data.pii import Span, find_pii
from neoxko.data.pii_score import read_labelled, score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_pii import read_cases  # noqa: E402

KO_PII_LABELS = {"RRN": "rrn", "FRN": "rrn", "PHONE": "tel", "ACCOUNT": "acc"}


def ko_pii_find():
    import ko_pii

    def find(text: str) -> list[Span]:
        found = [Span(d.start, d.end, KO_PII_LABELS[d.label]) for d in ko_pii.detect_all(text)
                 if d.label in KO_PII_LABELS]
        return sorted(found, key=lambda s: s.start)
    return find


def corpus_sample(shared: Path, megabytes: float) -> list[str]:
    texts, size = [], 0
    files = sorted((shared / "corpus").glob("*.*[lt]"))
    per_file = megabytes * 1e6 / max(len(files), 1)
    for path in files:
        taken = 0
        for line in path.open(encoding="utf-8"):
            text = json.loads(line)["text"] if path.suffix == ".jsonl" else line
            texts.append(text)
            taken += len(text.encode())
            if taken >= per_file:
                break
        size += taken
    return texts


def throughput(find, texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        find(text)
    return sum(len(t.encode()) for t in texts) / (time.perf_counter() - start) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--sample-mb", type=float, default=4.0)
    args = parser.parse_args()
    tools = {"neoxko": find_pii}
    try:
        tools["ko-pii"] = ko_pii_find()
    except ImportError:
        print("ko-pii is not installed (pip install ko-pii): neoxko only\n")
    sets = {"repo cases": read_cases()}
    if (args.shared / "pii" / "pii_dev.jsonl").exists():
        sets["shared dev"] = read_labelled(args.shared / "pii" / "pii_dev.jsonl")
    print("| set | tool | label | strict P | strict R | lenient P | lenient R | no-PII lines changed |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for set_name, items in sets.items():
        for tool, find in tools.items():
            r = score(items, find)
            for label in ("rrn", "tel", "acc"):
                s, le = r.strict[label], r.lenient[label]
                print(f"| {set_name} | {tool} | {label} | {s.precision:.3f} | {s.recall:.3f} | {le.precision:.3f} | "
                      f"{le.recall:.3f} | {r.negative_changed}/{r.negative_lines} |")
    if (args.shared / "corpus").exists():
        texts = corpus_sample(args.shared, args.sample_mb)
        speeds = {tool: throughput(find, texts) for tool, find in tools.items()}
        size = sum(len(t.encode()) for t in texts) / 1e6
        print(f"\nthroughput on {size:.1f} MB of the shared corpus (all files), one core:")
        for tool, speed in speeds.items():
            print(f"  {tool}: {speed:.2f} MB/s")
        if "ko-pii" in speeds:
            print(f"  ratio: {speeds['neoxko'] / speeds['ko-pii']:.1f}x")


if __name__ == "__main__":
    main()
