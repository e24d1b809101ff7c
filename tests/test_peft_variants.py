"""Any LoRA adapter peft writes: rank_pattern, alpha_pattern, rsLoRA, layers_to_transform, modules_to_save for the
embedding and the head, and DoRA. Each adapter is built and saved by peft itself on transformers' model; neoxko's
logits (merged, and unmerged) must equal peft's within 1e-4. And the other way: per-layer ranks neoxko writes load in
peft with the same logits."""

import json

import pytest
import torch

from neoxko.checkpoint import load_model, resolve, save_model
from neoxko.config import ModelConfig
from neoxko.errors import CheckpointError
from neoxko.finetune.lora import LoraSettings, apply_lora, load_adapter, lora_layers, save_adapter
from neoxko.model import GPTNeoX
from neoxko.tokenizer import load_tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VARIANTS = {
    "rank and alpha patterns, rsLoRA": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["query_key_value", "dense", "dense_4h_to_h"],
        rank_pattern={"layers.1.attention.dense": 2, "dense_4h_to_h": 6}, alpha_pattern={"query_key_value": 3}),
    "layers_to_transform, a list": dict(r=4, lora_alpha=16, target_modules=["query_key_value", "dense_h_to_4h"],
                                        layers_to_transform=[0, 2, 5]),
    "layers_to_transform, one index and a layers_pattern": dict(
        r=2, lora_alpha=4, target_modules=["dense"], layers_to_transform=3, layers_pattern="layers"),
    "DoRA": dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"], use_dora=True),
    "DoRA with rank patterns and rsLoRA": dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True,
                                               target_modules=["dense", "dense_h_to_4h"], rank_pattern={"dense": 8}),
    "modules_to_save: the embedding of a tied model": dict(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                           modules_to_save=["embed_in"]),
    "modules_to_save: the final layer norm (weight and bias)": dict(r=4, lora_alpha=8, target_modules=["dense"],
                                                                    modules_to_save=["final_layer_norm"]),
}


def _peft_adapter(base, folder, settings: dict, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **settings))
    with torch.no_grad():  # (saved modules and DoRA magnitudes moved away from the base's, so they count)
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_variants_give_peft_logits(tmp_path, variant):
    base = resolve("ko-small")
    theirs = _peft_adapter(base, tmp_path / "adapter", VARIANTS[variant])
    x = torch.randint(4, 30000, (2, 20))
    with torch.no_grad():
        expected = theirs(x).logits
        merged = load_model(base, dtype="float32", adapter=tmp_path / "adapter")(x)
        unmerged = load_adapter(load_model(base, dtype="float32"), tmp_path / "adapter", merge=False)(x)
    assert (expected - load_model(base, dtype="float32")(x)).abs().max() > 1e-2  # (the adapter changes the logits)
    assert (expected - merged).abs().max() < 1e-4, variant
    assert (expected - unmerged).abs().max() < 1e-4, variant
    in_bf16 = load_model(base, adapter=tmp_path / "adapter")  # (stored dtype), then cast: a saved embedding stays
    with torch.no_grad():                                      # untied from the head, as peft keeps it
        assert (expected - in_bf16.float()(x)).abs().max() < 0.5, variant


def test_modules_to_save_the_head_of_an_untied_model(tmp_path):
    config = ModelConfig(vocab_size=30080, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    base = save_model(GPTNeoX(config), tmp_path / "base", tokenizer=load_tokenizer("ko-small"))
    for head in ("lm_head", "embed_in"):  # (transformers 5 names GPT-NeoX's head lm_head; neoxko embed_out)
        theirs = _peft_adapter(base, tmp_path / head, dict(r=2, lora_alpha=4, target_modules=["dense"],
                                                            modules_to_save=[head]))
        x = torch.randint(4, 30000, (1, 12))
        with torch.no_grad():
            assert (theirs(x).logits - load_model(base, dtype="float32", adapter=tmp_path / head)(x)).abs().max() < 1e-4


def test_per_layer_ranks_neoxko_writes_load_in_peft(tmp_path):
    base = resolve("ko-small")
    model = load_model(base, dtype="float32")
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets=("query_key_value", "dense_h_to_4h"),
                            rank_pattern={"layers.0.attention.query_key_value": 12, "dense_h_to_4h": 2},
                            alpha_pattern={"layers.5.mlp.dense_h_to_4h": 1.5})
    apply_lora(model, settings)
    torch.manual_seed(0)
    state = {}
    for name, layer in lora_layers(model).items():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        state |= {f"{name}.lora_A.weight": layer.lora_A.weight, f"{name}.lora_B.weight": layer.lora_B.weight}
    assert lora_layers(model)["gpt_neox.layers.0.attention.query_key_value"].lora_A.weight.shape[0] == 12
    save_adapter(state, settings, tmp_path / "ours", str(base))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"layers.0.attention.query_key_value": 12, "dense_h_to_4h": 2}
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    x = torch.randint(4, 30000, (2, 16))
    with torch.no_grad():
        assert (theirs(x).logits - model.eval()(x)).abs().max() < 1e-4


def _broken(tmp_path, **changes):
    base = resolve("ko-small")
    _peft_adapter(base, tmp_path / "a", dict(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    file = tmp_path / "a" / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))
    return base, tmp_path / "a"


def test_a_config_that_is_not_its_adapters_is_refused_before_any_allocation(tmp_path):
    base, adapter = _broken(tmp_path, r=1_000_000_000)
    with pytest.raises(CheckpointError, match=r"adapter_config.json gives gpt_neox.layers.0.attention.query_key_value "
                                              r"rank 1000000000, but its lora_A holds rank 4; the config is not this "
                                              r"adapter's"):
        load_model(base, dtype="float32", adapter=adapter)


@pytest.mark.parametrize("changes, message", [
    ({"lora_alpha": float("nan")}, "has lora_alpha nan; it must be a finite number"),
    ({"r": "4"}, "has r '4'; a rank is a whole number of at least 1"),
    ({"rank_pattern": {"dense": 0}}, "rank_pattern gives 'dense' the rank 0; a rank is a whole number of at least 1"),
    ({"alpha_pattern": {"dense": "x"}}, "alpha_pattern gives 'dense' the alpha 'x'; an alpha is a finite number"),
    ({"layer_replication": [[0, 4], [2, 6]]}, "uses layer_replication=[[0, 4], [2, 6]], which neoxko does not apply"),
])
def test_bad_adapter_settings_are_named(tmp_path, changes, message):
    base, adapter = _broken(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_model(base, dtype="float32", adapter=adapter)


def test_fine_tuning_writes_per_layer_ranks_peft_reads(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_finetune import chat_rows, settings, write_jsonl

    from neoxko.finetune.config import FinetuneConfig
    from neoxko.finetune.job import Finetuning
    from neoxko.train.loop import train

    base = save_model(load_model("ko-small", dtype="float32"), tmp_path / "base")
    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows())
    cfg = FinetuneConfig(**settings(base, data, tmp_path / "run", max_steps=3) | {
        "lora_targets": ["query_key_value", "dense_h_to_4h"], "lora_rank_pattern": {"dense_h_to_4h": 2},
        "lora_alpha_pattern": {"layers.0.attention.query_key_value": 32}})
    train(cfg, Finetuning(cfg))
    adapter = tmp_path / "run" / "adapter"
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"dense_h_to_4h": 2}
    assert written["alpha_pattern"] == {"layers.0.attention.query_key_value": 32}
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert theirs.base_model.model.gpt_neox.layers[3].mlp.dense_h_to_4h.lora_A["default"].weight.shape[0] == 2
    x = torch.randint(4, 30000, (1, 16))
    with torch.no_grad():
        assert (theirs(x).logits - load_model(adapter, dtype="float32")(x)).abs().max() < 1e-4


def test_a_lora_on_the_embedding_is_refused_by_name(tmp_path):
    from neoxko import load_model
    from neoxko.errors import CheckpointError

    _peft_adapter(resolve("ko-small"), tmp_path / "a", dict(r=4, lora_alpha=8,
                                                            target_modules=["embed_in", "query_key_value"]))
    with pytest.raises(CheckpointError, match="a LoRA on an embedding layer, which neoxko does not apply; merge it "
                                              "with peft"):
        load_model(tmp_path / "a")
