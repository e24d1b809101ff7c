"""Training-step speed: neoxko's step against a plain transformers GPTNeoXForCausalLM step, same model size,
same data, same batch, this CPU. Prints tokens/s, model FLOP/s and the ratio.

    python benchmarks/train.py [--layers 6] [--hidden 512] [--seq-len 256] [--batch 8] [--steps 5] [--compile]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from neoxko.config import ModelConfig
from neoxko.model import GPTNeoX
from neoxko.train.build import init_weights
from neoxko.train.estimate import flops_per_token


def timed_steps(step, steps: int) -> float:
    step()  # warm-up (and compilation)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time neoxko with torch.compile per block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    config = ModelConfig(vocab_size=30080, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                         max_position_embeddings=max(2048, args.seq_len))
    torch.manual_seed(0)
    x = torch.randint(0, 30000, (args.batch, args.seq_len + 1))
    inputs, targets = x[:, :-1], x[:, 1:]

    ours = GPTNeoX(config)
    with torch.no_grad():
        init_weights(ours, "small_init", seed=0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf()))
    hf.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): v.clone()
                        for k, v in ours.state_dict().items()}, strict=False)

    def step_for(model, loss_fn, optimizer):
        def step():
            loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def ours_loss(model):
        return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())

    def hf_loss(model):
        return model(input_ids=inputs, labels=x[:, :-1].clone()).loss  # transformers shifts labels itself

    rows = {}
    rows["transformers"] = timed_steps(step_for(hf.train(), hf_loss, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
                                       args.steps)
    rows["neoxko"] = timed_steps(step_for(ours.train(), ours_loss,
                                          torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)), args.steps)
    def ours_loss_bf16(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())

    def hf_loss_bf16(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hf_loss(model)

    rows["transformers bf16 autocast"] = timed_steps(step_for(hf, hf_loss_bf16, torch.optim.AdamW(hf.parameters(),
                                                                                                  lr=1e-4)), args.steps)
    rows["neoxko bf16 autocast"] = timed_steps(step_for(ours, ours_loss_bf16,
                                                        torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)),
                                               args.steps)
    if args.compile:
        for block in ours.gpt_neox.layers:
            block.compile(fullgraph=True)
        rows["neoxko compiled"] = timed_steps(step_for(ours, ours_loss,
                                                       torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)),
                                              args.steps)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(config, args.seq_len) * tokens
    print(f"{config.num_parameters / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| implementation | s/step | tokens/s | GFLOP/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:.0f} | {flops / seconds / 1e9:.1f} | "
              f"{rows['transformers'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
