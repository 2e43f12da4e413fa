"""`slimport sensitivity`: the cost of quantizing each Linear alone, ranked, and `--budget`
recipes that the quantizer takes and that meet the budget when scored independently. Tiny random
models (with SmolLM2's / MiniLM's real tokenizers) for breadth; SmolLM2 itself in BENCHMARKS."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from slimport.analyze.sensitivity import Probe, Setup, bits_per_weight
from slimport.analyze.sensitivity_command import run
from slimport.cli import REFUSED, main
from slimport.compress import pipeline
from slimport.compress.quant.config import QuantArgs, QuantizationConfig
from slimport.errors import SlimportError

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def tiny_llama(smollm2_hf, tmp_path_factory):
    """A 2-block random Llama with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def wiki(shared, tmp_path_factory):
    """The head of WikiText-2 valid: enough windows, tokenized in a moment."""
    path = tmp_path_factory.mktemp("wiki") / "valid-head.txt"
    path.write_text((shared / "data/wikitext-2/valid.txt").read_text()[:40000])
    return str(path)


def setup_for(model, wiki, **kw) -> Setup:
    return Setup(model=str(model), eval_data=wiki, calib_data=wiki, windows=2, seq_len=64,
                 num_samples=4, calib_seq_len=64, group_size=16, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def probe(tiny_llama, wiki):
    return Probe(setup_for(tiny_llama, wiki))


def test_replaying_a_block_input_scores_as_the_full_forward(probe):
    name = "model.layers.1.self_attn.o_proj"
    args = probe.config.weights
    replayed = probe.evaluate({name: args})
    stored, probe.block_inputs = probe.block_inputs, None  # no replay: the whole model runs
    try:
        full = probe.evaluate({name: args})
    finally:
        probe.block_inputs = stored
    assert replayed == pytest.approx(full, rel=1e-6) and replayed != probe.baseline


@pytest.fixture(scope="module")
def ranking(probe):
    return run(probe.setup, probe=probe)


def test_each_cost_is_the_quantizer_quantizing_that_module_alone(probe, ranking):
    from transformers import AutoModelForCausalLM

    rows = ranking["modules"]
    assert len(rows) == 14  # 7 Linears x 2 blocks; the tied head stays float
    assert [r["delta"] for r in rows] == sorted((r["delta"] for r in rows), reverse=True)
    for r in (rows[0], rows[-1]):
        others = [f"^{n}$" for n in probe.linears if n != r["module"]]
        config = probe.setup.config(protect=["lm_head$", *others])
        model = pipeline.quantize_(AutoModelForCausalLM.from_pretrained(probe.setup.model), config)
        assert probe.score(model) == pytest.approx(r["metric"], rel=1e-6)
        assert r["delta"] == pytest.approx(r["metric"] / probe.baseline - 1)


def test_bits_per_weight_counts_the_stored_scales_and_zero_points():
    assert bits_per_weight(QuantArgs(8, True, "channel"), (10, 64)) == 8 + 32 / 64
    assert bits_per_weight(QuantArgs(4, False, "group", 64), (10, 128)) == 4 + (32 + 4) / 64
    assert bits_per_weight(None, (10, 64)) == 32


@pytest.mark.parametrize(
    "text, message",
    [
        ("ppl<5%", "does not parse"),
        ("ppl<=+5", "ppl<=\\+N%"),
        ("accuracy>=+1pt", "accuracy>=-Npt"),
        ("bits>=4", "bits<=N"),
        ("speed<=2", "does not parse"),
    ],
)
def test_budgets_that_do_not_parse_are_refused_before_any_work(text, message):
    with pytest.raises(SlimportError, match=message):
        run(Setup(model="/nonexistent"), budget=text, recipe="r.yaml")


def test_budget_recipe_meets_the_budget_when_quantized_and_scored_afresh(probe, ranking, tmp_path):
    from transformers import AutoModelForCausalLM

    # confidence 0: met on the slice's own perplexity (the margin: the tests below)
    loose = run(probe.setup, budget="ppl<=+50%", recipe=tmp_path / "loose.yaml", probe=probe,
                confidence=0)  # fmt: skip
    w4 = next(e for e in loose["budget"]["tried"] if e["label"] == "every module W4 g16")
    assert loose["budget"]["chosen"] == w4 and w4["delta"] > 0
    # a budget half of uniform W4's cost: the answer mixes W8 and W4
    budget = f"ppl<=+{w4['delta'] * 50:.5f}%"
    result = run(probe.setup, budget=budget, recipe=tmp_path / "mixed.yaml", probe=probe,
                 confidence=0)  # fmt: skip
    chosen = result["budget"]["chosen"]
    w8 = sum(
        bits_per_weight(QuantArgs(8, True, "channel"), s) * s[0] * s[1]
        for s in probe.shapes().values()
    )
    assert chosen["bits"] < w8 / sum(s[0] * s[1] for s in probe.shapes().values())
    assert set(result["budget"]["plan"].values()) == {"W8", "W4 g16"}
    assert result["budget"]["plan"][ranking["modules"][0]["module"]] == "W8"  # costliest kept wide
    config = QuantizationConfig.from_yaml(tmp_path / "mixed.yaml")
    model = AutoModelForCausalLM.from_pretrained(probe.setup.model).eval()
    pipeline.quantize_(model, config, probe.calibration())
    assert probe.score(model) == pytest.approx(chosen["metric"], rel=1e-6)
    assert probe.score(model) <= probe.baseline * (1 + w4["delta"] / 2)
    # the recipe the quantizer takes from the command line, as written
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                probe.setup.model,
                str(out),
                "--recipe",
                str(tmp_path / "mixed.yaml"),
                "--quiet",
            ]
        )
        == 0
    )
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2


def test_a_ppl_budget_is_met_on_the_upper_bound_of_its_windows_by_default(probe, tmp_path):
    mean = run(probe.setup, budget="ppl<=+50%", recipe=tmp_path / "m.yaml", probe=probe,
               confidence=0)  # fmt: skip
    w4 = next(e for e in mean["budget"]["tried"] if e["label"] == "every module W4 g16")
    budget = f"ppl<=+{w4['delta'] * 50:.5f}%"
    plain = run(probe.setup, budget=budget, recipe=tmp_path / "p.yaml", probe=probe, confidence=0)
    bound = run(probe.setup, budget=budget, recipe=tmp_path / "b.yaml", probe=probe)
    assert bound["budget"]["confidence"] == 0.9 and "bound" not in plain["budget"]["chosen"]
    limit = w4["delta"] / 2
    for e in bound["budget"]["tried"]:
        assert e["bound"] >= e["delta"] - 1e-12
        assert e["meets"] == (e["bound"] <= limit + 1e-12)
    # a margin never buys a smaller model
    assert bound["budget"]["chosen"]["bits"] >= plain["budget"]["chosen"]["bits"]


def test_check_windows_score_the_candidates_on_windows_the_costs_never_saw(tiny_llama, wiki,
                                                                           tmp_path):  # fmt: skip
    from transformers import AutoModelForCausalLM

    p = Probe(setup_for(tiny_llama, wiki, check_windows=3))
    assert len(p.batches) == 2 and len(p.check_batches) == 3
    cost = {tuple(b[0].tolist()) for b in p.batches}
    assert not cost & {tuple(b[0].tolist()) for b in p.check_batches}
    result = run(p.setup, budget="ppl<=+50%", recipe=tmp_path / "r.yaml", probe=p)
    float_check = math.exp(sum(p.float_nlls(check=True)) / 3)
    assert result["budget"]["scored_on"] == {"windows": 3, "check": True, "float": float_check}
    assert float_check != p.baseline  # other windows than the costs'
    chosen = result["budget"]["chosen"]
    model = AutoModelForCausalLM.from_pretrained(p.setup.model).eval()
    pipeline.quantize_(model, QuantizationConfig.from_yaml(tmp_path / "r.yaml"), p.calibration())
    nll = p.window_nlls(model, check=True)
    assert math.exp(sum(nll) / 3) == pytest.approx(chosen["metric"], rel=1e-6)


def test_the_placeholders_of_wikitext_v1_are_not_scored(tiny_llama, wiki, probe):
    from transformers import AutoTokenizer

    from slimport.data import placeholder_mask, wikitext_windows

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids, unk = wikitext_windows(tok, wiki, 64), placeholder_mask(tok, wiki, 64)
    assert unk.shape == ids.shape and unk.any()
    flagged = tok.decode(ids[unk]).replace(" ", "")
    assert flagged == "<unk>" * (len(flagged) // 5)  # every token flagged spells a placeholder
    kept = [tok.decode(ids[w][~unk[w]]) for w in range(len(ids))]
    assert not any("<unk" in t or "unk>" in t for t in kept)  # every placeholder is flagged
    # the probe scores the other tokens only; --score-unk: all of them
    everything = Probe(setup_for(tiny_llama, wiki, skip_unk=False))
    assert everything.baseline != probe.baseline
    assert probe.keep[-1].sum() < 63 and everything.keep[-1] is None


@pytest.mark.parametrize(
    ("budget", "confidence", "message"),
    [("bits<=6", 0.9, "--confidence 0.9: a margin for ppl budgets only"),
     ("ppl<=+5%", 1.0, r"--confidence 1.0: a probability in \[0, 1\)")],
)  # fmt: skip
def test_confidences_that_mean_nothing_are_refused_before_any_work(budget, confidence, message):
    with pytest.raises(SlimportError, match=message):
        run(Setup(model="/nonexistent", windows=8), budget=budget, recipe="r.yaml",
            confidence=confidence)  # fmt: skip


def test_a_budget_no_recipe_meets_names_the_closest_and_writes_it(probe, tmp_path):
    with pytest.raises(
        SlimportError, match=r"bits<=3: not met .* closest is every module W4 g16 \(6\.250 bits"
    ) as e:
        run(probe.setup, budget="bits<=3", recipe=tmp_path / "r.yaml", probe=probe)
    assert "r.closest.yaml" in str(e.value)
    QuantizationConfig.from_yaml(tmp_path / "r.closest.yaml")  # a recipe the quantizer takes
    assert not (tmp_path / "r.yaml").exists()


def test_a_bits_budget_gives_the_first_plan_small_enough(probe, ranking, tmp_path):
    result = run(probe.setup, budget="bits<=7", recipe=tmp_path / "r.yaml", probe=probe)
    assert result["budget"]["chosen"]["bits"] <= 7
    assert result["budget"]["plan"][ranking["modules"][0]["module"]] == "W8"  # costliest stays


def test_cli_writes_json_and_recipe(tiny_llama, wiki, ranking, tmp_path, capsys):
    argv = ["sensitivity", str(tiny_llama), "--eval-data", wiki, "--windows", "2", "--seq-len", "64",
            "--group-size", "16", "--budget", "ppl<=+0.3%", "--recipe-out", str(tmp_path / "r.yaml"),
            "--json", str(tmp_path / "s.json"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["modules"] == ranking["modules"]  # ("seconds" apart) the API's numbers
    assert ranking["modules"][0]["module"] in capsys.readouterr().out
    assert main(argv[:-5] + ["--budget", "nonsense"]) == REFUSED
    assert "does not parse" in capsys.readouterr().err
    assert main(argv + ["--confidence", "1.5"]) == REFUSED
    assert "--confidence 1.5: a probability" in capsys.readouterr().err


def test_classifier_budget_in_accuracy_points(minilm_dir, shared, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2)  # fmt: skip
    folder = tmp_path / "bert"
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    for f in minilm_dir.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    s = Setup(model=str(folder), eval_data=str(shared / "data/sst2/dev.tsv"), examples=128,
              group_size=16)  # fmt: skip
    result = run(s, budget="accuracy>=-1pt", recipe=tmp_path / "r.yaml")
    assert result["metric"] == "accuracy" and 0 <= result["baseline"] <= 1
    assert result["budget"]["chosen"]["delta"] >= -1.0
    with pytest.raises(SlimportError, match="a classifier \\(use accuracy\\)"):
        run(s, budget="ppl<=+5%", recipe=tmp_path / "r.yaml")


def test_block_units_quantize_a_block_at_once(tiny_llama, wiki, probe, tmp_path):
    s = setup_for(tiny_llama, wiki, unit="block")
    result = run(s, budget="bits<=7", recipe=tmp_path / "r.yaml")
    assert [r["module"] for r in result["modules"]] != [] and {
        r["module"] for r in result["modules"]
    } == {"model.layers.0", "model.layers.1"}
    per_block = {r["module"]: r for r in result["modules"]}["model.layers.1"]
    block = [n for n in probe.linears if n.startswith("model.layers.1.")]
    assert per_block["metric"] == pytest.approx(
        probe.evaluate(dict.fromkeys(block, probe.config.weights)), rel=1e-9
    )
    plan = result["budget"]["plan"]
    assert len({plan[n] for n in block}) == 1  # a block moves as one


def test_block_units_report_the_blocks_weights(tiny_llama, wiki, probe, tmp_path):
    pytest.importorskip("matplotlib")
    from slimport.analyze.sensitivity_report import save_report

    s = setup_for(tiny_llama, wiki, unit="block")
    result = run(s, budget="bits<=7", recipe=tmp_path / "r.yaml")
    save_report(result, result.pop("_probe"), tmp_path / "sens.html")
    html = (tmp_path / "sens.html").read_text()
    assert 'id="fig-weights"><svg' in html and "model.layers.1" in html


# ---------------------------------------------------------------- Ray


def test_ray_gives_the_serial_results(probe, ranking, tmp_path):
    ray = pytest.importorskip("ray")
    budget = "ppl<=+1%"  # met on the 0.9 bound, the default
    serial = run(probe.setup, budget=budget, recipe=tmp_path / "s.yaml", probe=probe)
    try:
        on_ray = run(probe.setup, budget=budget, recipe=tmp_path / "r.yaml", ray="local",
                     ray_workers=2, probe=probe)  # fmt: skip
    finally:
        ray.shutdown()
    assert on_ray["modules"] == ranking["modules"] == serial["modules"]
    assert on_ray["budget"]["tried"] == serial["budget"]["tried"]
    assert (tmp_path / "r.yaml").read_text() == (tmp_path / "s.yaml").read_text()


def test_ray_missing_is_a_clear_error(probe, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed (CI's venv has no Ray)
    with pytest.raises(SlimportError, match="--ray needs Ray, which is not installed"):
        run(probe.setup, ray="local", probe=probe)


def test_ray_addresses_are_checked_before_connecting(probe):
    pytest.importorskip("ray")
    with pytest.raises(SlimportError, match="--ray 127.0.0.1:9: no Ray cluster answers there"):
        run(probe.setup, ray="127.0.0.1:9", probe=probe)
    with pytest.raises(SlimportError, match="not HOST:PORT"):
        run(probe.setup, ray="nowhere", probe=probe)


# ---------------------------------------------------------------- report


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def budget_report(probe, tmp_path_factory):
    pytest.importorskip("matplotlib")
    from slimport.analyze.sensitivity_report import save_report

    tmp = tmp_path_factory.mktemp("report")
    result = run(probe.setup, budget="bits<=7", recipe=tmp / "r.yaml", probe=probe)
    result.pop("_probe")
    save_report(result, probe, tmp / "sens.html")
    return tmp / "sens.html"


def test_sensitivity_report_has_the_ranking_layers_weights_and_pareto(budget_report):
    import re

    html = budget_report.read_text()
    assert re.findall(r'id="fig-([\w-]+)"><svg', html) == ["ranking", "layers", "weights", "pareto"]
    assert "Budget search (bits&lt;=7)" in html and "every recipe scored" in html
    md = budget_report.with_suffix(".md").read_text()
    assert "![size / quality of every recipe the search scored](sens_files/pareto.svg)" in md


def test_a_ppl_budget_report_shows_each_candidates_bound(probe, tmp_path):
    pytest.importorskip("matplotlib")
    from slimport.analyze.sensitivity_report import save_report

    result = run(probe.setup, budget="ppl<=+1%", recipe=tmp_path / "r.yaml", probe=probe)
    result.pop("_probe")
    save_report(result, probe, tmp_path / "sens.html")
    md = (tmp_path / "sens.md").read_text()
    assert "0.9 bound" in md  # a column of the candidates table


@pytest.mark.skipif(not CHROMIUM, reason="needs headless Chromium (apt-get install chromium)")
def test_sensitivity_report_renders_in_chromium(budget_report, tmp_path):
    import subprocess

    import numpy as np
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    run_ = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--screenshot={shot}",
         "--window-size=1200,4000", "--hide-scrollbars", budget_report.as_uri()],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shot.is_file(), run_.stderr[-2000:]
    rgb = imread(shot)[..., :3]
    assert (rgb < 0.9).any(-1).mean() > 0.03, "the page rendered (nearly) blank"
    # the ranking's bars (q_proj blue C0 ... down_proj pink C6) and the Pareto front (green C2)
    for colour in ((0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C), (0xE3, 0x77, 0xC2)):
        near = (np.abs(rgb * 255 - np.array(colour)) < 12).all(-1)
        assert near.sum() > 300, f"no plot pixels of colour {colour}"
