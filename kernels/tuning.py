"""Kernel launch configurations chosen once per GPU and kept, so no process re-tunes.

Triton's autotuner measures every configuration again in each new process: seconds of a
command-line run. Here a kernel is launched with the configuration recorded for its tuning key
(kernel, GPU, the autotuner's key values: bucketed length, head_dim, dtypes). The record comes
from the tables shipped in ``tuned/`` (measured on that GPU model), else from seer's cache
folder, else the autotuner runs once and its choice is written to the cache for every later
process. While it runs, a notifier set by the caller (the command line shows a transient line)
hears about it.
"""

import json
import os
import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import torch

from ._common import only_compiling, run_kernel

_SHIPPED = "tuned"
_notify: Callable[[str], None] = lambda message: None


def seer_cache_dir() -> Path:
    """seer's cache folder: ``$SEER_CACHE_DIR``, else ``$XDG_CACHE_HOME/seer`` or
    ``~/.cache/seer``."""
    base = os.environ.get("SEER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seer"
    )
    return Path(base)


def warm_up_triton() -> None:
    """What Triton does once per process before its first launch, done ahead (in a background
    thread while the model loads, so that it stays out of the first prefill; BENCHMARKS.md):
    hash its own compiler and library into the cache key (0.4 s on the H100 machine; hashing
    releases the interpreter lock), import the Gluon front end its argument specialisation
    looks for (0.17 s), load its CUDA helper module, and hash each of seer's kernels (its
    source and every function it calls: ~35 ms of the default model's first sparse prefill).
    Parts a Triton version lacks are skipped.
    """
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return
    triton_key()
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    if torch.cuda.is_available():
        from triton.runtime import driver

        driver.active.utils  # noqa: B018 - the property loads the module
    _hash_kernels()


def _hash_kernels() -> None:
    """Compute the cache key of every kernel of seer's modules, which Triton works out on the
    kernel's first launch in a process (a walk over the source of it and its callees)."""
    from triton.runtime.jit import JITFunction

    from . import block_sparse, gate_features, gate_select, layer_ops, pooled

    for module in (block_sparse, gate_features, gate_select, layer_ops, pooled):
        for value in vars(module).values():
            # An autotuner keeps the kernel it tunes as .fn.
            kernel = value if isinstance(value, JITFunction) else getattr(value, "fn", None)
            if isinstance(kernel, JITFunction):
                kernel.cache_key  # noqa: B018 - the property computes and keeps the hash


def set_tuning_notifier(notify: Callable[[str], None] | None) -> None:
    """``notify(message)`` is called before a kernel is tuned on this GPU or built for this
    CPU (None: silence)."""
    global _notify
    _notify = notify or (lambda message: None)


def notify(message: str) -> None:
    """Tell the notifier about a one-time step of this machine (tuning, building)."""
    _notify(message)


def gpu_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3``: the GPU model as a file name."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class TuningTable:
    """Chosen configurations of one GPU model: shipped entries, then the user's cache."""

    def __init__(self, slug: str):
        self.cache_file = seer_cache_dir() / "tuning" / f"{slug}.json"
        shipped = files("seer_kernels") / _SHIPPED / f"{slug}.json"
        use = shipped.is_file() and _shipped_tables_used
        self.shipped = json.loads(shipped.read_text()) if use else {}
        self.cached = self._read_cache()

    def _read_cache(self) -> dict:
        try:
            return json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: tune again and rewrite it

    def get(self, key: str) -> dict | None:
        return self.shipped.get(key) or self.cached.get(key)

    def record(self, key: str, config: dict) -> None:
        """Keep ``config`` for ``key``; another process's entries written meanwhile survive."""
        self.cached = {**self._read_cache(), key: config}
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}")
            partial.write_text(json.dumps(self.cached, indent=1, sort_keys=True))
            os.replace(partial, self.cache_file)
        except OSError:
            pass  # a read-only cache only costs tuning again in the next process


_tables: dict[str, TuningTable] = {}
_shipped_tables_used = True


def ignore_shipped_tables() -> None:
    """Tune every key afresh in this process, as if no table shipped (to re-measure them)."""
    global _shipped_tables_used
    _shipped_tables_used = False
    _tables.clear()


def _table(device: torch.device) -> TuningTable:
    slug = gpu_slug(device)
    if slug not in _tables:
        _tables[slug] = TuningTable(slug)
    return _tables[slug]


def tuning_key(autotuner, args: tuple, constexprs: dict) -> str:
    """The autotuner's own key for these arguments (its key values, then the tensors' dtypes),
    prefixed with the kernel's name."""
    named = {**dict(zip(autotuner.arg_names, args, strict=False)), **constexprs}
    values = [named[name] for name in autotuner.keys if name in named]
    values += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
    return f"{autotuner.base_fn.__name__}:" + ",".join(str(value) for value in values)


def launch_tuned(kernel, autotuner, grid, device: torch.device, args: tuple, constexprs: dict):
    """Launch ``kernel`` with the recorded configuration for its key, tuning it first if none is
    recorded for this GPU."""
    table = _table(device)
    key = tuning_key(autotuner, args, constexprs)
    config = table.get(key)
    if config is not None:
        run_kernel(kernel, grid, *args, **constexprs, **config)
        return
    if only_compiling():
        return  # the configuration is unknown until tuned: the launch itself tunes
    _notify(f"tuning {autotuner.base_fn.__name__} for this GPU (once)")
    autotuner[grid](*args, **constexprs)
    best = autotuner.best_config
    table.record(key, {"num_warps": best.num_warps, "num_stages": best.num_stages, **best.kwargs})
