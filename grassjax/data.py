"""Character-level tiny Shakespeare, in plain NumPy.

The text is found at <data_dir>/<name>/input.txt, where data_dir is the --data_dir flag, else
$GRASSJAX_DATA_DIR, else a per-user cache folder. A missing tiny Shakespeare is downloaded once and checked
against its sha256. The encoded tokens (uint16) are cached beside the text, or in the per-user cache when that
folder is read-only. Batches are a pure function of (seed, step), so a resumed run sees the same data stream.

    dataset = load_char_dataset()                  # CharDataset: train, val (uint16), vocab, text_sha256
    x, y = sample_batch(dataset.train, batch_size=12, block_size=64, seed=0, step=0)   # int32 (12, 64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import http.client
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_DIR_ENV = "GRASSJAX_DATA_DIR"
TEXT_FILE = "input.txt"
DOWNLOAD_TIMEOUT_S = 30

# Evaluation windows come from their own random stream: a "step" no training run reaches.
_EVAL_STREAM = 2**63

log = logging.getLogger(__name__)


class DataError(Exception):
    """One-line, user-facing error whose message names the fix (which flag, env var or path)."""


# ----------------------------------------------------------------------------------------------------------
# Where the data lives


def user_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/grassjax, or ~/.cache/grassjax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "grassjax"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data folder: the explicit argument (--data_dir) > $GRASSJAX_DATA_DIR > the per-user cache."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or user_cache_dir()
    return pathlib.Path(chosen).expanduser()


def _is_writable_dir(path: pathlib.Path) -> bool:
    # root passes os.access on any folder, so also honour the mode bits: a folder someone made
    # read-only (like the shared data) is left alone even when we could write to it.
    try:
        return path.is_dir() and os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def _write_atomically(path: pathlib.Path, write: Any) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    A crash or a concurrent writer never leaves a half-written file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class DownloadError(DataError):
    """A download that did not complete; the message is the one-line reason."""


def fetch(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The whole body at `url`, or DownloadError: refused, unreachable, an HTTP error, a truncated body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()  # raises IncompleteRead when the body is shorter than Content-Length
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, timeouts: OSError
        raise DownloadError(_one_line(err) or type(err).__name__) from None


# ----------------------------------------------------------------------------------------------------------
# The text


def load_text(data_dir: str | os.PathLike | None = None, *, name: str = "tinyshakespeare",
              allow_custom_text: bool = False, download: bool = True, url: str = SHAKESPEARE_URL,
              sha256: str = SHAKESPEARE_SHA256) -> str:
    """The text at <data_dir>/<name>/input.txt, downloaded from `url` if missing.

    The file must hash to `sha256` unless allow_custom_text is set; a download must always match, and one that
    does not is never kept. `url` and `sha256` default to tiny Shakespeare (tests pass a file:// URL).
    """
    path = resolve_data_dir(data_dir) / name / TEXT_FILE
    fix = (f"put {TEXT_FILE} at {path}, or pass --data_dir=DIR (or set {DATA_DIR_ENV}=DIR) "
           f"pointing at a folder containing {name}/{TEXT_FILE}")

    if path.is_file():
        raw = path.read_bytes()
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256 and not allow_custom_text:
            raise DataError(f"{path} has sha256 {actual}, expected {sha256} ({name}); replace it with the real "
                            f"file, or pass --config.data.allow_custom_text=True to train on your own text")
    elif not download:
        raise DataError(f"{name} not found at {path} and downloading is off; {fix}")
    else:
        log.info("Downloading %s to %s", url, path)
        try:
            raw = fetch(url)
        except DownloadError as err:
            raise DataError(f"{name} not found at {path} and the download from {url} failed ({err}); {fix}") from None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise DataError(f"the download from {url} has sha256 {actual}, expected {sha256}, so it was not "
                            f"saved; retry, or {fix}")
        try:
            _write_atomically(path, lambda f: f.write(raw))
        except OSError as err:
            # The verified text is in memory; failing to keep it only costs a download next time.
            log.warning("Could not save %s (%s); pass --data_dir=DIR pointing at a writable folder", path,
                        _one_line(err))

    try:
        # Decode the bytes ourselves: text mode would rewrite \r\n and the text would no longer match its hash.
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({_one_line(err)}); save it as UTF-8") from err


# ----------------------------------------------------------------------------------------------------------
# The vocabulary


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Characters <-> token ids: id i is the i-th character in sorted order."""

    chars: tuple[str, ...]
    # Code points of `chars`, ascending, for vectorised encoding with searchsorted.
    _codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        chars = tuple(self.chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise DataError(f"a vocabulary is a non-empty sequence of single characters, got {chars!r:.80}")
        if list(chars) != sorted(set(chars)):
            raise DataError("vocabulary characters must be unique and sorted; build it with CharVocab.from_text")
        if len(chars) > np.iinfo(np.uint16).max + 1:
            raise DataError(f"{len(chars)} distinct characters do not fit uint16 tokens (at most 65536)")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_codes", np.array([ord(c) for c in chars], dtype=np.uint32))

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every distinct character in `text`."""
        if not text:
            raise DataError("cannot build a vocabulary from empty text; check the data file")
        return cls(tuple(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str of length N -> uint16 ids of shape (N,)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, self.size - 1)] == codes
        if not known.all():
            i = int(np.argmin(known))
            raise DataError(f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not in the "
                            f"{self.size}-character vocabulary; use only characters from the training text")
        return ids.astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Ids of shape (N,) (list, NumPy or JAX array) -> str of length N."""
        ids = np.asarray(ids if hasattr(ids, "__array__") else list(ids))  # list() also takes generators
        if ids.ndim > 1:
            raise DataError(f"decode takes one sequence of ids, got shape {ids.shape}; decode each row")
        ids = ids.reshape(-1).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = int(ids[(ids < 0) | (ids >= self.size)][0])
            raise DataError(f"token id {bad} is outside the {self.size}-character vocabulary")
        return "".join(self.chars[i] for i in ids.tolist())

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-ready form, saved next to checkpoints."""
        return {"chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CharVocab:
        return cls(tuple(d["chars"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> CharVocab:
        return cls.from_dict(json.loads(s))


# ----------------------------------------------------------------------------------------------------------
# The dataset


# eq=False: dataclass equality and hashing would compare the arrays, which NumPy cannot reduce to one bool.
@dataclasses.dataclass(frozen=True, eq=False)
class CharDataset:
    """A text as uint16 tokens, split contiguously as nanoGPT does: the first part trains, the rest validates."""

    train: np.ndarray  # (N_train,) uint16, the first 1 - val_fraction of the text
    val: np.ndarray  # (N_val,) uint16, the last val_fraction
    vocab: CharVocab
    text_sha256: str


def _read_token_cache(path: pathlib.Path, text_sha256: str, num_chars: int) -> tuple[np.ndarray, CharVocab] | None:
    """(tokens, vocab) from a cache file, or None if it is missing, unreadable or for another text."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["text_sha256"]) != text_sha256:
                return None
            tokens, vocab = f["tokens"], CharVocab(tuple(f["chars"].tolist()))
    except Exception:  # missing, truncated or not ours (np.load raises many types): rebuild it
        return None
    if tokens.dtype != np.uint16 or tokens.shape != (num_chars,):
        return None
    return tokens, vocab


def _write_token_cache(path: pathlib.Path, tokens: np.ndarray, vocab: CharVocab, text_sha256: str) -> None:
    _write_atomically(path, lambda f: np.savez(f, tokens=tokens, chars=np.array(vocab.chars),
                                               text_sha256=np.array(text_sha256)))


def load_char_dataset(data_dir: str | os.PathLike | None = None, *, name: str = "tinyshakespeare",
                      val_fraction: float = 0.1, allow_custom_text: bool = False,
                      download: bool = True) -> CharDataset:
    """Load (see load_text), encode and split a text, reusing cached tokens when the text is unchanged.

    Tokens are cached at <data_dir>/<name>/tokens-<sha[:12]>.npz, or in the same place under the per-user
    cache when that folder is read-only. The cache holds the whole token stream, so any val_fraction reuses it.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--config.data.val_fraction must be in (0, 1), got {val_fraction}")
    text = load_text(data_dir, name=name, allow_custom_text=allow_custom_text, download=download)
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()  # load_text read exactly these bytes

    cache_name = f"tokens-{text_sha256[:12]}.npz"
    beside_text = resolve_data_dir(data_dir) / name
    candidates = [beside_text / cache_name, user_cache_dir() / name / cache_name]

    cached = None
    for path in candidates:
        cached = _read_token_cache(path, text_sha256, len(text))
        if cached is not None:
            break
    if cached is None:
        vocab = CharVocab.from_text(text)
        tokens = vocab.encode(text)
        for path in candidates:
            if path.parent == beside_text and not _is_writable_dir(beside_text):
                continue
            try:
                _write_token_cache(path, tokens, vocab, text_sha256)
                break
            except OSError as err:  # a cache is an optimisation: never fail a run over it
                log.warning("Could not cache tokens at %s (%s)", path, _one_line(err))
    else:
        tokens, vocab = cached

    tokens.flags.writeable = False  # train and val are views of one shared array
    n_train = int(len(tokens) * (1 - val_fraction))
    return CharDataset(train=tokens[:n_train], val=tokens[n_train:], vocab=vocab, text_sha256=text_sha256)


# ----------------------------------------------------------------------------------------------------------
# Batches


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows tokens[s : s + block_size + 1] for every s in `starts` (any shape S) -> x, y int32 (*S, T)."""
    # One fancy-indexing gather for the whole batch: (*S, 1) + (T + 1,) -> (*S, T + 1).
    windows = tokens[starts[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return windows[..., :-1], windows[..., 1:]


def _check_tokens(tokens: np.ndarray, batch_size: int, block_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be one stream of shape (N,), got shape {tokens.shape}")
    if batch_size < 1 or block_size < 1:
        raise DataError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if len(tokens) < block_size + 1:
        raise DataError(f"{len(tokens)} tokens cannot fill a window of block_size + 1 = {block_size + 1}; "
                        f"lower --config.data.block_size (or use a longer text / smaller val_fraction)")
    return tokens


def sample_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int,
                 step: int) -> tuple[np.ndarray, np.ndarray]:
    """A random training batch: x, y int32 of shape (B, T), where y is x shifted one token left.

    The windows depend on (seed, step) alone, so a resumed run sees exactly the data it would have seen.
    """
    tokens = _check_tokens(tokens, batch_size, block_size)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)  # last window ends at the last token
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, *, batch_size: int, block_size: int, num_batches: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of batches for estimating the loss: x, y int32 of shape (num_batches, B, T).

    The same every time for a seed, so successive evaluations are comparable, and drawn from a random stream
    that sample_batch never uses.
    """
    tokens = _check_tokens(tokens, batch_size, block_size)
    if num_batches < 1:
        raise DataError(f"--config.train.eval_batches must be >= 1, got {num_batches}")
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    starts = rng.integers(0, len(tokens) - block_size, size=(num_batches, batch_size))
    return _windows(tokens, starts, block_size)
