"""The embedded default of ``dualhess analyze``: a small CNN trained on scikit-learn's digits.

scikit-learn's bundled 8x8 digits (1797 images, no download) and a small convolutional
network ``Conv(1, 16, 3, pad 1) - ReLU - AvgPool(2) - Flatten - Linear(256, 10)`` (2730
parameters), trained deterministically in PyTorch with plain SGD for a few hundred steps
(about a second on a laptop CPU). The demo is a capability of the torch backend
(``Backend.demo_problem``, built in ``torch_backend.examples``), reached through the backend
registry: this module imports no framework itself.

Examples
--------
>>> from dualhess._demo import demo_problem
>>> model, loss_fn, data, info = demo_problem(seed=0)  # doctest: +SKIP
>>> info["num_params"]  # doctest: +SKIP
2730
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["demo_problem"]


def demo_problem(
    *,
    seed: int = 0,
    dtype: str = "float64",
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, loss_fn, data, info)`` of the demo, from the backend that provides it.

    Parameters
    ----------
    seed : int
        Seeds the initialisation and the mini-batch order: same seed, same weights.
    dtype : {"float64", "float32"}
    log : callable, optional
        Receives one line describing the model.
    **options
        Passed to the backend (``train_steps``, ``num_samples``).

    Raises
    ------
    BackendUnavailableError
        The torch backend (the demo is a PyTorch model) is not installed; the message has the
        pip command.
    ModuleNotFoundError
        scikit-learn (the demo's data) is not installed; the message has the pip command.
    """
    from .backends import get_backend

    backend = get_backend("torch")
    try:
        return backend.demo_problem(seed=seed, dtype=dtype, log=log, **options)
    except ModuleNotFoundError as exc:
        if exc.name != "sklearn":
            raise
        # The [torch] extra alone has no scikit-learn: one line with the fix, and the way to
        # analyse a model without it.
        raise ModuleNotFoundError(
            "the demo trains on scikit-learn's bundled digits, and scikit-learn is not "
            "installed: pip install scikit-learn (or pip install 'dualhess[all]'), or analyse "
            "your own model: dualhess analyze FILE.py",
            name="sklearn",
        ) from None


def hf_problem(name_or_dir: Any, **options: Any) -> Any:
    """A Hugging Face causal LM or sequence classifier by name or directory, ready for any
    entry point.

    Loads the model and tokenizer (``from_pretrained``: a local directory, or a name in the
    local cache). A causal LM: packs the text into sequences (the last one padded, its labels
    -100) and builds the causal-LM loss with every kept token weighted equally across batches,
    its cross-entropy computed ``loss_chunk`` tokens at a time through the output embedding. A
    ``*ForSequenceClassification`` model: reads ``LABEL<TAB>TEXT`` lines (or a data set's
    ``label`` and ``text``/``sentence`` columns), pads the texts with attention masks and
    builds the mean cross-entropy with every example weighted equally across batches. See
    ``torch_backend._hf.hf_problem`` and docs/huggingface.md.

    Parameters
    ----------
    name_or_dir : str or Path
    **options
        ``text=`` / ``text_file=`` / ``dataset="NAME[:CONFIG][:SPLIT]"`` (exactly one),
        ``task=None`` (``"causal-lm"`` or ``"sequence-classification"``; default from the
        config's architectures), ``seq_len=128``, ``batch_size=2``, ``num_batches=2``,
        ``dtype="float64"``, ``loss_chunk=None`` (tokens per chunk of the causal-LM
        cross-entropy: None for 256 where the model allows it, 0 for the full logits).

    Returns
    -------
    HFProblem
        ``.model``, ``.tokenizer``, ``.loss_fn``, ``.data``, ``.info``, ``.pretrained``.

    Examples
    --------
    >>> problem = dualhess.hf_problem("tiny-gpt2/", text_file="corpus.txt")  # doctest: +SKIP
    >>> op = dualhess.hessian(problem.model, problem.loss_fn, problem.data)  # doctest: +SKIP
    >>> dualhess.eigsh(op, k=1).values  # doctest: +SKIP
    """
    from .backends import get_backend

    return get_backend("torch").hf_problem(name_or_dir, **options)
