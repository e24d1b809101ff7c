"""Int8 weight-only quantization: accuracy, save and load, the command, refusals."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import random_model, tiny_config
from neoxko import load_model, save_model
from neoxko.errors import CheckpointError
from neoxko.quantize import Int8Linear, dequantize, quantize_model, quantize_weight


def test_quantized_weights_are_within_half_a_step():
    w = torch.randn(64, 48)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("tied", [False, True])
def test_int8_model_agrees_with_the_float_one(tied):
    model = random_model(tiny_config(tie_word_embeddings=tied)).eval()
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        reference = model(x)
        quantize_model(model)
        got = model(x)
    assert isinstance(model.gpt_neox.layers[0].mlp.dense_h_to_4h, Int8Linear)
    # a tied head keeps sharing the embedding; an untied one is quantized
    assert isinstance(model.embed_out, Int8Linear) != tied
    assert not tied or model.embed_out.weight is model.gpt_neox.embed_in.weight
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()
    # the module computes exactly the dequantized product
    layer = model.gpt_neox.layers[0].attention.dense
    h = torch.randn(3, 64)
    torch.testing.assert_close(layer(h), h @ dequantize(layer).T + layer.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_file_is_smaller_and_readable_like_any_other(tmp_path, tied):
    model = random_model(tiny_config(tie_word_embeddings=tied)).to(torch.bfloat16).eval()
    save_model(model, tmp_path / "bf16")
    save_model(quantize_model(model), tmp_path / "int8")
    size = lambda name: (tmp_path / name / "model.safetensors").stat().st_size
    assert size("int8") < 0.85 * size("bf16")
    assert (tmp_path / "int8" / "model.safetensors").stat().st_mode & 0o777 == \
        (tmp_path / "int8" / "config.json").stat().st_mode & 0o777  # not owner-only


def test_int8_files_with_a_quantized_tied_head_still_load(tmp_path):
    """The layout neoxko 0.1 wrote: a tied head quantized beside the float embedding."""
    model = random_model(tiny_config(tie_word_embeddings=True)).to(torch.bfloat16).eval()
    quantize_model(model, tied_head="int8")
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].pop("tied_head")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert isinstance(loaded.embed_out, Int8Linear) and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_int8(tmp_path, tied):
    model = quantize_model(random_model(tiny_config(tie_word_embeddings=tied)).to(torch.bfloat16).eval())
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "neoxko_int8"
    loaded = load_model(tmp_path)
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.gpt_neox.layers[1].mlp.dense_4h_to_h.weight.dtype == torch.int8


def test_quantize_command(model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "neoxko", "quantize", "--model", str(model_dir), "--output",
                          str(tmp_path / "q")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    run = subprocess.run([sys.executable, "-m", "neoxko", "generate", "--model", str(tmp_path / "q"),
                          "--max-new-tokens", "5", "--temperature", "0", "서울"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    direct = subprocess.run([sys.executable, "-m", "neoxko", "generate", "--model", str(model_dir), "--quantize",
                             "int8", "--dtype", "bfloat16", "--max-new-tokens", "5", "--temperature", "0", "서울"],
                            capture_output=True, text=True)
    assert direct.stdout == run.stdout


def test_unknown_quantization_is_refused(model_dir, tmp_path):
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with 'gptq', which neoxko cannot read"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="unknown quantization 'int4'"):
        load_model(model_dir, quantize="int4")
