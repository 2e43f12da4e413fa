"""Peak RSS of one real forward, measured in a fresh process (run as a script by
tests/test_analyze.py): python memory_probe.py CONFIG_JSON BATCH SEQ -> one JSON line.

Baseline: RSS after importing torch + transformers. Then the model is built from the config
(fp32, random init: memory does not depend on the values), a 1 x 8 warm-up forward brings in
kernels and code pages, the peak counter is reset (/proc/self/clear_refs 5), and the forward at
BATCH x SEQ runs under no_grad keeping its outputs (logits and KV cache) as a caller would."""

import gc
import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    config_dict = json.loads(Path(sys.argv[1]).read_text())
    batch, seq = int(sys.argv[2]), int(sys.argv[3])
    config = transformers.AutoConfig.for_model(**config_dict)
    arch = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, transformers.AutoModel)
    torch.zeros(8).sum()
    gc.collect()
    base = _status("VmRSS")
    model = cls._from_config(config).eval()
    gc.collect()
    loaded = _status("VmRSS")
    with torch.no_grad():
        model(input_ids=torch.ones(1, 8, dtype=torch.long))
    gc.collect()
    file0 = _status("RssFile")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    peak = _status("VmHWM")
    # code pages the big forward touched first (kernels for large shapes): file-backed RSS
    code = _status("RssFile") - file0
    print(
        json.dumps({"base": base, "loaded": loaded, "peak": peak, "code": code, "kept": len(out)})
    )


if __name__ == "__main__":
    main()
