"""Per-CPU choices: what neoxko picks on a CPU with and without native bf16 and AVX-512, and where it says so."""

import argparse
import re

import torch

import neoxko.hardware as hardware
from neoxko.hardware import Hardware

AVX2 = Hardware(capability="AVX2", native_bf16=False, vnni=False, cores=4, threads=4)
ZEN4 = Hardware(capability="AVX512", native_bf16=True, vnni=True, cores=2, threads=2)


def test_the_choices_follow_the_cpu(monkeypatch):
    from neoxko import kernels

    assert ZEN4.fused_int8 and ZEN4.default_dtype(torch.bfloat16)[0] == torch.bfloat16
    assert not AVX2.fused_int8 and AVX2.default_dtype(torch.float32)[0] == torch.float32
    monkeypatch.setattr(kernels, "library", lambda: object())  # neoxko's kernels built: bf16 stays bf16
    monkeypatch.setattr(kernels, "isa", lambda: "AVX2")
    assert AVX2.default_dtype(torch.bfloat16)[0] == torch.bfloat16
    assert "neoxko's kernels decode bf16 weights at memory speed" in AVX2.default_dtype(torch.bfloat16)[1]
    text = hardware.describe(AVX2)
    assert "native bf16: no" in text and re.search(r"int8 decoding under --compile( \(without neoxko's kernels\))?: "
                                                  r"torch's int8 kernel", text)
    assert "measured 1.42 against 8.26 tok/s" in text and "default compute dtype" in text
    monkeypatch.setattr(kernels, "library", lambda: None)  # not built: float32, and the reason is given
    monkeypatch.setattr(kernels, "why_not", lambda: "no C compiler found")
    dtype, why = AVX2.default_dtype(torch.bfloat16)
    assert dtype == torch.float32 and "neoxko's kernels are not built (no C compiler found)" in why
    assert AVX2.default_dtype(torch.float16)[0] == torch.float32


def test_the_command_line_and_load_model_choose_alike(monkeypatch, capsys, model_dir):
    """The command line passes no dtype of its own: load_model chooses for the CPU, says so once, and --dtype wins."""
    from neoxko import kernels, load_model
    from neoxko.cli.models import compute_dtype

    assert compute_dtype(argparse.Namespace(dtype=None, device="cpu")) is None
    assert compute_dtype(argparse.Namespace(dtype="bfloat16", device="cpu")) == "bfloat16"  # asked for: kept
    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(hardware, "_told", set())
    bf16 = load_model(model_dir, dtype="bfloat16")
    folder = model_dir.parent / "bf16-model"
    from neoxko import save_model

    save_model(bf16, folder)
    assert load_model(folder).embed_out.weight.dtype == torch.float32
    assert load_model(folder).embed_out.weight.dtype == torch.float32
    assert capsys.readouterr().err.count("bfloat16 weights compute in float32") == 1  # once per process
    assert load_model(folder, dtype="bfloat16").embed_out.weight.dtype == torch.bfloat16
    monkeypatch.setattr(hardware, "detect", lambda: ZEN4)
    assert load_model(folder).embed_out.weight.dtype == torch.bfloat16  # as stored


def test_bf16_training_on_such_a_cpu_warns(monkeypatch, capsys):
    from neoxko.train.loop import warn_emulated_bf16

    monkeypatch.setattr(hardware, "detect", lambda: AVX2)
    warn_emulated_bf16()
    err = capsys.readouterr().err
    assert "bf16: true on a CPU without native bf16 (AVX2)" in err and "set bf16: false" in err
    monkeypatch.setattr(hardware, "detect", lambda: ZEN4)
    warn_emulated_bf16()
    assert capsys.readouterr().err == ""


def test_info_hardware_and_the_fused_int8_override(capsys):
    from neoxko import kernels
    from neoxko.cli import main
    from neoxko.quantize import fused_int8_choice

    assert main(["info", "--hardware"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu capability  ") and "torch's _weight_int4pack_mm_for_cpu" in out
    assert "neoxko's CPU kernels: " + ("built for this CPU" if kernels.isa() else "not used") in out
    assert fused_int8_choice(None, ZEN4) and not fused_int8_choice(None, AVX2)
    assert fused_int8_choice("1", AVX2) and not fused_int8_choice("0", ZEN4)  # NEOXKO_FUSED_INT8 overrides


def test_int8_activations_are_chosen_on_amx_and_match_the_weight_only_product(monkeypatch):
    import neoxko.quantize as quantize
    from neoxko import kernels
    from neoxko.quantize import Int8Linear, dequantize, int8_matmul

    assert not ZEN4.int8_activations and Hardware("AVX512", True, True, 2, 2, amx_int8=True).int8_activations
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(256, 96), kernel=False)  # torch's two paths (neoxko's: test_kernels)
    x = torch.randn(2, 8, 256)  # 16 rows: the int8 x int8 path when it is on
    reference = x @ dequantize(layer).T + layer.bias
    for on in (False, True):
        monkeypatch.setattr(quantize, "INT8_ACTIVATIONS", on)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (2, 8, 96)
        assert (y - reference).abs().max() < (0.05 if on else 1e-4) * reference.abs().max()  # per-row int8 x: ~1%
    monkeypatch.setattr(quantize, "INT8_ACTIVATIONS", True)
    with torch.no_grad():  # fewer than 8 rows (batch-1 decoding): the weight-only kernel, as before
        assert (layer(x[:1, :4]) - reference[:1, :4]).abs().max() < 1e-4
    if kernels.library() is not None:  # with neoxko's kernel too: AMX's torch._int_mm from 8 rows, the same numbers
        ours = Int8Linear.from_linear(torch.nn.Linear(256, 96), kernel=True)
        ours.load_state_dict(layer.state_dict())
        calls = []
        monkeypatch.setattr(quantize, "int8_matmul", lambda *a: calls.append(1) or int8_matmul(*a))
        with torch.no_grad():
            assert torch.equal(ours(x), layer(x)) and len(calls) == 2
