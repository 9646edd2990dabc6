"""glibc's thresholds for large blocks, raised for CPU runs (seer_cli/engine/host_allocator.py)."""

import platform

import pytest
from tiny_models import save_tiny_model

from seer_cli.engine import host_allocator
from seer_cli.engine.runtime import Engine, EngineOptions


class FakeLibc:
    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(host_allocator.sys, "platform", "linux")
    monkeypatch.setattr(host_allocator.ctypes, "CDLL", lambda name: fake)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_both_thresholds_are_raised_to_a_gibibyte(libc):
    assert host_allocator.keep_large_blocks_in_heap()
    assert libc.calls == [(-3, 1 << 30), (-1, 1 << 30)]


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_the_users_own_setting_stands(libc, monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert not host_allocator.keep_large_blocks_in_heap()
    assert libc.calls == []


def test_a_refused_setting_or_another_libc_is_no_error(libc, monkeypatch):
    libc.answer = 0
    assert not host_allocator.keep_large_blocks_in_heap()

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(host_allocator.ctypes, "CDLL", no_libc)
    assert not host_allocator.keep_large_blocks_in_heap()
    monkeypatch.setattr(host_allocator.sys, "platform", "darwin")
    assert not host_allocator.keep_large_blocks_in_heap()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_glibc_takes_the_thresholds(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert host_allocator.keep_large_blocks_in_heap()


def test_a_cpu_run_raises_them_while_loading_the_model(libc, tmp_path):
    folder = save_tiny_model("llama", tmp_path / "tiny-llama")
    Engine.load(EngineOptions(model=str(folder), device="cpu"))
    assert libc.calls == [(-3, 1 << 30), (-1, 1 << 30)]
