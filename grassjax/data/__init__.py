"""The data: token streams and their vocabularies (NumPy; WikiText-2 also needs `tokenizers`).

files (data folder, checked downloads, atomic writes, token caches), char (tiny Shakespeare),
wikitext (WikiText-2, WordPiece), batches (sample_batch, eval_batches: reproducible from seed and
step).
"""

import hashlib

import numpy as np

from grassjax.data.batches import eval_batches, sample_batch
from grassjax.data.char import (SHAKESPEARE_SHA256, SHAKESPEARE_URL, CharDataset, CharVocab,
                                load_char_dataset, load_text)
from grassjax.data.files import (DATA_DIR_ENV, DataError, DownloadError, resolve_data_dir,
                                 user_cache_dir)


def load_dataset(data_cfg, data_dir: str | None):
    """The token streams (train, val) and vocabulary named by config.data.dataset."""
    if data_cfg.dataset == "wikitext2":
        from grassjax.data import wikitext  # imports `tokenizers`: only when asked for

        return wikitext.load_wikitext2(data_dir, vocab_size=data_cfg.vocab_size,
                                       vocab_file=data_cfg.vocab_file or None)
    return load_char_dataset(data_dir, name=data_cfg.dataset, val_fraction=data_cfg.val_fraction,
                             allow_custom_text=data_cfg.allow_custom_text)


def fingerprint(dataset) -> str:
    """sha256 of the token streams a run trains and evaluates on (train, val, and test where there
    is one): two texts with the same characters still differ here."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        tokens = getattr(dataset, split, None)
        if tokens is not None:
            digest.update(f"{split}:{tokens.dtype.str}:{len(tokens)}:".encode())
            digest.update(np.ascontiguousarray(tokens).tobytes())
    return digest.hexdigest()


__all__ = [
    "DATA_DIR_ENV", "SHAKESPEARE_SHA256", "SHAKESPEARE_URL", "CharDataset", "CharVocab",
    "DataError", "DownloadError", "eval_batches", "fingerprint", "load_char_dataset",
    "load_dataset", "load_text", "resolve_data_dir", "sample_batch", "user_cache_dir",
]
