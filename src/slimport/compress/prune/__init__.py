"""One-shot pruning on the block-by-block pipeline: masks, SparseGPT, the pruning handlers.
Light on purpose (no torch): the command line imports these names."""

from slimport.compress.modifiers import MODIFIERS

PRUNE_METHODS = tuple(sorted(n for n, c in MODIFIERS.items() if c.prunes))
QUANT_METHODS = ("gptq", "rtn")  # what quantizes the kept weights (`--bits`)
REPORT = "prune_report.json"  # written beside the weights; `inspect` then counts the zeros
STRUCTURES = ("heads", "ffn")  # structured pruning: what it removes whole
UNITS = ("head", "group")  # GQA heads: query heads in every KV group alike, or whole KV groups
