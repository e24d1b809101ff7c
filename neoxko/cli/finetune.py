"""`neoxko finetune | merge-lora | chat`: instruction fine-tuning, adapters, and talking to the result."""

import argparse
import sys

from neoxko.builtin import DEFAULT_MODEL, MODEL_HELP
from neoxko.cli.settings_help import epilog
from neoxko.errors import NeoxkoError


def add_commands(commands) -> None:
    ft = commands.add_parser("finetune", help="instruction fine-tuning, full or LoRA (also under torchrun)",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=epilog("finetune/config", "FinetuneConfig", "neoxko finetune model=ko-small "
                                           "data='[qa.jsonl]' lora_r=16 max_steps=200"))
    ft.add_argument("--config", default=None, help="YAML file of FinetuneConfig settings")
    ft.add_argument("overrides", nargs="*", help="key=value settings that override the file")
    ft.set_defaults(run=run_finetune)

    mg = commands.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a plain Hugging Face folder")
    mg.add_argument("base", help="the base model: folder, hub id or built-in name")
    mg.add_argument("adapter", help="the adapter folder (neoxko's or peft's)")
    mg.add_argument("--output", required=True, help="folder for config.json, model.safetensors and the tokenizer")
    mg.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of the merged weights (default: the base's)")
    mg.set_defaults(run=run_merge)

    ch = commands.add_parser("chat", help="talk to a chat model in the terminal: streaming, multi-turn")
    ch.add_argument("--model", default=DEFAULT_MODEL + "-chat", help=MODEL_HELP.replace(DEFAULT_MODEL,
                                                                                         DEFAULT_MODEL + "-chat"))
    ch.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply to --model")
    ch.add_argument("--chat-template", default=None,
                    help="a .jinja file or a shipped name (koalpaca, chat); default: the model folder's own")
    ch.add_argument("--system", default=None, help="a system message before the conversation")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    ch.add_argument("--top-k", type=int, default=40, help="0 for no limit")
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--repetition-penalty", type=float, default=1.1)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ch.add_argument("--mask-pii", action="store_true",
                    help="replace phone, account and resident registration numbers in the answers with tokens")
    ch.set_defaults(run=run_chat)


def run_finetune(args: argparse.Namespace) -> int:
    from neoxko.cli.train import run_job
    from neoxko.finetune.config import FinetuneConfig
    from neoxko.finetune.job import Finetuning

    cfg = FinetuneConfig.load(args.config, args.overrides)
    return run_job(cfg, Finetuning(cfg))


def run_merge(args: argparse.Namespace) -> int:
    from neoxko.checkpoint import load_model, resolve, save_model
    from neoxko.tokenizer import copy_tokenizer_files

    adapter = resolve(args.adapter)
    model = load_model(args.base, dtype=args.dtype, adapter=adapter)
    out = save_model(model, args.output)  # the base's tokenizer ...
    if (adapter / "tokenizer.json").is_file():  # ... or the adapter's, with its chat template
        copy_tokenizer_files(adapter, out)
    print(f"neoxko: wrote {out}: {args.base} with {adapter} merged")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from neoxko import chat_template
    from neoxko.checkpoint import load_model, resolve
    from neoxko.cli.models import compute_dtype
    from neoxko.generate import Sampling, stream
    from neoxko.pii.stream import PIIStream
    from neoxko.tokenizer import load_tokenizer

    # the tokenizer and its template: the adapter's own if it has them, else the model's
    source = args.adapter if args.adapter and (resolve(args.adapter) / "tokenizer.json").is_file() else args.model
    tokenizer = load_tokenizer(source)
    template, stops = chat_template.load_template(args.chat_template) if args.chat_template else \
        (chat_template.tokenizer_template(tokenizer.source), ())
    if template is None:
        raise NeoxkoError(f"{source} has no chat template (a base model has "
                          "none); pass --chat-template koalpaca or chat, or a .jinja file, or fine-tune it with "
                          "neoxko finetune, which writes one")
    args.dtype = compute_dtype(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, adapter=args.adapter)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("neoxko chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends",
              file=sys.stderr)
    context = model.config.max_position_embeddings
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("neoxko: the conversation is forgotten", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt, dropped = fit_history(template, system, history, tokenizer, context - args.max_new_tokens)
        if dropped:
            history = history[dropped:]
            print(f"neoxko: the oldest {dropped} message(s) no longer fit in the {context}-token context and are "
                  "left out", file=sys.stderr)
        guard = PIIStream() if args.mask_pii else None
        answer, started = [], False
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, sampling, list(stops) or None):
            if not started:  # the space the answer starts with, after the template's "...:"
                piece = piece.lstrip()
                started = bool(piece)
            shown = guard.push(piece) if guard else piece
            answer.append(shown)
            sys.stdout.write(shown)
            sys.stdout.flush()
        tail = guard.flush() if guard else ""
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": ("".join(answer) + tail).strip()})
    return 0


def _lines(interactive: bool):
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line


def fit_history(template: str, system: list, history: list, tokenizer, budget: int) -> tuple[str, int]:
    """The prompt of system + history, without the oldest turns that do not fit in budget tokens; returns it and
    how many messages were left out (whole user + assistant pairs, the last user message always kept)."""
    from neoxko import chat_template

    variables = {"bos_token": "", "eos_token": tokenizer.eos_token or ""}
    dropped = 0
    while True:
        prompt = chat_template.render(template, system + history[dropped:], True, **variables)
        if len(tokenizer.encode(prompt)) <= budget or dropped >= len(history) - 1:
            return prompt, dropped
        dropped += 2
