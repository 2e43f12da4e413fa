"""Task data: read text files, cut calibration samples and evaluation windows.

Three file kinds, told apart by suffix:

* `.txt` (also WikiText's `.raw`, `.tokens`): one document, kept whole for token streams and
  split into blank-line separated paragraphs by `read_texts`;
* `.tsv` a header row, then one sentence per row (GLUE style: column `text` or `sentence`);
* `.jsonl` one JSON object per line (key `text`).

Calibration follows GPTQ/AWQ: tokenize a text stream once, then draw random windows of exactly
`seq_len` tokens from it, seeded, so the same recipe always sees the same samples. Evaluation
follows the WikiText-2 perplexity protocol: the raw test file whole, tokenized once,
non-overlapping windows from the start.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import torch

from slimport.errors import SlimportError

TEXT_COLUMNS = ("text", "sentence")
DOCUMENTS = (".txt", ".raw", ".tokens")  # WikiText ships wiki.test.raw / wiki.valid.tokens
SUFFIXES = (*DOCUMENTS, ".tsv", ".jsonl")


def project_root() -> Path:
    """The source checkout this package runs from (src layout), else the working directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def shared_dir() -> Path:
    """The real data and models: `$SLIMPORT_SHARED`, else `shared/` beside the project."""
    return Path(os.environ.get("SLIMPORT_SHARED") or project_root().parent / "shared")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise SlimportError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a file",
            hint="pass a .txt, .tsv or .jsonl task file",
        )
    if path.suffix.lower() not in SUFFIXES:
        raise SlimportError(
            f"{path}: unknown task file type {path.suffix or '(no suffix)'!r}",
            hint="use .txt/.raw (one document), .tsv (header row, column 'text') or .jsonl (key 'text')",
        )


def _read_document(path: Path) -> str:
    """A .txt file whole, newlines normalised to LF (wiki.test.raw ships with CRLF endings)."""
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlimportError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not text.strip():
        raise SlimportError(f"{path}: the file is empty")
    return text


def _read_records(path: Path) -> tuple[list[str], list[dict]]:
    """Rows of a .tsv (header row) or .jsonl file as dicts, plus the field names seen."""
    _check_file(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".tsv":
                # GLUE files are unquoted: a `"` inside a sentence is just a character
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                rows = list(reader)
                fields = list(reader.fieldnames or [])
            else:
                rows, fields = [], []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise SlimportError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise SlimportError(f"{path}:{lineno}: expected a JSON object per line")
                    rows.append(row)
                    fields += [k for k in row if k not in fields]
    except (OSError, UnicodeDecodeError) as e:
        raise SlimportError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not rows:
        raise SlimportError(f"{path}: the file is empty (no rows after the header)")
    return fields, rows


def _pick_column(path: Path, fields: list[str], column: str | None, what: str = "text") -> str:
    candidates = (column,) if column else TEXT_COLUMNS
    for name in candidates:
        if name in fields:
            return name
    wanted = repr(column) if column else " or ".join(repr(c) for c in TEXT_COLUMNS)
    raise SlimportError(
        f"{path}: no {what} column {wanted}; the file has {', '.join(map(repr, fields))}",
        hint="pick one with --column / column=",
    )


def _column(path: Path, rows: list[dict], name: str) -> list:
    values = []
    for i, row in enumerate(rows):
        if row.get(name) is None:
            raise SlimportError(f"{path}: row {i + 1} has no value for {name!r}")
        values.append(row[name])
    return values


def read_texts(path: str | Path, column: str | None = None) -> list[str]:
    """The texts of a task file: paragraphs of a .txt, the text column of a .tsv / .jsonl.

    Empty texts are dropped. `column` picks the column/key (default `text`, then `sentence`).
    """
    path = Path(path)
    if path.suffix.lower() in DOCUMENTS:
        paragraphs = re.split(r"\n\s*\n", _read_document(path))
        return [p.strip() for p in paragraphs if p.strip()]
    fields, rows = _read_records(path)
    name = _pick_column(path, fields, column)
    texts = [str(t).strip() for t in _column(path, rows, name)]
    texts = [t for t in texts if t]
    if not texts:
        raise SlimportError(f"{path}: every {name!r} value is empty")
    return texts


def read_labeled(
    path: str | Path, column: str | None = None, label_column: str = "label"
) -> tuple[list[str], list[int]]:
    """(texts, integer labels) of a classification .tsv / .jsonl file (SST-2: `text`, `label`)."""
    path = Path(path)
    if path.suffix.lower() in DOCUMENTS:
        raise SlimportError(
            f"{path}: a classification set needs a .tsv or .jsonl file with a label column"
        )
    fields, rows = _read_records(path)
    texts = [str(t) for t in _column(path, rows, _pick_column(path, fields, column))]
    name = _pick_column(path, fields, label_column, what="label")
    labels = []
    for i, value in enumerate(_column(path, rows, name)):
        try:
            labels.append(int(value))
        except (TypeError, ValueError):
            raise SlimportError(
                f"{path}: row {i + 1}: label {value!r} is not an integer class id"
            ) from None
    return texts, labels


def _encode(tokenizer, text: str) -> torch.Tensor:
    # one long string on purpose: `verbose=False` silences the "longer than max length" warning,
    # the model never sees more than a window of it
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def _sentence_stream(tokenizer, texts: list[str], need: int) -> torch.Tensor:
    """Sentences joined by the end-of-sequence token (or a space) until `need` tokens."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if sep is None:
        return _encode(tokenizer, " ".join(texts))
    ids: list[int] = []
    chunk = 512
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(texts[start : start + chunk], add_special_tokens=False, verbose=False)
        for sentence in encoded["input_ids"]:
            ids += sentence + [sep]
        if len(ids) >= need:
            break
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    tokenizer, path: str | Path, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`num_samples` random windows of exactly `seq_len` tokens: LongTensor [num_samples, seq_len].

    A .txt file is tokenized whole; sentence files (.tsv/.jsonl) are joined with the EOS token
    until there are enough tokens for `num_samples` distinct windows. Window starts are uniform
    over [0, n - seq_len) as in GPTQ's sampler, drawn from a torch.Generator seeded `seed`.
    """
    path = Path(path)
    if num_samples < 1 or seq_len < 1:
        raise SlimportError(
            f"calibration needs num_samples >= 1 and seq_len >= 1 (got {num_samples}, {seq_len})"
        )
    if path.suffix.lower() in DOCUMENTS:
        ids = _encode(tokenizer, _read_document(path))
    else:
        ids = _sentence_stream(tokenizer, read_texts(path), num_samples * seq_len + 1)
    if len(ids) < seq_len + 1:
        raise SlimportError(
            f"{path}: too short for calibration: {len(ids)} tokens, a {seq_len}-token window "
            f"needs at least {seq_len + 1}",
            hint="use a longer calibration text or a smaller --seq-len",
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def wikitext_windows(
    tokenizer, path: str | Path, seq_len: int, windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping `seq_len`-token windows of a whole text file, from its start: [n, seq_len].

    The standard WikiText-2 perplexity protocol (GPTQ, AWQ, SmoothQuant): the raw test file read
    whole, tokenized once; the tail shorter than a window is dropped. `windows` keeps the first N.
    """
    path = Path(path)
    if seq_len < 2:
        raise SlimportError(f"perplexity windows need seq_len >= 2 (got {seq_len})")
    ids = _encode(tokenizer, _read_document(path))
    available = len(ids) // seq_len
    if available == 0:
        raise SlimportError(
            f"{path}: too short for evaluation: {len(ids)} tokens, one window needs {seq_len}"
        )
    if windows is not None:
        if windows < 1 or windows > available:
            raise SlimportError(
                f"{path}: asked for {windows} window(s) of {seq_len} tokens, "
                f"the file has {available}",
                hint=f"use --windows between 1 and {available}, or leave it out for all",
            )
        available = windows
    return ids[: available * seq_len].view(available, seq_len)


def placeholder_mask(
    tokenizer, path: str | Path, seq_len: int, placeholder: str = "<unk>"
) -> torch.Tensor | None:
    """[n, seq_len] bool over `wikitext_windows(tokenizer, path, seq_len)`: True for the tokens
    that spell a `placeholder` of the text (WikiText-2 v1 writes <unk> for a rare word, which raw
    text has: three near-certain tokens that would dilute a perplexity). None if it has none."""
    import numpy as np

    text = _read_document(Path(path))
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(placeholder), text)]
    if not spans:
        return None
    enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = np.asarray(spans, dtype=np.int64).T
    i = np.searchsorted(starts, offsets[:, 1], side="left") - 1  # last span starting before
    inside = (i >= 0) & (offsets[:, 1] > offsets[:, 0])
    inside &= ends[np.clip(i, 0, None)] > offsets[:, 0]
    n = len(offsets) // seq_len
    return torch.from_numpy(inside[: n * seq_len].reshape(n, seq_len))


def lm_windows(
    tokenizer, path: str | Path, seq_len: int, held_out: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) non-overlapping `seq_len`-token windows of one document.

    The document is tokenized whole and split once: the first `1 - held_out` of its tokens train,
    the rest measure perplexity (nanoGPT's 90/10 split of tinyshakespeare). Files named like a
    test split are refused: training text must never be the benchmark's test set.
    """
    path = Path(path)
    if re.search(r"(^|[._-])test([._-]|$)", path.name.lower()):
        raise SlimportError(
            f"{path}: looks like a test split; never train on it",
            hint="train on tinyshakespeare or a train/valid split (WikiText-2 valid.txt)",
        )
    if seq_len < 2 or not 0 < held_out < 1:
        raise SlimportError(
            f"LM windows need seq_len >= 2 and 0 < held_out < 1 (got {seq_len}, {held_out})"
        )
    if path.suffix.lower() in DOCUMENTS:
        ids = _encode(tokenizer, _read_document(path))
    else:
        ids = _sentence_stream(tokenizer, read_texts(path), 1 << 62)
    cut = int(len(ids) * (1 - held_out))
    train, held = ids[:cut], ids[cut:]
    if len(train) < seq_len or len(held) < seq_len:
        raise SlimportError(
            f"{path}: too short: {len(ids)} tokens give {len(train) // seq_len} training and "
            f"{len(held) // seq_len} held-out window(s) of {seq_len}; each needs at least one",
            hint="use a longer text or a smaller --seq-len",
        )
    n, m = len(train) // seq_len, len(held) // seq_len
    return train[: n * seq_len].view(n, seq_len), held[: m * seq_len].view(m, seq_len)
