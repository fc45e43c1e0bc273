"""DGMRec's parts in isolation: encoders, CLUB, generators, losses."""

import pytest
import torch
import torch.nn.functional as F

from dgmrec_dgl.models.dgmrec.club import CLUBEstimator
from dgmrec_dgl.models.dgmrec.encoders import GeneralEncoder, SpecificEncoder, encode
from dgmrec_dgl.models.dgmrec.generators import ModalityDecoder, ModalityGenerator, perturb
from dgmrec_dgl.models.dgmrec.losses import bpr_loss, info_nce


def test_encoders_shapes_range_and_shared_general_layer():
    torch.manual_seed(0)
    enc = GeneralEncoder({"image": 12, "text": 5}, 8)
    x_img, x_txt = torch.randn(7, 12, requires_grad=True), torch.randn(7, 5)
    gi, gt = enc("image", x_img), enc("text", x_txt)
    assert gi.shape == gt.shape == (7, 8)
    assert ((gi > 0) & (gi < 1)).all()                    # sigmoid outputs
    gi.sum().backward()
    assert enc.shared.weight.grad is not None and x_img.grad.abs().sum() > 0
    assert enc.project["text"].weight.grad is None        # the text projection took no part
    spec = SpecificEncoder(12, 8)
    assert spec(x_img).shape == (7, 8)


def test_encode_equals_the_two_encoders_in_values_and_gradients():
    torch.manual_seed(0)
    general, specific = GeneralEncoder({"image": 40, "text": 6}, 8), SpecificEncoder(40, 8)
    x = torch.randn(30, 40, dtype=torch.float64, requires_grad=True)
    general, specific = general.double(), specific.double()
    weights = torch.randn(2, 30, 8, dtype=torch.float64)

    def grads(outputs):
        (weights[0] * outputs[0] + weights[1] * outputs[1]).sum().backward()
        params = [x, general.project["image"].weight, general.project["image"].bias, general.shared.weight,
                  specific.encode.weight, specific.encode.bias]
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    fused = encode(general, specific, "image", x)
    fused_grads = grads(fused)
    apart = (general("image", x), specific(x))
    for a, b in zip(fused + tuple(fused_grads), apart + tuple(grads(apart))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert general.project["text"].weight.grad is None


def test_info_nce_matches_its_definition():
    torch.manual_seed(0)
    a, b = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    cos = F.cosine_similarity(a[:, None], b[None], dim=2) / 0.3
    expected = -(cos.diagonal() - cos.logsumexp(dim=1)).mean()
    torch.testing.assert_close(info_nce(a, b, 0.3), expected)


@pytest.mark.parametrize("temperature", [0.3, 0.01])     # 0.01: exponents past float32's range, row maxima
def test_info_nce_gradients_match_the_composed_cross_entropy(temperature):
    torch.manual_seed(1)
    a = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    ours = info_nce(a, b, temperature)
    grads = torch.autograd.grad(ours * 1.7, (a, b))
    logits = (F.normalize(a, dim=1) / temperature) @ F.normalize(b, dim=1).T
    ref = F.cross_entropy(logits, torch.arange(40))
    ref_grads = torch.autograd.grad(ref * 1.7, (a, b))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


def test_info_nce_backward_runs_once():
    a = torch.randn(8, 4, requires_grad=True)
    loss = info_nce(a, torch.randn(8, 4), 0.2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_info_nce_is_small_for_aligned_and_large_for_shuffled_pairs():
    torch.manual_seed(0)
    a = torch.randn(64, 16)
    aligned = info_nce(a, a.clone(), 0.1)
    shuffled = info_nce(a, a[torch.randperm(64)], 0.1)
    assert aligned < 0.05 and shuffled > 2.0


def test_bpr_loss_prefers_positive_items():
    u = torch.ones(4, 3)
    good = bpr_loss(u, torch.ones(4, 3) * 2, -torch.ones(4, 3))
    bad = bpr_loss(u, -torch.ones(4, 3), torch.ones(4, 3) * 2)
    assert good < 0.01 and bad > 5.0


def test_club_bound_higher_on_correlated_than_independent_pairs():
    torch.manual_seed(0)
    d, n = 8, 1024
    mix = torch.randn(d, d)

    def draw(correlated: bool):
        s = torch.randn(n, d)
        g = s @ mix * 0.5 + 0.1 * torch.randn(n, d) if correlated else torch.randn(n, d)
        return s, g

    bounds = {}
    for correlated in (True, False):
        est = CLUBEstimator(d, hidden=32)
        opt = torch.optim.Adam(est.parameters(), lr=3e-2)
        s, g = draw(correlated)
        for _ in range(150):
            opt.zero_grad()
            (-est.log_likelihood(s, g)).backward()
            opt.step()
        s, g = draw(correlated)          # the bound is evaluated on fresh samples
        with torch.no_grad():
            bounds[correlated] = float(est(s, g, torch.Generator().manual_seed(1)))
    assert bounds[True] > bounds[False] + 1.0, bounds
    assert abs(bounds[False]) < 1.0, bounds


def test_generator_decoder_shapes_and_perturb():
    torch.manual_seed(0)
    gen = ModalityGenerator(16, 8)
    dec = ModalityDecoder(8, 30)
    out = dec(gen(torch.randn(5, 16)), torch.randn(5, 8))
    assert out.shape == (5, 30)
    x = torch.randn(5, 8)
    p = perturb(x, 0.1, torch.Generator().manual_seed(0))
    moved = (p - x)
    assert torch.allclose(moved.norm(dim=1), torch.full((5,), 0.1), atol=1e-5)  # row norm of the noise = ε
    assert (torch.sign(moved) == torch.sign(x)).all()                           # pushed away from zero
    assert torch.equal(perturb(x, 0.0), x)


def test_reconstruction_loss_equals_the_decoder_mse_in_values_and_gradients():
    torch.manual_seed(0)
    dec = ModalityDecoder(4, 9, bias_init="uniform").double()
    general, specific = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    target = torch.randn(6, 9, dtype=torch.float64)
    for inputs_need_grad in (False, True):
        leaves = [t.clone().requires_grad_(t is target or inputs_need_grad) for t in (general, specific, target)]
        params = list(dec.parameters())
        ours = dec.reconstruction_loss(*leaves)
        wanted = [p for p in params + leaves if p.requires_grad]
        grads = torch.autograd.grad(ours * 3.0, wanted)          # a non-unit upstream gradient
        ref = F.mse_loss(dec(*leaves[:2]), leaves[2])
        ref_grads = torch.autograd.grad(ref * 3.0, wanted)
        assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
