"""Text sources and token windows for calibration and perplexity.

Text sources (`load_text`):
  - "default": the embedded corpus, gensim's Lee background corpus (300 short news articles,
    ~360 KB, ~76K SmolLM2 tokens) shipped inside the gensim package;
  - "wikitext2:test" / "wikitext2:valid": the raw WikiText-2 files in ../shared/data/wikitext-2
    (override the folder with $ALPHASCOPE_WIKITEXT);
  - "hf:<dataset>[:<config>]:<split>": a Hugging Face dataset (needs `datasets` and, for a hub id, a
    reachable hub); <dataset> may be a local folder: one written by `save_to_disk` (a DatasetDict's, or a
    single Dataset's, whose split is the one it was saved with, "train" if none), or of data files;
  - a .jsonl file: the "text" field of each line's JSON object, joined by blank lines;
  - anything else: a path to a text file, UTF-8 unless another `encoding` is named (a file with NUL
    bytes is refused as binary, one that does not decode is refused with the offset of the first bad byte).

Calibration and evaluation text are disjoint: the embedded corpus is always cut in two halves at a
line boundary (`split_text`), the first for calibration and the second for evaluation, and any other
source named for both is cut the same way (`calibration_text`, `evaluation_text`).

Token windows: the text is tokenized once (cached per tokenizer and text), without special
tokens; a text of more than TOKENIZE_CHARS characters in pieces cut at line starts, so that its tokens, not
the tokenizer's per-character bookkeeping, are what it costs in memory. Calibration samples are random windows
(seeded); evaluation windows are consecutive and non-overlapping. With `bos=True` every window starts with the
tokenizer's BOS token followed by seqlen-1 text tokens (Gemma needs this; `ModelInfo.bos_per_window`).
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import json
import os
import re
import stat
import weakref
from pathlib import Path

import torch

from analysis.errors import AlphascopeError
from analysis.runtime import cache_dir

WIKITEXT_SPLITS = ("train", "valid", "test")
NO_SOURCE = "No text source given; use 'default', 'wikitext2:test', 'hf:...' or a .txt path."
ENCODING = "utf-8"  # of text files, unless another is named
MAX_UPLOAD_MB = 50  # largest text the dashboard keeps from an upload (WikiText-103's training text is ~540 MB)


class DataError(AlphascopeError, ValueError):
    """A text source or window request the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------
# text sources


def default_corpus_path() -> Path:
    """The embedded corpus: gensim's `test/test_data/lee_background.cor`."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The embedded corpus needs the Python package 'gensim' (pip install gensim).")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"


def wikitext_dir() -> Path:
    """Folder with WikiText-2 raw text: $ALPHASCOPE_WIKITEXT, else ../shared/data/wikitext-2."""
    env = os.environ.get("ALPHASCOPE_WIKITEXT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def load_text(source: str, encoding: str = ENCODING) -> str:
    """Return the text named by `source` (see the module docstring for the accepted names);
    `encoding` applies to text files (the packaged corpora are UTF-8)."""
    if not source or not str(source).strip():
        raise DataError(NO_SOURCE)
    src = str(source).strip()
    if src == "default":
        return _read(default_corpus_path())
    if src.startswith("wikitext2:"):
        return _load_wikitext(src.split(":", 1)[1])
    if src.startswith("hf:"):
        return _load_hf(src[3:])
    path = Path(src).expanduser()
    return _read_jsonl(path, encoding) if path.suffix.lower() == ".jsonl" else _read(path, encoding)


def text_source_problem(source: str, encoding: str = ENCODING) -> str | None:
    """Why `source` cannot name a text, found without a model (None if it may): empty, a file that
    does not exist, is binary or does not decode with `encoding`, a malformed hf: spec. Reading can
    still fail later (a hub out of reach)."""
    src = str(source or "").strip()
    try:
        if not src:
            raise DataError(NO_SOURCE)
        if src.startswith("hf:"):
            _hf_parts(src[3:])
        elif src.startswith("wikitext2:"):
            _wikitext_path(src.split(":", 1)[1])
        elif src != "default":
            path = Path(src).expanduser()
            info = _check_file(path)
            _check_decodes(path.resolve(), check_encoding(encoding), info.st_size, info.st_mtime_ns)
    except DataError as e:
        return str(e)
    return None


def save_text(name: str, data: bytes, folder: Path | None = None, encoding: str = ENCODING) -> Path:
    """Keep an uploaded text as a file under `folder` (default: the cache folder's texts/) and return
    its path, named by content (the same upload gives the same path, so results keyed by the text
    source stay valid). DataError, and nothing kept, for more than MAX_UPLOAD_MB megabytes
    (2**20 bytes) or data that is not text in `encoding`."""
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise DataError(f"'{name}' is {len(data) / 2**20:.1f} MB; uploads are limited to {MAX_UPLOAD_MB} MB "
                        "(name a larger file by its path instead).")
    _decode(Path(name), data, encoding)
    folder = Path(folder) if folder is not None else cache_dir() / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem)[:60] or "text"
    path = folder / f"{hashlib.sha1(data).hexdigest()[:12]}-{stem}.txt"
    if not path.exists():
        path.write_bytes(data)
    return path


def _check_file(path: Path) -> os.stat_result:
    """`path`'s stat, once it is known to be a regular file; DataError saying what it is otherwise."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"Text file '{path}' does not exist.") from None
    except OSError as e:  # e.g. a name longer than the file system allows
        raise DataError(f"'{str(path)[:80]}...' cannot be read as a text file ({e.strerror}).") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"'{path}' is a folder, not a text file.")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"'{path}' is not a regular file (a device or a pipe); give a text file.")
    return info


def check_encoding(encoding: str) -> str:
    """The codec's canonical name ("latin-1" -> "iso8859-1"); DataError for an unknown encoding."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise DataError(f"Unknown text encoding {encoding!r}; use e.g. utf-8, latin-1, cp1252 or utf-16.") from None


def _decode(path: Path, data: bytes, encoding: str) -> str:
    """`data` as text; DataError for binary data (NUL bytes outside UTF-16/32) or bytes that do not decode."""
    encoding = check_encoding(encoding)
    if b"\0" in data[:65536] and not encoding.startswith("utf-16") and not encoding.startswith("utf-32"):
        raise DataError(f"'{path}' is not a text file (it has NUL bytes: binary data?); give a plain text file.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        hint = "" if encoding != "utf-8" else ("; save it as UTF-8 or name its encoding (--encoding, or Text "
                                               "encoding on the Prune page; e.g. latin-1 or cp1252)")
        raise DataError(f"'{path}' is not valid {encoding} text (byte 0x{data[e.start]:02x} at offset {e.start})"
                        f"{hint}.") from None


@functools.lru_cache(maxsize=16)
def _check_decodes(path: Path, encoding: str, size: int, mtime_ns: int) -> None:
    """Read and decode a text file once per (path, encoding, size, mtime): the Prune page asks on every rerun."""
    _decode(path, path.read_bytes(), encoding)


def _read(path: Path, encoding: str = ENCODING) -> str:
    _check_file(path)
    return _decode(path, path.read_bytes(), encoding)


def _read_jsonl(path: Path, encoding: str = ENCODING) -> str:
    """The "text" fields of a JSON-lines file's objects, joined by blank lines (as a dataset's rows are)."""
    texts = []
    for n, line in enumerate(_read(path, encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {n} is not JSON ({e.msg}); a .jsonl file holds one JSON object per "
                            "line, with its text in \"text\" (rename a plain text file .txt).") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"'{path}' line {n} has no \"text\" string; each line's object must hold its text "
                            "there.")
        texts.append(row["text"])
    if not texts:
        raise DataError(f"'{path}' holds no JSON lines.")
    return "\n\n".join(texts)


_HELD_OUT_NAMES = ("valid", "validation", "val", "dev")


def held_out_split(source: str) -> str | None:
    """The validation split of an evaluation source that names a test split, or None: "wikitext2:test"
    -> "wikitext2:valid", "hf:<dataset>[:<config>]:test" -> the same with ":validation" (the hub's usual
    name; the hub itself is not asked, it may be out of reach), a file ".../test.txt" (or "...-test.txt",
    "..._test.txt") -> its sibling named valid, validation, val or dev in its place, the first that
    `text_source_problem` finds no problem with. What an allocation search can be scored on to rank
    candidates on the served domain without seeing the evaluation text."""
    return next((c for c in _held_out_candidates(str(source or "").strip()) if text_source_problem(c) is None), None)


def names_test_split(source: str) -> bool:
    """Whether `source` names a test split (wikitext2:test, hf:...:test, a file named test.txt or ...-test.txt)."""
    return bool(_held_out_candidates(str(source or "").strip()))


def _held_out_candidates(src: str) -> list[str]:
    if src == "wikitext2:test":
        return ["wikitext2:valid"]
    if src.startswith("hf:"):
        parts = src.split(":")
        return [":".join(parts[:-1] + ["validation"])] if len(parts) in (3, 4) and parts[-1] == "test" else []
    if src.startswith("wikitext2:") or src in ("", "default"):
        return []
    path = Path(src).expanduser()
    match = re.fullmatch(r"(.*?)(test)", path.stem, flags=re.IGNORECASE)
    if match is None or match.group(1)[-1:] not in ("", "-", "_", "."):
        return []
    return [str(path.with_name(match.group(1) + name + path.suffix)) for name in _HELD_OUT_NAMES]


def _wikitext_path(split: str) -> Path:
    if split not in WIKITEXT_SPLITS:
        raise DataError(f"Unknown WikiText-2 split '{split}'; use one of {', '.join(WIKITEXT_SPLITS)}.")
    path = wikitext_dir() / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"WikiText-2 {split} not found at {path} (set $ALPHASCOPE_WIKITEXT to its folder).")
    return path


def _load_wikitext(split: str) -> str:
    return _wikitext_path(split).read_text(encoding="utf-8")


def _hf_parts(spec: str) -> tuple[str, str | None, str]:
    """(dataset, config or None, split) from "<dataset>[:<config>]:<split>"."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"Use 'hf:<dataset>[:<config>]:<split>', e.g. 'hf:wikitext:wikitext-2-raw-v1:test' (got "
                        f"'hf:{spec}').")
    return (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)


def _load_hf(spec: str) -> str:
    """`spec` = "<dataset>[:<config>]:<split>"; rows' "text" fields joined by blank lines."""
    name, config, split = _hf_parts(spec)
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise DataError("Hugging Face datasets need the package 'datasets' (pip install datasets).") from e
    try:
        if _saved_dataset(name):
            ds = _saved_split(datasets.load_from_disk(name), name, split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (offline, unknown name, bad split: all user-fixable)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"Could not load dataset '{spec}': {reason}") from e
    if "text" not in ds.column_names:
        raise DataError(f"Dataset '{spec}' has no 'text' column (columns: {', '.join(ds.column_names)}).")
    texts = [t for t in ds["text"] if isinstance(t, str)]  # a missing row (None) is no text, not an error
    if not texts:
        raise DataError(f"Dataset '{spec}' has no text in its 'text' column.")
    return "\n\n".join(texts)


def _saved_dataset(name: str) -> bool:
    """Whether `name` is a folder written by datasets' save_to_disk (a DatasetDict's or a Dataset's)."""
    folder = Path(name).expanduser()
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _saved_split(saved, name: str, split: str):
    """The `split` of what load_from_disk read: a DatasetDict's split, or a single Dataset saved as that split
    (one saved without a split counts as "train")."""
    if hasattr(saved, "keys"):  # a DatasetDict
        if split not in saved:
            raise DataError(f"The dataset saved in '{name}' has no split '{split}' (it has: {', '.join(saved)}).")
        return saved[split]
    own = str(saved.split or "train")
    if split != own:
        raise DataError(f"'{name}' holds one dataset (saved by Dataset.save_to_disk), split '{own}': name it "
                        f"hf:{name}:{own}.")
    return saved


def split_text(text: str, fraction: float = 0.5) -> tuple[str, str]:
    """Cut `text` into (calibration, evaluation) parts at the line boundary nearest `fraction` of
    its characters. Lines of the second part that also occur in the first (corpora repeat
    documents; the embedded one does) are dropped from it, so calibration never sees evaluation text.
    A text without line breaks is cut at a space."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be in (0, 1), got {fraction}")
    if "\n" not in text.strip():
        cut = text.find(" ", int(len(text) * fraction))
        cut = int(len(text) * fraction) if cut < 0 else cut
        return text[:cut], text[cut + 1:]
    lines = text.split("\n")
    sizes = [len(line) + 1 for line in lines]
    target, acc, i = len(text) * fraction, 0, 0
    while i < len(lines) - 1 and acc + sizes[i] <= target:
        acc += sizes[i]
        i += 1
    i = max(i, 1)
    first = lines[:i]
    seen = {line for line in first if line.strip()}
    second = [line for line in lines[i:] if line not in seen]
    return "\n".join(first), "\n".join(second)


# --------------------------------------------------------------------------------------------
# tokens and windows

_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_MAX = 8
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(tokenizer) -> str:
    """A hash of the whole tokenizer (vocabulary, merges, normalizer), computed once per object: two
    tokenizers with the same name and size but other ids (in-memory ones, a folder saved again) differ."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    fingerprint = hashlib.sha1(f"{type(tokenizer).__name__}\n{state}".encode("utf-8", errors="replace")).hexdigest()
    try:
        _FINGERPRINTS[tokenizer] = fingerprint
    except TypeError:  # not weakly referenceable: hashed again next time
        pass
    return fingerprint


TOKENIZE_CHARS = 2**20  # a fast tokenizer keeps ~100 bytes per character of the text it is given at once


def _pieces(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each but the last ending with a line break before a line
    that starts with one space and a word, or (after a non-space character) with a word: cuts the byte-level
    pretokenizers split at anyway, so the pieces' tokens are the whole text's (one call for a text that fits)."""
    def clean(cut: int) -> bool:  # text[cut - 1] is the line break
        line = text[cut:cut + 2]
        if line[:1] == " ":  # " word": the space goes with the word, the break with what came before
            return len(line) == 2 and not line[1].isspace()
        return line != "" and not line[0].isspace() and not text[cut - 2].isspace()

    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while (cut := text.find("\n", cut) + 1) and cut < len(text) and not clean(cut):
            pass
        if not cut:  # no line break left: the rest in one piece
            break
        pieces.append(text[start:cut])
        start = cut
    return [*pieces, text[start:]]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of `text` as a 1-D LongTensor, no special tokens; cached per (tokenizer, text)."""
    key = (_fingerprint(tokenizer), len(tokenizer), hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest())
    ids = _TOKEN_CACHE.get(key)
    if ids is None:
        # verbose=False: the whole corpus is longer than model_max_length, which is fine here
        ids = torch.cat([torch.tensor(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"],
                                      dtype=torch.long) for piece in _pieces(text, TOKENIZE_CHARS)])
        if len(_TOKEN_CACHE) >= _CACHE_MAX:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = ids
    return ids


def readable_tokens(tokenizer, text: str, label: str) -> torch.Tensor:
    """`tokenize`, refusing an empty text, and a tokenizer that turns a non-empty one into nothing (it cannot
    read it)."""
    if not text.strip():
        raise DataError(f"{label} is empty (nothing but white space); name a text with words in it.")
    ids = tokenize(tokenizer, text)
    if len(ids) == 0:
        raise DataError(f"The model's tokenizer turns {label.lower()} ({len(text):,} characters) into no tokens: it "
                        "cannot read this text (is the tokenizer this model's?).")
    return ids


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError("bos=True, but the tokenizer has no BOS token.")
    return int(bos)


def _check_seqlen(seqlen: int, bos: bool) -> int:
    """Text tokens per window (seqlen, or seqlen-1 when a BOS token takes the first slot)."""
    if int(seqlen) != seqlen or seqlen < 2:
        raise DataError(f"seqlen must be an integer >= 2, got {seqlen}")
    return int(seqlen) - (1 if bos else 0)


def _with_bos(rows: torch.Tensor, tokenizer, bos: bool) -> torch.Tensor:
    if not bos:
        return rows
    col = torch.full((rows.shape[0], 1), _bos_id(tokenizer), dtype=rows.dtype)
    return torch.cat([col, rows], dim=1)


def calibration_batches(tokenizer, text: str, n_samples: int = 16, seqlen: int = 256, seed: int = 0,
                        bos: bool = False) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from `text`, as a (n_samples, seqlen) LongTensor.

    Start positions are drawn uniformly with a generator seeded by `seed`, so the same seed gives
    the same batch. Windows may overlap each other (not the evaluation text, see `split_text`).
    bos: each window starts with the tokenizer's BOS token (models trained so, e.g. Gemma), and
    `seqlen` counts it: a window then holds seqlen - 1 tokens of the text.
    """
    if int(n_samples) != n_samples or n_samples < 1:
        raise DataError(f"n_samples must be a positive integer, got {n_samples}")
    span = _check_seqlen(seqlen, bos)
    ids = readable_tokens(tokenizer, text, "The calibration text")
    if len(ids) < span:
        raise DataError(f"Calibration text has {len(ids)} tokens, fewer than one window of {span}{_bos_note(bos)}; "
                        "use a longer text or shorter windows.")
    rows = torch.stack([ids[s: s + span] for s in _sample_starts(len(ids), span, n_samples, seed)])
    return _with_bos(rows, tokenizer, bos)


def _bos_note(bos: bool) -> str:
    """What a window-length message adds when each window starts with a BOS token (Gemma): the text fills one
    token less than the length asked for."""
    return " (plus the BOS token each window starts with)" if bos else ""


def _sample_starts(n_tokens: int, span: int, n_samples: int, seed: int) -> list[int]:
    """Where the `n_samples` calibration windows of `span` tokens start in a text of `n_tokens` tokens."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_tokens - span + 1, (int(n_samples),), generator=gen).tolist()


def eval_windows(tokenizer, text: str, seqlen: int = 512, bos: bool = False,
                 max_windows: int | None = None, label: str = "Evaluation text") -> torch.Tensor:
    """Consecutive non-overlapping windows of `text` as a (n, seqlen) LongTensor.

    The tail shorter than a window is dropped; `max_windows` keeps only the first windows
    (a fixed prefix of the text, so results stay comparable). bos: as in `calibration_batches` (a
    window of `seqlen` tokens holds seqlen - 1 of the text after the BOS token).
    """
    span = _check_seqlen(seqlen, bos)
    if max_windows is not None and (int(max_windows) != max_windows or max_windows < 1):
        raise DataError(f"max_windows must be a positive integer, got {max_windows}")
    ids = readable_tokens(tokenizer, text, label)
    n = len(ids) // span
    if n == 0:
        raise DataError(f"{label} has {len(ids)} tokens, fewer than one window of {span}{_bos_note(bos)}; use a "
                        "longer text or shorter windows.")
    if max_windows is not None:
        n = min(n, int(max_windows))
    rows = ids[: n * span].view(n, span)
    return _with_bos(rows, tokenizer, bos)


def spread_windows(tokenizer, text: str, seqlen: int, n: int, bos: bool = False) -> torch.Tensor:
    """`n` of the consecutive `seqlen`-token windows of `text` (fewer if it has fewer), spread evenly from
    its first to its last: a fixed sample of the whole text, not of its opening article."""
    return spread(eval_windows(tokenizer, text, seqlen, bos, label="The search text"), n)


def unsampled_windows(tokenizer, text: str, seqlen: int, n: int, n_samples: int, calib_seqlen: int, seed: int,
                      bos: bool = False) -> torch.Tensor | None:
    """`n` of the consecutive `seqlen`-token windows of `text` that share no token with the calibration
    batch `calibration_batches(tokenizer, text, n_samples, calib_seqlen, seed, bos)`, spread evenly as in
    `spread_windows` (fewer if fewer are left): text of the calibration source that the pruners'
    statistics never saw. None when every window overlaps the batch."""
    windows = eval_windows(tokenizer, text, seqlen, bos, label="The calibration text")
    span, calib_span = _check_seqlen(seqlen, bos), _check_seqlen(calib_seqlen, bos)
    ids = tokenize(tokenizer, text)
    seen = torch.zeros(len(ids), dtype=torch.bool)
    if len(ids) >= calib_span:
        for start in _sample_starts(len(ids), calib_span, n_samples, seed):
            seen[start: start + calib_span] = True
    free = windows[~seen[: windows.shape[0] * span].view(-1, span).any(dim=1)]
    return spread(free, n) if free.shape[0] else None


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """`n` of the rows of `windows` (all if it has fewer), evenly spaced from its first to its last."""
    return windows[torch.linspace(0, windows.shape[0] - 1, min(int(n), windows.shape[0])).long()]


def text_file(source: str) -> Path | None:
    """The file a text source reads, or None for the named sources (default, wikitext2:..., hf:...)."""
    src = str(source).strip()
    return None if src == "default" or src.startswith(("wikitext2:", "hf:")) else Path(src).expanduser()


def read_file(source: str) -> Path | None:
    """The file on this machine a text source is read from: a text file, the embedded corpus, or the WikiText-2
    split's file; None for an hf: dataset (read through the datasets library's cache) or a source that names no
    readable file. What a record fingerprints, so a rerun sees a text changed under the same name."""
    src = str(source).strip()
    try:
        path = default_corpus_path() if src == "default" else _wikitext_path(src.split(":", 1)[1]) \
            if src.startswith("wikitext2:") else text_file(src)
        return path if path is not None and path.is_file() else None
    except (DataError, OSError):  # (a name the file system refuses)
        return None


def source_identity(source: str) -> str:
    """What `source` names, whatever its spelling: a file as its resolved absolute path (`my.txt`,
    `./my.txt` and a link to it are one text), any other source as written (stripped)."""
    src = str(source).strip()
    if (path := text_file(src)) is None:
        return src
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a name the file system refuses (too long, a link loop): as written
        return src


def same_source(a: str | None, b: str | None) -> bool:
    """True when two text sources name the same text (`source_identity`)."""
    return a is not None and b is not None and source_identity(a) == source_identity(b)


def text_digest(source: str | None) -> str | None:
    """sha256 of the file a local text source reads (the embedded corpus, WikiText-2, a .txt path), None for
    another source (hf:, whose reading may need the network) or a file not there."""
    path = read_file(source or "")
    try:
        return None if path is None else file_sha256(path)
    except OSError:
        return None


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids as int64 bytes: what a run read, whichever text, split and tokenizer made them (the one
    fingerprint an hf: dataset, read through its library's cache, has)."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read again only when its size or modification time changes (pages ask on every
    rerun, a sweep for every configuration and every stored run)."""
    stamp = path.stat()
    return _file_sha256(str(path.resolve()), stamp.st_size, stamp.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_text(a: str | None, b: str | None) -> bool:
    """`same_source`, or two local files with the same bytes (a copy of the test split under another name)."""
    return same_source(a, b) or (a is not None and b is not None and (d := text_digest(a)) is not None
                                 and d == text_digest(b))


def is_split(source: str, other: str | None) -> bool:
    """The embedded corpus is always cut in halves (its first half calibrates, its second evaluates);
    any other source is cut only when both roles read the same text, by name or by bytes (`same_text`: a
    copy of the test split under another name would otherwise calibrate on the evaluation text)."""
    return str(source).strip() == "default" or same_text(source, other)


def calibration_text(source: str, eval_source: str | None = None, encoding: str = ENCODING) -> str:
    """The text calibration samples are drawn from (see `is_split`)."""
    text = load_text(source, encoding)
    return split_text(text)[0] if is_split(source, eval_source) else text


def evaluation_text(source: str, calibration_source: str | None = None, encoding: str = ENCODING) -> str:
    """The text evaluation windows are cut from (see `is_split`)."""
    text = load_text(source, encoding)
    return split_text(text)[1] if is_split(source, calibration_source) else text
