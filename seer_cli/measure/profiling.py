"""Dense against sparse prefill, measured: attention alone (``profile_kernel``) and a whole
model's time to first token (``profile_prefill``).

Results are ``report`` tables: one row per test (``pp32768 @ s0.90``), each time the mean ± std
over repeats after a warm-up. GPU times come from CUDA events; the attention-alone
timings clear the L2 cache before every call, as ``triton.testing.do_bench`` does. CPU times
come from the wall clock.

report = profile_kernel("llama-3.1-8b", load_config("llama-3.1-8b")[1], [8192], [0.9], 5, cuda)
print(seer_cli.measure.report.render(report, "md"))
"""

from .kernel_profile import crossover, crossover_notes, profile_kernel
from .prefill_profile import (
    TimedSparsePrefill,
    instrumented_prefill,
    loaded_subject,
    profile_prefill,
    random_subject,
)
from .settings import (
    CPU_LENGTHS,
    GPU_LENGTHS,
    OUTPUT_FORMATS,
    check_context,
    check_settings,
    load_config,
    model_config,
    parse_lengths,
    parse_sparsities,
    parse_ubatch_sizes,
    profile_device,
    row_name,
    shipped_configs,
)

__all__ = [
    "CPU_LENGTHS",
    "GPU_LENGTHS",
    "OUTPUT_FORMATS",
    "TimedSparsePrefill",
    "check_context",
    "check_settings",
    "crossover",
    "crossover_notes",
    "instrumented_prefill",
    "load_config",
    "loaded_subject",
    "model_config",
    "parse_lengths",
    "parse_sparsities",
    "parse_ubatch_sizes",
    "profile_device",
    "profile_kernel",
    "profile_prefill",
    "random_subject",
    "row_name",
    "shipped_configs",
]
