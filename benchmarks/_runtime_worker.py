"""One configuration of benchmarks/quantized_runtime.py, measured in its own process (so its RSS
is its own): `python _runtime_worker.py '{"worker": "lm_torch" | "lm_mindspore" | "classifier", ...}'`
prints one JSON line."""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


def _nbytes(t, seen: set) -> int:
    if id(t) in seen:
        return 0
    seen.add(id(t))
    if hasattr(t, "__tensor_flatten__"):  # torchao's quantized tensor subclasses
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n), seen) for n in names)
    return t.numel() * t.element_size()


def torch_resident(model) -> int:
    """Parameters + buffers, each storage once."""
    seen: set = set()
    return sum(_nbytes(t, seen) for t in [*model.parameters(), *model.buffers()])


def _torchao(model, kind: str) -> None:
    import torch
    import torchao.prototype.quantization.int4.inference_workflow as int4
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    config = (
        Int8WeightOnlyConfig()
        if kind == "torchao-int8"
        else int4.PrototypeInt4WeightOnlyConfig(group_size=64)
    )
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")  # fmt: skip


def lm_torch(spec: dict) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the RSS baseline)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimport.runtime.torch.quantized import load_quantized

    if spec.get("kind", "").startswith("torchao"):
        import torchao.quantization  # noqa: F401

    before = rss()
    kind = spec["kind"]
    if kind == "slimport":
        model, _ = load_quantized(spec["path"], spec["dtype"], embeddings=spec.get("embeddings"))
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"])).eval()  # fmt: skip
        if kind.startswith("torchao"):
            _torchao(model, kind)
    resident, after = torch_resident(model), rss()
    ids = torch.tensor([spec["prompt_ids"]])
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        prefill = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            prefill.append(time.perf_counter() - t0)
        n = spec["new"]
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
        gen = time.perf_counter() - t0
    result = {"resident": resident, "rss": after - before, "prefill_s": min(prefill), "gen_s": gen}
    result |= {"tokens": out[0, ids.shape[1] :].tolist(), "rss_end": rss() - before}
    if spec.get("windows"):
        from slimport.data import wikitext_windows
        from slimport.evaluate.perplexity import perplexity

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        windows = wikitext_windows(tokenizer, spec["wiki"], 512, spec["windows"])
        result["ppl"] = perplexity(model, windows)["perplexity"]
    return result


def _ms_resident(model) -> int:
    return sum(int(p.nbytes) for p in model.get_parameters())


def lm_mindspore(spec: dict) -> dict:
    import mindspore as ms
    import numpy as np

    from slimport.runtime.mindspore.auto import AutoModelForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    before = rss()
    model = AutoModelForCausalLM.from_pretrained(
        spec["path"], dequantize="per_call", embeddings=spec.get("embeddings")
    )
    resident, after = _ms_resident(model), rss()
    ids = np.asarray([spec["prompt_ids"]], np.int32)
    mask, n = np.ones_like(ids), spec["new"]
    # one KV-cache length for every call, so the warm-up compiles the very graphs timed below
    run = functools.partial(model.generate, ids, attention_mask=mask, eos_token_id=None,
                            max_cache_len=ids.shape[1] + n)  # fmt: skip
    run(max_new_tokens=n)  # graph compile: the prefill and the decode step
    t0 = time.perf_counter()
    run(max_new_tokens=1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run(max_new_tokens=n)
    gen = time.perf_counter() - t0
    out = out.asnumpy() if hasattr(out, "asnumpy") else np.asarray(out)
    return {
        "resident": resident, "rss": after - before, "prefill_s": prefill, "gen_s": gen,
        "tokens": out[0, ids.shape[1] :].tolist(), "rss_end": rss() - before,
    }  # fmt: skip


def classifier(spec: dict) -> dict:
    """ms per sentence at batch 1 (the first `latency` dev sentences) and per batch of 32 (the
    whole dev set, which also gives accuracy and the predictions)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimport.data import read_labeled
    from slimport.evaluate.classification import predict, sst2_accuracy
    from slimport.runtime.torch.quantized import load_quantized

    if spec["runtime"] == "mindspore":
        import mindspore as ms

        from slimport.runtime.mindspore.auto import AutoModelForSequenceClassification as MSAuto

        ms.set_context(mode=ms.PYNATIVE_MODE)  # graph mode compiles once per sentence length
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    before = rss()
    if spec["runtime"] == "mindspore":
        net = MSAuto.from_pretrained(spec["path"], dequantize="per_call")
        resident = _ms_resident(net)

        def model(input_ids, attention_mask, **_):
            out = net(ms.Tensor(input_ids.numpy()), ms.Tensor(attention_mask.numpy()))
            return torch.from_numpy(out.logits.asnumpy())
    elif spec["quantized"]:
        model, _ = load_quantized(spec["path"], spec["dtype"])
        resident = torch_resident(model)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"])).eval()  # fmt: skip
        resident = torch_resident(model)
    after = rss()
    texts, _ = read_labeled(spec["data"])
    predict(model, tokenizer, texts[:8], 1)  # warm-up
    t0 = time.perf_counter()
    predict(model, tokenizer, texts[: spec["latency"]], 1)
    batch1 = (time.perf_counter() - t0) / spec["latency"]
    r = sst2_accuracy(model, tokenizer, spec["data"], 32, spec.get("reference"))
    return {
        "resident": resident, "rss": after - before, "batch1_s": batch1,
        "batch32_s": r["seconds"] / -(-r["n"] // 32), "accuracy": r["accuracy"],
        "agreement": r.get("agreement"), "predictions": r["predictions"], "rss_end": rss() - before,
    }  # fmt: skip


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    worker = {"lm_torch": lm_torch, "lm_mindspore": lm_mindspore, "classifier": classifier}
    print(json.dumps(worker[spec["worker"]](spec)))
