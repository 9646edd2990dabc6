"""Shared fixtures: which device the Triton kernels can run on here."""

import os
from pathlib import Path

import pytest
import torch
from seer_kernels import interpreting

# Tests start `python -c` subprocesses from the checkout's root; without this, that folder comes
# first on their sys.path and its kernels/ shadows the kernels package transformers imports.
os.environ.setdefault("PYTHONSAFEPATH", "1")

# A public-domain novel's opening chapters (tests/data/README.md names the source).
BOOK = Path(__file__).resolve().parent / "data" / "a-room-with-a-view.txt"


def long_book(copies: int = 4) -> str:
    """The fixture repeated: about 30,000 tokens a copy, longer than any tested context."""
    return "\n\n".join([BOOK.read_text(encoding="utf-8")] * copies)


def kernel_device() -> str | None:
    """'cuda' on a GPU, 'cpu' under TRITON_INTERPRET=1, else None (kernel tests skip)."""
    if torch.cuda.is_available():
        return "cuda"
    if interpreting():
        return "cpu"
    return None


KERNEL_DEVICE = kernel_device()
# Low-precision dtypes the kernels are tested in: bf16 is only accurate on a real GPU.
KERNEL_DTYPES = (
    [torch.float16, torch.bfloat16] if KERNEL_DEVICE == "cuda" else [torch.float32, torch.float16]
)

needs_kernel_device = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch):
    """Tests must not read the developer's own ~/.config/seer/config.toml."""
    monkeypatch.setenv("SEER_CONFIG", os.devnull)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty_like return NaNs, so any output element a kernel fails to write shows."""
    real_full_like = torch.full_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: real_full_like(x, float("nan"), **kw))
