"""The draft shape from measurement: the target's forward cost by width, and the drafter's acceptance.

`gamma: auto` chooses the draft (a chain of gamma tokens, or a tree) that maximises expected tokens per second,

    E[tokens per round](g) = 1 + sum_{i<=g} prod_{j<=i} a_j        (a_j: acceptance at draft position j, given j-1)
    time per round(g)      = g * drafter step + target forward of g + 1 tokens

for chains, and for a tree of depth D and top-k k (`choose_tree`) the same rate with the accepted length measured on
probe rounds of the widest tree (where the target's token ranked among the drafter's choices at each depth) and the
target forward of its D * k + 1 nodes; a chain is the tree of top-k 1. So a machine whose wide forwards are cheap (a
compiled step, a GPU) drafts long or wide, and one where every extra verified token costs a step drafts short, in a
chain, or not at all. The cost curve is measured once per target, device, dtype, threads, mode and CPU model and
cached under $KOALA_CACHE/calibration; no constant here is tuned to one machine.
"""

from __future__ import annotations

import time

import torch

from koala.errors import KoalaError

GAMMA_MAX = 5  # the longest draft `auto` considers: forwards of up to 6 tokens are measured
TREE_PROBE = (5, 4)  # the deepest and widest tree `auto` considers (depth, top-k): its probes rank every choice
CURVE_FORMAT = 2  # how `_measure` times a width: a curve measured another way is measured again


def parse_gamma(value: str | int) -> int | None:
    """`auto` -> None (choose by measurement); a positive integer -> itself."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        g = int(value)
        if g < 1:
            raise KoalaError(f"gamma must be >= 1 or auto, got {g}")
        return g
    if str(value).strip().lower() == "auto":
        return None
    raise KoalaError(f"gamma {value!r} is neither a number, a tree nor auto: write --gamma 3, --gamma 4x3x12 or "
                     "--gamma auto")


def parse_draft(value: str | int):
    """`auto` -> None; N -> N (a chain of N drafts); `DEPTHxTOPK[xNODES]` -> a TreeBudget (top-k 1: the chain)."""
    from koala.engine.tree import parse_tree

    if isinstance(value, str) and "x" in value.lower():
        t = parse_tree(value)
        return t.depth if t.is_chain else t
    return parse_gamma(value)


def _key(session, max_width: int) -> dict:
    from koala.precision import cpu_flags
    from koala.threads import configured, cpu_model

    info = session.target.info
    return {"target": info.content_hash, "device": info.device, "dtype": info.dtype, "mode": session.mode,
            "weights": session.weights,  # int8 weights: another model, another cost curve
            "gemm": _gemm(session),  # koala's decode GEMM or torch's: another curve
            "engine": type(session.engine.compiled).__name__,  # ahead of time or in-process compiled steps
            "second_build": getattr(session.engine.compiled, "second_build", None),  # wide widths' build
            "compile_mode": getattr(session.engine.compiled, "mode", None),  # autotuned steps or not
            "engine_source": engine_source(),  # a step's cost changes with the engine's code
            "format": CURVE_FORMAT,
            "threads": configured(), "cpu": cpu_model() if info.device == "cpu" else
            torch.cuda.get_device_name(),
            # one model name covers CPUs with and without a matrix unit (a VM may hide AMX): their curves differ
            "cpu_flags": cpu_flags() if info.device == "cpu" else None,
            "torch": torch.__version__, "max_width": max_width}


def _gemm(session) -> str:
    """Which GEMM the target's steps run: koala's kernel (with its source's digest) or torch's."""
    from koala.engine.gemm import SOURCE, packed
    from koala.io import digest

    return f"koala {digest(SOURCE.read_text())}" if packed(session.engine) else "torch"


def engine_source() -> str:
    """A digest of the code a decode step runs (the model, its cache, how steps are compiled): a cost curve measured
    under other code is measured again, not reused."""
    import importlib
    from pathlib import Path

    from koala.io import digest

    return digest([Path(importlib.import_module(m).__file__).read_text() for m in
                   ("koala.engine.model", "koala.engine.kv_cache", "koala.engine.compile", "koala.engine.quantize",
                    "koala.engine.gemm")])


def _measure(engine, max_width: int, position: int, reps: int) -> dict[int, float]:
    """Median ms of a forward of 1..max_width tokens at `position`.

    Each width is timed in a run of consecutive calls, as decoding calls it: a round's verify follows the last
    round's, with only the drafter's small steps between, and plain decoding repeats the one-token step. Timed in
    turn instead, each width would run right after other widths' packages (each holds its own copy of the weights)
    had filled the cache, and a one-token step would cost more than plain decoding pays for it. Two passes, widths
    ascending then descending, so drift hits every width alike.
    """
    dev = engine.device
    engine.setup_caches(position + max_width + 1)
    steps = {w: (torch.zeros(1, w, dtype=torch.long, device=dev), torch.arange(position, position + w, device=dev))
             for w in range(1, max_width + 1)}
    times: dict[int, list[float]] = {w: [] for w in steps}
    order = list(steps)
    with torch.no_grad():
        for w, (ids, pos) in steps.items():  # compile (when compiled) every width first
            engine.step(ids, pos, position + w)
        for run in (order, order[::-1]):
            for w in run:
                ids, pos = steps[w]
                for i in range(2 + (reps + 1) // 2):  # two untimed calls bring this width's step in, as decoding has
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    engine.step(ids, pos, position + w)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= 2:
                        times[w].append((time.perf_counter() - t) * 1e3)
    return {w: sorted(ts)[len(ts) // 2] for w, ts in times.items()}


def cost_curve(session, max_width: int = GAMMA_MAX + 1, position: int = 256, reps: int = 15,
               refresh: bool = False) -> dict:
    """{"ms": {width: ms}, ...} for this target/device/dtype/threads/mode/CPU, from the cache or measured now."""
    from koala.assets import cache_dir as cache_root
    from koala.io import cached_json, digest

    key = _key(session, max_width)
    path = cache_root() / "calibration" / f"{digest(key)}.json"
    return cached_json(path, lambda: {**key, "position": position,
                                      "ms": _measure(session.engine, max_width, position, reps)},
                       lambda d: {**d, "ms": {int(w): float(v) for w, v in d["ms"].items()}}, refresh)


def expected_tokens(acceptance: list[float], gamma: int) -> float:
    """Tokens per round with `gamma` drafts: the accepted prefix plus the target's own token."""
    total, run = 1.0, 1.0
    for a in acceptance[:gamma]:
        run *= a
        total += run
    return total


def acceptance_by_position(rounds: list[tuple[int, int]], gamma: int) -> list[float]:
    """P(draft i accepted | draft i proposed and drafts 1..i-1 accepted), from (drafted, accepted) per round."""
    rates = []
    for i in range(1, gamma + 1):
        reached = sum(1 for m, k in rounds if m >= i and k >= i - 1)
        rates.append(sum(1 for _, k in rounds if k >= i) / reached if reached else 0.0)
    return rates


def choose_from_probes(curve: dict, rounds: list[tuple[int, int]], drafter_step_s: float, gamma_max: int) -> dict:
    """gamma auto from profiled probe runs at the longest draft: the choice and everything it was made from."""
    acc = acceptance_by_position(rounds, gamma_max)
    gamma, rates = choose_gamma(curve["ms"], drafter_step_s * 1e3, acc, gamma_max=gamma_max)
    return {"auto": True, "chosen": gamma, "cost_by_width_ms": curve["ms"], "curve_cached": curve.get("cached"),
            "probe_acceptance_by_position": acc, "drafter_step_ms": drafter_step_s * 1e3,
            "expected_tokens_per_s": rates, "expected_speedup": rates[gamma] / rates[0]}


def choose_gamma(curve_ms: dict[int, float], drafter_step_ms: float, acceptance: list[float],
                 gamma_max: int | None = None) -> tuple[int, dict[int, float]]:
    """The gamma (1..gamma_max) with the most expected tokens per second, and that rate for every candidate.

    Positions past the measured acceptance reuse the last one measured; 0 rounds are plain steps (gamma 0 in the
    table, for reference: a drafter that cannot beat it is reported, not silently used).
    """
    gmax = min(gamma_max or GAMMA_MAX, max(curve_ms) - 1)
    acc = list(acceptance) or [0.0]
    acc = acc + [acc[-1]] * (gmax - len(acc))
    rate = {0: 1e3 / curve_ms[1]}
    for g in range(1, gmax + 1):
        rate[g] = 1e3 * expected_tokens(acc, g) / (g * drafter_step_ms + curve_ms[g + 1])
    best = max(range(1, gmax + 1), key=lambda g: rate[g])
    return best, rate


def stored_acceptance(drafter) -> tuple[list[float] | None, str]:
    """A drafter's acceptance by position as stored with it (koala.json / heads.json held-out metrics), if any."""
    import json
    from pathlib import Path

    inner = getattr(drafter, "drafter", drafter)
    path = Path(str(getattr(inner, "source", "")))
    for f in ("koala.json", "heads.json"):
        try:
            metrics = json.loads((path / f).read_text()).get("metrics") or {}
        except (OSError, ValueError):
            continue
        a = metrics.get("heldout_greedy_agreement", metrics.get("heldout_expected_acceptance"))
        if a is None:
            continue
        by_pos = [float(a)]  # heads trained as they draft store the acceptance of each later draft too
        while f"heldout_greedy_agreement_pos{len(by_pos) + 1}" in metrics:
            by_pos.append(float(metrics[f"heldout_greedy_agreement_pos{len(by_pos) + 1}"]))
        by_pos += [by_pos[-1]] * (GAMMA_MAX - len(by_pos))
        return by_pos[:GAMMA_MAX], (f"held-out agreement {', '.join(f'{x:.2f}' for x in by_pos[:3])}... by position "
                                    f"from {path / f}")
    return None, "no stored acceptance"


def auto_gamma(session, drafter, prior: float = 0.5) -> tuple[int, str]:
    """gamma for one generation (`koala generate --gamma auto`): the cost curve and the drafter's stored acceptance.

    The evaluation measures acceptance on its first prompts instead (koala.evaluate); here, with nothing measured
    yet, a drafter without stored metrics gets `prior` at every position, said in the returned reason.
    """
    curve = cost_curve(session)
    acc, why = stored_acceptance(drafter)
    if acc is None:
        acc, why = [prior] * GAMMA_MAX, f"no stored acceptance: prior {prior}"
    g, rates = choose_gamma(curve["ms"], drafter_step_ms(session, drafter), acc,
                            gamma_max=getattr(drafter, "max_gamma", None))
    return g, f"{why}; expected {rates[g] / rates[0]:.2f}x over plain steps"


def drafter_step_ms(session, drafter, gamma: int = 3, reps: int = 5) -> float:
    """Measured ms per drafted token (the drafter's own cost; prompt lookup costs next to nothing)."""
    from koala.engine.sampling import SamplingParams

    inner = getattr(drafter, "drafter", drafter)
    dev = session.engine.device
    seq = torch.arange(64, device=dev) % max(session.engine.args.vocab_size - 1, 1) + 1
    params, ts = SamplingParams(), []
    with torch.no_grad():
        for i in range(reps + 1):
            inner.reset(128)
            inner.propose(seq, 32, 1, params)  # catch up on the prefix (not timed)
            t = time.perf_counter()
            toks, _ = inner.propose(seq, 33, gamma, params)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                ts.append((time.perf_counter() - t) * 1e3 / max(int(toks.shape[0]), 1))
    inner.reset(128)
    return sorted(ts)[len(ts) // 2]


def memory_bound_speedup(tau: float, mean_draft_length: float, c: float) -> float:
    """Direct Alignment's memory-bound speed-up (Goel et al. 2024), MBSU = tau / (gamma c + 1): tokens per target
    forward over the cost of a round in target steps, where each of the gamma drafts costs c target steps. gamma is
    the mean draft length actually used (drafting may stop early), c the drafter/target parameter ratio
    (`drafter_parameter_ratio`): in the memory-bound regime a step costs the bytes of the weights it reads."""
    return tau / (mean_draft_length * c + 1)


def step_parameters(model, head_rows: int | None = None) -> int:
    """The parameters one decode step of an engine model reads: its layers, final norm and LM head (`head_rows` rows
    of it for a draft vocabulary); an embedding lookup reads one row, counted as nothing."""
    from koala.engine.gemm import PackedLinear
    from koala.engine.quantize import Int8Linear

    layers = sum(p.numel() for layer in model.layers for p in layer.parameters())
    layers += sum(m.qweight.numel() for layer in model.layers for m in layer.modules() if isinstance(m, Int8Linear))
    layers += sum(m.weight.numel() for layer in model.layers for m in layer.modules() if isinstance(m, PackedLinear))
    rows = model.args.vocab_size if head_rows is None else head_rows
    return layers + model.norm.weight.numel() + rows * model.args.dim


def drafter_parameter_ratio(drafter, target) -> float:
    """c of MBSU: the parameters read to draft one token over those read by one target step (prompt lookup: 0;
    `lookup+X`: X's, an upper bound since lookup drafts cost nothing; Medusa: one head and the LM head per draft)."""
    from koala.engine.drafters import EagleDrafter, LookupFirstDrafter, MedusaDrafter, ModelDrafter

    if isinstance(drafter, LookupFirstDrafter):
        return drafter_parameter_ratio(drafter.drafter, target)
    dv = getattr(drafter, "draft_vocab", None)
    rows = None if dv is None else len(dv.ids)
    if isinstance(drafter, MedusaDrafter):  # one head's residual blocks, then the (draft-vocabulary) LM head
        per_head = sum(p.numel() for p in drafter.heads.heads[0].parameters())
        return (per_head + (rows or target.args.vocab_size) * target.args.dim) / step_parameters(target)
    if isinstance(drafter, EagleDrafter):  # the fuse layer, then the decoder layers and the head
        fuse = sum(p.numel() for p in drafter.head.fc.parameters())
        return (step_parameters(drafter.engine, rows) + fuse) / step_parameters(target)
    if isinstance(drafter, ModelDrafter):
        return step_parameters(drafter.model, rows) / step_parameters(target)
    return 0.0  # prompt lookup reads no weights


def tree_probe_budget(max_depth: int | None = None):
    """The widest tree `auto` measures (every node kept), shallower for drafters with fewer heads (Medusa)."""
    from koala.engine.tree import TreeBudget

    depth, k = TREE_PROBE
    depth = min(depth, max_depth or depth)
    return TreeBudget(depth, k, depth * k)


def path_length(ranks: list[list[int]], accepted: list[int], depth: int, topk: int) -> float:
    """Mean drafts a tree of `depth` x `topk` would have accepted on probe rounds of a wider, deeper tree.

    `ranks[r]`: each accepted node's index among the nodes its depth kept in the probe (best first, 0 the drafter's
    chain; a round that accepted none: its first draft's); `accepted[r]`: the path's length. A node within the first `topk` of its depth at every depth of its path
    is also in the `topk` tree (its candidates are a subset of the probe's), so this is a lower bound of that tree's
    accepted length, up to `depth` nodes; the chain (top-k 1) is exact. A prompt-lookup round (ranks
    `LOOKUP_RANK`) fills every verify slot of the shape with its match, so it holds up to `depth * topk` nodes.
    """
    from koala.engine.tree import LOOKUP_RANK

    total = 0
    for rs, k in zip(ranks, accepted):
        if rs and rs[0] == LOOKUP_RANK:
            total += min(k, depth * topk)
            continue
        n = 0
        while n < min(depth, k) and rs[n] < topk:
            n += 1
        total += n
    return total / max(len(ranks), 1)


def _with_lookup(table: dict, best: str, looked: list[int] | None, drafter_rounds: int, curve_ms: dict[int, float],
                 probe: tuple[int, int], round_ms: float) -> dict:
    """The chosen shape's expected speed-up and tokens per round; with lookup apart (`looked`: the lookup rounds'
    accepted lengths), its length chosen beside the shape's rounds and counted in both, in the proportion the probes
    had them (without a lookup round: the probe's depth; `probe` is its (depth, top-k))."""
    shape = table[best]
    if looked is None:
        return {"expected_speedup": shape["rate"] / table["0x0"]["rate"], "expected_tokens_per_round": shape["tokens"]}
    nd = drafter_rounds
    lookup = choose_lookup_len(curve_ms, looked, round_ms, probe[0] * probe[1],
                               base=(nd * shape["tokens"], nd * shape["ms"]), fallback=min(probe[0], max(curve_ms) - 1))
    nl = lookup["rounds"]
    lk = lookup["lengths"].get(lookup["chosen"], {"tokens": 0.0, "ms": 0.0})
    rate = 1e3 * (nd * shape["tokens"] + nl * lk["tokens"]) / max(nd * shape["ms"] + nl * lk["ms"], 1e-9)
    return {"expected_speedup": rate / table["0x0"]["rate"], "lookup": lookup, "lookup_len": lookup["chosen"],
            "expected_tokens_per_round": (nd * shape["tokens"] + nl * lk["tokens"]) / max(nd + nl, 1)}


def round_overhead_ms(results) -> float:
    """What a speculative round costs beyond its drafting and its verify forward, in ms, from runs profiled with
    `generate(profile=True)`: the loop, acceptance, the drafter catching up on the accepted tokens, moving a tree's
    accepted path into place. Measured rather than modelled: on a CPU it is a sizeable part of a round."""
    rounds = sum(len(r.rounds) for r in results)
    extra = sum(r.wall_s - r.prefill_s - r.draft_s - r.verify_s for r in results)
    return max(0.0, 1e3 * extra / max(rounds, 1))


def choose_lookup_len(curve_ms: dict[int, float], accepted: list[int], round_ms: float, cap: int,
                      base: tuple[float, float] = (0.0, 0.0), fallback: int | None = None) -> dict:
    """How many tokens a prompt-lookup match drafts (`LookupFirstDrafter.lookup_len`), from the probes' lookup
    rounds, each of which drafted up to `cap` tokens where its match had them (greedy: a round of L drafts would
    have accepted min(k, L) of them). A lookup round of L costs its verify forward at width L + 1 and `round_ms`; a
    match needs no drafter step. The length L (1..cap, its verify within the measured curve) with the most expected
    tokens per second over all the probes' rounds is chosen: the lookup rounds at L beside `base`, the expected
    (tokens, ms) of the drafter's rounds in all (none: the lookup rounds alone). Without a lookup round in the
    probes there is nothing to measure: `fallback`, and "fallback" true. Returns {"chosen", "rounds", "lengths":
    {L: {"tokens", "ms", "rate"}}}, each length's tokens per round, ms per round and tokens/s."""
    table = {}
    for n in range(1, min(cap, max(curve_ms) - 1) + 1):
        e = 1 + sum(min(k, n) for k in accepted) / max(len(accepted), 1)
        ms = curve_ms[n + 1] + round_ms
        table[n] = {"tokens": e, "ms": ms, "rate": 1e3 * e / ms}
    if not accepted or not table:
        return {"chosen": fallback, "rounds": 0, "lengths": table, "fallback": True}
    nl, (bt, bm) = len(accepted), base
    best = max(table, key=lambda n: (bt + nl * table[n]["tokens"]) / (bm + nl * table[n]["ms"]))
    return {"chosen": best, "rounds": nl, "lengths": table}


def _split_lookup(ranks: list[list[int]], accepted: list[int]) -> tuple[list, list, list[int]]:
    """The probe rounds apart: (the drafter's ranks, their accepted lengths, the lookup rounds' accepted lengths)."""
    from koala.engine.tree import LOOKUP_RANK

    mine = [(rs, k) for rs, k in zip(ranks, accepted) if not (rs and rs[0] == LOOKUP_RANK)]
    return [rs for rs, _ in mine], [k for _, k in mine], [k for rs, k in zip(ranks, accepted)
                                                          if rs and rs[0] == LOOKUP_RANK]


def choose_tree(curve_ms: dict[int, float], draft_ms_per_depth: dict[int, float], ranks: list[list[int]],
                accepted: list[int], probe_depth: int, probe_topk: int, round_ms: float = 0.0,
                plain_ms: float | None = None, chain_round_ms: float | None = None,
                lookup_apart: bool = False) -> dict:
    """The draft shape (depth, top-k; every node kept) with the most expected tokens per second.

    `draft_ms_per_depth[k]`: the drafter's measured ms per tree level of top-k k (k 1: a chain's draft step).
    `round_ms`: what a speculative round costs beyond its drafting and its verify forward (acceptance, the drafter
    catching up, bookkeeping, moving a tree's accepted path), measured on the tree probes, and `chain_round_ms` the
    same for chains (default: `round_ms`); `plain_ms`: plain decoding's measured ms per token, loop included
    (default: the curve's one-token forward). Once a forward costs a few milliseconds these are not small.
    Shapes whose verify is wider than the measured curve are not considered. Returns the choice with the table it
    was made from: expected tokens per round and per second for each shape, 0 x 0 being plain decoding.

    `lookup_apart` (a `LookupFirstDrafter`, whose matches draft a length of their own): the shape is chosen on the
    drafter's rounds alone, the lookup length on the lookup rounds (`choose_lookup_len`, under "lookup" and
    "lookup_len"), and the expected speed-up is that of both together, in the proportion the probes had them.
    """
    from koala.engine.tree import TreeBudget

    looked = None
    if lookup_apart:
        ranks, accepted, looked = _split_lookup(ranks, accepted)
    widest = max(curve_ms)
    plain = plain_ms or curve_ms[1]
    table = {"0x0": {"tokens": 1.0, "ms": plain, "rate": 1e3 / plain}}
    for k in range(1, probe_topk + 1):
        for d in range(1, probe_depth + 1):
            if d * k + 1 > widest or k not in draft_ms_per_depth:
                continue
            e = 1 + path_length(ranks, accepted, d, k)
            overhead = chain_round_ms if k == 1 and chain_round_ms is not None else round_ms
            ms = d * draft_ms_per_depth[k] + curve_ms[d * k + 1] + overhead
            table[f"{d}x{k}"] = {"tokens": e, "ms": ms, "rate": 1e3 * e / ms}
    best = max((s for s in table if s != "0x0"), key=lambda s: table[s]["rate"])
    d, k = (int(x) for x in best.split("x"))
    return {"auto": True, "chosen": str(TreeBudget(d, k, d * k)) if k > 1 else d, "shape": best, "depth": d,
            "topk": k, **_with_lookup(table, best, looked, len(accepted), curve_ms, (probe_depth, probe_topk),
                                      chain_round_ms if k == 1 and chain_round_ms is not None else round_ms),
            "shapes": table,
            "cost_by_width_ms": curve_ms, "draft_ms_per_depth": draft_ms_per_depth, "round_ms": round_ms,
            "chain_round_ms": round_ms if chain_round_ms is None else chain_round_ms,
            "plain_ms": plain}
