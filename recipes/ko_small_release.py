"""Turn a finished ko-small training run into the built-in model: weights, tokenizer and a measured model card.

    python recipes/ko_small_release.py --run runs/ko-small --data runs/ko-small-data [--out neoxko/builtin/ko-small]

Writes bfloat16 safetensors, the tokenizer files, the training config, the loss curve and README.md (the
model card) into --out. Every number in the card is measured here: held-out perplexity of the model
(float32, bfloat16 and int8) against the unigram baseline on the same tokens, the training curve from
log.jsonl, and samples drawn with fixed seeds.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from neoxko import Sampling, generate, load_model, load_tokenizer, save_model
from neoxko.evaluate.perplexity import perplexity, stream_tokens, unigram_perplexity
from neoxko.quantize import quantize_model

PROMPTS = ["대한민국의 수도는", "이 영화는 정말", "청원 취지: 최근", "제1조(목적) 이 법은", "오늘 친구랑",
           "대법원은 원심 판결을"]
FILES = ["nsmc_reviews.txt", "petitions.jsonl", "laws.jsonl", "precedents.jsonl", "kobill_konlpy.jsonl",
         "chatbot_qa.jsonl", "question_pair.txt"]


def curve(log: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in log.open(encoding="utf-8")]
    return rows, [r for r in rows if "eval_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the training run folder (holds model/ and log.jsonl)")
    parser.add_argument("--data", required=True, help="the `neoxko data prepare --holdout` folder it trained on")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "neoxko" / "builtin" / "ko-small"))
    parser.add_argument("--kobest", default=None, help="results.md of `neoxko eval --output DIR` on the model")
    args = parser.parse_args()
    run, data, out = Path(args.run), Path(args.data), Path(args.out)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)

    model32 = load_model(run / "model", dtype="float32")
    save_model(model32.to(torch.bfloat16), out, tokenizer=run / "model")
    shutil.copy(Path(__file__).with_name("ko-small.yaml"), out / "train.yaml")
    if (run / "loss.png").is_file():
        shutil.copy(run / "loss.png", out / "loss.png")

    tokens = stream_tokens(data / "heldout")
    seq = config["seq_len"]
    ppl = {"float32": perplexity(load_model(out, dtype="float32"), tokens, seq),
           "bfloat16": perplexity(load_model(out), tokens, seq),
           "int8": perplexity(quantize_model(load_model(out)), tokens, seq)}
    unigram = unigram_perplexity([data / "tokens"], tokens, model32.config.vocab_size)

    tokenizer = load_tokenizer(out)
    model = load_model(out)
    samples = []
    for i, prompt in enumerate(PROMPTS):
        text = generate(model, tokenizer, prompt, 48, Sampling(temperature=0.8, top_k=40, top_p=0.95,
                                                               repetition_penalty=1.1, seed=i))
        samples.append((prompt, text))

    rows, evals = curve(run / "log.jsonl")
    report = json.loads((data / "report.json").read_text(encoding="utf-8"))
    steps, tokens_per_step = config["max_steps"], config["global_batch"] * config["seq_len"]
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in rows) * config["log_every"]  # a row per log_every
    results = {"parameters": model.config.num_parameters, "heldout_ppl": ppl, "unigram_ppl": unigram,
               "train_tokens_seen": steps * tokens_per_step, "data": report, "evals": evals,
               "samples": samples, "measured": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    kobest = Path(args.kobest).read_text(encoding="utf-8") if args.kobest else None
    write_card(out, config, model, results, rows, seconds, kobest)
    print((out / "README.md").read_text(encoding="utf-8"))


def write_card(out: Path, config: dict, model, results: dict, rows: list, seconds: float,
               kobest: str | None) -> None:
    c, ppl, unigram, report = model.config, results["heldout_ppl"], results["unigram_ppl"], results["data"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    evals = results["evals"]
    shown = sorted(set(range(0, len(evals), max(1, len(evals) // 8))) | {len(evals) - 1}) if evals else []
    curve_rows = "\n".join(f"| {r['step']} | {r['loss']:.3f} | {r['eval_loss']:.3f} | {r['eval_perplexity']:.1f} |"
                           for r in (evals[i] for i in shown))
    sample_rows = "\n".join(f"- **{p}** → {t.strip()!r}" for p, t in results["samples"])
    kobest_section = ""
    if kobest:  # results.md without its title line
        kobest_section = ("## KoBEST\n\n`neoxko eval` (lm-evaluation-harness prompts), macro-F1. A random guess "
                          "scores about 0.5 (0.25 on HellaSwag) and one answer for every question about 0.33; "
                          "ko-small is at that floor.\n\n"
                          + kobest.split("\n", 1)[1].strip() + "\n\n")
    text = f"""# ko-small: neoxko's built-in Korean GPT-NeoX

A small GPT-NeoX-Ko (the architecture of Polyglot-Ko: parallel residual, rotary embeddings on half of each
head, GELU MLP 4x wide, the 30,000-entry byte-level BPE with the `<|acc|>` `<|tel|>` `<|rrn|>` privacy
tokens, 30,080 embedding rows), trained by neoxko on one 2-core CPU so that every neoxko command works
out of the box, offline. It is a toy for trying the toolkit, not a useful Korean language model.

## Model

| | ko-small | Polyglot-Ko 1.3B |
|---|---:|---:|
| layers | {c.num_hidden_layers} | 24 |
| d_model | {c.hidden_size} | 2048 |
| d_ff | {c.intermediate_size} | 8192 |
| heads x size | {c.num_attention_heads} x {c.head_size} | 16 x 128 |
| rotary dims | {c.rotary_ndims} | 64 |
| context | {c.max_position_embeddings} | 2048 |
| vocabulary (rows) | 30,003 ({c.vocab_size:,}) | 30,003 ({30080:,}) |
| tied input/output embeddings | {c.tie_word_embeddings} | False |
| parameters | {c.num_parameters:,} | 1,331,810,304 |

Weights: `model.safetensors`, bfloat16, {size / 1e6:.1f} MB. Loads in neoxko and in transformers
(`GPTNeoXForCausalLM`).

## Data

The permissively licensed files of the project's shared Korean corpus (`../shared/corpus`): {", ".join(FILES)}
(CC0-1.0, public-domain statutes, court rulings and bills under Korean Copyright Act art. 7, and MIT).
Left out: the CC BY-SA files (web comments, which are also offensive, news titles, novels, KorSTS and
KLUE sentences). Prepared with `neoxko data prepare --holdout 0.01 --kobest-dir ...`: {report['read']['documents']:,}
documents read, {report['quality']['documents_out']:,} after the quality filter, PII replaced
({report['pii']['tel']} phone numbers, {report['pii']['acc']} account numbers, {report['pii']['rrn']} resident
registration numbers), {report['decontamination']['documents_in'] - report['decontamination']['documents_out']}
documents overlapping KoBEST test sets dropped, {report['exact_dedup']['duplicates_removed']} exact and
{report['minhash_dedup']['near_duplicates_removed']} near duplicates removed. That left
{report['output']['tokens']:,} training tokens in {report['output']['documents']:,} documents and a held-out
set of {report['heldout']['tokens']:,} tokens in {report['heldout']['documents']:,} documents (1% of documents,
chosen by a hash of the document id, after deduplication). The tokenizer was trained on the same files with
`neoxko tokenizer train --vocab-size 30000`.

## Training

`neoxko train --config train.yaml` (the file is next to this card): from scratch with GPT-NeoX's small_init
and wang_init, sequence length {config['seq_len']}, {config['global_batch']} sequences per step
({config['global_batch'] * config['seq_len']:,} tokens), {config['max_steps']} steps
({results['train_tokens_seen']:,} tokens, {results['train_tokens_seen'] / report['output']['tokens']:.2f} epochs),
AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 on 2-D weights), learning rate {config['lr']} after
{config['warmup_steps']} warmup steps, cosine to {config['min_lr']}, gradient clipping 1.0, bfloat16
autocast, seed {config['seed']}, on a 2-core AMD EPYC (Zen 4) CPU: about {seconds / 60:.0f} minutes of
training steps at about {sum(r['tokens_per_s'] for r in rows) / len(rows):,.0f} tokens/s.

| step | train loss | held-out loss (8 batches) | held-out perplexity |
|---:|---:|---:|---:|
{curve_rows}

![loss](loss.png)

## Held-out perplexity

All {ppl['float32']['tokens']:,} held-out tokens, windows of {config['seq_len']} tokens
(`neoxko perplexity HELDOUT --train-data TOKENS`):

| model | nats/token | perplexity |
|---|---:|---:|
| unigram baseline (training-set token frequencies, add-one) | {unigram['loss']:.3f} | {unigram['perplexity']:.1f} |
| ko-small, float32 | {ppl['float32']['loss']:.3f} | {ppl['float32']['perplexity']:.1f} |
| ko-small, bfloat16 (as shipped) | {ppl['bfloat16']['loss']:.3f} | {ppl['bfloat16']['perplexity']:.1f} |
| ko-small, int8 weight-only (`--quantize int8`) | {ppl['int8']['loss']:.3f} | {ppl['int8']['perplexity']:.1f} |

The model's perplexity is {unigram['perplexity'] / ppl['bfloat16']['perplexity']:.1f}x lower than the unigram
baseline's.

## Samples

`neoxko generate` with temperature 0.8, top-k 40, top-p 0.95, repetition penalty 1.1, 48 new tokens,
seeds 0-{len(results['samples']) - 1}:

{sample_rows}

{kobest_section}## Limits

- It has seen {results['train_tokens_seen'] / 1e6:.1f} million tokens of four genres (movie reviews, petitions,
  statutes and court rulings, short dialogue): its Korean looks fluent for a sentence or two, then drifts;
  it knows few facts and gets most of them wrong; on KoBEST it is close to chance.
- Its context is {c.max_position_embeddings} tokens.
- Personal data: phone and account numbers in the training text were replaced by `<|tel|>` and `<|acc|>`;
  it can still produce made-up numbers. Use `--mask-pii` on `neoxko generate` and `neoxko serve`.
- The movie reviews include the NSMC test reviews: do not evaluate it on NSMC.
- Licence of the weights: the training data is CC0, public domain and MIT; the weights are released with
  neoxko under its licence.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
