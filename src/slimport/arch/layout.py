"""What compression needs to know about a family, as data: where its blocks are, which layers can
trade scales, which Linears AWQ leaves unclipped, which heads stay float.

One `CompressLayout` per model type. The pipeline reads nothing family-specific from anywhere else:
supporting a family's compression is adding its row here. Names are relative to one block (or,
for heads, to the model); they are transformers module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimport.errors import SlimportError

# the architecture-class suffixes of a causal LM head (LlamaForCausalLM, GPT2LMHeadModel)
CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config: dict) -> bool:
    """Whether a checkpoint's config describes a next-token model (by its architectures)."""
    return any(str(a).endswith(CAUSAL_LM_HEADS) for a in config.get("architectures") or [])


@dataclass(frozen=True)
class CompressLayout:
    """Compression facts of one family.

    blocks     the ModuleList of transformer blocks, as a dotted-name suffix (`layers` matches
               `model.layers`): GPTQModel-style explicit lists, no tracing.
    smoothing  (producer, consumers) pairs inside a block: dividing the producer's output
               channels by s and multiplying the consumers' input columns by s keeps the block's
               function. Only producers whose output feeds nothing but these consumers qualify
               (pre-norm Llama's norms yes; post-norm BERT's LayerNorms, which also feed the
               residual, no; nothing across a GELU).
    no_clip    Linears whose weight AWQ does not clip: q and k (and a fused q|k|v), whose errors
               the softmax amplifies (as AutoAWQ does).
    heads      output heads a default recipe leaves in float: nothing downstream fixes their error.

    Linears that share one input (q/k/v, gate/up) need no table: the pipeline sees them fed the
    very same tensor and GPTQ stacks them on one Hessian.
    """

    blocks: str
    smoothing: tuple[tuple[str, tuple[str, ...]], ...] = ()
    no_clip: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()


LLAMA = CompressLayout(
    blocks="layers",
    smoothing=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),  # skipped under GQA: v narrower than o's input
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),  # SwiGLU's product is linear in up
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    heads=("lm_head", "score"),
)
BERT = CompressLayout(
    blocks="encoder.layer",
    smoothing=(("attention.self.value", ("attention.output.dense",)),),
    no_clip=("attention.self.query", "attention.self.key"),
    heads=("classifier",),
)
GPT2 = CompressLayout(
    blocks="h",
    # not c_attn -> c_proj (only c_attn's v third feeds it) nor c_fc -> c_proj (a GELU between)
    smoothing=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    no_clip=("attn.c_attn",),  # q|k|v in one Conv1D
    heads=("lm_head", "score"),
)
DISTILBERT = CompressLayout(
    blocks="transformer.layer",
    smoothing=(("attention.v_lin", ("attention.out_lin",)),),  # post-norm, like BERT
    no_clip=("attention.q_lin", "attention.k_lin"),
    heads=("classifier", "vocab_projector"),
)

LAYOUTS: dict[str, CompressLayout] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "gpt2": GPT2,
    "distilbert": DISTILBERT,
}


def layout_for(model_type: str | None, where: str = "the checkpoint") -> CompressLayout:
    if model_type not in LAYOUTS:
        raise SlimportError(
            f"{where}: quantizing {model_type!r} models is not supported",
            hint="supported: " + ", ".join(sorted(LAYOUTS)),
        )
    return LAYOUTS[model_type]


def output_heads() -> tuple[str, ...]:
    """Every family's output-head module names (the default `protect` list is built from them)."""
    return tuple(dict.fromkeys(h for lay in LAYOUTS.values() for h in lay.heads))
