"""Measurement on top of the engine: accuracy (``seer eval``), speed (``seer profile``), the
distillation harvest, and the tables they print."""
