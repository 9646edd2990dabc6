"""The Python API of seer: load a model with its gates, build prompts, prefill and generate.

    from seer_cli.engine import Engine, EngineOptions, SamplingOptions

    engine = Engine.load(EngineOptions(sparsity=0.9))
    prompt = engine.prompt(document=text, instruction="Summarise this.")
    result = engine.generate(prompt.ids, SamplingOptions(max_tokens=100), on_text=print)

This package imports neither typer nor rich. Names are resolved on first use, so that importing
``seer_cli.engine.errors`` (as the command-line shell does at start-up) does not load torch.
"""

import importlib

_PUBLIC = {
    "Engine": "runtime",
    "EngineOptions": "runtime",
    "GenerationResult": "generation",
    "GenerationStats": "generation",
    "SamplingOptions": "generation",
    "SeerError": "errors",
    "build_prompt": "prompt",
    "read_document": "prompt",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
