"""``dualhess analyze --hf DIR --text FILE`` and :func:`dualhess.hf_problem`: a tiny GPT-2 and a
word-level tokenizer written locally with ``save_pretrained`` (no network), packed text with a
padded last sequence, both frameworks, against the dense float64 Hessian of the one batch that
holds every sequence; the chunked cross-entropy against the full one; tiny sequence classifiers
(GPT-2, BERT) over labelled lines, padded batches against the dense Hessian of one batch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dualhess  # noqa: E402
import torch_backend  # noqa: E402
from dualhess.cli import main  # noqa: E402
from torch_backend._hf import (  # noqa: E402
    CausalLMLoss,
    HiddenStatesLM,
    SequenceClassificationLoss,
    chunked_cross_entropy,
    pack_text,
    read_labelled_lines,
)

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


def _dense_hessian(problem):
    """The dense Hessian of the problem's loss summed over its batches (reverse-over-reverse:
    torch.func.hessian, forward-over-reverse through functional_call, gives a wrong dense
    Hessian on this build for GPT-2's tied embedding)."""
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

    with torch_backend.differentiable_attention():
        return torch.autograd.functional.hessian(loss, flat).detach()


def _dense_top(problem, k):
    H = _dense_hessian(problem).numpy()
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
def test_hf_model_that_is_neither_a_causal_lm_nor_a_classifier_is_refused(tmp_path):
    path, text = _tiny_model_dir(tmp_path)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    config.architectures = ["BertForTokenClassification"]
    config.save_pretrained(path)
    message = "is neither a causal language model nor a sequence classifier"
    with pytest.raises(ValueError, match=message):
        dualhess.hf_problem(path, text_file=text)


@pytest.mark.errors_table
def test_hf_dataset_without_the_datasets_library(tmp_path, monkeypatch):
    import sys

    path, _ = _tiny_model_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="--dataset needs the datasets library"):
        dualhess.hf_problem(path, dataset="wikitext:wikitext-2-raw-v1:test")


# ----------------------------------------------------------------- chunked cross-entropy
def _params_hvp(loss, params, vectors):
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return [g.detach() for g in grads], [h.detach() for h in torch.autograd.grad(dot, params)]


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_cross_entropy_equals_the_full_one(chunk_size, with_bias):
    """Value, gradient and Hessian-vector product (double backward) of the chunked loss are
    those of F.cross_entropy over the full logits, ignored rows and a short last chunk
    included, to 1e-12 (float64)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (10,), generator=g)
    labels[[2, 9]] = -100
    params = [hidden, weight] + ([bias] if with_bias else [])
    b = bias if with_bias else None
    vectors = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params]
    logits = hidden @ weight.T + (0 if b is None else b)
    full = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") * 0.3
    chunked = chunked_cross_entropy(hidden, weight, b, labels, chunk_size=chunk_size) * 0.3
    assert abs(float(chunked.detach() - full.detach())) <= 1e-12 * abs(float(full.detach()))
    for ours, reference in zip(_params_hvp(chunked, params, vectors),
                               _params_hvp(full, params, vectors)):
        for a, r in zip(ours, reference):
            assert float((a - r).abs().max()) <= 1e-12 * max(1.0, float(r.abs().max()))


def test_hf_chunked_loss_equals_the_full_logits(tmp_path):
    """--loss-chunk: the operator of the hidden-states model with the loss in chunks of 5
    tokens has the loss, gradient and products of the model's full logits (1e-12, float64),
    over three batches with a padded last sequence; the parameter names are the model's."""
    path, text = _tiny_model_dir(tmp_path)
    options = dict(text_file=text, seq_len=6, batch_size=2, num_batches=4)
    chunked = dualhess.hf_problem(path, loss_chunk=5, **options)
    full = dualhess.hf_problem(path, loss_chunk=0, **options)
    assert isinstance(chunked.model, HiddenStatesLM) and chunked.info["loss_chunk"] == 5
    assert full.model is full.pretrained and full.info["loss_chunk"] == 0
    assert [n for n, _ in chunked.model.named_parameters()] == [
        n for n, _ in full.model.named_parameters()]
    ops = [torch_backend.hessian(p.model, p.loss_fn, p.data, method="autograd")
           for p in (chunked, full)]
    assert abs(ops[0].loss - ops[1].loss) <= 1e-12 * abs(ops[1].loss)
    g_chunked, g_full = ops[0].gradient(), ops[1].gradient()
    assert float((g_chunked - g_full).abs().max()) <= 1e-12 * float(g_full.abs().max())
    V = torch.randn(ops[0].shape[0], 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    H_chunked, H_full = ops[0].matmat(V), ops[1].matmat(V)
    assert float((H_chunked - H_full).abs().max()) <= 1e-12 * float(H_full.abs().max())


def test_hf_default_loss_chunk_falls_back_to_full_logits_where_it_must(tmp_path):
    """A model whose logits are not its output embedding of its last hidden state (here a
    final logit scale) keeps its full logits by default, and says so."""
    path, text = _tiny_model_dir(tmp_path)
    original = transformers.GPT2LMHeadModel.forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.GPT2LMHeadModel, "forward", scaled)
        problem = dualhess.hf_problem(path, text_file=text, seq_len=6)
        assert problem.model is problem.pretrained and problem.info["loss_chunk"] == 0
        assert "from the full logits" in problem.info["description"]
        message = "logits are not its output embedding of its last hidden state"
        with pytest.raises(ValueError, match=message):
            dualhess.hf_problem(path, text_file=text, seq_len=6, loss_chunk=8)


@pytest.mark.errors_table
def test_hf_loss_chunk_refused_where_the_logits_are_not_the_output_embedding(tmp_path):
    path, text = _tiny_model_dir(tmp_path)
    original = transformers.GPT2LMHeadModel.forward

    def capped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)  # Gemma-2-style soft-capping
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.GPT2LMHeadModel, "forward", capped)
        message = "logits are not its output embedding of its last hidden state"
        with pytest.raises(ValueError, match=message):
            dualhess.hf_problem(path, text_file=text, seq_len=6, loss_chunk=8)


# --------------------------------------------------------------- sequence classification
LABELLED = [
    ("pos", "the cat sat on the mat"), ("neg", "the dog ran"),
    ("pos", "a song of the sea and the bird sang"), ("neg", "the bird flew over the log"),
    ("pos", "the cat ran to the dog"), ("neg", "sat on the mat while the dog sang a song"),
    ("pos", "the sea"),
]


def _tiny_classifier_dir(tmp_path, kind="gpt2", pad_token="[PAD]"):
    words = sorted({w for _, t in LABELLED for w in t.split()})
    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]",
        **({"pad_token": pad_token} if pad_token else {}),
    )
    labels = {"label2id": {"neg": 0, "pos": 1}, "id2label": {0: "neg", 1: "pos"}}
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(vocab), n_embd=4, n_layer=1, n_head=1, n_positions=12,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            num_labels=2, **labels,
        )
        model = transformers.GPT2ForSequenceClassification(config)
    else:
        config = transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
            intermediate_size=4, max_position_embeddings=12, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=1, num_labels=2, **labels,
        )
        model = transformers.BertForSequenceClassification(config)
    path = tmp_path / f"tiny-{kind}-classifier"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    text = tmp_path / "labelled.tsv"
    text.write_text("".join(f"{label}\t{body}\n" for label, body in LABELLED))
    return path, text


def test_read_labelled_lines():
    assert read_labelled_lines("1\tgood film\n\n0\tbad\tfilm\n") == [
        ("1", "good film"), ("0", "bad\tfilm")]


def test_sequence_classification_loss_is_the_example_mean_over_all_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 3, (5,), generator=g)
    loss = SequenceClassificationLoss(5)
    split = float(loss(logits[:2], labels[:2]) + loss(logits[2:], labels[2:]))
    whole = float(torch.nn.functional.cross_entropy(logits, labels))
    assert abs(split - whole) <= 1e-15 * whole


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_sequence_classification_batches_equal_the_dense_hessian(tmp_path, kind):
    """Seven labelled texts in batches of 2 (the last of 1), padded to the longest text:
    the operator equals the dense float64 Hessian of the mean loss over the seven as one
    padded batch, to 1e-10 (GPT-2 scores the last token that is not padding, BERT its
    [CLS] position)."""
    path, text = _tiny_classifier_dir(tmp_path, kind)
    problem = dualhess.hf_problem(path, text_file=text, batch_size=2, num_batches=None)
    assert problem.info["task"] == "sequence-classification"
    assert problem.info["num_examples"] == 7 and len(problem.data) == 4
    masks = [inputs["attention_mask"] for inputs, _ in problem.data]
    assert any(bool((m == 0).any()) for m in masks)  # some batch is padded
    assert problem.data[0][1].tolist() == [1, 0]  # label names through config.label2id
    single = dualhess.hf_problem(path, text_file=text, batch_size=100, num_batches=None)
    assert len(single.data) == 1
    H = _dense_hessian(single)
    op = torch_backend.hessian(problem.model, problem.loss_fn, problem.data)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    err = float((op.matmat(V) - H @ V).abs().max() / (H @ V).abs().max())
    print(f"--hf sequence classification ({kind}), 4 padded batches vs dense: rel err {err:.1e}")
    assert err <= 1e-10
    with torch.no_grad():
        logits = single.model(**single.data[0][0]).logits
        mean = float(torch.nn.functional.cross_entropy(logits, single.data[0][1]))
    assert abs(op.loss - mean) <= 1e-12 * mean


SLOW = pytest.mark.skipif(os.environ.get("DUALHESS_SLOW") != "1",
                          reason="slow (40 s, the twin of a classifier): set DUALHESS_SLOW=1")


@pytest.mark.parametrize("framework", ["torch", pytest.param("both", marks=[pytest.mark.slow,
                                                                              SLOW])])
def test_analyze_hf_sequence_classification(tmp_path, framework):
    """The CLI on a classifier; with --framework both the twin AGREEs too (the causal-LM
    twin runs by default in test_analyze_hf_both_frameworks_agree_and_equal_the_dense_hessian)."""
    path, text = _tiny_classifier_dir(tmp_path, "gpt2")
    out = tmp_path / "report"
    rc = main(["analyze", "--hf", str(path), "--text", str(text), "--framework", framework,
               "--batch-size", "3", "--num-batches", "3", "--top-k", "2",
               "--trace-matvecs", "8", "--density-probes", "1", "--density-steps", "6",
               "--out", str(out), "--no-plots", "--quiet", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    if framework == "both":
        assert report["agreement"]["passed"], report["agreement"]
    assert "7 labelled texts" in report["model"]["description"]
    single = dualhess.hf_problem(path, text_file=text, batch_size=100, num_batches=None)
    top = np.sort(np.linalg.eigvalsh(_dense_hessian(single).numpy()))[::-1][:2]
    for side in ("torch", "jax") if framework == "both" else ("torch",):
        values = np.asarray(report["results"][side]["eigenvalues"]["values"])
        assert float(np.max(np.abs(values - top)) / abs(top[0])) <= 1e-10


def test_hf_task_option_overrides_the_config(tmp_path):
    """--task sequence-classification where the config lists no architecture (which reads
    as a causal LM by default)."""
    path, text = _tiny_classifier_dir(tmp_path, "bert")
    config = json.loads((path / "config.json").read_text())
    config.pop("architectures")
    (path / "config.json").write_text(json.dumps(config))
    problem = dualhess.hf_problem(path, text_file=text, task="sequence-classification",
                                  batch_size=3, num_batches=1)
    assert problem.info["task"] == "sequence-classification"
    assert problem.data[0][1].tolist() == [1, 0, 1]
    assert isinstance(problem.loss_fn, SequenceClassificationLoss)


@pytest.mark.errors_table
def test_hf_classification_line_without_a_tab_is_refused(tmp_path):
    path, text = _tiny_classifier_dir(tmp_path)
    text.write_text("pos\tthe cat\nthe dog ran\n")
    message = "sequence classification reads one example per line as LABEL<TAB>TEXT"
    with pytest.raises(ValueError, match="line 2: " + message):
        dualhess.hf_problem(path, text_file=text)


@pytest.mark.errors_table
def test_hf_classification_label_outside_the_classes_is_refused(tmp_path):
    path, text = _tiny_classifier_dir(tmp_path)
    text.write_text("pos\tthe cat\n2\tthe dog ran\n")
    with pytest.raises(ValueError, match="label '2' is not a class of the model: it has 2 "
                                         "classes"):
        dualhess.hf_problem(path, text_file=text)


@pytest.mark.errors_table
def test_hf_classification_without_a_pad_token_is_refused(tmp_path):
    path, text = _tiny_classifier_dir(tmp_path, pad_token=None)
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        dualhess.hf_problem(path, text_file=text, batch_size=2)


@pytest.mark.errors_table
def test_hf_loss_chunk_with_a_classifier_is_refused(tmp_path):
    path, text = _tiny_classifier_dir(tmp_path)
    with pytest.raises(ValueError, match="a sequence classifier's loss has one row per text"):
        dualhess.hf_problem(path, text_file=text, loss_chunk=64)


@pytest.mark.errors_table
def test_hf_task_and_loss_chunk_without_hf_are_refused(tmp_path, capsys):
    rc = main(["analyze", "--loss-chunk", "64", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "--task and --loss-chunk go with --hf NAME_OR_DIR" in capsys.readouterr().err
