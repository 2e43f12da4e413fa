"""SparseGPT 50% on SmolLM2-135M: damping, block size and OWL layer sparsities (issue #16).

Settings are compared on a *dev* slice that the pruning table never reports: the last
`--dev` 512-token windows of WikiText-2 raw test (the table scores the first 16), so choosing a
setting here does not tune on the reported numbers. Calibration: `--calib` windows of the valid
split, seed 0, as in prune_vs_peers.py.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): per block l, D_l = the fraction of
the block's Wanda scores |W_ij| * ||X_j||_2 above M x their mean (dense model, calibration
tokens); sparsities s_l = 1 - r_l with r = D rescaled to [0, 2 lambda], shifted to mean 1 - s:
blocks with more outliers keep more weights, the total stays s (all blocks have equal size).
It is given to slimport as `per_module: {"layers\\.<l>\\.": s_l}`.

    .venv/bin/python benchmarks/sparsegpt_tune.py --calib 16 --dev 8 --settings base,damp0.1,owl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from quant_vs_peers import MODEL, SEQ_LEN, TEST, VALID, _load_fp32  # noqa: E402

# name -> SparseGPT modifier options, OWL (lambda, M) or None
SETTINGS = {
    "dense": (None, None),
    "base": ({"damp": 0.01, "block_size": 128}, None),
    "damp0.1": ({"damp": 0.1, "block_size": 128}, None),
    "damp0.001": ({"damp": 0.001, "block_size": 128}, None),
    "block32": ({"damp": 0.01, "block_size": 32}, None),
    "block512": ({"damp": 0.01, "block_size": 512}, None),
    "owl": ({"damp": 0.01, "block_size": 128}, (0.08, 5.0)),
    "owl0.04": ({"damp": 0.01, "block_size": 128}, (0.04, 5.0)),
    "owl0.15": ({"damp": 0.01, "block_size": 128}, (0.15, 5.0)),
    "owl0.2": ({"damp": 0.01, "block_size": 128}, (0.2, 5.0)),
}


def outlier_ratios(model, calib, m: float) -> list[float]:
    """OWL's D_l per block: the fraction of Wanda scores above m x their mean (dense model)."""
    import torch
    from torch import nn

    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + x.square().sum(0)

        return f

    hooks = [mod.register_forward_hook(hook(n)) for n, mod in model.model.layers.named_modules()
             if isinstance(mod, nn.Linear)]  # fmt: skip
    with torch.no_grad():
        for row in calib:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    ratios = []
    for i, block in enumerate(model.model.layers):
        scores = [(mod.weight.detach().abs().double() * sq[f"{i}.{n}"].sqrt()).flatten()
                  for n, mod in block.named_modules() if isinstance(mod, nn.Linear)]  # fmt: skip
        s = torch.cat(scores)
        ratios.append(float((s > m * s.mean()).double().mean()))
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-block sparsities: D rescaled to [0, 2 lam], mean 1 - sparsity kept."""
    import torch

    d = torch.tensor(ratios, dtype=torch.float64)
    r = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    r = r - r.mean() + (1 - sparsity)
    return [1 - float(x) for x in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--dev", type=int, default=8, help="last N test windows scored")
    ap.add_argument("--settings", default="base,owl")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", type=Path, default=MODEL)
    a = ap.parse_args()
    import torch

    from slimport.compress.prune import api
    from slimport.data import calibration_batches, shared_dir, wikitext_windows
    from slimport.evaluate.perplexity import perplexity
    from slimport.runtime.text import load_tokenizer

    torch.set_num_threads(1)
    shared = shared_dir()
    tok = load_tokenizer(a.model)
    dev = wikitext_windows(tok, shared / TEST, SEQ_LEN)[-a.dev :]
    calib = calibration_batches(tok, shared / VALID, a.calib, SEQ_LEN, seed=0)
    results: dict[str, dict] = {}
    owl_cache: dict = {}
    for name in a.settings.split(","):
        opts, owl = SETTINGS[name]
        if opts is None:
            ppl = perplexity(_load_fp32(str(a.model)), dev, progress=False)["perplexity"]
            results[name] = {"dev_perplexity": ppl}
            print(f"{name}: dev ppl {ppl:.3f}", flush=True)
            continue
        mod = {"sparsity": 0.5, **opts}
        extra = {}
        if owl is not None:
            if owl[1] not in owl_cache:  # the outlier ratios depend on M alone
                owl_cache[owl[1]] = outlier_ratios(_load_fp32(str(a.model)), calib, owl[1])
            d = owl_cache[owl[1]]
            per = owl_sparsities(d, 0.5, owl[0])
            mod["per_module"] = {rf"layers\.{i}\.": round(s, 6) for i, s in enumerate(per)}
            extra = {"owl_sparsities": per, "outlier_ratios": d}
        recipe = {"modifiers": [{"sparsegpt": mod}], "calib_data": str(shared / VALID),
                  "num_samples": a.calib, "seq_len": SEQ_LEN, "seed": 0}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="sgpt-tune-") as out:
            t0 = time.perf_counter()
            api.prune(a.model, Path(out) / "m", recipe=recipe, progress=False)
            seconds = time.perf_counter() - t0
            model = _load_fp32(str(Path(out) / "m"))
        ppl = perplexity(model, dev, progress=False)["perplexity"]
        results[name] = {"dev_perplexity": ppl, "seconds": seconds, **extra}
        print(f"{name}: dev ppl {ppl:.3f}, prune {seconds:.0f} s", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
