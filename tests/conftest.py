"""Shared fixtures: tiny random GPT-NeoX models, their transformers twins, a small Korean tokenizer."""

import json
import os
from pathlib import Path

import pytest
import torch

from neoxko.config import ModelConfig
from neoxko.model import GPTNeoX, init_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
if "NEOXKO_SHARED" in os.environ:
    SHARED = Path(os.environ["NEOXKO_SHARED"])

# Written for these tests (no third-party text): varied Hangul, numbers, Latin, punctuation, emoji.
KOREAN_TEXT = """대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.
오늘 아침에는 비가 내렸지만 오후에는 하늘이 맑게 개었다. 우리는 공원에서 산책을 하며 이야기를 나누었다.
인공지능 언어 모델은 다음에 올 토큰을 예측하도록 학습된다. 한국어 문장은 조사와 어미가 풍부하다.
서울에서 부산까지 기차로 두 시간 반이 걸린다. 가격은 3만 5천 원이고, 2024년 3월 1일에 출발한다.
도서관에 가서 책을 빌리고, 카페에서 커피를 마셨다 ☕. Hello, world! 東西南北 ㄱㄴㄷ 😀
"""


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, rotary_pct=0.5, max_position_embeddings=128)
    return ModelConfig(**(base | changes))


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(config)
    init_weights(model, std=0.1)  # larger than 0.02 so that logits differ visibly between tokens
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so parity tests cover them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def hf_twin(model: GPTNeoX):
    """transformers' GPTNeoXForCausalLM with the same weights, eager attention."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPTNeoXConfig(**model.config.to_hf())
    hf_config._attn_implementation = "eager"
    hf = transformers.GPTNeoXForCausalLM(hf_config)
    state = {k: v for k, v in model.state_dict().items()}
    hf.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()},
                       strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.embed_out.weight.dtype).eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with the released Polyglot-Ko special-token layout (ids 0-3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|unused0|>", "<|unused1|>", "<|endoftext|>", "<|sep|>"]
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(KOREAN_TEXT.splitlines() * 5, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def model_folder(folder: Path, tokenizer_dir: Path, config: ModelConfig, seed: int = 0) -> Path:
    """A random model saved in Hugging Face layout, with the fixture tokenizer beside it."""
    import shutil

    from neoxko.checkpoint import save_model

    save_model(random_model(config, seed=seed), folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny model with a 2,048-token context (no KoBEST prompt is cut, by lm-eval or by us) and its tokenizer."""
    return model_folder(tmp_path_factory.mktemp("long"), tokenizer_dir, tiny_config(max_position_embeddings=2048), 3)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A saved tiny model with its tokenizer: the layout of a Hugging Face model folder."""
    return model_folder(tmp_path_factory.mktemp("model"), tokenizer_dir, tiny_config())


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tokenizer_dir) -> Path:
    """A token shard in the layout `neoxko data prepare` writes (uint16 ids and document ends), from the fixture text."""
    import numpy as np

    from neoxko.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    folder = tmp_path_factory.mktemp("shards")
    ids, ends = [], []
    for line in KOREAN_TEXT.splitlines() * 40:
        ids += tok.encode(line) + [tok.eos_id]
        ends.append(len(ids))
    np.array(ids, dtype="<u2").tofile(folder / "00000_unshuffled.ds")
    np.array(ends, dtype="<u8").tofile(folder / "00000_unshuffled.ds.index")
    return folder


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A two-node Slurm cluster on this host (tests/cluster/slurm.py), started once; skips where Slurm cannot run."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "cluster"))
    import slurm as local_slurm

    try:
        cluster = local_slurm.start(tmp_path_factory.mktemp("slurm"))
    except local_slurm.Unavailable as e:
        pytest.skip(str(e))
    yield cluster
    cluster.stop()
