"""One training run: its config, jitted step, loop, evaluations, checkpoints and workdir."""
