"""Reports are one self-contained HTML file (plots inline, nothing fetched) with a Markdown
twin, and they look right to a person: rendered in headless Chromium, the page is not blank and
the plots are on it."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from slimport.errors import SlimportError
from slimport.report import Figure, Report, Table
from slimport.report.plots import series, stacked_bars

pytest.importorskip("matplotlib", reason="the report extra (pip install 'slimport[report]')")


class _Scan(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []
        self.svg_depth = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.svg_depth += tag == "svg"
        for k, v in attrs:
            # inside SVG, xmlns/xlink are namespaces, not fetches; elsewhere nothing may load
            if k in ("src", "href") and v and not v.startswith("#") and not self.svg_depth:
                self.external.append(v)
            if k == "xlink:href" and v and not v.startswith(("#", "data:")):
                self.external.append(v)
        if tag in ("link", "script", "img", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        self.svg_depth -= tag == "svg"


def _report() -> Report:
    bars = stacked_bars(["fp32", "bf16"], {"weights": [512.0, 256.0], "activations": [100.0, 50.0]}, "MiB")  # fmt: skip
    line = series(range(4), {"max |Δ|": [1e-7, 2e-6, 3e-6, 8e-6]}, "layer", "max |Δ|", log_y=True, threshold=1e-5)  # fmt: skip
    doc = Report("demo report", {"model": "tiny", "batch": 2})
    doc.add("Memory", Figure(bars, "memory per setup", "memory"))
    doc.add("Parity", Figure(line, "per-layer parity", "layers"))
    doc.add("Numbers", Table(["name", "value"], [["a | b", 1.23456789], ["<c>", 2]]))
    return doc


def test_html_is_self_contained_and_markdown_has_the_same_tables(tmp_path):
    written = _report().save(tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    scan = _Scan()
    scan.feed(html)
    assert scan.tags.count("svg") == 2 and scan.tags.count("table") == 2  # settings + numbers
    assert scan.external == [], scan.external
    assert "&lt;c&gt;" in html and "1.235" in html  # escaped, rounded
    md = (tmp_path / "r.md").read_text()
    assert "| a \\| b | 1.235 |" in md
    assert "![memory per setup](r_files/memory.svg)" in md
    assert (tmp_path / "r_files/memory.svg").read_text().lstrip().startswith("<?xml")
    assert set(written) == {tmp_path / p for p in ("r.html", "r.md", "r_files/memory.svg", "r_files/layers.svg")}  # fmt: skip


def test_report_path_errors_name_the_option(tmp_path):
    with pytest.raises(SlimportError, match="is a folder"):
        _report().save(tmp_path)
    with pytest.raises(SlimportError, match="does not exist"):
        _report().save(tmp_path / "no" / "r.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="needs headless Chromium (apt-get install chromium)")
def test_chromium_renders_the_plots(tmp_path):
    from matplotlib.image import imread

    _report().save(tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,1800", "--hide-scrollbars", (tmp_path / "r.html").as_uri()],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shot.is_file(), run.stderr[-2000:]
    rgb = imread(shot)[..., :3]
    ink = (rgb < 0.9).any(-1)
    assert ink.mean() > 0.02, "the page rendered (nearly) blank"
    # matplotlib's first two colours: the stacked bars (blue C0, orange C1) are on the page
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = (np.abs(rgb * 255 - np.array(colour)) < 12).all(-1)
        assert near.sum() > 500, f"no plot pixels of colour {colour}"


def test_verify_report_plots_per_layer_and_per_tensor_parity(tmp_path):
    import transformers

    from slimport.evaluate.verify import verify
    from slimport.evaluate.verify_report import save_report

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    report = verify(tmp_path / "m", tmp_path / "m", runtime="torch", tokens=2)
    save_report(report, tmp_path / "v.html")
    scan = _Scan()
    scan.feed((tmp_path / "v.html").read_text())
    assert scan.tags.count("svg") == 2 and scan.external == []
    md = (tmp_path / "v.md").read_text()
    assert "## Per layer" in md and "## Per tensor" in md and "| emb | 0 |" in md
