import json
import re

import pytest
import torch

from conftest import SHARED
from neoxko.config import PRESETS, ModelConfig, pad_vocab_size
from neoxko.errors import ConfigError
from neoxko.model import GPTNeoX, num_parameters

REFERENCE = SHARED / "reference" / "polyglot-ko"


def test_polyglot_ko_1_3b_has_the_cards_parameter_count():
    config = ModelConfig.from_name("polyglot-ko-1.3b")
    assert config.num_parameters == 1_331_810_304
    assert (config.head_size, config.rotary_ndims, config.vocab_size) == (128, 64, 30080)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_count_matches_the_built_model(name):
    with torch.device("meta"):
        model = GPTNeoX(PRESETS[name])
    assert num_parameters(model) == PRESETS[name].num_parameters
    assert PRESETS[name].rotary_ndims == 64  # every card: RoPE on 64 dims


def test_tied_embeddings_count_once():
    config = PRESETS["polyglot-ko-1.3b"].replace(tie_word_embeddings=True)
    with torch.device("meta"):
        assert num_parameters(GPTNeoX(config)) == config.num_parameters == 1_331_810_304 - 30080 * 2048


def test_pad_vocab_size():
    assert pad_vocab_size(30003) == 30080
    assert pad_vocab_size(30080) == 30080


def test_old_and_new_rope_forms_agree():
    old = {"model_type": "gpt_neox", "rotary_pct": 0.25, "rotary_emb_base": 5000}
    new = {"model_type": "gpt_neox",
           "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25, "rope_theta": 5000.0}}
    v448 = {"model_type": "gpt_neox", "partial_rotary_factor": 0.25, "rope_theta": 5000}
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new) == ModelConfig.from_hf(v448)
    assert ModelConfig.from_hf(new).rotary_pct == 0.25


def test_hf_round_trip_and_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    config = PRESETS["polyglot-ko-5.8b"]
    assert ModelConfig.from_hf(config.to_hf()) == config
    hf = transformers.GPTNeoXConfig(**config.to_hf())
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert ModelConfig.from_hf(hf.to_dict()) == config


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference not present (fresh clone without shared data)")
def test_reference_configs_match_presets():
    one = ModelConfig.from_file(REFERENCE / "reconstructed" / "config_polyglot-ko-1.3b.json")
    assert one == PRESETS["polyglot-ko-1.3b"]
    twelve = ModelConfig.from_file(REFERENCE / "koalpaca-polyglot-12.8b-derived" / "config.json")
    assert twelve == PRESETS["polyglot-ko-12.8b"]


def test_save_writes_both_dtype_names(tmp_path):
    PRESETS["polyglot-ko-1.3b"].save(tmp_path / "config.json", dtype="float16")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["torch_dtype"] == saved["dtype"] == "float16"
    assert saved["rotary_pct"] == 0.5 and saved["model_type"] == "gpt_neox"


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "llama"}, "model_type is 'llama', but neoxko runs GPT-NeoX"),
    ({}, "model_type is None"),
    ({"model_type": "gpt_neox", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"model_type": "gpt_neox", "hidden_size": 100, "num_attention_heads": 16}, "not divisible"),
    ({"model_type": "gpt_neox", "hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
    ({"model_type": "gpt_neox", "rotary_pct": 0}, "rotary_pct must be in (0, 1]"),
])
def test_bad_configs_are_refused_with_a_reason(hf, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_hf(hf)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="polyglot-ko-1.3b"):
        ModelConfig.from_name("polyglot-ko-99b")


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", 1e6, "num_hidden_layers is 1,000,000; it must be between 1 and 1,024"),
    ("max_position_embeddings", 1e10, "max_position_embeddings is 10,000,000,000; it must be between 1 and"),
    ("num_attention_heads", 0, "num_attention_heads is 0; it must be between 1 and 1,024"),
    ("hidden_size", "2048", "hidden_size must be a whole number, got '2048'"),
    ("intermediate_size", 100.5, "intermediate_size must be a whole number, got 100.5"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps must be a finite number"),
    ("rotary_emb_base", 0, "rotary_emb_base must be positive"),
    ("eos_token_id", 40000, "eos_token_id 40000 is outside the vocabulary"),
    ("bos_token_id", "0", "bos_token_id must be a token id"),
])
def test_every_config_field_is_checked_by_name(tmp_path, field, value, message):
    """From config.json, where a typo would otherwise run for minutes or fail deep inside torch."""
    from neoxko.checkpoint import read_config

    hf = ModelConfig().to_hf() | {field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(tmp_path)


def test_whole_floats_from_json_are_taken_as_ints():
    assert ModelConfig(hidden_size=2048.0).hidden_size == 2048
