"""``dualhess analyze --hf DIR --text FILE`` and :func:`dualhess.hf_problem`: a tiny GPT-2 and a
word-level tokenizer written locally with ``save_pretrained`` (no network), packed text with a
padded last sequence, both frameworks, against the dense float64 Hessian of the one batch that
holds every sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dualhess  # noqa: E402
import torch_backend  # noqa: E402
from dualhess.cli import main  # noqa: E402
from torch_backend._hf import CausalLMLoss, pack_text  # noqa: E402

pytestmark = pytest.mark.torch

TEXT = (
    "the cat sat on the mat and the dog sat on the log while the bird sang "
    "a song of the sea and the cat ran to the dog and the bird flew over the mat"
)


def _tiny_model_dir(tmp_path):
    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_embd=4, n_layer=1, n_head=1, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    path = tmp_path / "tiny-gpt2"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    return path, text


def _dense_top(problem, k):
    model = problem.model
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        parts, start = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[start : start + s.numel()].reshape(s)
            start += s.numel()
        total = 0.0
        for inputs, labels in problem.data:
            out = torch.func.functional_call(model, parts, (), inputs)
            total = total + problem.loss_fn(out, labels)
        return total

    # Reverse-over-reverse: torch.func.hessian (forward-over-reverse through functional_call)
    # gives a wrong dense Hessian on this build for GPT-2's tied embedding.
    with torch_backend.differentiable_attention():
        H = torch.autograd.functional.hessian(loss, flat).detach().numpy()
    return np.sort(np.linalg.eigvalsh(H))[::-1][:k], H.shape[0]


def test_pack_text_pads_the_last_sequence():
    batches = pack_text(list(range(2, 10)), seq_len=3, batch_size=2, num_batches=None, pad_id=1)
    inputs, labels = batches[1]
    assert inputs["input_ids"].tolist() == [[8, 9, 1]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 0]]
    assert labels.tolist() == [[8, 9, -100]]


def test_causal_lm_loss_is_the_token_mean_over_all_batches():
    """The sum over batches is the mean next-token loss over every kept token (HF's rule)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (3, 4), generator=g)
    labels[2, 2:] = -100
    kept = int((labels[:, 1:] != -100).sum())
    loss = CausalLMLoss(kept)
    split = float(loss(logits[:2], labels[:2]) + loss(logits[2:], labels[2:]))
    whole = float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1)))
    assert abs(split - whole) <= 1e-15 * whole


def test_analyze_hf_both_frameworks_agree_and_equal_the_dense_hessian(tmp_path):
    path, text = _tiny_model_dir(tmp_path)
    out = tmp_path / "report"
    rc = main(["analyze", "--hf", str(path), "--text", str(text), "--framework", "both",
               "--seq-len", "6", "--batch-size", "2", "--num-batches", "4", "--top-k", "2",
               "--trace-matvecs", "8", "--density-probes", "1", "--density-steps", "6",
               "--out", str(out), "--no-plots", "--quiet", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["agreement"]["passed"], report["agreement"]
    assert report["source"] == f"hf:{path}"
    # the same text as one batch of every sequence, dense float64
    single = dualhess.hf_problem(path, text_file=text, seq_len=6, batch_size=100,
                                 num_batches=1)
    assert len(single.data) == 1 and single.info["num_sequences"] == 6
    top, n = _dense_top(single, 2)
    assert report["model"]["num_params"] == n
    for side in ("torch", "jax"):
        values = np.asarray(report["results"][side]["eigenvalues"]["values"])
        err = float(np.max(np.abs(values - top)) / abs(top[0]))
        print(f"--hf, {side}, 3 batches (last padded) vs dense single batch: rel err {err:.2e}")
        assert err <= 1e-10


@pytest.mark.errors_table
def test_hf_without_text_is_refused(tmp_path, capsys):
    path, _ = _tiny_model_dir(tmp_path)
    rc = main(["analyze", "--hf", str(path), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "--hf needs exactly one of --text FILE and --dataset NAME" in capsys.readouterr().err


@pytest.mark.errors_table
def test_hf_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    path, text = _tiny_model_dir(tmp_path)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    config.architectures = ["BertForSequenceClassification"]
    config.save_pretrained(path)
    with pytest.raises(ValueError, match="is not a causal language model"):
        dualhess.hf_problem(path, text_file=text)


@pytest.mark.errors_table
def test_hf_dataset_without_the_datasets_library(tmp_path, monkeypatch):
    import sys

    path, _ = _tiny_model_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="--dataset needs the datasets library"):
        dualhess.hf_problem(path, dataset="wikitext:wikitext-2-raw-v1:test")
