"""PII replacement: neoxko against ko-pii (pip install ko-pii) on quality and single-core speed.

Quality: strict and lenient per-label scores (POLICY.md conventions) on the sets `neoxko data pii-eval` reports
(the real-text set's tune and held-out halves, the report seeds of both generators; the rules were tuned on the
tune half and on seed 1), the shared dev set and the repo's own cases. Speed: MB/s of finding PII on one core,
both tools, over (a) number-dense text (generated, seed 7: every line holds a PII value or a hard negative) and
(b) a sample of the shared corpus.

    python benchmarks/pii.py [--shared ../shared] [--sample-mb 4] [--held-out-lines 3000]
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neoxko.pii import compiled
from neoxko.pii.replace import Span, find_pii
from neoxko.pii.score import builtin_sets, read_labelled, score
from neoxko.pii.synth import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
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


def throughput(find, texts: list[str], repeats: int = 3) -> float:
    """MB/s, the best of a few runs (the machine is shared), each from cold: neoxko's memo of the cues before a
    number is emptied first, so a run gains only from text that recurs within it, as real input does."""
    from neoxko.pii import rules

    best = float("inf")
    for _ in range(repeats):
        rules.forget()
        start = time.perf_counter()
        for text in texts:
            find(text)
        best = min(best, time.perf_counter() - start)
    return sum(len(t.encode()) for t in texts) / best / 1e6


def pure_python_throughput(texts: list[str]) -> float:
    """throughput of the same modules run by CPython (NEOXKO_PII_PURE=1), in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.pkl"
        path.write_bytes(pickle.dumps(texts))
        code = (f"import pickle, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                "from neoxko.pii import compiled; assert not compiled.LIBRARIES\n"
                "from pii import throughput; from neoxko.pii.replace import find_pii\n"
                f"print(throughput(find_pii, pickle.loads(open({str(path)!r}, 'rb').read()), 5))")
        done = subprocess.run([sys.executable, "-c", code], env=os.environ | {"NEOXKO_PII_PURE": "1"},
                              capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def generated(seed: int, lines: int) -> list[tuple[str, list[Span]]]:
    return [(r["text"], [Span(s["start"], s["end"], "tel" if s["label"] == "tell" else s["label"]) for s in r["spans"]])
            for r in generate(seed, lines)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--sample-mb", type=float, default=4.0)
    parser.add_argument("--held-out-lines", type=int, default=3000)
    args = parser.parse_args()
    print(describe())
    print(f"neoxko's PII core: {compiled.describe()}\n")
    tools = {"neoxko": find_pii}
    try:
        tools["ko-pii"] = ko_pii_find()
    except ImportError:
        print("ko-pii is not installed (pip install ko-pii): neoxko only\n")
    sets = {name: items for name, (items, _) in builtin_sets(args.held_out_lines).items()}
    sets["repo cases"] = read_cases()
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
    samples = {"number-dense (generated, seed 7)": [t for t, _ in generated(7, 6000)]}
    if (args.shared / "corpus").exists():
        samples["shared corpus sample"] = corpus_sample(args.shared, args.sample_mb)
    pure = bool(compiled.LIBRARIES)  # (the compiled core runs here: the same code in CPython beside it)
    heads = " | ".join(f"{tool} MB/s" for tool in tools)
    print(f"\n| text | MB | {heads} |" + (" ratio |" if len(tools) > 1 else "")
          + (" neoxko pure Python MB/s | compiled / pure |" if pure else ""))
    print("|---|---:|" + "---:|" * (len(tools) + (len(tools) > 1) + 2 * pure))
    for name, texts in samples.items():
        speeds = {tool: throughput(find, texts, 5 if tool == "neoxko" else 1) for tool, find in tools.items()}
        size = sum(len(t.encode()) for t in texts) / 1e6
        ratio = f" {speeds['neoxko'] / speeds['ko-pii']:.1f}x |" if "ko-pii" in speeds else ""
        if pure:
            python = pure_python_throughput(texts)
            ratio += f" {python:.2f} | {speeds['neoxko'] / python:.2f}x |"
        print(f"| {name} | {size:.2f} | " + " | ".join(f"{v:.2f}" for v in speeds.values()) + " |" + ratio)


if __name__ == "__main__":
    main()
