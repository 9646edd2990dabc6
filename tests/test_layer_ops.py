"""The fused RoPE, SiLU-gate and add-and-norm kernels against float64 oracles and transformers'
own code, and the swap of the fused operations into models of every supported family."""

import sys

import pytest
import torch
import triton
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, needs_gpu, needs_kernel_device
from seer_gates import pool_keys, pool_queries
from seer_kernels import (
    add_rms_norm,
    compile_add_rms_norm,
    compile_rotary,
    layer_ops,
    rotary_embedding,
    rotary_embedding_pair,
    rotary_embedding_pooled,
    rotary_embedding_reference,
    silu_gate_,
    silu_gate_reference,
)
from tiny_models import FAMILIES, NUM_LAYERS, random_ids, tiny_model
from transformers.models.llama import modeling_llama

from seer_cli.engine import fused_layers
from seer_cli.engine.fused_layers import fuse_layers
from seer_cli.engine.generation import cache_argument

# Largest error allowed against the float64 oracle: one rounding of the output, a little more.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rope_tables(batch: int, s: int, d: int, dtype, device, seed: int = 0):
    """cos/sin [batch, s, d] as a transformers rotary module makes them: the frequencies twice,
    scaled (as YaRN's attention factor does), at different positions per sequence."""
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    start = torch.randint(0, 5000, (batch, 1, 1), generator=generator)
    freqs = (torch.arange(s, dtype=torch.float64)[None, :, None] + start) * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return tuple((1.1 * f(angles)).to(dtype).to(device) for f in (torch.cos, torch.sin))


def heads_second(b: int, s: int, h: int, d: int, dtype, device, seed: int):
    """[b, h, s, d] viewed from [b, s, h, d], as the attention layers hand q and k over."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, d, generator=generator, dtype=torch.float32)
    return x.to(dtype).to(device).transpose(1, 2)


def unfused_rope(family_module):
    apply = family_module.apply_rotary_pos_emb
    return getattr(apply, "unfused", apply)


def test_rope_reference_is_transformers_rope():
    q = heads_second(2, 37, 4, 64, torch.float32, "cpu", seed=1)
    k = heads_second(2, 37, 2, 64, torch.float32, "cpu", seed=2)
    cos, sin = rope_tables(2, 37, 64, torch.float32, "cpu")
    q_hf, k_hf = unfused_rope(modeling_llama)(q, k, cos, sin)
    torch.testing.assert_close(rotary_embedding_reference(q, cos, sin), q_hf)
    torch.testing.assert_close(rotary_embedding_reference(k, cos, sin), k_hf)


ROPE_SHAPES = [(1, 3, 1, 64), (2, 4, 37, 64), (1, 2, 130, 128), (2, 3, 33, 80)]


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("table_batch", ["per sequence", "shared"])
def test_rotary_kernel_matches_the_oracle(shape, dtype, table_batch, poisoned_empty):
    b, h, s, d = shape
    x = heads_second(b, s, h, d, dtype, KERNEL_DEVICE, seed=3)
    cos, sin = rope_tables(b if table_batch == "per sequence" else 1, s, d, dtype, KERNEL_DEVICE)
    out = rotary_embedding(x, cos, sin)
    oracle = rotary_embedding_reference(x.double(), cos.double(), sin.double())
    assert out.dtype == dtype and out.stride() == x.stride()
    assert (out.double() - oracle).abs().max() <= TOLERANCE[dtype] * max(1, oracle.abs().max())


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("keys", [False, True], ids=["queries", "keys"])
def test_rotary_kernel_pools_the_blocks_it_rotates(shape, dtype, keys):
    """The rotated tensor is the plain kernel's, and the pools are the gates' own (pre-RoPE,
    blocks of 64 from the first row, a partial last block pooling what it has)."""
    b, h, s, d = shape
    x = heads_second(b, s, h, d, dtype, KERNEL_DEVICE, seed=5)
    cos, sin = rope_tables(b, s, d, dtype, KERNEL_DEVICE)
    out, pooled = rotary_embedding_pooled(x, cos, sin, keys=keys)
    torch.testing.assert_close(out, rotary_embedding(x, cos, sin), atol=0, rtol=0)
    oracle = (pool_keys if keys else pool_queries)(x.transpose(1, 2).double())
    assert pooled.dtype == torch.float32 and pooled.shape == oracle.shape
    assert (pooled.double() - oracle).abs().max() <= 1e-5 * max(1, oracle.abs().max())


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("pools", [False, True], ids=["plain", "pooled"])
@pytest.mark.parametrize("s", [1, 130])
def test_rotary_pair_is_each_tensor_rotated_alone(s, pools, dtype):
    """One launch over a layer's queries and keys (their own head counts and layouts) gives what
    a launch for each gives, pools included."""
    q = heads_second(2, s, 5, 64, dtype, KERNEL_DEVICE, seed=8)
    k = torch.randn(2, 2, s, 64, generator=torch.Generator().manual_seed(9)).to(
        KERNEL_DEVICE, dtype
    )
    cos, sin = rope_tables(2, s, 64, dtype, KERNEL_DEVICE)
    q_out, k_out, q_pools, k_pools = rotary_embedding_pair(q, k, cos, sin, pools=pools)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    if pools:
        for (out, pooled), x, keys in ((q_out, q_pools), q, False), ((k_out, k_pools), k, True):
            alone, alone_pools = rotary_embedding_pooled(x, cos, sin, keys=keys)
            torch.testing.assert_close(out, alone, atol=0, rtol=0)
            torch.testing.assert_close(pooled, alone_pools, atol=0, rtol=0)
    else:
        assert q_pools is None and k_pools is None
        torch.testing.assert_close(q_out, rotary_embedding(q, cos, sin), atol=0, rtol=0)
        torch.testing.assert_close(k_out, rotary_embedding(k, cos, sin), atol=0, rtol=0)


@needs_kernel_device
def test_rotary_pair_refuses_tensors_of_other_lengths():
    q = torch.randn(1, 3, 10, 64, device=KERNEL_DEVICE)
    cos, sin = rope_tables(1, 10, 64, torch.float32, KERNEL_DEVICE)
    with pytest.raises(ValueError, match="share batch, length and head_dim"):
        rotary_embedding_pair(q, q[:, :, :9], cos, sin)


@needs_gpu
def test_compiled_rotary_kernels_serve_a_prefill_without_compiling(monkeypatch):
    """What the GPU warm-up compiles while a model loads is what a prefill's RoPE then runs."""
    layer_ops._rotary.device_caches.clear()  # forget what earlier tests compiled here
    compile_rotary(torch.device("cuda"), torch.bfloat16)
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda *args, **kwargs: compiled.append(kwargs))  # fmt: skip
    for d, heads, kv_heads in ((64, 9, 3), (128, 32, 8)):
        q = heads_second(1, 1000, heads, d, torch.bfloat16, "cuda", seed=6)
        k = heads_second(1, 1000, kv_heads, d, torch.bfloat16, "cuda", seed=7)
        cos, sin = rope_tables(1, 1000, d, torch.bfloat16, "cuda")
        for pools in (False, True):
            rotary_embedding_pair(q, k, cos, sin, pools=pools)
    torch.cuda.synchronize()
    assert not compiled


@needs_kernel_device
def test_rotary_kernel_on_contiguous_heads_first_input():
    x = torch.randn(2, 3, 50, 64, device=KERNEL_DEVICE)
    cos, sin = rope_tables(2, 50, 64, torch.float32, KERNEL_DEVICE)
    torch.testing.assert_close(
        rotary_embedding(x, cos, sin), rotary_embedding_reference(x, cos, sin), atol=1e-5, rtol=0
    )


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 1000), (2, 2049)], ids=str)
def test_silu_gate_kernel_matches_the_oracle(shape, dtype):
    generator = torch.Generator().manual_seed(4)
    gate, up = (4 * torch.randn(shape, generator=generator) for _ in range(2))
    gate, up = gate.to(dtype).to(KERNEL_DEVICE), up.to(dtype).to(KERNEL_DEVICE)
    oracle = silu_gate_reference(gate.double(), up.double())
    out = silu_gate_(gate, up)
    assert out is gate
    assert (out.double() - oracle).abs().max() <= TOLERANCE[dtype] * max(1, oracle.abs().max())


def add_norm_inputs(rows: int, hidden: int, dtype, device, seed: int = 7):
    """x, y [1, rows, hidden] with rows of different scales (x a view with a row stride of
    2·hidden, as a slice hands it over) and a weight [hidden] away from ones."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, rows)[None, :, None]
    x = (torch.randn(1, 2 * rows, hidden, generator=generator) * 3)[:, ::2] * scales
    y = torch.randn(1, rows, hidden, generator=generator) * scales
    weight = 1 + torch.randn(hidden, generator=generator) / 2
    return x.to(dtype).to(device), y.to(dtype).to(device), weight.to(dtype).to(device)


def rms_norm_oracle(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double(), weight.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@needs_kernel_device
@pytest.mark.parametrize("dtype", list(dict.fromkeys(KERNEL_DTYPES + [torch.float32])), ids=str)
@pytest.mark.parametrize("hidden", [576, 100, 4096], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("rows", [1, 7, 257], ids=lambda r: f"r{r}")
def test_add_rms_norm_kernel_matches_pytorch(rows, hidden, dtype, poisoned_empty):
    """The sum is ``x + y`` to the bit; the norm of it is within one rounding of the float64
    oracle and no further from it than twice PyTorch's own ``rms_norm`` in the same dtype."""
    if hidden == 4096 and rows == 257 and KERNEL_DEVICE == "cpu":
        pytest.skip("slow under the interpreter; the other shapes cover it")
    x, y, weight = add_norm_inputs(rows, hidden, dtype, KERNEL_DEVICE)
    total, normed = add_rms_norm(x, y, weight, 1e-6)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    assert total.is_contiguous() and normed.is_contiguous()
    torch.testing.assert_close(total, x + y, atol=0, rtol=0)
    oracle = rms_norm_oracle(x + y, weight, 1e-6)
    theirs = torch.nn.functional.rms_norm(x + y, weight.shape, weight, 1e-6)
    error = (normed.double() - oracle).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(1, oracle.abs().max().item())
    assert error <= 2 * (theirs.double() - oracle).abs().max().item() + 1e-7


@needs_kernel_device
def test_add_rms_norm_kernel_takes_any_leading_shape():
    x, y, weight = add_norm_inputs(12, 64, torch.float32, KERNEL_DEVICE, seed=8)
    x, y = x.reshape(3, 4, 64), y.reshape(3, 4, 64)
    total, normed = add_rms_norm(x, y, weight, 1e-5)
    flat_total, flat_normed = add_rms_norm(x.reshape(12, 64), y.reshape(12, 64), weight, 1e-5)
    assert total.shape == normed.shape == (3, 4, 64)
    torch.testing.assert_close(total.reshape(12, 64), flat_total, atol=0, rtol=0)
    torch.testing.assert_close(normed.reshape(12, 64), flat_normed, atol=0, rtol=0)
    empty = torch.empty(0, 64, device=KERNEL_DEVICE)
    assert [t.shape for t in add_rms_norm(empty, empty, weight, 1e-5)] == [(0, 64)] * 2


@needs_kernel_device
def test_add_rms_norm_bad_inputs_raise_value_error():
    x = torch.randn(5, 64, device=KERNEL_DEVICE)
    weight = torch.ones(64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, torch.randn(5, 63, device=KERNEL_DEVICE), weight, 1e-6)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, x, torch.ones(32, device=KERNEL_DEVICE), 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, x.half(), weight, 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, x, weight.half(), 1e-6)
    with pytest.raises(ValueError, match="last dimension"):
        add_rms_norm(x.t(), x.t(), torch.ones(5, device=KERNEL_DEVICE), 1e-6)


@needs_gpu
def test_compiled_add_rms_norm_serves_a_prefill_without_compiling(monkeypatch):
    """What the GPU warm-up compiles while a model loads is what any prompt length then runs,
    for the supported models' hidden sizes."""
    layer_ops._add_rms_norm.device_caches.clear()  # forget what earlier tests compiled here
    compile_add_rms_norm(torch.device("cuda"), torch.bfloat16)
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda *args, **kwargs: compiled.append(kwargs))  # fmt: skip
    for hidden in (576, 960, 2048, 4096, 5120, 8192):
        for rows in (1, 1000):
            x, y, weight = add_norm_inputs(rows, hidden, torch.bfloat16, "cuda")
            add_rms_norm(x.contiguous(), y, weight, 1e-5)
    torch.cuda.synchronize()
    assert not compiled


@needs_kernel_device
def test_bad_inputs_raise_value_error():
    x = torch.randn(1, 2, 10, 64, device=KERNEL_DEVICE)
    cos, sin = rope_tables(1, 9, 64, torch.float32, KERNEL_DEVICE)
    with pytest.raises(ValueError, match="rotary tables"):
        rotary_embedding(x, cos, sin)
    gate = torch.randn(4, 6, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        silu_gate_(gate.t(), torch.randn(6, 4, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="one shape"):
        silu_gate_(gate, torch.randn(4, 5, device=KERNEL_DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rope_matches_the_oracle_as_closely_as_transformers(dtype):
    fuse_layers(tiny_model("llama"))  # swaps the family's RoPE
    q = heads_second(2, 300, 9, 64, dtype, "cpu", seed=3)
    k = heads_second(2, 300, 3, 64, dtype, "cpu", seed=4)
    cos, sin = rope_tables(2, 300, 64, dtype, "cpu")
    fused = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    theirs = unfused_rope(modeling_llama)(q, k, cos, sin)
    for x, ours, hf in zip((q, k), fused, theirs, strict=True):
        oracle = rotary_embedding_reference(x.double(), cos.double(), sin.double())
        assert ours.dtype == dtype and ours.shape == x.shape
        error = (ours.double() - oracle).abs().max().item()
        assert error <= max(TOLERANCE[dtype], (hf.double() - oracle).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_norm_by_rows_is_the_whole_norm_in_float32(dtype, monkeypatch):
    from seer_cli.engine import fused_layers

    monkeypatch.setattr(fused_layers, "CPU_NORM_ELEMENTS", 3 * 40)  # three rows at a time
    x = torch.randn(2, 11, 40).to(dtype)
    weight = torch.randn(40).to(dtype)
    whole = torch.nn.functional.rms_norm(x.float(), (40,), weight.float(), 1e-6).to(dtype)
    by_rows = fused_layers._rms_norm_by_rows(x, weight, 1e-6)
    assert by_rows.shape == x.shape and by_rows.dtype == dtype
    torch.testing.assert_close(by_rows, whole, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_layers_give_the_same_logits_on_the_cpu(family):
    """On the CPU RMSNorm runs by rows (identical per row in float32), the SiLU gate in place and
    RoPE with one new tensor: the same logits as transformers' code in float32."""
    model = tiny_model(family)
    ids = random_ids(90)
    with torch.inference_mode():
        before = model(ids).logits
        fuse_layers(model)
        fuse_layers(model)  # twice is once
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in vars(m) for m in norms)
    assert all("forward" in vars(layer.mlp) for layer in model.model.layers)
    assert all("forward" in vars(layer) for layer in model.model.layers)
    family_module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rope = family_module.apply_rotary_pos_emb
    assert not hasattr(rope.unfused, "unfused")


@needs_gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_layers_on_the_gpu_match_transformers(family, monkeypatch):
    ids = random_ids(200).cuda()
    family_module = sys.modules[type(tiny_model(family).model.layers[0].self_attn).__module__]
    with torch.inference_mode():
        with monkeypatch.context() as patch:
            patch.setattr(family_module, "apply_rotary_pos_emb", unfused_rope(family_module))
            before = tiny_model(family).cuda().to(torch.bfloat16)(ids).logits.float()
        model = tiny_model(family).cuda().to(torch.bfloat16)
        fuse_layers(model)
        after = model(ids).logits.float()
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def counted_add_rms_norm(monkeypatch) -> list:
    """Have the fused decoder layers' add-and-norm calls noted in the returned list."""
    calls = []

    def add_rms_norm_spy(*args, **kwargs):
        calls.append(args[0].shape)
        return add_rms_norm(*args, **kwargs)

    monkeypatch.setattr(fused_layers, "add_rms_norm", add_rms_norm_spy)
    return calls


def prompt_then_continuation(model, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits of a prompt's first ``split`` tokens, then of the rest read against its cache."""
    first = model(ids[:, :split], use_cache=True)
    cache = {cache_argument(model): first.past_key_values}
    rest = model(ids[:, split:], **cache, use_cache=True)
    return torch.cat((first.logits, rest.logits), dim=1)


@needs_kernel_device
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_decoder_layers_match_transformers(family, monkeypatch):
    """The decoder layers' residual adds and the norms after them in the kernel (here the
    interpreter on the CPU in float32) give transformers' logits, the cache passed through to
    the attention: two calls a layer, the second handing the next norm its input's norm."""
    ids = random_ids(90)
    family_module = sys.modules[type(tiny_model(family).model.layers[0].self_attn).__module__]
    with torch.inference_mode():
        with monkeypatch.context() as patch:
            patch.setattr(family_module, "apply_rotary_pos_emb", unfused_rope(family_module))
            before = prompt_then_continuation(tiny_model(family), ids, 70)
        monkeypatch.setattr(fused_layers, "_kernel_device", lambda x: True)  # the interpreter too
        calls = counted_add_rms_norm(monkeypatch)
        taken = []
        take = fused_layers._NormHandoff.take
        monkeypatch.setattr(
            fused_layers._NormHandoff,
            "take",
            lambda self, x: taken.append(take(self, x)) or taken[-1],
        )
        model = tiny_model(family).to(KERNEL_DEVICE)
        fuse_layers(model)
        after = prompt_then_continuation(model, ids.to(KERNEL_DEVICE), 70)
    assert calls == [(1, 70, 128)] * 2 * NUM_LAYERS + [(1, 20, 128)] * 2 * NUM_LAYERS
    # Every layer's output norm was handed over: the next layer's input norm, then the final one.
    assert len(taken) == 2 * NUM_LAYERS and all(normed is not None for normed in taken)
    torch.testing.assert_close(after.cpu(), before, atol=1e-4, rtol=1e-4)


@needs_kernel_device
def test_fused_decoder_layers_keep_the_plain_add_where_the_kernel_does_not_apply(monkeypatch):
    """Tensors that autograd records take the plain add and the norm module: no kernel call, and
    the logits (and gradients) of the unfused layers. So do tensors of another dtype, shape or
    device than the norm's weight, and a norm with hooks of its own."""
    monkeypatch.setattr(fused_layers, "_kernel_device", lambda x: True)
    calls = counted_add_rms_norm(monkeypatch)
    ids = random_ids(40).to(KERNEL_DEVICE)
    model, plain = (tiny_model("llama").to(KERNEL_DEVICE) for _ in range(2))
    fuse_layers(model)
    logits = model(ids).logits
    logits.sum().backward()
    torch.testing.assert_close(logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    norm = model.model.layers[0].post_attention_layernorm
    assert norm.weight.grad is not None and calls == []
    x = torch.randn(1, 5, 128, device=KERNEL_DEVICE)
    assert not fused_layers._adds_in_kernel(x, x, norm)  # the weight's gradient
    with torch.no_grad():
        assert fused_layers._adds_in_kernel(x, x, norm)
        for y in (x.half(), x[None], x.to("meta")):
            assert not fused_layers._adds_in_kernel(x, y, norm)
        norm.register_forward_hook(lambda *args: None)
        assert not fused_layers._adds_in_kernel(x, x, norm)
