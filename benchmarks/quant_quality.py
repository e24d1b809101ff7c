"""What int8 and int4 cost in quality on a trained model: the built-in ko-small on held-out text.

For each way of running the linear layers, over every held-out token (windows of --seq tokens): perplexity, its
change against bf16, top-1 agreement with bf16 and the mean KL divergence from bf16's next-token distribution.
The rows separate the two roundings: torch's kernels keep the activations in bf16 (weight-only), neoxko's kernels
also round them to int8 per 128 inputs (neoxko.kernels), so "int4 g64, torch" against "int4 g64, neoxko" is the
cost of the activation rounding alone.

Held-out text, one of: ko-small's own held-out split (`--heldout DIR`, the heldout/ folder of `neoxko data prepare`
run as its card says), a text file of a document a line that ko-small never saw (`--text FILE`, e.g.
../shared/corpus/korsts_sentences.txt, which its card lists as left out of training), else the 2,000-odd tokens of
tests/fixtures/ko_heldout.jsonl.

    python benchmarks/quant_quality.py [--text ../shared/corpus/korsts_sentences.txt --max-tokens 65536] [--seq 512]
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "ko_heldout.jsonl"


def heldout_tokens(folder: str | None, text: str | None, max_tokens: int | None, tokenizer) -> tuple[np.ndarray, str]:
    if folder:
        from neoxko.evaluate.perplexity import stream_tokens

        return stream_tokens(folder, max_tokens), folder
    ids = []
    if text:
        for line in open(text, encoding="utf-8"):
            if line.strip():
                ids += tokenizer.encode(line.strip()) + [tokenizer.eos_id]
            if max_tokens and len(ids) > max_tokens:
                break
        return np.array(ids[:max_tokens], dtype=np.int64), text
    for line in FIXTURE.open(encoding="utf-8"):
        ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eos_id]
    return np.array(ids, dtype=np.int64), str(FIXTURE.relative_to(FIXTURE.parents[2]))


@torch.inference_mode()
def score(model, reference, windows: list[torch.Tensor]) -> dict:
    """Loss against the tokens, and against the reference model's predictions (top-1, KL), over all windows."""
    loss = agree = kl = count = 0.0
    for i, window in enumerate(windows):
        inputs, targets = window[None, :-1], window[None, 1:]
        logp = model(inputs).float().log_softmax(-1)[0]
        loss += F.nll_loss(logp, targets[0], reduction="sum").item()
        if reference is not None:
            ref = reference[i]
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
        count += targets.numel()
    return {"ppl": math.exp(loss / count), "agree": agree / count, "kl": kl / count, "tokens": int(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", help="token shards of ko-small's held-out split (neoxko data prepare's heldout/)")
    parser.add_argument("--text", help="a text file of a document a line that ko-small was not trained on")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    args = parser.parse_args()
    import neoxko  # before anything starts torch's threads
    from neoxko import kernels
    from neoxko.quantize import quantize_model

    print(describe())
    print(f"neoxko's kernels: {kernels.isa() or 'not built (' + kernels.why_not() + ')'}")
    tokenizer = neoxko.load_tokenizer("ko-small")
    tokens, source = heldout_tokens(args.heldout, args.text, args.max_tokens, tokenizer)
    tokens = tokens[:args.max_tokens] if args.max_tokens else tokens
    windows = [torch.from_numpy(tokens[s:s + args.seq + 1].astype(np.int64))
               for s in range(0, len(tokens) - 1, args.seq)]
    windows = [w for w in windows if len(w) > 1]

    kernels.INT4_DENSE_ROWS = 1 << 30  # int4 through its tiles at every length, as decoding multiplies (not the
    # dequantized dense product long prefills use), so the activation rounding is in the numbers
    dense = neoxko.load_model("ko-small", dtype="bfloat16")
    with torch.inference_mode():
        reference = [dense(w[None, :-1]).float().log_softmax(-1)[0] for w in windows]
    variants = {
        "bf16 (as shipped)": dense,
        "int8, torch (weight-only)": quantize_model(copy.deepcopy(dense), kernel=False),
        "int8, neoxko (activations int8 per 128)": quantize_model(copy.deepcopy(dense)),
        "int4 g32, torch (weight-only)": quantize_model(copy.deepcopy(dense), bits=4, group_size=32),
        "int4 g64, torch (weight-only)": quantize_model(copy.deepcopy(dense), bits=4, group_size=64, kernel=False),
        "int4 g64, neoxko (activations int8 per 128)": quantize_model(copy.deepcopy(dense), bits=4, group_size=64),
        "int4 g128, neoxko (activations int8 per 128)": quantize_model(copy.deepcopy(dense), bits=4, group_size=128),
    }
    print(f"ko-small on {sum(len(w) - 1 for w in windows):,} held-out tokens ({source}), windows of {args.seq}\n")
    print("| linear layers | perplexity | vs bf16 | top-1 agreement with bf16 | mean KL from bf16, nats |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, model in variants.items():
        got = score(model, reference, windows)
        base = base or got["ppl"]
        print(f"| {name} | {got['ppl']:.2f} | {got['ppl'] / base - 1:+.2%} | {got['agree']:.4f} | {got['kl']:.5f} |",
              flush=True)


if __name__ == "__main__":
    main()
