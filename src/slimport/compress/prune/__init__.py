"""One-shot pruning on the block-by-block pipeline: masks, SparseGPT, the pruning handlers."""
