"""One training run: its config, the jitted step, the loop, evaluations, checkpoints and its workdir."""
