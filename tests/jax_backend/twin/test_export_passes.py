"""The twin's export passes: float32 islands found, located and promoted on both sides;
constant subgraphs computed once by torch.

A float64 Hugging Face Llama casts its RMSNorm and rotary tables to float32 (T5: the
LayerNorm variance). The twin lists those islands (module and source line); by default the
export rewrites the casts to float64 and ``Twin.torch_model()`` evaluates the same rewritten
program with torch, so the two agree to float64 round-off (1e-12) while the original model
differs from the promoted function by float32 round-off.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("transformers")

import crosscheck_models as cm  # noqa: E402  (registered by conftest.py)

from jax_backend import from_torch  # noqa: E402

pytestmark = pytest.mark.both

RTOL = 1e-12


def _islands_by_module(twin):
    return {i.module.split(" ")[0]: i for i in twin.islands}


def test_llama_float32_islands_are_located_and_promoted_on_both_sides():
    model, (inputs, targets), loss = cm.zoo_llama()
    twin, rel = cm.twin_hvp_difference(model, inputs, targets, loss)
    islands = _islands_by_module(twin)
    assert {"model.rotary_emb", "model.layers.0.input_layernorm", "model.norm"} <= set(islands)
    norm = islands["model.layers.0.input_layernorm"]
    assert "LlamaRMSNorm" in norm.module and "modeling_llama.py" in norm.source
    assert "hidden_states.to(torch.float32)" in norm.source
    assert all(i.promoted for i in twin.islands)
    # the islands matter (float32 round-off), and the promoted sides agree to float64
    assert twin.island_effect > 1e-12
    assert twin.check_error <= RTOL
    assert rel <= RTOL, rel
    # torch's module of the rewritten program has the model's parameter names
    reference = twin.torch_model()
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert reference is not model


def test_promotion_off_keeps_float32_and_says_why():
    model, (inputs, targets), loss = cm.zoo_llama()
    twin = from_torch(model, inputs, loss=loss, example_targets=targets,
                      promote_float32_islands=False)
    assert twin.islands and not any(i.promoted for i in twin.islands)
    assert twin.torch_model() is not None and twin.island_effect is None
    reference, notes, rtol = twin.crosscheck_terms()
    assert reference is twin._graphs.model  # torch's own eager model
    assert rtol == 1e-4
    assert "float32" in notes[0] and "LlamaRMSNorm" in notes[0]
    # both sides reproduce the float32 islands: agreement only to float32-level round-off
    assert twin.check_error <= 1e-5


def test_t5_layernorm_variance_is_promoted():
    model, (inputs, targets), loss = cm.zoo_t5()
    twin, rel = cm.twin_hvp_difference(model, inputs, targets, loss)
    assert any("T5LayerNorm" in i.module for i in twin.islands)
    assert all(i.promoted for i in twin.islands)
    assert rel <= RTOL, rel


def test_float32_twin_has_no_islands():
    model, (inputs, targets), loss = cm.zoo_llama()
    twin = from_torch(model, inputs, loss=loss, example_targets=targets, dtype="float32")
    assert twin.islands == () and twin.torch_model() is twin._graphs.model


def test_deberta_v2_position_buckets_are_computed_once_by_torch():
    """DeBERTa-v2's float32 log bucket of distance 7, ceil(log(7/2) / log(3.5)), is 1 in
    torch and became 2 when jax.jit folded it: the loss moved by ~1e-11, which the 1e-12
    forward check sees. Folded by torch at export time, the twin equals torch."""
    model, (inputs, targets), loss = cm.zoo_deberta_v2()
    with pytest.raises(ValueError, match="differs from torch"):
        from_torch(model, inputs, loss=loss, example_targets=targets, fold_constants=False)
    twin, rel = cm.twin_hvp_difference(model, inputs, targets, loss)
    assert twin.check_error <= RTOL and rel <= RTOL, rel
    graph = next(iter(twin._graphs.cache.values()))
    assert graph.exported.folded  # the bucket table is a constant of the twin
