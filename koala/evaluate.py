"""Measure a drafter: τ, acceptance by draft position, Spec-Bench speed-up, and losslessness, per prompt and category.

Speed-up follows Spec-Bench: the mean over prompts of new tokens / wall time with speculation, divided by the same
for autoregressive decoding of the target in the same engine (same cache, dtype and device). Warm-up generations are
run first and excluded. With greedy decoding every prompt's output is compared token for token with the target's own.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Callable

import torch

from koala.config import EvalConfig
from koala.data import prompts as P
from koala.errors import KoalaError
from koala.interrupt import check, fault
from koala.engine.calibrate import (GAMMA_MAX, acceptance_by_position, choose_from_probes, choose_tree, cost_curve,
                                    drafter_parameter_ratio, memory_bound_speedup, parse_draft, round_overhead_ms,
                                    tree_probe_budget)
from koala.engine.compile import compile_seconds
from koala.engine.drafters import Drafter, LookupFirstDrafter, ModelDrafter, PromptLookupDrafter
from koala.engine.session import Session
from koala.engine.tree import TreeBudget
from koala.promotion import speedup_interval
from koala.render import write_report
from koala.report import CategoryStats, Difference, EvalReport, Lossless, PromptRow, TokensPerS
from koala.targets import encode_chat
from koala.threads import cpu_model

ProgressFn = Callable[[int, int, dict], None]


HELDOUT_MAX_CHARS = 2000  # sharegpt-heldout's prompts, at most (about 500 tokens)


def load_bench(bench: str, limit: int | None) -> list[P.PromptRecord]:
    """mtbench, humaneval, sharegpt-heldout (ShareGPT's held-out split, never trained on), or a JSONL/Parquet/CSV
    of {prompt, category}; a limit takes categories in turn."""
    if bench == "sharegpt-heldout":  # chat prompts; a long paste would measure prefill rather than decoding
        return [r for r in P.load(bench) if len(r.messages[-1]["content"]) <= HELDOUT_MAX_CHARS][:limit]
    if bench in P.BENCHES:
        return interleave_categories(P.load(bench), limit)
    return P.load(bench, limit=limit, prompt_col="prompt", category_col="category")


def interleave_categories(records: list[P.PromptRecord], limit: int | None) -> list[P.PromptRecord]:
    """Round-robin over categories, so `--limit 8` on MT-bench gives one question of each of its 8 categories."""
    by: dict[str, list] = defaultdict(list)
    for r in records:
        by[r.category].append(r)
    out = [r for group in itertools.zip_longest(*by.values()) for r in group if r is not None]
    return out[:limit] if limit else out


def _hf_generate(session: Session, ids: list[int], cfg: EvalConfig, assistant=None, lookup: int = 0,
                 gamma: int = 4) -> tuple[int, float]:
    model = session.target.model
    x = torch.tensor([ids], device=model.device)
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0, pad_token_id=session.target.tokenizer.pad_token_id,
              eos_token_id=sorted(session.eos_ids))
    if cfg.temperature > 0:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p)
    if assistant is not None:
        kw.update(assistant_model=assistant, num_assistant_tokens=gamma,
                  num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    if lookup:
        kw.update(prompt_lookup_num_tokens=gamma)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
    return out.shape[1] - x.shape[1], time.perf_counter() - t


NEAR_TIE = 1e-2  # a compiled engine's widths round differently (~1e-3): a flip between logits this close is not a bug
NEAR_TIE_ULPS = 4  # in bf16/fp16 a verify of many tokens and a step of one round apart by a few units in the last place


def near_tie_tolerance(dtype: str, logit: float, compiled: bool) -> float:
    """The largest logit margin at which two greedy runs may pick different tokens without a bug.

    Eager float32 must be bit-exact: 0. Compiled float32: NEAR_TIE (inductor's kernels for different widths round
    differently). bf16/fp16: NEAR_TIE_ULPS units in the last place of the logit in that dtype (a bf16 logit near 20
    is only resolved to 0.125), since a forward of several tokens and one of a single token accumulate differently.
    """
    if dtype in ("bfloat16", "float16"):
        eps = torch.finfo(getattr(torch, dtype)).eps
        return NEAR_TIE_ULPS * eps * 2.0 ** math.floor(math.log2(max(abs(logit), 1e-30)))
    return NEAR_TIE if compiled else 0.0


KERNEL_WIDTHS = (1, 2, 4, 8)  # the last token fed alone, or with the tokens before it, as a round's verify feeds it


def first_difference(session: Session, prompt: list[int], ar: list[int], sp: list[int]) -> Difference | None:
    """Where two greedy outputs first differ, and the target's logit margin there between the two tokens.

    Kernels for different widths round differently (compiled, or in bf16/fp16), so the speculative run (its verify
    forwards several tokens) and the plain run (one at a time) may pick different argmaxes where two logits nearly
    tie; in eager float32 they may not differ at all. A difference counts as a near-tie of rounding when the target's
    own steps over the same prefix disagree about it (`kernel_margins`: the margin when the last token is fed alone
    or with 1, 3, 7 tokens before it, as the engine runs them; margins of both signs mean the target itself picks
    either token there), or when the margin of an eager forward is within `near_tie_tolerance`. Anything else is a
    bug.
    """
    i = next((j for j, (a, b) in enumerate(zip(ar, sp)) if a != b), None)
    if i is None:
        return None if len(ar) == len(sp) else Difference(index=min(len(ar), len(sp)), reason="lengths differ")
    eng = session.engine
    ids = torch.tensor([prompt + ar[:i]], device=eng.device)
    L = ids.shape[1]
    eng.setup_caches(L + 1)
    with torch.no_grad():
        logits = eng.step(ids, torch.arange(L, device=eng.device), L, eager=True)[0][0, -1]
    margin = float((logits[ar[i]] - logits[sp[i]]).abs())
    top = max(abs(float(logits[ar[i]])), abs(float(logits[sp[i]])))
    tol = near_tie_tolerance(session.target.info.dtype, top, session.compiled)
    kernels = kernel_margins(session, ids, ar[i], sp[i]) if tol > 0 else []
    flips = any(m > 0 for m in kernels) and any(m < 0 for m in kernels)
    return Difference(index=i, ar_token=ar[i], spec_token=sp[i], margin=margin, tolerance=tol,
                      near_tie=tol > 0 and (margin <= tol or flips), kernel_margins=kernels)


@torch.no_grad()
def kernel_margins(session: Session, ids: torch.Tensor, a: int, b: int) -> list[float]:
    """logit[a] - logit[b] at the last position of `ids` (1, L), the last token fed with the w - 1 before it for each
    width w of KERNEL_WIDTHS (the rest of the prefix prefilled first), through the engine's own steps."""
    eng, L, out = session.engine, ids.shape[1], []
    for w in (w for w in KERNEL_WIDTHS if w < L):
        dev = ids.device
        eng.step(ids[:, :L - w], torch.arange(L - w, device=dev), L - w, eager=True)
        logits = eng.step(ids[:, L - w:], torch.arange(L - w, L, device=dev), L)[0][0, -1].float()
        out.append(float(logits[a] - logits[b]))
    return out


def hf_assistant(drafter: Drafter):
    """A Hugging Face model equivalent to the drafter, for `generate(assistant_model=...)`, or None."""
    if isinstance(drafter, LookupFirstDrafter):
        drafter = drafter.drafter  # HF has no lookup-then-model mode: compare with the drafter alone
    if not isinstance(drafter, ModelDrafter):
        return None
    import copy

    full = drafter.model.hf_model[0]
    n = drafter.model.args.n_layers
    if n == full.config.num_hidden_layers:
        return full
    # truncate:N: a shallow HF copy whose layer list is the first N layers (weights shared, not copied)
    small = copy.copy(full)
    small.model = copy.copy(full.model)
    small.model.layers = torch.nn.ModuleList(full.model.layers[:n])
    small.config = copy.deepcopy(full.config)
    small.config.num_hidden_layers = n
    small.model.config = small.config
    return small


def evaluate(session: Session, drafter_spec: str, cfg: EvalConfig, out_dir: str | Path | None = None,
             progress: ProgressFn | None = None, stage: Callable[[str], None] | None = None) -> EvalReport:
    """Run the benchmark with and without the drafter and write report.json, report.md and plots into out_dir.

    Steps: load the drafter and prompts and size every cache once; warm up (compiling, when compiled) and choose
    gamma; measure each prompt with and without the drafter; summarise. `stage` hears each step's name, `progress`
    each prompt's row as it is measured.
    """
    stage = stage or (lambda _: None)
    drafter, prompts, gmax = _prepare(session, drafter_spec, cfg)
    compile_s0 = compile_seconds()
    cal = _warm_up_and_choose_gamma(session, drafter, prompts, cfg, gmax, stage)
    gamma, tree = cal["gamma"], cal["tree"]
    stage(f"eval ({'tree ' + str(tree) if tree else f'gamma {gamma}'})")
    rows, accept_total, all_rounds = [], [0] * (gamma + 1), []
    assistant = hf_assistant(drafter) if cfg.hf_baselines else None
    for i, (rec, ids) in enumerate(prompts):
        check()  # SIGINT/SIGTERM: stop between prompts
        fault("eval.prompt")
        row, sp = _measure_prompt(session, drafter, cfg, gamma, i, rec, ids, assistant, tree)
        accept_total = [a + b for a, b in itertools.zip_longest(accept_total, sp.accept_counts, fillvalue=0)]
        all_rounds += sp.rounds
        rows.append(row)
        if progress:
            progress(i + 1, len(prompts), row)

    choice = cal["choice"]
    report = _summarise(session, drafter, cfg, rows, all_rounds, cal)
    report.accept_counts = report.accepted_path_histogram = accept_total
    report.speedup_ci95 = speedup_interval(report)
    report.gamma_choice = choice or {"auto": False, "chosen": str(tree) if tree else gamma}
    report.compile_s = compile_seconds() - compile_s0
    if choice:
        choice["measured_speedup"] = report.speedup
        choice["measured_tokens_per_round"] = sum(k + 1 for _, k in all_rounds) / max(len(all_rounds), 1)
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def _prepare(session: Session, drafter_spec: str, cfg: EvalConfig):
    """The drafter (lookup in front if asked), the templated prompts, gamma's ceiling; caches sized once for all.

    One cache size for the whole run, target and drafter: a compiled engine then compiles each graph once, never
    inside a timed run.
    """
    session.builds(cfg.second_build)
    drafter = session.drafter(drafter_spec)
    if cfg.lookup and not isinstance(drafter, (PromptLookupDrafter, LookupFirstDrafter)):
        drafter = LookupFirstDrafter(drafter)
    prompts = _templated(session, cfg)
    gmax = min(GAMMA_MAX, getattr(drafter, "max_gamma", None) or GAMMA_MAX)  # Medusa: at most one per head
    room = _room(cfg, getattr(drafter, "max_gamma", None))
    longest = max(len(ids) for _, ids in prompts) + cfg.max_new_tokens + room
    session.reserve(longest)
    # the drafter's caches as large as the target's, which may already be sized for a longer benchmark of the run
    # (`warm_target`): its compiled steps are then built once for every benchmark too
    drafter.reset(max(longest, session.engine.max_seq_len))
    return drafter, prompts, gmax


def _templated(session: Session, cfg: EvalConfig) -> list[tuple[P.PromptRecord, list[int]]]:
    """The benchmark's prompts, each with its token ids in the target's chat template; an empty one is an error."""
    tok = session.target.tokenizer
    prompts = [(r, encode_chat(tok, list(r.messages))) for r in load_bench(cfg.bench, cfg.limit)]
    if not prompts:
        raise KoalaError(f"benchmark {cfg.bench!r} has no prompts: give a benchmark, or a file, with at least one")
    return prompts


def _room(cfg: EvalConfig, max_gamma: int | None) -> int:
    """The cache slots past an answer's last token that drafts may take (the probed tree's, the configured shape's),
    and the two `generate` adds past a tree's nodes (`koala.engine.decode._start`)."""
    probe, fixed = tree_probe_budget(max_gamma), _fixed(cfg)
    return 2 + max(min(GAMMA_MAX, max_gamma or GAMMA_MAX), probe.nodes, probe.drafter_slots,
                   fixed if isinstance(fixed, int) else 0,
                   max(fixed.nodes, fixed.drafter_slots) if isinstance(fixed, TreeBudget) else 0)


WARM_PROMPTS = 2  # prompts `warm_target` times the target's plain decoding on
WARM_TOKENS = 32  # new tokens each


def warm_target(session: Session, cfgs: list[EvalConfig]) -> dict:
    """Get the target ready for evaluations on `cfgs`' benchmarks, before they run: its caches sized for the longest
    of their prompts (as each evaluation sizes them, drafts' room included, so they all run the same compiled step),
    its compiled steps built or loaded. Returns its plain decoding's seconds per new token and a prefill's mean
    seconds, measured after a warm run on the first benchmark's first prompts, and each benchmark's prompt count:
    {"token_s", "prefill_s", "prompts"}."""
    benches = [[ids for _, ids in _templated(session, c)] for c in cfgs]
    session.reserve(max(len(ids) + c.max_new_tokens + _room(c, None) for c, b in zip(cfgs, benches) for ids in b))
    session.builds(cfgs[0].second_build)
    first = benches[0][:WARM_PROMPTS]
    _run(session, cfgs[0], first[0], None, 1, max_new_tokens=WARM_TOKENS)  # builds (or loads) the step
    runs = [_run(session, cfgs[0], ids, None, 1, max_new_tokens=WARM_TOKENS) for ids in first]
    tokens, prefill = sum(len(r.tokens) - 1 for r in runs), sum(r.prefill_s for r in runs)
    wall = sum(r.wall_s for r in runs)
    return {"token_s": (wall - prefill) / tokens if tokens > 0 else wall / len(runs),  # an answer of one token: all
            "prefill_s": prefill / len(runs), "prompts": [len(b) for b in benches]}


def evaluation_work(cfg: EvalConfig, prompts: int, autoregressive: bool = True,
                    compiled: bool = True) -> tuple[int, int]:
    """(generations, tokens): about how many generations an evaluation of `prompts` prompts runs and how many tokens
    they decode at most, as `evaluate` runs them: each prompt's answer with the drafter and, unless its baseline is
    shared with an earlier evaluation in the process, without; the warm-up pairs and the plain run after them; the
    chain probes; for a shape chosen by measurement, greedy: the probed tree's warm-up, its probes and the chosen
    shape's warm-up, sampled: the chosen width's warm-up (`_warm_up_and_choose_gamma`)."""
    mnt, probes = cfg.max_new_tokens, min(PROBE_PROMPTS, prompts)
    probe_tokens = probes * min(PROBE_TOKENS, mnt)
    answers = prompts * (2 if autoregressive else 1)
    warm = 2 * max(cfg.warmup, 1 if compiled else 0) + 1
    runs, tokens = answers + warm + probes, (answers + warm) * mnt + probe_tokens
    if cfg.gamma == "auto" and cfg.temperature == 0:
        runs, tokens = runs + 2 + probes, tokens + 2 * mnt + probe_tokens
    elif cfg.gamma == "auto":
        runs, tokens = runs + 1, tokens + mnt
    return runs, tokens


def _fixed(cfg: EvalConfig) -> "int | TreeBudget | None":
    """The configured draft: a chain's gamma, a tree, or None for auto."""
    return None if cfg.gamma == "auto" else parse_draft(cfg.gamma)


def _run(session: Session, cfg: EvalConfig, ids, drafter, gamma: int, profile: bool = False,
         tree: TreeBudget | None = None, max_new_tokens: int | None = None):
    return session.run(ids, max_new_tokens or cfg.max_new_tokens, drafter=drafter, gamma=gamma,
                       temperature=cfg.temperature, top_p=cfg.top_p, profile=profile,
                       threshold=cfg.threshold if drafter is not None else None,
                       tree=tree if drafter is not None else None)


PROBE_PROMPTS = 6  # prompts the draft shape is measured on: one repetitive prompt's long lookup rounds must not set it
PROBE_TOKENS = 64  # new tokens per probe (at most the evaluation's)


def _probes(session, cfg: EvalConfig, prompts, drafter, gamma: int,
            tree: TreeBudget | None = None) -> tuple[list, list[int]]:
    """Profiled runs on the first PROBE_PROMPTS prompts, PROBE_TOKENS new tokens each. A run during which a step was
    built (a wide step's first use, its builds timed) is run again: its times would price the compilation. Returns
    the runs and the [rounds, tokens] prompt lookup drafted in them (a `LookupFirstDrafter`'s; else zeros), so that
    the drafter's own step is priced over its own drafts."""
    out, looked = [], [0, 0]
    matched = getattr(drafter, "matched", None)
    for _, ids in prompts[:PROBE_PROMPTS]:
        for _ in range(2):
            before, m0 = compile_seconds(), list(matched or (0, 0))
            r = _run(session, cfg, ids, drafter, gamma, profile=True, tree=tree,
                     max_new_tokens=min(PROBE_TOKENS, cfg.max_new_tokens))
            if compile_seconds() == before:
                break
        out.append(r)
        looked = [a + b - c for a, b, c in zip(looked, matched or (0, 0), m0)]
    return out, looked


def _warm_up_and_choose_gamma(session, drafter, prompts, cfg: EvalConfig, gmax: int, stage) -> dict:
    """Untimed warm-up (compiling, when compiled) and the profiled probes: the drafter's step cost, the cost ratio c
    and, for gamma auto, the draft shape chosen from them: greedy, a chain or a tree (`choose_tree`, from probes of
    the widest tree); sampling, a chain (`choose_from_probes`, from the acceptance by position at the longest)."""
    t0 = time.perf_counter()
    fixed = _fixed(cfg)
    tree = fixed if isinstance(fixed, TreeBudget) else None
    lookup_first = isinstance(drafter, LookupFirstDrafter)
    if lookup_first:  # a match fills the shape's verify slots until `auto` measures its own length
        drafter.lookup_len = None
    gamma = tree.depth if tree else fixed or gmax
    stage("warm-up" + (" and compilation (once per process)" if session.compiled else ""))
    for _ in range(max(cfg.warmup, 1 if session.compiled else 0)):  # compiled: at least one, to compile
        _run(session, cfg, prompts[0][1], None, gamma)
        _run(session, cfg, prompts[0][1], drafter, gamma, tree=tree)
    plain = _run(session, cfg, prompts[0][1], None, gamma)  # the plain decode warm, before the profiled probes
    # per decoded token, the loop included and the prefill not, as the rounds it is compared with are costed
    plain_ms = 1e3 * (plain.wall_s - plain.prefill_s) / max(len(plain.tokens) - 1, 1)
    chain_gamma = gamma if tree is None else gmax
    probes, looked = _probes(session, cfg, prompts, drafter, chain_gamma)
    rounds = [r for p in probes for r in p.rounds]
    drafter_step_s = sum(p.draft_s for p in probes) / max(sum(m for m, _ in rounds) - looked[1], 1)
    choice, curve = None, None
    if cfg.gamma == "auto" and cfg.temperature == 0:
        probe = tree_probe_budget(getattr(drafter, "max_gamma", None))
        stage(f"draft shape auto: probes of a {probe} tree, the target's cost by width up to {probe.nodes + 1}")
        _run(session, cfg, prompts[0][1], drafter, probe.depth, tree=probe)  # warm (compiles the drafter's tree step)
        tprobes, tlooked = _probes(session, cfg, prompts, drafter, probe.depth, tree=probe)
        trounds = [r for p in tprobes for r in p.rounds]
        level_ms = 1e3 * sum(p.draft_s for p in tprobes) / max(len(trounds) - tlooked[0], 1) / probe.depth
        curve = cost_curve(session, max_width=probe.nodes + 1)
        round_ms, chain_round_ms = round_overhead_ms(tprobes), round_overhead_ms(probes)  # a tree's path moves
        choice = choose_tree(curve["ms"], {1: drafter_step_s * 1e3, **{k: level_ms for k in range(2, probe.topk + 1)}},
                             [r for p in tprobes for r in p.ranks], [k for _, k in trounds], probe.depth,
                             probe.topk, round_ms=round_ms, plain_ms=plain_ms, chain_round_ms=chain_round_ms,
                             lookup_apart=lookup_first)
        choice["curve_cached"] = curve.get("cached")
        if lookup_first:
            drafter.lookup_len = choice.get("lookup_len")
        tree = None if choice["topk"] == 1 else TreeBudget(choice["depth"], choice["topk"],
                                                            choice["depth"] * choice["topk"])
        gamma = choice["depth"]
        _run(session, cfg, prompts[0][1], drafter, gamma, tree=tree)  # warm the chosen shape
    elif cfg.gamma == "auto":
        stage("gamma auto: the target's cost by width")
        curve = cost_curve(session)
        choice = choose_from_probes(curve, rounds, drafter_step_s, gmax)
        gamma = choice["chosen"]
        _run(session, cfg, prompts[0][1], drafter, gamma)  # warm the chosen width
    # one decode step, measured apart (no prefill in it): from the curve measured for the choice, if there is one
    target_step_s = (curve or cost_curve(session))["ms"][1] / 1e3
    return {"gamma": gamma, "tree": tree, "choice": choice, "target_step_s": target_step_s,
            "drafter_step_s": drafter_step_s, "c": drafter_step_s / target_step_s,
            "setup_s": time.perf_counter() - t0}


def _measure_prompt(session, drafter, cfg: EvalConfig, gamma: int, i: int, rec, ids, assistant, tree=None):
    """One prompt, autoregressive then speculative (same seed), optionally HF generate: its report row."""
    ar = _autoregressive(session, cfg, ids, i)
    torch.manual_seed(i)
    sp = _run(session, cfg, ids, drafter, gamma, tree=tree)
    greedy = cfg.temperature == 0
    row = PromptRow(
        id=rec.id, category=rec.category, prompt_tokens=len(ids), new_tokens=len(sp.tokens), wall_s=sp.wall_s,
        target_forwards=sp.target_forwards, tau=sp.tau, tokens_per_s=len(sp.tokens) / sp.wall_s,
        ar_new_tokens=len(ar.tokens), ar_wall_s=ar.wall_s, ar_tokens_per_s=len(ar.tokens) / ar.wall_s,
        prefill_s=sp.prefill_s, ar_prefill_s=ar.prefill_s,
        identical=sp.tokens == ar.tokens if greedy else None,
        first_difference=first_difference(session, ids, ar.tokens, sp.tokens) if greedy else None,
        accept_counts=sp.accept_counts)
    if cfg.hf_baselines:
        n, w = _hf_generate(session, ids, cfg)
        row.hf_generate = n / w
        if assistant is not None or isinstance(drafter, PromptLookupDrafter):
            n, w = _hf_generate(session, ids, cfg, assistant, lookup=isinstance(drafter, PromptLookupDrafter),
                                gamma=gamma)
            row.hf_assisted = n / w
    return row, sp


BASELINE_KEYS = ("bench", "limit", "max_new_tokens", "temperature", "top_p")  # what `_autoregressive`'s runs depend on


def shares_baseline(a: EvalConfig, b: EvalConfig) -> bool:
    """Whether evaluations `a` and `b`, in one process, time the same autoregressive runs (`_autoregressive`: the
    same prompts, in the same order, with the same settings), so the later one decodes only with its drafter."""
    return all(getattr(a, k) == getattr(b, k) for k in BASELINE_KEYS)


def _autoregressive(session, cfg: EvalConfig, ids: list[int], i: int):
    """The target alone on one prompt, measured once per session: every drafter evaluated in the same process (the
    pipeline's candidate, without lookup, the champion re-measured) pairs its timings with the same autoregressive
    run, so each costs only its speculative decoding. The key holds everything the run depends on (the seed too)."""
    key = (tuple(ids), cfg.max_new_tokens, cfg.temperature, cfg.top_p, i)
    cache = session.autoregressive
    if key not in cache:
        torch.manual_seed(i)
        cache[key] = _run(session, cfg, ids, None, 1)
    return cache[key]


def _summarise(session, drafter, cfg: EvalConfig, rows: list[PromptRow], rounds: list, cal: dict) -> EvalReport:
    """The report from every prompt's row: means over prompts (Spec-Bench), τ over all, per category."""
    info = session.target.info
    spec_tps, ar_tps = mean(r.tokens_per_s for r in rows), mean(r.ar_tokens_per_s for r in rows)
    tau = sum(r.new_tokens for r in rows) / sum(r.target_forwards for r in rows)
    by: dict[str, list[PromptRow]] = defaultdict(list)
    for r in rows:
        by[r.category].append(r)
    per_cat = {cat: CategoryStats(prompts=len(rs), tau=sum(r.new_tokens for r in rs) / sum(r.target_forwards for r in rs),
                                  speedup=mean(r.tokens_per_s for r in rs) / mean(r.ar_tokens_per_s for r in rs),
                                  tokens_per_s=mean(r.tokens_per_s for r in rs))
               for cat, rs in sorted(by.items())}
    diffs = [r.first_difference.model_copy(update={"id": r.id}) for r in rows if r.first_difference]
    hf = [r.hf_generate for r in rows if r.hf_generate is not None]
    assisted = [r.hf_assisted for r in rows if r.hf_assisted is not None]
    return EvalReport(
        target=info.name, target_hash=info.content_hash, drafter=drafter.name,
        device=info.device if info.device != "cpu" else f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)",
        dtype=info.dtype, weights=session.weights, gemm=_gemm_name(session), mode=session.mode, gamma=cal["gamma"],
        tree=None if cal["tree"] is None else str(cal["tree"]),
        temperature=cfg.temperature, top_p=cfg.top_p, bench=cfg.bench,
        prompts=len(rows), max_new_tokens=cfg.max_new_tokens, tau=tau, speedup=spec_tps / ar_tps,
        **_speedup_models(session, drafter, tau, rounds, cal["c"]),
        target_step_ms=cal["target_step_s"] * 1e3, drafter_step_ms=cal["drafter_step_s"] * 1e3,
        tokens_per_s=TokensPerS(speculative=spec_tps, autoregressive=ar_tps, hf_generate=mean(hf) if hf else None,
                                hf_assisted=mean(assisted) if assisted else None),
        lossless=Lossless(identical=sum(bool(r.identical) for r in rows), total=sum(r.identical is not None for r in rows),
                          checked=cfg.temperature == 0, near_ties=[d for d in diffs if d.near_tie],
                          differences=[d for d in diffs if not d.near_tie]),
        acceptance_by_position=acceptance_by_position(rounds, cal["gamma"]), threshold=cfg.threshold,
        mean_draft_length=sum(m for m, _ in rounds) / max(len(rounds), 1), per_category=per_cat, per_prompt=rows,
        setup_s=cal["setup_s"])  # warm-up, compilation and calibration: never part of a speed-up


def _gemm_name(session) -> str:
    from koala.engine.gemm import packed

    return "koala" if packed(session.engine) else "torch"


def _speedup_models(session, drafter, tau: float, rounds: list, c_time: float) -> dict:
    """MBSU with the parameter ratio and the mean draft length used; the same model with the measured latency
    ratio under its own name."""
    m = sum(drafted for drafted, _ in rounds) / max(len(rounds), 1)
    c = drafter_parameter_ratio(drafter, session.engine)
    return {"memory_bound_speedup": memory_bound_speedup(tau, m, c), "drafter_parameter_ratio": c,
            "latency_model_speedup": memory_bound_speedup(tau, m, c_time), "drafter_cost_ratio": c_time}
