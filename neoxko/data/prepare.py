"""`neoxko data prepare`: text files -> clean, PII-free, deduplicated documents -> packed token shards.

Seven datatrove stages, each resumable (datatrove skips the tasks it finished; a killed task
restarts and overwrites its own outputs, so no document is lost or written twice):

  1 clean         read -> NFC/clean -> Korean quality filter -> PII -> KoBEST decontamination -> clean/
  2 exact-sigs    clean/ -> content hashes
  3 exact-find    hashes -> duplicate ids (one task)
  4 minhash-sigs  clean/ -> drop exact duplicates -> MinHash signatures
  5 minhash-bkts  signatures -> bucket matches (one task per bucket)
  6 minhash-clst  matches -> near-duplicate ids (one task)
  7 tokenize      clean/ -> drop exact and near duplicates -> documents/ and tokens/ (uint16 .ds + .index),
                  with an optional held-out share split off into heldout/documents/ and heldout/tokens/

Stages 2-7 read clean/ with the same task count, so document order (and MinHash's per-task ids)
is the same in every stage.
"""

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neoxko.data import executors as engines
from neoxko.errors import NeoxkoError

STAGES = ["clean", "exact-sigs", "exact-find", "minhash-sigs", "minhash-bkts", "minhash-clst", "tokenize"]
INPUT_SUFFIXES = (".txt", ".csv", ".tsv", ".md", ".jsonl", ".jsonl.gz", ".json", ".parquet")
# Settings that change the output; workers and the executor do not, so a resumed run may change them.
RUN_SETTINGS = ("inputs", "hf_dataset", "hf_options", "tokenizer", "text_key", "kobest_dir", "quality",
                "minhash_buckets", "minhash_hashes_per_bucket", "minhash_ngrams", "tasks", "holdout")


@dataclass(frozen=True)
class Quality:
    """Korean quality thresholds (see KoreanQualityFilter)."""

    min_chars: int = 10
    min_hangul_share: float = 0.5
    max_dup_line_share: float = 0.3
    max_char_run_share: float = 0.3
    max_symbol_share: float = 0.2


@dataclass(frozen=True)
class PrepareConfig:
    inputs: list[str]
    output: str
    tokenizer: str
    tasks: int = 1
    workers: int = 1
    text_key: str = "text"
    kobest_dir: str | None = None
    quality: Quality = field(default_factory=Quality)
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    minhash_ngrams: int = 5
    holdout: float = 0.0  # share of documents (by id hash) kept out of tokens/ for held-out evaluation
    # A Hugging Face dataset instead of files: its name (or a builder such as "json"), and the
    # options of datasets.load_dataset (split, name, data_files, ...).
    hf_dataset: str | None = None
    hf_options: dict = field(default_factory=lambda: {"split": "train"})
    executor: str = "local"  # local, slurm or ray
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_mem_per_cpu_gb: int = 2
    ray_address: str | None = None  # None: Ray on this machine
    wait: bool = True  # slurm: wait for the jobs (else return once they are submitted; `neoxko data status`)
    verbose: bool = False  # datatrove's own log lines on stderr (else in OUTPUT/logs/datatrove.log)

    def run_settings(self) -> dict:
        settings = asdict(self)
        return {k: settings[k] for k in RUN_SETTINGS}


def input_files(inputs: list[str]) -> tuple[Path, list[str]]:
    """A common root folder and the input files under it (folders are searched recursively)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise NeoxkoError(f"input {item} does not exist")
    if not files:
        raise NeoxkoError(f"no input files ({', '.join(INPUT_SUFFIXES)}) in {', '.join(inputs)}")
    files = [f.resolve() for f in files]
    root = Path(*_common_parts([f.parent.parts for f in files]))
    return root, [str(f.relative_to(root)) for f in files]


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


def tokenizer_file(path_or_id: str) -> Path:
    """tokenizer.json of a folder, a file or a hub id, checked for the tokens the pipeline writes."""
    from neoxko.checkpoint import resolve
    from neoxko.tokenizer import TOKENIZER_FILES, Tokenizer, require_special_tokens

    path = Path(path_or_id)
    folder = path.parent if path.is_file() else resolve(path_or_id, allow_patterns=TOKENIZER_FILES)
    tokenizer = Tokenizer.from_dir(folder)
    require_special_tokens(tokenizer)
    if tokenizer.vocab_size > 65535:
        raise NeoxkoError(f"the tokenizer has {tokenizer.vocab_size} tokens; packed shards hold uint16 ids (< 65536)")
    return folder / "tokenizer.json"


def claim_output(config: PrepareConfig) -> None:
    """Refuse an output folder that holds a run with other settings or other input files; remember ours
    (with each input file's size) for resuming. Tasks are given files by their place in the sorted list,
    so a file added, removed or changed between a kill and the rerun would lose or repeat documents."""
    out = Path(config.output)
    marker = out / "prepare.json"
    settings = json.loads(json.dumps(config.run_settings()))
    files = {} if config.hf_dataset else _input_sizes(config.inputs)
    if marker.exists():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        before = previous.pop("input_files", None)
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise NeoxkoError(
                f"{out} already holds a run with other settings ({', '.join(changed)} differ); "
                "use a new --output folder, or the same settings to resume that run"
            )
        if before is not None and before != files:
            added = sorted(set(files) - set(before))
            removed = sorted(set(before) - set(files))
            resized = sorted(f for f in set(files) & set(before) if files[f] != before[f])
            what = "; ".join(f"{label}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5
                                                                     else "")
                             for label, names in (("added", added), ("removed", removed), ("changed", resized))
                             if names)
            raise NeoxkoError(f"the input files changed since {out} was started ({what}); resuming would lose or "
                              "repeat documents. Restore them, or start again in a new --output folder")
    elif out.exists() and any(out.iterdir()):
        raise NeoxkoError(f"{out} is not empty and holds no neoxko run; use a new --output folder")
    out.mkdir(parents=True, exist_ok=True)
    record = settings | {"input_files": files}
    marker.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _input_sizes(inputs: list[str]) -> dict[str, int]:
    root, files = input_files(inputs)
    return {name: (root / name).stat().st_size for name in files}


def exact_content(doc) -> str:
    return doc.text


def build_executors(config: PrepareConfig, tokenizer: Path) -> list:
    """The seven stages as datatrove executors, each depending on the one before."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import TextNormConfig

    from neoxko.data.steps import (
        CleanKorean,
        HoldOut,
        KobestDecontamination,
        KoreanQualityFilter,
        KoreanWordTokenizer,
        ReplacePII,
        kobest_test_texts,
    )

    out = Path(config.output).resolve()
    exact = ExactDedupConfig(content_getter=exact_content)
    # datatrove's default text normalisation ends in NFD, which splits every Hangul syllable into
    # conjoining jamo; keep syllables whole so Korean words stay words.
    minhash = MinhashConfig(n_grams=config.minhash_ngrams, num_buckets=config.minhash_buckets,
                            hashes_per_bucket=config.minhash_hashes_per_bucket,
                            norm_config=TextNormConfig(norm_unicode_diacritics=False))

    def clean_reader():
        return JsonlReader(str(out / "clean"))

    clean = [
        _reader(config, out),
        CleanKorean(),
        KoreanQualityFilter(**asdict(config.quality)),
        ReplacePII(),
    ]
    if config.kobest_dir:
        clean.append(KobestDecontamination(kobest_test_texts(config.kobest_dir), str(out / "decontamination")))
    clean.append(JsonlWriter(str(out / "clean"), compression=None))  # gzip would cost a third of the stage
    holdout = [HoldOut(config.holdout, str(out / "heldout"), str(tokenizer))] if config.holdout else []
    stages = [
        (clean, config.tasks),
        ([clean_reader(), ExactDedupSignature(str(out / "exact" / "sigs"), exact)], config.tasks),
        ([ExactFindDedups(str(out / "exact" / "sigs"), str(out / "exact" / "dups"), exact)], 1),
        ([clean_reader(), ExactDedupFilter(str(out / "exact" / "dups"), exact),
          MinhashDedupSignature(str(out / "minhash" / "sigs"), minhash, language=KoreanWordTokenizer())],
         config.tasks),
        ([MinhashDedupBuckets(str(out / "minhash" / "sigs"), str(out / "minhash" / "buckets"), config=minhash)],
         config.minhash_buckets),
        ([MinhashDedupCluster(str(out / "minhash" / "buckets"), str(out / "minhash" / "remove"), config=minhash)], 1),
        ([clean_reader(), ExactDedupFilter(str(out / "exact" / "dups"), exact),
          MinhashDedupFilter(str(out / "minhash" / "remove")),
          *holdout,
          JsonlWriter(str(out / "documents"), compression=None),
          DocumentTokenizer(str(out / "tokens"), str(tokenizer), eos_token="<|endoftext|>",
                            shuffle_documents=False, save_final_metadata=True)], config.tasks),
    ]
    executors = []
    for n, (pipeline, tasks) in enumerate(stages):
        executors.append(engines.make_executor(config, pipeline, tasks, out / "logs" / f"{n + 1}-{STAGES[n]}",
                                               executors[-1] if executors else None, STAGES[n]))
    return executors


def _reader(config: PrepareConfig, out: Path):
    if config.hf_dataset:
        from datatrove.pipeline.readers import HuggingFaceDatasetReader

        return HuggingFaceDatasetReader(config.hf_dataset, dict(config.hf_options), text_key=config.text_key)
    from neoxko.data.steps import KoreanTextReader

    root, files = input_files(config.inputs)
    (out / "inputs.txt").write_text("\n".join(files) + "\n", encoding="utf-8")
    return KoreanTextReader(str(root), paths_file=str(out / "inputs.txt"), text_key=config.text_key)


def prepare(config: PrepareConfig) -> dict:
    """Run (or resume) the whole pipeline and write report.json and report.md into the output folder."""
    if config.tasks < 1 or config.workers < 1:
        raise NeoxkoError("--tasks and --workers must be at least 1")
    if not 0 <= config.holdout < 0.5:
        raise NeoxkoError(f"--holdout is a share of documents between 0 and 0.5, got {config.holdout}")
    tokenizer = tokenizer_file(config.tokenizer)  # fail before touching the output folder
    if config.hf_dataset and config.inputs:
        raise NeoxkoError("give input files or --hf-dataset, not both")
    if config.hf_dataset:
        _check_datasets(config.hf_dataset, config.hf_options)
    else:
        input_files(config.inputs)
    if not config.wait and config.executor != "slurm":
        raise NeoxkoError("--no-wait is for --executor slurm (the jobs run on without this command)")
    if config.executor == "slurm":
        engines.check_slurm(config.slurm_partition)
        engines.clear_previous(Path(config.output))
    if config.executor == "ray":
        engines.connect_ray(config.ray_address, config.workers)
    claim_output(config)
    out = Path(config.output)
    executors = build_executors(config, tokenizer)
    if config.executor == "slurm":
        with datatrove_log(out, config.verbose):
            executors[-1].run()  # submits every stage not finished before, each depending on the one before
        engines.record_jobs(out, STAGES, executors)
        if not config.wait:
            return {}
        engines.wait_slurm(out)
    else:
        for n, executor in enumerate(executors):  # finished tasks of a resumed run are skipped
            _run_stage(executor, n, out, config.verbose)
            if n == 0:
                _require_survivors(out)
    report = collect_report(out)
    write_report(out, report)
    return report


def _run_stage(executor, n: int, out: Path, verbose: bool) -> None:
    """One stage, saying so on stderr; datatrove's own log lines go to OUTPUT/logs/datatrove.log unless verbose."""
    print(f"neoxko: data prepare {n + 1}/{len(STAGES)} {STAGES[n]} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with datatrove_log(out, verbose):
            executor.run()
    except Exception as e:  # a stage's tasks failed: the details are in the log
        raise NeoxkoError(f"stage {STAGES[n]} failed ({type(e).__name__}: {str(e)[:200]}); see "
                          f"{out / 'logs' / 'datatrove.log'}") from e
    print(f"neoxko: data prepare {n + 1}/{len(STAGES)} {STAGES[n]} done in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


@contextmanager
def datatrove_log(out: Path, verbose: bool):
    """stderr (datatrove's log lines, also those of worker processes, which inherit it) into
    OUTPUT/logs/datatrove.log, unless verbose."""
    if verbose:
        yield
        return
    log = out / "logs" / "datatrove.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    try:
        with log.open("a", encoding="utf-8") as f:
            sys.stderr.flush()
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _require_survivors(out: Path) -> None:
    """Stop with the counts when cleaning and filtering left no document (later stages have nothing to read)."""
    if any(f.stat().st_size for f in (out / "clean").glob("*.jsonl")):
        return
    counts: dict[str, float] = {}
    for step in _stats(out / "logs" / f"1-{STAGES[0]}"):
        for key, value in step["stats"].items():
            if key == "documents" or key.startswith("dropped_"):
                counts[key] = counts.get(key, 0) + value
    read = int(counts.pop("documents", 0))
    drops = ", ".join(f"{k.removeprefix('dropped_')} {int(v):,}" for k, v in sorted(counts.items())) or "none"
    raise NeoxkoError(f"no document survived cleaning and filtering ({read:,} read; dropped: {drops}); nothing to "
                      "deduplicate or tokenise. Check --text-key, the input's language and its lines' length")


def _check_datasets(name: str, options: dict) -> None:
    """The datasets library is there and the dataset can be found (on the hub, or in the cache offline)."""
    try:
        import datasets
    except ImportError:
        raise NeoxkoError("--hf-dataset needs the datasets library: pip install 'neoxko[hf]'") from None
    try:
        datasets.load_dataset_builder(name, **{k: v for k, v in options.items() if k == "name"})
    except (ConnectionError, FileNotFoundError, ValueError) as e:  # offline, unknown id, unknown config
        raise NeoxkoError(f"cannot open the dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "check the id, or with HF_HUB_OFFLINE=1 download it once with network access first, "
                          "or pass local files instead") from None


def _stats(stage_logs: Path) -> list[dict]:
    """Per-step stats of a stage, summed over its tasks."""
    merged: dict[str, dict[str, float]] = {}
    order: list[str] = []
    for file in sorted((stage_logs / "stats").glob("*.json")):
        for step in json.loads(file.read_text(encoding="utf-8")):
            name = step["name"]
            if name not in merged:
                merged[name], _ = {}, order.append(name)
            for key, value in step.get("stats", {}).items():
                total = value.get("total", value) if isinstance(value, dict) else value
                if isinstance(total, int | float):
                    merged[name][key] = merged[name].get(key, 0) + total
    return [{"name": n, "stats": merged[n]} for n in order]


def collect_report(out: Path) -> dict:
    stages = {name: _stats(out / "logs" / f"{n + 1}-{name}") for n, name in enumerate(STAGES)}

    def step(stage: str, pattern: str) -> dict:
        return next((s["stats"] for s in stages[stage] if re.search(pattern, s["name"])), {})

    reader, clean, quality = step("clean", "READER"), step("clean", "Korean clean"), step("clean", "Korean quality")
    pii, decont = step("clean", "PII"), step("clean", "KoBEST")
    exact, near = step("tokenize", "exact-deduplication"), step("tokenize", "MinHash")
    tokens, writer, held = step("tokenize", "TOKENIZER"), step("tokenize", "WRITER"), step("tokenize", "Held-out")
    return {
        "read": {"documents": reader.get("documents", 0), "bytes": reader.get("bytes_read", 0),
                 "invalid_utf8_lines": reader.get("invalid_utf8", 0), "bad_json_lines": reader.get("bad_json", 0),
                 "unreadable_files": reader.get("unreadable_files", 0),
                 "too_long_documents": reader.get("too_long", 0)},
        "clean": {"documents_in": clean.get("total", 0), "documents_out": clean.get("forwarded", 0),
                  "dropped_empty": clean.get("dropped_empty", 0), "bytes_in": clean.get("bytes_in", 0),
                  "bytes_out": clean.get("bytes_out", 0)},
        "quality": {"documents_in": quality.get("total", 0), "documents_out": quality.get("forwarded", 0),
                    **{k: v for k, v in quality.items() if k.startswith("dropped_")}},
        "pii": {k.removeprefix("pii_"): pii.get(k, 0) for k in ("pii_rrn", "pii_tel", "pii_acc")}
        | {"documents_with_pii": pii.get("documents_with_pii", 0)},
        "decontamination": {"documents_in": decont.get("total", 0), "documents_out": decont.get("forwarded", 0),
                            **{k: v for k, v in decont.items() if k.startswith("matched_")}},
        "exact_dedup": {"documents_in": exact.get("total", 0), "documents_out": exact.get("forwarded", 0),
                        "duplicates_removed": exact.get("dropped", 0)},
        "minhash_dedup": {"documents_in": near.get("total", 0), "documents_out": near.get("forwarded", 0),
                          "near_duplicates_removed": near.get("dropped", 0)},
        "output": {"documents": writer.get("total", 0), "tokens": tokens.get("tokens", 0)},
        "heldout": {"documents": held.get("heldout_documents", 0), "tokens": held.get("heldout_tokens", 0)},
    }


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = ["| step | measure | value |", "|---|---|---:|"]
    for section, values in report.items():
        for key, value in values.items():
            lines.append(f"| {section} | {key} | {value:,} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
