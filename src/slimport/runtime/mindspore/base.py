"""What every slimport MindSpore model shares: strict loading from any checkpoint, saving,
transformers-style outputs.

Loading goes through the conversion engine: the checkpoint is read (any format) into hub
tensors, laid out in the `mindspore` dialect (the parameter names our Cells use), and loaded
with `load_param_into_net(strict_load=True)`; a name or shape the Cell does not expect is an
error listing the names, never a suffix match or a silent skip.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import mindspore as ms
import numpy as np
from mindspore import nn
from tqdm import tqdm

from slimport.compress import api as quant_api
from slimport.convert import engine, loader
from slimport.errors import SlimportError, name_list
from slimport.io.base import atomic_dir
from slimport.io.mindspore_ckpt import write
from slimport.runtime.mindspore import hf_kwargs
from slimport.runtime.mindspore.bridge import _torch_dtype, from_ms, to_ms
from slimport.runtime.mindspore.quantized import (
    DEQUANTIZE_MODES,
    EMBEDDINGS,
    hold_integer_embedding,
    hold_integer_linears,
)

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_FORMAT_FLAGS = {
    "from_pt": ("safetensors", "pytorch", "onnx"),
    "from_tf": ("keras",),
    "from_gguf": ("gguf",),
}


class ModelOutput(dict):
    """transformers-style output: attributes and keys (`out.logits`, `out["logits"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclass
class LoadReport:
    """How a model was loaded: source, mapping, overrides and what they cost."""

    source: str
    source_format: str
    source_dialect: str
    tensors: list[dict] = field(default_factory=list)  # target, sources, ops, shape, dtype
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)


class PreTrainedCell(nn.Cell):
    """Base of slimport's MindSpore models.

    Subclasses set `family` (name of the slimport family), `architectures` (the transformers
    class names they implement) and `output_names` (names of the tuple `construct` returns,
    which `__call__` wraps into a ModelOutput; graph mode needs plain tuples inside).
    """

    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    output_names: ClassVar[tuple[str, ...]]

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.load_report: LoadReport | None = None

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if not isinstance(out, tuple):
            out = (out,)
        return ModelOutput(zip(self.output_names, out, strict=False))

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        from_pt: bool | None = None,
        from_tf: bool | None = None,
        from_gguf: bool | None = None,
        layer_norm_eps: float | None = None,
        ignore_mismatched_sizes: bool = False,
        custom_layer_mapping: dict[str, str] | str | Path | None = None,
        dtype: str | ms.Type = "float32",
        config: str | Path | None = None,
        quantization_config: Any = None,
        calib_data: str | Path | None = None,
        dequantize: str = "per_call",
        embeddings: str | None = None,
        **config_kwargs: Any,
    ) -> PreTrainedCell:
        """Load any checkpoint slimport reads; the source format is detected unless a flag says it.

        `config_kwargs` override config attributes, as in transformers (`num_labels=3` sizes a
        new classifier on a bare encoder checkpoint). `quantization_config` (a
        QuantizationConfig, a recipe dict or a YAML recipe path) quantizes the checkpoint first,
        as `slimport quantize` does (on `calib_data` when the recipe calibrates), and loads the
        quantized weights; its report is `model.quantization_report`. A compressed-tensors folder
        loads with integer-held weights (QuantDense): `dequantize="per_call"` keeps only the
        integers (the memory saving), `"at_load"` float weights (fastest on CPU); quantized
        inputs (W8A8) are computed as torch's QuantLinear does. `embeddings="int8"` holds the
        token embedding as int8 with a scale per row (as the torch runtime's option does; a
        tied LM head computes on the same integers).

        `path` may be a `slimport models` name or a Hub id (`revision=` picks its revision);
        transformers' keywords are translated (`torch_dtype`) or named in a warning
        (`device_map`, `trust_remote_code`); any other keyword must be a config attribute."""
        path, dtype, config_kwargs = hf_kwargs.translate(
            path, dtype, quantization_config, config_kwargs
        )
        if embeddings not in (None, *EMBEDDINGS):
            raise SlimportError(
                f"embeddings={embeddings!r}", hint="None (as stored) or " + ", ".join(EMBEDDINGS)
            )
        if dequantize not in DEQUANTIZE_MODES:
            raise SlimportError(
                f"dequantize={dequantize!r}", hint="one of: " + ", ".join(DEQUANTIZE_MODES)
            )
        if quantization_config is not None:
            return cls._from_quantized(
                path, quantization_config, config, calib_data, dict(
                    from_pt=from_pt, from_tf=from_tf, from_gguf=from_gguf,
                    layer_norm_eps=layer_norm_eps, ignore_mismatched_sizes=ignore_mismatched_sizes,
                    custom_layer_mapping=custom_layer_mapping, dtype=dtype, dequantize=dequantize,
                    embeddings=embeddings, **config_kwargs,
                ),
            )  # fmt: skip
        if calib_data is not None:
            raise SlimportError(
                "calib_data without quantization_config: there is nothing to calibrate",
                hint="pass quantization_config=... too, or drop calib_data",
            )
        model = loader.load(
            path,
            config=config,
            mapping=custom_layer_mapping,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            integer_linears=True,
        )
        try:
            _check_format_flags(model, from_pt=from_pt, from_tf=from_tf, from_gguf=from_gguf)
            if model.family.name != cls.family:
                raise SlimportError(
                    f"{model.source.path}: a {model.family.name} checkpoint "
                    f"(model_type={model.cfg['model_type']!r}) cannot load into {cls.__name__}, "
                    f"which is a {cls.family} model",
                    hint="use the Auto class, or the model class of that family",
                )
            cfg = dict(model.cfg)
            hf_kwargs.check_config_kwargs(config_kwargs, {**model.config, **cfg}, str(path))
            cfg.update(config_kwargs)
            if (
                "num_labels" in config_kwargs
                and len(cfg.get("id2label") or ()) != cfg["num_labels"]
            ):
                cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg["num_labels"])}
                cfg["label2id"] = {f"LABEL_{i}": i for i in range(cfg["num_labels"])}
            overrides = {}
            if layer_norm_eps is not None:
                key = cls.eps_key(cfg)
                if cfg.get(key) != layer_norm_eps:
                    overrides[key] = {"source": cfg.get(key), "forced": layer_norm_eps}
                    cfg[key] = layer_norm_eps
            cell = cls(cfg)
            ms_dtype = _ms_dtype(dtype)
            report = cell._load_hub(model, ms_dtype, ignore_mismatched_sizes, dequantize)
            if embeddings is not None:
                report.notes.append(hold_integer_embedding(cell, embeddings))
            for key, o in overrides.items():
                o["effect_max_abs"] = cell._override_effect(model, key, o["source"], ms_dtype)
                warnings.warn(
                    f"{key} forced to {o['forced']} (checkpoint config: {o['source']}): "
                    f"changes {cell.output_names[0]} by up to {o['effect_max_abs']:.3g} on a probe input",
                    stacklevel=2,
                )
            report.overrides = overrides
            cell.load_report = report
            return cell
        finally:
            model.source.close()

    @classmethod
    def _from_quantized(cls, path, recipe, config, calib_data, kwargs: dict) -> PreTrainedCell:
        recipe = quant_api.make_config(
            recipe, **({"calib_data": str(calib_data)} if calib_data else {})
        )
        if recipe.needs_calibration and not recipe.calib_data:
            raise SlimportError(
                "this quantization_config calibrates on data (static activations, SmoothQuant, "
                "GPTQ or AWQ), and no calib_data was given",
                hint="pass calib_data=PATH (.txt, .tsv or .jsonl of task text, never the test "
                "split) to from_pretrained",
            )
        source = loader.load(path, config=config)
        try:
            flags = {k: kwargs.pop(k) for k in ("from_pt", "from_tf", "from_gguf")}
            _check_format_flags(source, **flags)
            if "dequantized_from" in source.source.metadata:
                raise SlimportError(
                    f"{path}: already quantized ({source.source.metadata['dequantized_from']})",
                    hint="load it without quantization_config",
                )
        finally:
            source.source.close()
        with tempfile.TemporaryDirectory(prefix="slimport-quantized-") as tmp:
            out = Path(tmp) / "model"
            report = quant_api.quantize(path, out, recipe=recipe, progress=False)
            cell = cls.from_pretrained(out, **kwargs)
        cell.quantization_report = report
        return cell

    @classmethod
    def eps_key(cls, cfg: dict) -> str:
        return (
            "rms_norm_eps"
            if "rms_norm_eps" in cfg
            else "layer_norm_eps"
            if "layer_norm_eps" in cfg
            else "layer_norm_epsilon"
        )

    def _load_hub(
        self,
        model: loader.Model,
        ms_dtype,
        ignore_mismatched_sizes: bool = False,
        dequantize: str = "per_call",
    ) -> LoadReport:
        planned = self.plan_parameters(model)
        expected = {p.name: p for p in self.get_parameters()}
        mismatched = {
            t.name
            for t in planned
            if t.name in expected and tuple(t.shape) != tuple(expected[t.name].shape)
        }
        shape_bad = [
            f"{t.name}: checkpoint {list(t.shape)} vs model {list(expected[t.name].shape)}"
            for t in planned
            if t.name in mismatched
        ]
        if ignore_mismatched_sizes:  # like transformers: keep the model's shape, initialise afresh
            planned = [t for t in planned if t.name not in mismatched]
        elif shape_bad:
            raise SlimportError(
                f"{model.source.path}: {len(shape_bad)} shape mismatch(es) with {type(self).__name__}: "
                + "; ".join(shape_bad[:6]),
                hint="the config does not describe this checkpoint",
            )
        held, held_notes = set(), []
        if model.source.quantized:
            planned, held, held_notes = hold_integer_linears(self, model, planned, dequantize)
        params = {}
        # a progress bar on a terminal (disable=None): SmolLM2's 272 tensors take seconds
        for t in tqdm(
            planned, desc="loading into MindSpore", unit="tensor", disable=None, leave=False
        ):
            value = t.compute()
            # load in float32 (what the Cell's parameters are), cast after: lossless for f16/bf16
            params[t.name] = ms.Parameter(to_ms(value, ms.float32), name=t.name)
        # the integer parameters are already set (hold_integer_linears): pass them as they are,
        # so that MindSpore's not-loaded list (and its warning, every name) holds only real gaps
        params |= {p.name: p for p in self.get_parameters() if p.name in held}
        not_loaded, unused = ms.load_param_into_net(self, params, strict_load=True)
        new = self.newly_initialized(model) | mismatched
        fresh = sorted(n for n in not_loaded if n in new)
        not_loaded = [
            n for n in not_loaded if not self.is_buffer(n) and n not in new and n not in held
        ]
        if not_loaded or unused:
            raise SlimportError(
                f"{model.source.path}: strict loading into {type(self).__name__} failed: "
                + (
                    f"model parameters with no tensor: {name_list(not_loaded)}. "
                    if not_loaded
                    else ""
                )
                + (f"tensors with no model parameter: {name_list(unused)}." if unused else ""),
                hint="the checkpoint and the model class disagree; check the architecture",
            )
        if ms_dtype != ms.float32:
            for p in self.get_parameters():
                if p.dtype == ms.float32 and p.name not in held:  # scales stay float32
                    p.set_dtype(ms_dtype)
            self.to_float(ms_dtype)
        notes = list(model.notes) + held_notes
        if mismatched and ignore_mismatched_sizes:
            notes.append(
                "re-initialised, shape differs from the checkpoint: " + "; ".join(shape_bad)
            )
            fresh = [n for n in fresh if n not in mismatched]
            warnings.warn(
                f"{type(self).__name__}: ignore_mismatched_sizes re-initialised {name_list(mismatched)} "
                "(checkpoint shape differs); train them before use",
                stacklevel=3,
            )
        if fresh:
            notes.append(f"newly initialised (not in the checkpoint): {name_list(fresh)}")
            warnings.warn(
                f"{type(self).__name__}: {name_list(fresh)} are not in {model.source.path} and are "
                "newly initialised; train them before use",
                stacklevel=3,
            )
        return LoadReport(
            str(model.source.path),
            model.source.format,
            model.dialect,
            [
                {
                    "target": t.name,
                    "sources": list(t.sources),
                    "ops": list(t.ops),
                    "shape": list(t.shape),
                    "dtype": str(ms_dtype),
                }
                for t in planned
            ],  # fmt: skip
            model.ignored,
            notes,
        )

    def plan_parameters(self, model: loader.Model) -> list[engine.Planned]:
        """Hub tensors laid out as this Cell's parameters (the `mindspore` dialect)."""
        return engine.from_hub(model.hub, model.family, "mindspore", model.cfg)

    def newly_initialized(self, model: loader.Model) -> set[str]:
        """Parameters the checkpoint may lack (a classifier on a bare encoder, as transformers
        allows): they keep their initialisation and the load report lists them."""
        return set()

    def is_buffer(self, name: str) -> bool:
        """Parameters computed at construction (e.g. RoPE tables), not loaded from checkpoints."""
        return False

    def _override_effect(self, model, key, source_value, ms_dtype) -> float:
        """Max |Δ| of the first output on a probe input between the forced and the source value."""
        probe = self.probe_inputs()
        forced = self(*probe)[self.output_names[0]].asnumpy()
        cfg = dict(self.config)
        cfg[key] = source_value
        twin = type(self)(cfg)
        with warnings.catch_warnings():  # the load itself was reported already
            warnings.simplefilter("ignore")
            twin._load_hub(model, ms_dtype)
        mine = self.parameters_dict()  # the same random new head, so only the override differs
        for name, p in twin.parameters_dict().items():
            if name in self.newly_initialized(model):
                p.set_data(mine[name].copy())
        original = twin(*probe)[self.output_names[0]].asnumpy()
        return float(np.abs(forced.astype(np.float64) - original).max())

    def probe_inputs(self) -> tuple:
        ids = np.arange(1, 9, dtype=np.int32)[None, :] % int(self.config["vocab_size"])
        return (ms.Tensor(ids),)

    # --- saving --------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> list[str]:
        """model.ckpt (MindSpore's format) + config.json, loadable by from_pretrained."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            tensors = [
                engine.Planned(p.name, tuple(p.shape), _torch_dtype(p.dtype), (p.name,), (), (lambda p=p: from_ms(p)))
                for p in self.get_parameters()
                if not self.is_buffer(p.name)
            ]  # fmt: skip
            write(tmp / "model.ckpt", tensors)
            config = {k: v for k, v in self.config.items() if k in self.hf_config_keys()}
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return ["model.ckpt", "config.json"]

    def hf_config_keys(self) -> set[str]:
        """Keys of the normalised config that belong in config.json (not derived ones)."""
        return set(self.config) - DERIVED_KEYS


# normalised-config keys the families derive; never written to config.json
DERIVED_KEYS = {
    "q_dim", "kv_dim", "qkv_bias", "o_bias", "mlp_bias", "base", "architecture", "head",
    "tf_scope", "tf_main", "qkv_size", "add_pooling_layer",
}  # fmt: skip


def _check_format_flags(model: loader.Model, **flags: bool | None) -> None:
    fmt = model.source.format
    for flag, value in flags.items():
        if value and fmt not in _FORMAT_FLAGS[flag]:
            raise SlimportError(
                f"{model.source.path}: {flag}=True but the file is {fmt}",
                hint="drop the flag: the format is detected from the file",
            )


def _ms_dtype(dtype: str | ms.Type) -> ms.Type:
    if isinstance(dtype, str):
        if dtype not in MS_DTYPES:
            raise SlimportError(f"unknown dtype {dtype!r}", hint="one of: " + ", ".join(MS_DTYPES))
        dtype = MS_DTYPES[dtype]
    if dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
        raise SlimportError(
            "dtype=bfloat16: MindSpore's CPU backend has no bfloat16 MatMul",
            hint="use float32 or float16 on CPU; bfloat16 runs on Ascend",
        )
    return dtype
