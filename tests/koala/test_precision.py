"""The compute dtype: measured once per machine and cached, bf16 only where it pays, forced by the environment."""

import json

import pytest
import torch

from koala import precision
from koala.errors import KoalaError
from tests.conftest import tiny_llama

SMALL = dict(hidden=32, intermediate=64, vocab=128)  # tiny GEMMs: the measurement takes milliseconds


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    monkeypatch.delenv(precision.ENV, raising=False)
    return tmp_path


def _cached(speedup: float) -> None:
    """A verdict in the cache, as an earlier process on this machine would have measured it."""
    path, key = precision.cache_path(precision.gemm_shapes(**SMALL))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**key, "speedup": speedup, "by_shape": []}))


def _no_measuring(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured again although a verdict was cached")
    monkeypatch.setattr(precision, "measure_speedup", refuse)


def test_auto_measures_once_then_reads_the_cache(cache, monkeypatch):
    first = precision.resolve("auto", "cpu", **SMALL)
    path, _ = precision.cache_path(precision.gemm_shapes(**SMALL))
    stored = json.loads(path.read_text())
    assert stored["cpu"] and stored["torch"] == torch.__version__ and stored["threads"] == torch.get_num_threads()
    assert first.speedup == stored["speedup"] > 0
    _no_measuring(monkeypatch)
    assert precision.resolve("auto", "cpu", **SMALL) == first


def test_float32_is_chosen_where_bf16_does_not_pay(cache, monkeypatch):
    """A CPU without bf16 matrix units (an AMD EPYC: bf16 GEMMs slower than fp32) keeps float32, and says why."""
    _cached(0.8)
    _no_measuring(monkeypatch)
    c = precision.resolve("auto", "cpu", **SMALL)
    assert c.name == "float32" and c.dtype == torch.float32 and "0.80x fp32, below" in c.reason
    assert "float32" in c.describe("training")
    with c.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_is_chosen_where_it_measured_faster(cache, monkeypatch):
    _cached(3.6)
    _no_measuring(monkeypatch)
    c = precision.resolve("auto", "cpu", **SMALL)
    assert c.name == "bfloat16" and "3.6x fp32" in c.reason
    assert c.describe("teacher forcing").startswith("[teacher forcing: bfloat16 autocast, ")
    with c.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_damaged_cache_entry_is_measured_again(cache):
    path, _ = precision.cache_path(precision.gemm_shapes(**SMALL))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    c = precision.resolve("auto", "cpu", **SMALL)
    assert c.speedup is not None and json.loads(path.read_text())["speedup"] == c.speedup


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_the_environment_forces_either_path(cache, monkeypatch, forced):
    _cached(0.8 if forced == "bfloat16" else 5.0)  # the measurement would say the opposite
    monkeypatch.setenv(precision.ENV, forced)
    for setting in ("auto", "float32", "bfloat16"):
        c = precision.resolve(setting, "cpu", **SMALL)
        assert c.name == forced and precision.ENV in c.reason


def test_bad_settings_are_one_line_errors(cache, monkeypatch):
    with pytest.raises(KoalaError, match="compute_dtype 'fp8' is not one of auto, float32, bfloat16"):
        precision.resolve("fp8", "cpu", **SMALL)
    monkeypatch.setenv(precision.ENV, "half")
    with pytest.raises(KoalaError, match=f"{precision.ENV}='half' is not one of"):
        precision.resolve("auto", "cpu", **SMALL)


def test_a_model_stored_in_bf16_is_not_autocast(cache):
    m = tiny_llama(layers=1, vocab=64, hidden=32).to(torch.bfloat16)
    c = precision.for_model("auto", m)
    assert c.name == "bfloat16" and not c.autocast_on and "stored in bfloat16" in c.reason
    with c.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_the_config_and_cli_take_the_setting():
    from koala.config import load_config

    assert load_config("smoke").compute_dtype == "auto"
    assert load_config("smoke", overrides=["compute_dtype=float32"]).compute_dtype == "float32"
    with pytest.raises(KoalaError, match="compute_dtype"):
        load_config("smoke", overrides=["compute_dtype=int8"])
