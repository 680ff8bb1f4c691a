"""Where data lives on disk: the data folder, checked downloads, atomic writes and the token
caches."""

from __future__ import annotations

import http.client
import logging
import os
import pathlib
import tempfile
import urllib.request
from typing import Any, Callable, TypeVar

import numpy as np

DATA_DIR_ENV = "GRASSJAX_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30

log = logging.getLogger(__name__)
T = TypeVar("T")


class DataError(Exception):
    """One-line, user-facing error whose message names the fix (which flag, env var or path)."""


class DownloadError(DataError):
    """A download that did not complete; the message is the one-line reason."""


def one_line(text: object) -> str:
    """`text` with every run of white space folded to one space: error messages stay on one line."""
    return " ".join(str(text).split())


def user_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/grassjax, or ~/.cache/grassjax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "grassjax"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data folder: the explicit argument (--data_dir) > $GRASSJAX_DATA_DIR > the per-user
    cache."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or user_cache_dir()
    return pathlib.Path(chosen).expanduser()


def is_writable_dir(path: pathlib.Path) -> bool:
    """An existing folder we may write in."""
    # root passes os.access on any folder, so also honour the mode bits: a folder someone made
    # read-only (like the shared data) is left alone even when we could write to it.
    try:
        return path.is_dir() and os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def write_atomically(path: pathlib.Path, write: Callable[[Any], Any]) -> None:
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


def fetch(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The whole body at `url`, or DownloadError: refused, unreachable, an HTTP error, a
    truncated body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            # Raises IncompleteRead when the body is shorter than Content-Length.
            return response.read()
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, timeouts: OSError
        raise DownloadError(one_line(err) or type(err).__name__) from None


# --------------------------------------------------------------------------------------------------
# Caches: beside the data, else (read-only data folder) under the per-user cache


def cache_dirs(data_folder: pathlib.Path) -> list[pathlib.Path]:
    """Where caches for `data_folder` live, in order: beside the data, then the per-user cache."""
    return [data_folder, user_cache_dir() / data_folder.name]


def may_write_cache(cache_dir: pathlib.Path, data_folder: pathlib.Path) -> bool:
    """Never write into a read-only data folder (the shared data), even as root; the user cache
    is made on demand."""
    return cache_dir != data_folder or is_writable_dir(data_folder)


def read_token_cache(data_folder: pathlib.Path, name: str, key: str,
                     load: Callable[[dict[str, np.ndarray]], T | None]) -> T | None:
    """load(arrays) of the first cache file `name` whose "key" entry is `key` and that load
    accepts (returns not None); None if there is none (missing, truncated, for another text or
    tokenizer, not ours)."""
    for folder in cache_dirs(data_folder):
        try:
            with np.load(folder / name, allow_pickle=False) as f:
                if str(f["key"]) != key:
                    continue
                loaded = load({k: f[k] for k in f.files if k != "key"})
        except Exception:  # np.load raises many types: try the next, else rebuild the cache
            continue
        if loaded is not None:
            return loaded
    return None


def write_token_cache(data_folder: pathlib.Path, name: str, key: str,
                      arrays: dict[str, np.ndarray]) -> None:
    """Save `arrays` with their key in the first writable cache folder; a cache never fails a
    run."""
    for folder in cache_dirs(data_folder):
        if not may_write_cache(folder, data_folder):
            continue
        path = folder / name
        try:
            write_atomically(path, lambda f: np.savez(f, key=np.array(key), **arrays))
            return
        except OSError as err:
            log.warning("Could not cache tokens at %s (%s)", path, one_line(err))
