"""WikiText-2 (raw) as BERT-style WordPiece tokens, in NumPy and the `tokenizers` library (no JAX).

Where the files come from (placed by hand, an offline Hugging Face cache, or the checked archive
download), how lines become one token stream, and where the tokenizer and tokens are cached: the
README's WikiText-2 section. The official files' sha256 are the constants below; a mismatch only
warns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from grassjax.data.char import token_ids
from grassjax.data.files import (DATA_DIR_ENV, DataError, DownloadError, cache_dirs, fetch,
                                 may_write_cache, one_line, read_token_cache, resolve_data_dir,
                                 write_token_cache)

WIKITEXT_DIR = "wikitext-2-raw"
WIKITEXT_ARCHIVE = "wikitext-2-raw-v1.zip"
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
# Published sha256 of the official files (as projects pinning the archive publish them); a
# mismatch only warns.
WIKITEXT_SHA256 = {
    "train": "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
    "val": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}
WIKITEXT_ARCHIVE_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
# Known addresses of the official archive, tried in order when the files are missing.
WIKITEXT_URLS = (
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
)
# The Hugging Face names of the same data, read only from a local cache.
HF_DATASET_NAMES = ("wikitext", "Salesforce/wikitext")
HF_CONFIG = "wikitext-2-raw-v1"
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}

PAPER_VOCAB_SIZE = 30522
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
UNK_TOKEN = "[UNK]"
WORDPIECE_PREFIX = "##"
DEFAULT_MIN_FREQUENCY = 2
LIMIT_ALPHABET = 1000  # BertWordPieceTokenizer.train's default
_UINT16_IDS = np.iinfo(np.uint16).max + 1
_TOKEN_CACHE_FORMAT = 1

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The vocabulary


def _bert_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Give a WordPiece tokenizer BERT's normalizer, pre-tokenizer, decoder and [CLS] x [SEP]
    template."""
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    # Only for tokenizer.encode(add_special_tokens=True).
    if cls_id is not None and sep_id is not None:
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    return tokenizer


class WordPieceVocab:
    """Text <-> uint16 token ids with a BERT-style WordPiece tokenizer (the duck type of
    data.CharVocab).

    encode never adds [CLS]/[SEP]: a language-model stream is plain text. Lowercasing, accent
    stripping and punctuation splitting make decode(encode(text)) the normalized text, not `text`
    itself.
    """

    def __init__(self, tokenizer: Tokenizer | str):
        if isinstance(tokenizer, str):
            try:
                tokenizer = Tokenizer.from_str(tokenizer)
            except Exception as err:  # tokenizers raises its own exception types
                raise DataError(f"not a tokenizer JSON ({one_line(err)})") from err
        if not isinstance(tokenizer, Tokenizer):
            raise DataError(f"WordPieceVocab takes a tokenizers.Tokenizer or its JSON, got "
                            f"{type(tokenizer)}")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 < size <= _UINT16_IDS:
            raise DataError(f"a {size}-token vocabulary does not fit uint16 token ids "
                            f"(at most {_UINT16_IDS})")
        self._tokenizer = tokenizer
        self._json = tokenizer.to_str()
        self._size = size

    # -- construction

    @classmethod
    def from_vocab_file(cls, vocab_file: str | os.PathLike) -> WordPieceVocab:
        """A BERT vocab.txt (one token per line, id = line number), uncased:
        BertWordPieceTokenizer's setup."""
        path = pathlib.Path(vocab_file).expanduser()
        if not path.is_file():
            raise DataError(f"vocab file {path} not found; pass vocab_file= a BERT vocab.txt "
                            f"(one token a line)")
        try:
            model = models.WordPiece.from_file(str(path), unk_token=UNK_TOKEN)
        except Exception as err:
            raise DataError(f"cannot read {path} as a WordPiece vocab.txt "
                            f"({one_line(err)})") from err
        tokenizer = Tokenizer(model)
        if tokenizer.token_to_id(UNK_TOKEN) is None:
            raise DataError(f"{path} has no {UNK_TOKEN} token; a BERT vocab.txt lists it "
                            f"(bert-base-uncased: id 100)")
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS
                                      if tokenizer.token_to_id(t) is not None])
        return cls(_bert_pipeline(tokenizer))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordPieceVocab:
        """A tokenizer saved as JSON (tokenizer.json, or this module's cached wordpiece-*.json)."""
        try:
            return cls(pathlib.Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read tokenizer {path} ({one_line(err)})") from err

    # -- the CharVocab interface

    @property
    def size(self) -> int:
        return self._size

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(int(token_id))

    def encode(self, text: str) -> np.ndarray:
        """str -> uint16 ids of shape (N,), without special tokens (whitespace-only text gives
        N = 0)."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids,
                          dtype=np.uint16)

    def encode_lines(self, lines: Sequence[str]) -> np.ndarray:
        """Encode lines in parallel and concatenate them: one uint16 stream (the lines' texts, no
        separators)."""
        if not lines:
            return np.zeros((0,), np.uint16)
        batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = batch(list(lines), add_special_tokens=False)
        return np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """Ids of shape (N,) (list, NumPy or JAX array) -> text, with "##" pieces joined to their
        words."""
        ids = token_ids(ids, self.size, "token")
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, saved next to checkpoints: the whole tokenizer, so a run can be decoded
        later."""
        return {"kind": "wordpiece", "tokenizer": self._json}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WordPieceVocab:
        if d.get("kind") != "wordpiece" or not isinstance(d.get("tokenizer"), str):
            raise DataError("not a WordPiece vocabulary dict (expected kind 'wordpiece' and a "
                            "tokenizer string)")
        return cls(d["tokenizer"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> WordPieceVocab:
        return cls.from_dict(json.loads(s))

    @property
    def sha256(self) -> str:
        """Identifies the tokenizer (its JSON)."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordPieceVocab) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"WordPieceVocab(size={self.size}, sha256={self.sha256[:12]})"


def train_wordpiece(lines: Sequence[str], *, vocab_size: int = PAPER_VOCAB_SIZE,
                    min_frequency: int = DEFAULT_MIN_FREQUENCY) -> WordPieceVocab:
    """Train a BERT-style WordPiece tokenizer on `lines` (BertWordPieceTokenizer.train's
    settings)."""
    tokenizer = _bert_pipeline(Tokenizer(models.WordPiece(unk_token=UNK_TOKEN)))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS),
                                        limit_alphabet=LIMIT_ALPHABET,
                                        continuing_subword_prefix=WORDPIECE_PREFIX,
                                        show_progress=False)
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # Again: [CLS]/[SEP] have ids only after training.
    vocab = WordPieceVocab(_bert_pipeline(tokenizer))
    if vocab.size > vocab_size:  # the trainer always keeps the whole alphabet, "##" forms included
        log.warning("The WordPiece alphabet alone has more than vocab_size=%d tokens; the "
                    "vocabulary has %d", vocab_size, vocab.size)
    return vocab


# --------------------------------------------------------------------------------------------------
# The text


def _kept_lines(text: str) -> list[str]:
    """The non-blank lines, stripped (BERT pre-tokenization ignores the leading/trailing spaces
    anyway)."""
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def _read_split_files(folder: pathlib.Path) -> dict[str, bytes] | None:
    """split -> raw bytes of the three files, None if none exist; DataError if only some do."""
    paths = {split: folder / name for split, name in WIKITEXT_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if len(missing) == len(paths):
        return None
    if missing:
        raise DataError(_missing_message(folder, missing))
    out = {}
    for split, path in paths.items():
        try:
            out[split] = path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {path} ({one_line(err)}); check its permissions") from err
    return out


def _missing_message(folder: pathlib.Path, missing: Sequence[str]) -> str:
    names = ", ".join(WIKITEXT_FILES.values())
    return (f"WikiText-2 not found: {folder} is missing {', '.join(missing)}; unzip the official "
            f"{WIKITEXT_ARCHIVE} in {folder.parent} so that {folder}/ holds {names}, or pass "
            f"--data_dir=DIR (or set {DATA_DIR_ENV}=DIR) where DIR/{WIKITEXT_DIR}/ holds them")


def _load_from_hf_cache() -> dict[str, bytes] | None:
    """The splits from a locally cached Hugging Face `datasets` copy, offline; None if unavailable.

    Rows are the files' lines ("" for blank ones), so they are joined back into text. Offline
    through the library's documented switches (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE), which it
    reads when imported: if `datasets` was imported before with them off, this route is skipped
    rather than risk a download. Install it with the optional extra: pip install -e .[hf].
    """
    env_keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    already_imported = "datasets" in sys.modules
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: "1" for k in env_keys})
    try:
        try:
            import datasets  # optional (the "hf" extra)
        except ImportError:
            return None
        offline = getattr(getattr(datasets, "config", None), "HF_DATASETS_OFFLINE", True)
        if already_imported and not offline:
            log.debug("datasets was imported online before; not reading the Hugging Face cache")
            return None
        for name in HF_DATASET_NAMES:
            try:
                ds = datasets.load_dataset(name, HF_CONFIG)
                out = {}
                for split, hf_split in HF_SPLITS.items():
                    rows = [row if row.endswith("\n") else row + "\n"
                            for row in ds[hf_split]["text"]]
                    out[split] = "".join(rows).encode("utf-8")
                log.info("Using the cached Hugging Face copy of %s/%s", name, HF_CONFIG)
                return out
            except Exception as err:
                # Not cached, offline, or another datasets version: try the next, then give up.
                log.debug("No offline Hugging Face copy of %s/%s (%s)", name, HF_CONFIG,
                          one_line(err))
        return None
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_wikitext2_text(data_dir: str | os.PathLike | None = None
                        ) -> tuple[dict[str, bytes], pathlib.Path]:
    """(split -> raw bytes of wiki.{train,valid,test}.raw, the folder they belong to).

    Splits are keyed "train", "val", "test". Falls back to an offline Hugging Face cache, then to
    the download; DataError if none works.
    """
    folder = resolve_data_dir(data_dir) / WIKITEXT_DIR
    raw = _read_split_files(folder)
    if raw is None:
        raw = _load_from_hf_cache()
        if raw is not None:
            return raw, folder
        download_wikitext2(folder.parent)  # DataError (naming --data_dir) if no address works
        raw = _read_split_files(folder)
    for split, data in raw.items():
        actual = hashlib.sha256(data).hexdigest()
        if actual != WIKITEXT_SHA256[split]:
            log.warning("%s has sha256 %s, not the official %s; using it anyway",
                        folder / WIKITEXT_FILES[split], actual[:12], WIKITEXT_SHA256[split][:12])
    return raw, folder


def download_wikitext2(root: str | os.PathLike, urls: Sequence[str] | None = None,
                       sha256: str | None = None) -> pathlib.Path:
    """Download the official archive into root/wikitext-2-raw/ (trying `urls` in order); the folder.

    The archive must hash to `sha256` (WIKITEXT_ARCHIVE_SHA256); only the three files are taken
    from it, into a temporary folder under root that is renamed into place, so nothing partial is
    ever kept.
    """
    root = pathlib.Path(root)
    urls = WIKITEXT_URLS if urls is None else urls
    sha256 = sha256 or WIKITEXT_ARCHIVE_SHA256
    failures = []
    for url in urls:
        log.warning("Downloading %s", url)
        try:
            archive = fetch(url)
        except DownloadError as err:
            failures.append(f"{url}: {err}")
            continue
        actual = hashlib.sha256(archive).hexdigest()
        if actual != sha256:
            failures.append(f"{url}: sha256 {actual[:12]}, expected {sha256[:12]}")
            continue
        return _unpack(archive, root)
    missing = _missing_message(root / WIKITEXT_DIR, list(WIKITEXT_FILES.values()))
    raise DataError(f"{missing}. The download failed, nothing was kept "
                    f"({'; '.join(failures) or 'no address'})")


def _unpack(archive: bytes, root: pathlib.Path) -> pathlib.Path:
    import io
    import shutil
    import zipfile

    target = root / WIKITEXT_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=f".{WIKITEXT_DIR}-"))
    except OSError as err:
        raise DataError(f"cannot write the downloaded WikiText-2 to {root} ({one_line(err)}); pass "
                        f"--data_dir=DIR pointing at a writable folder") from None
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            # Only these, by name: no path in the archive is trusted.
            for name in WIKITEXT_FILES.values():
                (tmp / name).write_bytes(zf.read(f"{WIKITEXT_DIR}/{name}"))
        # Atomic; fails if another process unpacked it first, which is as good.
        os.rename(tmp, target)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"the WikiText-2 archive does not hold {WIKITEXT_DIR}/ and its three files "
                        f"({one_line(err)}); nothing was kept") from None
    except OSError as err:
        if not all((target / n).is_file() for n in WIKITEXT_FILES.values()):
            raise DataError(f"cannot unpack WikiText-2 into {target} ({one_line(err)}); pass "
                            f"--data_dir=DIR pointing at a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _decode(data: bytes, split: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{WIKITEXT_FILES[split]} is not UTF-8 text ({one_line(err)}); use the "
                        f"official files from {WIKITEXT_ARCHIVE}") from err


# --------------------------------------------------------------------------------------------------
# Caches


def tokenizer_cache_name(vocab_size: int, train_sha256: str,
                         min_frequency: int = DEFAULT_MIN_FREQUENCY) -> str:
    minimum = "" if min_frequency == DEFAULT_MIN_FREQUENCY else f"-min{min_frequency}"
    return f"wordpiece-{vocab_size}{minimum}-{train_sha256[:12]}.json"


def _publish_once(path: pathlib.Path, content: str) -> str:
    """Save `content` at `path` unless another process got there first; return what `path`
    then holds.

    Training is not deterministic, so two processes training at once (two arms of a comparison)
    must end up with the same tokenizer: the first file written wins and the loser adopts it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8"))
        try:
            os.link(tmp, path)  # atomic, and fails if the file exists
        except FileExistsError:
            try:
                existing = path.read_text(encoding="utf-8")
                Tokenizer.from_str(existing)
                return existing
            except Exception:  # unreadable or not a tokenizer: replace it
                os.replace(tmp, path)
        except OSError:  # no hard links on this filesystem
            os.replace(tmp, path)
        return content
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


# Tokenizers trained in this process, so repeated loads agree even when no cache folder is writable.
_TRAINED: dict[tuple[str, int, int], WordPieceVocab] = {}


def _trained_vocab(train_lines: list[str], train_sha256: str, data_folder: pathlib.Path, *,
                   vocab_size: int, min_frequency: int) -> WordPieceVocab:
    key = (train_sha256, vocab_size, min_frequency)
    name = tokenizer_cache_name(vocab_size, train_sha256, min_frequency)
    candidates = [d / name for d in cache_dirs(data_folder)]
    for path in candidates:
        if path.is_file():
            try:
                vocab = WordPieceVocab.from_file(path)
            except DataError as err:
                log.warning("Ignoring the unreadable cached tokenizer %s (%s)", path, err)
                continue
            _TRAINED[key] = vocab
            return vocab
    if key in _TRAINED:
        return _TRAINED[key]

    log.info("Training a %d-token WordPiece tokenizer on %d lines", vocab_size, len(train_lines))
    vocab = train_wordpiece(train_lines, vocab_size=vocab_size, min_frequency=min_frequency)
    for path in candidates:
        if not may_write_cache(path.parent, data_folder):
            continue
        try:
            saved = _publish_once(path, vocab.to_dict()["tokenizer"])
            vocab = vocab if saved == vocab.to_dict()["tokenizer"] else WordPieceVocab(saved)
            log.info("Saved the tokenizer to %s", path)
            break
        except OSError as err:
            # A cache is an optimisation, but say how to keep the tokenizer stable.
            log.warning("Could not save the tokenizer at %s (%s); pass --data_dir=DIR pointing at "
                        "a writable folder so later runs reuse it", path, one_line(err))
    _TRAINED[key] = vocab
    return vocab


def _tokens_key(vocab: WordPieceVocab, split_sha256: Mapping[str, str]) -> str:
    blob = json.dumps({"format": _TOKEN_CACHE_FORMAT, "tokenizer": vocab.sha256,
                       "splits": dict(split_sha256)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# The dataset


# eq=False: dataclass equality and hashing would compare the arrays, which NumPy cannot reduce to
# one bool.
@dataclasses.dataclass(frozen=True, eq=False)
class TokenDataset:
    """WikiText-2's three splits, each one contiguous uint16 token stream (read-only arrays)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab: WordPieceVocab


def load_wikitext2(data_dir: str | os.PathLike | None = None, *, vocab_size: int = PAPER_VOCAB_SIZE,
                   vocab_file: str | os.PathLike | None = None,
                   min_frequency: int = DEFAULT_MIN_FREQUENCY) -> TokenDataset:
    """WikiText-2 raw as WordPiece tokens; the README's WikiText-2 section describes the files,
    tokenizer and caches.

    vocab_file: a BERT vocab.txt to use instead of training (vocab_size and min_frequency are then
    unused).
    """
    if vocab_file is None:
        if not 0 < vocab_size <= _UINT16_IDS:
            raise DataError(f"vocab_size must be in [1, {_UINT16_IDS}] for uint16 tokens, got "
                            f"{vocab_size}")
        if min_frequency < 0:
            raise DataError(f"min_frequency must be >= 0, got {min_frequency}")
    raw, data_folder = load_wikitext2_text(data_dir)
    split_sha256 = {split: hashlib.sha256(data).hexdigest() for split, data in raw.items()}
    lines = {split: _kept_lines(_decode(data, split)) for split, data in raw.items()}
    if not lines["train"]:
        raise DataError(f"{data_folder / WIKITEXT_FILES['train']} has no text; use the official "
                        f"files from {WIKITEXT_ARCHIVE}")

    if vocab_file is not None:
        vocab = WordPieceVocab.from_vocab_file(vocab_file)
    else:
        vocab = _trained_vocab(lines["train"], split_sha256["train"], data_folder,
                               vocab_size=vocab_size, min_frequency=min_frequency)

    key = _tokens_key(vocab, split_sha256)
    cache_name = f"tokens-wordpiece-{key[:12]}.npz"
    valid = lambda arrays: arrays if all(arrays[s].dtype == np.uint16 and arrays[s].ndim == 1
                                         for s in WIKITEXT_FILES) else None
    tokens = read_token_cache(data_folder, cache_name, key, valid)
    if tokens is None:
        tokens = {split: vocab.encode_lines(split_lines) for split, split_lines in lines.items()}
        write_token_cache(data_folder, cache_name, key, tokens)
    for array in tokens.values():
        array.flags.writeable = False
    return TokenDataset(train=tokens["train"], val=tokens["val"], test=tokens["test"], vocab=vocab)
