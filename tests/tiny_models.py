"""Tiny random models of the supported families, gates that fit them, and a lossless
one-character-per-token tokenizer: engine tests in milliseconds instead of a real model load."""

import math
from pathlib import Path

import torch
from seer_gates import GateConfig, build_gates
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
VOCAB = 256
HIDDEN = 128
NUM_LAYERS = 2
NUM_Q_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 64
CONTEXT = 1024

# A chat template as small as can be: roles in angle brackets, one turn per line.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_model(family: str, seed: int = 0):
    """A float32 causal LM in eval mode with random weights; it never emits an end token."""
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_Q_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=CONTEXT,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.float().eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the character chr(i): decoding is exact, so equal texts mean equal tokens."""
    tokenizer = Tokenizer(models.BPE(vocab={chr(i): i for i in range(VOCAB)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHAT_TEMPLATE)


def gate_config(model, base_model: str = "tiny", hidden_size: int = 128) -> GateConfig:
    config = model.config
    return GateConfig(
        base_model=base_model,
        num_layers=config.num_hidden_layers,
        num_q_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_size=hidden_size,
    )


def tiny_gates(model, seed: int = 0, hidden_size: int = 128) -> torch.nn.ModuleList:
    """Randomly initialized gates in the trained-gate format, one per layer of ``model``."""
    torch.manual_seed(seed)
    return build_gates(gate_config(model, hidden_size=hidden_size)).eval()


def save_tiny_model(family: str, folder: Path) -> Path:
    """A transformers model folder (weights, config, tokenizer) that ``--model`` accepts."""
    tiny_model(family).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    """A [1, n] prompt of random token ids."""
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def topk_sparsity(num_blocks: int, sparsity: float) -> float:
    """Sparsity that top-k selection reaches on a ``num_blocks``-block causal map under the
    default MaskPolicy, by the rule its docs state: the diagonal, the sink column and the last
    row are always kept; row i keeps max(forced_i, ceil(r·(i+1))) blocks, with the density r
    lowered so that the dense last row is paid for out of the same budget."""
    nb = num_blocks
    total = nb * (nb + 1) // 2
    if nb == 1:
        return 0.0
    r = min(max(((1 - sparsity) * total - nb) / (total - nb), 0.0), 1.0)
    forced = [min(i + 1, 2) for i in range(nb - 1)]  # the diagonal, and the sink from row 1
    kept = nb + sum(max(f, math.ceil(r * (i + 1) - 1e-9)) for i, f in enumerate(forced))
    return 1 - kept / total
