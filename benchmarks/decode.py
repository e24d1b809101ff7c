"""Prefill and decode speed of neoxko against transformers on the Polyglot-Ko 1.3B shape, CPU, int8 and int4.

Both models share the same random weights. Decode tokens/s is measured as transformers users see it:
generate(N + 1 tokens) minus generate(1 token), greedy, so prefill is not counted. Two ceilings are
printed for batch 1: the memory-bandwidth ceiling (bytes of weights read per token over the measured
read bandwidth) and the matrix-vector ceiling (torch's own F.linear time on the model's shapes).

With bfloat16 in --dtypes, a second table sets int8 decoding (neoxko.quantize, eager and compiled) and int4
(groups of 64, eager), each through neoxko's kernels where they are built, against transformers and neoxko in
bfloat16 at batch 1, each with its bandwidth ceiling, and reports their logit agreement with bfloat16
on a 64-token prompt.

With --llamacpp, llama.cpp (llama-cpp-python, benchmarks/llamacpp.py) runs the same random weights, converted to
GGUF bf16, q8_0 and q4_0 by llama.cpp's own tools, on the same prompt token ids at every batch size, beside
neoxko bf16, int8 and int4 (eager, and compiled at batch 1) and transformers bf16: prefill and decode tokens/s,
weight bytes read per token, the bandwidth ceiling and the ratios. Those engines run interleaved, one run each a
round, best round each (--repeat rounds), with the read bandwidth timed in the same rounds; --llamacpp-only prints
that table alone.

    python benchmarks/decode.py [--threads 2] [--prompt 64] [--new-tokens 16] [--dtypes float32,bfloat16]
    python benchmarks/decode.py --dtypes bfloat16 --batches 1,8 --llamacpp-only --repeat 6 [--build-llamacpp]
"""

import argparse
import copy
import time

# isort: off
import neoxko  # noqa: F401  (first: it sets GOMP_SPINCOUNT before torch loads libgomp, as the neoxko command does)
import torch
# isort: on
import torch.nn.functional as F
from machine import describe

from neoxko.config import PRESETS
from neoxko.generate import generate_tokens
from neoxko.hardware import default_dtype, detect
from neoxko.model import GPTNeoX
from neoxko.quantize import quantize_model


def build_models(dtype: torch.dtype):
    import transformers

    config = PRESETS["polyglot-ko-1.3b"]
    hf_config = transformers.GPTNeoXConfig(**config.to_hf())
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = GPTNeoX(config)
    ours.to_empty(device="cpu")
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ours = ours.to(dtype).eval()
    ours.setup_rope("cpu")
    hf = transformers.GPTNeoXForCausalLM._from_config(hf_config, dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False, assign=True)  # the same tensors, no copy
    hf.lm_head.weight = ours.embed_out.weight
    return ours, hf


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def time_ours(model, prompts, new_tokens, repeat, compile=False):
    """(best seconds for prompt + 1 token, best for prompt + new_tokens + 1): ours_once, repeat times."""
    return interleaved({"ours": ours_once(model, prompts, new_tokens, compile)}, repeat)["ours"]


def time_hf(model, prompts, new_tokens, repeat):
    return interleaved({"hf": hf_once(model, prompts, new_tokens)}, repeat)["hf"]


def read_bandwidth() -> float:
    """Bytes per second that torch reads from memory (best of 5 sums over 1 GiB)."""
    x = torch.ones(2**28, dtype=torch.float32)
    return x.numel() * 4 / best_of(lambda: x.sum(), 5)


def matvec_ceiling(model: GPTNeoX) -> float:
    """Tokens/s at batch 1 if the model's linear layers ran at torch's own F.linear speed, nothing else.

    Every layer's own weights are used in turn, so they come from memory as in decoding (one
    weight, timed again and again, would sit in the 32 MB L3 cache and look faster).
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(1, n, dtype=model.gpt_neox.embed_in.weight.dtype) for n in {m.in_features for m in linears}}
    return 1 / best_of(lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in linears], 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--llamacpp", action="store_true", help="time llama.cpp (bf16, q8_0, q4_0) beside neoxko")
    parser.add_argument("--build-llamacpp", action="store_true", help="pip install llama-cpp-python if missing")
    parser.add_argument("--llamacpp-only", action="store_true",
                        help="only the llama.cpp table (which has transformers bf16 and compiled neoxko rows too)")
    args = parser.parse_args()
    args.llamacpp |= args.llamacpp_only
    torch.set_num_threads(args.threads)
    print(describe())
    dtype, why = detect().default_dtype(torch.bfloat16)
    print(f"CPU class: {'native bf16' if detect().native_bf16 else detect().capability + ' without native bf16'}; "
          f"the default path (no flags) computes bf16 weights in {str(dtype)[6:]}: {why}")
    bandwidth = read_bandwidth()
    print(f"threads {args.threads}, read bandwidth {bandwidth / 1e9:.1f} GB/s, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy, torch {torch.__version__}\n")
    if not args.llamacpp_only:
        print("| dtype | batch | prefill tok/s neoxko | transformers | ratio | decode tok/s neoxko | "
              "neoxko compiled | transformers | ratio | ratio compiled | bandwidth ceiling | matvec ceiling |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, hf = build_models(dtype)
        weight_bytes = weight_bytes_read(ours)
        for batch in map(int, args.batches.split(",")) if not args.llamacpp_only else ():
            prompts = torch.randint(5, 30000, (batch, args.prompt))
            o1, on = time_ours(ours, prompts, args.new_tokens, args.repeat)
            c1, cn = time_ours(ours, prompts, args.new_tokens, args.repeat, compile=True) if batch == 1 else (o1, on)
            h1, hn = time_hf(hf, prompts, args.new_tokens, args.repeat)
            tokens = batch * args.new_tokens
            pre_o, pre_h = batch * args.prompt / o1, batch * args.prompt / h1
            dec_o, dec_c, dec_h = tokens / (on - o1), tokens / (cn - c1), tokens / (hn - h1)
            ceilings = "| |"
            if batch == 1:
                ceilings = f"{bandwidth / weight_bytes:.1f} | {matvec_ceiling(ours):.1f} |"
            compiled = f"{dec_c:.2f} | {dec_h:.2f} | {dec_o / dec_h:.2f}x | {dec_c / dec_h:.2f}x"
            if batch > 1:  # compile=True compiles the batch-1 step only
                compiled = f"- | {dec_h:.2f} | {dec_o / dec_h:.2f}x | -"
            print(f"| {dtype_name} | {batch} | {pre_o:.1f} | {pre_h:.1f} | {pre_o / pre_h:.2f}x | {dec_o:.2f} | "
                  f"{compiled} | {ceilings}", flush=True)
            if dtype == torch.bfloat16 and batch == 1:
                bf16 = {"transformers bf16": (dec_h, weight_bytes), "neoxko bf16": (dec_o, weight_bytes),
                        "neoxko bf16 compiled": (dec_c, weight_bytes)}
                int8_rows = int8_table(ours, prompts, args, bf16, bandwidth)
        if dtype == torch.bfloat16 and args.llamacpp:
            llama_rows = llamacpp_table(ours, hf, args, bandwidth)
        del ours, hf
    if "bfloat16" in args.dtypes and not args.llamacpp_only:
        print(int8_rows)
    if args.llamacpp:
        print(llama_rows)


def llamacpp_table(ours, hf, args, bandwidth: float) -> str:
    """neoxko bf16, int8 and int4 (eager, and compiled at batch 1) against llama.cpp bf16, q8_0 and q4_0 and
    transformers bf16, on the same weights and prompts."""
    import tempfile
    from pathlib import Path

    import llamacpp

    from neoxko.checkpoint import save_model

    lib = llamacpp.ensure(args.build_llamacpp)
    work = Path(tempfile.mkdtemp(prefix="neoxko-llamacpp-"))
    start = time.perf_counter()
    save_model(ours, work / "hf", tokenizer="ko-small")  # the tokenizer only fills the GGUF's vocabulary
    ggufs = {"bf16": llamacpp.convert(lib, work / "hf", work / "bf16.gguf")}
    for kind in ("q8_0", "q4_0"):
        ggufs[kind] = llamacpp.quantize(lib, ggufs["bf16"], work / f"{kind}.gguf", kind)
    setup = time.perf_counter() - start
    default = default_dtype(torch.bfloat16)  # what `neoxko generate` with no --dtype computes bf16 weights in here
    bf16_name = "neoxko bf16" + (" (the default: no flags)" if default == torch.bfloat16 else "")
    engines = {bf16_name: ours, "neoxko int8": quantize_model(copy.deepcopy(ours)),
               "neoxko int4 (groups of 64)": quantize_model(copy.deepcopy(ours), bits=4, group_size=64)}
    if default != torch.bfloat16:
        engines[f"neoxko default (no flags): {str(default)[6:]}"] = copy.deepcopy(ours).to(default)
    rows, speeds = [], {}
    ones = torch.ones(2**28, dtype=torch.float32)  # the read bandwidth, timed in the rounds too
    for batch in map(int, args.batches.split(",")):
        torch.manual_seed(batch)
        prompts = torch.randint(5, 30000, (batch, args.prompt))
        runners = {"transformers bf16": (hf_once(hf, prompts, args.new_tokens), weight_bytes_read(ours))}
        for name, model in engines.items():
            for compile in (False, True) if batch == 1 else (False,):  # compile=True compiles batch 1 only
                runners[name + (", compiled" if compile else "")] = (
                    ours_once(model, prompts, args.new_tokens, compile), weight_bytes_read(model))
        timers = {kind: llamacpp.Timer(lib, path, batch, args.prompt + args.new_tokens + 1, args.threads)
                  for kind, path in ggufs.items()}
        for kind, timer in timers.items():
            runners[f"llama.cpp {kind}"] = (timer.once(prompts.tolist(), args.new_tokens),
                                            llamacpp.weight_bytes(lib, ggufs[kind]))
        best = interleaved({"read": read_once(ones)} | {name: once for name, (once, _) in runners.items()}, args.repeat)
        for timer in timers.values():
            timer.close()
        bandwidth = max(bandwidth, ones.numel() * 4 / best.pop("read")[0])
        for name, (first, total) in best.items():
            speeds[name, batch] = (batch * args.prompt / first, batch * args.new_tokens / (total - first),
                                   runners[name][1])
    for (name, batch), (prefill, decode, nbytes) in speeds.items():
        ceiling = bandwidth / nbytes * batch
        rows.append(f"| {name} | {batch} | {prefill:.1f} | {decode:.2f} | {nbytes / 1e9:.2f} | {ceiling:.1f} | "
                    f"{decode / ceiling:.0%} |")
    pairs = [(bf16_name, "llama.cpp bf16", 0.9), ("neoxko int8", "llama.cpp q8_0", 1.0),
             ("neoxko int4 (groups of 64)", "llama.cpp q4_0", 1.0)]
    ratios = [f"| {name} / {theirs} | {batch} | {speeds[name, batch][1] / speeds[theirs, batch][1]:.2f}x | "
              f"{target:.1f}x |" for batch in map(int, args.batches.split(",")) for ours_name, theirs, target in pairs
              for name in (ours_name, ours_name + ", compiled") if (name, batch) in speeds]
    ratios += [f"| prefill {name} / transformers bf16 | {batch} | "
               f"{speeds[name, batch][0] / speeds['transformers bf16', batch][0]:.2f}x | 1.0x |"
               for batch in map(int, args.batches.split(",")) for name in engines]
    return "\n".join([
        "", f"neoxko against llama.cpp {lib.__version__} (llama-cpp-python, built for this CPU; GGUFs by its own "
            f"converter and quantizer in {setup:.0f} s), same random weights and prompt ids, greedy, "
            f"{args.threads} threads, engines interleaved, best of {args.repeat} rounds; bandwidth ceiling at the "
            f"best read bandwidth seen in the rounds, {bandwidth / 1e9:.1f} GB/s:", "",
        "| engine | batch | prefill tok/s | decode tok/s | weights read GB | bandwidth ceiling tok/s | of ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "| ratio | batch | measured | target |", "|---|---:|---:|---:|", *ratios])


def ours_once(model, prompts, new_tokens: int, compile: bool):
    """neoxko's timer: warmed up (and compiled) now; each call gives (seconds for the prompt and one token, seconds
    for the prompt and new_tokens + 1), as transformers users measure it."""
    def run(n):
        start = time.perf_counter()
        list(generate_tokens(model, prompts.tolist(), n, compile=compile))
        return time.perf_counter() - start
    run(2)
    return lambda: (run(1), run(new_tokens + 1))


@torch.inference_mode()
def hf_once(model, prompts, new_tokens: int):
    def run(n):
        start = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - start
    run(2)
    return torch.inference_mode()(lambda: (run(1), run(new_tokens + 1)))


def read_once(ones):
    def run():
        start = time.perf_counter()
        ones.sum()
        return (time.perf_counter() - start,) * 2
    return run


def interleaved(runners: dict, repeat: int) -> dict:
    """Every engine once a round, round after round, best of the rounds per engine: this machine's memory bandwidth
    drifts by up to 2x within minutes (30-63 GB/s), so engines timed one after another would be compared across
    drifts; interleaved, a slow spell slows them all alike."""
    best = {}
    for _ in range(repeat):
        for name, once in runners.items():
            got = once()
            best[name] = tuple(min(a, b) for a, b in zip(best.get(name, got), got, strict=True))
    return best


def weight_bytes_read(model) -> int:
    """Bytes of weights a decode step reads: all but the embedding table (one row of it) and rotary tables."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors.items()
               if name != "gpt_neox.embed_in.weight" and not name.startswith("rope_"))


def int8_table(ours, prompts, args, rows: dict, bandwidth: float) -> str:
    quantized = quantize_model(copy.deepcopy(ours))
    int8_bytes = weight_bytes_read(quantized)
    o1, on = time_ours(quantized, prompts, args.new_tokens, args.repeat)
    c1, cn = time_ours(quantized, prompts, args.new_tokens, args.repeat, compile=True)
    rows = rows | {"neoxko int8": (args.new_tokens / (on - o1), int8_bytes),
                   "neoxko int8 compiled": (args.new_tokens / (cn - c1), int8_bytes)}
    del quantized
    int4 = quantize_model(copy.deepcopy(ours), bits=4, group_size=64)  # torch's CPU int4 kernel, eager
    f1, fn = time_ours(int4, prompts, args.new_tokens, args.repeat)
    rows["neoxko int4 (groups of 64)"] = (args.new_tokens / (fn - f1), weight_bytes_read(int4))
    quantized = quantize_model(copy.deepcopy(ours))
    with torch.inference_mode():
        reference, got, got4 = ours(prompts).float(), quantized(prompts).float(), int4(prompts).float()
    agree = (reference.argmax(-1) == got.argmax(-1)).float().mean().item()
    agree4 = (reference.argmax(-1) == got4.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    error = ((got - reference).abs().max() / reference.abs().max()).item()
    base = rows["transformers bf16"][0]
    lines = ["", "Batch-1 decoding, bfloat16, int8 and int4 weight-only:", "",
             "| model | decode tok/s | weights read GB | bandwidth ceiling tok/s | of ceiling | vs transformers bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (speed, nbytes) in rows.items():
        ceiling = bandwidth / nbytes
        lines.append(f"| {name} | {speed:.2f} | {nbytes / 1e9:.2f} | {ceiling:.1f} | {speed / ceiling:.0%} | "
                     f"{speed / base:.2f}x |")
    lines += ["", f"int8 vs bfloat16 logits over {prompts.numel()} prompt positions: top-1 agreement {agree:.4f}, "
                  f"mean KL {kl:.2e} nats, max |difference| {error:.2%} of max |logit|; int4: top-1 agreement "
                  f"{agree4:.4f} (random weights: the built-in model's numbers are in tests/test_quantize.py)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
