"""The names of the block selections ``seer eval`` compares (no heavy imports, so that the
command can check its flags before loading torch)."""

# Where block scores come from. The oracles rank blocks by the true attention: the block-summed
# probabilities ("mass", an upper bound on recall) or the max-pooled map the gates learn from.
ESTIMATORS = ("gates", "oracle-mass", "oracle-maxpool", "pooled", "sink+local")
# The max-pooled oracle would need a dense pass of its own inside every sparse layer.
PERPLEXITY_ESTIMATORS = ("gates", "oracle-mass", "pooled", "sink+local")
# The estimators that may keep a forced local window on top of their scores.
LOCAL_ESTIMATORS = ("gates", "pooled")
