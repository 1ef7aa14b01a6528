"""The twin on the models researchers analyse today: Hugging Face GPT-2, BERT and ViT from
tiny configurations (random weights), a causal ``nn.TransformerEncoder`` language model,
``nn.MultiheadAttention`` and a ResNet-18 in torchvision's layout.

Each is a full ``dualhess.crosscheck_model`` round trip in float64: the torch Hessian (torch
autograd) against the Hessian of the JAX twin (``torch.export`` -> ATen -> jax), HVPs on
shared probes to 1e-12 relative and the top-2 eigenvalues to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("sklearn")

import crosscheck_models as cm  # noqa: E402  (registered by conftest.py)

import dualhess  # noqa: E402

pytestmark = pytest.mark.both

HVP_RTOL = 1e-12


EIG_RTOL = 1e-10


def _crosscheck(model, data, loss):
    report = dualhess.crosscheck_model(model, loss, data, k=2, num_probes=2,
                                       method="autograd", check_deterministic=False)
    assert report.passed, str(report)
    assert report.max_rel_diff <= HVP_RTOL, str(report)
    eig_a, eig_b = np.array(report.eig_a), np.array(report.eig_b)
    assert np.max(np.abs(eig_a - eig_b)) <= EIG_RTOL * np.max(np.abs(eig_a)), str(report)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [b.name for b in report.blocks] == names  # aligned by torch name
    return report


def test_hf_gpt2_lm_head():
    pytest.importorskip("transformers")
    model, data, loss = cm.hf_gpt2("eager")
    # lm_head.weight is tied to transformer.wte.weight: one parameter on both sides
    assert model.lm_head.weight is model.transformer.wte.weight
    report = _crosscheck(model, data, loss)
    assert "lm_head.weight" not in [b.name for b in report.blocks]


def test_hf_gpt2_sdpa_keeps_higher_level_operators():
    """GPT-2 with sdpa attention does not decompose fully on torch 2.13 ("Cannot view a
    tensor ..."): linear, layer_norm and scaled_dot_product_attention keep their own rules.
    The loss, gradient and one HVP equal torch's (double backward) to 1e-12."""
    pytest.importorskip("transformers")
    from jax.flatten_util import ravel_pytree

    from jax_backend import from_torch

    model, (inputs, targets), loss = cm.hf_gpt2("sdpa")
    twin = from_torch(model, inputs, loss=loss, example_targets=targets)
    assert twin.decomposition.startswith("core ATen except")
    assert "aten.scaled_dot_product_attention.default" in twin.operators
    names, tensors = cm.flat_trainable(model)
    assert list(twin.params) == names
    flat, unravel = ravel_pytree(twin.params)
    jax_inputs = {k: v.numpy() for k, v in inputs.items()}

    def jax_loss(v):
        return twin.loss(unravel(v), jax_inputs, targets.numpy())

    probe = np.random.default_rng(0).standard_normal(flat.shape[0])

    @jax.jit
    def value_grad_hvp(v, p):
        grad, hvp = jax.jvp(jax.grad(jax_loss), (v,), (p,))
        return jax_loss(v), grad, hvp

    value, grad, hvp = value_grad_hvp(flat, jax.numpy.asarray(probe))

    theta = torch.cat([t.detach().reshape(-1) for t in tensors]).requires_grad_(True)

    def torch_loss(theta):
        parts = torch.split(theta, [t.numel() for t in tensors])
        params = {n: p.reshape(t.shape) for n, p, t in zip(names, parts, tensors)}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return loss(torch.func.functional_call(model, params, (), inputs), targets)

    t_value = torch_loss(theta)
    (t_grad,) = torch.autograd.grad(t_value, theta, create_graph=True)
    (t_hvp,) = torch.autograd.grad(t_grad @ torch.as_tensor(probe), theta)
    assert abs(float(value) - float(t_value)) <= HVP_RTOL * abs(float(t_value))
    for ours, theirs in ((grad, t_grad), (hvp, t_hvp)):
        theirs = theirs.detach().numpy()
        assert np.linalg.norm(np.asarray(ours) - theirs) <= HVP_RTOL * np.linalg.norm(theirs)


def test_hf_bert_sequence_classification_with_attention_mask():
    pytest.importorskip("transformers")
    model, data, loss = cm.hf_bert("eager")
    assert (data[0]["attention_mask"] == 0).any()
    _crosscheck(model, data, loss)


def test_hf_vit_image_classification():
    # sdpa: ViT's eager attention takes its softmax in float32 (transformers'
    # modeling_vit.py), which caps a float64 comparison at ~1e-8 on both sides alike.
    pytest.importorskip("transformers")
    model, data, loss = cm.hf_vit("sdpa")
    _crosscheck(model, data, loss)


def test_transformer_encoder_lm_with_causal_mask_and_unequal_batches():
    model, (tokens, targets), loss = cm.transformer_lm()
    # two batches of different sizes: one exported graph per signature
    data = [(tokens[:2], targets[:2]), (tokens[2:], targets[2:])]
    _crosscheck(model, data, loss)


def test_multihead_attention_with_key_padding_mask():
    model, data, loss = cm.multihead_attention()
    _crosscheck(model, data, loss)


def test_resnet18_torchvision_layout_eval_batchnorm():
    model, data, loss = cm.resnet18(width=2)
    bn = model.bn1
    assert not bn.training and float(bn.running_var.std()) > 0  # non-trivial statistics
    _crosscheck(model, data, loss)
