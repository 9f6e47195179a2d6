"""Moneta's bounded inner gradient (models/SPEC.md §4): with a knee r the lp bias's gradient grows linearly
beyond r, and it is the gradient of the stated loss phi; without a knee everything is as before."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from miras_serve.models import load_pretrained
from miras_serve.models.config import ConfigError, MirasConfig, preset_config
from miras_serve.models.memory import attentional_loss, output_grad
from miras_serve.models.train import main


def sharp_moneta(**overrides) -> MirasConfig:
    """A Moneta config whose smoothing is negligible in fp64 (c = 1e4, eps = 1e-30)."""
    return preset_config("moneta", sign_sharpness=1e4, abs_eps=1e-30, **overrides)


def errors_both_sides_of_one(seed: int = 0) -> torch.Tensor:
    """Random errors [2, 3, 5, 8] with |e| in [0.05, 5], of either sign: below and above r = 1, none near 0."""
    g = torch.Generator().manual_seed(seed)
    size = 0.05 + 4.95 * torch.rand(2, 3, 5, 8, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(size.shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign * size


@pytest.mark.parametrize("p", [3.0, 2.5, 4.0])
def test_the_gradient_is_the_stated_loss_s_gradient(p):
    cfg = sharp_moneta(p=p, lp_knee=1.0)
    e = errors_both_sides_of_one().requires_grad_(True)
    assert (e.abs() > 1.0).any() and (e.abs() < 1.0).any()
    (expected,) = torch.autograd.grad(attentional_loss(cfg, e, None).sum(), e)
    torch.testing.assert_close(output_grad(cfg, e.detach(), None), expected, rtol=1e-10, atol=1e-12)


def test_the_stated_loss_in_closed_form():
    """phi(a) = a^3/3 up to r = 1, then 1/3 + (a^2 - 1)/2 (p = 3): one token of two components."""
    cfg = sharp_moneta(lp_knee=1.0)
    e = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    expected = 0.5**3 / 3 + (1 / 3 + (4.0 - 1.0) / 2)
    torch.testing.assert_close(attentional_loss(cfg, e, None), torch.tensor([expected], dtype=torch.float64))
    r = 0.5  # a knee other than 1: r^p/p + r^(p-2)(a^2 - r^2)/2
    e = torch.tensor([[2.0]], dtype=torch.float64)
    expected = r**3 / 3 + r * (4.0 - r * r) / 2
    torch.testing.assert_close(attentional_loss(sharp_moneta(lp_knee=r), e, None),
                               torch.tensor([expected], dtype=torch.float64))


def test_the_gradient_grows_linearly_beyond_the_knee():
    for r in (1.0, 0.3):
        cfg = sharp_moneta(lp_knee=r)
        e = errors_both_sides_of_one(seed=1) * 20  # up to 100 r
        g = output_grad(cfg, e, None)
        beyond = e.abs() > r
        bound = r ** (cfg.p - 2) * e.abs() * (1 + 1e-12)
        assert beyond.float().mean() > 0.5
        assert (g.abs()[beyond] <= bound[beyond]).all()
        assert (g.abs()[beyond] >= bound[beyond] * (1 - 1e-9)).all()  # and is that line, not below it
        assert torch.equal(torch.sign(g), torch.sign(e))


def test_without_a_knee_the_gradient_and_loss_are_today_s():
    """No knee: bit for bit the unbounded formulas (fp32, the default smoothing); a knee above every
    error gives the same too."""
    cfg = preset_config("moneta", lp_knee=None)  # the checkpoints that predate the knee
    e = 3 * torch.randn(4, 2, 16, 8, generator=torch.Generator().manual_seed(2))
    today = torch.tanh(cfg.sign_sharpness * e) * (e * e + cfg.abs_eps).pow((cfg.p - 1) / 2)
    assert torch.equal(output_grad(cfg, e, None), today)
    assert torch.equal(attentional_loss(cfg, e, None), e.abs().pow(cfg.p).sum(-1) / cfg.p)
    high = preset_config("moneta", lp_knee=float(e.abs().max()) * 2)
    assert torch.equal(output_grad(high, e, None), today)
    assert torch.equal(attentional_loss(high, e, None), e.abs().pow(cfg.p).sum(-1) / cfg.p)


def test_the_knee_in_the_config_and_the_rule():
    assert preset_config("moneta").lp_knee == 1.0  # the preset's knee (models/SPEC.md §4)
    assert preset_config("moneta", lp_knee=None).memory_rule().lp_knee == math.inf
    assert preset_config("moneta", lp_knee=0.5).memory_rule().lp_knee == 0.5
    for bad in (0.0, -1.0, math.inf, math.nan, "1", True):
        with pytest.raises(ConfigError, match="'lp_knee'"):
            preset_config("moneta", lp_knee=bad)
    with pytest.raises(ConfigError, match="'lp_knee'.*'lp' bias"):
        preset_config("yaad", lp_knee=1.0)
    cfg = preset_config("moneta", lp_knee=1.0)
    assert MirasConfig.from_dict(cfg.to_dict()).lp_knee == 1.0
    data = cfg.to_dict()
    data["lp_knee"] = 2  # a JSON integer is a float
    assert isinstance(MirasConfig.from_dict(data).lp_knee, float)
    del data["lp_knee"]  # a config.json from before the field: no knee
    assert MirasConfig.from_dict(data).lp_knee is None


@pytest.mark.parametrize("preset", ["moneta-h", "yaad-h", "memora-h"])
def test_hybrid_of_each_rule_trains_without_a_non_finite_step(preset, tmp_path):
    """A micro hybrid of each rule, with its preset's numerics (Moneta's knee 1.0 included), trains 200 steps
    on random words at a high learning rate with every loss and gradient finite (the trainer skips, and
    records, a non-finite step); the numerics are in the saved model's config."""
    rng = random.Random(0)
    corpus = tmp_path / "random.txt"
    corpus.write_text(" ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6)))
                               for _ in range(4000)))
    out = tmp_path / preset
    assert main(["--preset", preset, "--size", "micro", "--corpus", str(corpus), "--out", str(out),
                 "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--lr", "2e-2", "--warmup", "2",
                 "--steps", "200", "--eval-every", "200", "--eval-windows", "2", "--checkpoint-every", "200",
                 "--threads", "1"]) == 0
    history = json.loads((out / "training.json").read_text())["history"]
    losses = [loss for _, loss in history["train"]]
    assert len(losses) == 200 and all(math.isfinite(loss) for loss in losses)
    assert "skipped_steps" not in history, f"non-finite gradients at steps {history['skipped_steps']}"
    model, _ = load_pretrained(out)
    assert model.config.memory_ln_eps == 1e-2
    if preset == "moneta-h":
        assert model.config.lp_knee == 1.0 and model.config.memory_rule().lp_knee == 1.0
