"""LayerFullGradient: eq. 1 from a layer onward, mapped onto the layer's layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_fullgrad import FullGradient, LayerFullGradient, full_jacobian
from captum_fullgrad.testing import randomize_parameters_
from tests.conftest import odd_size_conv_net

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _docs_text_example() -> str:
    text = USAGE.read_text()
    section = text.split("## A text model", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the text example's code block is missing from docs/usage.md"
    return match.group(1)


def test_the_documented_text_example_runs_and_is_complete():
    namespace: dict = {}
    exec(compile(_docs_text_example(), str(USAGE), "exec"), namespace)
    model, ids = namespace["model"], namespace["ids"]
    attributions, delta = namespace["attributions"], namespace["delta"]
    per_token = namespace["per_token"]
    assert ids.dtype == torch.int64
    assert attributions.shape == (*ids.shape, model.embedding.embedding_dim)
    assert per_token.shape == ids.shape
    logit = model(ids)[:, 1].detach()
    torch.testing.assert_close(per_token.sum(1) - logit, delta, rtol=0, atol=1e-12)
    assert (delta.abs() <= 1e-10 * logit.abs()).all()
    # Per-token scores, not one constant: the bias part follows the tokens too.
    assert per_token.std(1).min() > 0


class _Classifier(nn.Module):
    """Embedding, a class token, a transformer encoder and a head on the class token."""

    def __init__(self, vocab: int = 30, dim: int = 8, length: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, length + 1, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids, mask=None):
        tokens = self.embedding(ids)
        tokens = torch.cat([self.cls.expand(len(ids), -1, -1), tokens], 1) + self.position
        return self.head(self.encoder(tokens, src_key_padding_mask=mask)[:, 0])


def test_class_token_and_padding_mask_keep_completeness():
    torch.manual_seed(1)
    model = randomize_parameters_(_Classifier()).double()  # training mode, no dropout: runs
    ids = torch.randint(0, 30, (3, 6))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, -2:] = True
    lfg = LayerFullGradient(model, model.embedding)
    attributions, delta = lfg.attribute(
        ids, target=[0, 1, 2], additional_forward_args=(mask,), return_convergence_delta=True
    )
    logit = model(ids, mask)[torch.arange(3), [0, 1, 2]].detach()
    torch.testing.assert_close(attributions.flatten(1).sum(1) - logit, delta, rtol=0, atol=1e-12)
    assert (delta.abs() <= 1e-10 * logit.abs()).all()
    chunked = lfg.attribute(
        ids, target=[0, 1, 2], additional_forward_args=(mask,), internal_batch_size=2
    )
    torch.testing.assert_close(chunked, attributions, rtol=0, atol=1e-12)


def test_a_conv_layer_holds_exactly_the_terms_after_it():
    model = odd_size_conv_net()
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    lfg = LayerFullGradient(model, model[3])
    attributions, delta = lfg.attribute(x, target=2, return_convergence_delta=True)
    h = model[:4](x).detach().requires_grad_(True)
    assert attributions.shape == h.shape
    (gradient,) = torch.autograd.grad(model[4:](h)[:, 2].sum(), h)
    fj = full_jacobian(model, x, target=2)
    after = sum(term for name, term in fj.bias_terms.items() if int(name.split(":")[0]) >= 4)
    expected = (gradient * h).flatten(1).sum(1) + after
    torch.testing.assert_close(attributions.flatten(1).sum(1), expected, rtol=0, atol=1e-12)
    assert (delta.abs() < 1e-10).all()
    # From the next layer's input: the same tensor, the same decomposition.
    from_input = LayerFullGradient(model, model[4]).attribute(
        x, target=2, attribute_to_layer_input=True
    )
    torch.testing.assert_close(from_input, attributions, rtol=0, atol=1e-12)
    # At the first layer's input the layer attribution is FullGradient's signed one.
    first = LayerFullGradient(model, model[0]).attribute(x, target=2, attribute_to_layer_input=True)
    signed = FullGradient(model).attribute(x, target=2, postprocess="signed")
    torch.testing.assert_close(first, signed, rtol=0, atol=1e-12)


def test_eq4_on_a_layer_and_the_refusals():
    model = odd_size_conv_net()
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    unsigned = LayerFullGradient(model, model[3]).attribute(x, target=0, postprocess="eq4")
    assert unsigned.shape == (2, 6, 6, 6) and (unsigned >= 0).all()
    with pytest.raises(ValueError, match="postprocess"):
        LayerFullGradient(model, model[3]).attribute(x, target=0, postprocess="neurips2019")
    with pytest.raises(ValueError, match="needs a \\(B, L, E\\) layer tensor"):
        LayerFullGradient(model, model[3], layout="tokens").attribute(x, target=0)
    twice = nn.Sequential(model[0], nn.ReLU(), model[0])
    with pytest.raises(TypeError, match="nn.Module"):
        LayerFullGradient(model, "3")
    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)).double()
    shared[1] = shared[0]
    with pytest.raises(ValueError, match="ran 2 times"):
        LayerFullGradient(lambda t: shared(t).sum((1, 2, 3)), shared[0]).attribute(x)
    del twice
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert hooks == [0] * len(hooks)
    assert LayerFullGradient(model, model[3]).multiplies_by_inputs


def test_full_gradient_reads_token_tensors_per_token():
    """FullGradient(layout="tokens") on embeddings is the layer attribution at the embedding;
    the default layout reads (B, L, E) as L channels, one bias value for every token."""
    namespace: dict = {}
    exec(compile(_docs_text_example(), str(USAGE), "exec"), namespace)
    model, ids = namespace["model"], namespace["ids"]

    def rest(embedded):
        return model.head(model.encoder(embedded + model.position).mean(1))

    embedded = model.embedding(ids).detach()
    tokens, delta = FullGradient(rest, layout="tokens").attribute(
        embedded, target=1, postprocess="signed", return_convergence_delta=True
    )
    torch.testing.assert_close(tokens, namespace["attributions"], rtol=0, atol=1e-12)
    torch.testing.assert_close(delta, namespace["delta"], rtol=0, atol=1e-12)
    bias_tokens = FullGradient(rest, layout="tokens").attribute(
        embedded, target=1, include_input_gradient=False
    )
    assert bias_tokens.sum(-1).std(1).min() > 1e-6  # per-token bias maps
    with pytest.raises(ValueError, match="layout='tokens' needs a \\(B, L, E\\) input"):
        FullGradient(rest, layout="tokens").attribute(embedded[:, None], target=1)
