"""Kernel configurations are tuned once per GPU and key, then read back in every process."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import needs_gpu, needs_kernel_device
from seer_kernels import tuning


class FakeKernel:
    """Records launches the way ``kernel[grid](*args, **kwargs)`` makes them."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class FakeAutotuner(FakeKernel):
    arg_names = ["Q", "seq_len", "seq_bucket"]
    keys = ["seq_bucket", "HEAD_DIM"]
    base_fn = SimpleNamespace(__name__="_fake_fwd")
    best_config = SimpleNamespace(num_warps=8, num_stages=3, kwargs={})


@pytest.fixture
def fresh_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "gpu_slug", lambda device: "test-gpu")
    monkeypatch.setattr(tuning, "_tables", {})
    return tmp_path / "tuning" / "test-gpu.json"


def test_the_key_is_the_autotuners_own():
    args = (torch.zeros(2, dtype=torch.float16), 1000, 1024)
    key = tuning.tuning_key(FakeAutotuner(), args, {"HEAD_DIM": 64})
    assert key == "_fake_fwd:1024,64,torch.float16"


def test_first_launch_tunes_and_records_later_ones_read_the_record(fresh_tables):
    notices = []
    tuning.set_tuning_notifier(notices.append)
    try:
        kernel, autotuner = FakeKernel(), FakeAutotuner()
        args, constexprs = (torch.zeros(1), 100, 128), {"HEAD_DIM": 64}
        tuning.launch_tuned(kernel, autotuner, (1,), "cuda", args, constexprs)
        assert len(autotuner.launches) == 1 and kernel.launches == [] and len(notices) == 1
        recorded = json.loads(fresh_tables.read_text())
        assert list(recorded.values()) == [{"num_warps": 8, "num_stages": 3}]

        tuning._tables.clear()  # a new process: only the file remains
        tuning.launch_tuned(kernel, autotuner, (1,), "cuda", args, constexprs)
        assert len(autotuner.launches) == 1 and len(notices) == 1
        assert kernel.launches[0][2] == {"HEAD_DIM": 64, "num_warps": 8, "num_stages": 3}
    finally:
        tuning.set_tuning_notifier(None)


def test_a_corrupt_cache_file_means_tuning_again(fresh_tables):
    fresh_tables.parent.mkdir(parents=True)
    fresh_tables.write_text("{not json")
    autotuner = FakeAutotuner()
    tuning.launch_tuned(FakeKernel(), autotuner, (1,), "cuda", (torch.zeros(1), 1, 1), {})
    assert len(autotuner.launches) == 1
    assert len(json.loads(fresh_tables.read_text())) == 1


def test_shipped_entries_win_over_the_cache(fresh_tables, monkeypatch):
    table = tuning.TuningTable("test-gpu")
    table.shipped = {"k": {"num_warps": 4, "num_stages": 2}}
    table.record("k", {"num_warps": 8, "num_stages": 4})
    assert table.get("k") == {"num_warps": 4, "num_stages": 2}


def test_retuning_ignores_the_shipped_tables(fresh_tables, monkeypatch):
    monkeypatch.setattr(tuning, "_shipped_tables_used", True)  # restored afterwards
    assert tuning.TuningTable("nvidia-h100-80gb-hbm3").shipped
    tuning.ignore_shipped_tables()
    assert tuning.TuningTable("nvidia-h100-80gb-hbm3").shipped == {}


@needs_kernel_device
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_shipped_table_has_the_block_sparse_launchs_keys(monkeypatch, head_dim):
    """The key names the kernel's tensors' dtypes: a new tensor argument changes it, and the
    shipped entries must follow, or the first run after install tunes again."""
    from importlib.resources import files

    import seer_kernels.block_sparse as block_sparse

    keys = []

    def record(kernel, tuned_kernel, grid, device, *args, **constexprs):
        keys.append(tuning.tuning_key(tuned_kernel, args, constexprs))

    monkeypatch.setattr(block_sparse, "launch", record)
    q = torch.zeros(1, 4, 32768, head_dim, dtype=torch.float16)
    k = v = torch.zeros(1, 2, 32768, head_dim, dtype=torch.float16)
    counts = torch.zeros(1, 4, 512, dtype=torch.int32)
    indices = torch.zeros(1, 4, 512, 1, dtype=torch.int32)
    monkeypatch.setattr(block_sparse, "LAST_ROW_SPLIT_ENTRIES", 10**6)  # no merge to run
    block_sparse.block_sparse_attention_from_lists(q, k, v, indices, counts)
    table = files("seer_kernels") / "tuned" / "nvidia-h100-80gb-hbm3.json"
    shipped = json.loads(table.read_text())
    assert keys and keys[0] in shipped


@needs_gpu
def test_shipped_tables_hold_valid_configs():
    from importlib.resources import files

    for item in (files("seer_kernels") / "tuned").iterdir():
        for key, config in json.loads(item.read_text()).items():
            assert config["num_warps"] in (2, 4, 8, 16) and config["num_stages"] >= 1, key


def test_triton_warmup_computes_tritons_key():
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    tuning.warm_up_triton()
    assert triton_key.cache_info().currsize == 1


def test_triton_warmup_hashes_every_kernel_ahead_of_its_first_launch():
    """Compiled kernels only (the interpreter's have no cache key): in a process without it."""
    import subprocess
    import sys

    check = (
        "from triton.runtime.jit import JITFunction\n"
        "from seer_kernels import block_sparse, gate_select, layer_ops, tuning\n"
        "kernels = [block_sparse._block_sparse_fwd, gate_select._select_lists,\n"
        "           layer_ops._silu_gate, layer_ops._rotary]\n"
        "assert all(isinstance(k, JITFunction) and k.hash is None for k in kernels)\n"
        "tuning.warm_up_triton()\n"
        "assert all(len(k.hash) == 64 for k in kernels), [k.hash for k in kernels]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_gpu_warmup_fails_silently(monkeypatch):
    """A failure in the warm-up thread (no GPU here) prints nothing: the prefill meets the same
    problem and reports it in one sentence."""
    import threading

    from seer_cli.engine.gpu_warmup import start_gpu_warmup

    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    start_gpu_warmup(torch.device("cuda"), torch.bfloat16).join(timeout=60)
    assert failures == []


def test_host_cdiv_and_power_of_two_are_tritons():
    """The host-side helpers give Triton's answers (the launch table keys lengths by them)."""
    import triton
    from seer_kernels._common import cdiv, next_power_of_2, seq_bucket

    for n in [*range(1, 300), 4095, 4096, 4097, 131072, 131073, 10**9]:
        assert next_power_of_2(n) == triton.next_power_of_2(n) == seq_bucket(n)
        for d in (1, 7, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d)
