"""What a model is, as opposed to what its file is called: shapes, vocabulary and a few weights.

Gate files record the identity of the model they were trained on, so that ``--gates auto`` finds
the shipped gates for the bundled model whether it was named by default, by its GGUF file, by
its folder or by the converted copy in the cache, and never picks gates for another model that
merely shares a file name.
"""

import importlib.resources
from pathlib import Path

import torch

# Weights sampled for the fingerprint: a corner of the token embedding and of the first and last
# layers' query projections. Cheap to read, and different for any two separately trained models.
_FINGERPRINT_ROWS = 4
_FINGERPRINT_COLUMNS = 8
# The same weights loaded in bfloat16, or dequantized from a GGUF file, differ by rounding only.
_FINGERPRINT_TOLERANCE = 0.02
_SHAPE_KEYS = (
    "architecture",
    "num_layers",
    "num_q_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
)


def _fingerprint(model) -> list[float]:
    from accelerate.utils import align_module_device

    layers = model.model.layers
    first, last = layers[0].self_attn.q_proj, layers[-1].self_attn.q_proj
    sampled = [model.get_input_embeddings(), first, last]
    values = []
    for module in sampled:
        # Weights offloaded by --device-map (to the CPU or the disk) are read back for a moment.
        with align_module_device(module):
            values.append(module.weight[:_FINGERPRINT_ROWS, :_FINGERPRINT_COLUMNS].detach().cpu())
    return [round(float(v), 6) for w in values for v in w.float().flatten()]


def model_identity(model) -> dict:
    """Architecture, shapes, vocabulary size and a fingerprint of a few weights, as JSON data."""
    config = model.config
    heads = config.num_attention_heads
    return {
        "architecture": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_q_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "fingerprint": _fingerprint(model),
    }


def same_model(recorded: dict, identity: dict) -> bool:
    """True when ``recorded`` (from a gate file) and ``identity`` describe the same weights."""
    if any(recorded.get(key) != identity[key] for key in _SHAPE_KEYS):
        return False
    ours, theirs = recorded.get("fingerprint"), identity["fingerprint"]
    if not isinstance(ours, list) or len(ours) != len(theirs):
        return False
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    return bool(
        torch.linalg.norm(ours - theirs) <= _FINGERPRINT_TOLERANCE * torch.linalg.norm(theirs)
    )


def describe(identity: dict) -> str:
    """``llama, 30 layers, 9 Q / 3 KV heads, head dim 64, vocabulary 49152``."""
    return (
        f"{identity.get('architecture')}, {identity.get('num_layers')} layers, "
        f"{identity.get('num_q_heads')} Q / {identity.get('num_kv_heads')} KV heads, "
        f"head dim {identity.get('head_dim')}, vocabulary {identity.get('vocab_size')}"
    )


def shipped_gate_files() -> list[Path]:
    """The gate files that ship inside the package (``gates/pretrained``)."""
    folder = importlib.resources.files("seer_gates") / "pretrained"
    return sorted(
        Path(str(item)) for item in folder.iterdir() if item.name.endswith(".safetensors")
    )


def recorded_identity(path: Path) -> dict | None:
    """The model identity a gate file records, read from its header alone (no tensors)."""
    from seer_gates import GateFileError, read_gate_config

    try:
        return read_gate_config(path).metadata.get("model_identity")
    except GateFileError:
        return None


def recorded_base_model(path: Path) -> str:
    """The name of the model a gate file was trained on."""
    from seer_gates import read_gate_config

    return read_gate_config(path).base_model


def find_shipped_gates(model, rope_scaling: str = "none") -> tuple[Path | None, list[str]]:
    """The shipped gate file trained on ``model``, if any, and a description of every shipped
    file's model (for the message when none fits). A model may have several, distilled under
    different RoPEs: ``rope_scaling`` (``none`` for prompts within the native context, else the
    extension's kind) picks the file distilled under it, falling back to the first."""
    identity = model_identity(model)
    ours, described = [], []
    for path in shipped_gate_files():
        recorded = recorded_identity(path)
        if recorded is None:
            continue
        if same_model(recorded, identity):
            ours.append(path)
        else:
            described.append(f"{path.stem} ({describe(recorded)})")
    if not ours:
        return None, described
    for_the_rope = [path for path in ours if trained_rope_scaling(path) == rope_scaling]
    return (for_the_rope or ours)[0], []


def trained_rope_scaling(path: Path) -> str:
    """The RoPE a gate file was distilled under: ``none`` (the native context) or the
    extension's kind (``seer distill --ctx-size``)."""
    from seer_gates import read_gate_config

    return read_gate_config(path).metadata.get("rope_scaling", "none")
