"""``seer distill``: train gates for a model by self-distillation on the user's texts.

Harvest once (frozen model, dense attention, one pass per window), then train only the gate
parameters on the harvested tensors. The gate file is written atomically at the end; a
checkpoint beside it (``OUT.ckpt``) lets ``--resume`` continue an interrupted run.
"""

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from .. import options as opt
from ..console import handle_user_errors, stderr, write_product
from ..engine.errors import SeerError


@handle_user_errors
def distill(
    data: Annotated[list[str], typer.Option("--data", help="Text files or folders to learn from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Gate file to write (.safetensors).")],
    model: opt.Model = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window.")] = 8192,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = 4,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps.")] = 20,
    hidden_size: Annotated[int, typer.Option("--hidden-size", help="Gate hidden size.")] = 128,
    local_blocks: Annotated[
        int,
        typer.Option(
            "--local-blocks",
            help="Train for a policy that always keeps this local window, which the gate file "
            "records for seer generate to run the gates with: the gates learn to rank only the "
            "blocks beyond it.",
        ),
    ] = 0,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="Block attention map the gates learn: maxpool (each block's peak probability, "
            "SeerAttention's) or mass (each block's share of the attention).",
        ),
    ] = "maxpool",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Held-out share of windows.")
    ] = 0.1,
    max_windows: Annotated[
        int | None, typer.Option("--max-windows", help="Use at most this many windows.")
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, batches and init.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    ctx_size: opt.CtxSize = None,
    rope_scaling: opt.RopeScaling = None,
    rope_scale: opt.RopeScale = None,
    yarn_orig_ctx: opt.YarnOrigCtx = None,
    yarn_attn_factor: opt.YarnAttnFactor = None,
    yarn_beta_fast: opt.YarnBetaFast = None,
    yarn_beta_slow: opt.YarnBetaSlow = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    quiet: opt.Quiet = False,
) -> None:
    """Train gates for MODEL on texts (self-distillation), writing a gate file.

    Windows longer than the model's native context are read with the RoPE scaling that
    ``seer generate`` would use (``--ctx-size``, ``--rope-scaling``, …), recorded in the file.
    """
    _check_flags(out, steps, batch_size, seq_len, lr, val_fraction, overwrite, resume)
    if local_blocks < 0:
        raise SeerError(f"--local-blocks must be 0 or more, got {local_blocks}.")
    from ..measure.harvest import TARGETS, Harvester

    if target not in TARGETS:
        raise SeerError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}.")
    context_settings = opt.context_settings(
        ctx_size, rope_scaling, rope_scale, yarn_orig_ctx, yarn_attn_factor, yarn_beta_fast,
        yarn_beta_slow,
    )  # fmt: skip
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from seer_gates import GateConfig, build_gates, save_gates
    from seer_gates.distill import Distiller, evaluate

    from ..engine.context import ModelContext, scaling_fields
    from ..engine.data import token_windows
    from ..engine.identity import model_identity
    from ..engine.models import load_model, resolve_model
    from ..engine.runtime import model_shape, pick_device, pick_dtype
    from ..progress import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    torch_device = pick_device(device)
    source = resolve_model(model)
    loaded, tokenizer = load_model(source, torch_device, pick_dtype(dtype, torch_device))
    context = ModelContext(loaded, source.name, context_settings)
    if seq_len > context.size:
        raise SeerError(
            f"--seq-len {seq_len} is longer than the context of {source.name} ({context.size} "
            "tokens); pass --ctx-size to extend it."
        )
    scaling = context.apply(seq_len)
    config = GateConfig(
        base_model=source.name, hidden_size=hidden_size, **model_shape(loaded.config)
    )
    windows, summary = token_windows(tokenizer, data, seq_len, max_windows, seed)

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        console=stderr, transient=True, disable=quiet,
    )  # fmt: skip
    with progress:
        task = progress.add_task("harvest", total=len(windows), info="")
        harvested = []
        harvest_started = time.perf_counter()
        with Harvester(loaded, hidden_size, target) as harvester:
            for ids in windows:
                harvested.append(harvester.window(ids[None]))
                progress.advance(task)
        harvest_minutes = round((time.perf_counter() - harvest_started) / 60, 2)
        identity = model_identity(loaded)  # the model itself is not needed for training
        del loaded
        held_out = max(1, round(len(harvested) * val_fraction))
        train, val = harvested[held_out:], harvested[:held_out]

        torch.manual_seed(seed)
        gates = build_gates(config).to(torch_device)
        distiller = Distiller(
            gates, steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, seed=seed,
            local_blocks=local_blocks,
        )  # fmt: skip
        checkpoint = out.with_name(out.name + ".ckpt")
        if resume:
            if not checkpoint.is_file():
                raise SeerError(f"--resume: no checkpoint at {checkpoint}.")
            distiller.load_state_dict(
                torch.load(checkpoint, map_location=torch_device, weights_only=True)
            )
        task = progress.add_task("train", total=steps, completed=distiller.step, info="")
        while distiller.step < steps:
            loss = distiller.train_step(train, torch_device)
            progress.update(task, completed=distiller.step, info=f"loss {loss:.4f}")
            if distiller.step % checkpoint_every == 0 or distiller.step == steps:
                _atomic_torch_save(distiller.state_dict(), checkpoint)

    validation = evaluate(gates, val, 0.9, torch_device, local_blocks)
    metrics = {f"val_{k}": v for k, v in validation.items()}
    config.metadata = {
        "seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "seed": seed, "local_blocks": local_blocks, "target": target,
        "device": str(torch_device),
        "train_windows": len(train), "val_windows": len(val), **summary, **metrics,
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "harvest_minutes": harvest_minutes, "peak_memory_gb": _peak_memory_gb(torch_device),
        "n_ctx_train": context.native, **scaling_fields(scaling),
        "model_identity": identity,
    }  # fmt: skip
    # float16 halves the file; gates load back as float32.
    save_gates(out, gates.cpu().half(), config)
    checkpoint.unlink(missing_ok=True)
    if not quiet:
        stderr.print(
            f"Wrote {out}: validation loss {metrics['val_loss']:.4f}, recall at sparsity 0.9 "
            f"{metrics['val_recall']:.3f} (oracle {metrics['val_oracle_recall']:.3f}), "
            f"{config.metadata['minutes']} min"
        )
    summary_out = {k: v for k, v in config.metadata.items() if k != "model_identity"}
    write_product(json.dumps({"out": str(out), **summary_out}) + "\n")


def _check_flags(
    out: Path, steps, batch_size, seq_len, lr, val_fraction, overwrite, resume
) -> None:
    if steps < 1 or batch_size < 1:
        raise SeerError("--steps and --batch-size must be at least 1.")
    if seq_len < 128:
        raise SeerError(f"--seq-len must be at least 128 tokens, got {seq_len}.")
    if not (lr > 0):
        raise SeerError(f"--lr must be positive, got {lr}.")
    if not (0 < val_fraction < 1):
        raise SeerError(f"--val-fraction must be in (0, 1), got {val_fraction}.")
    if out.exists() and not (overwrite or resume):
        raise SeerError(f"{out} already exists; pass --overwrite to replace it.")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise SeerError(f"cannot write {out}: {out.parent} is not a writable folder.")


def _peak_memory_gb(device) -> float | None:
    """Peak GPU memory of the run (harvest and training), None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def _atomic_torch_save(state: dict, path: Path) -> None:
    import torch

    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
