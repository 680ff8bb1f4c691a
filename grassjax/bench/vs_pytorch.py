"""JAX vs PyTorch: the same model's train step, timed interleaved in one process.

For each setting (block size x batch) and mixer, the JAX step (`make_train_step`) and the
PyTorch port (grassjax.bench.torch_port: eager, and `torch.compile` where it works) start from
the same weights and must agree on the first loss (bench.loss_tolerance); then one step of each
is timed in turn, `reps` rounds, so that load on a shared machine hits all of them alike.
Outputs in workdir: results.json, the table on stdout, one W&B run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from grassjax.bench import timing
from grassjax.extras import require
from grassjax.bench.scaling import lm_model_config
from grassjax.nn import build_model, param_counts
from grassjax.train.optim import train_hparams
from grassjax.runlog import RunLogger
from grassjax.runlog.records import write_json
from grassjax.train.step import cross_entropy, init_train_state, make_train_step


def _torch():
    torch = require("torch", extra="torch", feature="benchmark_vs_pytorch")
    from grassjax.bench import torch_port

    return torch, torch_port


def _setup(config, mixer: str, T: int, B: int, frameworks, print_fn):
    """Both implementations from the same weights, with one batch.

    Returns ({name: step_fn}, info).
    """
    torch, tp = _torch()
    device = torch.device(str(config.bench.torch_device))
    mc = lm_model_config(config, mixer, T)
    model = build_model(mc, seed=int(config.train.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x_np = rng.integers(0, mc.vocab_size, (B, T))
    y_np = rng.integers(0, mc.vocab_size, (B, T))
    x, y = jnp.asarray(x_np, jnp.int32), jnp.asarray(y_np, jnp.int32)
    xt = torch.as_tensor(x_np, dtype=torch.long, device=device)
    yt = torch.as_tensor(y_np, dtype=torch.long, device=device)

    jax_loss = float(jax.jit(lambda p: cross_entropy(nnx.merge(graphdef, p)(x), y))(params))
    steps, info = {}, dict(params=param_counts(model)["total"], losses={"jax": jax_loss})

    hparams = train_hparams(config.train)
    jax_step = make_train_step(graphdef, dropout=0.0)
    holder = {"state": init_train_state(params, hparams)}

    def run_jax():
        holder["state"], metrics = jax_step(holder["state"], x, y, hparams)
        jax.block_until_ready(metrics["loss"])

    steps["jax"] = run_jax

    for name in frameworks:
        if name == "jax":
            continue
        torch_model = tp.LanguageModel(mc)
        tp.load_params(torch_model, params)
        torch_model.to(device)
        with torch.no_grad():
            info["losses"][name] = float(torch.nn.functional.cross_entropy(
                torch_model(xt).reshape(-1, mc.vocab_size), yt.reshape(-1)))
        if name == "torch_compile":
            try:
                compiled = torch.compile(torch_model)
                opt, sched = tp.make_optimizer(torch_model, config.train)
                step = tp.make_train_step(compiled, opt, sched,
                                          grad_clip=float(config.train.grad_clip))
                t0 = time.perf_counter()
                step(xt, yt)  # compiles
                _sync(torch, device)
                info["torch_compile_s"] = time.perf_counter() - t0
            # any backend failure means "not available here"
            except Exception as err:  # noqa: BLE001
                info["torch_compile_error"] = (f"{type(err).__name__}: "
                                               f"{str(err).splitlines()[0][:200]}")
                print_fn(f"  torch.compile unavailable for {mixer} T={T}: "
                         f"{info['torch_compile_error']}")
                continue
        else:
            opt, sched = tp.make_optimizer(torch_model, config.train)
            step = tp.make_train_step(torch_model, opt, sched,
                                      grad_clip=float(config.train.grad_clip))
        steps[name] = lambda step=step: (step(xt, yt), _sync(torch, device))
    return steps, info


def _sync(torch, device) -> None:
    """Wait for the GPU, as block_until_ready does on the JAX side.

    A CPU step has finished when it returns.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _matmul_precision(torch, precision: str):
    """The same float32 matmul precision on both sides, for the run only.

    "highest" (true float32) or "tensorfloat32" (TF32 on NVIDIA GPUs, where JAX and PyTorch
    otherwise default differently). A CPU ignores it.
    """
    if precision not in ("highest", "tensorfloat32"):
        raise SystemExit(f"bench.matmul_precision must be highest or tensorfloat32, "
                         f"got {precision!r}")
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest" if precision == "highest" else "high")
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    try:
        with jax.default_matmul_precision(precision):
            yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def run_vs_pytorch_benchmark(config: ml_collections.ConfigDict, *, workdir, exp_name: str,
                             data_dir=None, wandb_mode: str | None = None) -> dict:
    """Run config.bench's settings; returns the results dict also written to results.json.

    data_dir is accepted for launch.py's common runner signature and unused: batches are random
    tokens.
    """
    del data_dir
    torch, _ = _torch()
    torch.set_num_threads(int(config.bench.torch_threads) or os.cpu_count())
    bench = config.bench
    if str(bench.torch_device).startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.torch_device={bench.torch_device} but this PyTorch sees no GPU: "
                         "use --config.bench.torch_device=cpu, or a CUDA build of torch")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    frameworks = ("jax",) + tuple(f for f in bench.frameworks if f != "jax")
    logger = RunLogger(workdir=workdir, project=config.wandb.project,
                       name=config.wandb.name or exp_name, group=config.wandb.group or None,
                       tags=list(config.wandb.tags), config=config.to_dict(), mode=wandb_mode,
                       job_type="benchmark", print_fn=print)
    load_before = os.getloadavg()
    print(f"{exp_name}: JAX {jax.__version__} on {jax.devices()[0].device_kind} "
          f"vs PyTorch {torch.__version__} on "
          f"{bench.torch_device} ({torch.get_num_threads()} threads), "
          f"{bench.matmul_precision} float32 matmuls, "
          f"{bench.reps} interleaved rounds after {bench.warmup} warm-up; "
          f"load average {load_before[0]:.2f} "
          f"on {os.cpu_count()} cores")
    rows, start = [], time.perf_counter()
    precision = contextlib.ExitStack()
    try:
        precision.enter_context(_matmul_precision(torch, str(bench.matmul_precision)))
        for index, (T, B) in enumerate(zip(bench.seq_lens, bench.batch_sizes)):
            for mixer in bench.mixers:
                steps, info = _setup(config, mixer, int(T), int(B), frameworks, print)
                gap = max(abs(v - info["losses"]["jax"]) for v in info["losses"].values())
                if gap > float(bench.loss_tolerance):
                    raise RuntimeError(f"{mixer} T={T}: the implementations disagree on the "
                                       f"first loss ({info['losses']}), so their timings "
                                       "would not be comparable")
                for _ in range(int(bench.warmup)):  # compiles JAX, warms PyTorch's allocator
                    for run in steps.values():
                        run()
                samples = {name: [] for name in steps}
                for _ in range(int(bench.reps)):
                    for name, run in steps.items():
                        t0 = time.perf_counter()
                        run()
                        samples[name].append(time.perf_counter() - t0)
                eager = (timing.Timing.from_samples(samples["torch"]).median_s
                         if "torch" in samples else None)
                for name, s in samples.items():
                    t = timing.Timing.from_samples(s)
                    rows.append(dict(T=int(T), batch=int(B), mixer=mixer, framework=name,
                                     params=info["params"],
                                     first_loss=info["losses"].get(name, info["losses"]["jax"]),
                                     step_ms=1e3 * t.median_s, p25_ms=1e3 * t.p25_s,
                                     p75_ms=1e3 * t.p75_s,
                                     tokens_per_s=B * T / t.median_s, reps=t.reps,
                                     over_torch_eager=t.median_s / eager if eager else None,
                                     compile_s=(info.get("torch_compile_s")
                                                if name == "torch_compile" else None)))
                    print(f"  T={T:<4} {mixer:<9} {name:<13} {1e3 * t.median_s:8.2f} ms "
                          f"(IQR {1e3 * t.p25_s:.2f}-{1e3 * t.p75_s:.2f})  "
                          f"{B * T / t.median_s:9.0f} tok/s"
                          + (f"  {t.median_s / eager:.3f}x torch eager" if eager else ""))
                logger.log({f"{r['framework']}/{r['mixer']}/step_ms": r["step_ms"]
                            for r in rows if r["T"] == T},
                           step=index)
        table = _table(rows)
        print(table)
        summary = {f"{r['mixer']}/T{r['T']}/{r['framework']}_over_torch_eager":
                   r["over_torch_eager"]
                   for r in rows if r["over_torch_eager"] is not None}
        logger.set_summary(summary)
    finally:
        precision.close()
        logger.finish()
    results = dict(experiment=exp_name, config=config.to_dict(), rows=rows, summary=summary,
                   table=table,
                   environment={**timing.machine_info(), "torch": torch.__version__,
                                "torch_device": str(bench.torch_device),
                                "jax_device": jax.devices()[0].device_kind,
                                "torch_threads": torch.get_num_threads(),
                                "load_average_before": load_before,
                                "load_average_after": os.getloadavg()},
                   wall_s=time.perf_counter() - start)
    write_json(workdir / "results.json", results, indent=2)
    print(f"wrote {workdir / 'results.json'} in {results['wall_s']:.0f} s")
    return results


def _table(rows: list[dict]) -> str:
    lines = ["| T | batch | mixer | framework | ms/step (median) | IQR | tokens/s "
             "| / torch eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['over_torch_eager']:.3f}" if r["over_torch_eager"] is not None else "-"
        lines.append(f"| {r['T']} | {r['batch']} | {r['mixer']} | {r['framework']} | "
                     f"{r['step_ms']:.2f} | "
                     f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f} | {r['tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)
