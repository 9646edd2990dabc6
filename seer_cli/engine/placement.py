"""Models spread over several GPUs (and the CPU) through accelerate's big-model inference.

A ``Placement`` says where a model's layers go: a strategy that accelerate turns into a device
map (``auto`` and ``balanced`` spread the layers evenly over the GPUs, ``sequential`` fills
GPU 0 first), or an explicit ``{module name: device}`` map; ``max_memory`` caps what each
device may hold. Pretrained models load through transformers' ``from_pretrained(device_map=…)``;
random-weight models (``seer profile prefill --config``) are built on the meta device, given a
map by accelerate and created directly on their devices. Either way accelerate's hooks carry
the activations from device to device; each layer's gate and kernels run on that layer's
device (``execution_device``).
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SeerError

STRATEGIES = ("auto", "balanced", "sequential")
# Devices a map may name besides GPU indices: the CPU, and the disk (weights offloaded there
# are read back layer by layer, slowly, on the main device).
OFFLOAD_DEVICES = ("cpu", "disk")


@dataclass(frozen=True)
class Placement:
    """``device_map``: one of STRATEGIES or ``{module name: GPU index, "cpu" or "disk"}``;
    ``max_memory``: ``{GPU index or "cpu": bytes}``, None for what each device has free."""

    device_map: str | dict
    max_memory: dict | None = None

    @classmethod
    def parse(cls, device_map: str | dict | None, max_memory: str | dict | None):
        """The placement the ``--device-map`` and ``--max-memory`` values ask for (None for
        neither); ``--max-memory`` alone means ``--device-map auto``. Raises SeerError, in one
        sentence, for a value that cannot be read or names a GPU this machine lacks."""
        if device_map is None and max_memory is None:
            return None
        memory = _parse_max_memory(max_memory) if max_memory is not None else None
        return cls(_parse_device_map(device_map or "auto"), memory)

    @property
    def devices(self) -> set:
        """The devices named by the map, or by ``max_memory``, or every GPU: where it may run."""
        if isinstance(self.device_map, dict):
            return set(self.device_map.values())
        if self.max_memory is not None:
            return set(self.max_memory)
        return set(range(torch.cuda.device_count())) or {"cpu"}

    def main_device(self) -> torch.device:
        """Where the model's inputs go and its outputs come back: the first GPU it uses, else
        the CPU."""
        gpus = sorted(device for device in self.devices if isinstance(device, int))
        return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")

    def pretrained_kwargs(self) -> dict:
        """Keyword arguments of ``from_pretrained`` that load a model this way."""
        kwargs = {"device_map": self.device_map, "offload_folder": _offload_folder()}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        return kwargs


def _parse_device_map(text: str | dict) -> str | dict:
    """A strategy name, one device for the whole model (``0``, ``cuda:1``, ``cpu``), a JSON
    object ``{"module name": device}``, or a JSON file holding one."""
    if isinstance(text, dict):
        return {str(name): _device(value, "--device-map") for name, value in text.items()}
    text = text.strip()
    if text in STRATEGIES:
        return text
    if text == "cpu" or text.removeprefix("cuda:").isdecimal():
        return {"": _device(text, "--device-map")}
    if text.startswith("{"):
        source = text
    elif text.endswith(".json") and Path(text).is_file():
        source = Path(text).read_text(encoding="utf-8")
    else:
        raise SeerError(
            f"--device-map must be {', '.join(STRATEGIES)}, a device, a JSON object of module "
            f"names and devices, or a .json file holding one; got {text!r}."
        )
    try:
        data = json.loads(source)
    except json.JSONDecodeError as error:
        raise SeerError(f"--device-map is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or not data:
        raise SeerError("--device-map JSON must be an object of module names and devices.")
    return _parse_device_map(data)


def _parse_max_memory(text: str | dict) -> dict:
    """``"0=70GiB,1=70GiB,cpu=200GB"`` (or the same as a dict) as ``{0: bytes, 1: bytes,
    "cpu": bytes}``."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, str):
        pairs = [item.partition("=") for item in text.split(",") if item.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise SeerError(
                f"--max-memory takes DEVICE=SIZE pairs separated by commas "
                f"(like 0=70GiB,1=70GiB,cpu=100GiB), got {text!r}."
            )
        text = {device.strip(): size.strip() for device, _, size in pairs}
    memory = {}
    for device, size in text.items():
        key = _device(device, "--max-memory")
        if key == "disk":
            raise SeerError("--max-memory takes GPU indices and cpu; the disk has no cap.")
        try:
            memory[key] = convert_file_size_to_int(
                int(size) if str(size).isdecimal() else str(size)
            )
        except ValueError:
            raise SeerError(
                f"--max-memory size {size!r} for {device} is not a size like 70GiB or 500MB."
            ) from None
    return memory


def _device(value, flag: str) -> int | str:
    """A device of a map: a GPU index (from ``0``, ``"0"`` or ``"cuda:0"``), ``"cpu"`` or
    ``"disk"``; a GPU this machine does not have is refused."""
    text = str(value).strip()
    if text in OFFLOAD_DEVICES:
        return text
    index = text.removeprefix("cuda:")
    if isinstance(value, bool) or not index.isdecimal():
        raise SeerError(
            f"{flag} names device {value!r}; devices are GPU indices (0, 1, …), cpu or disk."
        )
    count = torch.cuda.device_count()
    if int(index) >= count:
        have = f"GPUs 0 to {count - 1}" if count > 1 else "GPU 0" if count else "no GPU"
        raise SeerError(f"{flag} names GPU {index}, but this machine has {have}.")
    return int(index)


def _offload_folder() -> str:
    """A folder for weights offloaded to the disk, removed when the process ends."""
    folder = tempfile.TemporaryDirectory(prefix="seer-offload-")
    _OFFLOAD_FOLDERS.append(folder)
    return folder.name


_OFFLOAD_FOLDERS: list[tempfile.TemporaryDirectory] = []


def device_map_for(model, placement: Placement, dtype) -> dict:
    """The explicit ``{module name: device}`` map of ``placement`` for ``model`` (which may
    be on the meta device), computed by accelerate as transformers' ``from_pretrained`` does."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(placement.device_map, dict):
        check_map_fits(model, placement.device_map)
        return placement.device_map
    no_split = list(model._no_split_modules)
    memory = placement.max_memory
    if placement.device_map != "sequential":
        memory = get_balanced_memory(
            model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
        )
    return infer_auto_device_map(
        model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
    )


def check_map_fits(model, device_map: dict) -> None:
    """Refuse an explicit map that names modules ``model`` lacks or leaves weights without a
    device (transformers would quietly put those on the CPU)."""
    modules = dict(model.named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        raise SeerError(f"--device-map names {_few(unknown)}, which the model does not have.")
    prefixes = tuple(f"{name}." for name in device_map)
    left_out = [
        name
        for name in model.state_dict()
        if "" not in device_map and name not in device_map and not name.startswith(prefixes)
    ]
    if left_out:
        raise SeerError(f"--device-map gives no device to {_few(left_out)}.")


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def dispatch(model, device_map: dict):
    """Move a model's modules to the devices of ``device_map`` and hook them so that
    activations follow (accelerate's ``dispatch_model``)."""
    from accelerate import dispatch_model

    # As transformers does: the hooks leave the cache where each layer keeps it.
    skip_keys = list(model._skip_keys_device_placement or [])
    return dispatch_model(
        model, device_map, offload_dir=_offload_folder(), skip_keys=skip_keys
    ).eval()


def random_model(config, dtype, placement: Placement):
    """A causal LM of ``config`` with random weights, spread as ``placement`` says: built on the
    meta device, each module then created on its device and initialized there (so no device
    ever holds more than its share), and dispatched with accelerate's hooks."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    device_map = device_map_for(model, placement, dtype)
    for name, device in device_map.items():
        # Weights bound for the disk are created on the CPU; dispatch_model writes them out.
        target = "cpu" if device == "disk" else device
        model.get_submodule(name).to_empty(device=target)
    # to_empty left the rotary tables uninitialized: build them again where they live.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(rotary.inv_freq.device)
    model.init_weights()  # random values as from_config gives them, and tied weights tied again
    return dispatch(model, device_map)


def execution_device(module) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device (its weights may
    sit on the CPU or the disk), else the device of its weights."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def layer_devices(model) -> list[torch.device]:
    """Per decoder layer, the device its attention runs on."""
    return [execution_device(layer.self_attn.q_proj) for layer in model.model.layers]


def input_device(model) -> torch.device:
    """Where the model's input ids go: the device its embedding computes on."""
    return execution_device(model.get_input_embeddings())


def model_gpus(model) -> list[torch.device]:
    """The GPUs a model computes on, in index order (empty on the CPU)."""
    devices = set(layer_devices(model)) | {input_device(model)}
    return sorted((d for d in devices if d.type == "cuda"), key=lambda device: device.index)
