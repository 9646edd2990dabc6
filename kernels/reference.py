"""Plain-PyTorch references of the Triton kernels; also the attention path without a GPU.

Both work one chunk of query blocks at a time, so memory grows with the chunk, never with s².
They compute in the inputs' dtype with the softmax in at least float32, as the kernels do.
"""

import torch

from ._common import BLOCK, check_attention_inputs, num_blocks, query_blocks, softmax_scale
from .block_sparse import check_block_mask

# Scores held at once per chunk (elements): bounds the references' working memory (~256 MB fp32).
_CHUNK_ELEMENTS = 1 << 26


def _pad_to_blocks(x: torch.Tensor, nb: int, start: int = 0) -> torch.Tensor:
    """[b, H, s, d] → [b, H, nb, BLOCK, d]: the tokens at offset ``start`` of the first block,
    zeros around them."""
    b, h, s, d = x.shape
    padded = x.new_zeros(b, h, nb * BLOCK, d)
    padded[:, :, start : start + s] = x
    return padded.view(b, h, nb, BLOCK, d)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(per_row_elements: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(per_row_elements, 1))


def _chunks_of_rows(row_widths: list[int], elements_per_block: int):
    """Consecutive query block rows grouped so that rows × widest row stays within the budget
    and padding narrower rows to the widest wastes at most a quarter of the work.

    Yields (rows slice, width): each row of the chunk gathers ``width`` key blocks.
    """
    start = 0
    while start < len(row_widths):
        stop, width, needed = start + 1, row_widths[start], row_widths[start]
        while stop < len(row_widths):
            wider = max(width, row_widths[stop])
            padded = (stop + 1 - start) * wider
            if padded * elements_per_block > _CHUNK_ELEMENTS or padded > 1.25 * (
                needed + row_widths[stop]
            ):
                break
            stop, width, needed = stop + 1, wider, needed + row_widths[stop]
        yield slice(start, stop), width
        start = stop


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Reference of :func:`block_sparse_attention`, same arguments and result, any device/dtype
    (q may be the last rows of k/v, with the block mask's rows on the key grid as there).

    Gathers each query block's kept key/value blocks (the diagonal always included) and runs
    one batched matmul per chunk of query block rows.
    """
    check_attention_inputs(q, k, v, last_rows=True)
    kv_len = k.shape[2]
    check_block_mask(block_mask, q, kv_len)
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = num_blocks(kv_len)
    first, nq = query_blocks(s, kv_len)
    scale = softmax_scale(sm_scale, d)
    device = q.device

    # Row r of the mask is block first + r of the key grid.
    causal = torch.ones(nq, nb, dtype=torch.bool, device=device).tril(first)
    diagonal = causal & ~torch.ones(nq, nb, dtype=torch.bool, device=device).tril(first - 1)
    kept = (block_mask & causal) | diagonal
    counts = kept.sum(-1)
    # Kept columns first, in ascending order; the tail of each row is padding.
    indices = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices
    # Padding slots get a key position past every query, so the causal test drops them too.
    slot = torch.arange(nb, device=device)
    no_key = nb * BLOCK
    token = torch.arange(BLOCK, device=device)

    # Queries laid on the key grid: q row 0 is position kv_len - s, inside block `first`.
    q_blocks = _pad_to_blocks(q, nq, kv_len - s - first * BLOCK)
    k_blocks = _pad_to_blocks(k, nb)
    v_blocks = _pad_to_blocks(v, nb)
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    kv_head_index = (torch.arange(hq, device=device) // (hq // hkv))[None, :, None, None]

    out = q.new_empty(b, hq, nq, BLOCK, d)
    for rows, width in _chunks_of_rows(counts.amax(dim=(0, 1)).tolist(), b * hq * BLOCK * BLOCK):
        r = rows.stop - rows.start
        idx = indices[:, :, rows, :width]
        # [b, Hq, R, w·BLOCK, d]
        k_kept = k_blocks[batch_index, kv_head_index, idx].view(b, hq, r, width * BLOCK, d)
        v_kept = v_blocks[batch_index, kv_head_index, idx].view(b, hq, r, width * BLOCK, d)
        used = slot[:width] < counts[:, :, rows, None]
        key_pos = torch.where(used[..., None], idx[..., None] * BLOCK + token, no_key)
        query_pos = torch.arange(
            (first + rows.start) * BLOCK, (first + rows.stop) * BLOCK, device=device
        )
        # [b, Hq, R, BLOCK, w·BLOCK]
        allowed = key_pos.view(b, hq, r, 1, -1) <= query_pos.view(r, BLOCK, 1)
        scores = (q_blocks[:, :, rows] @ k_kept.transpose(-1, -2)).to(_softmax_dtype(q.dtype))
        probs = torch.softmax((scores * scale).masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, :, rows] = probs.to(v.dtype) @ v_kept
    start = kv_len - s - first * BLOCK
    return out.view(b, hq, nq * BLOCK, d)[:, :, start : start + s]


def pooled_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`pooled_attention`: (out [b, Hq, s, d], gt [b, Hq, nb, nb] float32)."""
    check_attention_inputs(q, k, v)
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = num_blocks(s)
    scale = softmax_scale(sm_scale, d)
    device = q.device

    # Query heads of one GQA group share a key/value head: fold them into the row axis.
    q_grouped = _pad_to_blocks(q, nb).view(b, hkv, group, nb, BLOCK, d)
    k_padded = _pad_to_blocks(k, nb).view(b, hkv, nb * BLOCK, d)
    v_padded = _pad_to_blocks(v, nb).view(b, hkv, nb * BLOCK, d)
    key_pos = torch.arange(nb * BLOCK, device=device)

    out = q.new_empty(b, hkv, group, nb, BLOCK, d)
    peak = torch.zeros(b, hkv, group, nb, nb, dtype=_softmax_dtype(q.dtype), device=device)
    step = _rows_per_chunk(b * hq * BLOCK * nb * BLOCK)
    for start in range(0, nb, step):
        rows = slice(start, min(start + step, nb))
        r = rows.stop - rows.start
        query_pos = torch.arange(rows.start * BLOCK, rows.stop * BLOCK, device=device)
        q_rows = q_grouped[:, :, :, rows].reshape(b, hkv, group * r * BLOCK, d)
        # [b, Hkv, group, R·BLOCK, nb·BLOCK]
        scores = (
            (q_rows @ k_padded.transpose(-1, -2))
            .to(_softmax_dtype(q.dtype))
            .view(b, hkv, group, r * BLOCK, -1)
        )
        allowed = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < s)
        probs = torch.softmax((scores * scale).masked_fill(~allowed, float("-inf")), dim=-1)
        rows_out = probs.to(v.dtype).view(b, hkv, group * r * BLOCK, -1) @ v_padded
        out[:, :, :, rows] = rows_out.view(b, hkv, group, r, BLOCK, d)
        # Padded query rows of the last block must not count towards any tile's peak.
        probs = probs * (query_pos < s)[:, None]
        tiles = probs.view(b, hkv, group, r, BLOCK, nb, BLOCK)
        peak[:, :, :, rows] = tiles.amax(dim=(4, 6))
    out = out.view(b, hq, nb * BLOCK, d)[:, :, :s]
    peak = peak.view(b, hq, nb, nb)
    return out, (peak / peak.sum(-1, keepdim=True)).to(torch.float32)


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """:func:`rotary_embedding` as transformers computes it: x [b, H, s, d], cos/sin [b, s, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_gate_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_gate_` without writing into ``gate``."""
    return torch.nn.functional.silu(gate) * up
