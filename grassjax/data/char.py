"""Character-level text (tiny Shakespeare by default): the checked text, its vocabulary and
token streams."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from grassjax.data.files import (DATA_DIR_ENV, DataError, DownloadError, fetch, one_line,
                                 read_token_cache, resolve_data_dir, write_atomically,
                                 write_token_cache)

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_FILE = "input.txt"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The text


def load_text(data_dir: str | os.PathLike | None = None, *, name: str = "tinyshakespeare",
              allow_custom_text: bool = False, download: bool = True, url: str = SHAKESPEARE_URL,
              sha256: str = SHAKESPEARE_SHA256) -> str:
    """The text at <data_dir>/<name>/input.txt, downloaded from `url` if missing.

    The file must hash to `sha256` unless allow_custom_text is set; a download must always match,
    and one that does not is never kept. `url` and `sha256` default to tiny Shakespeare (tests
    pass a file:// URL).
    """
    path = resolve_data_dir(data_dir) / name / TEXT_FILE
    fix = (f"put {TEXT_FILE} at {path}, or pass --data_dir=DIR (or set {DATA_DIR_ENV}=DIR) "
           f"pointing at a folder containing {name}/{TEXT_FILE}")

    if path.is_file():
        raw = path.read_bytes()
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256 and not allow_custom_text:
            raise DataError(f"{path} has sha256 {actual}, expected {sha256} ({name}); replace it "
                            f"with the real file, or pass --config.data.allow_custom_text=True to "
                            f"train on your own text")
    elif path.exists():  # a folder (or a device) where the file should be: no download
        raise DataError(f"{path} is not a file; {fix}")
    elif not download:
        raise DataError(f"{name} not found at {path} and downloading is off; {fix}")
    else:
        log.info("Downloading %s to %s", url, path)
        try:
            raw = fetch(url)
        except DownloadError as err:
            raise DataError(f"{name} not found at {path} and the download from {url} failed "
                            f"({err}); {fix}") from None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise DataError(f"the download from {url} has sha256 {actual}, expected {sha256}, so "
                            f"it was not saved; retry, or {fix}")
        try:
            write_atomically(path, lambda f: f.write(raw))
        except OSError as err:
            # The verified text is in memory; failing to keep it only costs a download next time.
            log.warning("Could not save %s (%s); pass --data_dir=DIR pointing at a writable "
                        "folder", path, one_line(err))

    try:
        # Decode the bytes ourselves: text mode would rewrite \r\n and the text would no longer
        # match its hash.
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({one_line(err)}); save it as UTF-8") from err


# --------------------------------------------------------------------------------------------------
# The vocabulary


def token_ids(ids: Iterable[int] | np.ndarray, vocab_size: int, unit: str) -> np.ndarray:
    """Ids of shape (N,) (list, generator, NumPy or JAX array) as int64, checked against a
    `vocab_size`-`unit` vocabulary: what every vocabulary's decode takes."""
    # list() also takes generators.
    ids = np.asarray(ids if hasattr(ids, "__array__") else list(ids))
    if ids.ndim > 1:
        raise DataError(f"decode takes one sequence of ids, got shape {ids.shape}; decode each row")
    ids = ids.reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise DataError(f"token id {bad} is outside the {vocab_size}-{unit} vocabulary")
    return ids


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Characters <-> token ids: id i is the i-th character in sorted order."""

    chars: tuple[str, ...]
    # Code points of `chars`, ascending, for vectorised encoding with searchsorted.
    _codes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        chars = tuple(self.chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise DataError(f"a vocabulary is a non-empty sequence of single characters, got "
                            f"{chars!r:.80}")
        if list(chars) != sorted(set(chars)):
            raise DataError("vocabulary characters must be unique and sorted; build it with "
                            "CharVocab.from_text")
        if len(chars) > np.iinfo(np.uint16).max + 1:
            raise DataError(f"{len(chars)} distinct characters do not fit uint16 tokens "
                            f"(at most 65536)")
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
            raise DataError(f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not "
                            f"in the {self.size}-character vocabulary; use only characters from "
                            f"the training text")
        return ids.astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Ids of shape (N,) (list, NumPy or JAX array) -> str of length N."""
        return "".join(self.chars[i] for i in token_ids(ids, self.size, "character").tolist())

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


# --------------------------------------------------------------------------------------------------
# The dataset


# eq=False: dataclass equality and hashing would compare the arrays, which NumPy cannot reduce to
# one bool.
@dataclasses.dataclass(frozen=True, eq=False)
class CharDataset:
    """A text as uint16 tokens, split contiguously as nanoGPT does: the first part trains, the
    rest validates."""

    train: np.ndarray  # (N_train,) uint16, the first 1 - val_fraction of the text
    val: np.ndarray  # (N_val,) uint16, the last val_fraction
    vocab: CharVocab
    text_sha256: str


def load_char_dataset(data_dir: str | os.PathLike | None = None, *, name: str = "tinyshakespeare",
                      val_fraction: float = 0.1, allow_custom_text: bool = False,
                      download: bool = True) -> CharDataset:
    """Load (see load_text), encode and split a text, reusing cached tokens when the text is
    unchanged.

    Tokens are cached at <data_dir>/<name>/tokens-<sha[:12]>.npz, or in the same place under the
    per-user cache when that folder is read-only. The cache holds the whole token stream, so any
    val_fraction reuses it.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--config.data.val_fraction must be in (0, 1), got {val_fraction}")
    text = load_text(data_dir, name=name, allow_custom_text=allow_custom_text, download=download)
    # load_text read exactly these bytes.
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    folder = resolve_data_dir(data_dir) / name
    cache_name = f"tokens-{text_sha256[:12]}.npz"

    def load(arrays):
        tokens = arrays["tokens"]
        if tokens.dtype != np.uint16 or tokens.shape != (len(text),):
            return None
        return tokens, CharVocab(tuple(arrays["chars"].tolist()))

    cached = read_token_cache(folder, cache_name, text_sha256, load)
    if cached is not None:
        tokens, vocab = cached
    else:
        vocab = CharVocab.from_text(text)
        tokens = vocab.encode(text)
        write_token_cache(folder, cache_name, text_sha256,
                          {"tokens": tokens, "chars": np.array(vocab.chars)})

    tokens.flags.writeable = False  # train and val are views of one shared array
    n_train = int(len(tokens) * (1 - val_fraction))
    return CharDataset(train=tokens[:n_train], val=tokens[n_train:], vocab=vocab,
                       text_sha256=text_sha256)


