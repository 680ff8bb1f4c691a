"""Using a trained run: load_run, streaming samples with the cached decoder, whole-split evaluation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grassjax
from grassjax import generation, inference
from tests.test_guards import fast_run
from tests.test_train import cli


@pytest.fixture(scope="module")
def trained_workdirs(tmp_path_factory):
    """A tiny Grassmann run and a tiny bigram run, trained once for the module."""
    from tests.conftest import generated_text

    root = tmp_path_factory.mktemp("trained")
    (root / "data" / "tinyshakespeare").mkdir(parents=True)
    (root / "data" / "tinyshakespeare" / "input.txt").write_text(generated_text())
    runs = {}
    for exp in ("grassmann_shakespeare", "bigram_shakespeare"):
        fast_run(exp, root / exp, root / "data", train__steps=10)
        runs[exp] = root / exp
    return runs, root / "data"


def test_load_run_gives_model_vocab_config_in_one_line(trained_workdirs):
    runs, _ = trained_workdirs
    model, vocab, config = grassjax.load_run(runs["grassmann_shakespeare"])
    assert config.model.mixer == "grassmann" and model.cfg.d_model == 32 and vocab.size == model.cfg.vocab_size
    ids = generation.generate_streaming(model, jnp.asarray([vocab.encode("The ")]), jax.random.key(0),
                                      max_new_tokens=8)
    assert vocab.decode(np.asarray(ids[0])).startswith("The ") and ids.shape == (1, 12)
    assert inference.load_run(runs["grassmann_shakespeare"]).step == 10


def test_stream_tokens_matches_the_cached_decoder_and_runs_past_the_block(trained_workdirs):
    runs, _ = trained_workdirs
    model, vocab, _ = grassjax.load_run(runs["grassmann_shakespeare"])
    prompt = inference.encode_prompt(vocab, "The king")
    key = jax.random.key(3)
    streamed = list(generation.stream_tokens(model, prompt, key, num_tokens=20, temperature=0.8))
    reference = generation.generate_streaming(model, jnp.asarray([prompt]), key, max_new_tokens=20, temperature=0.8)
    assert streamed == np.asarray(reference[0, len(prompt):]).tolist()
    long = list(generation.stream_tokens(model, prompt, key, num_tokens=3 * model.cfg.block_size, temperature=0.8))
    assert len(long) == 3 * model.cfg.block_size and long[:20] == streamed


@pytest.mark.parametrize("n, block, stride", [(100, 32, 32), (100, 32, 8), (33, 32, 32), (5, 32, 3)])
def test_eval_windows_score_every_token_once(n, block, stride):
    scored = []
    for begin, end, first in inference.eval_windows(n, block, stride):
        assert 0 < end - begin <= block and begin < first <= end
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_evaluate_covers_the_whole_split_exactly(trained_workdirs):
    """Bigram: the loss over the whole split is a plain mean over consecutive pairs, whatever the stride."""
    runs, data_dir = trained_workdirs
    result = inference.evaluate_run(runs["bigram_shakespeare"], data_dir=str(data_dir), split="val")
    from grassjax.data import load_dataset

    model, _, config = grassjax.load_run(runs["bigram_shakespeare"])
    val = load_dataset(config.data, str(data_dir)).val
    logp = jax.nn.log_softmax(np.asarray(model.table.embedding[...]), axis=-1)
    expected = -float(np.mean(np.asarray(logp)[val[:-1], val[1:]]))
    assert result["tokens_scored"] == len(val) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert json.loads((runs["bigram_shakespeare"] / "eval-val.json").read_text())["loss"] == result["loss"]
    sliding = inference.evaluate_split(model, val, stride=5)
    assert sliding["loss"] == pytest.approx(expected, rel=1e-5) and sliding["windows"] > result["windows"]


def test_sample_mode_streams_text_and_refuses_bad_input_in_one_line(trained_workdirs, tmp_path):
    runs, data_dir = trained_workdirs
    common = ["--exp=grassmann_shakespeare", f"--data_dir={data_dir}", "--mode=sample"]
    proc = cli(*common, f"--workdir={runs['grassmann_shakespeare']}", "--prompt=The king", "--num_tokens=40",
               "--num_samples=2", "--top_k=5", "--seed=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("The king") == 2 and "80 tokens in" in proc.stdout and "tokens/s" in proc.stdout
    assert "Grassmann window decoder" in proc.stdout
    with pytest.raises(inference.RunError, match=r"outside the run's \d+-character vocabulary: '\$', 'é'"):
        inference.sample_run(runs["grassmann_shakespeare"], prompt="The é$", num_tokens=4)
    proc = cli(*common, f"--workdir={tmp_path / 'empty'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no checkpoint in" in lines[0], proc.stderr
