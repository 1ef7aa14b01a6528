"""The loss's own normaliser: multi-batch operators equal the single-batch dense Hessian.

The whole-data-set loss is ``sum_b sum_i l_bi / sum_b m_b`` with ``m_b`` what batch ``b``'s
loss divides by (kept labels, class-weight sums, elements, samples). Every case is checked
against the dense float64 Hessian of the same loss evaluated on all the data as one batch
(tolerance 1e-12: float64 rounding of a few hundred terms), and against the old weighting by
sample counts, which must differ (so that no test can pass without the normaliser).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_backend as tb

pytestmark = pytest.mark.torch
errors_table = pytest.mark.errors_table

D_IN, C = 4, 3


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _labels(seed: int = 1):
    """20 samples in 4 batches of 5 whose kept-label counts differ (5, 2, 4, 1)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, D_IN, dtype=torch.float64, generator=g)
    y = torch.randint(0, C, (20,), generator=g)
    y[[5, 6, 7, 13, 16, 17, 18, 19]] = -100
    return X, y


def _batches(X, y, size=5):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def _dense(model, loss_of_params_fn):
    """Dense float64 Hessian of ``loss(flat parameters)``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        parts, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            parts[name] = flat[start : start + size].reshape(shape)
            start += size
        return loss_of_params_fn(parts)

    return torch.autograd.functional.hessian(loss, flat0)


def _full_hessian(model, loss_fn, X, y):
    return _dense(
        model, lambda p: loss_fn(torch.func.functional_call(model, p, (X,)), y)
    )


def _naive_hessian(model, loss_fn, batches):
    """The old weighting: batch b's mean loss with weight n_b / N."""
    N = sum(len(b[1]) for b in batches)
    return sum(
        len(yb) / N * _full_hessian(model, loss_fn, Xb, yb) for Xb, yb in batches
    )


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


LOSSES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=-100),
    "class_weights": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    ),
    "weights_ignore_smoothing": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), label_smoothing=0.1
    ),
    "nll_ignore": lambda: nn.NLLLoss(),
}


def _targets_for(name, y):
    if name == "class_weights":  # class weights without ignored labels
        return torch.where(y < 0, (torch.arange(len(y)) % C), y)
    return y


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("method", ["autograd", "func"])
@errors_table
def test_loss_module_normaliser_over_batches_is_the_single_batch_hessian(name, method):
    model = _model()
    if name == "nll_ignore":
        model = nn.Sequential(*model, nn.LogSoftmax(dim=1))
    X, y = _labels()
    y = _targets_for(name, y)
    loss_fn = LOSSES[name]()
    batches = _batches(X, y)
    op = tb.hessian(model, loss_fn, batches, method=method)
    H = _full_hessian(model, loss_fn, X, y)
    err = rel(op.to_dense(), H)
    naive = rel(_naive_hessian(model, loss_fn, batches), H)
    print(f"{name} {method}: rel err {err:.2e} (sample weighting: {naive:.2e})")
    assert err <= 1e-12
    assert naive > 1e-3  # the sample-count weighting is wrong here
    assert abs(op.loss - float(loss_fn(model(X), y))) <= 1e-12 * abs(op.loss)


@errors_table
def test_mse_over_sequences_of_different_lengths():
    """MSELoss averages over elements: batches of sequences of 3, 7 and 2 positions."""
    model = nn.Linear(D_IN, 2).double()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(4, T, D_IN, dtype=torch.float64, generator=g),
         torch.randn(4, T, 2, dtype=torch.float64, generator=g))
        for T in (3, 7, 2)
    ]
    loss_fn = nn.MSELoss()
    op = tb.hessian(model, loss_fn, batches)

    def total(p):
        sq = [((torch.func.functional_call(model, p, (xb,)) - yb) ** 2).reshape(-1)
              for xb, yb in batches]
        return torch.cat(sq).mean()

    H = _dense(model, total)
    assert rel(op.to_dense(), H) <= 1e-12
    assert rel(_naive_hessian(model, loss_fn, batches), H) > 1e-3


def _dict_batches(X, y):
    return [{"x": Xb, "labels": yb} for Xb, yb in _batches(X, y)]


@errors_table
def test_closure_returning_sum_and_count():
    model = _model()
    X, y = _labels()

    def closure(m, batch):
        logits = m(batch["x"])
        kept = batch["labels"] != -100
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), int(kept.sum())

    op = tb.hessian(model, data=_dict_batches(X, y), closure=closure)
    H = _full_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert op.dataset.summed and op.dataset.total_normalizer == 12
    assert rel(op.to_dense(), H) <= 1e-12
    assert abs(op.loss - float(F.cross_entropy(model(X), y))) <= 1e-12 * op.loss


@pytest.mark.parametrize("shift", [False, True])
@errors_table
def test_closure_with_label_count_normalizer(shift):
    """A model's own token-mean loss (as Hugging Face's .loss) with normalizer=label_count."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(4, 3, 6, D_IN, dtype=torch.float64, generator=g)  # 4 batches of 3 x 6
    y = torch.randint(0, C, (4, 3, 6), generator=g)
    y[0, :, 4:] = -100
    y[1, 1:, 2:] = -100
    y[3, :, 1:] = -100
    batches = [{"x": X[b], "labels": y[b]} for b in range(4)]

    def token_mean(logits, labels):
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, C), labels.reshape(-1))

    op = tb.hessian(
        model,
        data=batches,
        closure=lambda m, batch: token_mean(m(batch["x"]), batch["labels"]),
        normalizer=tb.label_count(shift=shift),
    )

    def total(p):
        logits = torch.func.functional_call(model, p, (X.reshape(12, 6, D_IN),))
        return token_mean(logits, y.reshape(12, 6))

    H = _dense(model, total)
    assert rel(op.to_dense(), H) <= 1e-12


@errors_table
def test_closure_over_ignored_labels_without_normalizer_is_refused():
    model = _model()
    X, y = _labels()
    with pytest.raises(ValueError, match="labels contain -100"):
        tb.hessian(
            model,
            data=_dict_batches(X, y),
            closure=lambda m, b: F.cross_entropy(m(b["x"]), b["labels"]),
        )


@errors_table
def test_plain_cross_entropy_callable_over_ignored_labels_is_refused():
    X, y = _labels()
    with pytest.raises(ValueError, match="targets contain -100"):
        tb.hessian(_model(), F.cross_entropy, _batches(X, y))


@errors_table
def test_every_label_ignored_is_refused():
    X, y = _labels()
    y[:] = -100
    with pytest.raises(ValueError, match="every batch's normaliser is 0"):
        tb.hessian(_model(), nn.CrossEntropyLoss(), _batches(X, y))


@errors_table
def test_a_batch_with_every_label_ignored_adds_nothing():
    """Its mean loss is 0/0 in torch; it is skipped, not NaN."""
    model = _model()
    X, y = _labels()
    y[5:10] = -100
    op = tb.hessian(model, nn.CrossEntropyLoss(), _batches(X, y))
    H = _full_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert op.dataset.weights[1] == 0.0
    assert rel(op.to_dense(), H) <= 1e-12


@errors_table
def test_normalizer_that_depends_on_the_parameters_is_refused():
    X, y = _labels()

    def closure(m, batch):
        loss = F.cross_entropy(m(batch["x"]), batch["labels"], reduction="sum")
        return loss, loss.exp()  # not a count

    with pytest.raises(ValueError, match="normalizer that depends on the parameters"):
        tb.hessian(_model(), data=_dict_batches(X, y), closure=closure)


@errors_table
def test_custom_loss_module_whose_mean_is_not_its_elements_mean():
    class HalfMean(nn.modules.loss._Loss):
        def forward(self, outputs, targets):
            values = (outputs - targets) ** 2
            if self.reduction == "none":
                return values
            return values.sum() / (2 if self.reduction == "mean" else 1)

    model = nn.Linear(D_IN, 2).double()
    X = torch.randn(6, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="its mean .* is not its sum"):
        tb.hessian(model, HalfMean(), (X, torch.zeros(6, 2, dtype=torch.float64)))


@errors_table
def test_ggn_follows_the_normaliser():
    model = _model()
    X, y = _labels()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64))
    single = tb.ggn(model, loss_fn, (X, y)).to_dense()
    multi = tb.ggn(model, loss_fn, _batches(X, y)).to_dense()
    assert rel(multi, single) <= 1e-12


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)),
    ],
    ids=["ignore_index", "class_weights"],
)
@errors_table
def test_empirical_fisher_follows_the_normaliser(loss_fn):
    """F = (1/M) sum_n g_n g_n^T, g_n the gradient of sample n's summed loss, M = sum m_b."""
    model = _model()
    X, y = _labels()
    op = tb.fisher(model, loss_fn, _batches(X, y), kind="empirical")
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    params = dict(model.named_parameters())
    grads = []
    for i in range(len(X)):
        g = torch.autograd.grad(summed(model(X[i : i + 1]), y[i : i + 1]), list(params.values()),
                                allow_unused=True, materialize_grads=True)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    weight = getattr(loss_fn, "weight", None)
    kept = y != -100
    M = float(kept.sum()) if weight is None else float((weight[y.clamp(min=0)] * kept).sum())
    expected = G.T @ G / M
    assert abs(op.reduction_factor - 1 / M) <= 1e-15
    assert rel(op.to_dense(), expected) <= 1e-12
    single = tb.fisher(model, loss_fn, (X, y), kind="empirical").to_dense()
    assert rel(op.to_dense(), single) <= 1e-12


@errors_table
def test_mc_fisher_keeps_ignored_positions_ignored():
    model = _model()
    X, y = _labels()
    op = tb.fisher(model, nn.CrossEntropyLoss(), _batches(X, y), kind="mc", num_samples=3)
    for draws, (_, yb) in zip(op.mc_targets(), _batches(X, y)):
        ignored = yb == -100
        assert bool((draws[:, ignored] == -100).all())
        assert bool((draws[:, ~ignored] >= 0).all())


@errors_table
def test_kl_divergence_batchmean_is_a_mean_over_samples():
    model = nn.Sequential(nn.Linear(D_IN, C), nn.LogSoftmax(dim=1)).double()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, D_IN, dtype=torch.float64, generator=g)
    P = torch.softmax(torch.randn(9, C, dtype=torch.float64, generator=g), dim=1)
    loss_fn = nn.KLDivLoss(reduction="batchmean")
    op = tb.hessian(model, loss_fn, [(X[:4], P[:4]), (X[4:], P[4:])])
    H = _full_hessian(model, loss_fn, X, P)
    assert rel(op.to_dense(), H) <= 1e-12


@errors_table
def test_pyhessian_drop_in_follows_the_normaliser():
    from torch_backend.pyhessian import hessian as PyHessian

    model = _model()
    X, y = _labels()
    comp = PyHessian(model, nn.CrossEntropyLoss(), dataloader=_batches(X, y), cuda=False)
    H = _full_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert rel(comp.operator.to_dense(), H) <= 1e-12


@errors_table
def test_hugging_face_causal_lm_own_loss_over_padded_batches():
    """Hugging Face's own .loss over labels padded with -100, three batches with different
    numbers of kept tokens, with normalizer=label_count(shift=True): products equal those of
    the one batch holding every sequence (HF's own mean over all kept tokens, the
    whole-data-set loss by definition). HF's ForCausalLMLoss casts the logits to float32, so
    its own loss agrees to float32 rounding (1e-6); the same causal-LM loss written in
    float64 agrees to 1e-12."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=13, n_positions=8, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 13, (6, 8), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100
    labels[2, 2:] = -100
    labels[3, 6:] = -100
    labels[5, 3:] = -100
    batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in (0, 2, 4)]
    everything = {"input_ids": ids, "labels": labels}
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=g)

    def own_loss(m, batch):
        return m(**batch, use_cache=False).loss

    def float64_loss(m, batch):
        logits = m(input_ids=batch["input_ids"], use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 13), batch["labels"][:, 1:].reshape(-1))

    with pytest.raises(ValueError, match="label_count"):
        tb.hessian(model, data=batches, closure=own_loss)
    for closure, tolerance in ((own_loss, 1e-6), (float64_loss, 1e-12)):
        multi = tb.hessian(model, data=batches, closure=closure,
                           normalizer=tb.label_count(shift=True))
        single = tb.hessian(model, data=everything, closure=closure)
        assert multi.dataset.total_normalizer == float((labels[:, 1:] != -100).sum())
        assert abs(multi.loss - single.loss) <= tolerance * single.loss
        err = rel(multi.matmat(V), single.matmat(V))
        print(f"GPT-2 {closure.__name__} over padded batches, label_count(shift=True): "
              f"rel err {err:.2e}")
        assert err <= tolerance
