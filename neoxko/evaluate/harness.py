"""neoxko as an lm-evaluation-harness model: `--model neoxko`, for any lm-eval task.

Importing this module registers the model under the name `neoxko` (lm-eval has no discovery of models
outside its own package, so `neoxko harness ...` imports it and hands over to lm-eval's own command line).

- loglikelihood: lm-eval's own encoding (TemplateLM: trailing spaces move to the continuation, an empty
  context becomes the end-of-text token) and truncation (a pair keeps its last max_length + 1 tokens, as
  `--model hf` does); requests with the same context share it in one tree-masked row (NeoxkoScorer), so a
  multiple-choice document costs one context, not one per choice.
- loglikelihood_rolling: lm-eval's rolling windows (the end-of-text token first, full-length windows, each
  token predicted once), scored as plain causal rows.
- generate_until: batched greedy or sampled decoding with `until` stop strings (and the end-of-text token),
  `max_gen_toks`, the context cut from the left to leave room, as `--model hf` does.

Model args: pretrained (a folder, hub id or built-in name), dtype, device, batch_size (documents per
generation batch), batch_tokens (tokens per scoring forward), max_length, quantize (int8, int4) and group_size.
Under torchrun lm-eval sees one process: every rank builds every request (lm-eval's own split by rank would draw
other few-shot examples, as each rank's draws start from the seed) and the ranks deal out the scoring and generation
batches, each the batch one process would run, so every number equals the one-process number.
"""

import sys
from collections import defaultdict

import torch
from tqdm import tqdm

try:
    # lm-eval fills its registry with its own models only while the registry is empty: fill it first, or
    # registering neoxko would hide --model hf and the rest.
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the message is what matters
    from neoxko.errors import NeoxkoError

    raise NeoxkoError("neoxko's lm-eval model needs lm-evaluation-harness: pip install 'neoxko[eval]' "
                      f"(or pip install lm-eval) ({e})") from None

from neoxko.errors import NeoxkoError
from neoxko.evaluate.kobest import gather_everywhere, join_torchrun, rank_device, shared_loglikelihoods
from neoxko.evaluate.scoring import Item, NeoxkoScorer

DTYPES = ("float32", "bfloat16", "float16")


@register_model("neoxko")
class NeoxkoLM(TemplateLM):
    def __init__(self, pretrained: str = "ko-small", dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, batch_tokens: int = 4096, max_length: int | None = None,
                 quantize: str | None = None, group_size: int = 64,
                 max_batch_size: int | None = None, **unknown):  # (lm-eval passes max_batch_size; it is not used)
        super().__init__()
        if unknown:  # a misspelt pretrained= would otherwise load the default model
            raise NeoxkoError(f"unknown neoxko model arg(s) {', '.join(sorted(unknown))}; the ones it takes: "
                              "pretrained, dtype, device, batch_size, batch_tokens, max_length, quantize, group_size")
        from neoxko.checkpoint import load_model
        from neoxko.tokenizer import load_tokenizer

        if dtype in ("auto", None, ""):
            dtype = None
        elif dtype not in DTYPES:
            raise NeoxkoError(f"dtype {dtype!r} is not one neoxko loads; use one of {', '.join(DTYPES)} or auto")
        self.torchrun_rank, self.torchrun_world = join_torchrun()  # lm-eval's rank and world size stay 0 and 1
        self._device = torch.device(lm_eval_device(device, self.torchrun_rank, self.torchrun_world))
        self.tokenizer = load_tokenizer(pretrained)  # a missing tokenizer fails before the weights load
        self.model = load_model(pretrained, dtype=dtype, device=self._device, quantize=quantize,
                                group_size=int(group_size))
        self.scorer = NeoxkoScorer(self.model, self.tokenizer, int(batch_tokens))
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.scorer.max_length = self._max_length
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.pretrained = str(pretrained)

    # -- what TemplateLM needs ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.torchrun_rank != 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (key, context_enc, continuation_enc); requests with one context share it."""
        by_context: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise NeoxkoError("an lm-eval request's continuation encodes to no tokens; cannot score it")
            by_context[tuple(context)].append(i)
        items = [Item(list(context), [requests[i][2] for i in which]) for context, which in by_context.items()]
        scores = shared_loglikelihoods(self.scorer, items, "loglikelihood", not disable_tqdm, greedy=True)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (_, which), item_scores in zip(by_context.items(), scores, strict=True):
            for i, (ll, greedy) in zip(which, item_scores, strict=True):
                out[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[n] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from neoxko.evaluate.harness_generate import generate_batch, parse_gen_kwargs

        eos = self.tok_decode([self.eot_token_id])
        jobs = []
        for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
            until, max_gen_toks, sampling = parse_gen_kwargs(gen_kwargs, eos)
            budget = max(self.max_length - max_gen_toks, 1)
            ids = self.tok_encode(context)[-budget:] or [self.eot_token_id]
            jobs.append((n, ids, until, max_gen_toks, sampling))
        # Same settings decode together, longest prompts first (little padding); each row stops on its own.
        groups: dict[tuple, list] = defaultdict(list)
        for job in jobs:
            groups[(tuple(job[2]), job[3], job[4])].append(job)
        batches = []
        for settings, group in groups.items():
            group.sort(key=lambda job: -len(job[1]))
            batches += [(settings, group[i:i + self.batch_size]) for i in range(0, len(group), self.batch_size)]
        mine = batches[self.torchrun_rank::self.torchrun_world]  # under torchrun each rank decodes its share
        texts = []  # (request, text)
        bar = tqdm(total=sum(len(batch) for _, batch in mine), desc="generate_until", unit="doc",
                   disable=disable_tqdm or self.torchrun_rank != 0)
        for (until, max_gen_toks, sampling), batch in mine:
            generated = generate_batch(self.model, self.tokenizer, [job[1] for job in batch], list(until),
                                       max_gen_toks, sampling)
            texts += [(job[0], text) for job, text in zip(batch, generated, strict=True)]
            bar.update(len(batch))
        bar.close()
        out = [""] * len(requests)
        for n, text in gather_everywhere(texts):
            out[n] = text
            self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out


def lm_eval_device(device: str | None, rank: int, world: int) -> str:
    """The device this rank scores on: the CPU where lm-eval asks for a GPU there is not (its default is cuda:0), and
    under torchrun each rank's own GPU whatever cuda index it asks for, as lm-eval's hf model does."""
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        if rank == 0:
            print(f"neoxko: device {device!r} asked for (lm-eval's default) but there is no GPU: using the CPU",
                  file=sys.stderr)  # as lm-eval's hf model does
        return "cpu"
    if world > 1 and str(device).startswith("cuda"):
        device = "cuda"
    return rank_device(device)
