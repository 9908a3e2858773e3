"""gamma auto: expected tokens per round, the choice from a cost curve, the cached calibration; threads."""

from types import SimpleNamespace

import pytest
import torch

from koala.errors import KoalaError
from koala.engine.calibrate import (choose_gamma, choose_lookup_len, choose_tree, cost_curve, expected_tokens,
                                    parse_draft, parse_gamma, path_length)
from koala.engine.tree import LOOKUP_RANK, TreeBudget
from koala.engine.model import Transformer
from koala.threads import configure_threads, default_threads
from tests.conftest import tiny_llama


def test_expected_tokens():
    assert expected_tokens([1.0, 1.0, 1.0], 3) == 4.0
    assert expected_tokens([0.5, 0.5], 2) == 1.75
    assert expected_tokens([0.0, 1.0], 2) == 1.0  # nothing after a certain rejection counts


def test_choice_follows_the_cost_curve_and_the_acceptance():
    flat = {w: 30.0 + w for w in range(1, 7)}  # verifying is nearly free: draft long
    steep = {w: 30.0 * w for w in range(1, 7)}  # every verified token costs a step: draft short
    good, poor = [0.9] * 5, [0.2] * 5
    assert choose_gamma(flat, 1.0, good)[0] == 5
    assert choose_gamma(steep, 1.0, good)[0] == 1
    g, rates = choose_gamma(flat, 1.0, poor)
    assert g in (1, 2) and rates[0] > 0 and set(rates) == set(range(6))
    assert choose_gamma(flat, 1.0, [0.9])[0] == 5  # positions past those measured reuse the last one


def test_parse_gamma():
    assert parse_gamma("auto") is None and parse_gamma("3") == 3 and parse_gamma(2) == 2
    with pytest.raises(KoalaError, match="neither a number, a tree nor auto"):
        parse_gamma("many")
    with pytest.raises(KoalaError, match=">= 1"):
        parse_gamma(0)


def test_parse_draft():
    assert parse_draft("auto") is None and parse_draft("4") == 4 and parse_draft("4x1x4") == 4
    assert parse_draft("4x3x12") == TreeBudget(4, 3, 12)


# probe rounds of a 5 x 4 tree: the rank of each accepted node among its siblings (0: the drafter's first choice)
RANKS = [[0, 1, 0, 2], [1, 0, 0], [2], [0, 0, 0, 0, 0], [3, 1], [0, 2, 1], [1, 1, 0, 0], []]
ACCEPTED = [len(r) for r in RANKS]


def test_path_length_of_a_smaller_tree_from_probe_ranks():
    assert path_length(RANKS, ACCEPTED, 5, 4) == sum(ACCEPTED) / len(RANKS)  # the probe's own tree
    assert path_length(RANKS, ACCEPTED, 5, 1) == (1 + 0 + 0 + 5 + 0 + 1 + 0 + 0) / 8  # the chain: first choices
    assert path_length(RANKS, ACCEPTED, 2, 2) == (2 + 2 + 0 + 2 + 0 + 1 + 2 + 0) / 8


def test_the_draft_shape_follows_the_cost_curve():
    flat = {w: 30.0 + 0.1 * w for w in range(1, 22)}  # verifying many tokens costs about one: a wide tree
    steep = {w: 30.0 * w for w in range(1, 22)}  # every verified token costs a step: a chain, or a short one
    draft = {1: 1.0, 2: 1.2, 3: 1.2, 4: 1.2}
    wide = choose_tree(flat, draft, RANKS, ACCEPTED, 5, 4)
    assert wide["topk"] > 1 and wide["chosen"] == str(TreeBudget(wide["depth"], wide["topk"], 99))
    narrow = choose_tree(steep, draft, RANKS, ACCEPTED, 5, 4)
    assert narrow["topk"] == 1 and narrow["chosen"] == narrow["depth"]
    assert narrow["shapes"]["0x0"]["rate"] == pytest.approx(1e3 / 30.0)
    short = {w: 30.0 + 0.1 * w for w in range(1, 8)}  # measured only to width 7: no tree wider is considered
    assert all(int(d) * int(k) + 1 <= 7 for d, k in (s.split("x") for s in choose_tree(
        short, draft, RANKS, ACCEPTED, 5, 4)["shapes"]))



def test_a_rounds_own_cost_counts_against_short_drafts():
    """What a round costs beyond its forwards (acceptance, bookkeeping) is paid once per round: with it, a shape must
    bring more tokens per round to pay, and the expected speed-up falls; plain decoding's measured cost is its rate."""
    steep = {w: 10.0 * w for w in range(1, 22)}
    draft = {1: 1.0, 2: 1.2, 3: 1.2, 4: 1.2}
    free = choose_tree(steep, draft, RANKS, ACCEPTED, 5, 4)
    costly = choose_tree(steep, draft, RANKS, ACCEPTED, 5, 4, round_ms=20.0, plain_ms=12.0)
    assert costly["shapes"]["0x0"]["ms"] == 12.0 and costly["round_ms"] == 20.0
    assert costly["expected_speedup"] < free["expected_speedup"]
    for shape, row in costly["shapes"].items():
        if shape != "0x0":
            assert row["ms"] == pytest.approx(free["shapes"][shape]["ms"] + 20.0)


def test_a_lookup_match_drafts_the_length_that_pays_on_the_measured_curve():
    """Each verified token costs 1 ms over a 10 ms step: the longer a match is drafted the more of its accepted
    tokens count, up to the widest measured verify (or the probe's slots); where wide verifies are dear, short."""
    curve = {1: 10.0, **{w: 10.0 + (w - 2) for w in range(2, 10)}}
    accepted = [0, 2, 8, 8]  # lookup rounds of the probes, each drafted as far as its match (and the probe) went
    long = choose_lookup_len(curve, accepted, 0.0, cap=20)
    assert long["chosen"] == 8 and long["rounds"] == 4  # widest measured verify: 9 tokens
    assert long["lengths"][8]["tokens"] == pytest.approx(1 + (0 + 2 + 8 + 8) / 4)
    assert long["lengths"][4]["ms"] == pytest.approx(13.0)
    assert choose_lookup_len(curve, accepted, 0.0, cap=6)["chosen"] == 6
    dear = {1: 10.0, 2: 10.0, 3: 11.0, **{w: 100.0 for w in range(4, 10)}}
    assert choose_lookup_len(dear, accepted, 0.0, cap=20)["chosen"] == 2
    assert choose_lookup_len(curve, [], 0.0, cap=20)["chosen"] is None  # no match in the probes: nothing to choose


def test_lookup_rounds_apart_leave_the_shape_to_the_drafters_rounds():
    """With lookup apart, lookup rounds (ranks LOOKUP_RANK; one that accepted nothing still carries its first draft's)
    neither lift nor sink the drafter's shapes; they choose their own length, and the expected speed-up counts both."""
    steep = {w: 10.0 * w for w in range(1, 22)}
    draft = {1: 1.0, 2: 1.2, 3: 1.2, 4: 1.2}
    looked = [[LOOKUP_RANK] * 12, [LOOKUP_RANK], [LOOKUP_RANK] * 12]
    ranks, accepted = RANKS + looked, ACCEPTED + [12, 0, 12]
    apart = choose_tree(steep, draft, ranks, accepted, 5, 4, lookup_apart=True)
    alone = choose_tree(steep, draft, RANKS, ACCEPTED, 5, 4)
    assert apart["shapes"] == alone["shapes"] and apart["shape"] == alone["shape"]
    assert apart["lookup"]["rounds"] == 3 and apart["lookup_len"] == apart["lookup"]["chosen"] >= 1
    assert apart["expected_speedup"] != alone["expected_speedup"]
    mixed = choose_tree(steep, draft, ranks, accepted, 5, 4)  # lookup rounds counted in every shape's table
    assert "lookup_len" not in mixed and mixed["shapes"] != alone["shapes"]
    unseen = choose_tree(steep, draft, RANKS, ACCEPTED, 5, 4, lookup_apart=True)  # no match in the probes
    assert unseen["lookup_len"] == 5 and unseen["lookup"]["fallback"]  # the probe's depth
    assert unseen["expected_speedup"] == pytest.approx(alone["expected_speedup"])


def test_cost_curve_is_measured_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    info = SimpleNamespace(content_hash="abc", device="cpu", dtype="float32")
    s = SimpleNamespace(target=SimpleNamespace(info=info), engine=Transformer(tiny_llama()), mode="eager",
                        weights="full")
    first = cost_curve(s, max_width=3, reps=2)
    assert not first["cached"] and set(first["ms"]) == {1, 2, 3} and all(v > 0 for v in first["ms"].values())
    again = cost_curve(s, max_width=3, reps=2)
    assert again["cached"] and again["ms"] == first["ms"]
    s.mode = "compile"  # another mode (or threads, dtype, CPU, target) is another curve
    assert not cost_curve(s, max_width=3, reps=2)["cached"]


def test_threads_are_set_knowingly(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("KOALA_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("KOALA_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # many processes on this host: one thread each
        assert default_threads() == 1
        monkeypatch.setenv("KOALA_THREADS", "two")
        with pytest.raises(KoalaError, match="KOALA_THREADS='two' is not a number"):
            configure_threads()
    finally:
        torch.set_num_threads(before)


def test_memory_bound_speedup_by_hand():
    from koala.engine.calibrate import drafter_parameter_ratio, memory_bound_speedup, step_parameters
    from koala.engine.drafters import ModelDrafter, PromptLookupDrafter
    from koala.engine.model import Transformer
    from tests.conftest import tiny_llama

    assert memory_bound_speedup(2.5, 2.0, 0.1) == 2.5 / 1.2  # tau 2.5, 2 drafts a round at 0.1 of a step each
    assert memory_bound_speedup(1.0, 0.0, 0.3) == 1.0  # no drafts: the target alone
    target = Transformer(tiny_llama(layers=4, vocab=64))
    layer = sum(p.numel() for p in target.layers[0].parameters())
    head = 64 * target.args.dim + target.norm.weight.numel()
    assert step_parameters(target) == 4 * layer + head
    c = drafter_parameter_ratio(ModelDrafter(target.truncated(1)), target)
    assert c == (layer + head) / (4 * layer + head)
    assert drafter_parameter_ratio(PromptLookupDrafter(vocab_size=64), target) == 0.0


def test_decoding_shares_the_cores_with_busy_processes(monkeypatch):
    """Others busy on the cores -> torch runs on what they leave idle (>= 1); idle again -> back to the full count."""
    from koala import threads

    before = torch.get_num_threads()
    try:
        share = threads.CoreShare(2, interval=0.0)
        share.cores = [0, 1]
        clock = {"t": 0.0, "busy": 0.0, "own": 0.0}

        def advance(others: float, own: float):  # one second in which the others used `others` cores
            clock["t"] += 1.0
            clock["busy"] += others + own
            clock["own"] += own

        monkeypatch.setattr(share, "_sample", lambda: (clock["t"], clock["busy"], clock["own"]))
        share._last = share._sample()
        advance(0.05, 2.0)
        assert share.tick() == 2 and torch.get_num_threads() == 2  # alone: all cores
        advance(1.2, 0.8)
        assert share.tick() == 1 and torch.get_num_threads() == 1  # a neighbour computes: one core left
        advance(1.3, 0.7)
        assert share.tick() == 1  # still busy beside us: stays, does not flap
        advance(0.0, 1.0)
        assert share.tick() == 2 and torch.get_num_threads() == 2  # the neighbour stopped: cores taken back
        advance(4.0, 0.0)
        assert share.tick() == 1  # never below one
        monkeypatch.setattr(threads, "_share", share)
        assert threads.restore() == 2 and torch.get_num_threads() == 2 and share.threads == 2  # after decoding

        monkeypatch.setenv("KOALA_THREADS", "2")
        threads.configure_threads()
        assert threads._share is None  # a pinned count is left alone
        monkeypatch.delenv("KOALA_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        threads.configure_threads()
        assert threads._share is not None and threads._share.others() is None  # within its first interval
    finally:
        threads._share = None
        torch.set_num_threads(before)


def test_a_cost_curve_is_measured_again_when_the_engines_code_or_the_cpus_matrix_unit_changes(monkeypatch):
    """The curve's cache key names the engine's source and the CPU's flags: a curve measured under other code, or on
    a CPU of the same name with another matrix unit, is not reused."""
    from types import SimpleNamespace

    import koala.engine.calibrate as cal

    info = SimpleNamespace(content_hash="t", device="cpu", dtype="float32")
    session = SimpleNamespace(target=SimpleNamespace(info=info), mode="compile", engine=SimpleNamespace(compiled=None),
                              weights="full")
    before = cal._key(session, 8)
    assert cal._key(SimpleNamespace(**{**vars(session), "weights": "int8"}), 8) != before  # int8 weights: another curve
    assert before == cal._key(session, 8) and before["engine_source"] == cal.engine_source()
    monkeypatch.setattr(cal, "engine_source", lambda: "other code")
    assert cal._key(session, 8) != before
    changed = cal._key(session, 8)
    monkeypatch.setattr(cal, "CURVE_FORMAT", cal.CURVE_FORMAT + 1)  # a curve timed another way is not reused either
    assert cal._key(session, 8) != changed
    # one model name, another matrix unit (a VM that hides AMX reports the same "Intel(R) Xeon(R) Processor")
    import koala.precision

    monkeypatch.setattr(koala.precision, "cpu_flags", lambda: ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f"])
    amx = cal._key(session, 8)
    monkeypatch.setattr(koala.precision, "cpu_flags", lambda: ["avx512f", "avx2"])
    assert cal._key(session, 8) != amx


def test_each_width_is_timed_in_a_run_of_its_own_calls():
    """Decoding repeats a width's step (plain decoding the one-token step, rounds their verify): the curve times each
    width in consecutive calls, not in turn with the others, whose packages would have just filled the cache."""
    import itertools

    import torch

    import koala.engine.calibrate as cal

    class Engine:
        device = torch.device("cpu")
        calls: list[int] = []

        def setup_caches(self, n):
            pass

        def step(self, ids, pos, end):
            self.calls.append(ids.shape[1])

    e = Engine()
    ms = cal._measure(e, max_width=3, position=8, reps=4)
    assert sorted(ms) == [1, 2, 3]
    timed = e.calls[3:]  # after one compiling call of each width
    runs = [(w, len(list(g))) for w, g in itertools.groupby(timed)]
    assert runs == [(1, 4), (2, 4), (3, 8), (2, 4), (1, 4)]  # ascending then descending: each width 2 warm + 2 timed


def test_a_rounds_overhead_is_what_its_runs_spent_beyond_prefill_drafting_and_verifying():
    from koala.engine.calibrate import round_overhead_ms
    from koala.engine.decode import GenerationResult

    runs = [GenerationResult([1] * 9, 5, wall_s=0.100, rounds=[(3, 1)] * 4, draft_s=0.020, verify_s=0.060,
                             prefill_s=0.012),
            GenerationResult([1] * 5, 3, wall_s=0.050, rounds=[(3, 2)] * 2, draft_s=0.010, verify_s=0.030,
                             prefill_s=0.004)]
    assert abs(round_overhead_ms(runs) - 1e3 * (0.008 + 0.006) / 6) < 1e-9
    assert round_overhead_ms([GenerationResult([1], 1, wall_s=0.01, prefill_s=0.01)]) == 0.0  # no rounds


def test_chains_and_trees_are_charged_their_own_round_overhead():
    curve = {w: 10.0 for w in range(1, 22)}
    ranks, accepted = [[0, 0, 0]] * 4, [3] * 4  # every probe round accepted 3 drafts, each the drafter's first choice
    base = choose_tree(curve, {1: 1.0, 2: 1.0}, ranks, accepted, 3, 2, round_ms=2.0, plain_ms=10.0)
    split = choose_tree(curve, {1: 1.0, 2: 1.0}, ranks, accepted, 3, 2, round_ms=2.0, plain_ms=10.0,
                        chain_round_ms=0.5)
    assert split["shapes"]["3x1"]["ms"] == base["shapes"]["3x1"]["ms"] - 1.5  # chains: their own overhead
    assert split["shapes"]["3x2"]["ms"] == base["shapes"]["3x2"]["ms"]  # trees: the tree probes'
    assert split["chain_round_ms"] == 0.5 and base["chain_round_ms"] == 2.0
