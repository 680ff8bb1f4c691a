"""Use a trained run: load it, sample from it as it decodes, evaluate it over a whole split.

    model, vocab, config = grassjax.load_run("runs/grassmann_shakespeare")
    ids = grassjax.generation.generate_streaming(model, jnp.asarray([vocab.encode("ROMEO:")]),
                                                 jax.random.key(0), max_new_tokens=40)
    print(vocab.decode(ids[0]))

`launch.py --mode=sample` and `--mode=evaluate` are thin wrappers around
`grassjax.generation.stream_tokens` and `evaluate_split`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from grassjax.generation import stream_tokens
from grassjax.data import CharVocab, DataError
from grassjax.nn.model import BigramLanguageModel, build_model
from grassjax.train.workdir import CONFIG_NAME


class RunError(DataError):
    """A workdir that holds no usable trained run; the message is one line naming the fix."""


@dataclasses.dataclass
class LoadedRun:
    """A trained run: unpacks as `model, vocab, config`; `step` is the checkpoint's step, `choice`
    what chose it ("best", "latest" or "step")."""

    model: nnx.Module
    vocab: Any  # CharVocab or grassjax.data.wikitext.WordPieceVocab
    config: ml_collections.ConfigDict
    step: int
    workdir: pathlib.Path
    choice: str = "latest"

    def __iter__(self):
        return iter((self.model, self.vocab, self.config))


def _load_vocab(path: pathlib.Path):
    data = json.loads(path.read_text())
    if data.get("kind") == "wordpiece":
        from grassjax.data.wikitext import WordPieceVocab

        return WordPieceVocab.from_dict(data)
    return CharVocab.from_dict(data)


CHOICES = ("best", "latest")


def parse_checkpoint(choice: str | int | None) -> str | int | None:
    """--checkpoint=best|latest|STEP as "best", "latest", an int, or None (the default: best where
    one exists); RunError for anything else."""
    if choice is None or isinstance(choice, int):
        return choice
    text = str(choice).strip().lower()
    if text in ("", "default"):
        return None
    if text in CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise RunError(f"--checkpoint={choice!r}: expected best, latest or a step number")


def _available(checkpointer) -> str:
    steps = checkpointer.all_steps()
    best = checkpointer.best_step()
    parts = [f"latest (step {steps[-1]})"] if steps else []
    parts += [f"best (step {best})"] if best is not None else []
    parts += [f"steps {', '.join(map(str, steps))}"] if steps else []
    return "; ".join(parts) or "none"


def _restore_choice(checkpointer, template, choice, print_fn):
    """(state, choice made, why) for --checkpoint=`choice`; RunError naming what exists
    otherwise."""
    from grassjax.train.workdir import WorkdirError

    best = checkpointer.best_step()
    where = checkpointer.workdir
    if choice == "best" and best is None:
        raise RunError(f"--checkpoint=best: {where} has no best checkpoint (trained before best "
                       f"checkpoints were kept, or never evaluated); available: "
                       f"{_available(checkpointer)}")
    if isinstance(choice, int) and choice != best and choice not in checkpointer.all_steps():
        raise RunError(f"--checkpoint={choice}: {where} has no checkpoint of step {choice}; "
                       f"available: {_available(checkpointer)}")
    if (choice == "best" or (choice is None and best is not None)
            or (isinstance(choice, int) and choice == best)):
        try:
            loss = checkpointer.best_val_loss()
            state = checkpointer.restore(template, best, best=True)
        except Exception as err:  # noqa: BLE001 - a corrupt best, or orbax's own errors
            reason = (str(err) if isinstance(err, WorkdirError)
                      else f"{type(err).__name__}: {err}".splitlines()[0])
            if choice is not None:
                raise RunError(f"--checkpoint={choice}: the best checkpoint (step {best}) cannot "
                               f"be read ({reason[:200]}); available: "
                               f"{_available(checkpointer)}") from None
            print_fn(f"Warning: the best checkpoint (step {best}) cannot be read ({reason[:200]}); "
                     f"using the newest instead")
        else:
            return state, "best", f"the best checkpoint: val loss {loss:.4f}, the lowest of the " \
                                  f"run's evaluations on sampled validation batches"
    if isinstance(choice, int):
        return checkpointer.restore(template, choice), "step", f"--checkpoint={choice}"
    state = checkpointer.restore_newest_good(template, print_fn)
    why = ("--checkpoint=latest" if choice == "latest"
           else "the newest checkpoint (the run has no readable best)")
    return state, "latest", why


def load_run(workdir: str | pathlib.Path, print_fn: Callable[[str], None] = print, *,
             checkpoint: str | int | None = None) -> LoadedRun:
    """The model, vocabulary and resolved config of a training run's workdir, read without writing
    to it.

    checkpoint: "best" (the state of the evaluation with the lowest val loss; the default where the
    run kept one), "latest" (the newest good checkpoint), or a step number. One line says which was
    used.
    """
    from grassjax.train.checkpoint import CheckpointMismatchError, Checkpointer
    from grassjax.train.config import with_legacy_values
    from grassjax.train.optim import train_hparams
    from grassjax.train.setup import model_config_from
    from grassjax.train.step import init_train_state
    from grassjax.train.workdir import WorkdirError

    choice = parse_checkpoint(checkpoint)
    workdir = pathlib.Path(workdir)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise RunError(f"no checkpoint in {workdir}; train first (python launch.py --exp=NAME "
                       f"--workdir={workdir}) or pass the --workdir of a trained run")
    missing = [name for name in (CONFIG_NAME, "vocab.json") if not (workdir / name).exists()]
    if missing:
        raise RunError(f"{workdir} has checkpoints but no {' or '.join(missing)} (written by "
                       f"training since this version); resume the run once to write them")
    config = ml_collections.ConfigDict(
        with_legacy_values(json.loads((workdir / CONFIG_NAME).read_text())))
    vocab = _load_vocab(workdir / "vocab.json")
    model = build_model(model_config_from(config, vocab.size), seed=config.train.seed)
    # the saved structure
    template = init_train_state(nnx.state(model, nnx.Param), train_hparams(config.train))
    checkpointer = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints,
                                read_only=True)
    try:
        state, made, why = _restore_choice(checkpointer, template, choice, print_fn)
    except CheckpointMismatchError as err:
        raise RunError(f"{err}, unlike its {CONFIG_NAME} and vocab.json; rerun its training "
                       f"command to rewrite them, or pass the --workdir of another run") from None
    except WorkdirError as err:
        raise RunError(str(err)) from None
    finally:
        checkpointer.close()
    nnx.update(model, state.params)
    print_fn(f"{workdir}: using step {int(state.step)}, {why}")
    return LoadedRun(model, vocab, config, int(state.step), workdir, made)


def encode_prompt(vocab, prompt: str) -> np.ndarray:
    """Token ids of `prompt`; characters outside a character vocabulary are named in one line."""
    if isinstance(vocab, CharVocab):
        unknown = sorted(set(prompt) - set(vocab.chars))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise RunError(f"--prompt has {len(unknown)} character(s) outside the run's "
                           f"{vocab.size}-character vocabulary: {shown}; remove or replace them")
    ids = vocab.encode(prompt)
    if len(ids) == 0:
        raise RunError("--prompt encodes to no tokens; pass at least one character of the "
                       "vocabulary")
    return np.asarray(ids, np.int32)


def eval_windows(num_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over a stream of num_tokens tokens.

    Window [begin, end) is the model's input; it predicts tokens begin+1 .. end, of which only those
    from `first` on are scored, so that every token after the first is scored exactly once (the
    sliding-window method of Hugging Face's "Perplexity of fixed-length models"). stride =
    block_size gives non-overlapping windows; a smaller stride gives each scored token more context,
    at more compute.
    """
    windows, scored_to = [], 0  # every target index <= scored_to is done
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + block_size, num_tokens - 1)
        windows.append((begin, end, scored_to + 1))
        scored_to = end
        if end == num_tokens - 1:
            break
    return windows


def evaluate_split(model, tokens: np.ndarray, *, stride: int | None = None,
                   batch_size: int = 32) -> dict[str, Any]:
    """Loss (nats/token), perplexity and bits per token of `model` over the whole token stream."""
    block = model.cfg.block_size
    stride = stride or block
    if not 1 <= stride <= block:
        raise RunError(f"--stride={stride} must be in [1, block_size={block}]")
    tokens = np.asarray(tokens, np.int32)
    windows = eval_windows(len(tokens), block, stride)
    n = -(-len(windows) // batch_size) * batch_size  # whole batches: one compiled shape
    x = np.zeros((n, block), np.int32)
    y = np.zeros((n, block), np.int32)
    mask = np.zeros((n, block), np.float32)
    for i, (begin, end, first) in enumerate(windows):
        length = end - begin
        x[i, :length], y[i, :length] = tokens[begin:end], tokens[begin + 1:end + 1]
        mask[i, first - begin - 1:length] = 1.0  # target j sits at column j - begin - 1
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll_sum(state, x, y, mask):
        logits = nnx.merge(graphdef, state)(x)  # deterministic: no dropout
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return (nll * mask).sum()

    total = 0.0
    for i in range(0, n, batch_size):
        total += float(nll_sum(state, x[i:i + batch_size], y[i:i + batch_size],
                               mask[i:i + batch_size]))
    count = int(mask.sum())
    loss = total / count
    return dict(loss=loss, ppl=math.exp(loss), bits_per_token=loss / math.log(2),
                tokens_scored=count, windows=len(windows), block_size=block, stride=stride)


def sample_run(workdir, *, prompt: str = "\n", num_tokens: int = 500, temperature: float = 0.8,
               top_k: int = 0, num_samples: int = 1, seed: int = 0,
               checkpoint: str | int | None = None, write: Callable[[str], None] | None = None,
               print_fn: Callable[[str], None] = print) -> list[str]:
    """launch.py --mode=sample: print num_samples continuations of `prompt` as they decode; returns
    them."""
    import sys
    import time

    wrong = [f"--{name} must be {rule}, got {value}" for name, value, rule, ok in (
        ("num_tokens", num_tokens, ">= 1", num_tokens >= 1),
        ("num_samples", num_samples, ">= 1", num_samples >= 1),
        ("temperature", temperature, "a finite number >= 0 (0 = greedy)",
         math.isfinite(temperature) and temperature >= 0),
        ("top_k", top_k, ">= 0 (0 = all tokens)", top_k >= 0)) if not ok]
    if wrong:
        raise RunError("; ".join(wrong))
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    run = load_run(workdir, print_fn, checkpoint=checkpoint)
    prompt_ids = encode_prompt(run.vocab, prompt)
    # WordPiece pieces are only readable decoded together
    streams_chars = isinstance(run.vocab, CharVocab)
    kind = "bigram table" if isinstance(run.model, BigramLanguageModel) else \
        {"attention": "KV cache", "grassmann": "Grassmann window"}[run.model.cfg.mixer]
    print_fn(f"{run.workdir} at step {run.step}: {num_samples} sample(s) of {num_tokens} tokens, "
             f"temperature {temperature}, top_k {top_k or 'off'}, {kind} decoder")
    texts, produced, elapsed = [], 0, 0.0
    for i in range(num_samples):
        print_fn(f"--- sample {i + 1} ---")
        write(prompt)
        start, ids = time.perf_counter(), []
        for token in stream_tokens(run.model, prompt_ids,
                                   jax.random.fold_in(jax.random.key(seed), i),
                                   num_tokens=num_tokens, temperature=temperature,
                                   top_k=top_k or None):
            ids.append(token)
            if streams_chars:
                write(run.vocab.decode([token]))
        elapsed += time.perf_counter() - start
        produced += len(ids)
        text = run.vocab.decode(np.asarray(ids))
        if not streams_chars:
            write(text)
        write("\n")
        texts.append(prompt + text)
    print_fn(f"{produced} tokens in {elapsed:.2f}s: {produced / elapsed:,.0f} tokens/s "
             f"(compilation included)")
    return texts


def eval_file_name(split: str, checkpoint: str | int | None = None) -> str:
    """eval-<split>.json for the default checkpoint; eval-<split>-latest.json, -best, -step<N>
    otherwise."""
    choice = parse_checkpoint(checkpoint)
    suffix = "" if choice is None else f"-step{choice}" if isinstance(choice, int) else f"-{choice}"
    return f"eval-{split}{suffix}.json"


def evaluate_run(workdir, *, data_dir: str | None = None, split: str = "val", stride: int = 0,
                 checkpoint: str | int | None = None, quiet_choice: bool = False,
                 print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """launch.py --mode=evaluate: loss, perplexity, bits/token over the whole split, written to
    eval-<split>.json (eval_file_name), the one file it writes; a workdir it cannot write is one
    line."""
    from grassjax.data import load_dataset

    run = load_run(workdir, (lambda *_: None) if quiet_choice else print_fn, checkpoint=checkpoint)
    dataset = load_dataset(run.config.data, data_dir)
    splits = {name: getattr(dataset, name) for name in ("train", "val", "test")
              if hasattr(dataset, name)}
    if split not in splits:
        raise RunError(f"--split={split!r} is not a split of {run.config.data.dataset}; valid: "
                       f"{', '.join(splits)}")
    result = evaluate_split(run.model, splits[split], stride=stride or None)
    result = dict(split=split, step=run.step, checkpoint=run.choice,
                  dataset=run.config.data.dataset, **result)
    unit = "char" if isinstance(run.vocab, CharVocab) else "token"
    rows = [("split", split), ("checkpoint step", f"{run.step} ({run.choice})"),
            ("tokens scored", f"{result['tokens_scored']:,}"),
            ("windows",
             f"{result['windows']:,} of {result['block_size']}, stride {result['stride']}"),
            (f"loss (nats/{unit})", f"{result['loss']:.4f}"),
            ("perplexity", f"{result['ppl']:.3f}"),
            (f"bits/{unit}", f"{result['bits_per_token']:.4f}")]
    width = max(len(k) for k, _ in rows)
    print_fn("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if jax.process_index() == 0:  # only process 0 writes to the workdir
        path = pathlib.Path(workdir) / eval_file_name(split, checkpoint)
        try:
            path.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as err:
            reason = err.strerror or type(err).__name__
            print_fn(f"could not write {path} ({reason}); the numbers above are complete")
        else:
            print_fn(f"written: {path}")
    return result
