"""Token distributions at the edges of the temperature range: never NaN, never blank."""

import pytest
import torch

from koala.engine.sampling import MIN_TEMPERATURE, SamplingParams, logits_to_probs
from koala.errors import KoalaError


@pytest.mark.parametrize("t", [MIN_TEMPERATURE, 1e-3, 1.0, 1e6])
def test_every_allowed_temperature_gives_a_distribution(t):
    logits = torch.tensor([[3.0, 1.0, -2.0, 80.0, float("-inf")], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = logits_to_probs(logits, SamplingParams(t, top_p=0.9))
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2))
    assert p[0].argmax() == 3 and p[0, 4] == 0


@pytest.mark.parametrize("t", [1e-40, 1e-300, 5e-7])
def test_a_denormal_or_tiny_temperature_is_refused_with_the_fix(t):
    with pytest.raises(KoalaError, match="use 0 for greedy"):
        SamplingParams(t)


def test_config_refuses_it_where_the_field_is_defined():
    from koala.config import load_config

    with pytest.raises(KoalaError, match="eval.temperature.*use 0 for greedy"):
        load_config("smoke", overrides=["eval.temperature=1e-40"])
    with pytest.raises(KoalaError, match="sampling.temperature.*use 0 for greedy"):
        load_config("smoke", overrides=["sampling.temperature=1e-40"])
