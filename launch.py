"""Run a named experiment: python launch.py --exp=grassmann_shakespeare [--config.train.steps=500]

--list names the experiments. --config.<section>.<key>=V overrides any field of the experiment's
config, type-checked (sections: model, data, train, stats, wandb; comparisons add arms and compare,
benchmarks bench, the learning-rate search tune); --print_config shows the resolved config.
--mode=sample and --mode=evaluate use a trained run's workdir (docs/running.md, "Using a trained
run"). The flags are listed in docs/running.md, "Flags".
"""

from __future__ import annotations

import atexit
import os
import sys

from absl import app, flags, logging

import experiments

FLAGS = flags.FLAGS
flags.DEFINE_string("exp", None, "Experiment name; see --list.")
flags.DEFINE_bool("list", False, "List the experiments, one line each, and exit.")
flags.DEFINE_string("workdir", None,
                    "Run directory (default: runs/<exp>). A rerun with the same one resumes.")
flags.DEFINE_string("data_dir", None,
                    "Folder containing tinyshakespeare/input.txt (else $GRASSJAX_DATA_DIR).")
flags.DEFINE_enum("wandb_mode", "auto", ["auto", "online", "offline", "disabled"],
                  "Weights & Biases mode.")
flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
flags.DEFINE_bool("restart", False, "Move an existing --workdir aside (renamed "
                  "<workdir>.previous-<time>) and start over instead of resuming.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate"],
                  "train; sample from the workdir's best checkpoint (by default; see "
                  "--checkpoint); or evaluate it over a whole split.")
flags.DEFINE_string("prompt", "\n", "--mode=sample: the text to continue.")
flags.DEFINE_integer("num_tokens", 500, "--mode=sample: tokens to generate per sample.")
flags.DEFINE_float("temperature", 0.8, "--mode=sample: softmax temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "--mode=sample: sample among the k most likely tokens (0 = all).")
flags.DEFINE_integer("num_samples", 1, "--mode=sample: how many samples.")
flags.DEFINE_integer("seed", 0, "--mode=sample: random seed.")
flags.DEFINE_string("split", "val", "--mode=evaluate: train, val (or test on WikiText-2).")
flags.DEFINE_string("checkpoint", None, "--mode=sample/evaluate: best (the default where the run "
                    "kept one), latest, or a step number.")
flags.DEFINE_integer("stride", 0, "--mode=evaluate: window stride in tokens (0 = block size: "
                     "non-overlapping).")
flags.DEFINE_string("compile_cache", os.path.join("~", ".cache", "grassjax", "xla"),
                    "Folder that keeps compiled XLA programs for later runs: a rerun, a resumed "
                    "run or a tuning trial at another learning rate compiles in seconds. '' turns "
                    "it off; $JAX_COMPILATION_CACHE_DIR wins where set. Benchmarks do not use it "
                    "(they measure compilation).")
flags.DEFINE_bool("reuse_host_memory", True,
                  "Let glibc keep freed memory for the next step instead of returning it to the OS "
                  "after every step (grassjax.host): otherwise XLA:CPU steps page-fault their "
                  "temporaries anew, which is much slower (PERFORMANCE.md).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (enables jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
flags.DEFINE_integer("process_id", None,
                     "Multi-host: index of this process (0 logs and writes checkpoints).")
flags.DEFINE_integer("distributed_timeout", 60,
                     "Multi-host: seconds to wait for every process to join.")

def fail(message: str, code: int = 2):
    """One line on stderr, no traceback."""
    print(f"launch.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parses the ordinary flags; main takes the --config.* overrides (split_overrides) once
    the experiment, and so the config they are checked against, is known."""
    from grassjax.train.config import ConfigError, split_overrides

    try:
        rest, _ = split_overrides(argv[1:])
    except ConfigError as err:
        fail(str(err))
    try:
        return FLAGS(argv[:1] + rest)
    except flags.Error as err:
        fail(f"{err}. Run python launch.py --help for the flags.")


def use_compile_cache(folder: str, exp_name: str | None) -> None:
    """JAX's persistent compilation cache in `folder` (see --compile_cache). Programs are keyed by
    their HLO, the JAX version and the flags, so a stale entry is never used; XLA:CPU refuses one
    built for another CPU."""
    experiment = experiments.EXPERIMENTS.get(exp_name)
    if (os.environ.get("JAX_COMPILATION_CACHE_DIR") or not folder
            or (experiment and experiment.measures_compilation)):
        return
    folder = os.path.expanduser(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        reason = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as err:
        reason = err.strerror
    if reason:
        print(f"compile cache off: cannot write {folder} ({reason}); pass --compile_cache=DIR, or "
              f"--compile_cache='' to silence this", file=sys.stderr)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)


def use_trained_run(mode: str, workdir: str):
    """--mode=sample / --mode=evaluate: the run's own config (run_config.json) is used, not
    --config.*."""
    from grassjax import inference

    if mode == "sample":
        inference.sample_run(workdir, prompt=FLAGS.prompt, num_tokens=FLAGS.num_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                             num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                             checkpoint=FLAGS.checkpoint)
    else:
        inference.evaluate_run(workdir, data_dir=FLAGS.data_dir, split=FLAGS.split,
                               stride=FLAGS.stride, checkpoint=FLAGS.checkpoint)


def main(argv):
    from grassjax.train.timeline import PROCESS

    # benchmark_end_to_end: what came before this mark is the interpreter and the imports
    PROCESS.mark("main")
    logging.set_verbosity(logging.WARNING)  # keep orbax / JAX info chatter off the console
    if FLAGS.reuse_host_memory:
        from grassjax.host import keep_freed_memory

        # before the first step allocates: a no-op where the C library is not glibc
        keep_freed_memory()
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags look like --exp=NAME or "
             f"--config.train.steps=100")
    if FLAGS.list:
        width = max(map(len, experiments.EXPERIMENTS))
        for exp in experiments.EXPERIMENTS.values():
            print(f"{exp.name:<{width}}  {exp.description}")
        return
    if not FLAGS.exp:
        fail(f"pass --exp=NAME; valid: {', '.join(sorted(experiments.EXPERIMENTS))}")

    from grassjax.data import DataError
    from grassjax.train.config import ConfigError, split_overrides
    from grassjax.train.loop import NonFiniteLossError
    from grassjax.runlog import WandbCredentialsError
    from grassjax.extras import MissingExtraError
    from grassjax.train.workdir import WorkdirError

    from grassjax.train.parallel import DistributedError, initialize_distributed

    try:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               timeout_s=FLAGS.distributed_timeout)
    except DistributedError as err:
        if err.stuck:  # a thread is blocked inside jax.distributed: a normal exit would wait on it
            print(f"launch.py: error: {err}", file=sys.stderr, flush=True)
            os._exit(2)
        fail(str(err))
    _, overrides = split_overrides(sys.argv[1:])  # parse_flags has checked them
    use_compile_cache(FLAGS.compile_cache, FLAGS.exp if FLAGS.mode == "train" else None)
    try:
        if FLAGS.print_config:
            print(experiments.resolve_config(FLAGS.exp, overrides)[1])
            return
        if FLAGS.mode != "train":
            use_trained_run(FLAGS.mode, FLAGS.workdir or os.path.join("runs", FLAGS.exp))
            return
        experiments.run(FLAGS.exp, overrides, workdir=FLAGS.workdir, data_dir=FLAGS.data_dir,
                        wandb_mode=FLAGS.wandb_mode, restart=FLAGS.restart)
    except (experiments.UnknownExperimentError, ConfigError, DataError, WandbCredentialsError,
            MissingExtraError) as err:
        fail(str(err))
    except WorkdirError as err:
        fail(str(err), code=err.exit_code)
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    # saved and stopped (StopRequested: 130 for SIGINT, 143 for SIGTERM)
    except KeyboardInterrupt as err:
        sys.exit(getattr(err, "exit_code", 130))


def run_and_exit() -> None:
    """app.run, then the exit without the interpreter's own teardown: by then every file is closed
    and the W&B run finished, and tearing down jax's, orbax's and W&B's threads would take a second
    or more of nothing (atexit handlers still run)."""
    try:
        app.run(main, flags_parser=parse_flags)
        code = 0
    except SystemExit as err:
        if err.code is not None and not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
