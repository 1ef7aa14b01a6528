"""Small float64 torch models (with data and loss) for the torch <-> JAX cross-checks.

Each builder returns a :class:`ModelCase`: an eval-mode float64 model with at most ~550
trainable parameters (so dense Hessians stay cheap), a batch in torch layout and a torch loss.
``build(name)`` picks one by name; ``MODEL_NAMES`` lists them all.

Loaded by ``conftest.py`` as the module ``crosscheck_models`` (use ``import crosscheck_models``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_backend.examples import BasicBlock  # torchvision's layout

DTYPE = torch.float64
NUM_SAMPLES = 12


@dataclass
class ModelCase:
    """A model, one batch of inputs and targets, and the torch loss to apply to them."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor
    loss: nn.Module

    def loss_value(self) -> torch.Tensor:
        return self.loss(self.model(*self.inputs), self.targets)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data.target), size=NUM_SAMPLES, replace=False)
    images = data.images[idx].astype(np.float64) / 16.0  # (N, 8, 8) in [0, 1]
    return images, data.target[idx].astype(np.int64)


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, 8, 8)`` float64 images and ``(N,)`` int64 labels."""
    images, labels = _digits()
    return torch.tensor(images[:, None], dtype=DTYPE), torch.tensor(labels)


def digits_small_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits averaged down to 4x4: ``(N, 16)`` features and ``(N,)`` labels."""
    images, labels = _digits()
    small = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    return torch.tensor(small - small.mean(0), dtype=DTYPE), torch.tensor(labels)


def _finish(name: str, model: nn.Module, inputs: tuple, targets: torch.Tensor,
            loss: nn.Module) -> ModelCase:
    model = model.to(DTYPE).eval()
    return ModelCase(name, model, inputs, targets, loss)


# ---------------------------------------------------------------------------- models


def mlp() -> ModelCase:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 10))
    x, y = digits_small_features()
    return _finish("mlp", model, (x,), y, nn.CrossEntropyLoss())


def cnn() -> ModelCase:
    """Strided and padded convs, 'same' padding with dilation, groups, no-bias conv."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),  # 8x8 -> 4x4
        nn.GELU(approximate="tanh"),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2),
        nn.GELU(),
        nn.Conv2d(4, 2, 2, stride=2, bias=False),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    x, y = digits_images()
    return _finish("cnn", model, (x,), y, nn.CrossEntropyLoss(label_smoothing=0.1))


def _randomise_running_stats(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen, dtype=torch.float64))
                    m.bias.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))


def bn_cnn() -> ModelCase:
    """BatchNorm2d in eval mode with non-trivial running statistics, max pool, SiLU."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    ).to(DTYPE)
    _randomise_running_stats(model, seed=2)
    x, y = digits_images()
    return _finish("bn_cnn", model, (x,), y, nn.CrossEntropyLoss())


def layernorm_mlp() -> ModelCase:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(16, 12),
        nn.LayerNorm(12),
        nn.Softplus(beta=2.0),
        nn.Dropout(0.3),
        nn.Linear(12, 10),
    )
    x, y = digits_small_features()
    targets = F.one_hot(y, 10).to(DTYPE)
    return _finish("layernorm_mlp", model, (x,), targets, nn.MSELoss())


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(2, 2))
        self.layer2 = nn.Sequential(BasicBlock(2, 3, stride=2))  # 1x1 strided downsample
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet() -> ModelCase:
    torch.manual_seed(4)
    model = TinyResNet().to(DTYPE)
    _randomise_running_stats(model, seed=4)
    x, y = digits_images()
    return _finish("resnet", model, (x,), y, nn.CrossEntropyLoss())


class EmbeddingBag(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(dim, classes)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        return self.log_softmax(self.head(self.act(h)))


def embedding() -> ModelCase:
    """Embedding with a padding row (torch sends it no gradient), NLLLoss on log-softmax."""
    torch.manual_seed(5)
    model = EmbeddingBag()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 12, (NUM_SAMPLES, 6), generator=gen)
    tokens[:, -1] = 0  # every sequence ends with padding
    targets = torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)
    return _finish("embedding", model, (tokens,), targets, nn.NLLLoss())


def groupnorm() -> ModelCase:
    """GroupNorm, ELU, AvgPool2d and an adaptive pool with a non-divisible size (4 -> 3)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ELU(alpha=0.7),
        nn.AvgPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(4, 2, 1),
        nn.AdaptiveAvgPool2d(3),  # 4x4 -> 3x3 with overlapping bins
        nn.Flatten(),
        nn.Linear(18, 10),
    )
    x, y = digits_images()
    return _finish("groupnorm", model, (x,), y, nn.CrossEntropyLoss())


class FunctionalNet(nn.Module):
    """torch.nn.functional forms, raw parameters, torch.cat/mean, shape ops, tied weights,
    a frozen parameter and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = nn.Parameter(0.4 * torch.randn(5, 1, 3, 3))
        self.conv_bias = nn.Parameter(0.1 * torch.randn(5))
        self.mix = nn.Parameter(0.3 * torch.randn(10, 3))
        self.proj = nn.Linear(12, 6)
        self.ln_weight = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.frozen = nn.Parameter(torch.randn(6), requires_grad=False)
        self.register_buffer("offset", 0.05 * torch.randn(6))
        self.out_weight = nn.Parameter(0.3 * torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=1), 0.1)
        a = F.avg_pool2d(h, 2)  # (N, 5, 4, 4)
        b = F.max_pool2d(h, kernel_size=2, stride=2)
        z = torch.cat([a, b], dim=1).mean(dim=3)  # (N, 10, 4)
        z = z.permute(0, 2, 1) @ self.mix  # (N, 4, 3)
        z = z.transpose(1, 2).reshape(z.size(0), -1)  # (N, 12)
        z = torch.sigmoid(z) - 0.5
        z = F.gelu(self.proj(z)) + F.linear(z, self.proj.weight) / 2.0  # tied Linear weight
        z = F.layer_norm(z, (6,), self.ln_weight, self.frozen * 0.1 + self.offset)
        z = torch.tanh(z).view(-1, 6)
        return F.linear(z, self.out_weight)


def functional() -> ModelCase:
    torch.manual_seed(7)
    model = FunctionalNet()
    x, y = digits_images()
    targets = F.one_hot(y % 4, 4).to(DTYPE)
    return _finish("functional", model, (x,), targets,
                   nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DTYPE)))


def conv1d() -> ModelCase:
    """Conv1d with 'same' reflect padding and dilation, BatchNorm1d on (N, C, L) and (N, C)."""
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv1d(1, 3, 5, padding="same", dilation=2, padding_mode="reflect"),
        nn.BatchNorm1d(3),
        nn.Sigmoid(),
        nn.AvgPool1d(4),  # 64 -> 16
        nn.Conv1d(3, 2, 3, stride=2),  # 16 -> 7
        nn.Flatten(),
        nn.BatchNorm1d(14),
        nn.Linear(14, 10),
    ).to(DTYPE)
    _randomise_running_stats(model, seed=8)
    x, y = digits_images()
    return _finish("conv1d", model, (x.reshape(len(x), 1, 64),), y, nn.CrossEntropyLoss())


BUILDERS: dict[str, Callable[[], ModelCase]] = {
    "mlp": mlp,
    "cnn": cnn,
    "bn_cnn": bn_cnn,
    "layernorm_mlp": layernorm_mlp,
    "resnet": resnet,
    "embedding": embedding,
    "groupnorm": groupnorm,
    "functional": functional,
    "conv1d": conv1d,
}
MODEL_NAMES = tuple(BUILDERS)


def build(name: str) -> ModelCase:
    """A fresh :class:`ModelCase` by name (see ``MODEL_NAMES``)."""
    try:
        return BUILDERS[name]()
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from {MODEL_NAMES}") from None


def flat_trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the trainable parameters, in ``named_parameters()`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def torch_dense_hessian(case: ModelCase) -> torch.Tensor:
    """Dense Hessian of the loss w.r.t. the flat trainable parameters (double backward).

    Uses ``torch.autograd.functional.hessian`` (not ``torch.func.hessian``, which is wrong
    for LayerNorm on torch 2.13).
    """
    names, tensors = flat_trainable(case.model)
    shapes = [t.shape for t in tensors]
    sizes = [t.numel() for t in tensors]
    flat0 = torch.cat([t.detach().reshape(-1) for t in tensors])

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(case.model, params, case.inputs)
        return case.loss(out, case.targets)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin
    try:  # batched double backward; some double-backward formulas do not batch
        return torch.autograd.functional.hessian(loss_of_flat, flat0, vectorize=True)
    except RuntimeError:
        return torch.autograd.functional.hessian(loss_of_flat, flat0, vectorize=False)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- transformers
# Tiny configurations, random weights (never from_pretrained). Each returns
# (model, (inputs, targets), loss callable); inputs may be a dict of keyword inputs.

VOCAB, SEQ = 23, 6


def _tokens(seed: int, batch: int = 3, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def causal_lm_loss(out, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t predict token t + 1."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           targets[:, 1:].reshape(-1))


def logits_cross_entropy(out, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, targets)


def hf_gpt2(attn_implementation: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(10)
    config = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=8,
                        use_cache=False, attn_implementation=attn_implementation,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(DTYPE).eval()
    tokens = _tokens(10)
    return model, ({"input_ids": tokens}, tokens), causal_lm_loss


def hf_bert(attn_implementation: str = "eager"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(11)
    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, vocab_size=VOCAB, max_position_embeddings=8,
                        type_vocab_size=2, num_labels=3, attn_implementation=attn_implementation)
    model = BertForSequenceClassification(config).to(DTYPE).eval()
    tokens = _tokens(11)
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0  # a padded sequence
    mask[2, 5:] = 0
    labels = torch.tensor([0, 2, 1])
    return model, ({"input_ids": tokens, "attention_mask": mask}, labels), logits_cross_entropy


def hf_vit(attn_implementation: str = "eager"):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(12)
    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=12, image_size=8, patch_size=4, num_channels=1,
                       num_labels=3, attn_implementation=attn_implementation)
    model = ViTForImageClassification(config).to(DTYPE).eval()
    images, labels = digits_images()
    return model, ({"pixel_values": images[:4]}, labels[:4] % 3), logits_cross_entropy


class TransformerLM(nn.Module):
    """A causal ``nn.TransformerEncoder`` language model (token and position embeddings)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8, heads: int = 2, layers: int = 1,
                 max_len: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.1 * torch.randn(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=12, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=self.position.dtype)
        h = self.embed(tokens) + self.position[:length]
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def transformer_lm():
    torch.manual_seed(13)
    model = TransformerLM().to(DTYPE).eval()
    tokens = _tokens(13)
    return model, (tokens, tokens), causal_lm_loss


class AttentionClassifier(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, a key padding mask) and a linear head."""

    def __init__(self, dim: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, key_padding_mask=padding)
        return self.head(h.mean(dim=1))


def multihead_attention():
    torch.manual_seed(14)
    model = AttentionClassifier().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4, 5, 6, generator=gen, dtype=DTYPE)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[1, 3:] = True
    labels = torch.tensor([0, 1, 2, 1])
    return model, ((x, padding), labels), nn.CrossEntropyLoss()


def resnet18(width: int = 2):
    from torch_backend.examples import make_resnet18

    model = make_resnet18(width=width, num_classes=3, in_channels=1, seed=15)
    images, labels = digits_images()
    return model, (images[:4], labels[:4] % 3), nn.CrossEntropyLoss()


TRANSFORMER_BUILDERS = {
    "gpt2": hf_gpt2,
    "bert": hf_bert,
    "vit": hf_vit,
    "transformer_lm": transformer_lm,
    "multihead_attention": multihead_attention,
    "resnet18": resnet18,
}


# ---------------------------------------------------------------------------- the zoo
# Hugging Face architectures from tiny configurations (random weights, float64, eval mode),
# one builder per architecture: () -> (model, (inputs, targets), loss).

def _lm(config_cls, model_cls, seed, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, use_cache=False, **config)
    model = getattr(transformers, model_cls)(cfg).to(DTYPE).eval()
    tokens = _tokens(seed, batch=2)
    return model, ({"input_ids": tokens}, tokens), causal_lm_loss


def _classifier(config_cls, model_cls, seed, mask=True, seq=SEQ, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, num_labels=3, **config)
    model = getattr(transformers, model_cls)(cfg).to(DTYPE).eval()
    tokens = _tokens(seed, batch=2, seq=seq)
    inputs = {"input_ids": tokens}
    if mask:
        attention = torch.ones_like(tokens)
        attention[1, 4:] = 0  # a padded sequence
        inputs["attention_mask"] = attention
    return model, (inputs, torch.tensor([0, 2])), logits_cross_entropy


_SMALL = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12)
_SMALL_LM = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)


def zoo_gpt2():
    return hf_gpt2("eager")


def zoo_gpt_neo():
    return _lm("GPTNeoConfig", "GPTNeoForCausalLM", 20, hidden_size=8, num_layers=2,
               num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4,
               max_position_embeddings=16, intermediate_size=12)


def zoo_gpt_neox():
    return _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", 21, hidden_size=8, num_hidden_layers=1,
               num_attention_heads=2, intermediate_size=12, max_position_embeddings=16,
               rotary_pct=0.5)


def zoo_opt():
    return _lm("OPTConfig", "OPTForCausalLM", 22, hidden_size=8, num_hidden_layers=1,
               num_attention_heads=2, ffn_dim=12, max_position_embeddings=16,
               word_embed_proj_dim=8)


def zoo_llama():
    return _lm("LlamaConfig", "LlamaForCausalLM", 23, **_SMALL_LM)


def zoo_mistral():
    return _lm("MistralConfig", "MistralForCausalLM", 24, **_SMALL_LM)


def zoo_qwen2():
    return _lm("Qwen2Config", "Qwen2ForCausalLM", 25, **_SMALL_LM)


def zoo_gemma():
    return _lm("GemmaConfig", "GemmaForCausalLM", 26, head_dim=8, **_SMALL_LM)


def zoo_phi():
    return _lm("PhiConfig", "PhiForCausalLM", 27, hidden_size=8, intermediate_size=12,
               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
               partial_rotary_factor=0.5)


def zoo_bloom():
    return _lm("BloomConfig", "BloomForCausalLM", 28, hidden_size=8, n_layer=1, n_head=2)


def zoo_falcon():
    return _lm("FalconConfig", "FalconForCausalLM", 29, hidden_size=8, num_hidden_layers=1,
               num_attention_heads=2, new_decoder_architecture=False, alibi=False)


def zoo_bert():
    return hf_bert("eager")


def zoo_roberta():
    return _classifier("RobertaConfig", "RobertaForSequenceClassification", 30,
                       max_position_embeddings=16, **_SMALL)


def zoo_distilbert():
    return _classifier("DistilBertConfig", "DistilBertForSequenceClassification", 31, dim=8,
                       n_layers=1, n_heads=2, hidden_dim=12, max_position_embeddings=16)


def zoo_albert():
    return _classifier("AlbertConfig", "AlbertForSequenceClassification", 32, embedding_size=4,
                       max_position_embeddings=16, **_SMALL)


def zoo_electra():
    return _classifier("ElectraConfig", "ElectraForSequenceClassification", 33,
                       embedding_size=4, max_position_embeddings=16, **_SMALL)


def zoo_deberta_v2():
    # 8 tokens, 4 buckets, 8 relative positions: the log bucket of distance 7 is
    # ceil(log(7 / 2) / log(3.5)) = ceil(1.0) in float32, which jax.jit folded to 2
    return _classifier("DebertaV2Config", "DebertaV2ForSequenceClassification", 34, seq=8,
                       max_position_embeddings=16, relative_attention=True,
                       position_buckets=4, max_relative_positions=8,
                       pos_att_type=["p2c", "c2p"], **_SMALL)


def _seq2seq(config_cls, model_cls, seed, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, use_cache=False, **config)
    model = getattr(transformers, model_cls)(cfg).to(DTYPE).eval()
    tokens, labels = _tokens(seed, batch=2), _tokens(seed + 100, batch=2, seq=4)
    inputs = {"input_ids": tokens, "decoder_input_ids": labels}
    return model, (inputs, labels), logits_token_cross_entropy


def logits_token_cross_entropy(out, targets: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def zoo_t5():
    return _seq2seq("T5Config", "T5ForConditionalGeneration", 40, d_model=8, d_kv=4, d_ff=12,
                    num_layers=1, num_heads=2, relative_attention_num_buckets=4,
                    relative_attention_max_distance=8, decoder_start_token_id=0)


def zoo_bart():
    return _seq2seq("BartConfig", "BartForConditionalGeneration", 41, d_model=8,
                    encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=12, decoder_ffn_dim=12,
                    max_position_embeddings=16)


def _images(config_cls, model_cls, seed, size=8, channels=1, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(num_labels=3, num_channels=channels, **config)
    model = getattr(transformers, model_cls)(cfg).to(DTYPE).eval()
    images, labels = digits_images()
    pixels = images[:2] if size == 8 else F.interpolate(images[:2], size=size)
    return model, ({"pixel_values": pixels.repeat(1, channels, 1, 1)}, labels[:2] % 3), \
        logits_cross_entropy


def zoo_vit():
    return hf_vit("sdpa")


def zoo_convnext():
    return _images("ConvNextConfig", "ConvNextForImageClassification", 50, hidden_sizes=[4, 8],
                   depths=[1, 1], num_stages=2, patch_size=2)


def zoo_swin():
    return _images("SwinConfig", "SwinForImageClassification", 51, image_size=8, patch_size=2,
                   embed_dim=4, depths=[1, 1], num_heads=[1, 2], window_size=2)


def zoo_clip_vision():
    import transformers

    torch.manual_seed(52)
    cfg = transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=12,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        image_size=8, patch_size=4, num_channels=1,
                                        projection_dim=4)
    model = transformers.CLIPVisionModelWithProjection(cfg).to(DTYPE).eval()
    images, _ = digits_images()
    target = torch.randn(2, 4, generator=torch.Generator().manual_seed(52), dtype=DTYPE)
    return model, ({"pixel_values": images[:2]}, target), _embeds_mse


def _embeds_mse(out, targets):
    return F.mse_loss(out.image_embeds, targets)


def zoo_whisper_encoder():
    import transformers

    torch.manual_seed(53)
    cfg = transformers.WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
                                     encoder_ffn_dim=12, num_mel_bins=4,
                                     max_source_positions=4, decoder_layers=1,
                                     decoder_attention_heads=2, decoder_ffn_dim=12,
                                     vocab_size=VOCAB)
    model = transformers.WhisperForAudioClassification(cfg).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(53)
    features = torch.randn(2, 4, 8, generator=gen, dtype=DTYPE)  # (batch, mels, 2 * positions)
    return model, ({"input_features": features}, torch.tensor([0, 1])), logits_cross_entropy


def zoo_wav2vec2():
    import transformers

    torch.manual_seed(54)
    cfg = transformers.Wav2Vec2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=12, conv_dim=(4, 4), conv_stride=(2, 2),
                                      conv_kernel=(3, 3), num_conv_pos_embeddings=4,
                                      num_conv_pos_embedding_groups=2, num_labels=3,
                                      classifier_proj_size=4, vocab_size=VOCAB,
                                      feat_extract_norm="layer", do_stable_layer_norm=True)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(54)
    audio = torch.randn(2, 40, generator=gen, dtype=DTYPE)
    return model, ({"input_values": audio}, torch.tensor([0, 2])), logits_cross_entropy


class GRULanguageModel(nn.Module):
    """Embedding, a two-layer GRU and a tied-free head (hand-built recurrent model)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


def zoo_gru_lm():
    torch.manual_seed(60)
    model = GRULanguageModel().to(DTYPE).eval()
    tokens = _tokens(60, batch=2)
    return model, (tokens, tokens), causal_lm_loss


class TinyUNet(nn.Module):
    """A conv encoder-decoder with a transposed convolution, a skip and depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        h = F.gelu(self.depthwise(F.silu(self.down(x))))
        return self.head(torch.cat([self.up(h), x], dim=1))


def zoo_unet():
    torch.manual_seed(61)
    model = TinyUNet().to(DTYPE).eval()
    images, _ = digits_images()
    return model, (images[:2], images[:2].flip(-1)), nn.MSELoss()


ZOO = {name[len("zoo_"):]: fn for name, fn in globals().items() if name.startswith("zoo_")}


def twin_hvp_difference(model, inputs, targets, loss, seed: int = 0, **from_torch_options):
    """``(twin, rel)``: one HVP of the twin's loss (jitted forward-over-reverse) against torch's
    double backward on ``twin.torch_model()`` (the same rewritten program), relative in norm.

    Also checks the two losses and gradients agree to the same ``rel`` (the largest of the
    three is returned). Cheaper than a full ``crosscheck_model`` (no eigensolves).
    """
    import jax
    from jax.flatten_util import ravel_pytree
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jax_backend import from_torch

    twin = from_torch(model, inputs, loss=loss, example_targets=targets, **from_torch_options)
    reference = twin.torch_model()
    tensors = dict(reference.named_parameters())
    names = list(twin.params)
    flat, unravel = ravel_pytree(twin.params)
    jax_inputs = jax.tree_util.tree_map(lambda t: t.numpy(), inputs)
    probe = np.random.default_rng(seed).standard_normal(flat.shape[0])

    def jax_loss(v):
        return twin.loss(unravel(v), jax_inputs, targets.numpy())

    @jax.jit
    def value_grad_hvp(v, p):
        grad, hvp = jax.jvp(jax.grad(jax_loss), (v,), (p,))
        return jax_loss(v), grad, hvp

    value, grad, hvp = value_grad_hvp(flat, jax.numpy.asarray(probe))
    theta = torch.cat([tensors[n].detach().reshape(-1) for n in names]).requires_grad_(True)
    parts = torch.split(theta, [tensors[n].numel() for n in names])
    params = {n: p.reshape(tensors[n].shape) for n, p in zip(names, parts)}
    args = (inputs,) if not isinstance(inputs, dict) else ()
    kwargs = inputs if isinstance(inputs, dict) else {}
    with sdpa_kernel(SDPBackend.MATH):  # flash attention has no double backward
        t_value = loss(torch.func.functional_call(reference, params, args, kwargs), targets)
        (t_grad,) = torch.autograd.grad(t_value, theta, create_graph=True)
        (t_hvp,) = torch.autograd.grad(t_grad @ torch.as_tensor(probe), theta)
    t_value = float(t_value.detach())
    rel = abs(float(value) - t_value) / abs(t_value)
    for ours, theirs in ((grad, t_grad), (hvp, t_hvp)):
        theirs = theirs.detach().numpy()
        rel = max(rel, float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)))
    return twin, rel
