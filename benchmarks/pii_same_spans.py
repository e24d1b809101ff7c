"""Do two versions of neoxko's PII replacer find the same spans? For refactors and speed work that must not
change a span: each version runs in its own process over the same texts (both generators, a sample of the shared
corpus) and the spans are compared text by text.

    python benchmarks/pii_same_spans.py OTHER_CHECKOUT [--shared ../shared] [--sample-mb 2]

OTHER_CHECKOUT is a folder holding another version of the package (`git worktree add /tmp/base HEAD~1`).
"""

import argparse
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def texts(shared: Path, megabytes: float) -> list[str]:
    from neoxko.pii import genres, synth

    sys.path.insert(0, str(HERE))
    from pii import corpus_sample

    out = [r["text"] for r in synth.generate(7, 6000)] + [r["text"] for r in genres.generate(3, 3000)]
    if (shared / "corpus").exists():
        out += corpus_sample(shared, megabytes)
    return out


def spans_of(root: Path, texts_file: Path, out_file: Path) -> None:
    """Run find_pii of the package under root over the texts, in a process of its own."""
    module = "neoxko.pii.replace" if (root / "neoxko" / "pii").is_dir() else "neoxko.data.pii"  # (the older layout)
    code = (f"import importlib, pickle, sys; sys.path.insert(0, {str(root)!r})\n"
            f"replacer = importlib.import_module({module!r}); find_pii = replacer.find_pii\n"
            f"assert replacer.__file__.startswith({str(root)!r}), replacer.__file__  # (not an installed copy)\n"
            f"print({str(root)!r}, 'runs', type(replacer.__loader__).__name__)  # (a compiled core or Python)\n"
            f"texts = pickle.load(open({str(texts_file)!r}, 'rb'))\n"
            f"pickle.dump([[tuple(s) for s in find_pii(t)] for t in texts], open({str(out_file)!r}, 'wb'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _show(text: str, spans: list[tuple[int, int, str]]) -> list[tuple[str, str]]:
    return [(text[start:end], label) for start, end, label in spans]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="a folder with another version of the neoxko package")
    parser.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    parser.add_argument("--sample-mb", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = texts(args.shared, args.sample_mb)
        pickle.dump(sample, open(tmp / "texts.pkl", "wb"))
        for name, root in (("this", HERE.parent), ("other", args.other.resolve())):
            spans_of(root, tmp / "texts.pkl", tmp / f"{name}.pkl")
        this, other = (pickle.load(open(tmp / f"{name}.pkl", "rb")) for name in ("this", "other"))
    differ = [i for i, (a, b) in enumerate(zip(this, other, strict=True)) if a != b]
    print(f"{len(sample)} texts, {sum(map(len, this))} spans here, {sum(map(len, other))} in {args.other}: "
          f"{len(differ)} texts differ")
    for i in differ[:20]:
        print(f"- {_show(sample[i], other[i])} -> {_show(sample[i], this[i])}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
