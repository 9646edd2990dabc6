"""The GPU's once-per-process start-up costs, paid in a background thread while the model loads.

A command-line run is one prefill per process, so the first call pays for what every later call
finds ready: cuBLAS's initialisation on the first matrix product (the rotary table's float32
one, the layers' own dtype), Triton's (``seer_kernels.tuning.warm_up_triton``: every model
runs seer's fused RoPE, SiLU-gate and add-and-norm kernels, sparse prefill its attention
kernels), and the compiles of the RoPE kernels, which depend only on the dtype and head_dim.
Measured on an H100 with the default model's shapes at 32k tokens, these were ~0.3 s of a first
prefill whose work takes 80 ms (BENCHMARKS.md). The add-and-norm kernel is compiled alongside,
for the row widths of the supported models' hidden sizes.
"""

import threading

import torch

# Side of the square matrices multiplied once: enough to reach cuBLAS's ordinary kernels.
_WARM_UP_SIDE = 256


def start_gpu_warmup(device: torch.device, dtype: torch.dtype) -> threading.Thread:
    """Start the warm-up of ``device`` for a model in ``dtype`` and return its thread. Not a
    daemon: the interpreter waits for it before shutting CUDA down."""
    thread = threading.Thread(target=_warm_up, args=(device, dtype), name="seer-gpu-warmup")
    thread.start()
    return thread


def _warm_up(device: torch.device, dtype: torch.dtype) -> None:
    """Best effort and silent: whatever fails here fails again where the prefill needs it, and
    is reported there in one sentence (a thread's exception would print a traceback)."""
    try:
        from seer_kernels import (
            can_compile_ahead,
            compile_add_rms_norm,
            compile_rotary,
            compiling_ahead,
        )
        from seer_kernels.tuning import warm_up_triton

        warm_up_triton()
        if can_compile_ahead(device):
            with compiling_ahead():
                compile_rotary(device, dtype)
                compile_add_rms_norm(device, dtype)
        with torch.inference_mode():
            for matmul_dtype in dict.fromkeys((torch.float32, dtype)):
                x = torch.ones(_WARM_UP_SIDE, _WARM_UP_SIDE, device=device, dtype=matmul_dtype)
                x @ x  # noqa: B018 - run for its side effect, the library's initialisation
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - see the docstring
        pass
