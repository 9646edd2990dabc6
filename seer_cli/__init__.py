"""seer: long-context LLM inference with SeerAttention block-sparse prefill."""
