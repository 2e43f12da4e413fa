"""GGUF end to end on the real SmolLM2 GGUF: read, dequantize, convert, write, read back by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimport import api, cli
from slimport.arch import gguf_config, llama
from slimport.errors import SlimportError
from slimport.io import gguf as gguf_io

Q = gguf.GGMLQuantizationType
PROMPTS = [
    "The capital of France is",
    "Hello  world!\n\n 123456 <|im_start|>user\nhi<|im_end|>",
    "héllo wörld 你好 🤗 def f(x):\n\treturn x**2",
]


def write_gguf(path: Path, tensors: dict, arch: str = "llama", meta: dict | None = None) -> Path:
    """A GGUF written by gguf-py itself: tensors are float arrays (F32/F16) or (raw bytes, type)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in (meta or {}).items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_float32(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def k_quant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant bytes (gguf-py cannot quantize K types) with sane fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        raw[:, :4] = scales
    else:  # Q6_K: d ends it
        raw[:, -2:] = scales[:, :2]
    return raw.reshape(rows, -1)


def test_reader_dequantizes_every_listed_type(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gguf_io, "DEQUANT_CHUNK", 700
    )  # 3 rows per call: chunk edges and a remainder
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    quantizable = [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
    tensors = {"t.F32": x, "t.F16": x.astype(np.float16)}
    tensors |= {f"t.{q.name}": (gguf.quants.quantize(x, q), q) for q in quantizable}
    tensors |= {f"t.{q.name}": (k_quant_blocks(q, 8, 256, rng), q) for q in (Q.Q4_K, Q.Q6_K)}
    path = write_gguf(
        tmp_path / "types.gguf", tensors, meta={"llama.attention.layer_norm_rms_epsilon": 1e-5}
    )

    with gguf_io.read(path) as ckpt:
        assert (
            ckpt.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-05
        )  # not 9.99999974e-06
        assert ckpt.metadata["gguf_types"] == {n.split(".")[1]: 1 for n in tensors}
        assert {n: i.shape for n, i in ckpt.infos.items()} == {
            n: (8, 256) for n in tensors
        }  # torch order
        want_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for name, value in tensors.items():
            kind = name.split(".")[1]
            got = ckpt.load(name)
            assert got.dtype == want_dtype.get(kind, torch.float32) == ckpt.infos[name].dtype, name
            raw, qtype = value if isinstance(value, tuple) else (value, Q[kind])
            exact = torch.from_numpy(gguf.quants.dequantize(raw.view(np.uint8), qtype))
            assert torch.equal(got.float(), exact), name  # bit-exact with gguf-py's dequantizer
            if kind in (
                "F32",
                "F16",
                "BF16",
                "Q8_0",
                "Q4_0",
                "Q4_1",
            ):  # and the round trip is close to x
                step = {
                    "F32": 0,
                    "F16": 1e-3,
                    "BF16": 8e-3,
                    "Q8_0": 2e-2,
                    "Q4_0": 0.4,
                    "Q4_1": 0.3,
                }[kind]
                assert (got.float() - torch.from_numpy(x)).abs().max() <= step * np.abs(x).max(), (
                    name
                )
    # K types checked against an independent dequantizer (transformers' torch kernels), when present
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    for q in (Q.Q4_K, Q.Q6_K):
        raw = tensors[f"t.{q.name}"][0]
        ref = dequant.dequantize(torch.from_numpy(raw.copy()), int(q)).reshape(8, 256)
        assert torch.allclose(torch.from_numpy(gguf.quants.dequantize(raw, q)), ref, atol=1e-6)


def test_config_translation_rounds_and_round_trips(smollm2_gguf):
    with gguf_io.read(smollm2_gguf) as ckpt:
        meta = {**ckpt.metadata, "__tensors__": list(ckpt.infos)}
    cfg = gguf_config.config_from_gguf(meta)
    assert cfg["rms_norm_eps"] == 1e-05 and cfg["rope_theta"] == 100000.0
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True  # no output.weight in the file
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["vocab_size"]) == (
        1,
        2,
        2,
        49152,
    )
    back = gguf_config.config_to_gguf(llama.normalize(cfg))
    for key, value in back.items():
        assert meta[key] == value, key
    assert (
        gguf_config.config_from_gguf({**back, "__tensors__": meta["__tensors__"]})
        | {"torch_dtype": "float32"}
        == cfg
    )


# --- SmolLM2: GGUF -> HF, against transformers' own GGUF loading ---------------------------------


@pytest.fixture(scope="module")
def prompt_ids(smollm2_transformers):
    tok = smollm2_transformers.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False
    )
    return torch.tensor([tok(chat + "The capital of France is").input_ids])


def test_gguf_to_hf_matches_transformers(smollm2_hf, smollm2_transformers, prompt_ids):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_hf  # our GGUF -> HF conversion (its speed: benchmarks/gguf_to_hf_speed.py)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ours, ref = model(prompt_ids).logits, smollm2_transformers.model(prompt_ids).logits
    delta = (ours - ref).abs().max().item()
    print(
        f"\nSmolLM2 logits max|d| vs transformers' GGUF load: {delta:.3g} over {prompt_ids.shape[1]} tokens"
    )
    assert delta <= 1e-5
    assert torch.equal(ours[0, -1].argmax(), ref[0, -1].argmax())

    ours_tok, ref_tok = AutoTokenizer.from_pretrained(folder), smollm2_transformers.tokenizer
    for text in PROMPTS:
        assert ours_tok(text).input_ids == ref_tok(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}]
    assert ours_tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(
        chat, tokenize=False
    )
    assert ours_tok.special_tokens_map == ref_tok.special_tokens_map


# --- HF -> GGUF, read back by transformers' GGUF loader ---------------------------------------------


@pytest.fixture(scope="module")
def ours_gguf(smollm2_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-gguf") / "gguf"
    api.convert(smollm2_hf, out, to="gguf", progress=False)
    return out


def test_smollm2_hf_to_gguf_loads_in_transformers(smollm2_hf, ours_gguf, prompt_ids, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with gguf_io.read(ours_gguf / "model.gguf") as ckpt:
        assert ckpt.metadata["gguf_types"] == {"F32": 272}
        assert ckpt.metadata["tokenizer.ggml.model"] == "gpt2"
        with gguf_io.read(
            smollm2_gguf
        ) as src:  # the vocabulary llama.cpp wrote, rebuilt from tokenizer.json
            for key in (
                "tokens",
                "token_type",
                "merges",
                "bos_token_id",
                "eos_token_id",
                "padding_token_id",
            ):
                assert (
                    ckpt.metadata[f"tokenizer.ggml.{key}"] == src.metadata[f"tokenizer.ggml.{key}"]
                ), key
    hf = LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    back = AutoModelForCausalLM.from_pretrained(ours_gguf, gguf_file="model.gguf").eval()
    with torch.no_grad():
        delta = (back(prompt_ids).logits - hf(prompt_ids).logits).abs().max().item()
    print(f"\nSmolLM2 hf -> our gguf -> transformers: logits max|d| {delta:.3g}")
    assert delta <= 1e-5
    tok, ref = (
        AutoTokenizer.from_pretrained(ours_gguf, gguf_file="model.gguf"),
        AutoTokenizer.from_pretrained(smollm2_hf),
    )
    for text in PROMPTS:
        assert tok(text).input_ids == ref(text).input_ids, text


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_random_model_to_gguf_loads_in_transformers(kind, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    if kind == "qwen2":  # q/k/v biases, NEOX RoPE: no row permutation in GGUF
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, num_key_value_heads=2)
        )
    else:  # GQA 4:1, interleaved RoPE rows in GGUF
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, num_key_value_heads=1, rope_theta=500000.0)
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms too, so every tensor is checked
            p.normal_(0, 0.2)
    model.eval().save_pretrained(tmp_path / "hf")
    report = api.convert(tmp_path / "hf", tmp_path / "out", to="gguf", progress=False)
    assert report["files"] == ["model.gguf"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf").eval()
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (back(ids).logits - model(ids).logits).abs().max().item()
    print(f"\nrandom {kind}: hf -> our gguf -> transformers logits max|d| {delta:.3g}")
    assert delta <= 1e-5
    if kind == "qwen2":
        assert back.model.layers[0].self_attn.q_proj.bias is not None


# --- round trips and tensor types ------------------------------------------------------------------


def test_round_trip_gguf_hf_gguf_hf_is_bit_exact(smollm2_hf, ours_gguf):
    again = ours_gguf.parent / "hf2"
    api.convert(ours_gguf, again, to="hf", progress=False)
    a, b = load_file(smollm2_hf / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), (
            name
        )
    first, second = (json.loads((f / "config.json").read_text()) for f in (smollm2_hf, again))
    assert first == second


def test_round_trip_gguf_hf_gguf_keeps_the_gguf_metadata(smollm2_gguf, smollm2_hf, ours_gguf):
    """Every general.* and tokenizer.* key of llama.cpp's file comes back, value and value type
    (license, organization, the `smollm` pre-tokenizer, add_space_prefix), through the HF folder's
    gguf_metadata.json; only the keys that describe the new file's tensors are its own."""
    assert (smollm2_hf / "gguf_metadata.json").is_file()
    own = {"general.file_type", "general.quantization_version"}  # F32 tensors here, Q4_1 there
    with gguf_io.read(smollm2_gguf) as src, gguf_io.read(ours_gguf / "model.gguf") as out:
        keys = [
            k for k in src.metadata if k.startswith(("general.", "tokenizer.")) and k not in own
        ]
        assert {"general.license", "general.organization", "tokenizer.ggml.pre"} <= set(keys)
        for key in keys:
            assert key in out.metadata, key
            assert out.metadata[key] == src.metadata[key], key
            assert out.metadata["gguf_value_types"][key] == src.metadata["gguf_value_types"][key], (
                key
            )
        assert out.metadata["tokenizer.ggml.pre"] == "smollm"
        assert out.metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
        assert "general.quantization_version" not in out.metadata


def test_pre_tokenizer_is_named_by_its_behaviour_on_the_probe_text(smollm2_hf, tmp_path):
    """llama.cpp's method: the hash of the token ids of a probe text names the pre-tokenizer, so
    SmolLM2's tokenizer is `smollm` with no help from its pre_tokenizer's shape; one neither
    the hash nor the shape names is `default`, with a warning."""
    from slimport.io.gguf_tokenizer import _pre_tokenizer_name

    assert _pre_tokenizer_name(smollm2_hf / "tokenizer.json", None) == "smollm"
    tj = json.loads((smollm2_hf / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.warns(UserWarning, match="pre-tokenizer not recognised"):
        assert _pre_tokenizer_name(tmp_path / "tokenizer.json", tj["pre_tokenizer"]) == "default"


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_f16_and_q8_0_writing(gguf_type, smollm2_hf, ours_gguf):
    out = ours_gguf.parent / gguf_type
    api.convert(smollm2_hf, out, to="gguf", options={"gguf_type": gguf_type}, progress=False)
    with gguf_io.read(ours_gguf / "model.gguf") as exact, gguf_io.read(out / "model.gguf") as ckpt:
        two_d = sum(len(i.shape) == 2 for i in ckpt.infos.values())
        assert ckpt.metadata["gguf_types"] == {
            gguf_type.upper(): two_d,
            "F32": len(ckpt.infos) - two_d,
        }
        worst = 0.0
        for name, info in exact.infos.items():
            x, y = exact.load(name), ckpt.load(name)
            if len(info.shape) == 1:  # norms stay F32
                assert y.dtype == torch.float32 and torch.equal(x, y), name
            elif gguf_type == "f16":
                assert y.dtype == torch.float16 and torch.equal(y, x.half()), name
            else:  # Q8_0: half a step of each 32-value block, plus the step's own fp16 rounding
                step = x.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
                err = (y.reshape(-1, 32) - x.reshape(-1, 32)).abs()
                assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
                worst = max(worst, (err / step.clamp_min(1e-12)).max().item())
    if gguf_type == "q8_0":
        print(f"\nQ8_0 worst error {worst:.3f} of a quantization step")


# --- bad input -----------------------------------------------------------------------------------


def _tiny_llama_tensors() -> dict:
    return {
        "token_embd.weight": np.zeros((4, 32), np.float32),
        "output_norm.weight": np.ones(32, np.float32),
    }


def _truncated_data(src: Path, tmp: Path) -> Path:
    out = tmp / "truncated.gguf"
    with open(src, "rb") as f, open(out, "wb") as g:
        g.write(f.read(src.stat().st_size // 2))
    return out


def _truncated_header(src: Path, tmp: Path) -> Path:
    out = tmp / "short.gguf"
    with open(src, "rb") as f, open(out, "wb") as g:
        g.write(f.read(100_000))  # inside the vocabulary
    return out


def _unsupported_type(src: Path, tmp: Path) -> Path:
    raw = np.zeros((4, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8)
    return write_gguf(
        tmp / "q8k.gguf", {**_tiny_llama_tensors(), "blk.0.attn_q.weight": (raw, Q.Q8_K)}
    )


def _unknown_arch(src: Path, tmp: Path) -> Path:
    return write_gguf(tmp / "mamba.gguf", _tiny_llama_tensors(), arch="mamba")


def _not_gguf(src: Path, tmp: Path) -> Path:
    out = tmp / "junk.gguf"
    out.write_bytes(b"PK\x03\x04" + bytes(200))
    return out


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated_data, "truncated GGUF file: tensor"),
        (_truncated_header, "truncated or corrupt GGUF header"),
        (_unsupported_type, "'blk.0.attn_q.weight' use ggml type Q8_K, which gguf"),
        (_unknown_arch, "unknown architecture model_type='mamba'"),
        (_not_gguf, "not a GGUF file"),
    ],
)
def test_bad_gguf_is_a_clear_error_and_leaves_nothing(
    make, message, smollm2_gguf, tmp_path, capsys
):
    src = make(smollm2_gguf, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SlimportError, match=message.replace("(", r"\(")):
        api.convert(src, out, to="hf", progress=False)
    assert cli.main(["convert", str(src), str(out), "--to", "hf"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("slimport: error: ") and message in err and "Traceback" not in err
    assert str(src) in err or "mamba" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unknown_gguf_type_option_is_rejected(smollm2_hf, tmp_path):
    with pytest.raises(SlimportError, match="unknown --gguf-type 'q3'"):
        api.convert(
            smollm2_hf, tmp_path / "x", to="gguf", options={"gguf_type": "q3"}, progress=False
        )
    assert not (tmp_path / "x").exists()


def test_inspect_reports_types_and_leaves_the_vocabulary_undecoded(smollm2_gguf):
    info = api.inspect(smollm2_gguf)
    assert info["gguf_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert (
        info["family"] == "llama"
        and info["dialect"] == "gguf"
        and info["parameter_count"] == 134515008
    )
    with gguf_io.read(smollm2_gguf) as ckpt:
        tokens = ckpt.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, gguf_io.GGUFArray) and tokens._values is None  # lazy until asked
        assert len(tokens) == 49152 and tokens[1] == "<|im_start|>"
