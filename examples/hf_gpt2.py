"""A dualhess model file: a tiny Hugging Face GPT-2 trained briefly on a built-in text.

Run it with::

    dualhess analyze examples/hf_gpt2.py --framework both

The model is a ``GPT2LMHeadModel`` from a tiny configuration with random initial weights
(nothing is downloaded), trained for a few Adam steps on the character-level tokens of the
text below, so the Hessian is not the one at initialisation. The loss is next-token
cross-entropy (the causal-LM shift): dualhess exports the model *with* this loss through
``torch.export`` to its JAX twin, and crosschecks the two Hessians. ``lm_head.weight`` is
tied to ``transformer.wte.weight``: one parameter, on both sides. Needs ``transformers``
(``pip install transformers``).
"""

import torch
import torch.nn.functional as F

TEXT = (
    "the hessian of a loss is the matrix of its second derivatives. its largest eigenvalues "
    "say how sharp the minimum is, its negative ones that the point is a saddle. computed "
    "twice, by two autodiff stacks, the numbers check each other."
)
SEQ_LEN, NUM_SEQUENCES, TRAIN_STEPS = 12, 8, 30
VOCAB = sorted(set(TEXT))


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "examples/hf_gpt2.py needs Hugging Face transformers: pip install transformers"
        ) from exc
    return transformers


def data():
    """One batch: ``({"input_ids": tokens}, tokens)``, NUM_SEQUENCES windows of the text."""
    ids = torch.tensor([VOCAB.index(c) for c in TEXT])
    starts = torch.linspace(0, len(ids) - SEQ_LEN - 1, NUM_SEQUENCES).long()
    tokens = torch.stack([ids[s : s + SEQ_LEN] for s in starts])
    return {"input_ids": tokens}, tokens


def loss():
    """Next-token cross-entropy: the logits at position t predict the token at t + 1."""

    def causal_lm_loss(out, tokens):
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return causal_lm_loss


def model():
    """GPT-2 with 2 layers of width 16 (random init, seed 0), trained TRAIN_STEPS Adam steps."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=len(VOCAB),
        bos_token_id=0, eos_token_id=0, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    net = transformers.GPT2LMHeadModel(config)
    inputs, targets = data()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = loss()
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss_fn(net(**inputs), targets).backward()
        opt.step()
    return net.eval()
