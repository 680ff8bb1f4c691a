"""grassjax.wikitext: WikiText-2 raw files, WordPiece training and caching, uint16 token streams."""

import hashlib
import json
import os
import stat
import sys
import types

import numpy as np
import pytest

from grassjax import data
from grassjax.data import wikitext
from grassjax.data import DataError
from grassjax.data.wikitext import WIKITEXT_DIR, WIKITEXT_FILES, TokenDataset, WordPieceVocab, load_wikitext2

WORDS = ["the", "river", "valley", "king", "battle", "army", "city", "north", "south", "was", "in", "of", "and",
         "a", "game", "series", "released", "album", "song", "first", "season", "team", "played", "church",
         "built", "century", "known", "for", "his", "her", "station", "railway", "village", "storm", "hurricane",
         "during", "after", "became", "music", "played", "record", "island", "bridge", "county", "road"]
VOCAB_SIZE = 200


def make_wikitext(num_articles, seed):
    """Deterministic text in WikiText raw layout: ' = Title = ' headings, ' \\n' blank lines, @-@ markers."""
    rng = np.random.default_rng(seed)

    def sentence():
        words = [str(w) for w in rng.choice(WORDS, size=rng.integers(6, 14))]
        i = int(rng.integers(1, len(words)))
        words.insert(i, rng.choice(["well @-@ known", "1 @,@ 000", "3 @.@ 5", "( 1998 )", "\" game \""]))
        words[0] = words[0].capitalize()
        return " ".join(words) + " ."

    lines = [" "]
    for a in range(num_articles):
        lines += [f" = {rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} = ", " "]
        for s in range(2):
            lines += [" " + " ".join(sentence() for _ in range(rng.integers(3, 7))) + " ", " "]
            lines += [f" = = {rng.choice(WORDS).capitalize()} = = ", " "]
        lines += [" " + " ".join(sentence() for _ in range(4)) + " ", " "]
    return "\n".join(lines) + "\n"


def write_corpus(root, sizes=(40, 6, 6)):
    folder = root / WIKITEXT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for (split, name), n, seed in zip(WIKITEXT_FILES.items(), sizes, (0, 1, 2)):
        texts[split] = make_wikitext(n, seed)
        (folder / name).write_text(texts[split], encoding="utf-8")
    return folder, texts


def kept_lines(text):
    return [line.strip() for line in text.split("\n") if line.strip()]


def user_cache(tmp_path):
    return tmp_path / "cache" / "grassjax" / WIKITEXT_DIR


def train_sha(folder):
    return hashlib.sha256((folder / WIKITEXT_FILES["train"]).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # no Hugging Face fallback unless a test fakes one
    wikitext._TRAINED.clear()
    yield
    wikitext._TRAINED.clear()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "data"
    folder, texts = write_corpus(root)
    return root, folder, texts


def forbid(monkeypatch, obj, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called again")
    monkeypatch.setattr(obj, name, fail)


# ---------------------------------------------------------------------------------------------- loading


def test_loads_three_uint16_splits(corpus):
    root, _, _ = corpus
    ds = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert isinstance(ds, TokenDataset)
    assert 0 < ds.vocab.size <= VOCAB_SIZE
    for split in ("train", "val", "test"):
        tokens = getattr(ds, split)
        assert tokens.dtype == np.uint16 and tokens.ndim == 1 and len(tokens) > 100
        assert int(tokens.max()) < ds.vocab.size
        assert not tokens.flags.writeable
    assert len(ds.train) > 4 * len(ds.val)
    x, y = data.sample_batch(ds.train, batch_size=4, block_size=16, seed=0, step=0)
    assert x.shape == y.shape == (4, 16)


def test_streams_are_the_encoding_of_the_joined_nonblank_lines(corpus):
    root, _, texts = corpus
    ds = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    for split, text in texts.items():
        tokens = getattr(ds, split)
        joined = "\n".join(kept_lines(text))
        expected = ds.vocab.tokenizer.encode(joined, add_special_tokens=False).ids
        assert len(tokens) == len(expected)
        np.testing.assert_array_equal(tokens, np.array(expected, np.uint16))
        # Blank lines carry no tokens: the whole file encodes to the same stream.
        np.testing.assert_array_equal(ds.vocab.encode(text), tokens)
    special = [ds.vocab.token_to_id(t) for t in wikitext.SPECIAL_TOKENS]
    assert special == [0, 1, 2, 3, 4]
    assert not np.isin(ds.train, special).any()  # no [CLS]/[SEP] between lines, and no [UNK] here


def test_headings_and_markers_stay_as_text(corpus):
    root, _, texts = corpus
    ds = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    at, eq = ds.vocab.token_to_id("@"), ds.vocab.token_to_id("=")
    assert int((ds.train == at).sum()) == texts["train"].count("@")
    assert int((ds.train == eq).sum()) == texts["train"].count("=")
    assert "@ - @" in ds.vocab.decode(ds.train) and "= = " in ds.vocab.decode(ds.train)


def test_missing_files_error_is_one_line_naming_files_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_wikitext2(tmp_path / "nowhere", vocab_size=VOCAB_SIZE)
    message = str(err.value)
    assert "\n" not in message
    for name in [*WIKITEXT_FILES.values(), WIKITEXT_DIR, "wikitext-2-raw-v1.zip", "--data_dir",
                 data.DATA_DIR_ENV, str(tmp_path / "nowhere" / WIKITEXT_DIR)]:
        assert name in message


def test_partially_present_data_names_the_missing_file(corpus):
    root, folder, _ = corpus
    (folder / "wiki.valid.raw").unlink()
    with pytest.raises(DataError, match=r"is missing wiki\.valid\.raw;"):
        load_wikitext2(root, vocab_size=VOCAB_SIZE)


def test_data_dir_from_environment(corpus, monkeypatch):
    root, _, _ = corpus
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root))
    assert len(load_wikitext2(vocab_size=VOCAB_SIZE).val) > 0


def test_bad_arguments(corpus):
    root, _, _ = corpus
    with pytest.raises(DataError, match="uint16"):
        load_wikitext2(root, vocab_size=70000)
    with pytest.raises(DataError, match="not found"):
        load_wikitext2(root, vocab_file=root / "no-vocab.txt")


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_and_tokens_are_cached_beside_the_data_and_reused(corpus, monkeypatch):
    root, folder, _ = corpus
    first = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    tokenizer_file = folder / f"wordpiece-{VOCAB_SIZE}-{train_sha(folder)[:12]}.json"
    assert tokenizer_file.is_file()
    assert len(list(folder.glob("tokens-wordpiece-*.npz"))) == 1
    assert WordPieceVocab.from_file(tokenizer_file) == first.vocab

    wikitext._TRAINED.clear()  # a new process: only the files remain
    forbid(monkeypatch, wikitext, "train_wordpiece")
    forbid(monkeypatch, WordPieceVocab, "encode_lines")
    second = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert second.vocab == first.vocab
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(second, split), getattr(first, split))
    assert not user_cache(root.parent).exists()


def test_cache_name_tracks_vocab_size_min_frequency_and_text(corpus):
    root, folder, _ = corpus
    load_wikitext2(root, vocab_size=VOCAB_SIZE)
    load_wikitext2(root, vocab_size=150, min_frequency=3)
    sha = train_sha(folder)[:12]
    assert sorted(p.name for p in folder.glob("wordpiece-*.json")) == [
        f"wordpiece-150-min3-{sha}.json", f"wordpiece-{VOCAB_SIZE}-{sha}.json"]
    (folder / WIKITEXT_FILES["train"]).write_text(make_wikitext(40, seed=9), encoding="utf-8")
    load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert len(list(folder.glob(f"wordpiece-{VOCAB_SIZE}-*.json"))) == 2


def test_same_process_reuses_its_tokenizer_without_any_cache(corpus, monkeypatch):
    root, _, _ = corpus
    monkeypatch.setattr(wikitext, "_publish_once", lambda path, content: (_ for _ in ()).throw(OSError("full")))
    first = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    forbid(monkeypatch, wikitext, "train_wordpiece")
    assert load_wikitext2(root, vocab_size=VOCAB_SIZE).vocab == first.vocab


def test_first_published_tokenizer_wins(corpus, tmp_path):
    _, _, texts = corpus
    lines = kept_lines(texts["train"])
    a = wikitext.train_wordpiece(lines, vocab_size=VOCAB_SIZE).to_dict()["tokenizer"]
    b = wikitext.train_wordpiece(lines[::-1], vocab_size=VOCAB_SIZE).to_dict()["tokenizer"]
    path = tmp_path / "race" / "wordpiece.json"
    assert wikitext._publish_once(path, a) == a
    assert wikitext._publish_once(path, b) == a  # the later trainer adopts the file already there
    assert path.read_text(encoding="utf-8") == a
    assert [p.name for p in path.parent.iterdir()] == ["wordpiece.json"]  # no temporary files left


def test_vocab_size_is_an_upper_bound(corpus):
    root, _, _ = corpus
    small = load_wikitext2(root, vocab_size=100)  # just above the alphabet (characters and "##" forms)
    large = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert small.vocab.size <= 100 < large.vocab.size <= VOCAB_SIZE
    assert len(small.train) > len(large.train)  # fewer merges, more pieces


def test_encode_decode_round_trip(corpus):
    root, _, _ = corpus
    vocab = load_wikitext2(root, vocab_size=VOCAB_SIZE).vocab
    text = "the river valley was built during the first century"
    ids = vocab.encode(text)
    assert ids.dtype == np.uint16 and len(ids) > 0
    assert vocab.decode(ids) == text
    assert vocab.decode(vocab.encode("The RIVER Valley")) == "the river valley"  # uncased
    assert vocab.decode(list(ids)) == text
    assert len(vocab.encode("  \n ")) == 0
    with pytest.raises(DataError, match="outside"):
        vocab.decode([vocab.size])
    with pytest.raises(DataError, match="each row"):
        vocab.decode(np.zeros((2, 2), np.int32))


def test_vocab_dict_round_trips_through_json(corpus):
    root, _, _ = corpus
    vocab = load_wikitext2(root, vocab_size=VOCAB_SIZE).vocab
    d = json.loads(json.dumps(vocab.to_dict()))
    assert d["kind"] == "wordpiece"
    again = WordPieceVocab.from_dict(d)
    assert again == vocab and again.size == vocab.size
    np.testing.assert_array_equal(again.encode("the king of the north"), vocab.encode("the king of the north"))
    assert WordPieceVocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(DataError):
        WordPieceVocab.from_dict({"chars": ["a"]})


def test_loads_a_bert_vocab_txt_instead_of_training(corpus, monkeypatch, tmp_path):
    root, folder, texts = corpus
    entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "@", "-", ",", ".", "=", "(", ")", "\"",
               *"0123456789", *sorted(set(WORDS) - {"valley"}), "val", "##ley", "##s"]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(entries) + "\n", encoding="utf-8")
    forbid(monkeypatch, wikitext, "train_wordpiece")

    ds = load_wikitext2(root, vocab_file=vocab_file)
    assert ds.vocab.size == len(entries)
    assert [ds.vocab.id_to_token(i) for i in ds.vocab.encode("Valley kings zzz")] == [
        "val", "##ley", "king", "##s", "[UNK]"]
    assert ds.vocab.decode(ds.vocab.encode("the valley")) == "the valley"
    expected = ds.vocab.tokenizer.encode("\n".join(kept_lines(texts["val"])), add_special_tokens=False).ids
    np.testing.assert_array_equal(ds.val, np.array(expected, np.uint16))
    assert not list(folder.glob("wordpiece-*.json"))

    (tmp_path / "bad.txt").write_text("hello\nworld\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[UNK\]"):
        load_wikitext2(root, vocab_file=tmp_path / "bad.txt")


# ---------------------------------------------------------------------------------------------- read-only data


@pytest.fixture
def read_only_corpus(corpus):
    root, folder, texts = corpus
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield root, folder, texts
    folder.chmod(0o755)


def test_read_only_data_folder_caches_in_the_user_cache(read_only_corpus, tmp_path, monkeypatch):
    root, folder, _ = read_only_corpus
    before = sorted(os.listdir(folder))
    first = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert sorted(os.listdir(folder)) == before  # the data folder is left alone, even for root
    cache = user_cache(tmp_path)
    assert (cache / f"wordpiece-{VOCAB_SIZE}-{train_sha(folder)[:12]}.json").is_file()
    assert len(list(cache.glob("tokens-wordpiece-*.npz"))) == 1

    wikitext._TRAINED.clear()
    forbid(monkeypatch, wikitext, "train_wordpiece")
    forbid(monkeypatch, WordPieceVocab, "encode_lines")
    second = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert second.vocab == first.vocab
    np.testing.assert_array_equal(second.test, first.test)


# ---------------------------------------------------------------------------------------------- Hugging Face cache


def fake_datasets(texts, calls):
    def load_dataset(name, config):
        calls.append((name, config, os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE")))
        # Rows are the lines with their newline; blank lines are "".
        return {hf: {"text": [(line + "\n") if line.strip() else "" for line in texts[split].split("\n")[:-1]]}
                for split, hf in wikitext.HF_SPLITS.items()}
    return types.SimpleNamespace(load_dataset=load_dataset)


def test_offline_hugging_face_copy_is_used_when_files_are_missing(corpus, tmp_path, monkeypatch):
    root, _, texts = corpus
    from_files = load_wikitext2(root, vocab_size=VOCAB_SIZE)
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(texts, calls))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    load_wikitext2(root, vocab_size=VOCAB_SIZE)
    assert calls == []  # files present: the Hugging Face cache is not consulted

    from_hf = load_wikitext2(tmp_path / "empty", vocab_size=VOCAB_SIZE)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "1", "1")]  # offline during the call ...
    assert "HF_DATASETS_OFFLINE" not in os.environ  # ... and restored after it
    assert len(from_hf.train) == len(from_files.train)
    np.testing.assert_array_equal(from_hf.val, from_hf.vocab.encode(texts["val"]))


def test_hugging_face_failure_falls_back_to_the_missing_files_error(tmp_path, monkeypatch):
    def load_dataset(name, config):
        raise ConnectionError("offline and not cached")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="--data_dir"):
        load_wikitext2(tmp_path, vocab_size=VOCAB_SIZE)


def test_paper_experiment_trains_end_to_end_on_the_generated_corpus(tmp_path):
    """`launch.py --exp=paper_wikitext2_grassmann_6l --data_dir=<corpus>` at a tiny size."""
    import experiments
    from grassjax.runlog import read_metrics_jsonl

    write_corpus(tmp_path / "data")
    overrides = {"data.vocab_size": "300", "model.num_layers": "1", "model.d_model": "32", "model.d_ff": "64",
                 "model.rank": "4", "data.block_size": "32", "train.batch_size": "8", "train.epochs": "0.0",
                 "train.steps": "12", "train.warmup_steps": "2", "train.learning_rate": "3e-3",
                 "train.eval_every": "6", "train.eval_batches": "2", "stats.images": "False"}
    result = experiments.run("paper_wikitext2_grassmann_6l", overrides, workdir=str(tmp_path / "run"),
                                   data_dir=str(tmp_path / "data"), wandb_mode="disabled")
    records = read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl")
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert result.final_step == 12 and len(val) == 2 and val[-1] < val[0]
    assert result.sample  # the "\n"-free prompt "the" encodes under WordPiece


def test_epochs_set_the_number_of_steps(tmp_path):
    import experiments

    write_corpus(tmp_path / "data")
    overrides = {"data.vocab_size": "300", "model.num_layers": "1", "model.d_model": "32", "model.d_ff": "64",
                 "model.rank": "4", "data.block_size": "32", "train.batch_size": "8", "train.epochs": "0.5",
                 "train.eval_every": "1000", "train.eval_batches": "1", "stats.enabled": "False"}
    result = experiments.run("paper_wikitext2_transformer_6l", overrides, workdir=str(tmp_path / "run"),
                                   data_dir=str(tmp_path / "data"), wandb_mode="disabled")
    from grassjax.data.wikitext import load_wikitext2

    tokens = len(load_wikitext2(tmp_path / "data", vocab_size=300).train)
    assert result.final_step == -(-tokens // (2 * 8 * 32))  # ceil(0.5 * tokens / (batch * block))
