"""A loaded target ready to decode: what `koala generate` and the evaluation use."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from koala.engine.decode import GenerationResult, generate
from koala.engine.drafters import Drafter, drafter_models
from koala.engine.drafter_spec import load_drafter
from koala.engine.model import Transformer
from koala.engine.sampling import SamplingParams
from koala.targets import Target, encode_chat, load_target

GREEN, YELLOW, RESET = "\033[32m", "\033[33m", "\033[0m"


class TextStream:
    """Detokenise incrementally (decode the whole answer, print what is new) so multi-byte characters come out whole."""

    def __init__(self, tokenizer, color: bool, out=None):
        self.tok, self.color, self.out = tokenizer, color, out or sys.stdout  # looked up now: it may be redirected
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new: list[int], n_accepted: int) -> None:
        pieces = [(new[:n_accepted], GREEN), (new[n_accepted:], YELLOW if self.color and n_accepted < len(new) else "")]
        for ids, colour in pieces:
            if not ids:
                continue
            self.ids += ids
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half a character: wait for the rest
            delta, self.printed = text[len(self.printed):], text
            self.out.write(f"{colour}{delta}{RESET}" if self.color and colour else delta)
        self.out.flush()


@dataclass
class Session:
    target: Target
    engine: Transformer
    # the target alone per prompt and generation settings, measured once and shared by every drafter evaluated
    autoregressive: dict = field(default_factory=dict, repr=False)
    # a wide step built a second time without autotuning where autotuning fits wide widths poorly (minutes each on
    # a small CPU, once per machine); False: one build each, for the target's steps and every drafter's
    second_build: bool = True
    # inductor's mode for every compiled step (None: koala.engine.compile.default_mode; UNTUNED: without autotuning)
    compile_mode: str | None = None
    # koala's decode GEMM for a compiled target on a CPU: auto (where it measures faster), koala or torch
    gemm: str = "auto"

    @classmethod
    def open(cls, spec: str, dtype: str = "float32", device: str = "cpu", compile: bool = False,
             weights: str = "full", autotune: bool = True, gemm: str = "auto") -> "Session":
        """Load a target; with `compile`, its decode steps (and every drafter's) run compiled (koala.engine.compile),
        on a CPU with autotuned GEMMs unless `autotune` is False; `weights` int8: its linear layers quantised to int8
        weight-only, bf16: rounded to bf16 (koala.engine.quantize); `gemm`: see `compile`."""
        from koala.engine.compile import compile_mode
        from koala.engine.quantize import quantize_weights
        from koala.threads import configure_threads

        configure_threads()
        t = load_target(spec, dtype=dtype, device=device)
        quantize_weights(t.model, weights)
        s = cls(t, Transformer(t.model), compile_mode=compile_mode(t.model.device, autotune), gemm=gemm)
        if compile:
            s.compile()
        return s

    @property
    def compiled(self) -> bool:
        return self.engine.compiled is not None

    @property
    def mode(self) -> str:
        return "compile" if self.compiled else "eager"

    def describe(self) -> str:
        """Mode, threads and device in one line: what every command prints before it measures anything."""
        import torch

        from koala.engine.gemm import packed
        from koala.threads import cpu_model

        info = self.target.info
        where = f"CPU {cpu_model()}" if info.device == "cpu" else torch.cuda.get_device_name()
        weights = f", {self.weights} weights" if self.weights != "full" else ""
        weights += ", koala GEMM" if packed(self.engine) else ""
        return f"{self.mode} engine, {info.dtype}{weights}, {where}, {torch.get_num_threads()} threads"

    @property
    def weights(self) -> str:
        """full; bf16 or int8 where the target's linear layers were rounded or quantised (koala.engine.quantize)."""
        from koala.engine.quantize import weights_of

        return weights_of(self.target.model)

    def compile(self) -> None:
        """Compile the target's decode steps; on a CPU with full or bf16 weights, its linear layers first run koala's
        decode GEMM where `gemm` says so (auto: where it measures faster; koala; torch: koala.engine.gemm)."""
        from koala.engine import gemm

        if self.weights != "int8" and self.target.info.device == "cpu":
            gemm.use_for(self.target.model, self.gemm)
            self.engine.lm_head = self.target.model.lm_head  # the engine holds the head itself
        self.engine.compile(self.compile_mode)
        self.builds(self.second_build)

    def builds(self, second: bool) -> None:
        """Whether compiled wide steps, the target's and those of drafters loaded from now on, get a second build
        (koala.engine.compile.AotStep.second_build); a target's wide step resolved under the other setting is
        resolved again at its next call."""
        self.second_build = second
        self._set_builds(self.engine)

    def _set_builds(self, model: Transformer) -> None:
        from koala.engine.compile import AotStep

        if isinstance(model.compiled, AotStep):
            model.compiled.second_build = self.second_build

    def reserve(self, max_len: int) -> None:
        """Size the caches for the longest generation to come, so a compiled run never re-sizes them midway."""
        self.engine.setup_caches(max_len)

    @property
    def eos_ids(self) -> frozenset[int]:
        ids = {self.target.tokenizer.eos_token_id}
        gen = getattr(self.target.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
        return frozenset(i for i in ids if i is not None)

    def drafter(self, spec: str) -> Drafter:
        info = self.target.info
        d = load_drafter(spec, self.engine, dtype=info.dtype, device=info.device)
        if self.compiled:
            from koala.engine import gemm

            for model in drafter_models(d):
                if gemm.packed(self.engine):  # a drafter's own layers run the GEMM its target's steps run, their
                    # weights stored as bf16: half the bytes a draft step reads; a drafter only proposes tokens, so
                    # the output is the target's all the same
                    gemm.pack_linears(model.hf_model[0], torch.bfloat16)
                    model.lm_head = model.hf_model[0].lm_head  # the engine holds the head itself
                model.compile(self.compile_mode)
                self._set_builds(model)
        return d

    def run(self, prompt_ids: list[int], max_new_tokens: int, drafter: Drafter | None = None, gamma: int = 4,
            temperature: float = 0.0, top_p: float = 1.0, stream=None, profile: bool = False,
            threshold: float | None = None, tree=None) -> GenerationResult:
        """One generation; `tree` (a koala.engine.tree.TreeBudget) drafts trees instead of gamma-token chains."""
        return generate(self.engine, prompt_ids, max_new_tokens, drafter=drafter, gamma=gamma,
                        params=SamplingParams(temperature, top_p), eos_ids=self.eos_ids,
                        max_context=self.target.info.max_context, stream=stream, profile=profile,
                        threshold=threshold, tree=tree)

    def chat(self, prompt: str, max_new_tokens: int = 256, drafter: Drafter | None = None, gamma: int = 4,
             temperature: float = 0.0, top_p: float = 1.0, stream: bool = False,
             threshold: float | None = None, tree=None) -> GenerationResult:
        ids = encode_chat(self.target.tokenizer, [{"role": "user", "content": prompt}])
        fn = TextStream(self.target.tokenizer, color=drafter is not None and sys.stdout.isatty()) if stream else None
        return self.run(ids, max_new_tokens, drafter, gamma, temperature, top_p, stream=fn, threshold=threshold,
                        tree=tree)
