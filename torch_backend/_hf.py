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

__all__ = ["CausalLMLoss", "hf_problem", "pack_text"]


class CausalLMLoss:
    """The causal-LM loss of a whole data set, one batch's share at a time.

    ``loss(outputs, labels)`` is ``sum of the batch's next-token cross-entropies over labels
    != -100`` divided by ``num_tokens``, the kept tokens of the *whole* data set, so that the
    sum over batches (``reduction = "sum"``) is the data set's mean token loss.

    Parameters
    ----------
    num_tokens : int
        Kept (shifted) labels over all batches.

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

    def __init__(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            raise ValueError("the text holds no token to predict (every label is -100)")
        self.num_tokens = int(num_tokens)

    def __call__(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        shifted = logits[:, :-1, :]
        return torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ) / self.num_tokens

    def __repr__(self) -> str:
        return f"CausalLMLoss(num_tokens={self.num_tokens})"


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


def _read_text(text: str | None, text_file: str | Path | None, dataset: str | None) -> str:
    given = [x is not None for x in (text, text_file, dataset)]
    if sum(given) != 1:
        raise ValueError("hf_problem: pass exactly one of text=, text_file= and dataset=")
    if text is not None:
        return text
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
        return path.read_text(encoding="utf-8")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "--dataset needs the datasets library: pip install datasets (or pass --text FILE)"
        ) from exc
    name, config, split = (dataset.split(":") + [None, None])[:3]
    try:
        loaded = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - the library's many error types, reworded once
        raise ValueError(
            f"--dataset {dataset}: datasets.load_dataset({name!r}, {config!r}, split="
            f"{split or 'train'!r}) failed ({type(exc).__name__}: {str(exc)[:200]}). Offline, "
            "use a local file or a data set already in the local cache."
        ) from exc
    if "text" not in loaded.column_names:
        raise ValueError(
            f"--dataset {dataset}: no 'text' column (columns: {loaded.column_names})"
        )
    return "\n\n".join(str(t) for t in loaded["text"])


@dataclasses.dataclass
class HFProblem:
    """What :func:`hf_problem` builds: hand ``model, loss_fn, data`` to any entry point."""

    model: Any
    tokenizer: Any
    loss_fn: CausalLMLoss
    data: list
    info: dict


def hf_problem(
    name_or_dir: str | Path,
    *,
    text: str | None = None,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    seq_len: int = 128,
    batch_size: int = 2,
    num_batches: int | None = 2,
    dtype: str | torch.dtype | None = "float64",
) -> HFProblem:
    """A Hugging Face causal language model, its tokenizer, packed text and its loss.

    Parameters
    ----------
    name_or_dir : str or Path
        A model directory (``save_pretrained``) or a name in the local Hugging Face cache.
    text, text_file, dataset : str, optional
        Exactly one: the text itself, a UTF-8 file, or ``NAME[:CONFIG][:SPLIT]`` of the
        ``datasets`` library (its ``text`` column; split ``train`` by default).
    seq_len, batch_size, num_batches : int
        Tokens per sequence, sequences per batch, batches (None: the whole text).
    dtype : {"float64", "float32"} or torch.dtype, optional
        The model is converted to it (None keeps its own).

    Returns
    -------
    HFProblem
        ``model`` (eval mode), ``tokenizer``, ``loss_fn`` (:class:`CausalLMLoss`), ``data`` (a
        list of ``({"input_ids", "attention_mask"}, labels)``) and ``info`` (a description,
        the numbers of sequences and kept tokens).

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
    source = str(name_or_dir)
    corpus = _read_text(text, text_file, dataset)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--hf {source}: could not load its config and tokenizer ({str(exc).splitlines()[0]})."
            " Pass a directory written by save_pretrained (model and tokenizer), or a name in "
            "the local Hugging Face cache (there is no download here)."
        ) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(
            f"--hf {source}: a {architectures[0]} is not a causal language model; --hf "
            "analyses causal LMs (the next-token loss of the text). For other heads, write a "
            "model file (dualhess analyze FILE.py) with their loss."
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no key/value cache: a pure function of the weights
    if dtype is not None:
        from .registry import torch_dtype

        model = model.to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    data = pack_text(ids, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                     pad_id=int(pad_id))
    kept = sum(int((labels[:, 1:] != -100).sum()) for _, labels in data)
    loss_fn = CausalLMLoss(kept)
    num_sequences = sum(int(labels.shape[0]) for _, labels in data)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "description": (
            f"{type(model).__name__} from {source} ({num_params:,} parameters): causal-LM loss "
            f"over {kept} next-token predictions, {num_sequences} sequences of {seq_len} tokens "
            f"in {len(data)} batch(es)"
        ),
        "source": source,
        "num_tokens": kept,
        "num_sequences": num_sequences,
        "num_batches": len(data),
    }
    return HFProblem(model, tokenizer, loss_fn, data, info)
