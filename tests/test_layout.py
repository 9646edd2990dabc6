"""The layers stay layers: the engine is a library that the command-line shell sits on."""

import subprocess
import sys

ENGINE_IMPORTS = """
import importlib, pkgutil, sys
import seer_cli.engine as engine
for module in pkgutil.iter_modules(engine.__path__):
    importlib.import_module(f"seer_cli.engine.{module.name}")
print(sorted(name for name in ("typer", "rich", "click") if name in sys.modules))
"""


def test_engine_imports_neither_typer_nor_rich():
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_IMPORTS], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_engine_public_names_resolve():
    import seer_cli.engine as engine

    for name in engine.__all__:
        assert getattr(engine, name) is not None
