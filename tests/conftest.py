"""Shared fixtures: tiny random Llama models for unit tests, the real default target once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The same arithmetic on every CI machine (AMX or not): tests that exercise bf16 autocast ask for it themselves.
os.environ.setdefault("KOALA_COMPUTE_DTYPE", "float32")
# Under pytest-xdist (`make test` runs one worker per core) each worker and every process it starts gets its share of
# the cores: OpenMP threads spinning on cores another worker uses slow both by an order of magnitude.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ.setdefault("KOALA_THREADS", _share)
    os.environ.setdefault("OMP_NUM_THREADS", _share)

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["KOALA_THREADS"]))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(layers: int = 2, vocab: int = 64, hidden: int = 32, seed: int = 0, init_std: float = 0.3,
               heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """A tiny random Llama whose greedy output varies (a large init spread avoids one repeated token)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      initializer_range=init_std, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny():
    return tiny_llama


@pytest.fixture(scope="session")
def default_target():
    """The real default target (SmolLM2-135M-Instruct from its GGUF), loaded once per test session."""
    from koala.targets import load_target

    return load_target("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def default_session(default_target):
    from koala.engine.model import Transformer
    from koala.engine.session import Session

    return Session(default_target, Transformer(default_target.model))
