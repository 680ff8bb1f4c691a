"""Shared fixtures: generated text (no network, no shared data needed) and a tiny training config."""

import os
import pathlib
import tempfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Most of the suite's time is XLA compiling the same tiny programs again (every tiny run builds its model
# anew). JAX's persistent compilation cache, shared by the test processes, their subprocesses and pytest-xdist
# workers, compiles each once per machine. Set before jax is imported; an entry is keyed by the program, the
# jax version and the flags, so a stale one is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "grassjax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Small enough to compile in seconds, big enough that the loss visibly falls.
TINY_OVERRIDES = {
    "data.allow_custom_text": "True",
    "data.block_size": "32",
    "model.num_layers": "1",
    "model.d_model": "32",
    "model.num_heads": "2",
    "model.d_ff": "64",
    "model.rank": "4",
    "model.offsets": "1,2,4",
    "train.batch_size": "8",
    "train.steps": "20",
    "train.warmup_steps": "2",
    "train.learning_rate": "1e-2",
    "train.log_every": "2",
    "train.eval_every": "10",
    "train.eval_batches": "2",
    "train.checkpoint_every": "10",
    "train.sample_tokens": "16",
}


def generated_text(num_words: int = 6000, seed: int = 0) -> str:
    """Deterministic pseudo-verse: enough structure for a character model to learn quickly."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "lord", "my", "thou", "art", "shall", "not", "love", "death", "night",
             "and", "to", "of", "sweet", "good", "what", "is", "be", "speak", "come", "hence", "fair"]
    lines, line = [], []
    for w in rng.choice(words, size=num_words):
        line.append(str(w))
        if len(line) >= rng.integers(4, 9):
            lines.append(" ".join(line).capitalize() + rng.choice([",", ".", ";", "!", "?"]))
            line = []
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_data_dir(tmp_path) -> pathlib.Path:
    """A data dir holding generated text at tinyshakespeare/input.txt (needs allow_custom_text)."""
    folder = tmp_path / "data" / "tinyshakespeare"
    folder.mkdir(parents=True)
    (folder / "input.txt").write_text(generated_text())
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No credentials, no real caches: every test sees a clean, offline user."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("GRASSJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    from grassjax.data import wikitext

    # Missing WikiText files would start a download: tests never reach the network (port 9 refuses).
    monkeypatch.setattr(wikitext, "WIKITEXT_URLS", ("http://127.0.0.1:9/wikitext-2-raw-v1.zip",))
