"""Studies built on single training runs: comparisons of arms over seeds and their reports, the
ablation's waterfall, time and token matching, the long-context report, learning-rate tuning.

Each study runs grassjax.train.loop.train as it is; nothing in grassjax.train imports this package.
"""
