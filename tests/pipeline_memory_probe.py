"""Peak RSS of one real slimport conversion or quantization, measured in a fresh process (run as
a script by tests/test_analyze_pipeline_memory.py and BENCHMARKS.md's command):

    python pipeline_memory_probe.py convert SRC OUT TARGET
    python pipeline_memory_probe.py rtn|gptq SRC OUT NUM_SAMPLES SEQ_LEN

prints one JSON line: `base` (VmHWM after importing torch, transformers, compressed-tensors and
the pipeline's modules, one tiny op run), `peak` (VmHWM at the end), in bytes.
With SLIMPORT_PROBE_STAGES=1 it also records the peak inside the pipeline's stages (for finding what holds memory)."""

import functools
import json
import os
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _stages(events: list) -> None:
    """Wrap the pipeline's stages: reset VmHWM on entry, record the peak on exit."""
    from slimport.compress import pipeline
    from slimport.io import safetensors

    def wrap(owner, name):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def inner(*a, **k):
            before = _status("VmRSS")
            out = fn(*a, **k)
            events.append((name, before, _status("VmHWM"), _status("VmRSS")))
            Path("/proc/self/clear_refs").write_text("5")
            return out

        setattr(owner, name, inner)

    for owner, name in [(pipeline, "capture_inputs"), (pipeline, "quantize_block"),
                        (pipeline, "run_block"), (pipeline, "module_tensors"),
                        (pipeline, "_tail"), (safetensors, "write")]:  # fmt: skip
        wrap(owner, name)


def main() -> None:
    import compressed_tensors  # noqa: F401 (the quantize writer imports it lazily)
    import torch
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import slimport.compress.pipeline  # noqa: F401
    import slimport.io.safetensors  # noqa: F401
    from slimport import api
    from slimport.compress.quant.config import QuantizationConfig

    torch.set_num_threads(1)
    torch.zeros(8).sum()
    mode, src, out = sys.argv[1:4]
    events: list = []
    if os.environ.get("SLIMPORT_PROBE_STAGES"):
        _stages(events)
    base = _status("VmHWM")
    hwm = [base]
    if mode == "convert":
        api.convert(src, out, to=sys.argv[4], progress=False)
    else:
        n, seq = int(sys.argv[4]), int(sys.argv[5])
        config = QuantizationConfig(bits=4, group_size=64, symmetric=False, method=mode)
        calibration = None
        if mode != "rtn":
            ids = torch.randint(0, 1000, (n, seq), generator=torch.Generator().manual_seed(0))
            calibration = [{"input_ids": ids[i : i + 8]} for i in range(0, n, 8)]
        slimport.compress.pipeline.quantize(src, out, config, calibration, progress=False)
    hwm.append(_status("VmHWM"))
    peak = max([*hwm, *(e[2] for e in events)])
    print(json.dumps({"base": base, "peak": peak, "events": events}))


if __name__ == "__main__":
    main()
