"""grassjax.data: vocabulary, download and checksums, token cache, splits, reproducible batches."""

import hashlib
import json
import os
import pathlib
import stat
import urllib.request

import numpy as np
import pytest

from grassjax import data
from grassjax.data import CharVocab, DataError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"


def make_text(n=5000, seed=0):
    """A deterministic text with letters, punctuation, newlines and one non-ASCII character."""
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFG,.;:!?'\n") + ["é"]
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(alphabet, size=n))


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_text(root, text, name="tinyshakespeare"):
    path = root / name / "input.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test off the real ~/.cache, $GRASSJAX_DATA_DIR and the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        assert str(url).startswith("file:"), f"test tried to reach the network: {url}"
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


def user_cache(tmp_path):
    return tmp_path / "xdg" / "grassjax"


# ---------------------------------------------------------------------------------------------- vocabulary


def test_vocab_is_sorted_and_round_trips_as_uint16():
    text = make_text()
    vocab = CharVocab.from_text(text)
    assert vocab.chars == tuple(sorted(set(text))) and vocab.size == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint16 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text and vocab.decode(int(i) for i in ids[:5]) == text[:5]
    assert vocab.encode("").shape == (0,) and vocab.decode([]) == ""
    # id i is the i-th character in sorted order
    assert vocab.encode("".join(vocab.chars)).tolist() == list(range(vocab.size))


def test_vocab_unknown_character_and_bad_id_are_named():
    vocab = CharVocab.from_text("hello world")
    with pytest.raises(DataError, match=r"'Z'.*position 3"):
        vocab.encode("helZo")
    with pytest.raises(DataError, match=r"\b99\b"):
        vocab.decode([0, 99])
    with pytest.raises(DataError):
        CharVocab(("b", "a"))  # not sorted
    with pytest.raises(DataError):
        CharVocab.from_text("")


def test_vocab_serialises_for_checkpoints():
    vocab = CharVocab.from_text(make_text())
    assert CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    assert CharVocab.from_json(vocab.to_json()) == vocab
    assert CharVocab.from_json(vocab.to_json()) != CharVocab.from_text("abc")


# ---------------------------------------------------------------------------------------------- locations


def test_resolve_data_dir_prefers_argument_then_env_then_user_cache(tmp_path, monkeypatch):
    assert data.resolve_data_dir() == user_cache(tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "grassjax"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_env_var_is_used_to_find_the_text(tmp_path, monkeypatch):
    text = make_text()
    write_text(tmp_path / "env", text)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.load_text(allow_custom_text=True, download=False) == text


# ---------------------------------------------------------------------------------------------- download


def test_download_verifies_checksum_and_saves_the_file(tmp_path):
    text = make_text()
    source = tmp_path / "source.txt"
    source.write_bytes(text.encode("utf-8"))
    root = tmp_path / "data"

    assert data.load_text(root, url=source.as_uri(), sha256=sha(text)) == text
    saved = root / "tinyshakespeare" / "input.txt"
    assert saved.read_bytes() == text.encode("utf-8")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["input.txt"]  # no temporary files left

    source.unlink()  # now served from the saved copy, no download needed
    assert data.load_text(root, url=source.as_uri(), sha256=sha(text), download=False) == text


def test_download_with_bad_checksum_is_refused_and_not_kept(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("not shakespeare")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="sha256") as err:
        data.load_text(root, url=source.as_uri(), sha256="0" * 64)
    assert "0" * 64 in str(err.value) and sha("not shakespeare") in str(err.value)
    folder = root / "tinyshakespeare"
    assert not folder.exists() or list(folder.iterdir()) == []
    # allow_custom_text is for files the user put there, not for corrupt downloads
    with pytest.raises(DataError):
        data.load_text(root, url=source.as_uri(), sha256="0" * 64, allow_custom_text=True)


def test_missing_file_offline_gives_one_line_error_naming_the_fix(tmp_path):
    root = tmp_path / "data"
    offline = (tmp_path / "nowhere" / "input.txt").as_uri()
    with pytest.raises(DataError) as err:
        data.load_text(root, url=offline)
    message = str(err.value)
    assert "\n" not in message
    assert "--data_dir" in message and data.DATA_DIR_ENV in message
    assert str(root / "tinyshakespeare" / "input.txt") in message and "download" in message

    with pytest.raises(DataError, match="--data_dir") as err:
        data.load_text(root, download=False)
    assert "\n" not in str(err.value)


def test_wrong_checksum_existing_file_needs_allow_custom_text(tmp_path):
    text = make_text()
    write_text(tmp_path, text)
    with pytest.raises(DataError, match="allow_custom_text") as err:
        data.load_text(tmp_path)
    assert data.SHAKESPEARE_SHA256 in str(err.value) and sha(text) in str(err.value)
    assert "\n" not in str(err.value)
    assert data.load_text(tmp_path, allow_custom_text=True) == text
    with pytest.raises(DataError, match="allow_custom_text"):
        data.load_char_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------- dataset


def test_split_is_contiguous_90_10(tmp_path):
    text = make_text(n=1001)
    write_text(tmp_path, text)
    ds = data.load_char_dataset(tmp_path, allow_custom_text=True)
    assert ds.train.dtype == ds.val.dtype == np.uint16
    assert (len(ds.train), len(ds.val)) == (900, 101)  # int(1001 * 0.9) = 900, as nanoGPT
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), ds.vocab.encode(text))
    assert ds.vocab.decode(ds.val) == text[900:]
    assert ds.text_sha256 == sha(text)
    ds = data.load_char_dataset(tmp_path, allow_custom_text=True, val_fraction=0.5)  # reuses the cache
    assert (len(ds.train), len(ds.val)) == (500, 501)
    with pytest.raises(DataError, match="val_fraction"):
        data.load_char_dataset(tmp_path, allow_custom_text=True, val_fraction=1.0)


def forbid_encoding(monkeypatch):
    def fail(self, text):
        raise AssertionError("encoded again instead of using the token cache")

    monkeypatch.setattr(CharVocab, "encode", fail)


def test_token_cache_is_written_beside_the_text_and_reused(tmp_path, monkeypatch):
    text = make_text()
    write_text(tmp_path / "data", text)
    first = data.load_char_dataset(tmp_path / "data", allow_custom_text=True)
    cache = tmp_path / "data" / "tinyshakespeare" / f"tokens-{sha(text)[:12]}.npz"
    assert cache.is_file()
    assert not user_cache(tmp_path).exists()

    forbid_encoding(monkeypatch)
    second = data.load_char_dataset(tmp_path / "data", allow_custom_text=True)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    assert second.vocab == first.vocab and second.text_sha256 == first.text_sha256


def test_cache_for_another_text_or_a_corrupt_cache_is_rebuilt(tmp_path):
    old, new = make_text(seed=1), make_text(seed=2)
    path = write_text(tmp_path, old)
    data.load_char_dataset(tmp_path, allow_custom_text=True)
    path.write_bytes(new.encode("utf-8"))
    # Plant the old text's cache under the new text's name: it must be recognised as stale.
    folder = path.parent
    os.replace(folder / f"tokens-{sha(old)[:12]}.npz", folder / f"tokens-{sha(new)[:12]}.npz")
    ds = data.load_char_dataset(tmp_path, allow_custom_text=True)
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == new

    (folder / f"tokens-{sha(new)[:12]}.npz").write_bytes(b"garbage")
    ds = data.load_char_dataset(tmp_path, allow_custom_text=True)
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == new
    assert (folder / f"tokens-{sha(new)[:12]}.npz").stat().st_size > len(b"garbage")  # rewritten


@pytest.fixture
def read_only_data(tmp_path):
    text = make_text()
    folder = write_text(tmp_path / "ro", text).parent
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield tmp_path / "ro", text
    folder.chmod(0o755)


def test_read_only_data_folder_caches_tokens_in_the_user_cache(tmp_path, monkeypatch, read_only_data):
    root, text = read_only_data
    before = sorted(os.listdir(root / "tinyshakespeare"))
    ds = data.load_char_dataset(root, allow_custom_text=True)
    assert sorted(os.listdir(root / "tinyshakespeare")) == before == ["input.txt"]
    cache = user_cache(tmp_path) / "tinyshakespeare" / f"tokens-{sha(text)[:12]}.npz"
    assert cache.is_file()

    forbid_encoding(monkeypatch)
    again = data.load_char_dataset(root, allow_custom_text=True)
    np.testing.assert_array_equal(np.concatenate([again.train, again.val]), np.concatenate([ds.train, ds.val]))


def test_no_writable_cache_anywhere_still_loads(tmp_path, monkeypatch, read_only_data):
    root, text = read_only_data
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # cannot mkdir under a file, even as root
    ds = data.load_char_dataset(root, allow_custom_text=True)
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == text


# ---------------------------------------------------------------------------------------------- batches


def test_sample_batch_shapes_shift_and_reproducibility():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so windows are easy to check
    x, y = data.sample_batch(tokens, batch_size=8, block_size=16, seed=3, step=7)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous windows of the stream
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)
    assert x.min() >= 0 and y.max() <= 999

    x2, y2 = data.sample_batch(tokens, batch_size=8, block_size=16, seed=3, step=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, data.sample_batch(tokens, batch_size=8, block_size=16, seed=3, step=8)[0])
    assert not np.array_equal(x, data.sample_batch(tokens, batch_size=8, block_size=16, seed=4, step=7)[0])


def test_sample_batch_reaches_both_ends_and_rejects_short_streams():
    tokens = np.arange(17, dtype=np.uint16)  # exactly one window of block_size + 1
    x, y = data.sample_batch(tokens, batch_size=3, block_size=16, seed=0, step=0)
    np.testing.assert_array_equal(x, np.tile(np.arange(16), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 17), (3, 1)))
    starts = np.concatenate([data.sample_batch(np.arange(20), batch_size=64, block_size=16, seed=0, step=s)[0][:, 0]
                             for s in range(4)])
    assert set(starts.tolist()) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="--config.data.block_size"):
        data.sample_batch(tokens, batch_size=3, block_size=17, seed=0, step=0)


def test_eval_batches_are_fixed_and_separate_from_training():
    tokens = np.arange(5000, dtype=np.uint16)
    xs, ys = data.eval_batches(tokens, batch_size=4, block_size=8, num_batches=5, seed=0)
    assert xs.shape == ys.shape == (5, 4, 8) and xs.dtype == ys.dtype == np.int32
    np.testing.assert_array_equal(xs[..., 1:], ys[..., :-1])
    xs2, ys2 = data.eval_batches(tokens, batch_size=4, block_size=8, num_batches=5, seed=0)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    assert not np.array_equal(xs, data.eval_batches(tokens, batch_size=4, block_size=8, num_batches=5, seed=1)[0])
    for i in range(5):  # its own random stream: not the training batches of the same seed
        assert not np.array_equal(xs[i], data.sample_batch(tokens, batch_size=4, block_size=8, seed=0, step=i)[0])


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_TEXT.is_file(), reason=f"no shared tiny Shakespeare at {REAL_TEXT}")
def test_real_tiny_shakespeare(tmp_path):
    before = sorted(os.listdir(REAL_TEXT.parent))
    text = data.load_text(SHARED_DATA, download=False)  # checksum passes
    assert len(text) == 1_115_394
    ds = data.load_char_dataset(SHARED_DATA, download=False)
    assert ds.vocab.size == 65 and ds.text_sha256 == data.SHAKESPEARE_SHA256
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == text
    if not data.files.is_writable_dir(REAL_TEXT.parent):  # read-only shared data: cached per user, folder untouched
        assert sorted(os.listdir(REAL_TEXT.parent)) == before
        assert (user_cache(tmp_path) / "tinyshakespeare" / f"tokens-{data.SHAKESPEARE_SHA256[:12]}.npz").is_file()
