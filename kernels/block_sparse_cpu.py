"""Block-sparse causal attention on the CPU: a small C++ kernel, built once per machine.

The source (``block_sparse_cpu.cpp``, beside this file) is compiled with the system's C++
compiler against the installed torch the first time it is needed, and the library is kept in
seer's cache folder under a name that hashes the source, the flags and the torch version: later
processes load it in milliseconds. While it compiles (tens of seconds), the notifier of
:mod:`.tuning` hears about it (the command line shows a transient line). Where it cannot be built
(no compiler, not Linux, a BLAS without ``sgemm_``), one warning says so and the plain-PyTorch
reference computes the same result, slower.

Measured against PyTorch's FlexAttention compiled by inductor on the same block lists (2-core
x86 CPU, float32, 9 query / 3 key-value heads, d 64, sparsity 0.9): 3.5× faster at 8k and 32k
tokens, and no compile of the model's shapes in each new process. bfloat16 inputs are multiplied
as bfloat16 (ATen's brgemm, float32 sums) where the CPU has the instructions for it (AMX,
AVX512-BF16), else in float32; other dtypes in float32.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ._common import BLOCK, check_attention_inputs, softmax_scale
from .block_sparse import check_block_lists
from .reference import block_sparse_attention_reference
from .tuning import notify, seer_cache_dir

_SOURCE = Path(__file__).with_name("block_sparse_cpu.cpp")
# What each of torch's CPU capabilities lets ATen's vector types use.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw",
               "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}  # fmt: skip


class CpuKernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here; the message says why."""


def block_sparse_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention_from_lists` on CPU tensors, computed in float32.

    q: [b, Hq, sq, d], the last sq positions of k/v: [b, Hkv, s, d] (any s, d; Hq a multiple
    of Hkv). indices: [b, Hq, nq, w] int32, counts: [b, Hq, nq] int32: query block row r (key
    block nb - nq + r) attends to key blocks ``indices[..., r, :counts[..., r]]``, each below
    it, in any order, plus its diagonal block. Returns [b, Hq, sq, d] in q's dtype, laid out
    token-major ([b, sq, Hq, d] transposed: the layout the model's output projection takes).
    """
    check_attention_inputs(q, k, v, last_rows=True)
    check_block_lists(q, k, indices, counts)
    if q.device.type != "cpu":
        raise ValueError(f"block_sparse_attention_cpu takes CPU tensors, got {q.device}.")
    scale = softmax_scale(sm_scale, q.shape[-1])
    kernel = cpu_kernel()
    if kernel is None:
        mask = block_mask_from_lists(indices, counts, k.shape[2])
        return block_sparse_attention_reference(q, k, v, mask, scale)
    q_in, k_in, v_in = (_kernel_input(x) for x in (q, k, v))
    out = kernel(q_in, k_in, v_in, indices.contiguous(), counts.contiguous(), scale)
    return out.to(q.dtype)


def block_mask_from_lists(indices: torch.Tensor, counts: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The [b, H, nq, nb] bool mask of per-row block lists (the inverse of
    :func:`kept_block_indices`; the diagonal is left to the kernels, which always compute it)."""
    *lead, nq, width = indices.shape
    nb = -(-kv_len // BLOCK)
    used = torch.arange(width, device=indices.device) < counts[..., None]
    # Unused slots point at a spare last column, cut off afterwards.
    columns = torch.where(used, indices.long(), nb)
    mask = torch.zeros(*lead, nq, nb + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, columns, True)[..., :nb]


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel takes it: bfloat16 as it is, other dtypes in float32; unit last stride."""
    x = x if x.dtype == torch.bfloat16 else x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def cpu_kernel():
    """The compiled kernel (an op taking q, k, v, indices, counts, scale), or None after one
    warning when it cannot be built here."""
    try:
        return load_cpu_kernel()
    except CpuKernelUnavailable as reason:
        warnings.warn(
            f"{reason}; sparse attention on the CPU falls back to the slower PyTorch reference.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def load_cpu_kernel(cache_dir: Path | None = None):
    """Load the kernel's library from ``cache_dir`` (default: seer's cache folder), building it
    there first if no process has yet. Raises :class:`CpuKernelUnavailable`."""
    if not sys.platform.startswith("linux"):
        raise CpuKernelUnavailable("the C++ CPU attention kernel is built on Linux only")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise CpuKernelUnavailable(
            f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the CPU attention kernel"
        )
    flags = _compile_flags()
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(
        b"\0".join([source, torch.__version__.encode(), compiler.encode(), *map(str.encode, flags)])
    ).hexdigest()[:16]
    library = (cache_dir or seer_cache_dir() / "kernels") / f"block_sparse_cpu-{digest}.so"
    if not library.is_file():
        notify("building the CPU attention kernel (once per machine)")
        _build(compiler, flags, library)
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:
        raise CpuKernelUnavailable(f"the CPU attention kernel does not load ({error})") from None
    return torch.ops.seer_cpu.block_sparse_attention


def _compile_flags() -> list[str]:
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    return [
        "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *isa, f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _build(compiler: str, flags: list[str], library: Path) -> None:
    """Compile into a private file, then move it in place: concurrent builds cannot clash."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            partial = Path(scratch) / library.name
            result = subprocess.run(
                [compiler, str(_SOURCE), "-o", str(partial), *flags],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                first_error = next(
                    (line for line in result.stderr.splitlines() if "error" in line),
                    result.stderr.strip()[-200:],
                )
                raise CpuKernelUnavailable(
                    f"the CPU attention kernel does not compile: {first_error}"
                )
            os.replace(partial, library)
    except OSError as error:
        raise CpuKernelUnavailable(f"cannot build the CPU attention kernel ({error})") from None


__all__ = ["block_mask_from_lists", "block_sparse_attention_cpu", "load_cpu_kernel"]
