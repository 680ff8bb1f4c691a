"""Where a train step's time goes: a jax.profiler trace of the LM train steps, summed per XLA op.

Each mixer's compiled train step runs `steps` times under `jax.profiler.trace`; the time of each
executed XLA op is summed and named after what it computes (the ops inside a fusion and the JAX
op_name that produced it, read from the optimized HLO). Writes profile.md (top ops per mixer),
results.json and the trace under trace/<mixer>/ (Perfetto, ui.perfetto.dev, or TensorBoard).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import resource
import time

import jax
import ml_collections

from grassjax.bench import timing
from grassjax.bench.scaling import lm_setup
from grassjax.runlog.records import write_json

# HLO ops too common to describe a fusion by (every fusion moves data around).
_PLUMBING = {"parameter", "constant", "broadcast", "reshape", "bitcast", "copy", "tuple",
             "get-tuple-element", "convert", "slice", "concatenate", "transpose", "iota", "compare",
             "select", "and", "or", "not"}


def summarize_trace(trace_dir: pathlib.Path) -> dict[str, dict]:
    """{hlo_op: {"us": total µs, "count": executions}} from the Perfetto trace under trace_dir."""
    files = sorted(pathlib.Path(trace_dir).glob("**/*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: "
                                "was jax.profiler.trace(create_perfetto_trace=True) used?")
    events = json.load(gzip.open(files[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops: dict[str, dict] = collections.defaultdict(lambda: {"us": 0.0, "count": 0})
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args:
            ops[args["hlo_op"]]["us"] += float(e.get("dur", 0.0))
            ops[args["hlo_op"]]["count"] += 1
    return dict(ops)


# One HLO instruction: `%name = shape op(operands), ...`;
# a shape is one token or a parenthesised tuple.
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\(")
# A computation's header: `%name (params) -> shape {` (ENTRY for the main one).
_COMPUTATION = re.compile(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")


def describe_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: what it computes} from optimized HLO text.

    For a fusion (or any op calling a computation): the non-plumbing ops inside it, and the tail of
    the JAX op_name that produced it.
    """
    # computation -> [(name, shape, op, line)]
    bodies: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in hlo_text.splitlines():
        instruction, header = _INSTRUCTION.match(line), _COMPUTATION.match(line)
        if instruction:
            if current is not None:
                bodies[current].append((*instruction.groups(), line))
        elif header:
            current = header.group(1)
            bodies[current] = []
    described = {}
    for body in bodies.values():
        for name, shape, op, line in body:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            inside = collections.Counter(o for _, _, o, _ in bodies.get(called.group(1), [])
                                         if o not in _PLUMBING) if called else collections.Counter()
            kind = f"{op}[{'+'.join(o for o, _ in inside.most_common(4))}]" if inside else op
            source = re.search(r'op_name="([^"]+)"', line)
            where = source.group(1).removeprefix("jit(train_step)/") if source else ""
            # drop layouts: f32[12,64,128]{2,1,0} -> f32[12,64,128]
            shape = re.sub(r"\{[^}]*\}", "", shape)
            described[name] = f"{kind} {shape}" + (f" <{where[-90:]}>" if where else "")
    return described


def profile_step(config, mixer: str, T: int, B: int, *, steps: int, warmup: int,
                 trace_dir: pathlib.Path) -> dict:
    """Trace `steps` train steps of the LM with `mixer`; returns its top ops with their shares."""
    mc, n_params, step, state, args = lm_setup(config, mixer, T, B)
    compiled = step.lower(state, *args).compile()
    # Page faults and kernel CPU time of the untraced steps: a step that maps its temporaries
    # afresh (glibc's default for big blocks, see grassjax.host) shows many faults per step here.
    # Warm up first, so that the first call's faults, which any allocator takes, stay out of the
    # count.
    _, state = timing.time_stateful(compiled, state, *args, reps=1, warmup=max(0, warmup - 1))
    before = resource.getrusage(resource.RUSAGE_SELF)
    untraced, state = timing.time_stateful(compiled, state, *args, reps=steps, warmup=0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, *args)
        jax.block_until_ready(metrics)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    ops = summarize_trace(trace_dir)
    names = describe_ops(compiled.as_text())
    total_us = sum(o["us"] for o in ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1]["us"])
    rows = [dict(op=name, what=names.get(name, ""), ms_per_step=o["us"] / 1e3 / steps,
                 share=o["us"] / total_us, calls_per_step=o["count"] / steps)
            for name, o in top]
    return dict(mixer=mixer, T=T, batch=B, params=n_params, steps=steps,
                step_ms=1e3 * untraced.median_s,
                step_iqr_ms=(1e3 * untraced.p25_s, 1e3 * untraced.p75_s),
                traced_wall_ms_per_step=wall_ms, op_ms_per_step=total_us / 1e3 / steps, ops=rows,
                page_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
                kernel_ms_per_step=1e3 * (after.ru_stime - before.ru_stime) / steps)


_KINDS = (("matmul", ("dot", "convolution")), ("scatter / gather", ("scatter", "gather")),
          ("transcendental (exp, log, tanh, ...)",
           ("exponential", "log", "tanh", "erf", "rsqrt", "sqrt", "power")),
          ("reduction", ("reduce",)))


def op_kind(what: str) -> str:
    """A coarse kind for an op described by describe_ops.

    The first of _KINDS it contains, else elementwise.
    """
    ops = what.split(" ")[0]
    return next((kind for kind, keys in _KINDS if any(k in ops for k in keys)),
                "elementwise / copy / other")


def by_kind(ops: list[dict]) -> list[dict]:
    """Shares and op counts per kind, largest first."""
    kinds: dict[str, dict] = collections.defaultdict(
        lambda: {"share": 0.0, "ms_per_step": 0.0, "ops": 0})
    for op in ops:
        kind = kinds[op_kind(op["what"])]
        kind["share"] += op["share"]
        kind["ms_per_step"] += op["ms_per_step"]
        kind["ops"] += 1
    return sorted(({"kind": k, **v} for k, v in kinds.items()), key=lambda r: -r["share"])


def format_profile(result: dict, top: int) -> str:
    lines = [f"### {result['mixer']} LM, T = {result['T']}, batch {result['batch']} "
             f"({result['params']:,} parameters)",
             "",
             f"Step {result['step_ms']:.1f} ms untraced (median of {result['steps']}, IQR "
             f"{result['step_iqr_ms'][0]:.1f}-{result['step_iqr_ms'][1]:.1f}); "
             f"{result['steps']} traced steps: "
             f"{result['traced_wall_ms_per_step']:.1f} ms/step wall under the tracer, of which "
             f"{result['op_ms_per_step']:.1f} ms inside the {len(result['ops'])} distinct XLA ops "
             "(the rest: the runtime between ops, and the tracer). "
             "Shares are of the time inside ops. Untraced, each step took "
             f"{result['page_faults_per_step']:,.0f} page faults and "
             f"{result['kernel_ms_per_step']:.1f} ms of kernel CPU time "
             "(thousands of faults: the step's temporaries are mapped afresh each time; "
             "see grassjax.host).",
             "", "| # | op | share | ms/step | calls/step | what (ops inside, JAX source) |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["ops"][:top], 1):
        lines.append(f"| {i} | `{r['op']}` | {100 * r['share']:.1f}% | {r['ms_per_step']:.2f} | "
                     f"{r['calls_per_step']:.0f} | {r['what'].replace('|', '/')} |")
    rest = sum(r["share"] for r in result["ops"][top:])
    lines.append(f"| | the other {max(0, len(result['ops']) - top)} ops | {100 * rest:.1f}% "
                 "| | | |")
    lines += ["", "By kind (an op is a matmul if it contains a dot, and so on down the list):", "",
              "| kind | share | ms/step | distinct ops |", "|---|---|---|---|"]
    lines += [f"| {k['kind']} | {100 * k['share']:.1f}% | {k['ms_per_step']:.2f} | {k['ops']} |"
              for k in by_kind(result["ops"])]
    return "\n".join(lines)


def run_profile(config: ml_collections.ConfigDict, *, workdir, exp_name: str, data_dir=None,
                wandb_mode: str | None = None) -> dict:
    """Profile each of config.bench.mixers; writes profile.md and results.json.

    data_dir and wandb_mode are accepted for the common runner signature and unused: batches are
    random tokens, nothing is logged.
    """
    del data_dir, wandb_mode
    bench, workdir = config.bench, pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{exp_name}: {timing.machine_info().get('cpu_model', jax.devices()[0].device_kind)}, "
          f"JAX {jax.__version__}, "
          f"load average {timing.load_average()}")
    for mixer in bench.mixers:
        result = profile_step(config, mixer, int(bench.seq_len), int(bench.batch_size),
                              steps=int(bench.steps), warmup=int(bench.warmup),
                              trace_dir=workdir / "trace" / mixer)
        results.append(result)
        print(format_profile(result, int(bench.top)) + "\n")
    report = "\n\n".join(format_profile(r, int(bench.top)) for r in results)
    (workdir / "profile.md").write_text(f"# {exp_name}\n\n{report}\n")
    out = dict(experiment=exp_name, config=config.to_dict(), machine=timing.machine_info(),
               results=results)
    write_json(workdir / "results.json", out, indent=2)
    print(f"wrote {workdir / 'profile.md'}, {workdir / 'results.json'} "
          f"and the traces under {workdir / 'trace'}")
    return out
