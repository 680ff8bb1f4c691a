"""Evaluator.compile_in_background: the evaluation programs compiled beside the train step serve the evaluations
that follow training steps (no second compile), and an error on that thread reaches the caller."""

import jax
import pytest

import experiments
from grassjax import generation
from grassjax.train.evaluator import BackgroundJobs, Evaluator
from grassjax.train.setup import TrainingSetup
from tests.conftest import TINY_OVERRIDES


@pytest.mark.parametrize("mixer", ["grassmann", "attention"])
def test_programs_compiled_in_the_background_serve_the_evaluations_after_training(text_data_dir, mixer):
    _, config = experiments.resolve_config("grassmann_shakespeare", {**TINY_OVERRIDES, "model.mixer": mixer})
    trainer = TrainingSetup.build(config, str(text_data_dir))
    evaluator = Evaluator(config, trainer.graphdef, trainer.model_cfg, trainer.dataset,
                          microbatch=trainer.layout.microbatch, mesh=trainer.mesh)
    # The losses and the probe are this evaluator's own jitted functions; the sampler is shared by the process,
    # so an earlier test may have compiled it for the same tiny model already.
    programs = {"losses": evaluator.eval_loss, "probe": evaluator.probe, "sample": generation._generate}
    evaluator.compile_in_background(trainer.state.params).join()
    compiled = {name: fn._cache_size() for name, fn in programs.items()}
    assert compiled["losses"] == compiled["probe"] == 1 and compiled["sample"] >= 1, compiled

    state = trainer.state
    for step in range(2):  # parameters as the loop hands them to an evaluation: outputs of the donating step
        state, _ = trainer.train_step(state, *trainer.batch_at(step), trainer.hparams)
    evaluator.losses(state.params)
    evaluator.sample(state.params, 2)
    jax.block_until_ready(evaluator.probe(state.params, evaluator.probe_tokens))
    assert {name: fn._cache_size() for name, fn in programs.items()} == compiled  # nothing compiled again


def test_an_error_on_a_compile_thread_is_raised_by_join_after_every_thread_ends():
    done = []

    def fail():
        raise ValueError("out of memory while compiling")

    threads = BackgroundJobs([fail, lambda: done.append(True)])
    with pytest.raises(ValueError, match="out of memory while compiling"):
        threads.join()
    assert done == [True] and not any(t.is_alive() for t in threads.threads)
