"""Oracle and contract tests for aigc.models.vae: the KL and reconstruction terms against
torch.distributions and torch's own losses, shapes and exact output sizes for small images,
seeded sampling, a save/load round trip, and a short training run that must learn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from aigc.models.vae import VAE, VAEConfig, build, kl_normal

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
TINY = {"z_dim": 4, "base_channels": 8, "label_dim": 4}
NUM_CLASSES = 3


def tiny_model(image_shape, num_classes: int = 0, **overrides) -> VAE:
    torch.manual_seed(0)
    return build(VAEConfig(**{**TINY, **overrides}), image_shape, num_classes)


def images(n: int, image_shape, seed: int = 0) -> torch.Tensor:
    """n images in [-1, 1] (N, C, H, W), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *image_shape), generator=g) * 2 - 1


def labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# oracles


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(32, 7, generator=g) * 2
    logvar = torch.randn(32, 7, generator=g) * 1.5
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_normal(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    assert kl_normal(torch.zeros(4, 3), torch.zeros(4, 3)).abs().max().item() == 0.0


def _decoded_at_same_eps(model: VAE, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The decoder output loss_terms sees with generator seed `seed` (eps drawn the same way)."""
    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))
    return model.decode(mu + torch.exp(0.5 * logvar) * eps)


def test_bernoulli_recon_matches_binary_cross_entropy():
    model = tiny_model((1, 8, 8))
    x = images(5, (1, 8, 8))
    with torch.no_grad():
        terms = model.loss_terms(x, generator=torch.Generator().manual_seed(3))
        probs = torch.sigmoid(_decoded_at_same_eps(model, x, 3))
        by_hand = F.binary_cross_entropy(probs, (x + 1) / 2, reduction="none").sum(dim=(1, 2, 3)).mean()
        kl = kl_normal(*model.encode(x)).mean()
    torch.testing.assert_close(terms["recon"], by_hand, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["nelbo"], terms["recon"] + terms["kl"])


def test_gaussian_recon_matches_normal_log_prob_and_beta_weights_kl():
    model = tiny_model((3, 32, 32), likelihood="gaussian", sigma=0.3, beta=0.25)
    x = images(4, (3, 32, 32))
    with torch.no_grad():
        terms = model.loss_terms(x, generator=torch.Generator().manual_seed(5))
        mean = _decoded_at_same_eps(model, x, 5)
        log_p = Normal(mean, 0.3).log_prob(x).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms["recon"], -log_p, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(terms["nelbo"], terms["recon"] + terms["kl"])
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.25 * terms["kl"])


def test_training_lowers_the_nelbo():
    """150 Adam steps on 64 fixed random binary 8x8 patterns: an untrained decoder scores about
    64 ln 2 = 44.4 nats per image (every pixel a coin flip); the latent must carry real information."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (64, 1, 8, 8), generator=g).float() * 2 - 1
    model = tiny_model((1, 8, 8), z_dim=8, base_channels=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def nelbo() -> float:
        with torch.no_grad():
            return model.loss_terms(x, generator=torch.Generator().manual_seed(1))["nelbo"].item()

    before = nelbo()
    for _ in range(150):
        optimizer.zero_grad()
        model.loss(x).backward()
        optimizer.step()
    after = nelbo()
    assert before == pytest.approx(64 * math.log(2), rel=0.05)
    assert after < 0.85 * before, (before, after)
    assert after < 64 * math.log(2) - 5, (before, after)


# --------------------------------------------------------------------------------------
# contract over shapes, conditional and not


@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
@pytest.mark.parametrize("image_shape", SHAPES)
def test_shapes_loss_sampling_and_round_trip(image_shape, num_classes, tmp_path):
    n = 3
    model = tiny_model(image_shape, num_classes)
    x = images(n, image_shape)
    y = labels(n) if num_classes else None

    # 1. shapes: the decoder gives back exactly (N, C, H, W)
    mu, logvar = model.encode(x, y)
    assert mu.shape == logvar.shape == (n, TINY["z_dim"])
    assert model.decode(mu, y).shape == (n, *image_shape)
    recon = model.reconstruct(x, y)
    assert recon.shape == (n, *image_shape) and recon.min() >= -1 and recon.max() <= 1

    # 2. a finite loss with finite, non-zero gradients
    terms = model.loss_terms(x, y)
    assert set(terms) == {"recon", "kl", "nelbo", "loss"}
    assert all(math.isfinite(v.item()) for v in terms.values())
    model.loss(x, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # 3. seeded sampling: right shape and range, reproducible, and the seed matters
    first = model.sample(n, generator=torch.Generator().manual_seed(7), y=y)
    again = model.sample(n, generator=torch.Generator().manual_seed(7), y=y)
    other = model.sample(n, generator=torch.Generator().manual_seed(8), y=y)
    assert first.shape == (n, *image_shape)
    assert first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)

    # 4. save/load: identical samples and identical loss terms at a fixed eps
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "vae_config.json"}
    loaded = VAE.load(tmp_path)
    assert loaded.image_shape == image_shape and loaded.num_classes == num_classes
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.sample(n, generator=torch.Generator().manual_seed(7), y=y), first,
                               rtol=0, atol=0)
    with torch.no_grad():
        before = model.loss_terms(x, y, generator=torch.Generator().manual_seed(2))
        after = loaded.loss_terms(x, y, generator=torch.Generator().manual_seed(2))
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_sample_from_given_latents_and_range(likelihood):
    model = tiny_model((1, 8, 8), likelihood=likelihood)
    z = torch.randn(5, TINY["z_dim"], generator=torch.Generator().manual_seed(0)) * 10  # far into the tails
    out = model.sample(5, z=z)
    assert out.shape == (5, 1, 8, 8) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        decoded = model.decode(z)
    expected = 2 * torch.sigmoid(decoded) - 1 if likelihood == "bernoulli" else decoded
    torch.testing.assert_close(out, expected)


def test_odd_and_non_square_sizes_come_back_exact():
    for image_shape in [(1, 4, 4), (2, 7, 9), (1, 13, 6)]:
        model = tiny_model(image_shape)
        x = images(2, image_shape)
        assert model.decode(model.encode(x)[0]).shape == (2, *image_shape)


def test_conditional_labels_change_the_output():
    model = tiny_model((1, 28, 28), NUM_CLASSES)
    z = torch.randn(4, TINY["z_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.decode(z, torch.zeros(4, dtype=torch.long))
        b = model.decode(z, torch.ones(4, dtype=torch.long))
        mu_a, _ = model.encode(images(4, (1, 28, 28)), torch.zeros(4, dtype=torch.long))
        mu_b, _ = model.encode(images(4, (1, 28, 28)), torch.ones(4, dtype=torch.long))
    assert (a - b).abs().max() > 1e-3
    assert (mu_a - mu_b).abs().max() > 1e-3


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="at least"):
        tiny_model((1, 3, 8))
    conditional = tiny_model((1, 8, 8), NUM_CLASSES)
    with pytest.raises(ValueError, match="pass labels y"):
        conditional.loss(images(2, (1, 8, 8)))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_model((1, 8, 8)).loss(images(2, (1, 8, 8)), labels(2))
    with pytest.raises(ValueError, match="expected images"):
        tiny_model((1, 8, 8)).loss(images(2, (3, 8, 8)))
    with pytest.raises(ValueError, match="generator"):
        tiny_model((1, 8, 8)).sample(2)
