"""``seer generate``: one prompt (and optionally a document) in, streamed text out."""

import json
import sys
from typing import Annotated

import typer

from .. import options as opt
from ..console import handle_user_errors, stderr, warn, write_product
from ..engine.errors import SeerError


@handle_user_errors
def generate(
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="Document to read; '-' (or a pipe) means stdin."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="The instruction (with a file: what to do with it)."),
    ] = None,
    system: opt.System = None,
    model: opt.Model = None,
    gates: opt.Gates = "auto",
    sparsity: opt.Sparsity = None,
    sparse_min_tokens: opt.SparseMinTokens = None,
    ubatch_size: opt.UbatchSize = None,
    threshold: opt.Threshold = None,
    local_blocks: opt.LocalBlocks = None,
    budget: opt.Budget = None,
    dense: opt.Dense = False,
    device: opt.Device = "auto",
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    dtype: opt.Dtype = "auto",
    max_tokens: opt.MaxTokens = 256,
    temp: opt.Temperature = 0.0,
    top_p: opt.TopP = 1.0,
    top_k: opt.TopK = 0,
    seed: opt.Seed = None,
    truncate: opt.Truncate = None,
    ctx_size: opt.CtxSize = None,
    rope_scaling: opt.RopeScaling = None,
    rope_scale: opt.RopeScale = None,
    yarn_orig_ctx: opt.YarnOrigCtx = None,
    yarn_attn_factor: opt.YarnAttnFactor = None,
    yarn_beta_fast: opt.YarnBetaFast = None,
    yarn_beta_slow: opt.YarnBetaSlow = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (text and stats), nothing else.")
    ] = False,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the text when it is complete.")
    ] = False,
    quiet: opt.Quiet = False,
) -> None:
    """Generate text from a prompt and/or a document, with sparse prefill."""
    opt.check_generation_flags(
        sparsity=sparsity, threshold=threshold, local_blocks=local_blocks, dense=dense,
        max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, truncate=truncate,
        budget=budget,
    )  # fmt: skip
    context = opt.context_settings(
        ctx_size, rope_scaling, rope_scale, yarn_orig_ctx, yarn_attn_factor, yarn_beta_fast,
        yarn_beta_slow,
    )  # fmt: skip
    document = _read_input(file)
    if document is None and not prompt:
        raise SeerError("nothing to generate from: give --prompt, --file, or text on stdin.")
    if document is not None and document.replaced_invalid_utf8 and not quiet:
        warn(f"{document.source} is not valid UTF-8; undecodable bytes were replaced.")

    from ..engine.generation import SamplingOptions
    from ..engine.runtime import Engine, EngineOptions
    from ..progress import PrefillProgress, print_stats, quiet_libraries

    quiet_libraries()
    engine = Engine.load(
        EngineOptions(model=model, gates=gates, sparsity=sparsity, threshold=threshold,
                      local_blocks=local_blocks, budget=budget, dense=dense, device=device,
                      dtype=dtype, device_map=device_map, sparse_min_tokens=sparse_min_tokens,
                      max_memory=max_memory, ubatch_size=ubatch_size, context=context)
    )  # fmt: skip
    tokens = engine.prompt(
        document=document.text if document else None, instruction=prompt, system=system,
        max_tokens=max_tokens, truncate=truncate,
    )  # fmt: skip
    if tokens.cut_tokens and not quiet:
        warn(
            f"cut {tokens.cut_tokens} tokens from the {truncate} of the document "
            "to fit the context."
        )
    sparse = engine.sparse_prefill
    if sparse is not None and len(tokens.ids) < sparse.min_tokens and not quiet:
        warn(
            f"the prompt ({len(tokens.ids)} tokens) is shorter than {sparse.min_tokens}, where "
            "sparse prefill starts to pay on this device: prefilling densely "
            "(--sparse-min-tokens 0 forces sparse)."
        )
    stream = not (json_output or no_stream)
    progress = PrefillProgress(enabled=not quiet)
    with progress:
        result = engine.generate(
            tokens.ids,
            SamplingOptions(
                max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed
            ),
            on_text=write_product if stream else (lambda text: None),
            on_prefill_layer=progress.layer_started,
            on_first_token=progress.stop,
        )
    result.stats.truncated_tokens = tokens.cut_tokens
    if json_output:
        write_product(
            json.dumps({"model": engine.name, "text": result.text, **result.stats.to_dict()}) + "\n"
        )
    else:
        write_product(("" if stream else result.text) + "\n")
    if not quiet and not json_output:
        print_stats(stderr, result.stats, requested_sparsity=sparsity)
    if result.stats.interrupted:
        raise KeyboardInterrupt


def _read_input(file: str | None):
    from ..engine.prompt import decode_text, read_document

    if file is not None:
        return read_document(file)
    if sys.stdin is not None and not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        return decode_text(data, "<stdin>") if data.strip() else None
    return None
