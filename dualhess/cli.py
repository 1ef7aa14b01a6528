"""The ``dualhess`` command: ``dualhess analyze`` and ``dualhess compare``.

``dualhess analyze`` with no argument trains a small CNN on scikit-learn's digits in PyTorch,
builds its Flax/JAX twin with identical weights, and computes in both frameworks the top
eigenvalues of the Hessian, its trace, its eigenvalue density and a summary, crosschecks the
two and writes a report (``report.json``, ``report.md``, ``density.png``,
``eigenvalues.png``) to ``dualhess-report/``. ``dualhess analyze FILE.py`` does the same for
the model of a user file (see :func:`load_user_file` for the convention).

``dualhess compare A/report.json B/report.json`` overlays two reports and tabulates the
differences.

This module imports no framework: ``dualhess --help`` works without torch or jax.

Examples
--------
.. code-block:: console

    $ dualhess analyze                       # the embedded default, both frameworks
    $ dualhess analyze my_model.py --top-k 10 --framework torch --out runs/after
    $ dualhess compare runs/before runs/after --labels before after
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import DualhessError, UserFileError

__all__ = [
    "main",
    "build_parser",
    "load_user_file",
    "ModelFile",
    "check_out_dir",
    "CommandLineError",
    "UserFileError",
]

USER_FILE_HELP = """\
user files:
  A model file defines three functions without arguments:
    model()  the model: a torch.nn.Module, a flax nnx.Module, or a linen
             (module, variables) pair
    loss()   the loss: a torch loss module such as nn.CrossEntropyLoss() (its
             reduction is honoured), or for Flax an optax-style function
             (outputs, targets) -> scalar or per-sample values (averaged)
    data()   the data: one batch (inputs, targets) or a list/iterable of batches
             (a DataLoader with shuffle=False); for Flax numpy/jax arrays
  A PyTorch model file may define closure() instead of loss(), for batches that
  are not (inputs, targets) pairs (dicts, Hugging Face models):
    closure()     returns fn(model, batch) -> the batch's mean loss (or a pair
                  (loss_sum, normalizer)), e.g. lambda m, b: m(**b).loss
    normalizer()  optional: returns fn(batch) -> what the batch's loss divides
                  by (e.g. torch_backend.label_count(shift=True) for -100 labels)
  A closure() file is analysed in PyTorch only (the JAX twin follows loss()).
  The Hessian is that of the mean loss over all samples of data().
  torch runs on --threads N threads (default $OMP_NUM_THREADS, else 1).
  A PyTorch model is analysed in PyTorch and in JAX (its Flax twin with the same
  weights) and the two are crosschecked; a Flax model is analysed in JAX.
"""

DEFAULT_OUT = "dualhess-report"


class CommandLineError(DualhessError, ValueError):
    """A command-line argument that cannot be used (exit status 2); names the flag and the fix."""


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuse an output directory that could not be written, before any work is done.

    ``out`` may exist (a directory: the files in it are overwritten) or not (it is created
    when the report is written); its nearest existing ancestor must be a writable directory.
    Nothing is created here, so a run refused later leaves no empty folder behind.

    Raises
    ------
    CommandLineError
        ``out`` is an existing file, lies under a file, or cannot be written.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandLineError(
            f"{flag} {str(out)!r} is an existing file, not a directory; pass a directory "
            f"(the report's files are written into it), e.g. {flag} {str(out)!r}-report"
        )
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandLineError(
            f"{flag} {str(out)!r} cannot be created: {str(existing)!r} is a file, not a "
            f"directory; pass a {flag} directory under an existing directory"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".dualhess-write-test-", dir=existing)
    except OSError as exc:
        raise CommandLineError(
            f"{flag} {str(out)!r} is not writable ({exc.strerror}: {str(existing)!r}); pass a "
            f"{flag} directory you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path



def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return _seed(text)  # the same rule: an integer >= 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dualhess`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dualhess",
        description="Hessian spectral analysis of neural networks in PyTorch and JAX/Flax, "
        "with the two frameworks checking each other.",
    )
    parser.add_argument("--version", action="version", version=f"dualhess {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    an = sub.add_parser(
        "analyze",
        help="compute the top eigenvalues, trace, density and summary of a model's Hessian",
        description="Compute the top-k eigenvalues (with residuals), the trace (XTrace +- "
        "stderr, and the exact trace where BackPACK can), the eigenvalue density (stochastic "
        "Lanczos quadrature) and a summary (lambda_max, lambda_min, negative spectral mass) "
        "of the Hessian of a model's loss, in PyTorch and/or JAX, crosscheck the frameworks, "
        "print a table and write report.json, report.md, density.png and eigenvalues.png. "
        "Without FILE: a small CNN trained deterministically on scikit-learn's digits.",
        epilog=USER_FILE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("file", nargs="?", default=None, metavar="FILE.py",
                    help="a Python file defining model(), loss() and data() (see below); "
                    "default: the embedded digits CNN")
    hf = an.add_argument_group(
        "a Hugging Face model by name (instead of FILE.py): a causal language model or a "
        "sequence classifier")
    hf.add_argument("--hf", default=None, metavar="NAME_OR_DIR",
                    help="a model directory (save_pretrained, with its tokenizer) or a name in "
                    "the local Hugging Face cache; a causal LM is analysed with its causal-LM "
                    "loss over --text or --dataset, every kept token weighted equally across "
                    "batches; a *ForSequenceClassification model with the mean cross-entropy "
                    "over labelled texts, every example weighted equally")
    hf.add_argument("--task", choices=("causal-lm", "sequence-classification"), default=None,
                    help="what to analyse (default: what the config's architectures say)")
    hf.add_argument("--text", default=None, metavar="FILE",
                    help="a UTF-8 text file: a causal LM's text, tokenised and packed into "
                    "sequences; for sequence classification one example per line, "
                    "LABEL<TAB>TEXT (a class index or a label name of the config)")
    hf.add_argument("--dataset", default=None, metavar="NAME[:CONFIG][:SPLIT]",
                    help="a datasets-library data set: its 'text' column (causal LM), or its "
                    "'label' and 'text' (or 'sentence') columns (sequence classification); "
                    "local files and the local cache work offline; split 'train' by default")
    hf.add_argument("--seq-len", type=_positive_int, default=128, metavar="L",
                    help="tokens per sequence (default 128); for sequence classification the "
                    "most tokens of one text (longer ones truncated)")
    hf.add_argument("--batch-size", type=_positive_int, default=2, metavar="B",
                    help="sequences (texts) per batch (default 2)")
    hf.add_argument("--num-batches", type=_positive_int, default=2, metavar="NB",
                    help="batches of the text to analyse (default 2)")
    hf.add_argument("--loss-chunk", type=_non_negative_int, default=None, metavar="T",
                    help="causal LM: tokens per chunk of the cross-entropy, computed from the "
                    "last hidden states through the output embedding so that the tokens x "
                    "vocabulary logits exist one chunk at a time (default: 256 where the "
                    "model allows it, else the full logits; 0: the full logits)")
    an.add_argument("--framework", choices=("torch", "jax", "both"), default=None,
                    help="which frameworks compute: torch, jax, or both (crosschecked). "
                    "Default: both for a PyTorch model, jax for a Flax model")
    an.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                    help="how many of the largest eigenvalues (default 5)")
    an.add_argument("--trace-matvecs", type=_positive_int, default=100, metavar="M",
                    help="Hessian-vector products for the XTrace estimate (default 100)")
    an.add_argument("--density-probes", type=_positive_int, default=10, metavar="P",
                    help="random probes of the spectral density (default 10)")
    an.add_argument("--density-steps", type=_positive_int, default=60, metavar="S",
                    help="Lanczos steps per density probe (default 60)")
    an.add_argument("--seed", type=_seed, default=0,
                    help="seed of the demo training and of every random probe (default 0)")
    an.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="precision of the computation (default float64)")
    an.add_argument("--device", default=None,
                    help="device of the PyTorch side, e.g. cpu or cuda (default: where the "
                    "model is); JAX uses its default device")
    an.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                    help=f"output directory (default {DEFAULT_OUT}/)")
    an.add_argument("--params", default=None, metavar="NAMES",
                    help="a parameter block: comma-separated parameter names or name "
                    "prefixes (e.g. 'conv1' or '0.weight,0.bias'); default all parameters")
    an.add_argument("--per-layer", action="store_true",
                    help="also compute the top eigenvalue, trace and eigenvalue density of "
                    "each layer's Hessian block (in the model's own framework), with the "
                    "Jensen-Shannon distances between the blocks' densities: a table, "
                    "report.json's per_layer, per_layer.png and per_layer_density.png")
    an.add_argument("--landscape", action="store_true",
                    help="also evaluate the loss along the top eigenvector in each framework: "
                    "landscape.png (frameworks overlaid) and report.json's landscape")
    an.add_argument("--landscape-radius", type=_positive_float, default=1.0, metavar="R",
                    help="offsets [-R, R] along the unit top eigenvector (default 1)")
    an.add_argument("--landscape-points", type=_positive_int, default=21, metavar="N",
                    help="points of the slice (default 21; odd puts one at the centre)")
    an.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="CPU threads of torch's products (default: $OMP_NUM_THREADS if set, "
                    "else 1: small products are fastest on one thread, and threads spinning on "
                    "a busy machine cost far more than they give); for the demo and any FILE")
    an.add_argument("--no-plots", action="store_true",
                    help="do not draw density.png and eigenvalues.png (no matplotlib needed)")
    an.add_argument("--quiet", action="store_true",
                    help="no progress bars and no step messages (the table is still printed)")
    an.add_argument("--debug", action="store_true",
                    help="show the full traceback on errors")

    cmp = sub.add_parser(
        "compare",
        help="compare two reports: overlaid plots and a table of differences",
        description="Compare two report.json files (e.g. before/after training, two "
        "optimisers, two frameworks): print a table of differences and write compare.md, "
        "compare.json, density.png and eigenvalues.png.",
    )
    cmp.add_argument("reports", nargs=2, metavar="REPORT",
                     help="two report.json files (or the directories holding them)")
    cmp.add_argument("--out", default="dualhess-compare", metavar="DIR",
                     help="output directory (default dualhess-compare/)")
    cmp.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"),
                     help="names of the two reports in the table and legends (default A B)")
    cmp.add_argument("--framework", default=None, choices=("torch", "jax"),
                     help="which framework's numbers to take from each report (default: the "
                     "first one of each)")
    cmp.add_argument("--no-plots", action="store_true", help="do not draw the figures")
    cmp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


# ---------------------------------------------------------------------- user files
@dataclass
class ModelFile:
    """What a model file defines, each function called once.

    Attributes
    ----------
    model, data
        ``model()`` and ``data()``.
    loss_fn : object or None
        ``loss()``; ``None`` when the file defines ``closure()``.
    closure : callable or None
        ``closure()``: ``fn(model, batch)`` returning the batch loss.
    normalizer : callable or None
        ``normalizer()``: ``fn(batch)`` returning what the batch's loss divides by.
    """

    model: Any
    loss_fn: Any
    data: Any
    closure: Any = None
    normalizer: Any = None

    def __iter__(self) -> Any:  # ``model, loss_fn, data = load_user_file(path)``
        return iter((self.model, self.loss_fn, self.data))


_SIGNATURES = (
    "each function of a model file takes none and returns an object: model() the model (a "
    "torch nn.Module, a flax nnx.Module or a linen (module, variables) pair), loss() the "
    "loss function itself (e.g. return torch.nn.CrossEntropyLoss(), called later as "
    "loss(outputs, targets)) or closure() a function (model, batch) -> loss (e.g. return "
    "lambda m, b: m(**b).loss), data() a batch or a list of batches"
)


def load_user_file(path: str | Path) -> ModelFile:
    """Import a user model file and call its ``model()``, ``loss()`` (or ``closure()``) and
    ``data()``.

    Parameters
    ----------
    path : path
        A Python file defining the functions (see ``dualhess analyze --help``): ``model()``,
        ``data()`` and one of ``loss()`` (called as ``loss(outputs, targets)``) and
        ``closure()`` (called as ``closure(model, batch)``, for dict batches and Hugging
        Face models), optionally ``normalizer()``.

    Returns
    -------
    ModelFile
        Unpacks as ``(model, loss_fn, data)``; ``.closure`` and ``.normalizer`` when defined.

    Raises
    ------
    UserFileError
        The file is missing, cannot be imported, lacks one of the functions, defines both
        ``loss()`` and ``closure()``, or one of them raised; the message names the file and
        the function.

    Examples
    --------
    A file defining ``closure()`` for a model whose batches are dicts::

        def model(): return MyModel()
        def closure(): return lambda m, batch: m(**batch).loss
        def data(): return [{"input_ids": ids, "labels": labels}]
    """
    path = Path(path)
    if path.is_dir():
        raise UserFileError(f"{path} is a directory; pass a Python file (.py) defining model(), "
                            "loss() and data() (see `dualhess analyze --help`)")
    if not path.is_file():
        raise UserFileError(f"{path}: no such file")
    if path.suffix != ".py":
        raise UserFileError(f"{path}: expected a Python file (.py) defining model(), loss(), data()")
    name = f"dualhess_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise UserFileError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserFileError(f"{path}: importing the file raised {_one_line(exc)}") from exc
    defined = {f for f in ("model", "loss", "closure", "normalizer", "data")
               if callable(getattr(module, f, None))}
    if {"loss", "closure"} <= defined:
        raise UserFileError(
            f"{path} defines both loss() and closure(); define loss() for (inputs, targets) "
            "batches or closure() for any other batch, not both"
        )
    loss_name = "closure" if "closure" in defined else "loss"
    missing = [f for f in ("model", loss_name, "data") if f not in defined]
    if missing:
        listed = ", ".join(f"{f}()" for f in missing)
        raise UserFileError(
            f"{path} does not define {listed}; a dualhess model file defines model(), loss() "
            "(or closure()) and data() (see `dualhess analyze --help`)"
        )
    if "normalizer" in defined and loss_name == "loss":
        raise UserFileError(
            f"{path} defines normalizer() beside loss(); a torch loss module brings its own "
            "normaliser (kept labels, class weights): normalizer() goes with closure()"
        )
    out = {}
    for fname in ("model", loss_name, "normalizer", "data"):
        if fname not in defined:
            continue
        function = getattr(module, fname)
        required = _required_parameters(function)
        if required:
            raise UserFileError(
                f"{path}: {fname}({', '.join(required)}) takes arguments; {_SIGNATURES}"
            )
        try:
            out[fname] = function()
        except Exception as exc:
            raise UserFileError(f"{path}: {fname}() raised {_one_line(exc)}") from exc
    if out["data"] is None:
        raise UserFileError(f"{path}: data() returned None; return a batch (inputs, targets) "
                            "or a list of batches")
    for fname in ("closure", "normalizer"):
        if fname in out and not callable(out[fname]):
            raise UserFileError(
                f"{path}: {fname}() returned {type(out[fname]).__name__}, not a function; "
                + ("closure() returns fn(model, batch) -> the batch loss (e.g. return "
                   "lambda m, b: m(**b).loss)" if fname == "closure" else
                   "normalizer() returns fn(batch) -> what the batch's loss divides by")
            )
    return ModelFile(model=out["model"], loss_fn=out.get("loss"), data=out["data"],
                     closure=out.get("closure"), normalizer=out.get("normalizer"))


def _required_parameters(function: Any) -> list[str]:
    """Names of the parameters ``function`` needs (no default, not ``*args``/``**kwargs``)."""
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return [name for name, parameter in signature.parameters.items()
            if parameter.kind in kinds and parameter.default is inspect.Parameter.empty]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------- commands
def _log_to_stderr(quiet: bool) -> Any:
    """Step messages on stderr, written through tqdm so that they never break a progress bar
    (the bar is cleared, the line printed, the bar redrawn below it)."""

    def log(message: str) -> None:
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(message, file=sys.stderr, flush=True)
            return
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()

    return log


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _pin_threads(threads: int | None) -> int:
    """Pin torch's CPU threads, for the demo and any model file alike.

    ``--threads N`` wins; else ``$OMP_NUM_THREADS`` when set; else 1. The variable is set
    before torch is imported (torch reads it then); a torch imported earlier (by the model
    file) is set directly. Returns the thread count.
    """
    if threads is None:
        try:
            threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
        except ValueError:
            threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)
    return threads


def _show_progress(quiet: bool) -> bool:
    """Bars only on a terminal: in a log file or a pipe their carriage returns would glue
    every redraw, and the next log line, into one line."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not quiet and bool(isatty and isatty())


def _check_hf_arguments(args: argparse.Namespace) -> None:
    """--hf takes exactly one of --text and --dataset, and no FILE; the text options need
    --hf. Checked before any work."""
    if args.hf is None:
        if args.text is not None or args.dataset is not None:
            raise CommandLineError("--text and --dataset go with --hf NAME_OR_DIR (a Hugging "
                                   "Face model); a model file brings its own data()")
        if args.task is not None or args.loss_chunk is not None:
            raise CommandLineError("--task and --loss-chunk go with --hf NAME_OR_DIR (a "
                                   "Hugging Face model); a model file brings its own loss()")
        return
    if args.file is not None:
        raise CommandLineError(f"pass either FILE.py ({args.file}) or --hf {args.hf}, not both")
    if (args.text is None) == (args.dataset is None):
        raise CommandLineError("--hf needs exactly one of --text FILE and --dataset NAME")
    if args.text is not None and not Path(args.text).is_file():
        raise CommandLineError(f"--text {args.text}: no such file")


def _analyze(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ._analysis import AnalysisSettings, analyze, package_versions
    from ._report import SCHEMA_VERSION, format_table, write_report

    # Every argument is checked before the (long) analysis: a bad --out used to fail only
    # when the report was written, losing the whole analysis.
    check_out_dir(args.out)
    _check_hf_arguments(args)
    settings = AnalysisSettings(
        framework=args.framework,
        top_k=args.top_k,
        trace_matvecs=args.trace_matvecs,
        density_probes=args.density_probes,
        density_steps=args.density_steps,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        params=args.params,
        progress=_show_progress(args.quiet),
        landscape=args.landscape,
        landscape_radius=args.landscape_radius,
        landscape_points=args.landscape_points,
    ).validate()
    if args.dtype == "float64":
        # JAX computes in float32 unless x64 is on before it is imported.
        os.environ.setdefault("JAX_ENABLE_X64", "1")
    log = _log_to_stderr(args.quiet)
    t_start = time.perf_counter()
    threads = _pin_threads(args.threads)
    figures_skipped = None
    if not args.no_plots and not _importable("matplotlib"):
        figures_skipped = ("matplotlib is not installed (pip install matplotlib, or "
                           "pip install 'dualhess[plots]')")
        args.no_plots = True
    if settings.progress:
        # On a terminal, a first line at once: importing the frameworks and training the
        # demo take seconds before the first stage begins.
        log(f"dualhess analyze: {args.hf or args.file or 'the demo CNN'}, "
            f"{args.dtype}, {threads} thread{'s' if threads > 1 else ''}"
            + (f"; figures skipped: {figures_skipped}" if figures_skipped else ""))
    demo_info = None
    loss_options: dict[str, Any] = {}
    if args.hf is not None:
        from ._demo import hf_problem

        problem = hf_problem(args.hf, text_file=args.text, dataset=args.dataset,
                             task=args.task, seq_len=args.seq_len, batch_size=args.batch_size,
                             num_batches=args.num_batches, dtype=args.dtype,
                             loss_chunk=args.loss_chunk)
        model, loss_fn, data = problem.model, problem.loss_fn, problem.data
        log(problem.info["description"])
        demo_info = {"description": problem.info["description"]}
        source = f"hf:{args.hf}"
    elif args.file is None:
        from ._demo import demo_problem

        model, loss_fn, data, demo_info = demo_problem(seed=args.seed, dtype=args.dtype, log=log)
        source = "demo"
    else:
        loaded = load_user_file(args.file)
        model, loss_fn, data = loaded
        loss_options = {k: v for k, v in (("closure", loaded.closure),
                                          ("normalizer", loaded.normalizer)) if v is not None}
        source = str(args.file)
    _pin_threads(threads)  # the file may have imported torch before the variable was read
    setup = time.perf_counter() - t_start
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # library log records, too, go around the bars
        report = analyze(model, loss_fn, data, settings, log=log, **loss_options)
    report["timings"]["setup"] = round(setup, 6)
    report["timings"]["total"] = round(time.perf_counter() - t_start, 6)
    if demo_info is not None:
        report["model"]["description"] = demo_info["description"]
        if "train_accuracy" in demo_info:
            report["model"]["train_accuracy"] = demo_info["train_accuracy"]
    report.update(
        schema_version=SCHEMA_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="dualhess " + " ".join(argv),
        source=source,
        seed=settings.seed,
        settings=settings.to_dict(),
        versions=package_versions(),
        num_matvecs={f: r["num_matvecs"]["total"] for f, r in report["results"].items()},
    )
    report["per_layer"] = None
    if args.per_layer:
        report["per_layer"] = _per_layer(model, loss_fn, data, args, log, **loss_options)
    report["figures_skipped"] = figures_skipped
    paths = write_report(report, args.out, plots=not args.no_plots)
    print(format_table(report))
    print(f"\nwrote {', '.join(str(p) for p in paths)}  ({report['timings']['total']:.1f} s)")
    agreement = report.get("agreement")
    if agreement is not None and not agreement["passed"]:
        print("warning: the two frameworks disagree beyond round-off; see report.md",
              file=sys.stderr)
    return 0


def _per_layer(model: Any, loss_fn: Any, data: Any, args: argparse.Namespace, log: Any,
               **loss_options: Any) -> dict:
    """Per-layer spectra in the model's own framework; prints the table, draws the plot."""
    from ._per_layer import per_layer_spectra
    from .backends import hessian

    log("per-layer spectra: the Hessian block of each layer, with its eigenvalue density")
    op = hessian(model, loss_fn, data, dtype=args.dtype, **loss_options)
    spectra = per_layer_spectra(op, groups="layer", trace_matvecs=args.trace_matvecs,
                                seed=args.seed, density=True,
                                density_probes=args.density_probes,
                                density_steps=args.density_steps)
    print(spectra.table())
    if not args.no_plots:
        from ._plotting import pyplot

        pyplot(headless=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        spectra.plot(out / "per_layer.png")
        spectra.plot_densities(out / "per_layer_density.png")
    names, distances = spectra.distances()
    densities = {name: {"grid": d.grid.tolist(), "values": d.values.tolist(),
                        "sigma": float(d.sigma), "num_matvecs": int(d.num_matvecs)}
                 for name, d in spectra.densities().items()}
    return {"framework": op.framework, "rows": spectra.rows(), "densities": densities,
            "distances": {"names": names, "jensen_shannon": distances.tolist()}}


def _compare(args: argparse.Namespace) -> int:
    from ._report import compare

    check_out_dir(args.out)
    result = compare(args.reports[0], args.reports[1], args.out, labels=args.labels,
                     framework=args.framework, plots=not args.no_plots)
    print(result["table"])
    if result["settings_differences"]:
        print("settings that differ: " + "; ".join(
            f"{k}: {v[0]} vs {v[1]}" for k, v in result["settings_differences"].items()))
    print(f"\nwrote {', '.join(str(Path(args.out) / f) for f in result['files'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dualhess`` command; returns the exit status (0 ok, 1 failure, 2 bad input).

    Errors print one line, ``dualhess: error: ...``, on stderr (the traceback with
    ``--debug``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args, argv)
        return _compare(args)
    except (UserFileError, ValueError, FileNotFoundError, ImportError) as exc:
        if args.debug:
            raise
        plain = isinstance(exc, (UserFileError, ValueError, FileNotFoundError))
        message = str(exc).strip().splitlines()[0] if plain and str(exc).strip() else _one_line(exc)
        print(f"dualhess: error: {message}", file=sys.stderr)
        bad_input = (UserFileError, FileNotFoundError, CommandLineError)
        return 2 if isinstance(exc, bad_input) else 1
    except KeyboardInterrupt:
        print("dualhess: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"dualhess: error: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
