"""Quantized models as `compressed-tensors` checkpoints (the format vLLM and transformers load).

Layout of one quantized Linear `P` (what `linear_tensors` returns):

  weight-only ("pack-quantized")   P.weight_packed  int32 [out, ceil(in*bits/32)]  dense bit packing
                                   P.weight_shape   int64 [2]
  with activations ("int-quantized") P.weight       int8  [out, in]
  always                           P.weight_scale   [out, groups] | [out, 1] | [1]
  asymmetric weights               P.weight_zero_point  int8, or for pack-quantized channel/group
                                                    int32 packed along the output dimension
  static activations               P.input_scale [1] (+ P.input_zero_point when asymmetric)
  dynamic activations              nothing: per-token scales are computed at run time

Packing uses the library's own `pack_to_int32` on the integers we hold (no re-rounding), so the
checkpoint holds exactly our integers. `config.json` carries the library's pydantic
QuantizationConfig dump; `slimport_quantization.json` beside it keeps our full recipe.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.compress.quant.modules import QuantLinear
from slimport.compress.quant.primitives import check_scale
from slimport.compress.skeleton import linearize
from slimport.errors import SlimportError, name_list
from slimport.io import pruned_heads, safetensors
from slimport.io.compressed import (
    INT,
    PACKED,
    PACKED_ZP,
    ct_quantization,
    read_config,
    read_linear,
    schemes_from,
    weight_args,
)
from slimport.io.hf import model_for_config, set_module

RECIPE_FILE = "slimport_quantization.json"

# Our observers -> the names llm-compressor gives the same calibration (informational only:
# loaders never read `observer`). min_max keeps the true running extremes = static_minmax;
# ema_min_max is llm-compressor's moving-average minmax.
_ACT_OBSERVERS = {"min_max": "static_minmax", "ema_min_max": "minmax", "mse": "mse"}
_WEIGHT_OBSERVERS = {"min_max": "minmax", "mse": "mse"}


# ---------------------------------------------------------------- config


def checkpoint_format(qconfig: QuantizationConfig) -> str:
    """pack-quantized for weight-only (any of 3/4/8 bits: the library packs 1..8 bits densely),
    int-quantized (plain int8 weights) when inputs are quantized too: what llm-compressor picks."""
    return INT if qconfig.inputs is not None else PACKED


def _args(a: QuantArgs, observer: str | None = None, options: dict | None = None):
    q = ct_quantization()
    kw = {}
    if observer is not None:
        kw["observer"] = observer
    if options:
        kw["observer_kwargs"] = dict(options)
    return q.QuantizationArgs(
        num_bits=a.bits,
        type="int",
        symmetric=a.symmetric,
        strategy=a.granularity,
        group_size=a.group_size if a.granularity == "group" else None,
        dynamic=a.dynamic,
        **kw,
    )


def scheme(
    qconfig: QuantizationConfig, weights: QuantArgs | None = None, targets: list[str] | None = None
):
    """The library's QuantizationScheme of the recipe's Linears (`targets`, default all), with
    the recipe's weight scheme or `weights` (a per-module override's)."""
    q = ct_quantization()
    _check_supported(qconfig)
    w_obs = _WEIGHT_OBSERVERS.get(qconfig.weight_observer, qconfig.weight_observer)
    inputs = None
    if qconfig.inputs is not None:
        if qconfig.inputs.dynamic:
            inputs = _args(qconfig.inputs)
        else:
            options = dict(qconfig.observer_options)
            if qconfig.observer == "ema_min_max":
                options = {"averaging_constant": 1 - float(options.pop("decay", 0.9)), **options}
            obs = _ACT_OBSERVERS.get(qconfig.observer, qconfig.observer)
            inputs = _args(qconfig.inputs, obs, options)
    return q.QuantizationScheme(
        targets=targets or ["Linear"],
        weights=_args(weights or qconfig.weights, w_obs),
        input_activations=inputs,
        format=checkpoint_format(qconfig),
    )


def quantization_config(
    qconfig: QuantizationConfig,
    ignore: list[str],
    sparsity: dict | None = None,
    quantized: list[str] = (),
) -> dict:
    """The `quantization_config` block of config.json (as llm-compressor writes it). A pruned
    model's `sparsity` (pipeline.sparsity_config) becomes the library's dense sparsity config:
    the zeros are stored in the integers themselves (see io.compressed, SPARSE_FORMATS). The
    `quantized` modules with an override scheme get a group each scheme, targeting them by
    name (the library prefers an exact name to the "Linear" class target)."""
    import compressed_tensors

    q = ct_quantization()
    mixed: dict[QuantArgs, list[str]] = {}
    for name in quantized:
        w = qconfig.weights_for(name)
        if w != qconfig.weights:
            mixed.setdefault(w, []).append(name)
    groups = {"group_0": scheme(qconfig)}
    for i, (w, names) in enumerate(mixed.items(), 1):
        groups[f"group_{i}"] = scheme(qconfig, w, sorted(names))
    cfg = q.QuantizationConfig(
        config_groups=groups,
        format=checkpoint_format(qconfig),
        quantization_status="compressed",
        ignore=sorted(ignore),
    )
    block = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {} if sparsity is None else _sparsity_block(sparsity),
        "transform_config": {},
        **cfg.model_dump(exclude={"quant_method"}),
    }
    if packed_zero_points(qconfig):
        block["dequantize"] = True
    return block


def packed_zero_points(qconfig: QuantizationConfig) -> bool:
    """Whether the folder holds packed zero points, which transformers cannot load compressed.

    transformers' (5.24) compressed load path builds its modules with compressed-tensors' (0.20)
    meta-device `compress_model`, which leaves weight_zero_point unpacked ([out, groups]) while
    the checkpoint holds it packed ([out*bits/32, groups] int32, as the library's own compressor
    writes it and vLLM reads it): the load fails on the size mismatch (llm-compressor issue
    #1618). So such folders carry `"dequantize": true`: transformers then decompresses tensor by
    tensor at load, dense float from the start; vLLM ignores this transformers-only key."""
    w = qconfig.weights
    return checkpoint_format(qconfig) == PACKED and not w.symmetric and w.granularity in PACKED_ZP


def consumers(qconfig: QuantizationConfig) -> list[str]:
    """What each consumer does with the folder, for `slimport quantize` to say (the memory
    measured by benchmarks/transformers_rss.py)."""
    if packed_zero_points(qconfig):
        hf = ("transformers from_pretrained: dequantizes it to dense float at load (config "
              '"dequantize": true; its compressed path cannot take packed zero points), so it '
              "takes the float model's memory; quantize with --symmetric to load it packed")  # fmt: skip
    else:
        hf = ("transformers from_pretrained: loads it packed, and compressed-tensors decompresses "
              "the whole model to dense float on its first forward pass")  # fmt: skip
    return [
        "slimport.load_quantized (torch) and MindSpore: compute with the packed integers",
        hf,
        "vLLM: serves the integers with its compressed-tensors kernels (a GPU)",
    ]


def _sparsity_block(sparsity: dict) -> dict:
    from compressed_tensors.config import DenseSparsityConfig

    return DenseSparsityConfig(
        global_sparsity=sparsity["global_sparsity"],
        sparsity_structure=sparsity["structure"],
        targets=sparsity["targets"],
    ).model_dump()


def _check_supported(qconfig: QuantizationConfig) -> None:
    if qconfig.bits == 16:
        raise SlimportError(
            "a 16-bit cast is not a compressed-tensors checkpoint",
            hint="save it as an ordinary Hugging Face folder",
        )


# ---------------------------------------------------------------- tensors


def linear_tensors(
    prefix: str, m: QuantLinear, qconfig: QuantizationConfig
) -> dict[str, torch.Tensor]:
    """Checkpoint entries of one quantized Linear, named `{prefix}.weight_packed` etc."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    _check_supported(qconfig)
    w, a = qconfig.weights_for(prefix), qconfig.inputs
    if m.weight_args != w or m.input_args != a:
        raise SlimportError(
            f"{prefix}: quantized as {m.extra_repr()}, but the recipe says w{w.bits} "
            f"{w.granularity} ({'sym' if w.symmetric else 'asym'}), activations {qconfig.activations}",
            hint="a checkpoint holds one scheme per Linear: the recipe's, or the module's override",
        )
    q = m.qweight.to(torch.int8)
    out: dict[str, torch.Tensor] = {}
    if checkpoint_format(qconfig) == PACKED:
        out["weight_packed"] = pack_to_int32(q, w.bits)
        out["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
    else:
        out["weight"] = q.contiguous()
    out["weight_scale"] = m.weight_scale.float().contiguous()
    check_scale(f"{prefix}.weight", out["weight_scale"])  # never stored: loaders would get NaN
    if not w.symmetric:
        zp = m.weight_zero_point.to(torch.int8)
        if checkpoint_format(qconfig) == PACKED and w.granularity in PACKED_ZP:
            zp = pack_to_int32(zp, w.bits, packed_dim=0)
        out["weight_zero_point"] = zp.contiguous()
    if a is not None and not a.dynamic:
        if m.input_scale is None:
            raise SlimportError(
                f"{prefix}: static activation quantization but no input scale was calibrated",
                hint="run calibration before saving",
            )
        out["input_scale"] = m.input_scale.float().reshape(1)
        check_scale(f"{prefix} input", out["input_scale"])
        if not a.symmetric:
            out["input_zero_point"] = m.input_zero_point.to(torch.int8).reshape(1)
    if m.bias is not None:
        out["bias"] = m.bias.detach().contiguous()
    return {f"{prefix}.{k}": v for k, v in out.items()}


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


# ---------------------------------------------------------------- loading (reading: io.compressed)


def _recipe(folder: Path, ct, s) -> QuantizationConfig:
    """Our recipe: slimport_quantization.json when present (it must agree), else derived."""
    w, a = s.weights, s.input_activations
    derived = {
        "bits": w.num_bits,
        "granularity": w.strategy,
        "group_size": w.group_size if w.strategy == "group" else None,
        "symmetric": w.symmetric,
        "activations": None if a is None else ("dynamic" if a.dynamic else "static"),
        "act_symmetric": None if a is None or a.symmetric == w.symmetric else a.symmetric,
    }
    path = folder / RECIPE_FILE
    if path.is_file():
        try:
            qconfig = QuantizationConfig.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise SlimportError(f"{path}: cannot read ({e})") from None
        ours = {k: getattr(qconfig, k) for k in derived}
        inputs = qconfig.inputs
        ours["act_symmetric"] = (
            None if inputs is None or inputs.symmetric == qconfig.symmetric else inputs.symmetric
        )
        if ours != derived:
            raise SlimportError(
                f"{path} disagrees with config.json's quantization_config: {ours} vs {derived}",
                hint=f"delete {RECIPE_FILE} to load by config.json alone",
            )
        return qconfig
    protect = [
        "^(?:" + n.removeprefix("re:") + ")" if n.startswith("re:") else "^" + re.escape(n) + "$"
        for n in ct.ignore or []
    ]
    # 3-bit recipes need GPTQ; the method no longer matters once the integers exist
    return QuantizationConfig(
        method="gptq" if w.num_bits == 3 else "rtn", protect=protect, **derived
    )


def _build_model(folder: Path, config: dict) -> nn.Module:
    from transformers.initialization import no_init_weights

    cls, hf_config = model_for_config(folder, config)
    with no_init_weights():  # every tensor is read from the checkpoint below
        model = pruned_heads.apply(cls(hf_config), pruned_heads.pruned_heads(hf_config))
    model.tie_weights()  # init_weights, skipped above, is what ties lm_head to the embeddings
    return model


def load_simulated(path: str | Path) -> tuple[nn.Module, QuantizationConfig]:
    """A compressed-tensors folder -> (transformers model with QuantLinear modules, recipe).

    The simulated reference: the integers, scales and zero points are the checkpoint's exactly,
    so the model computes what the saved model computed, but each QuantLinear also keeps a float
    copy of its weight. To run a quantized model small, use `slimport.load_quantized`. Eval mode.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SlimportError(f"{folder}: model folder not found")
    config = read_config(folder)
    ct, schemes = schemes_from(folder / "config.json", config["quantization_config"])
    if len(ct.config_groups) != 1:  # the recipe below is one scheme for every Linear
        raise SlimportError(
            f"{folder}: the simulated reference reads one scheme, this folder has "
            f"{len(ct.config_groups)} config groups ({schemes})",
            hint="load per-module schemes with slimport.load_quantized or the MindSpore runtime",
        )
    (s,) = ct.config_groups.values()
    fmt = schemes.groups[0][1].format
    qconfig = _recipe(folder, ct, s)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if not (index.is_file() or single.is_file()):
        raise SlimportError(f"{folder}: no model.safetensors (or shard index)")
    ckpt = safetensors.read(index if index.is_file() else single)
    try:
        model = _build_model(folder, config)
        # GPT-2's Conv1D layers were quantized as the Linears they compute (skeleton.linearize)
        scaled = {
            n.removesuffix(".weight_scale") for n in ckpt.infos if n.endswith(".weight_scale")
        }
        linearize(model, scaled)
        _load_into(model, ckpt, ct, s, fmt, qconfig)
    finally:
        ckpt.close()
    return model.eval(), qconfig


def _load_into(model: nn.Module, ckpt, ct, s, fmt: str, qconfig: QuantizationConfig) -> None:
    """Replace the targeted Linears by QuantLinears holding the checkpoint's integers, then
    load every other tensor; each checkpoint tensor is used exactly once."""
    from compressed_tensors.utils.match import match_named_modules

    wargs, iargs = qconfig.weights, qconfig.inputs

    def take(name: str, what: str) -> torch.Tensor:
        if name not in ckpt.infos:
            raise SlimportError(
                f"{ckpt.path}: tensor {name!r} is missing ({what})",
                hint="the checkpoint is incomplete or was written with a different scheme",
            )
        consumed.add(name)
        return ckpt.load(name)

    consumed: set[str] = set()
    targets = [
        (n, m)
        for n, m in match_named_modules(model, s.targets, ct.ignore)
        if isinstance(m, nn.Linear)
    ]
    if not targets:
        raise SlimportError(
            f"{ckpt.path}: quantization_config matches no Linear module of {type(model).__name__}"
        )
    for name, lin in targets:
        out_f, in_f = lin.weight.shape
        q, scale, zero = read_linear(ckpt, name, (out_f, in_f), weight_args(s), fmt, take)
        bias = None
        if lin.bias is not None:
            bias = take(f"{name}.bias", "bias")
        m = QuantLinear(q, scale, zero, bias, wargs, iargs)
        if iargs is not None and not iargs.dynamic:
            iscale = take(f"{name}.input_scale", "static input scale")
            izero = (
                torch.zeros(1)
                if iargs.symmetric
                else take(f"{name}.input_zero_point", "input zero point")
            )
            m.set_input_qparams(iscale, izero)
        set_module(model, name, m)

    quantized = {n for n, _ in targets}
    rest = {}
    for name in ckpt.infos:
        if name in consumed:
            continue
        if name.rpartition(".")[0] in quantized:
            raise SlimportError(f"{ckpt.path}: unexpected tensor {name!r} for the {fmt} scheme")
        rest[name] = ckpt.load(name)
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in quantized}
    unexpected = sorted(set(rest) - expected)
    if unexpected:
        raise SlimportError(
            f"{ckpt.path}: tensors the model does not have: {name_list(unexpected)}"
        )
    try:
        model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # shape mismatches, listed by torch
        raise SlimportError(
            f"{ckpt.path}: tensors do not fit {type(model).__name__}: {e}"
        ) from None
    missing = expected - set(rest)
    # a missing tensor is fine only when tied to one that was loaded (lm_head <- embed_tokens)
    state = model.state_dict()
    loaded_storage = {_storage_key(state[k]) for k in rest}
    really_missing = sorted(k for k in missing if _storage_key(state[k]) not in loaded_storage)
    if really_missing:
        raise SlimportError(
            f"{ckpt.path}: tensor(s) missing from the checkpoint: {name_list(really_missing)}"
        )
