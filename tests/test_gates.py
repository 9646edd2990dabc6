"""Gate module, block RoPE, mask policies, pooled estimator and gate files."""

import dataclasses
import itertools
import json
import math
import os

import pytest
import torch
from seer_gates import (
    AttnGate,
    GateConfig,
    GateFileError,
    GateMismatchError,
    MaskPolicy,
    achieved_sparsity,
    apply_rotary,
    block_count,
    block_rope_tables,
    build_gates,
    check_fits,
    default_rotary,
    kept_causal_blocks,
    load_gates,
    pool_keys,
    pool_queries,
    pooled_qk_scores,
    save_gates,
    select_block_lists,
    select_blocks,
)

B = 64


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def block_slices(s, block_size=B):
    return [slice(lo, min(lo + block_size, s)) for lo in range(0, s, block_size)]


def causal(nb):
    return torch.ones(nb, nb, dtype=torch.bool).tril()


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("s", [1, 63, 64, 65, 200], ids=lambda s: f"s{s}")
def test_pool_queries_matches_loop(s):
    q = randn(2, s, 3, 16, seed=s)
    expected = torch.stack([q[:, sl].mean(dim=1) for sl in block_slices(s)], dim=1)
    out = pool_queries(q)
    assert out.shape == (2, block_count(s), 3, 16)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("s", [1, 63, 64, 65, 200], ids=lambda s: f"s{s}")
def test_pool_keys_matches_loop(s):
    k = randn(2, s, 2, 16, seed=s + 1)
    expected = torch.stack(
        [
            torch.cat([k[:, sl].amax(dim=1), k[:, sl].amin(dim=1), k[:, sl].mean(dim=1)], dim=-1)
            for sl in block_slices(s)
        ],
        dim=1,
    )
    out = pool_keys(k)
    assert out.shape == (2, block_count(s), 2, 48)
    torch.testing.assert_close(out, expected)


def test_pooling_accumulates_in_float32():
    q = randn(1, 100, 2, 8, seed=3).to(torch.bfloat16)
    assert pool_queries(q).dtype == torch.float32
    assert pool_keys(q).dtype == torch.float32
    torch.testing.assert_close(pool_queries(q), pool_queries(q.float()))


def test_block_count():
    assert [block_count(s) for s in (1, 63, 64, 65, 128, 129)] == [1, 1, 1, 2, 2, 3]
    assert block_count(10, block_size=4) == 3


# ---------------------------------------------------------------- RoPE


def test_apply_rotary_zero_angle_is_identity():
    x = randn(2, 5, 3, 32, seed=4)
    ones, zeros = torch.ones(2, 5, 32), torch.zeros(2, 5, 32)
    torch.testing.assert_close(apply_rotary(x, ones, zeros), x)


def test_apply_rotary_is_rotate_half():
    h = 8
    x = randn(1, 3, 2, h, seed=5)
    cos, sin = default_rotary(h)(torch.tensor([[0, 64, 128]]))
    out = apply_rotary(x, cos, sin)
    c, s = cos[:, :, None, : h // 2], sin[:, :, None, : h // 2]
    first, second = x[..., : h // 2], x[..., h // 2 :]
    torch.testing.assert_close(out[..., : h // 2], first * c - second * s)
    torch.testing.assert_close(out[..., h // 2 :], second * c + first * s)


def test_rotary_dot_depends_only_on_offset():
    h = 64
    rotary = default_rotary(h, theta=500000.0)
    q, k = randn(1, 1, 1, h, seed=6, dtype=torch.float64), randn(1, 1, 1, h, seed=7).double()

    def dot(m, n):
        cm, sm = rotary(torch.tensor([[m]]))
        cn, sn = rotary(torch.tensor([[n]]))
        return (
            apply_rotary(q, cm.double(), sm.double()) * apply_rotary(k, cn.double(), sn.double())
        ).sum()

    for offset in (0, 64, 320):
        values = torch.stack([dot(n + offset, n) for n in (0, 128, 1024)])
        torch.testing.assert_close(values, values[:1].expand(3), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(dot(64, 0), dot(128, 0))


def test_block_rope_tables_use_block_starts():
    seen = {}

    def rotary(positions):
        seen["positions"] = positions
        return positions.float().unsqueeze(-1), positions.float().unsqueeze(-1)

    cos, _ = block_rope_tables(rotary, num_blocks=4, block_size=64, batch=2, device="cpu")
    assert seen["positions"].dtype == torch.long
    assert seen["positions"].tolist() == [[0, 64, 128, 192]] * 2
    assert cos.shape == (2, 4, 1)


# ---------------------------------------------------------------- gate


def reference_logits(gate, q_pooled, k_pooled, cos, sin):
    """Per-head loop: project, rotate, dot, block-causal mask."""
    group = gate.num_q_heads // gate.num_kv_heads
    nb, h = q_pooled.shape[1], gate.hidden_size
    heads = []
    for head in range(gate.num_q_heads):
        kv = head // group
        if gate.mask_linear_q is None:
            q = q_pooled[:, :, head]
            k = k_pooled[:, :, kv] @ gate.mask_linear_k.weight[head]
        else:
            q = q_pooled[:, :, head] @ gate.mask_linear_q.weight[head]
            k = k_pooled[:, :, kv] @ gate.mask_linear_k.weight[kv]
        q = apply_rotary(q[:, :, None], cos, sin)[:, :, 0]
        k = apply_rotary(k[:, :, None], cos, sin)[:, :, 0]
        heads.append(q @ k.transpose(-1, -2) / math.sqrt(h))
    logits = torch.stack(heads, dim=1)
    return logits.masked_fill(~causal(nb), -math.inf)


GATE_SHAPES = [(4, 4, 64, 64), (9, 3, 64, 64), (8, 2, 32, 32), (4, 4, 64, 128), (9, 3, 64, 128)]


@pytest.mark.parametrize(
    "hq,hkv,d,h", GATE_SHAPES, ids=[f"hq{a}-hkv{b}-d{c}-h{e}" for a, b, c, e in GATE_SHAPES]
)
def test_gate_shapes_and_logits(hq, hkv, d, h):
    torch.manual_seed(0)
    gate = AttnGate(hq, hkv, d, hidden_size=h)
    state = gate.state_dict()
    if h == d:
        assert gate.mask_linear_q is None
        assert set(state) == {"mask_linear_k.weight"}
        assert state["mask_linear_k.weight"].shape == (hq, 3 * d, h)
    else:
        assert set(state) == {"mask_linear_q.weight", "mask_linear_k.weight"}
        assert state["mask_linear_q.weight"].shape == (hq, d, h)
        assert state["mask_linear_k.weight"].shape == (hkv, 3 * d, h)

    s = 300
    nb = block_count(s)
    q, k = randn(2, s, hq, d, seed=1), randn(2, s, hkv, d, seed=2)
    cos, sin = block_rope_tables(default_rotary(h), nb, B, 2, "cpu")
    logits = gate.logits(pool_queries(q), pool_keys(k), cos, sin)
    assert logits.shape == (2, hq, nb, nb) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., ~causal(nb)]).all()
    assert torch.isfinite(logits[..., causal(nb)]).all()
    expected = reference_logits(gate, pool_queries(q), pool_keys(k), cos, sin)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)

    scores = gate(q, k, cos, sin)
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(2, hq, nb))
    assert (scores[..., ~causal(nb)] == 0).all()


def test_gate_force_double_keeps_query_linear():
    gate = AttnGate(4, 2, 64, hidden_size=64, force_double=True)
    assert gate.mask_linear_q.weight.shape == (4, 64, 64)
    assert gate.mask_linear_k.weight.shape == (2, 192, 64)


def test_gate_computes_in_float32_for_half_inputs():
    torch.manual_seed(0)
    gate = AttnGate(4, 2, 32, hidden_size=64)
    q, k = randn(1, 130, 4, 32, seed=8), randn(1, 130, 2, 32, seed=9)
    cos, sin = block_rope_tables(default_rotary(64), 3, B, 1, "cpu")
    low = gate(q.to(torch.bfloat16), k.to(torch.bfloat16), cos, sin)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, gate(q, k, cos, sin), rtol=0.05, atol=0.02)


def test_gate_rejects_uneven_gqa():
    with pytest.raises(ValueError, match="cannot share"):
        AttnGate(9, 2, 64)


# ---------------------------------------------------------------- policy


def expected_row_counts(nb, sparsity, keep_sink, dense_last_row):
    total = nb * (nb + 1) // 2
    density = 1 - sparsity
    if dense_last_row and nb > 1:
        density = min(max((density * total - nb) / (total - nb), 0.0), 1.0)
    counts = []
    for i in range(nb):
        if dense_last_row and i == nb - 1:
            counts.append(nb)
        else:
            forced = 1 + (keep_sink and i > 0)
            counts.append(max(forced, math.ceil(density * (i + 1))))
    return counts


@pytest.mark.parametrize("keep_sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("dense_last_row", [True, False], ids=["lastdense", "lastsparse"])
def test_sparsity_row_counts_and_choice(keep_sink, dense_last_row):
    nb = 10
    scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(11))
    policy = MaskPolicy(sparsity=0.5, keep_sink=keep_sink, dense_last_row=dense_last_row)
    mask = select_blocks(scores, policy)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    expected = expected_row_counts(nb, 0.5, keep_sink, dense_last_row)
    assert (mask.sum(dim=-1) == torch.tensor(expected)).all()
    assert not mask[..., ~causal(nb)].any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert mask[..., 1:, 0].all() == keep_sink
    assert mask[..., -1, :].all() == dense_last_row

    forced = torch.eye(nb, dtype=torch.bool)
    forced[:, 0] |= keep_sink
    free = causal(nb) & ~forced
    rows = nb - 1 if dense_last_row else nb
    for b, h, row in itertools.product(range(2), range(3), range(rows)):
        kept = scores[b, h, row][mask[b, h, row] & free[row]]
        dropped = scores[b, h, row][~mask[b, h, row] & free[row]]
        if len(kept) and len(dropped):
            assert kept.min() > dropped.max()


def test_sparsity_ignores_forced_scores_when_ranking():
    # The diagonal scores lowest everywhere, yet stays; the budget of 1 is all it gets.
    nb = 10
    scores = torch.rand(1, 1, nb, nb, generator=torch.Generator().manual_seed(12)) + 1
    scores.diagonal(dim1=-2, dim2=-1).zero_()
    policy = MaskPolicy(sparsity=0.95, keep_sink=False, dense_last_row=False)
    assert torch.equal(select_blocks(scores, policy)[0, 0], torch.eye(nb, dtype=torch.bool))


def test_sparsity_zero_keeps_every_causal_block():
    scores = torch.rand(2, 2, 7, 7, generator=torch.Generator().manual_seed(13))
    for keep_sink in (True, False):
        for dense_last_row in (True, False):
            policy = MaskPolicy(sparsity=0.0, keep_sink=keep_sink, dense_last_row=dense_last_row)
            assert torch.equal(select_blocks(scores, policy), causal(7).expand(2, 2, 7, 7))


def test_single_block_is_kept():
    scores = torch.rand(1, 2, 1, 1, generator=torch.Generator().manual_seed(14))
    for dense_last_row in (True, False):
        mask = select_blocks(scores, MaskPolicy(sparsity=0.9, dense_last_row=dense_last_row))
        assert mask.all()


def test_a_local_window_keeps_the_blocks_before_the_diagonal_inside_the_budget():
    # Scores favour the oldest blocks, so only forcing keeps the two before each diagonal.
    nb = 6
    scores = -torch.arange(nb, dtype=torch.float32).expand(1, 1, nb, nb)
    window = MaskPolicy(sparsity=0.9, local_blocks=2, dense_last_row=False)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 1, 1, 1, 0],
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(select_blocks(scores, window)[0, 0], expected)
    # Budgets 1, 2, 3, 4, 4, 5 (ceil(0.8 (i + 1))): row 5 has room for one block the forced ones
    # leave, its best-scoring.
    roomier = MaskPolicy(sparsity=0.2, local_blocks=2, dense_last_row=False)
    expected[5, 1] = True
    assert torch.equal(select_blocks(scores, roomier)[0, 0], expected)
    threshold = MaskPolicy(threshold=1e9, keep_sink=False, local_blocks=2, dense_last_row=False)
    assert torch.equal(select_blocks(scores, threshold)[0, 0], causal(nb) & ~causal(nb).tril(-3))


def test_threshold_keeps_scores_above_its_multiple_of_the_row_average_plus_forced():
    nb = 12
    scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(15)) * 0.2
    row_average = 1 / torch.arange(1, nb + 1).view(nb, 1)  # row i has i + 1 causal blocks
    for keep_sink in (True, False):
        for dense_last_row in (True, False):
            policy = MaskPolicy(threshold=1.5, keep_sink=keep_sink, dense_last_row=dense_last_row)
            expected = (scores > 1.5 * row_average) & causal(nb) | torch.eye(nb, dtype=torch.bool)
            if keep_sink:
                expected[..., 0] = True
            if dense_last_row:
                expected[..., -1, :] = True
            assert torch.equal(select_blocks(scores, policy), expected)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95], ids=lambda s: f"s{s}")
def test_achieved_sparsity_tracks_request(sparsity):
    scores = torch.rand(1, 4, 128, 128, generator=torch.Generator().manual_seed(16))
    mask = select_blocks(scores, MaskPolicy(sparsity=sparsity))
    assert abs(achieved_sparsity(mask) - sparsity) < 0.02


def test_kept_causal_blocks_counts_over_everything():
    nb = 5
    mask = torch.ones(2, 3, nb, nb, dtype=torch.bool)
    assert kept_causal_blocks(mask) == (6 * 15, 6 * 15)
    assert achieved_sparsity(mask) == 0.0
    diagonal = torch.eye(nb, dtype=torch.bool).expand(2, 3, nb, nb)
    assert kept_causal_blocks(diagonal) == (6 * 5, 6 * 15)
    assert achieved_sparsity(diagonal) == pytest.approx(1 - 5 / 15)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"sparsity": 0.5, "threshold": 0.01},
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"threshold": float("inf")},
        {"threshold": -1e-3},
        {"sparsity": float("nan")},
        {"threshold": float("nan")},
        {"sparsity": 0.5, "local_blocks": -1},
        {"sparsity": 0.5, "local_blocks": 2.0},
    ],
    ids=["neither", "both", "s1", "sneg", "tinf", "tneg", "snan", "tnan", "localneg", "localfloat"],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        MaskPolicy(**kwargs)


def block_softmax(b: int, h: int, rows: int, nb: int, seed: int) -> torch.Tensor:
    """Random block scores as gates give them: each row's softmax over its causal blocks."""
    logits = 3 * torch.randn(b, h, rows, nb, generator=torch.Generator().manual_seed(seed))
    return logits.masked_fill(~causal(nb)[nb - rows :], -math.inf).softmax(-1)


@pytest.mark.parametrize(
    ("rows", "total", "policy"),
    [
        (16, None, MaskPolicy(sparsity=0.4, budget="layer")),
        (
            16,
            None,
            MaskPolicy(
                sparsity=0.6, local_blocks=2, dense_last_row=False, budget="layer", rank_power=2.0
            ),
        ),  # fmt: skip
        (5, 20, MaskPolicy(sparsity=0.5, keep_sink=False, budget="layer")),  # a chunk's rows
    ],
    ids=["whole", "window", "chunk"],
)
def test_a_layer_budget_spends_the_rows_budgets_on_the_highest_ranks(rows, total, policy):
    """As many blocks per sequence as row budgets keep; the forced ones; and beyond them the
    highest ranks, score · (i + 1)^rank_power, over all heads and rows (a loop oracle)."""
    nb = 16
    scores = block_softmax(2, 3, rows, nb, seed=21)
    mask = select_blocks(scores, policy, total)
    row_mask = select_blocks(scores, dataclasses.replace(policy, budget="row"), total)
    assert torch.equal(mask.sum(dim=(1, 2, 3)), row_mask.sum(dim=(1, 2, 3)))
    only_forced = dataclasses.replace(policy, sparsity=0.99, budget="row")
    forced = select_blocks(torch.zeros_like(scores), only_forced, total)
    assert bool((mask >= forced).all()) and not mask[..., ~causal(nb)[nb - rows :]].any()
    assert not torch.equal(mask, row_mask)
    for b in range(2):
        kept, dropped = [], []
        for h, r, j in itertools.product(range(3), range(rows), range(nb)):
            if j > nb - rows + r or forced[b, h, r, j]:
                continue
            relative = float(scores[b, h, r, j]) * (nb - rows + r + 1) ** policy.rank_power
            (kept if mask[b, h, r, j] else dropped).append(relative)
        assert kept and dropped and min(kept) >= max(dropped)


def test_a_layer_budget_needs_a_sparsity_and_block_lists_need_row_budgets():
    with pytest.raises(ValueError, match="threshold has no budget"):
        MaskPolicy(threshold=1.0, budget="layer")
    with pytest.raises(ValueError, match="rank_power must be finite"):
        MaskPolicy(sparsity=0.5, budget="layer", rank_power=-1.0)
    with pytest.raises(ValueError, match="budget must be one of row, layer"):
        MaskPolicy(sparsity=0.5, budget="head")
    with pytest.raises(ValueError, match="row budgets"):
        layer = MaskPolicy(sparsity=0.5, budget="layer")
        select_block_lists(block_softmax(1, 1, 4, 4, seed=0), layer)


def test_select_blocks_rejects_more_rows_than_key_blocks():
    with pytest.raises(ValueError, match="rows being the last key blocks"):
        select_blocks(torch.rand(1, 1, 4, 3), MaskPolicy(sparsity=0.5))


# ---------------------------------------------------------------- pooled estimator


@pytest.mark.parametrize("hq,hkv,s", [(4, 4, 65), (6, 2, 200), (8, 2, 1)], ids=str)
def test_pooled_qk_scores_matches_loop(hq, hkv, s):
    d = 16
    q, k = randn(2, hq, s, d, seed=20), randn(2, hkv, s, d, seed=21)
    slices = block_slices(s)
    nb = len(slices)
    expected = torch.empty(2, hq, nb, nb)
    for head in range(hq):
        kv = head // (hq // hkv)
        q_means = torch.stack([q[:, head, sl].mean(dim=1) for sl in slices], dim=1)
        k_means = torch.stack([k[:, kv, sl].mean(dim=1) for sl in slices], dim=1)
        logits = q_means @ k_means.transpose(-1, -2) / math.sqrt(d)
        expected[:, head] = logits.masked_fill(~causal(nb), -math.inf).softmax(dim=-1)
    out = pooled_qk_scores(q, k)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- files


def make_config(**overrides):
    settings = dict(
        base_model="org/model",
        num_layers=2,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=64,
        hidden_size=128,
        metadata={"steps": 10, "data": ["a.txt"]},
    )
    return GateConfig(**(settings | overrides))


@pytest.mark.parametrize("hidden", [128, 64], ids=["h128", "h64"])
def test_save_load_round_trip(tmp_path, hidden):
    torch.manual_seed(0)
    config = make_config(hidden_size=hidden)
    gates = build_gates(config)
    path = tmp_path / "gates.safetensors"
    save_gates(path, gates, config)
    loaded_config, loaded = load_gates(path)
    assert loaded_config == config
    assert os.listdir(tmp_path) == ["gates.safetensors"]
    for ours, theirs in zip(gates, loaded, strict=True):
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[key])
        assert theirs.mask_linear_k.weight.requires_grad


def test_gate_config_json_round_trip_and_errors():
    config = make_config(force_double=True)
    assert GateConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        GateConfig.from_json(json.dumps(json.loads(config.to_json()) | {"extra": 1}))
    with pytest.raises(ValueError, match="lacks"):
        GateConfig.from_json('{"base_model": "m"}')
    with pytest.raises(ValueError, match="not supported"):
        make_config(gate_type="Qavg_Kmaxmin")
    with pytest.raises(ValueError, match="positive integer"):
        make_config(num_layers=0)


def test_save_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    config = make_config()
    path = tmp_path / "gates.safetensors"
    save_gates(path, build_gates(config), config)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_gates(path, build_gates(config), config)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["gates.safetensors"]


def test_save_rejects_gates_that_do_not_match_config(tmp_path):
    with pytest.raises(GateMismatchError, match="lacks"):
        save_gates(
            tmp_path / "g.safetensors", build_gates(make_config()), make_config(num_layers=3)
        )
    assert not list(tmp_path.iterdir())


def test_check_fits_messages():
    config = make_config(base_model="", num_layers=32, num_q_heads=32, num_kv_heads=8)
    check_fits(config, num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=64)
    with pytest.raises(GateMismatchError) as error:
        check_fits(config, num_layers=30, num_q_heads=32, num_kv_heads=4, head_dim=64)
    assert str(error.value) == (
        "gates are for 32 layers with 8 KV heads, the model has 30 layers with 4 KV heads."
    )
    named = make_config(num_layers=32, num_q_heads=32, num_kv_heads=8)
    with pytest.raises(GateMismatchError) as error:
        check_fits(
            named, num_layers=32, num_q_heads=9, num_kv_heads=3, head_dim=64, model_name="SmolLM2"
        )
    assert str(error.value) == (
        "gates for org/model are for 32 Q heads with 8 KV heads, "
        "the model SmolLM2 has 9 Q heads with 3 KV heads."
    )


def test_load_errors(tmp_path):
    with pytest.raises(GateFileError, match="does not exist"):
        load_gates(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(GateFileError, match="garbage.safetensors"):
        load_gates(garbage)

    config = make_config()
    good = tmp_path / "good.safetensors"
    save_gates(good, build_gates(config), config)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GateFileError, match="truncated.safetensors"):
        load_gates(truncated)

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": randn(2, 2)}, plain)
    with pytest.raises(GateFileError, match="not a seer gate file"):
        load_gates(plain)

    wrong_shape = tmp_path / "wrong.safetensors"
    tensors = {"model.layers.0.self_attn.attn_gate.mask_linear_k.weight": randn(2, 192, 64)}
    save_file(
        tensors,
        wrong_shape,
        metadata={"seer_gate_config": make_config(num_layers=1, hidden_size=64).to_json()},
    )
    implied = r"shape \[2, 192, 64\], the config implies \[4, 192, 64\]"
    with pytest.raises(GateFileError, match=implied):
        load_gates(wrong_shape)

    with pytest.raises(GateFileError, match="no config.json"):
        load_gates(tmp_path)


def test_a_gate_file_names_the_local_window_its_gates_run_with(tmp_path):
    path = tmp_path / "gates.safetensors"
    for metadata, window in [({"steps": 10}, 0), ({"steps": 10, "local_blocks": 8}, 8)]:
        config = make_config(metadata=metadata)
        save_gates(path, build_gates(config), config)
        assert load_gates(path)[0].local_blocks == window


@pytest.mark.parametrize("value", [-1, 2.5, True, "8"])
def test_a_bad_local_window_in_a_gate_file_is_refused(tmp_path, value):
    from safetensors.torch import load_file, save_file

    config = make_config()
    path = tmp_path / "bad.safetensors"
    save_gates(path, build_gates(config), config)
    settings = json.loads(config.to_json())
    settings["metadata"]["local_blocks"] = value
    save_file(load_file(path), path, metadata={"seer_gate_config": json.dumps(settings)})
    with pytest.raises(GateFileError) as error:
        load_gates(path)
    assert str(error.value) == (
        f"{path} has an unusable gate config: the metadata's local_blocks must be a whole "
        f"number, 0 or more, got {value!r}."
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("layer_rank_power", -1, "layer_rank_power must be a number in"),
        ("layer_rank_power", 16, "layer_rank_power must be a number in"),
        ("layer_rank_power", True, "layer_rank_power must be a number in"),
        ("layer_rank_power", "2", "layer_rank_power must be a number in"),
        ("budget", "head", "budget must be one of row, layer"),
    ],
)
def test_a_bad_layer_budget_setting_in_a_gate_file_is_refused(tmp_path, key, value, message):
    from safetensors.torch import load_file, save_file

    config = make_config(metadata={"layer_rank_power": 2.0})
    path = tmp_path / "bad.safetensors"
    save_gates(path, build_gates(config), config)
    assert load_gates(path)[0].layer_rank_power == 2.0
    settings = json.loads(config.to_json())
    settings["metadata"][key] = value
    save_file(load_file(path), path, metadata={"seer_gate_config": json.dumps(settings)})
    with pytest.raises(GateFileError, match=message):
        load_gates(path)


def write_published(folder, state, **config):
    folder.mkdir()
    hub = {
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "seerattn_gate_type": "Qavg_Kmaxminavg",
        "seerattn_gate_block_size": 64,
        "seerattn_gate_force_double": False,
        "seerattn_threshold": 5e-4,
    } | config
    (folder / "config.json").write_text(json.dumps(hub))
    torch.save(state, folder / "attn_gate_weights.pth")


def published_state(layers, q_shape, k_shape):
    state = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.self_attn.attn_gate."
        if q_shape:
            state[prefix + "mask_linear_q.weight"] = randn(*q_shape, seed=30 + layer)
        state[prefix + "mask_linear_k.weight"] = randn(*k_shape, seed=40 + layer)
    return state


PUBLISHED = {
    "h128": ((4, 64, 128), (2, 192, 128), {"seerattn_gate_hidden_size": 128}),
    "h64": (
        None,
        (4, 192, 64),
        {
            "seerattn_gate_hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 256,
        },
    ),
}


@pytest.mark.parametrize("variant", PUBLISHED)
def test_load_published_folder(tmp_path, variant):
    q_shape, k_shape, hub = PUBLISHED[variant]
    h = k_shape[2]
    state = published_state(2, q_shape, k_shape)
    folder = tmp_path / "SeerAttention-AttnGates"
    write_published(folder, state, **hub)

    config, gates = load_gates(folder)
    assert (config.num_layers, config.num_q_heads, config.num_kv_heads) == (2, 4, 2)
    assert (config.head_dim, config.hidden_size) == (64, h)
    assert config.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert config.metadata["seerattn_threshold"] == 5e-4
    assert config.local_blocks == 0
    assert load_gates(folder / "attn_gate_weights.pth")[0] == config

    q, k = randn(1, 150, 4, 64, seed=50), randn(1, 150, 2, 64, seed=51)
    cos, sin = block_rope_tables(default_rotary(h), 3, B, 1, "cpu")
    for layer, gate in enumerate(gates):
        direct = AttnGate(4, 2, 64, hidden_size=h)
        with torch.no_grad():
            prefix = f"model.layers.{layer}.self_attn.attn_gate."
            if q_shape:
                direct.mask_linear_q.weight.copy_(state[prefix + "mask_linear_q.weight"])
            direct.mask_linear_k.weight.copy_(state[prefix + "mask_linear_k.weight"])
        pooled = (pool_queries(q), pool_keys(k), cos, sin)
        torch.testing.assert_close(gate.logits(*pooled), direct.logits(*pooled))


def test_published_folder_errors(tmp_path):
    state = published_state(2, (4, 64, 128), (2, 192, 128))
    write_published(tmp_path / "type", state, seerattn_gate_type="Qavg_Kmaxmin")
    with pytest.raises(GateFileError, match="not supported"):
        load_gates(tmp_path / "type")

    write_published(tmp_path / "heads", state, num_attention_heads=32)
    with pytest.raises(GateFileError, match="num_attention_heads is 32, the weights imply 4"):
        load_gates(tmp_path / "heads")

    partial = dict(state)
    del partial["model.layers.1.self_attn.attn_gate.mask_linear_q.weight"]
    write_published(tmp_path / "partial", partial)
    with pytest.raises(GateFileError, match="lacks 1 gate tensors"):
        load_gates(tmp_path / "partial")

    write_published(tmp_path / "pickle", {"weights": [1, 2]})
    with pytest.raises(GateFileError, match="not a state dict of tensors"):
        load_gates(tmp_path / "pickle")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "attn_gate_weights.pth").write_bytes(b"not a zip file")
    with pytest.raises(GateFileError, match="not a loadable state dict"):
        load_gates(tmp_path / "broken")


def _mask_from_lists(indices, counts, nb):
    """Rebuild a block mask from per-row lists, adding the diagonal the kernel computes."""
    used = torch.arange(indices.shape[-1]) < counts[..., None]
    # Unused slots go to a spare last column, dropped afterwards.
    columns = torch.where(used, indices.long(), nb)
    mask = torch.zeros(*indices.shape[:-1], nb + 1, dtype=torch.bool)
    mask.scatter_(-1, columns, True)
    return mask[..., :nb] | torch.eye(nb, dtype=torch.bool)


@pytest.mark.parametrize("nb", [1, 2, 7, 33])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize(
    "keep_sink, dense_last_row, local_blocks",
    [(True, True, 0), (False, False, 0), (True, False, 0), (True, True, 3), (False, False, 8)],
)
def test_block_lists_keep_the_same_blocks_as_the_mask(
    nb, sparsity, keep_sink, dense_last_row, local_blocks
):
    policy = MaskPolicy(
        sparsity=sparsity, keep_sink=keep_sink, dense_last_row=dense_last_row,
        local_blocks=local_blocks,
    )  # fmt: skip
    scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(nb))
    indices, counts = select_block_lists(scores, policy)
    assert indices.dtype == counts.dtype == torch.int32
    assert torch.equal(_mask_from_lists(indices, counts, nb), select_blocks(scores, policy))


def test_block_lists_need_a_sparsity_policy():
    with pytest.raises(ValueError, match="sparsity policy"):
        select_block_lists(torch.rand(1, 1, 4, 4), MaskPolicy(threshold=0.1))
