"""A `--format gguf` drafter drafting for llama-cpp-python: speculative decoding inside llama.cpp, no torch.

    from llama_cpp import Llama
    from koala.export.llamacpp_draft import GGUFDraftModel

    draft = GGUFDraftModel("export/gguf/drafter.gguf", num_pred_tokens=4)
    llm = Llama(model_path="target.gguf", draft_model=draft)
    llm.create_chat_completion(messages, temperature=0.0)

llama-cpp-python verifies whatever a `LlamaDraftModel` proposes with the target in one batch and keeps the target's
own choice at every position, so the output is the target's whatever the drafter drafts. This class runs the
exported drafter as a second `Llama` and drafts greedily: `num_pred_tokens` tokens per round, its KV cache kept
across rounds (only the tokens the target accepted since the last round are evaluated, after rolling back the
drafts it rejected). It imports only numpy and llama_cpp, so it runs in llama.cpp's own environment: install koala
there with `pip install --no-deps koala`, or copy this file.

The `llama-server -m TARGET.gguf -md drafter.gguf` route (llama.cpp's C++ speculative decoding) reads the same file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaDraftModel


class GGUFDraftModel(LlamaDraftModel):
    """Greedy drafts of `num_pred_tokens` tokens from a GGUF drafter with the target's vocabulary.

    Args:
        model_path: the drafter's GGUF (`koala export DRAFTER --format gguf`).
        num_pred_tokens: tokens drafted per round (the target verifies them plus one of its own in one batch).
        n_ctx: the drafter's context: at least the target's.
        n_threads: llama.cpp's threads for the drafter (None: llama.cpp's default).
    """

    def __init__(self, model_path: str, num_pred_tokens: int = 4, n_ctx: int = 2048, n_threads: int | None = None,
                 **llama_kwargs: Any):
        if num_pred_tokens < 1:
            raise ValueError(f"num_pred_tokens must be at least 1, got {num_pred_tokens}")
        self.num_pred_tokens = num_pred_tokens
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                         verbose=False, **llama_kwargs)
        self._vocab = self.llm.n_vocab()

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.intc)
        llm = self.llm
        if len(ids) + self.num_pred_tokens > llm.n_ctx():
            return np.array([], dtype=np.intc)  # no room left: the target decodes alone
        # the longest prefix the drafter has already evaluated; at least the last token is evaluated again, for its
        # logits
        have = llm.input_ids[:llm.n_tokens]
        n = min(len(have), len(ids) - 1)
        same = np.flatnonzero(have[:n] != ids[:n])
        keep = int(same[0]) if same.size else n
        llm.n_tokens = keep  # Llama.eval drops every cached slot from n_tokens on before it writes
        llm.eval(ids[keep:].tolist())
        out = []
        for i in range(self.num_pred_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(self._vocab,))
            out.append(int(np.argmax(logits)))
            if i + 1 < self.num_pred_tokens:
                llm.eval(out[-1:])
        return np.array(out, dtype=np.intc)
