"""neoxko's CPU kernels (neoxko/kernels): each product against a float reference, with bounds derived from what the
kernel rounds, the layouts, the layers that use them, and the fallbacks when they cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from neoxko import kernels
from neoxko.quantize import Int4Linear, Int8Linear, dequantize, quantize_weight

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason=f"kernels not built here: {kernels.why_not()}")


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most that quantizing x to int8 per block of 128 (error at most max |x_block| / 254 a value) can move
    x @ w.T, per output: sum over blocks of max |x_block| / 254 * sum |w over the block|."""
    m, k = x.shape
    xmax = x.float().abs().view(m, k // 128, 128).amax(-1)  # (M, blocks)
    wabs = w.float().abs().view(w.shape[0], k // 128, 128).sum(-1)  # (N, blocks)
    return xmax @ wabs.T / 254


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matches_the_dequantized_product_within_the_activation_rounding(rows, dtype):
    torch.manual_seed(rows)
    x = torch.randn(rows, 384, dtype=dtype)
    linear = torch.nn.Linear(384, 72).to(dtype)
    layer = Int8Linear.from_linear(linear)
    assert layer.kernel
    w = dequantize(layer)
    with torch.no_grad():
        y = layer(x).float()
    reference = x.float() @ w.T + linear.bias.float()
    slack = 1e-4 + (8e-3 * reference.abs() if dtype == torch.bfloat16 else 0)  # bf16 output: one rounding
    assert ((y - reference).abs() <= activation_bound(x, w) + slack).all()
    assert (y - reference).abs().max() > 0  # it did quantize the activations (weight-only would be exact)


@needs_kernels
@pytest.mark.parametrize("group_size", [64, 128, 256])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_matches_the_dequantized_product_within_the_activation_rounding(group_size, rows):
    torch.manual_seed(group_size + rows)
    x = torch.randn(rows, 512)
    linear = torch.nn.Linear(512, 40)
    layer = Int4Linear.from_linear(linear, group_size)
    assert layer.kernel
    q, scales, zeros = layer._get()
    w = ((q.float().view(40, -1, group_size) - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(40, 512)
    with torch.no_grad():
        y = layer(x)
    reference = x @ w.T + linear.bias
    assert ((y - reference).abs() <= activation_bound(x, w) + 1e-4).all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 7])
def test_bf16_matches_float32_within_a_bf16_rounding(rows):
    torch.manual_seed(rows)
    x = torch.randn(1, rows, 256).to(torch.bfloat16)
    layer = kernels.Linear(256, 70).to(torch.bfloat16)  # 70 rows: a partial last tile
    with torch.no_grad():
        y = layer(x).float()
    reference = x.float() @ layer.weight.float().T + layer.bias.float()
    assert ((y - reference).abs() <= 2 ** -8 * reference.abs() + 1e-3).all()
    # up to bf16_rows() rows (measured on this machine) through the kernel, more through torch's product
    chosen = kernels.bf16_linear if rows <= kernels.bf16_rows() else torch.nn.functional.linear
    assert torch.equal(y, chosen(x, layer.weight, layer.bias).float())


@needs_kernels
def test_bf16_linear_leaves_training_and_prefill_to_torch():
    layer = kernels.Linear(256, 64).to(torch.bfloat16)
    x = torch.randn(2, 256, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # a gradient is wanted: nn.Linear's own forward, so backward works
    assert x.grad is not None and layer.weight.grad is not None
    long = torch.randn(32, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.weight, layer.bias))


def test_layouts_round_trip():
    q = torch.randint(0, 16, (8, 256))
    packed = kernels.pack_int4(q)
    assert packed.shape == (8, 128) and torch.equal(kernels.unpack_int4(packed), q.to(torch.uint8))
    # byte j of a row's 128-input chunk holds input j (low nibble) and j + 64 (high); rows 0-3 interleave by chunk
    assert packed[0, 0] == q[0, 0] | (q[0, 64] << 4) and packed[0, 64] == q[1, 0] | (q[1, 64] << 4)
    w = torch.randint(-127, 128, (8, 256), dtype=torch.int8)
    tiled = kernels.tile_int8(w)
    assert torch.equal(kernels.untile_int8(tiled), w) and torch.equal(tiled[0, 128:], w[1, :128])


@needs_kernels
def test_int8_state_dict_is_row_major_whichever_kernel_holds_it():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    ours, torchs = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear, kernel=False)
    assert ours.kernel and not torchs.kernel
    a, b = ours.state_dict(), torchs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["weight"], quantize_weight(linear.weight.detach())[0])
    loaded = Int8Linear(256, 64, True, torch.float32)
    loaded.load_state_dict(b)
    assert loaded.kernel and torch.equal(loaded.weight, ours.weight)


@needs_kernels
def test_int4_kernel_and_torch_kernel_write_the_same_state_dict():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64).to(torch.bfloat16)
    ours, torchs = Int4Linear.from_linear(linear, 64), Int4Linear.from_linear(linear, 64, kernel=False)
    a, b = ours.state_dict(), torchs.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ("qweight", "scales", "zeros", "bias"))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert (ours(x).float() - torchs(x).float()).abs().max() < 0.05 * torchs(x).float().abs().max()


@needs_kernels
def test_a_gradient_through_a_kernel_layer_uses_the_dequantized_weights():
    layer = Int8Linear.from_linear(torch.nn.Linear(256, 64))
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, dequantize(layer).sum(0).expand(3, -1), atol=1e-4)


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return out.stdout.strip()


def test_switched_off_or_unbuildable_kernels_fall_back_to_torch_and_say_why(tmp_path):
    code = ("from neoxko import kernels; from neoxko.quantize import Int8Linear; import torch\n"
            "print(kernels.library() is None, '|', kernels.why_not(), '|', "
            "Int8Linear.from_linear(torch.nn.Linear(256, 64)).kernel)")
    assert _run(code, NEOXKO_KERNELS="0") == "True | NEOXKO_KERNELS=0 | False"
    broken = _run(code, CC="/bin/false", NEOXKO_KERNELS_CACHE=str(tmp_path))
    assert broken.startswith("True | building neoxko's kernels (linear.c, attention.c) failed") and broken.endswith("False")
    missing = _run(code, CC=str(tmp_path / "no-such-cc"), NEOXKO_KERNELS_CACHE=str(tmp_path))
    assert missing.startswith("True | building neoxko's kernels (linear.c, attention.c) failed") and "no-such-cc" in missing


@needs_kernels
@pytest.mark.parametrize("march,isa,flag", [("haswell", "AVX2 (int8 through vpmaddubsw", "avx2"),
                                            ("icelake-server", "AVX-512 VNNI (bf16 through fp32)", "avx512_vnni")])
def test_the_code_for_other_cpus_matches_too(tmp_path, march, isa, flag):
    """Most laptops have AVX2 without AVX-512 or VNNI, and many servers AVX-512 VNNI without AVX512-BF16: the same
    products built for those CPUs (which a newer CPU also runs) pass the same bounds."""
    if kernels.isa().startswith(isa) or flag not in kernels.cpu_signature().split():
        pytest.skip(f"the native build is already {isa}, or this CPU cannot run it")
    env = {**os.environ, "NEOXKO_KERNELS_MARCH": march, "NEOXKO_KERNELS_CACHE": str(tmp_path)}
    built = subprocess.run([sys.executable, "-c", "from neoxko import kernels; print(kernels.isa())"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert built.startswith(isa)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "matches and not other_cpus"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-2000:]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,keys", [(64, 5), (128, 67), (256, 300)])
def test_decoding_attention_matches_float_sdpa(dtype, head_size, keys):
    """One query a row over a cache view (rows and slots cut from a bigger cache, as decoding passes it), a mask with
    holes (left padding, free slots) per row or shared: the float32 result of SDPA, within one rounding of the
    output's dtype."""
    torch.manual_seed(head_size + keys)
    cache_k, cache_v = (torch.randn(3, 4, keys + 9, head_size).to(dtype) for _ in range(2))
    k, v = cache_k[:2, :, :keys], cache_v[:2, :, :keys]
    q = torch.randn(2, 1, 4, head_size).to(dtype).transpose(1, 2)  # (B, H, 1, D), not contiguous
    for mask in (torch.rand(2, 1, 1, keys) > 0.3, torch.arange(keys).view(1, 1, 1, keys) < keys - 2):
        mask[..., 0] = True
        assert kernels.attention_takes(q, k, v, mask)
        got = kernels.attend_one(q, k, v, mask).float()
        reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8 * reference.abs() + 1e-3
        assert ((got - reference).abs() <= tolerance).all()


@needs_kernels
def test_decoding_attention_leaves_the_rest_to_torch():
    q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 8, 64)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    assert kernels.attention_takes(q, k, k, mask)
    assert not kernels.attention_takes(torch.randn(1, 2, 3, 64), k, k, mask)  # prefill: several queries
    assert not kernels.attention_takes(q, k, k, mask.float())  # an additive mask
    assert not kernels.attention_takes(torch.randn(1, 2, 1, 24), torch.randn(1, 2, 8, 24), k[..., :24], mask)  # 24
    assert not kernels.attention_takes(q.bfloat16(), k, k, mask)  # mixed dtypes


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_long_prefill_multiplies_the_dequantized_weights(dtype):
    """From INT4_DENSE_ROWS rows on, the layer dequantizes its weights (exactly: the values _get gives) for one dense
    product, so the activations are not rounded to int8 there."""
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 64).to(dtype), 64)
    q, scales, zeros = layer._get()
    w = ((q.float().view(64, -1, 64) - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(64, 256)
    assert torch.equal(kernels.dequantize_int4(layer.weight_packed, scales, zeros, 64, torch.float32), w)
    assert torch.equal(kernels.dequantize_int4(layer.weight_packed, scales, zeros, 64, torch.bfloat16),
                       w.to(torch.bfloat16))
    x = torch.randn(kernels.INT4_DENSE_ROWS, 256, dtype=dtype)
    with torch.no_grad():
        y = layer(x).float()
    reference = x.float() @ w.to(dtype).float().T + layer.bias.float()
    assert ((y - reference).abs() <= 2 ** -7 * reference.abs() + 1e-3).all()
