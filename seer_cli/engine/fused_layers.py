"""Fused versions of the element-wise work around attention, swapped into a loaded model.

transformers' eager RMSNorm, RoPE and SiLU gate are many passes over memory: on an H100 with
Llama-3.1-8B shapes at 128k tokens, ~25 ms of each layer's 367 (dense) or 170 (sparse 0.9),
the same with or without sparsity, so they bound what sparse prefill can gain (BENCHMARKS.md).
- RMSNorm: PyTorch's own ``rms_norm`` (one kernel on the GPU, 7× faster there). On the CPU it
  runs over a few rows at a time in float32, whose working copy then stays in cache: 5.8
  against 33 ms for a [16384, 576] bf16 norm on the 2-core Xeon (identical per row).
- RoPE and the MLP's SiLU gate: seer's Triton kernels (``seer_kernels.rotary_embedding_pair``,
  ``silu_gate_``) on CUDA tensors. On the CPU, where each new tensor the size of the prompt's
  activations costs about as much as a pass over it (its pages are mapped afresh), the gate is
  computed in place (19 against 35 ms for [16384, 1536] bf16) and RoPE makes one new tensor,
  the rotated half added in place (4.0 against 10.2 ms for 9 heads of 64 at 16384 tokens).
- Each residual add and the RMSNorm that follows it: one Triton pass (``seer_kernels.add_rms_norm``)
  on CUDA tensors in the norm's dtype, the decoder layer's forward swapped for one that calls it;
  elsewhere the plain add and the norm above. The add after attention meets the layer's own
  post-attention norm; the add after the MLP, the layer's output, meets the norm that reads it
  next (the next layer's input norm, or the model's final one), which is handed the normed
  output (``_NormHandoff``).
Modules keep their parameters and hooks; only their ``forward`` changes. A caller that needs
more from a layer's RoPE pass than the rotated queries and keys (sparse prefill takes the
pre-RoPE block pools its gates score there) hands that layer's pass to a tap
(``tap_next_rotary``).
"""

import sys
import types

import torch
from seer_kernels import add_rms_norm, rotary_embedding_pair, silu_gate_

# The tap the next fused RoPE call hands its work to (see tap_next_rotary).
_next_rotary_tap = None
# Elements of a CPU norm's float32 rows at a time (256 rows of 576, 32 of 4096): few enough to
# stay in cache.
CPU_NORM_ELEMENTS = 1 << 17


def tap_next_rotary(tap) -> None:
    """Have the next fused RoPE call return ``tap(q, k, cos, sin)`` (q/k [b, H, s, d], CUDA,
    unit channel strides; tables [b, s, d]), which must return the rotated pair as the fused
    kernel would. The tap serves once; a call that does not take the fused path drops it."""
    global _next_rotary_tap
    _next_rotary_tap = tap


def rotary_is_fused(model) -> bool:
    """Whether ``model``'s attention layers call the fused RoPE (its family was fused)."""
    family = sys.modules[type(model.model.layers[0].self_attn).__module__]
    return hasattr(getattr(family, "apply_rotary_pos_emb", None), "unfused")


def fuse_layers(model) -> None:
    """Swap the fused operations into ``model`` (a Llama, Mistral, Qwen2 or Qwen3 causal LM)."""
    for module in model.modules():
        if _is_rms_norm(module):
            _set_forward(module, _rms_norm_forward)
        elif _is_silu_mlp(module):
            _set_forward(module, _silu_mlp_forward)
        elif _is_decoder_layer(module):
            _set_forward(module, _decoder_layer_forward)
    _link_output_norms(model)
    # The attention layers call their modeling module's function by name: RoPE can only be
    # swapped there (for every model of that family in this process).
    family = sys.modules[type(model.model.layers[0].self_attn).__module__]
    if not hasattr(family.apply_rotary_pos_emb, "unfused"):
        family.apply_rotary_pos_emb = _fused_rotary(family.apply_rotary_pos_emb)


def _link_output_norms(model) -> None:
    """Give each fused decoder layer a hand-off to the norm that reads its output."""
    layers = model.model.layers
    readers = [layer.input_layernorm for layer in layers[1:]] + [getattr(model.model, "norm", None)]
    for layer, norm in zip(layers, readers, strict=True):
        if "forward" in vars(layer) and norm is not None and _is_rms_norm(norm):
            layer.seer_output_norm = norm.seer_input = _NormHandoff(norm)


class _NormHandoff:
    """A decoder layer's output and its norm by ``norm``, the module that reads that output
    next, computed in the layer's last residual add and kept until ``norm`` is called on it."""

    def __init__(self, norm: torch.nn.Module):
        self.norm = norm
        self.output: torch.Tensor | None = None
        self.normed: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The kept norm if x is the kept output (else None); either way nothing stays kept."""
        normed = self.normed if x is self.output else None
        self.output = self.normed = None
        return normed


def _set_forward(module: torch.nn.Module, forward) -> None:
    bound = types.MethodType(forward, module)
    if hasattr(module, "_hf_hook"):
        # accelerate's device hooks wrap the forward they found, kept as _old_forward.
        module._old_forward = bound
    else:
        module.forward = bound


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_decoder_layer(module: torch.nn.Module) -> bool:
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    return all(hasattr(module, name) for name in parts) and all(
        _is_rms_norm(getattr(module, name)) for name in (parts[0], parts[2])
    )


def _is_silu_mlp(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return all(
        hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
    ) and getattr(config, "hidden_act", None) in ("silu", "swish")


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    handoff = getattr(self, "seer_input", None)
    normed = handoff.take(hidden_states) if handoff is not None else None
    if normed is not None:
        return normed
    if hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    if hidden_states.device.type == "cpu":
        return _rms_norm_by_rows(hidden_states, self.weight, self.variance_epsilon)
    return torch.nn.functional.rms_norm(
        hidden_states, self.weight.shape, self.weight, self.variance_epsilon
    )


def _rms_norm_by_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` of x in float32, ``CPU_NORM_ELEMENTS`` at a time, rounded to x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    weight32 = weight.float()
    step = max(1, CPU_NORM_ELEMENTS // rows.shape[-1])
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].float()
        out[start : start + step] = torch.nn.functional.rms_norm(part, weight.shape, weight32, eps)
    return out.view(x.shape)


def _silu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.requires_grad:  # the in-place forms below would hide their writes from autograd
        return self.down_proj(self.act_fn(gate) * up)
    if gate.is_cuda and gate.is_contiguous() and up.is_contiguous():
        return self.down_proj(silu_gate_(gate, up))
    return self.down_proj(torch.nn.functional.silu(gate, inplace=True).mul_(up))


def _decoder_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """transformers' pre-norm decoder layer (Llama, Mistral, Qwen2, Qwen3), its residual add
    after attention and the post-attention norm in one pass where :func:`_adds_in_kernel`
    allows. The keyword arguments go to the attention as they came."""
    if args:  # the layer's own forward places positional arguments by its signature
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    norm = self.post_attention_layernorm
    if _adds_in_kernel(residual, hidden_states, norm):
        residual, hidden_states = add_rms_norm(
            residual, hidden_states, norm.weight, norm.variance_epsilon
        )
    else:
        residual = residual + hidden_states
        hidden_states = norm(residual)
    hidden_states = self.mlp(hidden_states)
    handoff = getattr(self, "seer_output_norm", None)
    if handoff is not None and _adds_in_kernel(residual, hidden_states, handoff.norm):
        norm = handoff.norm
        handoff.output, handoff.normed = add_rms_norm(
            residual, hidden_states, norm.weight, norm.variance_epsilon
        )
        return handoff.output
    return residual + hidden_states


def _adds_in_kernel(residual: torch.Tensor, out: torch.Tensor, norm: torch.nn.Module) -> bool:
    """Whether ``residual + out`` and ``norm`` of it can be one kernel pass: tensors where the
    kernel runs, of the dtype and on the device of the norm's weight (one that accelerate
    offloads sits elsewhere until a call of the module brings it), unit last strides, nothing
    for autograd to record, and no torch hooks on the norm (which a call of it would run)."""
    weight = norm.weight
    return (
        _kernel_device(residual)
        and residual.shape == out.shape
        and residual.dtype == out.dtype == weight.dtype
        and residual.device == out.device == weight.device
        and residual.stride(-1) == 1
        and out.stride(-1) == 1
        and not (
            torch.is_grad_enabled()
            and (residual.requires_grad or out.requires_grad or weight.requires_grad)
        )
        and not (norm._forward_hooks or norm._forward_pre_hooks)
    )


def _kernel_device(x: torch.Tensor) -> bool:
    """Whether x is where the fused RoPE and add-and-norm run: CUDA (tests add the Triton
    interpreter)."""
    return x.is_cuda


def _fused_rotary(unfused):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``, fused on CUDA
    tensors with full-width tables and unit channel strides; ``unfused`` otherwise."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        global _next_rotary_tap
        tap, _next_rotary_tap = _next_rotary_tap, None
        fits = cos.dim() == 3 and cos.shape[-1] == q.shape[-1] and unsqueeze_dim == 1
        # One launch rotates both: queries and keys of one batch, length and head_dim.
        pairs = q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
        if _kernel_device(q) and fits and pairs and q.stride(-1) == 1 and k.stride(-1) == 1:
            if tap is not None:
                return tap(q, k, cos, sin)
            return rotary_embedding_pair(q, k, cos, sin)[:2]
        if q.device.type == "cpu" and fits:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return _rotate_on_cpu(q, cos, sin), _rotate_on_cpu(k, cos, sin)
        return unfused(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.unfused = unfused
    return apply_rotary_pos_emb


def _rotate_on_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with one new tensor: rotate_half(x) = [-x2, x1] is
    added a half at a time, in place."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
