"""Fine-tuning step time and peak memory: neoxko LoRA against neoxko full fine-tuning and against transformers +
peft LoRA, the same model size, the same rows of instruction data, in one run. Each variant runs in a fresh
process, so that its peak resident memory (ru_maxrss) is its own.

    python benchmarks/finetune.py [--layers 12] [--hidden 1024] [--seq-len 256] [--batch 4] [--steps 4] [--bf16]

Rows: multi-turn conversations of chatbot_qa.jsonl pairs (../shared/corpus; a generated Korean stand-in when it
is absent) in the `chat` template, tokenised by ko-small's tokenizer, the loss on the answers only. A step is
forward, backward and AdamW on the trainable parameters; neoxko runs the vocabulary projection on the answer
positions only, as `neoxko finetune` does (transformers computes every position's logits). LoRA: r 16,
alpha 32, dropout 0.05, on query_key_value, dense, dense_h_to_4h and dense_4h_to_h, in both implementations.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "chatbot_qa.jsonl"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
VARIANTS = ["neoxko full", "neoxko LoRA", "transformers + peft LoRA"]


def rows(seq_len: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, targets) of batch conversations cut to seq_len tokens, and where the text came from."""
    from neoxko.chat_template import load_template
    from neoxko.finetune.data import Example, encode
    from neoxko.tokenizer import load_tokenizer

    if SHARED.is_file():
        pairs = [json.loads(line)["text"].split("\n", 1) for line in SHARED.open(encoding="utf-8")]
        source = "chatbot_qa.jsonl"
    else:
        pairs = [[f"{i}번째 질문입니다. 오늘 날씨는 어떤가요?", f"{i}번째 답입니다. 맑고 따뜻합니다."]
                 for i in range(4000)]
        source = "generated stand-in (../shared absent)"
    tok = load_tokenizer("ko-small")
    template = load_template("chat")[0]
    inputs, targets, at = [], [], 0
    while len(inputs) < batch:
        messages = []
        while True:
            q, a = pairs[at % len(pairs)]
            at += 1
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            enc = encode(Example(tuple(messages), "bench"), template, tok)
            if len(enc.ids) >= seq_len:
                break
        inputs.append(enc.ids[:seq_len])
        targets.append(enc.labels[:seq_len])
    return torch.tensor(inputs), torch.tensor(targets), source


def config(args):
    from neoxko.config import ModelConfig

    return ModelConfig(vocab_size=30080, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, rotary_pct=0.5,
                       max_position_embeddings=max(2048, args.seq_len))


def child(args) -> None:
    """One variant: build, time the steps, print JSON."""
    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    inputs, targets = data["inputs"], data["targets"]
    c = config(args)
    count = int((targets != -100).sum())
    torch.manual_seed(0)
    if args.variant.startswith("neoxko"):
        from neoxko.finetune.job import frozen_to_bf16
        from neoxko.finetune.lora import LoraSettings, apply_lora
        from neoxko.model import GPTNeoX, init_weights

        with torch.device("meta"):  # built as `neoxko finetune` builds it: no memory until the final dtypes
            model = GPTNeoX(c)
            if args.variant == "neoxko LoRA":
                apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, targets=tuple(TARGETS)))
                if args.bf16:  # frozen weights need no float32 copy
                    frozen_to_bf16(model)
        model.to_empty(device="cpu")
        model.setup_rope()
        with torch.no_grad():
            init_weights(model)
        from neoxko.train.data import Batch

        batch = Batch(inputs, targets, sparse=True)  # as `neoxko finetune`: the head on the answer positions only
        loss_fn = lambda: batch.loss(model) / count  # noqa: E731
        fused = True
    else:
        import peft
        import transformers

        # bf16: the base built in bf16 (as from_pretrained(dtype=torch.bfloat16) loads it); peft keeps the
        # adapters in float32 (its autocast_adapter_dtype default)
        torch.set_default_dtype(torch.bfloat16 if args.bf16 else torch.float32)
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**c.to_hf()))
        torch.set_default_dtype(torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                        task_type="CAUSAL_LM"))
        loss_fn = lambda: F.cross_entropy(model(input_ids=inputs).logits.float().flatten(0, 1),  # noqa: E731
                                          targets.flatten(), ignore_index=-100)
        fused = None  # transformers' Trainer default (adamw_torch): foreach
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=fused)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "trainable": sum(p.numel() for p in trainable), "parameters": total}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen weights stored in bf16")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    inputs, targets, source = rows(args.seq_len, args.batch)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.pt"
        torch.save({"inputs": inputs, "targets": targets}, data)
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--data", str(data)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("layers", "hidden", "seq_len", "batch", "steps", "threads")]
            cmd += ["--bf16"] if args.bf16 else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    c = config(args)
    answer = int((targets != -100).sum())
    print(describe())
    print(f"{c.num_parameters / 1e6:.1f}M-parameter GPT-NeoX ({args.layers} layers, d_model {args.hidden}), "
          f"{args.batch} rows x {args.seq_len} tokens of {source} ({answer} answer tokens), "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, {args.steps} timed steps after 2\n")
    print("| variant | trainable | share | s/step | tokens/s | peak RSS GB | LoRA speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ours = results["neoxko LoRA"]["seconds"]
    for name, r in results.items():
        print(f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / r['parameters']:.2f}% | {r['seconds']:.3f} | "
              f"{args.batch * args.seq_len / r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | "
              f"{r['seconds'] / ours:.2f}x |")
    full, lora, peft_ = results["neoxko full"], results["neoxko LoRA"], results["transformers + peft LoRA"]
    print(f"\nneoxko LoRA step vs transformers + peft: {peft_['seconds'] / lora['seconds']:.2f}x faster (target 1.2x); "
          f"LoRA peak memory / full fine-tuning: {lora['peak_rss_gb'] / full['peak_rss_gb']:.2f} (target at most 0.5)")


if __name__ == "__main__":
    main()
