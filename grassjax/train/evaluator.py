"""What the training loop measures at each evaluation: losses on fixed batches, a text sample and
statistics."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grassjax import data, generation
from grassjax.train.parallel import replicate_host_array
from grassjax.train.probe import flatten_scalars, histograms, make_probe, map_figures
from grassjax.train.step import loss_report, make_eval_step


# Programs that run a few times per run (the sample, the statistics) are compiled at LLVM -O0: that
# compiles faster, and their few calls cost less than it saves (docs/performance-log.md).
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


class Evaluator:
    """Built once per run; `evaluate(params, step, logger)` logs and returns (metrics, sample)."""

    def __init__(self, config, graphdef, model_cfg, dataset, *, microbatch: int, mesh):
        tc, self.stats = config.train, config.stats
        self.tc, self.graphdef, self.model_cfg, self.vocab = tc, graphdef, model_cfg, dataset.vocab
        self.eval_loss = make_eval_step(graphdef)
        sets = {split: data.eval_batches(tokens, batch_size=microbatch,
                                         block_size=config.data.block_size,
                                         num_batches=tc.eval_batches, seed=tc.seed)
                for split, tokens in (("train", dataset.train), ("val", dataset.val))}
        self.arrays = {split: tuple(replicate_host_array(a, mesh) for a in xy)
                       for split, xy in sets.items()}
        prompt_ids = dataset.vocab.encode(tc.sample_prompt)
        # e.g. "\n" under WordPiece: start from the first validation token instead
        if len(prompt_ids) == 0:
            prompt_ids = dataset.val[:1]
        self.prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
        enabled = self.stats.enabled and model_cfg.kind == "lm"
        self.probe = (make_probe(graphdef, model_cfg, hist_bins=self.stats.hist_bins,
                                 compiler_options=QUICK_COMPILE) if enabled else None)
        self._sample = jax.jit(generation.sample_cached_program,
                               static_argnames=generation.SAMPLE_STATIC,
                               compiler_options=QUICK_COMPILE)
        # fixed text
        self.probe_tokens = replicate_host_array(sets["val"][0][0][: self.stats.probe_batch], mesh)

    def compile_in_background(self, params) -> "BackgroundJobs":
        """Compile the evaluation programs (losses, sample, probe), one thread each, by running them
        once on `params` (results discarded) while the caller compiles the train step.

        The compiles overlap, and the first evaluation no longer stops training to compile (the
        measurements are in docs/performance-log.md). Join before `params` go to a train step that
        donates them."""
        jobs = [lambda: self.losses(params), lambda: self.sample(params, 0)]
        if self.probe is not None:
            jobs.append(lambda: jax.block_until_ready(self.probe(params, self.probe_tokens)))
        return BackgroundJobs(jobs)

    def losses(self, params) -> dict[str, float]:
        metrics = {}
        for split, (xs, ys) in self.arrays.items():
            metrics.update(loss_report(float(self.eval_loss(params, xs, ys)),
                                       split if split == "val" else "eval_train"))
        return metrics

    def sample(self, params, step: int) -> str:
        """The prompt and sample_tokens tokens after it, from the cached decoder (recomputation for
        the bigram table, which has no cache)."""
        key = jax.random.fold_in(jax.random.key(self.tc.seed + 1), step)
        options = dict(temperature=float(self.tc.temperature), top_k=self.tc.top_k or None)
        if self.model_cfg.kind != "lm" or self.tc.sample_tokens == 0:
            tokens = generation.generate(nnx.merge(self.graphdef, params), self.prompt, key,
                                         max_new_tokens=self.tc.sample_tokens, **options)[0]
        else:
            prompt = self.prompt[:, -self.model_cfg.block_size:]
            new = self._sample(self.graphdef, params, prompt, key, num_tokens=self.tc.sample_tokens,
                               **options)
            tokens = np.concatenate([np.asarray(self.prompt[0]), np.asarray(new[0])])
        return self.vocab.decode(np.asarray(tokens))

    def statistics(self, params, step: int, logger, images: bool = True) -> dict[str, float]:
        """Run the probe on the fixed validation text; log scalars, histograms and (with
        stats.images and `images`) images."""
        sc = self.stats
        scalars, maps = self.probe(params, self.probe_tokens)
        flat = flatten_scalars(scalars, self.model_cfg)
        logger.log(flat, step=step)
        logger.log_histograms({k: (v, sc.hist_bins) for k, v in histograms(scalars).items()},
                              step=step)
        if sc.images and images:
            figures = map_figures(maps, self.model_cfg, layers=tuple(sc.image_layers))
            logger.log_images(figures, step=step)
            import matplotlib.pyplot as plt

            for fig in figures.values():
                plt.close(fig)
        return flat

    def wants_images(self, step: int) -> bool:
        """Images (matplotlib, the slowest part of an evaluation) at the run's first and last
        evaluation, or at every one with stats.images_every_eval."""
        return bool(self.stats.get("images_every_eval", False)) or step <= self.tc.eval_every \
            or step >= self.tc.steps

    def evaluate(self, params, step: int, logger,
                 extra: dict[str, float] | None = None) -> tuple[dict[str, float], str]:
        """The losses (with `extra`, e.g. the training clock, in the same row), a sample and the
        statistics."""
        metrics = {**self.losses(params), **(extra or {})}
        sample = self.sample(params, step)
        logger.log(metrics, step=step)
        if self.probe is not None:
            metrics.update(self.statistics(params, step, logger, images=self.wants_images(step)))
        logger.log_table("samples", ["step", "text"], [[step, sample]], step=step)
        return metrics, sample


class BackgroundJobs:
    """`jobs` started at once, each on its own daemon thread; join() waits for all, re-raises the
    first error one of them raised, and returns their results in order."""

    def __init__(self, jobs):
        self.errors, self.results = [], [None] * len(jobs)
        self.threads = [threading.Thread(target=self._run, args=(i, job),
                                         name="grassjax-background", daemon=True)
                        for i, job in enumerate(jobs)]
        for thread in self.threads:
            thread.start()

    def _run(self, i, job):
        try:
            self.results[i] = job()
        except BaseException as err:  # noqa: BLE001 - handed to the joining thread
            self.errors.append(err)

    def join(self) -> list:
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]
        return self.results
