"""What to profile: the device, prompt lengths, sparsities, output format, and model configs
(shipped shapes in ``configs/`` or a config.json), each refused with one sentence when wrong."""

import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

from ..engine.attention import attention_kernel
from ..engine.errors import SeerError
from ..engine.models import SUPPORTED_MODEL_TYPES, resolve_model
from ..engine.runtime import model_shape, pick_device

OUTPUT_FORMATS = ("md", "json", "csv")
GPU_LENGTHS = (8192, 32768, 131072)
CPU_LENGTHS = (256, 512)

ProgressCallback = Callable[[int, int, str], None]


def profile_device(name: str) -> torch.device:
    """The device to profile on; without a CUDA GPU only an explicit ``cpu`` is accepted."""
    device = pick_device(name)
    if device.type != "cuda" and name != "cpu":
        raise SeerError(
            "seer profile measures GPU speed and no CUDA GPU is available; "
            "pass --device cpu for a small CPU run."
        )
    return device


def parse_lengths(text: str | None, device: torch.device) -> list[int]:
    """Prompt lengths from ``"8192,32768"``, ascending and without repeats; None gives the
    defaults for the device (long on a GPU, short on the CPU)."""
    if text is None:
        return list(GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
    lengths = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdecimal() or int(item) < 1:
            raise SeerError(
                f"--lengths takes positive whole numbers separated by commas, got {item!r}."
            )
        lengths.add(int(item))
    return sorted(lengths)


def parse_ubatch_sizes(text: str) -> list[int | None]:
    """Prefill chunk sizes from ``"0,8192"`` (0: the whole prompt in one pass; ``auto``, None:
    what ``seer generate`` does), each a multiple of 64, in the order given and without
    repeats."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item != "auto" and (not item.isdecimal() or int(item) % 64):
            raise SeerError(
                "--ubatch-size takes auto, 0 (one pass) or multiples of 64 separated by commas, "
                f"got {item!r}."
            )
        size = None if item == "auto" else int(item)
        if size not in sizes:
            sizes.append(size)
    return sizes


def parse_sparsities(text: str) -> list[float]:
    """Sparsities from ``"0.5,0.9"``, each in [0, 1), ascending and without repeats."""
    sparsities = set()
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise SeerError(
                f"--sparsities takes numbers in [0, 1) separated by commas, got {item.strip()!r}."
            ) from None
        if not 0 <= value < 1:
            raise SeerError(f"--sparsities must each be in [0, 1), got {value}.")
        sparsities.add(value)
    return sorted(sparsities)


def check_settings(repeats: int, output: str) -> None:
    """Refuse a repeat count below 1 and an unknown output format, one sentence each."""
    if repeats < 1:
        raise SeerError(f"--repeats must be at least 1, got {repeats}.")
    if output not in OUTPUT_FORMATS:
        raise SeerError(f"--output must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}.")


def shipped_configs() -> list[str]:
    """Names of the model configs shipped in ``seer_cli/measure/configs``."""
    folder = importlib.resources.files("seer_cli.measure.configs")
    return sorted(
        item.name[: -len(".json")] for item in folder.iterdir() if item.name.endswith(".json")
    )


def load_config(name: str):
    """``(name, transformers config)`` from a shipped config name or a config.json path."""
    shipped = importlib.resources.files("seer_cli.measure.configs") / f"{name}.json"
    if shipped.is_file():
        text = shipped.read_text(encoding="utf-8")
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise SeerError(
            f"unknown config {name!r}: use {' or '.join(shipped_configs())}, "
            "or the path of a config.json file."
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SeerError(f"{name} is not valid JSON ({error}).") from error
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SeerError(
            f"{name} has model_type {model_type!r}; seer supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        return name, AutoConfig.for_model(**data)
    except (TypeError, ValueError) as error:
        raise SeerError(f"{name} is not a usable {model_type} config ({error}).") from error


def model_config(model: str):
    """``(name, transformers config)`` of a ``--model``, read without loading its weights."""
    source = resolve_model(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return source.name, AutoConfig.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as error:
        message = f"could not read the config of {source.name}: {error}".splitlines()[0]
        raise SeerError(message) from error


def check_context(lengths: list[int], name: str, config) -> None:
    """A whole model cannot take prompts longer than its context."""
    context = config.max_position_embeddings
    if lengths[-1] > context:
        raise SeerError(
            f"{lengths[-1]} tokens do not fit {name}, whose context is {context} tokens "
            "(max_position_embeddings)."
        )


def sparsity_label(sparsity: float) -> str:
    """``s0.90``: two decimals, more only where the value has them."""
    return f"s{sparsity:.2f}" if round(sparsity, 2) == sparsity else f"s{sparsity}"


def row_name(length: int, sparsity: float | None) -> str:
    """``pp8192 @ s0.90``, or ``pp8192 @ dense`` without a sparsity."""
    return f"pp{length} @ {'dense' if sparsity is None else sparsity_label(sparsity)}"


def run_info(name: str, config, device: torch.device, dtype, repeats: int, **extra) -> dict:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "model": name,
        **model_shape(config),
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_kernel": attention_kernel(device),
        "repeats": repeats,
        "torch": torch.__version__,
        **extra,
    }
