"""ko-small-chat, neoxko's built-in chat model: prepare its data, and turn a finished run into the built-in.

    python recipes/ko_small_chat.py prepare --corpus ../shared/corpus --out runs/ko-small-chat-data
    neoxko finetune --config recipes/ko-small-chat.yaml
    python recipes/ko_small_chat.py release --run runs/ko-small-chat [--out neoxko/builtin/ko-small-chat]

prepare turns chatbot_qa.jsonl (a question and its answer on two lines of one "text") into chat JSONL, one
user and one assistant message per line. release copies the adapter with its tokenizer and chat template and
writes the model card, every number in it measured here: the held-out answer loss of ko-small (the adapter at
step 0) and of ko-small-chat on the examples the run held out, and answers to held-out questions.
"""

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def prepare(corpus: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    kept = skipped = 0
    with (corpus / "chatbot_qa.jsonl").open(encoding="utf-8") as src, (out / "chat.jsonl").open("w") as dst:
        for line in src:
            question, _, answer = json.loads(line)["text"].partition("\n")
            if not question.strip() or not answer.strip():
                skipped += 1
                continue
            messages = [{"role": "user", "content": question.strip()},
                        {"role": "assistant", "content": answer.strip()}]
            dst.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            kept += 1
    print(f"wrote {out / 'chat.jsonl'}: {kept} conversations ({skipped} lines without a question and an answer)")


def answer_loss(model, batches) -> dict:
    """Mean loss per answer token over all held-out examples (the loss fine-tuning minimises)."""
    from neoxko.train.data import IGNORE

    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(batches), 16):
            batch = batches.batch(first, min(16, len(batches) - first))
            logits = model(batch.inputs, **batch.model_kwargs).float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                                       ignore_index=IGNORE, reduction="sum").item()
            count += int((batch.targets != IGNORE).sum())
    return {"loss": total / count, "tokens": count}


def release(run: Path, out: Path) -> None:
    from neoxko import Sampling, generate, load_model
    from neoxko.chat_template import render
    from neoxko.finetune.config import FinetuneConfig
    from neoxko.finetune.job import Finetuning

    cfg = FinetuneConfig(**json.loads((run / "config.json").read_text(encoding="utf-8")))  # the run's settings
    job = Finetuning(cfg)
    job.setup(rank=1)  # the same examples, split and rows as the run (rank 1: writes nothing)
    held = job.rows["held_out"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run / "adapter", out)
    base = load_model(cfg.model, dtype="float32").eval()
    tuned = load_model(out, dtype="float32").eval()
    losses = {"ko-small": answer_loss(base, held), "ko-small-chat": answer_loss(tuned, held)}

    tokenizer = job.tokenizer
    examples = held_out_examples(job)[:8]
    answers = []
    for i, e in enumerate(examples):
        prompt = render(job.template, [e.messages[0]], True, bos_token="", eos_token=tokenizer.eos_token)
        greedy = generate(tuned, tokenizer, prompt, 48, Sampling(temperature=0))
        sampled = generate(tuned, tokenizer, prompt, 48, Sampling(temperature=0.7, top_k=40, top_p=0.95,
                                                                  repetition_penalty=1.1, seed=i))
        before = generate(base, tokenizer, prompt, 32, Sampling(temperature=0))
        answers.append({"question": e.messages[0]["content"], "reference": e.messages[1]["content"],
                        "ko-small-chat greedy": greedy.strip(), "ko-small-chat sampled": sampled.strip(),
                        "ko-small greedy": before.strip()})
    rows = [json.loads(line) for line in (run / "log.jsonl").open(encoding="utf-8")]
    results = {"answer_loss": losses, "data": job.report, "evals": [r for r in rows if "eval_loss" in r],
               "answers": answers, "trainable_parameters": adapter_parameters(out),
               "base": {k: v for k, v in json.loads((ROOT / "neoxko" / "builtin" / "ko-small" / "results.json")
                                                    .read_text(encoding="utf-8")).items()
                        if k in ("parameters", "train_tokens_seen")},
               "machine": cpu_name(), "measured": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copy(ROOT / "recipes" / "ko-small-chat.yaml", out / "finetune.yaml")
    write_card(out, cfg, results, rows)
    print((out / "README.md").read_text(encoding="utf-8"))


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "a CPU")
    return f"a {os.cpu_count()}-core {name}"


def held_out_examples(job) -> list:
    """The examples the run held out, in file order."""
    from neoxko.finetune.data import read_examples, split_held_out

    cfg = job.cfg
    return split_held_out(read_examples(cfg.data, cfg.data_format, cfg.system), cfg.eval_split, cfg.seed)[1]


def adapter_parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())


def write_card(out: Path, cfg, results: dict, rows: list) -> None:
    loss, data = results["answer_loss"], results["data"]
    evals = results["evals"]
    curve = "\n".join(f"| {r['step']} | {r['loss']:.3f} | {r['eval_loss']:.3f} |" for r in evals)
    answers = "\n".join(
        f"| {a['question']} | {a['reference']} | {a['ko-small-chat greedy']} | {a['ko-small-chat sampled']} | "
        f"{a['ko-small greedy'][:40] or '(ends at once)'} |" for a in results["answers"])
    seconds = sum(cfg.global_batch * cfg.seq_len / r["tokens_per_s"] for r in rows) * cfg.log_every
    size = (out / "adapter_model.safetensors").stat().st_size
    text = f"""# ko-small-chat: neoxko's built-in chat model

A LoRA adapter on the built-in `ko-small`, fine-tuned by `neoxko finetune` on short Korean question and
answer pairs so that `neoxko chat` and `neoxko serve`'s `/v1/chat/completions` work offline out of the box.
Like ko-small it is a toy for trying the toolkit: its answers are short, casual and often beside the point.

    neoxko chat                                   # ko-small-chat is chat's default model
    neoxko serve --model ko-small-chat            # then POST /v1/chat/completions

## Files

`adapter_config.json` and `adapter_model.safetensors` (peft's format, {size / 1e6:.1f} MB, float32:
{results['trainable_parameters']:,} parameters, r {cfg.lora_r}, alpha {cfg.lora_alpha:g} on
{', '.join(cfg.lora_targets)}), the tokenizer with the `chat` template in `tokenizer_config.json`,
`finetune.yaml` (the run's settings) and `results.json` (every number below). `peft.PeftModel.from_pretrained`
loads it onto transformers' `GPTNeoXForCausalLM` of ko-small; `neoxko merge-lora ko-small
neoxko/builtin/ko-small-chat --output DIR` writes the merged model.

## Data

`chatbot_qa.jsonl` of the shared corpus (songys/Chatbot_data, MIT): {data['train']['examples']:,} pairs for
training, {data['held_out']['examples']:,} held out ({cfg.eval_split:.0%}, chosen by a hash of each example's
text), one user and one assistant turn each, rendered by the `chat` template (`### 사용자: ...`,
`### 어시스턴트: ...<|endoftext|>`). Packed {data['train']['rows']:,} rows of up to {cfg.seq_len} tokens, no example
attending to another; the loss falls on the {data['train']['target_tokens']:,} answer tokens only.
ko-small's pretraining text included this file, so the held-out pairs were held out from fine-tuning,
not from pretraining.

## Training

`neoxko finetune --config finetune.yaml`: {cfg.max_steps} steps of {cfg.global_batch} rows
({cfg.max_steps * cfg.global_batch / data['train']['rows']:.1f} epochs), AdamW, learning rate {cfg.lr:g} after
{cfg.warmup_steps} warmup steps, cosine to {cfg.min_lr:g}, LoRA dropout {cfg.lora_dropout}, bfloat16 autocast with
the frozen weights in bfloat16, seed {cfg.seed}, on {results['machine']}: about {seconds / 60:.0f} minutes
(the CPU was shared with other work for most of the run).

| step | train answer loss | held-out answer loss |
|---:|---:|---:|
{curve}

## Held-out answer loss

Mean cross-entropy per answer token over all {loss['ko-small']['tokens']:,} answer tokens of the held-out pairs,
float32:

| model | nats/token | perplexity |
|---|---:|---:|
| ko-small (the adapter at step 0) | {loss['ko-small']['loss']:.3f} | {math.exp(loss['ko-small']['loss']):.1f} |
| ko-small-chat | {loss['ko-small-chat']['loss']:.3f} | {math.exp(loss['ko-small-chat']['loss']):.1f} |

## Answers to held-out questions

Greedy, and sampled (temperature 0.7, top-k 40, top-p 0.95, repetition penalty 1.1, seed = row), 48 new
tokens at most; the last column is ko-small without the adapter, greedy, on the same prompt ("ends at once":
its first token is the end-of-text token).

| question | reference answer | ko-small-chat greedy | ko-small-chat sampled | ko-small |
|---|---|---|---|---|
{answers}

## Limits

- It learned the form (a short, friendly one-line reply, then the end-of-text token) more than any
  knowledge: ko-small has {results['base']['parameters'] / 1e6:.0f} million parameters and saw
  {results['base']['train_tokens_seen'] / 1e6:.1f} million tokens; most answers are stock phrases
  ("잘할 수 있을 거예요.") whatever the question.
- One turn of training data: it takes multi-turn history, but was not taught to use it.
- Personal data: use `--mask-pii` on `neoxko chat` and `neoxko serve`.
- Licence: the data is MIT, the base model's data CC0, public domain and MIT; the adapter is released with
  neoxko under its licence.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    p.add_argument("--out", default="runs/ko-small-chat-data")
    r = commands.add_parser("release")
    r.add_argument("--run", default="runs/ko-small-chat")
    r.add_argument("--out", default=str(ROOT / "neoxko" / "builtin" / "ko-small-chat"))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(Path(args.corpus), Path(args.out))
    else:
        release(Path(args.run), Path(args.out))


if __name__ == "__main__":
    main()
