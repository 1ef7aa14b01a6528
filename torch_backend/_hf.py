"""A Hugging Face model by name or directory, with its tokenizer, packed text and its loss.

``dualhess analyze --hf NAME_OR_DIR --text FILE`` (and :func:`dualhess.hf_problem`) reach this
module through the backend registry: it builds the usual ``(model, loss_fn, data)`` triple, so
nothing in the operators knows about Hugging Face.

* The model and tokenizer come from ``from_pretrained`` (a local directory works offline, as
  does a name already in the local cache). A model whose architecture is a causal language
  model (``*ForCausalLM``, ``*LMHeadModel``) is analysed with its causal-LM loss.
* The text (a file, a string, or a ``datasets`` split's ``text`` column) is tokenised once and
  packed into sequences of ``seq_len`` tokens; the last, shorter sequence is padded, its
  padding masked (``attention_mask`` 0) and labelled -100, as every LM pipeline does.
* The loss is the model's own causal-LM loss -- the mean cross-entropy of next-token
  predictions over the labels that are not -100 -- over **all** batches at once: each batch
  contributes its summed token losses divided by the total number of kept tokens of the data
  set (``reduction = "sum"``), so every kept token weighs the same, whatever the batching (the
  loss's normaliser, :mod:`torch_backend._data`). It is computed in the model's dtype:
  Hugging Face's own ``.loss`` casts the logits to float32, which would limit a float64
  analysis to float32 precision.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CausalLMLoss",
    "HiddenStatesLM",
    "SequenceClassificationLoss",
    "chunked_cross_entropy",
    "classification_batches",
    "hf_problem",
    "pack_text",
    "read_labelled_lines",
]

#: Tokens per chunk of the chunked causal-LM cross-entropy when none is given.
DEFAULT_LOSS_CHUNK = 256

TASKS = ("causal-lm", "sequence-classification")


# --------------------------------------------------------------------- chunked cross-entropy
def _chunk_logits(hidden, weight, bias, start, stop):
    logits = hidden[start:stop] @ weight.T
    return logits if bias is None else logits + bias


def _chunk_rows(labels, start, stop):
    """The chunk's labels, with ignored ones (-100) mapped to class 0, and the keep mask."""
    y = labels[start:stop]
    keep = y != -100
    return torch.where(keep, y, torch.zeros_like(y)), keep


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_n [logsumexp(z_n) - z_n[y_n]]`` over kept rows, ``z = h W^T + b`` chunk by chunk.

    Saves ``h, W, b, y`` only (no ``tokens x vocab`` tensor); its backward is
    :class:`_ChunkedCrossEntropyGrad`, which again works chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk_size = chunk_size
        total = hidden.new_zeros(())
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(hidden, weight, bias, start, stop)
            y, keep = _chunk_rows(labels, start, stop)
            picked = logits.gather(1, y[:, None])[:, 0]
            per_row = torch.logsumexp(logits, dim=1) - picked
            total = total + torch.where(keep, per_row, torch.zeros_like(per_row)).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, labels = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _ChunkedCrossEntropyGrad.apply(
            hidden, weight, bias, labels, grad_total, ctx.chunk_size
        )
        return grad_hidden, grad_weight, (None if bias is None else grad_bias), None, None


class _ChunkedCrossEntropyGrad(torch.autograd.Function):
    """The gradient of :class:`_ChunkedCrossEntropy`, and its own derivative (the Hessian
    products), chunk by chunk.

    With ``p = softmax(z)``, ``e = p - onehot(y)`` on kept rows (0 on ignored ones) and the
    incoming ``g``: ``dz = g e``, ``gh = dz W``, ``gW = dz^T h``, ``gb = sum_n dz_n``. The
    backward receives cotangents ``(ah, aW, ab)`` of ``(gh, gW, gb)``; per chunk, with
    ``A = ah W^T + h aW^T + ab`` (the cotangent of ``dz``) and the softmax Jacobian
    ``diag(p) - p p^T``, the cotangent of ``z`` is ``c = g (p * A - p (p . A))``, and

        d h = c W + g e aW,   d W = c^T h + g e^T ah,   d b = sum_n c_n,   d g = <e, A>.

    Third derivatives are not provided (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, grad_total, chunk_size):
        ctx.save_for_backward(hidden, weight, bias, labels, grad_total)
        ctx.chunk_size = chunk_size
        # Out of place (lists, sums): the batched backward of matmat runs this under vmap.
        rows, grad_weight, grad_bias = [], torch.zeros_like(weight), None
        if bias is not None:
            grad_bias = torch.zeros_like(bias)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            e = _ChunkedCrossEntropyGrad._residual(hidden, weight, bias, labels, start, stop)
            dz = grad_total * e
            rows.append(dz @ weight)
            grad_weight = grad_weight + dz.T @ hidden[start:stop]
            if grad_bias is not None:
                grad_bias = grad_bias + dz.sum(0)
        grad_hidden = torch.cat(rows) if rows else torch.zeros_like(hidden)
        return grad_hidden, grad_weight, grad_bias

    @staticmethod
    def _residual(hidden, weight, bias, labels, start, stop):
        """``softmax(z) - onehot(y)`` of a chunk, zero on ignored rows."""
        p = torch.softmax(_chunk_logits(hidden, weight, bias, start, stop), dim=1)
        y, keep = _chunk_rows(labels, start, stop)
        e = p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
        return e * keep[:, None].to(p.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a_hidden, a_weight, a_bias):
        hidden, weight, bias, labels, g = ctx.saved_tensors
        rows, d_weight, d_g = [], torch.zeros_like(weight), hidden.new_zeros(())
        d_bias = None if bias is None else torch.zeros_like(bias)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            p = torch.softmax(_chunk_logits(hidden, weight, bias, start, stop), dim=1)
            y, keep = _chunk_rows(labels, start, stop)
            mask = keep[:, None].to(p.dtype)
            e = (p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)) * mask
            A = a_hidden[start:stop] @ weight.T + h @ a_weight.T  # the cotangent of dz
            if d_bias is not None:
                A = A + a_bias
            pA = p * A
            c = g * (pA - p * pA.sum(1, keepdim=True)) * mask  # through the softmax
            ge = g * e
            rows.append(c @ weight + ge @ a_weight)
            d_weight = d_weight + c.T @ h + ge.T @ a_hidden[start:stop]
            if d_bias is not None:
                d_bias = d_bias + c.sum(0)
            d_g = d_g + (e * A).sum()
        d_hidden = torch.cat(rows) if rows else torch.zeros_like(hidden)
        return d_hidden, d_weight, d_bias, None, d_g, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_LOSS_CHUNK,
) -> torch.Tensor:
    """The summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, by chunks.

    Equals ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100,
    reduction="sum")`` (to rounding) in value, gradient and Hessian-vector products, but no
    tensor of ``rows x vocabulary`` entries larger than ``chunk_size x vocabulary`` is ever
    held: the forward saves ``hidden`` and ``weight`` only, and the gradient and its own
    derivative (the second-order terms a Hessian-vector product needs) recompute each chunk's
    logits and softmax when they are needed. Second derivatives by double backward
    (``torch.autograd.grad(..., create_graph=True)`` and a second ``grad``) are supported, third
    derivatives and forward mode (``torch.func.jvp``) are not.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(rows, hidden_size)``: the last hidden states of the predicting tokens.
    weight : torch.Tensor
        ``(vocabulary, hidden_size)``: the output embedding (``lm_head.weight``).
    bias : torch.Tensor or None
        ``(vocabulary,)``, the output embedding's bias if it has one.
    labels : torch.Tensor
        ``(rows,)`` class indices; -100 rows are ignored.
    chunk_size : int
        Rows per chunk.

    Examples
    --------
    >>> import torch
    >>> h, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    >>> y = torch.tensor([1, 2, -100, 6, 0])
    >>> full = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")
    >>> bool(torch.allclose(chunked_cross_entropy(h, w, None, y, chunk_size=2), full))
    True
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, labels, int(chunk_size))


class HiddenStatesLM(torch.nn.Module):
    """A causal LM whose forward stops before its output embedding (``lm_head``).

    ``forward(**inputs)`` returns ``{"hidden_states": ..., "weight": ..., "bias": ...}``: the
    base model's last hidden state and the output embedding's parameters, which
    :class:`CausalLMLoss` turns into the loss chunk by chunk, so that the full
    ``tokens x vocabulary`` logits never exist. The wrapper shares the model's submodules and
    parameters (the same tensors under the same names, tied embeddings included), so an
    operator of the wrapper is an operator of the model.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with ``base_model`` and ``get_output_embeddings()``, whose logits are its
        output embedding of the base model's last hidden state (checked by :func:`hf_problem`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        # Share, do not nest: parameter names stay those of the model (no "model." prefix),
        # which the twin and every report align by.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        object.__setattr__(self, "pretrained", model)

    def forward(self, **inputs: Any) -> dict[str, Any]:
        model = self.pretrained
        hidden = model.base_model(**inputs)[0]
        head = model.get_output_embeddings()
        return {"hidden_states": hidden, "weight": head.weight,
                "bias": getattr(head, "bias", None)}


class CausalLMLoss:
    """The causal-LM loss of a whole data set, one batch's share at a time.

    ``loss(outputs, labels)`` is ``sum of the batch's next-token cross-entropies over labels
    != -100`` divided by ``num_tokens``, the kept tokens of the *whole* data set, so that the
    sum over batches (``reduction = "sum"``) is the data set's mean token loss.

    ``outputs`` is either the model's output (its ``.logits``), or the output of
    :class:`HiddenStatesLM` (hidden states and output embedding), whose cross-entropy is
    computed ``chunk_size`` tokens at a time (:func:`chunked_cross_entropy`): same value,
    gradient and Hessian, without the ``tokens x vocabulary`` logits and their second-order
    terms.

    Parameters
    ----------
    num_tokens : int
        Kept (shifted) labels over all batches.
    chunk_size : int
        Tokens per chunk of a :class:`HiddenStatesLM` output.

    Examples
    --------
    >>> import torch
    >>> from types import SimpleNamespace
    >>> loss = CausalLMLoss(num_tokens=2)
    >>> out = SimpleNamespace(logits=torch.zeros(1, 3, 5))
    >>> round(float(loss(out, torch.tensor([[1, 2, -100]]))), 6)  # one kept token of two
    0.804719
    """

    reduction = "sum"

    def __init__(self, num_tokens: int, *, chunk_size: int = DEFAULT_LOSS_CHUNK) -> None:
        if num_tokens <= 0:
            raise ValueError("the text holds no token to predict (every label is -100)")
        self.num_tokens = int(num_tokens)
        self.chunk_size = int(chunk_size)

    def __call__(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, dict) and "hidden_states" in outputs:
            hidden = outputs["hidden_states"][:, :-1, :]
            return chunked_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                outputs["weight"],
                outputs["bias"],
                labels[:, 1:].reshape(-1),
                chunk_size=self.chunk_size,
            ) / self.num_tokens
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        shifted = logits[:, :-1, :]
        return torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ) / self.num_tokens

    def __repr__(self) -> str:
        return f"CausalLMLoss(num_tokens={self.num_tokens}, chunk_size={self.chunk_size})"


class SequenceClassificationLoss:
    """The sequence-classification loss of a whole data set, one batch's share at a time.

    ``loss(outputs, labels)`` is the batch's summed cross-entropy of ``outputs.logits``
    (``(batch, num_labels)``) against the class indices ``labels`` divided by
    ``num_examples``, the examples of the *whole* data set, so that the sum over batches
    (``reduction = "sum"``) is the mean loss over every example, whatever the batching.

    Parameters
    ----------
    num_examples : int
        Examples over all batches.

    Examples
    --------
    >>> import torch
    >>> loss = SequenceClassificationLoss(num_examples=4)
    >>> round(float(loss(torch.zeros(2, 3), torch.tensor([0, 2]))), 6)  # 2 log 3 / 4
    0.549306
    """

    reduction = "sum"

    def __init__(self, num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError("sequence classification needs at least one labelled example")
        self.num_examples = int(num_examples)

    def __call__(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        return torch.nn.functional.cross_entropy(
            logits, labels, reduction="sum"
        ) / self.num_examples

    def __repr__(self) -> str:
        return f"SequenceClassificationLoss(num_examples={self.num_examples})"


def pack_text(
    ids: list[int], *, seq_len: int, batch_size: int, num_batches: int | None, pad_id: int
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Token ids packed into ``(inputs, labels)`` batches of ``batch_size`` sequences.

    Sequences are consecutive windows of ``seq_len`` tokens; a last, shorter window is padded
    with ``pad_id`` (``attention_mask`` 0, label -100); a last window of one token, which
    predicts nothing, is dropped. At most ``num_batches`` batches (all
    when None); the last batch may hold fewer sequences.

    Examples
    --------
    >>> batches = pack_text(list(range(8)), seq_len=3, batch_size=2, num_batches=None, pad_id=0)
    >>> [b[1].tolist() for b in batches]
    [[[0, 1, 2], [3, 4, 5]], [[6, 7, -100]]]
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and its successor), got {seq_len}")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(
            f"the text has {len(ids)} token(s): at least 2 are needed for one prediction"
        )
    if num_batches is not None:
        windows = windows[: batch_size * num_batches]
    rows_ids, rows_mask, rows_labels = [], [], []
    for w in windows:
        pad = seq_len - len(w)
        rows_ids.append(list(w) + [pad_id] * pad)
        rows_mask.append([1] * len(w) + [0] * pad)
        rows_labels.append(list(w) + [-100] * pad)
    batches = []
    for start in range(0, len(windows), batch_size):
        stop = start + batch_size
        inputs = {
            "input_ids": torch.tensor(rows_ids[start:stop]),
            "attention_mask": torch.tensor(rows_mask[start:stop]),
        }
        batches.append((inputs, torch.tensor(rows_labels[start:stop])))
    return batches


def _load_dataset(dataset: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "--dataset needs the datasets library: pip install datasets (or pass --text FILE)"
        ) from exc
    name, config, split = (dataset.split(":") + [None, None])[:3]
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - the library's many error types, reworded once
        raise ValueError(
            f"--dataset {dataset}: datasets.load_dataset({name!r}, {config!r}, split="
            f"{split or 'train'!r}) failed ({type(exc).__name__}: {str(exc)[:200]}). Offline, "
            "use a local file or a data set already in the local cache."
        ) from exc


def _check_one_source(text: Any, text_file: Any, dataset: Any) -> None:
    given = [x is not None for x in (text, text_file, dataset)]
    if sum(given) != 1:
        raise ValueError("hf_problem: pass exactly one of text=, text_file= and dataset=")


def _read_file(text_file: str | Path) -> str:
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    return path.read_text(encoding="utf-8")


def _read_text(text: str | None, text_file: str | Path | None, dataset: str | None) -> str:
    _check_one_source(text, text_file, dataset)
    if text is not None:
        return text
    if text_file is not None:
        return _read_file(text_file)
    loaded = _load_dataset(dataset)
    if "text" not in loaded.column_names:
        raise ValueError(
            f"--dataset {dataset}: no 'text' column (columns: {loaded.column_names})"
        )
    return "\n\n".join(str(t) for t in loaded["text"])


def read_labelled_lines(text: str, *, where: str = "the text") -> list[tuple[str, str]]:
    r"""``(label, text)`` pairs of ``LABEL<TAB>TEXT`` lines; blank lines are skipped.

    Examples
    --------
    >>> read_labelled_lines("1\tgood film\n\n0\tbad film\n")
    [('1', 'good film'), ('0', 'bad film')]
    """
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, tab, body = line.partition("\t")
        if not tab or not label.strip() or not body.strip():
            raise ValueError(
                f"{where}, line {number}: sequence classification reads one example per line "
                f"as LABEL<TAB>TEXT (a class index or a label name of the model's config, a "
                f"tab, the text); got {line[:60]!r}"
            )
        examples.append((label.strip(), body.strip()))
    if not examples:
        raise ValueError(f"{where} holds no LABEL<TAB>TEXT line: no example to classify")
    return examples


def _labelled_examples(
    text: str | None, text_file: str | Path | None, dataset: str | None
) -> list[tuple[Any, str]]:
    _check_one_source(text, text_file, dataset)
    if text is not None:
        return read_labelled_lines(text)
    if text_file is not None:
        return read_labelled_lines(_read_file(text_file), where=f"--text {text_file}")
    loaded = _load_dataset(dataset)
    columns = loaded.column_names
    text_column = next((c for c in ("text", "sentence") if c in columns), None)
    if "label" not in columns or text_column is None:
        raise ValueError(
            f"--dataset {dataset}: sequence classification needs a 'label' column and a "
            f"'text' or 'sentence' column (columns: {columns})"
        )
    return list(zip(loaded["label"], (str(t) for t in loaded[text_column])))


def _class_index(label: Any, config: Any, num_labels: int) -> int:
    """A label (index, its string, or a name of ``config.label2id``) as a class index."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if isinstance(label, str) and label in label2id:
        index = label2id[label]
    else:
        try:
            index = int(label)
        except (TypeError, ValueError):
            index = None
    if index is None or not 0 <= index < num_labels:
        names = ", ".join(sorted(label2id)) or "none"
        raise ValueError(
            f"label {label!r} is not a class of the model: it has {num_labels} classes, "
            f"indices 0..{num_labels - 1} (label names in its config: {names})"
        )
    return index


def classification_batches(
    tokenizer: Any,
    examples: list[tuple[int, str]],
    *,
    max_length: int,
    batch_size: int,
    num_batches: int | None,
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(inputs, labels)`` batches of ``batch_size`` labelled texts; ``labels`` are class
    indices.

    Every text is padded with the tokenizer's pad token (``attention_mask`` 0) to the length
    of the longest one (at most ``max_length`` tokens; longer texts are truncated): one
    sequence length for every batch, which a compiled (JAX) product needs, and, with the
    masks, the same loss as any other padding.
    """
    if num_batches is not None:
        examples = examples[: batch_size * num_batches]
    texts = [t for _, t in examples]
    lengths = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    length = max(len(ids) for ids in lengths)
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer(
            [t for _, t in chunk], padding="max_length", truncation=True, max_length=length,
            return_tensors="pt",
        )
        inputs = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        batches.append((inputs, torch.tensor([label for label, _ in chunk])))
    return batches


@dataclasses.dataclass
class HFProblem:
    """What :func:`hf_problem` builds: hand ``model, loss_fn, data`` to any entry point.

    ``model`` is the Hugging Face model itself, or, for a causal LM whose loss is computed in
    chunks, a :class:`HiddenStatesLM` sharing its parameters; ``pretrained`` is always the
    Hugging Face model.
    """

    model: Any
    tokenizer: Any
    loss_fn: Any
    data: list
    info: dict
    pretrained: Any = None


def _task_of(source: str, architectures: list[str], task: str | None) -> str:
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    if classifier and not causal:
        return "sequence-classification"
    if causal or not architectures:
        return "causal-lm"
    raise ValueError(
        f"--hf {source}: a {architectures[0]} is neither a causal language model nor a "
        "sequence classifier; --hf analyses causal LMs (the next-token loss of the text) and "
        "*ForSequenceClassification models (the cross-entropy of labelled texts). For other "
        "heads, write a model file (dualhess analyze FILE.py) with their loss."
    )


def _hidden_states_model(model: Any, batch: dict[str, torch.Tensor]) -> HiddenStatesLM | None:
    """:class:`HiddenStatesLM` of ``model`` when its logits are its output embedding of its
    base model's last hidden state (checked on the first 16 tokens of ``batch``), else None (final logit scaling or
    soft-capping, a head that is not a linear map)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None or not hasattr(model, "base_model"):
        return None
    if model.base_model is model:
        return None
    wrapper = HiddenStatesLM(model)
    # A slice of the batch (one sequence, its first tokens): the check must not build the
    # full logits the chunks avoid.
    batch = {k: v[:1, :16] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
             for k, v in batch.items()}
    with torch.no_grad():
        try:
            out = wrapper(**batch)
            logits = model(**batch).logits
        except Exception:  # noqa: BLE001 - any failure means: not this structure
            return None
        mine = out["hidden_states"] @ out["weight"].T
        if out["bias"] is not None:
            mine = mine + out["bias"]
    if mine.shape != logits.shape:
        return None
    eps = float(torch.finfo(logits.dtype).eps)
    scale = max(1.0, float(logits.abs().max()))
    return wrapper if float((mine - logits).abs().max()) <= 1e3 * eps * scale else None


def hf_problem(
    name_or_dir: str | Path,
    *,
    text: str | None = None,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    task: str | None = None,
    seq_len: int = 128,
    batch_size: int = 2,
    num_batches: int | None = 2,
    dtype: str | torch.dtype | None = "float64",
    loss_chunk: int | None = None,
) -> HFProblem:
    """A Hugging Face causal LM or sequence classifier, its tokenizer, batches and loss.

    Parameters
    ----------
    name_or_dir : str or Path
        A model directory (``save_pretrained``) or a name in the local Hugging Face cache.
    text, text_file, dataset : str, optional
        Exactly one: the text itself, a UTF-8 file, or ``NAME[:CONFIG][:SPLIT]`` of the
        ``datasets`` library (split ``train`` by default). A causal LM reads the text (a data
        set's ``text`` column); a sequence classifier reads one example per line,
        ``LABEL<TAB>TEXT`` (``LABEL`` a class index or a label name of the config's
        ``label2id``), or a data set's ``label`` and ``text`` (or ``sentence``) columns.
    task : {"causal-lm", "sequence-classification"}, optional
        What to analyse. Default: what the config's ``architectures`` say (a
        ``*ForSequenceClassification`` is a sequence classifier, a ``*ForCausalLM`` or
        ``*LMHeadModel`` a causal LM).
    seq_len : int
        Causal LM: tokens per packed sequence. Sequence classification: the most tokens of
        one text (longer ones are truncated); a batch is padded to its longest text.
    batch_size, num_batches : int
        Sequences (texts) per batch, and batches (None: all of the text or examples).
    dtype : {"float64", "float32"} or torch.dtype, optional
        The model is converted to it (None keeps its own).
    loss_chunk : int, optional
        Causal LM: tokens per chunk of the cross-entropy. The loss is computed from the base
        model's last hidden states through the output embedding (``lm_head``) ``loss_chunk``
        tokens at a time, so the ``tokens x vocabulary`` logits, and the second-order terms
        of their softmax, exist one chunk at a time (:func:`chunked_cross_entropy`); value,
        gradient and Hessian are those of the full loss. None: chunks of
        ``DEFAULT_LOSS_CHUNK`` (256) where the model allows it, else the model's full
        logits; 0: always the full logits. A positive value for a model whose logits are not
        its output embedding of its last hidden state (final logit scaling or soft-capping)
        is refused.

    Returns
    -------
    HFProblem
        ``model`` (eval mode; a :class:`HiddenStatesLM` when the loss is chunked),
        ``tokenizer``, ``loss_fn`` (:class:`CausalLMLoss` or
        :class:`SequenceClassificationLoss`), ``data`` (a list of ``(inputs, labels)``),
        ``info`` (a description, the task and the counts) and ``pretrained`` (the Hugging
        Face model).

    Examples
    --------
    >>> problem = hf_problem("path/to/tiny-gpt2", text_file="corpus.txt")  # doctest: +SKIP
    >>> op = torch_backend.hessian(problem.model, problem.loss_fn, problem.data)  # doctest: +SKIP
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "--hf needs transformers: pip install 'dualhess[transformers]'"
        ) from exc
    if loss_chunk is not None and (isinstance(loss_chunk, bool) or loss_chunk < 0):
        raise ValueError(f"loss_chunk must be a number of tokens >= 0, got {loss_chunk!r}")
    source = str(name_or_dir)
    _check_one_source(text, text_file, dataset)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--hf {source}: could not load its config and tokenizer ({str(exc).splitlines()[0]})."
            " Pass a directory written by save_pretrained (model and tokenizer), or a name in "
            "the local Hugging Face cache (there is no download here)."
        ) from exc
    task = _task_of(source, list(getattr(config, "architectures", None) or []), task)
    if task == "sequence-classification":
        if loss_chunk:
            raise ValueError(
                "loss_chunk (--loss-chunk) chunks the cross-entropy over a causal LM's "
                "vocabulary; a sequence classifier's loss has one row per text and no "
                "vocabulary: drop it"
            )
        return _classification_problem(transformers, source, config, tokenizer,
                                        _labelled_examples(text, text_file, dataset),
                                        seq_len, batch_size, num_batches, dtype)
    corpus = _read_text(text, text_file, dataset)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    model = _prepare(model, dtype)
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    data = pack_text(ids, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                     pad_id=int(pad_id))
    kept = sum(int((labels[:, 1:] != -100).sum()) for _, labels in data)
    chunk = DEFAULT_LOSS_CHUNK if loss_chunk is None else int(loss_chunk)
    analysed: Any = model
    if chunk:
        wrapper = _hidden_states_model(model, data[0][0])
        if wrapper is None and loss_chunk:
            raise ValueError(
                f"--hf {source}: loss_chunk={loss_chunk} computes the loss from the last hidden "
                f"states through the output embedding, but this {type(model).__name__}'s "
                "logits are not its output embedding of its last hidden state (final logit "
                "scaling or soft-capping?). Pass loss_chunk=0 (--loss-chunk 0) to use the "
                "model's full logits."
            )
        analysed = model if wrapper is None else wrapper
        chunk = 0 if wrapper is None else chunk
    loss_fn = CausalLMLoss(kept, chunk_size=chunk or DEFAULT_LOSS_CHUNK)
    num_sequences = sum(int(labels.shape[0]) for _, labels in data)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = f"in chunks of {chunk} tokens" if chunk else "from the full logits"
    info = {
        "description": (
            f"{type(model).__name__} from {source} ({num_params:,} parameters): causal-LM loss "
            f"over {kept} next-token predictions, {num_sequences} sequences of {seq_len} tokens "
            f"in {len(data)} batch(es), cross-entropy {how}"
        ),
        "source": source,
        "task": "causal-lm",
        "num_tokens": kept,
        "num_sequences": num_sequences,
        "num_batches": len(data),
        "loss_chunk": chunk,
    }
    return HFProblem(analysed, tokenizer, loss_fn, data, info, pretrained=model)


def _prepare(model: Any, dtype: str | torch.dtype | None) -> Any:
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache: a pure function of the weights
    if dtype is not None:
        from .registry import torch_dtype

        model = model.to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)
    return model


def _classification_problem(transformers, source, config, tokenizer, examples, seq_len,
                            batch_size, num_batches, dtype) -> HFProblem:
    """The sequence-classification :class:`HFProblem` (see :func:`hf_problem`)."""
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    problem_type = getattr(config, "problem_type", None)
    if problem_type not in (None, "single_label_classification") or num_labels < 2:
        raise ValueError(
            f"--hf {source}: a sequence classifier with problem_type={problem_type!r} and "
            f"{num_labels} label(s); --hf analyses single-label classification (cross-entropy "
            "over at least 2 classes). For regression or multi-label heads, write a model file "
            "(dualhess analyze FILE.py) with their loss."
        )
    labelled = [(_class_index(label, config, num_labels), body) for label, body in examples]
    if tokenizer.pad_token_id is None and min(batch_size, len(labelled)) > 1:
        raise ValueError(
            f"--hf {source}: the tokenizer has no pad token, and sequence classification pads "
            "the texts of a batch to one length (attention_mask 0 on the padding). Save the "
            "tokenizer with a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token), or "
            "use --batch-size 1."
        )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(source)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # GPT-2-like classifiers score the last token that is not padding: they must know it.
        model.config.pad_token_id = tokenizer.pad_token_id
    model = _prepare(model, dtype)
    data = classification_batches(tokenizer, labelled, max_length=seq_len,
                                  batch_size=batch_size, num_batches=num_batches)
    num_examples = sum(int(labels.shape[0]) for _, labels in data)
    loss_fn = SequenceClassificationLoss(num_examples)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "description": (
            f"{type(model).__name__} from {source} ({num_params:,} parameters): mean "
            f"cross-entropy over {num_examples} labelled texts ({num_labels} classes) in "
            f"{len(data)} batch(es), padded to the longest text ({data[0][0]['input_ids'].shape[1]}"
            f" tokens, at most {seq_len})"
        ),
        "source": source,
        "task": "sequence-classification",
        "num_examples": num_examples,
        "num_labels": num_labels,
        "num_batches": len(data),
    }
    return HFProblem(model, tokenizer, loss_fn, data, info, pretrained=model)
