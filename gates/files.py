"""Gate files: the project's safetensors format and the published SeerAttention folders.

Project format: one `.safetensors` file whose header metadata holds the `GateConfig` JSON under
`seer_gate_config`. Published format: a folder with `config.json` and `attn_gate_weights.pth`.
Both use the tensor names `model.layers.{i}.self_attn.attn_gate.mask_linear_{q,k}.weight`.
"""

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .gate import AttnGate
from .policy import BUDGETS

SUPPORTED_GATE_TYPES = ("Qavg_Kmaxminavg",)
CONFIG_METADATA_KEY = "seer_gate_config"
PUBLISHED_CONFIG = "config.json"
PUBLISHED_WEIGHTS = "attn_gate_weights.pth"
_KEY_PATTERN = re.compile(r"model\.layers\.(\d+)\.self_attn\.attn_gate\.mask_linear_([qk])\.weight")


class GateMismatchError(ValueError):
    """Gates that do not fit the model (or config) they are used with."""


class GateFileError(ValueError):
    """A gate file or folder that is missing, unreadable or inconsistent."""


def _require_supported(gate_type: str) -> None:
    if gate_type not in SUPPORTED_GATE_TYPES:
        raise ValueError(
            f"gate type {gate_type!r} is not supported (only {SUPPORTED_GATE_TYPES[0]!r})."
        )


@dataclass
class GateConfig:
    """Settings shared by every layer's gate, stored beside the weights.

    `metadata` is free-form and JSON-serializable: training settings, data summary, and
    `local_blocks`, the local window the gates are meant to run with, `budget`, how a sparsity
    is spent with them by default, and `layer_rank_power`, the rank a layer budget orders their
    scores by.
    """

    base_model: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 128
    block_size: int = 64
    gate_type: str = "Qavg_Kmaxminavg"
    force_double: bool = False
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.base_model, str) or not isinstance(self.gate_type, str):
            raise ValueError("base_model and gate_type must be strings.")
        if not isinstance(self.force_double, bool) or not isinstance(self.metadata, dict):
            raise ValueError("force_double must be a bool and metadata a dict.")
        for name in (
            "num_layers",
            "num_q_heads",
            "num_kv_heads",
            "head_dim",
            "hidden_size",
            "block_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_q_heads} query heads cannot share {self.num_kv_heads} KV heads."
            )
        _require_supported(self.gate_type)
        local = self.local_blocks
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise ValueError(
                f"the metadata's local_blocks must be a whole number, 0 or more, got {local!r}."
            )
        if self.budget not in BUDGETS:
            raise ValueError(
                f"the metadata's budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}."
            )
        power = self.layer_rank_power
        if isinstance(power, bool) or not isinstance(power, int | float) or not 0 <= power < 16:
            raise ValueError(
                f"the metadata's layer_rank_power must be a number in [0, 16), got {power!r}."
            )

    @property
    def budget(self) -> str:
        """How a sparsity is spent with these gates unless asked otherwise
        (`MaskPolicy.budget`): the metadata's `budget`, ``row`` where it has none."""
        return self.metadata.get("budget", "row")

    @property
    def layer_rank_power(self) -> float:
        """The power of the row length a layer budget ranks these gates' scores by
        (`MaskPolicy.rank_power`): the metadata's `layer_rank_power`, 1 where it has none."""
        return self.metadata.get("layer_rank_power", 1.0)

    @property
    def local_blocks(self) -> int:
        """The local window the gates are meant to run with (`MaskPolicy.local_blocks`): the
        metadata's `local_blocks`, 0 where it has none."""
        return self.metadata.get("local_blocks", 0)

    def to_json(self) -> str:
        """One-line JSON of every field, keys sorted."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GateConfig":
        """Parse `to_json` output; raises ValueError for malformed or incomplete JSON."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"the gate config is not valid JSON ({error}).") from error
        if not isinstance(data, dict):
            raise ValueError("the gate config is not a JSON object.")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(data.keys() - known):
            raise ValueError(f"the gate config has unknown keys {unknown}.")
        required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
        if missing := sorted(required - data.keys()):
            raise ValueError(f"the gate config lacks the keys {missing}.")
        return cls(**data)


def build_gates(config: GateConfig) -> nn.ModuleList:
    """Freshly initialized gates, one `AttnGate` per layer."""
    return nn.ModuleList(
        AttnGate(
            config.num_q_heads,
            config.num_kv_heads,
            config.head_dim,
            hidden_size=config.hidden_size,
            block_size=config.block_size,
            force_double=config.force_double,
        )
        for _ in range(config.num_layers)
    )


def _gate_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.self_attn.attn_gate.{name}"


def _flat_state(gates: nn.ModuleList) -> dict[str, torch.Tensor]:
    """All gate tensors under their published names."""
    return {
        _gate_key(layer, name): tensor
        for layer, gate in enumerate(gates)
        for name, tensor in gate.state_dict().items()
    }


def _check_tensors(
    config: GateConfig, tensors: dict[str, torch.Tensor], source: str, error: type[ValueError]
) -> None:
    """Raise `error` unless `tensors` has exactly the names and shapes `config` implies."""
    with torch.device("meta"):
        expected = _flat_state(build_gates(config))
    if missing := sorted(expected.keys() - tensors.keys()):
        raise error(
            f"{source} lacks {len(missing)} gate tensors the config needs, e.g. {missing[0]}."
        )
    if extra := sorted(tensors.keys() - expected.keys()):
        raise error(
            f"{source} has {len(extra)} tensors the config does not expect, e.g. {extra[0]}."
        )
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise error(
                f"{source} has {key} of shape {list(tensors[key].shape)}, "
                f"the config implies {list(want.shape)}."
            )


def _gates_from_tensors(
    config: GateConfig, tensors: dict[str, torch.Tensor], source: str
) -> nn.ModuleList:
    """Float32 gates holding `tensors`, checked against `config`."""
    _check_tensors(config, tensors, source, GateFileError)
    with torch.device("meta"):
        gates = build_gates(config)
    for layer, gate in enumerate(gates):
        state = {name: tensors[_gate_key(layer, name)].float() for name in gate.state_dict()}
        gate.load_state_dict(state, assign=True)
    return gates


def save_gates(path: str | os.PathLike, gates: nn.ModuleList, config: GateConfig) -> None:
    """Write gates and config to one `.safetensors` file, atomically (temp file + rename)."""
    path = Path(path)
    tensors = {key: t.detach().cpu().contiguous() for key, t in _flat_state(gates).items()}
    _check_tensors(config, tensors, "the gates being saved", GateMismatchError)
    data = safetensors_bytes(tensors, metadata={CONFIG_METADATA_KEY: config.to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_gates(path: str | os.PathLike) -> tuple[GateConfig, nn.ModuleList]:
    """Load gates from a project `.safetensors` file or a published SeerAttention folder.

    A path to a published folder's `attn_gate_weights.pth` loads that folder. Gates come back
    in float32 on the CPU. Raises `GateFileError` for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise GateFileError(f"gate file {path} does not exist.")
    if path.is_dir():
        return _load_published(path)
    if path.name == PUBLISHED_WEIGHTS:
        return _load_published(path.parent)
    return _load_safetensors(path)


@contextmanager
def _config_errors(source: object):
    """Re-raise a bad gate config as a `GateFileError` naming its source."""
    try:
        yield
    except ValueError as error:
        raise GateFileError(f"{source} has an unusable gate config: {error}") from error


def read_gate_config(path: str | os.PathLike) -> GateConfig:
    """The settings of a project `.safetensors` gate file, read from its header alone."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise GateFileError(f"{path} is not a readable safetensors file ({error}).") from error
    if CONFIG_METADATA_KEY not in metadata:
        raise GateFileError(f"{path} is not a seer gate file: its header has no gate config.")
    with _config_errors(path):
        return GateConfig.from_json(metadata[CONFIG_METADATA_KEY])


def _load_safetensors(path: Path) -> tuple[GateConfig, nn.ModuleList]:
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise GateFileError(f"{path} is not a readable safetensors file ({error}).") from error
    if CONFIG_METADATA_KEY not in metadata:
        raise GateFileError(f"{path} is not a seer gate file: its header has no gate config.")
    with _config_errors(path):
        config = GateConfig.from_json(metadata[CONFIG_METADATA_KEY])
    return config, _gates_from_tensors(config, tensors, str(path))


def _load_published(folder: Path) -> tuple[GateConfig, nn.ModuleList]:
    config_path, weights_path = folder / PUBLISHED_CONFIG, folder / PUBLISHED_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise GateFileError(f"{folder} is not a gate folder: it has no {needed.name}.")
    try:
        hub = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise GateFileError(f"{config_path} is not readable JSON ({error}).") from error
    if not isinstance(hub, dict):
        raise GateFileError(f"{config_path} is not a JSON object.")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler raises many types for bad files
        raise GateFileError(f"{weights_path} is not a loadable state dict ({error}).") from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise GateFileError(f"{weights_path} is not a state dict of tensors.")
    config = _published_config(hub, state, folder)
    return config, _gates_from_tensors(config, state, str(weights_path))


def _published_config(hub: dict, state: dict[str, torch.Tensor], folder: Path) -> GateConfig:
    """Settings of a published folder: gate keys from config.json, sizes from the weights."""
    config_path = folder / PUBLISHED_CONFIG
    gate_type = hub.get("seerattn_gate_type", SUPPORTED_GATE_TYPES[0])
    with _config_errors(config_path):
        _require_supported(gate_type)
    k = state.get(_gate_key(0, "mask_linear_k.weight"))
    if k is None or k.dim() != 3 or k.shape[1] % 3:
        raise GateFileError(f"{folder / PUBLISHED_WEIGHTS} has no usable layer-0 key gate weight.")
    q = state.get(_gate_key(0, "mask_linear_q.weight"))
    head_dim, hidden_size = k.shape[1] // 3, k.shape[2]
    if q is not None:
        num_q_heads, num_kv_heads = q.shape[0], k.shape[0]
    else:  # the key linear has one head per query head; KV heads only config.json can tell
        num_q_heads = k.shape[0]
        num_kv_heads = hub.get("num_key_value_heads") or num_q_heads
    num_layers = 1 + max(int(match[1]) for match in map(_KEY_PATTERN.fullmatch, state) if match)

    model_head_dim = hub.get("head_dim")
    if model_head_dim is None and isinstance(hub.get("hidden_size"), int):
        heads = hub.get("num_attention_heads")
        model_head_dim = hub["hidden_size"] // heads if isinstance(heads, int) and heads else None
    stated = {
        "num_hidden_layers": (hub.get("num_hidden_layers"), num_layers),
        "num_attention_heads": (hub.get("num_attention_heads"), num_q_heads),
        "num_key_value_heads": (hub.get("num_key_value_heads"), num_kv_heads),
        "head_dim": (model_head_dim, head_dim),
        "seerattn_gate_hidden_size": (hub.get("seerattn_gate_hidden_size"), hidden_size),
    }
    for name, (said, implied) in stated.items():
        if said is not None and said != implied:
            raise GateFileError(
                f"{config_path} says {name} is {said}, the weights imply {implied}."
            )

    with _config_errors(config_path):
        return GateConfig(
            base_model=hub.get("base_model") or "",
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_size=hidden_size,
            block_size=hub.get("seerattn_gate_block_size", 64),
            gate_type=gate_type,
            force_double=hub.get("seerattn_gate_force_double", False),
            metadata={key: value for key, value in hub.items() if key.startswith("seerattn_")},
        )


def _describe(items: list[str]) -> str:
    """ "32 layers", "32 layers with 8 KV heads", "32 layers with 32 Q heads and 8 KV heads"."""
    return items[0] + (" with " + " and ".join(items[1:]) if len(items) > 1 else "")


def check_fits(
    config: GateConfig,
    *,
    num_layers: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    model_name: str | None = None,
) -> None:
    """Raise `GateMismatchError` naming what differs between the gates and a model's shape.

    Names are only used in the message: the same model often goes by a hub id and a local path.
    """
    sizes = [
        ("{} layers", config.num_layers, num_layers),
        ("{} Q heads", config.num_q_heads, num_q_heads),
        ("{} KV heads", config.num_kv_heads, num_kv_heads),
        ("head dim {}", config.head_dim, head_dim),
    ]
    differing = [(text, ours, theirs) for text, ours, theirs in sizes if ours != theirs]
    if not differing:
        return
    gates = f"gates for {config.base_model}" if config.base_model else "gates"
    model = f"the model {model_name}" if model_name else "the model"
    ours = _describe([text.format(value) for text, value, _ in differing])
    theirs = _describe([text.format(value) for text, _, value in differing])
    raise GateMismatchError(f"{gates} are for {ours}, {model} has {theirs}.")
