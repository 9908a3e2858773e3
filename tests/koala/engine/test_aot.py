"""Ahead-of-time compiled steps on a CPU: built once per machine, loaded by later engines, never trusted when stale."""

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from koala.engine.compile import AotStep, compile_seconds
from koala.engine.decode import generate
from koala.engine.model import SLICED_MIN_SLOTS, Transformer
from tests.conftest import tiny_llama

V = 64
PROMPT = [3, 17, 29, 4, 11, 8]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_AOT_DIR", str(tmp_path / "aot"))
    return tmp_path / "aot"


@dataclass
class Built:
    """One engine's first use on a machine: the package it built (its steps of 2..32 tokens, which run its one-token
    steps too), once for this module."""

    folder: Path
    hf: object
    ref: list[int]  # the eager engine's greedy tokens after PROMPT
    built: int
    packages: int
    keys: int

    def copy_to(self, cache: Path) -> None:
        """The package and its key into a test's own cache, as a later process on this machine finds them."""
        shutil.copytree(self.folder, cache)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built") / "aot"
    hf = tiny_llama(layers=2, vocab=V, seed=0)
    ref = generate(Transformer(hf), PROMPT, 12).tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOALA_AOT_DIR", str(folder))
        first = Transformer(hf).compile(mode="default")
        assert generate(first, PROMPT, 12).tokens == ref
        _one_token(first)  # no new package: a one-token step runs the same one
    return Built(folder, hf, ref, first.compiled.built, len(list(folder.glob("*.pt2"))),
                 len(list(folder.glob("*.json"))))


def _one_token(model: Transformer, tok: int = 5) -> torch.Tensor:
    """One compiled one-token step after an eager prefill: its logits."""
    model.setup_caches(16)
    with torch.no_grad():
        model.step(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), len(PROMPT), eager=True)
        return model.step(torch.tensor([[tok]]), torch.tensor([len(PROMPT)]), len(PROMPT) + 1)[0]


def test_a_second_engine_loads_the_packages_and_compiles_nothing(built, cache):
    assert (built.built, built.packages, built.keys) == (1, 1, 1)  # one package, its key beside it
    built.copy_to(cache)
    spent = compile_seconds()
    second = Transformer(built.hf).compile(mode="default")
    assert isinstance(second.compiled, AotStep)
    assert generate(second, PROMPT, 12).tokens == built.ref
    assert (second.compiled.built, second.compiled.loaded) == (0, 1)
    assert compile_seconds() == spent  # loading is not compiling


def test_one_token_steps_run_the_wide_package_up_to_the_caches_last_slot(built, cache):
    """A one-token step runs the wide package at width 2, its second row written to the next slot (at the cache's
    last slot, a spare one attention never reads): no one-token package, and every step decodes as the eager
    forward, the last slot's included."""
    built.copy_to(cache)
    eager, comp = Transformer(built.hf), Transformer(built.hf).compile(mode="default")
    for m in (eager, comp):
        m.setup_caches(SLICED_MIN_SLOTS)  # a compiled cache's least size
    last = comp.max_seq_len - 1
    torch.manual_seed(0)
    context = torch.randint(2, V, (1, last - 2))
    with torch.no_grad():
        for m in (eager, comp):
            m.step(context, torch.arange(last - 2), last - 2, eager=True)
        for p in range(last - 2, last + 1):
            x, pos = torch.tensor([[PROMPT[p % len(PROMPT)]]]), torch.tensor([p])
            want, got = (m.step(x, pos, p + 1)[0] for m in (eager, comp))
            assert torch.allclose(got, want, atol=1e-4), p
    assert (comp.compiled.built, comp.compiled.loaded) == (0, 1)


def test_a_corrupt_package_is_rebuilt(built, cache, capfd):
    hf = built.hf
    want = _one_token(Transformer(hf))
    built.copy_to(cache)
    (package,) = cache.glob("*.pt2")
    package.write_bytes(package.read_bytes()[: 4096])  # a truncated copy, as a killed writer would have left
    dead = _dead_pid()
    leftover = package.parent / f".{package.name}.{socket.gethostname()}-{dead}-x.tmp"  # a killed build's half
    leftover.write_bytes(b"half a package")
    again = Transformer(hf).compile(mode="default")
    got = _one_token(again)
    assert again.compiled.built == 1 and "stale or corrupt: rebuilding" in capfd.readouterr().err
    assert torch.allclose(got, want, atol=1e-4)
    assert not leftover.exists() and not list(package.parent.glob(".*.tmp"))  # swept, and none of its own left


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_stale_package_under_the_right_name_is_rebuilt(built, cache, monkeypatch, capfd):
    """A package whose key missed a change (other weights under the same name) disagrees with the eager forward."""
    built.copy_to(cache)
    digest = Transformer(built.hf).compile(mode="default").compiled.weights_digest()
    new_hf = tiny_llama(layers=2, vocab=V, seed=3)
    want = _one_token(Transformer(new_hf))
    new = Transformer(new_hf).compile(mode="default")
    assert new.compiled.weights_digest() != digest  # the key tells the two apart ...
    monkeypatch.setattr(AotStep, "weights_digest", lambda self: digest)  # ... unless it misses a change
    got = _one_token(new)
    assert new.compiled.built == 1 and "stale or corrupt" in capfd.readouterr().err
    assert torch.allclose(got, want, atol=1e-4)


def test_an_eagle_drafter_runs_its_wide_steps_ahead_of_time_and_stays_lossless(built, cache, tmp_path):
    """Where steps are compiled ahead of time, an EAGLE head's tree levels and its catch-up after a round run its
    compiled wide step (one package for every width), not eager; chains and trees still decode exactly what the
    compiled target decodes alone."""
    from koala.engine.drafters import drafter_models, load_heads_drafter, wide_eager
    from koala.engine.tree import TreeBudget
    from koala.models.heads import build_heads, save_heads

    hf = built.hf
    built.copy_to(cache)  # the target's step; the head's is built here
    torch.manual_seed(0)
    head = build_heads("eagle", hf, layers=1)
    save_heads(head.eval(), tmp_path / "h", {"kind": "eagle", "layers": 1, "hidden_size": hf.config.hidden_size,
                                             "vocab_size": V})
    target = Transformer(hf).compile(mode="default")
    ref = generate(target, PROMPT, 16).tokens
    d = load_heads_drafter(str(tmp_path / "h"), target)
    (engine,) = drafter_models(d)
    assert wide_eager(engine)  # eager engine: a wide feed runs eager
    engine.compile(mode="default")
    assert not wide_eager(engine)
    d.reset(64)
    assert generate(target, PROMPT, 16, drafter=d, gamma=3).tokens == ref
    d.reset(64)
    assert generate(target, PROMPT, 16, drafter=d, tree=TreeBudget(2, 2, 4)).tokens == ref
    assert engine.compiled.built + engine.compiled.loaded == 1  # one package: its drafts, tree levels and catch-up


def test_a_wide_step_whose_cost_grows_with_width_runs_the_faster_build_at_each_width(built, cache, monkeypatch):
    """Autotuned kernels fit to a few rows: where the tuned wide step's widest call costs more than WIDE_SCALING of
    its narrowest, the step is built again without autotuning and each width runs the build timed faster at it;
    the choice is stored once per machine, and both builds decode what the eager forward does. (Timings fixed here:
    which build is faster is the machine's to say; the module's package stands for the tuned build.)"""
    import koala.engine.compile as C

    hf = built.hf
    built.copy_to(cache)
    eager = Transformer(hf)
    timed = []
    monkeypatch.setattr(C, "UNTUNED", "default-second")  # two quick builds stand for the tuned and untuned ones

    def fixed(costs):  # each build's cost by width, in the order the builds are first timed
        def time_widths(self, steps, args, caches, widths):
            assert len(steps) == (2 if tuple(widths) == C.TIMED_WIDTHS else 1)  # the two builds timed in turns
            for step in steps:
                if step not in timed:
                    timed.append(step)
            return [{w: costs[timed.index(step)](w) for w in widths} for step in steps]
        return time_widths

    want = _decode_widths(eager)
    # the tuned step costs about the same at every width: it is kept, alone
    monkeypatch.setattr(AotStep, "_time_widths", fixed([lambda w: 10.0 + 0.1 * w]))
    flat = Transformer(hf).compile(mode="default")
    _decode_widths(flat)
    assert not isinstance(_wide_step(flat), C._ByWidth)  # the tuned wide step only
    assert (flat.compiled.built, flat.compiled.loaded) == (0, 1)
    (choice,) = cache.glob("*.widths.json")
    choice.unlink()
    # the tuned step costs in proportion to its width: built again untuned, which serves the widths it is faster at
    timed.clear()
    monkeypatch.setattr(AotStep, "_time_widths", fixed([lambda w: 10.0 * w, lambda w: 25.0]))
    steep = Transformer(hf).compile(mode="default")
    got = _decode_widths(steep)
    step = _wide_step(steep)
    assert isinstance(step, C._ByWidth) and (steep.compiled.built, steep.compiled.loaded) == (1, 1)
    assert step.build[2] == 0 and step.build[3] == step.build[8] == step.build[C.MAX_STEP_WIDTH] == 1
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4)
    # a later engine on this machine reads the choice: nothing timed, nothing built
    monkeypatch.setattr(AotStep, "_time_widths", lambda *a: pytest.fail("timed again"))
    again = Transformer(hf).compile(mode="default")
    _decode_widths(again)
    assert isinstance(_wide_step(again), C._ByWidth) and (again.compiled.built, again.compiled.loaded) == (0, 2)
    # one asked for a single build runs the tuned build alone, though both are on disk
    one = Transformer(hf).compile(mode="default")
    one.compiled.second_build = False
    _decode_widths(one)
    assert not isinstance(_wide_step(one), C._ByWidth) and (one.compiled.built, one.compiled.loaded) == (0, 1)
    # and asked for two again, it drops the wide step it resolved and runs both builds from the next call
    one.compiled.second_build = True
    assert not any(sig[0] for sig in one.compiled.steps)
    _decode_widths(one)
    assert isinstance(_wide_step(one), C._ByWidth) and (one.compiled.built, one.compiled.loaded) == (0, 3)


def test_a_wide_step_asked_for_one_build_is_built_once_and_runs_every_width(built, cache, monkeypatch):
    """`second_build` False (eval.second_build: false, the smoke profile's): the tuned wide step runs every width
    alone, whatever its cost by width: nothing is timed or built again and no choice is stored, and each width
    decodes what the eager forward does; a session's `builds(False)` does the same for its target's steps."""
    import koala.engine.compile as C
    from koala.engine.session import Session

    hf = built.hf
    built.copy_to(cache)
    monkeypatch.setattr(C, "UNTUNED", "default-second")
    monkeypatch.setattr(AotStep, "_time_widths", lambda *a: pytest.fail("timed"))
    want = _decode_widths(Transformer(hf))
    one = Transformer(hf).compile(mode="default")
    one.compiled.second_build = False
    got = _decode_widths(one)
    assert not isinstance(_wide_step(one), C._ByWidth) and (one.compiled.built, one.compiled.loaded) == (0, 1)
    assert not list(cache.glob("*.widths.json"))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4)
    session = Session(None, Transformer(hf).compile(mode="default"))
    session.builds(False)
    _decode_widths(session.engine)
    assert not isinstance(_wide_step(session.engine), C._ByWidth) and not list(cache.glob("*.widths.json"))


def _wide_step(model):
    (step,) = [s for sig, s in model.compiled.steps.items() if sig[0]]
    return step


def _decode_widths(model):
    """A prefill, then steps of 2, 3 and 8 tokens: their logits."""
    model.setup_caches(32)
    with torch.no_grad():
        model.step(torch.tensor([PROMPT]), torch.arange(6), 6, eager=True)
        return [model.step(torch.tensor([PROMPT[:w] + [5] * (w - 6)]) if w > 6 else torch.tensor([PROMPT[:w]]),
                           torch.arange(6, 6 + w), 6 + w)[0] for w in (2, 3, 8)]


def test_two_builds_are_timed_in_turns_and_a_decided_width_is_not_timed_again(monkeypatch):
    """`_time_widths` on two stub builds and a clock that advances by each call's cost: every round runs each width
    on both builds back to back (the order reversed every other round), a width where one build costs 1.5 times the
    other is timed in the first round only, and each build's costs come back in the order the builds were given."""
    from types import SimpleNamespace

    import koala.engine.compile as C

    now, calls = [0.0], []

    class Build:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def __call__(self, x, pos, *caches):
            calls.append((self.name, x.shape[1]))
            now[0] += self.ms(x.shape[1]) / 1e3

    monkeypatch.setattr(C.time, "perf_counter", lambda: now[0])
    tuned, untuned = Build("tuned", lambda w: 10.0 * (1 + (w > 4))), Build("untuned", lambda w: 12.0)
    me = SimpleNamespace(model=SimpleNamespace(max_seq_len=64))
    args = [torch.zeros(1, 2, dtype=torch.long), torch.arange(2)]
    got = AotStep._time_widths(me, [tuned, untuned], args, [], (2, 4, 8))
    assert got == [pytest.approx({2: 10.0, 4: 10.0, 8: 20.0}), pytest.approx({2: 12.0, 4: 12.0, 8: 12.0})]
    assert [c for c in calls if c[1] == 8] == [("tuned", 8)] * 3 + [("untuned", 8)] * 3  # decided in round one
    at_two = [name for name, w in calls if w == 2]
    assert len(at_two) == 2 * 3 * C.WIDTH_ROUNDS
    rounds = [at_two[i:i + 6] for i in range(0, len(at_two), 6)]  # one untimed and two timed calls per build
    assert rounds[0] == ["tuned"] * 3 + ["untuned"] * 3 and rounds[1] == ["untuned"] * 3 + ["tuned"] * 3
