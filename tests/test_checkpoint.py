"""Hugging Face checkpoints: our save -> transformers, transformers' save -> ours, hub cache, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from conftest import random_model, tiny_config
from neoxko.checkpoint import load_model, save_model
from neoxko.errors import CheckpointError, ConfigError
from neoxko.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
IDX = torch.randint(0, 384, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_saved_model_loads_in_transformers_with_same_logits(tmp_path, tied):
    model = random_model(tiny_config(tie_word_embeddings=tied, rotary_pct=0.25))
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(hf(IDX).logits, model(IDX), atol=1e-4, rtol=0)
    assert load_file(tmp_path / "model.safetensors").keys() == (
        model.state_dict().keys() - ({"embed_out.weight"} if tied else set()))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_transformers_checkpoints_load_with_same_logits(tmp_path, layout):
    torch.manual_seed(1)
    config = transformers.GPTNeoXConfig(vocab_size=384, hidden_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, intermediate_size=256, rotary_pct=0.5)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    shard = "60KB" if "sharded" in layout else "5GB"
    safe = "bin" not in layout
    try:
        hf.save_pretrained(tmp_path, max_shard_size=shard, safe_serialization=safe)
    except TypeError:
        pytest.skip("this transformers cannot write .bin checkpoints")
    if not safe:
        # transformers 5 writes safetensors only; write the .bin layout it used to write ourselves.
        _to_bin(tmp_path)
    assert any(tmp_path.glob("*index.json")) == ("sharded" in layout)
    model = load_model(tmp_path)
    with torch.no_grad():
        assert_close(model(IDX), hf(IDX).logits, atol=1e-4, rtol=0)


def _to_bin(folder: Path) -> None:
    """Rewrite a safetensors checkpoint as pytorch_model*.bin (with its index when sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        renamed = {f: f.replace("model", "pytorch_model").replace(".safetensors", ".bin")
                   for f in set(weight_map.values())}
        for st, binname in renamed.items():
            torch.save(load_file(folder / st), folder / binname)
            (folder / st).unlink()
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {k: renamed[v] for k, v in weight_map.items()}}))
        index.unlink()
    elif (folder / "model.safetensors").exists():
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def test_pre_zip_bin_format_loads(tmp_path):
    model = random_model(tiny_config())
    save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "model.safetensors").unlink()
    with torch.no_grad():
        assert_close(load_model(tmp_path)(IDX), model(IDX))


def test_old_checkpoint_buffers_are_skipped(tmp_path):
    model = random_model(tiny_config())
    save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert_close(load_model(tmp_path)(IDX), model(IDX))


def test_lm_head_name_is_accepted(tmp_path):
    model = random_model(tiny_config())
    save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state.pop("embed_out.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert_close(load_model(tmp_path)(IDX), model(IDX))


def test_dtype_on_load_and_round_trip(tmp_path):
    model = random_model(tiny_config())
    save_model(model.to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path).embed_out.weight.dtype == torch.bfloat16  # as stored
    loaded = load_model(tmp_path, dtype="float32")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        assert_close(loaded(IDX), model.float()(IDX))


def test_sharded_save_round_trip(tmp_path):
    model = random_model(tiny_config())
    save_model(model, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert_close(load_model(tmp_path)(IDX), model(IDX))


def _hub_env(tmp_path: Path, model_dir: Path, repo: str = "neoxko-test/tiny") -> dict:
    """A hub cache holding repo at one commit, laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_hub_id_loads_from_the_cache_offline(tmp_path, model_dir):
    env = _hub_env(tmp_path, model_dir)
    code = ("import neoxko; m = neoxko.load_model('neoxko-test/tiny'); t = neoxko.load_tokenizer('neoxko-test/tiny');"
            "print(m.config.hidden_size, len(t.encode('대한민국')) > 0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["64", "True"]
    code = "import neoxko; neoxko.load_model('neoxko-test/absent')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "is not in the hub cache, and the hub cannot be reached" in out.stderr


def test_loading_does_not_hold_two_copies(tmp_path):
    """Peak memory while loading (and converting dtype) stays near one copy of the weights."""
    config = tiny_config(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
    save_model(random_model(config), tmp_path / "big")
    save_model(random_model(tiny_config()), tmp_path / "small")
    code = f"""
import neoxko, torch
def kib(field): return int(open('/proc/self/status').read().split(field + ':')[1].split()[0])
neoxko.load_model({str(tmp_path / "small")!r}, dtype='bfloat16')  # first use loads more of torch itself
base = kib('VmRSS')
m = neoxko.load_model({str(tmp_path / "big")!r}, dtype='bfloat16')
size = sum(p.numel() * p.element_size() for p in m.parameters()) // 1024
print(size, kib('VmHWM') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    size, peak = map(int, out.stdout.split())
    # float32 on disk is 2x the bfloat16 model: holding both would peak at 3x size.
    assert peak < 1.5 * size, (size, peak)


@pytest.fixture
def saved(tmp_path):
    save_model(random_model(tiny_config()), tmp_path)
    return tmp_path


def _rewrite(folder: Path, change) -> None:
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)


def test_folder_without_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        load_model(saved)


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda s: s.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): gpt_neox.layers.1.mlp.dense_4h_to_h.weight"):
        load_model(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda s: s.update({"gpt_neox.layers.7.mlp.dense_4h_to_h.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'gpt_neox.layers.7.mlp.dense_4h_to_h.weight'"):
        load_model(saved)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
    _rewrite(saved, lambda s: s.update({"gpt_neox.embed_in.weight": torch.zeros(300, 64)}))
    with pytest.raises(CheckpointError, match=r"'gpt_neox.embed_in.weight' has shape \(300, 64\) in the checkpoint "
                                              r"but the config.json .* expects \(384, 64\)"):
        load_model(saved)


def test_unsupported_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type is 'gpt2', but neoxko runs GPT-NeoX"):
        load_model(saved)


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_model(saved)


def test_bin_with_pickled_code_is_refused(saved):
    (saved / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could not be read as a weights-only PyTorch checkpoint"):
        load_model(saved)


def test_index_naming_absent_shard(saved):
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are not there: model-00001.safetensors"):
        load_model(saved)


def test_index_naming_files_outside_the_folder_is_refused_before_opening_them(saved, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    index = saved / "model.safetensors.index.json"
    opened = []
    monkeypatch.setattr("neoxko.formats.hf.safe_open", lambda f, **k: opened.append(f) or (_ for _ in ()).throw(OSError))
    for name in ("../outside/w.safetensors", "/etc/hostname", str(outside / "w.safetensors")):
        index.write_text(json.dumps({"weight_map": {"gpt_neox.embed_in.weight": name}}))
        with pytest.raises(CheckpointError, match="names weight file\\(s\\) outside its folder"):
            load_model(saved)
    assert opened == []


def test_a_file_or_bad_id_instead_of_a_folder(saved, monkeypatch):
    with pytest.raises(CheckpointError, match="is a file; pass the folder"):
        load_model(saved / "config.json")
    with pytest.raises(CheckpointError, match="no/such/folder/here: no such folder"):
        load_model("no/such/folder/here")
    with pytest.raises(CheckpointError, match="neither an existing folder nor a valid hub id"):
        load_model("no such model")


def test_tokenizer_missing(saved):
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load_tokenizer(saved)


def test_tokenizer_eos_not_in_vocab(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(CheckpointError, match="names eos_token '</s>', which tokenizer.json does not have"):
        load_tokenizer(tmp_path)


def test_unknown_dtype(saved):
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'; use one of float32, bfloat16, float16"):
        load_model(saved, dtype="float8")


def test_save_model_writes_a_complete_folder_with_its_tokenizer(tmp_path, model_dir, tokenizer_dir):
    import subprocess
    import sys

    loaded = load_model(model_dir)  # a folder with a tokenizer: save_model keeps it
    save_model(loaded, tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    fresh = random_model(tiny_config())
    save_model(fresh, tmp_path / "given", tokenizer=load_tokenizer(tokenizer_dir))
    save_model(fresh, tmp_path / "named", tokenizer=str(tokenizer_dir))
    for folder in ("given", "named"):
        out = subprocess.run([sys.executable, "-m", "neoxko", "generate", "--model", str(tmp_path / folder),
                              "--max-new-tokens", "3", "--temperature", "0", "안녕"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    save_model(fresh, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="has no tokenizer.json; save the model with neoxko.save_model"):
        load_tokenizer(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="has no tokenizer.json; pass a tokenizer folder, a model folder with one"):
        save_model(fresh, tmp_path / "x", tokenizer=tmp_path / "bare")


def test_a_mistyped_local_folder_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from neoxko.checkpoint import resolve
    from neoxko.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ft-demo").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^runs/ft-dmeo: no such folder \(in runs: ft-demo\)$"):
        resolve("runs/ft-dmeo")
    for typo in ("./my-model", "../my-model", "/nowhere/my-model", "a/b/c"):
        with pytest.raises(CheckpointError, match=f"^{typo}: no such folder"):
            resolve(typo)
