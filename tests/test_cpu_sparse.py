"""The CPU block-sparse kernel (C++, built once per machine) against a float64 oracle, the
PyTorch reference and dense SDPA; its fallback where it cannot be built; and the engine's CPU
path with it.

CPU only: it runs the same on any machine (the first run builds the kernel, ~30 s).
"""

import pytest
import torch
import torch.nn.functional as F
from seer_gates import MaskPolicy
from seer_kernels import (
    block_sparse_attention_cpu,
    block_sparse_attention_reference,
    kept_block_indices,
    num_blocks,
)
from seer_kernels import block_sparse_cpu as cpu_module
from test_chunked_kernels import chunk_mask, chunks
from test_kernels import assert_close_to_oracle, oracle_attention, random_qkv, shape_id
from tiny_models import NUM_LAYERS, random_ids, tiny_gates, tiny_model

from seer_cli.engine import attention
from seer_cli.engine.attention import SparsePrefill, attention_kernel
from seer_cli.engine.errors import SeerError
from seer_cli.engine.generation import prefill

# (seq_len, q_heads, kv_heads, head_dim): lengths around block edges and a partial last block,
# GQA ratios 1, 3 and 4, head_dim 64 and 128.
SHAPES = [
    (1, 4, 4, 64),
    (63, 9, 3, 64),
    (65, 8, 2, 128),
    (1000, 9, 3, 64),
    (1000, 4, 4, 128),
    (4097, 8, 2, 64),
]
MASKS = ["random", "diagonal", "full"]


def block_mask(kind: str, batch: int, heads: int, rows: int, cols: int, seed: int = 0):
    if kind == "full":
        return torch.ones(batch, heads, rows, cols, dtype=torch.bool)
    if kind == "diagonal":  # every row keeps only its diagonal block
        return torch.zeros(batch, heads, rows, cols, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, rows, cols, generator=gen) < 0.3


def shuffled_lists(mask: torch.Tensor, seed: int = 0):
    """The mask's block lists in a random order per row, unused slots holding junk: the kernel
    may rely on neither (a top-k selection lists blocks by score)."""
    indices, counts = kept_block_indices(mask)
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(indices.shape, generator=gen)
    order[torch.arange(indices.shape[-1]) >= counts[..., None]] = 2.0  # unused slots stay last
    indices = indices.gather(-1, order.argsort(-1))
    unused = torch.arange(indices.shape[-1]) >= counts[..., None]
    return indices.masked_fill(unused, 123456).contiguous(), counts


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_oracle_and_reference(shape, mask_kind):
    s, hq, _, _ = shape
    batch = 1 if s > 1000 else 2
    q, k, v = random_qkv(shape, torch.float32, "cpu", batch=batch)
    nb = num_blocks(s)
    mask = block_mask(mask_kind, batch, hq, nb, nb)
    out = block_sparse_attention_cpu(q, k, v, *shuffled_lists(mask))
    reference = block_sparse_attention_reference(q, k, v, mask)
    if s <= 1000:  # the oracle holds s² float64 probabilities per head
        assert_close_to_oracle(out, reference, oracle_attention(q, k, v, mask))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(65, 9, 3, 64), (1000, 8, 2, 128)], ids=shape_id)
def test_full_mask_is_dense_causal_attention(shape):
    q, k, v = random_qkv(shape, torch.float32, "cpu", seed=2)
    nb = num_blocks(shape[0])
    indices, counts = kept_block_indices(block_mask("full", 2, shape[1], nb, nb))
    out = block_sparse_attention_cpu(q, k, v, indices, counts)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len, chunk", [(130, 63), (1000, 300), (1000, 256)])
def test_chunks_give_the_rows_of_the_whole_prompt(seq_len, chunk):
    """Queries that are the last rows of the keys, starting inside a block or on its edge."""
    q, k, v = random_qkv((seq_len, 6, 2, 64), torch.float32, "cpu", seed=3)
    nb = num_blocks(seq_len)
    mask = block_mask("random", 2, 6, nb, nb, seed=3)
    whole = block_sparse_attention_reference(q, k, v, mask)
    for start, end in chunks(seq_len, chunk):
        rows = chunk_mask(mask, start, end)
        part = block_sparse_attention_cpu(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], *kept_block_indices(rows)
        )
        torch.testing.assert_close(part, whole[:, :, start:end], rtol=1e-5, atol=1e-5)


BFLOAT16_SHAPES = [(63, 9, 3, 64), (1000, 9, 3, 64), (1000, 4, 4, 128)]


@pytest.mark.parametrize("shape", BFLOAT16_SHAPES, ids=shape_id)
def test_bfloat16_products_match_float32_on_the_same_inputs(shape):
    """bfloat16 in: products on bfloat16 operands with float32 sums (where the CPU packs them),
    probabilities rounded once; against float32 on the same rounded inputs."""
    q, k, v = (x.bfloat16() for x in random_qkv(shape, torch.float32, "cpu", seed=5))
    nb = num_blocks(shape[0])
    mask = block_mask("random", 2, shape[1], nb, nb, seed=5)
    lists = shuffled_lists(mask)
    out = block_sparse_attention_cpu(q, k, v, *lists)
    assert out.dtype == torch.bfloat16
    expected = block_sparse_attention_cpu(q.float(), k.float(), v.float(), *lists)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_strided_inputs_and_other_dtypes():
    """The model hands over q/k/v as transposed views; a bfloat16 model gets bfloat16 back."""
    q, k, v = random_qkv((200, 6, 2, 64), torch.float32, "cpu", seed=4)
    q_view, k_view, v_view = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    mask = block_mask("random", 2, 6, 4, 4, seed=4)
    lists = kept_block_indices(mask)
    expected = block_sparse_attention_reference(q, k, v, mask)
    out = block_sparse_attention_cpu(q_view, k_view, v_view, *lists)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    low = block_sparse_attention_cpu(*(x.bfloat16() for x in (q, k, v)), *lists)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def test_without_a_compiler_one_warning_then_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path))
    cpu_module.cpu_kernel.cache_clear()
    try:
        q, k, v = random_qkv((130, 4, 2, 64), torch.float32, "cpu", seed=5)
        mask = block_mask("random", 2, 4, 3, 3, seed=5)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
            out = block_sparse_attention_cpu(q, k, v, *kept_block_indices(mask))
            block_sparse_attention_cpu(q, k, v, *kept_block_indices(mask))
        assert len(caught) == 1
        expected = block_sparse_attention_reference(q, k, v, mask)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        cpu_module.cpu_kernel.cache_clear()


def test_rejects_bad_lists():
    q, k, v = random_qkv((130, 4, 2, 64), torch.float32, "cpu")
    indices, counts = kept_block_indices(block_mask("random", 2, 4, 3, 3))
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attention_cpu(q, k, v, indices.long(), counts)
    with pytest.raises(ValueError, match="shaped"):
        block_sparse_attention_cpu(q, k, v, indices[:, :, :2], counts)


# ---------------------------------------------------------------- the engine's CPU path


@pytest.mark.parametrize(
    "policy", [MaskPolicy(sparsity=0.7), MaskPolicy(threshold=1.0)], ids=["topk", "threshold"]
)
@pytest.mark.parametrize("ubatch_size", [0, 128], ids=["one-pass", "chunks"])
def test_engine_cpu_path_matches_the_reference_path(policy, ubatch_size, monkeypatch):
    """The CPU picks this kernel by default; the model's logits are the reference path's."""
    monkeypatch.delenv("SEER_ATTENTION_KERNEL", raising=False)
    assert attention_kernel(torch.device("cpu")) == "cpu"
    model = tiny_model("llama")
    sparse = SparsePrefill(model, policy, tiny_gates(model))
    calls = []
    kernel = attention.block_sparse_attention_cpu
    monkeypatch.setattr(
        attention, "block_sparse_attention_cpu", lambda *args: calls.append(1) or kernel(*args)
    )
    try:
        ids = random_ids(449)
        logits = prefill(model, ids, ubatch_size=ubatch_size)[0]
        kept = sparse.stats.kept()
        assert len(calls) == NUM_LAYERS * (1 if ubatch_size == 0 else 4)
        sparse.stats.clear()
        monkeypatch.setenv("SEER_ATTENTION_KERNEL", "reference")
        expected = prefill(model, ids, ubatch_size=ubatch_size)[0]
    finally:
        sparse.detach()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert kept == sparse.stats.kept()
    assert sparse.stats.overall() > 0.1  # blocks were skipped


def test_unknown_kernel_override_is_a_user_error(monkeypatch):
    monkeypatch.setenv("SEER_ATTENTION_KERNEL", "fast")
    with pytest.raises(SeerError, match="SEER_ATTENTION_KERNEL must be one of"):
        attention_kernel(torch.device("cpu"))


def test_a_build_is_announced_to_the_notifier(monkeypatch, tmp_path):
    """The command line shows a transient line while the kernel compiles."""
    from seer_kernels.tuning import set_tuning_notifier

    def failed_build(*args):
        raise cpu_module.CpuKernelUnavailable("stopped before compiling")

    monkeypatch.setattr(cpu_module, "_build", failed_build)
    notes = []
    set_tuning_notifier(notes.append)
    try:
        with pytest.raises(cpu_module.CpuKernelUnavailable, match="stopped"):
            cpu_module.load_cpu_kernel(tmp_path)
    finally:
        set_tuning_notifier(None)
    assert notes == ["building the CPU attention kernel (once per machine)"]
