"""The drafter attends only to its own past; the compiled engine (fullgraph, static shapes) decodes as eager does."""

import pytest
import torch

from koala.engine.decode import generate
from koala.engine.drafters import LookupFirstDrafter, ModelDrafter
from koala.engine.model import SLICED_MIN_SLOTS, Transformer
from koala.engine.sampling import SamplingParams
from tests.conftest import tiny_llama

V = 64
PROMPT = [3, 17, 29, 4, 11, 8]


def _target(seed=0):
    return Transformer(tiny_llama(layers=3, vocab=V, seed=seed))


# --- the mask: a drafter never reads slots past its position -------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_target_as_its_own_drafter_accepts_every_greedy_draft(gamma):
    target = _target()
    ref = generate(target, PROMPT, 40).tokens
    # a first, different prompt leaves its keys and values in the drafter's cache: they must stay invisible
    d = ModelDrafter(target.truncated(target.args.n_layers))
    generate(target, [9, 9, 2, 7, 5, 1, 33, 12, 40, 41, 42], 30, drafter=d, gamma=gamma)
    res = generate(target, PROMPT, 40, drafter=d, gamma=gamma)
    assert res.tokens == ref
    assert all(k == m for m, k in res.rounds[:-1]), res.rounds  # every draft accepted (the last may pass the end)


def test_q_after_a_rejected_round_equals_a_clean_forward():
    target = _target()
    params = SamplingParams(temperature=1.0)
    seq = torch.tensor(PROMPT + [0] * 30)
    n = len(PROMPT)
    d = ModelDrafter(target.truncated(2))
    d.reset(64)
    toks, _ = d.propose(seq, n, 4, params)  # writes drafts at slots n..n+2 of the drafter's cache
    seq[n:n + 4] = toks
    seq[n + 1] = (int(toks[1]) + 1) % V  # the target took draft 1, then corrected draft 2
    d.commit(n + 2)
    torch.manual_seed(0)
    _, q = d.propose(seq, n + 2, 3, params)  # slots n+2, n+3 still hold the rejected round's keys
    clean = ModelDrafter(target.truncated(2))
    clean.reset(64)
    torch.manual_seed(0)
    _, q_clean = clean.propose(seq, n + 2, 3, params)
    assert torch.allclose(q, q_clean, atol=1e-6), (q - q_clean).abs().max()


def test_real_target_as_its_own_drafter_accepts_every_greedy_draft(default_session):
    s = default_session
    from koala.targets import encode_chat

    ids = encode_chat(s.target.tokenizer, [{"role": "user", "content": "Name three colours."}])
    d = s.drafter(f"truncate:{s.engine.args.n_layers}")
    res = s.run(ids, 24, drafter=d, gamma=3)
    assert res.tokens == s.run(ids, 24).tokens
    assert all(k == m for m, k in res.rounds[:-1]), res.rounds


# --- the compiled engine -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_pair():
    """An eager and a compiled engine over the same tiny weights (float32), and a compiled one-layer drafter.

    Inductor's default mode here (the same graphs, fullgraph, without autotuning) keeps these tests quick; the
    production mode has its own test below.
    """
    hf = tiny_llama(layers=3, vocab=V, seed=0)
    comp = Transformer(hf).compile(mode="default")
    return Transformer(hf), comp, ModelDrafter(Transformer(hf, 1).compile(mode="default"))


def test_compiled_step_is_one_graph_and_matches_eager():
    hf = tiny_llama(layers=3, vocab=V, seed=0)
    eager, comp = Transformer(hf), Transformer(hf).compile()  # the production mode; fullgraph: a break would raise
    for m in (eager, comp):
        m.setup_caches(40)
    with torch.no_grad():
        for m in (eager, comp):
            m.step(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), len(PROMPT), eager=True)
        for w in (1, 4):
            ids, pos = torch.randint(0, V, (1, w)), torch.arange(6, 6 + w)
            a, b = eager.step(ids, pos, 6 + w)[0], comp.step(ids, pos, 6 + w)[0]
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert comp.max_seq_len == SLICED_MIN_SLOTS  # compiled caches come in powers of two, one size at least


def test_compiled_generation_equals_eager_and_survives_a_cache_resize(compiled_pair):
    eager, comp, d = compiled_pair
    # the second prompt needs a bigger cache: the compiled target builds its steps for it again, while an eager
    # drafter stands in for the compiled one there (a drafter's cache grows through the same `setup_caches`)
    for prompt, new, dr in ((PROMPT, 30, d), (list(range(2, 40)) * 28, 20, ModelDrafter(eager.truncated(1)))):
        ref = generate(eager, prompt, new).tokens
        assert generate(comp, prompt, new).tokens == ref
        for drafter in (dr, LookupFirstDrafter(dr)):
            res = generate(comp, prompt, new, drafter=drafter, gamma=3, threshold=0.2)
            assert res.tokens == ref
    assert comp.max_seq_len == 2 * SLICED_MIN_SLOTS


def test_compiled_sampling_is_reproducible_under_a_seed(compiled_pair):
    _, comp, d = compiled_pair
    params = SamplingParams(temperature=1.0)
    torch.manual_seed(3)
    a = generate(comp, PROMPT, 12, drafter=d, gamma=2, params=params).tokens
    torch.manual_seed(3)
    b = generate(comp, PROMPT, 12, drafter=d, gamma=2, params=params).tokens
    assert a == b and len(a) == 12


def test_no_recompilation_across_buffers_and_widths(compiled_pair):
    from koala.engine.compile import compilations

    _, comp, _ = compiled_pair
    comp.setup_caches(40)
    with torch.no_grad():
        for w in (1, 2, 5):  # compile each graph once
            comp.step(torch.zeros(1, w, dtype=torch.long), torch.arange(6, 6 + w), 6 + w)
        before = compilations()
        for buf_len in (100, 300):  # slices of sequence buffers of other lengths: other strides, same graphs
            seq = torch.zeros(buf_len, dtype=torch.long)
            for w in (1, 3, 4, 2):
                comp.step(seq[None, 6:6 + w], torch.arange(6, 6 + w), 6 + w)
        for end in (37, 300, 512):  # later in a sequence: the slots attended grow, the graphs stay (a symbolic size)
            for w in (1, 4):
                comp.step(torch.zeros(1, w, dtype=torch.long), torch.arange(end - w, end), end)
    assert compilations() == before


def test_a_compiler_failure_is_one_line(monkeypatch, tmp_path):
    from koala.errors import KoalaError

    comp = Transformer(tiny_llama(layers=1, vocab=V, seed=7)).compile(mode="default")
    comp.setup_caches(16)
    monkeypatch.setenv("KOALA_AOT_DIR", str(tmp_path))  # an empty cache: the step must be built
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # the package's C++ compiler is missing
    with pytest.raises(KoalaError, match=r"^the compiled engine could not be built \(.+\): run with --no-compile") as e:
        comp.step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]), 4)
    assert "\n" not in str(e.value)


# --- the CUDA path: the same compiled functions, under CUDA graphs where CUDA exists -------------------------------

def test_cuda_graph_mode_decodes_as_eager_on_this_device():
    """mode reduce-overhead is what a GPU runs (CUDA graphs; on a CPU inductor skips the graphs, the rest is the same
    code: the step marker, the copied outputs, the per-width graphs)."""
    hf = tiny_llama(layers=3, vocab=V, seed=4)
    comp = Transformer(hf).compile(mode="reduce-overhead")
    assert comp.compiled.graphs
    d = ModelDrafter(Transformer(hf, 1).compile(mode="reduce-overhead"))
    ref = generate(Transformer(hf), PROMPT, 24).tokens
    assert generate(comp, PROMPT, 24).tokens == ref
    assert generate(comp, PROMPT, 24, drafter=d, gamma=3).tokens == ref
    from koala.engine.tree import TreeBudget
    assert generate(comp, PROMPT, 24, drafter=d, tree=TreeBudget(3, 3, 7)).tokens == ref


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (the CPU test above runs the code)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_graphs_speculative_equals_autoregressive_in_each_dtype(dtype):
    hf = tiny_llama(layers=3, vocab=V, seed=5).to("cuda", dtype)
    comp = Transformer(hf).compile()
    assert comp.compiled.mode == "reduce-overhead"
    d = ModelDrafter(Transformer(hf, 1).compile())
    ref = generate(comp, PROMPT, 32).tokens  # koala's own CUDA-graph autoregressive decoding, same dtype
    assert generate(comp, PROMPT, 32, drafter=d, gamma=4).tokens == ref
    from koala.engine.tree import TreeBudget
    for tree in (TreeBudget(4, 3, 10), TreeBudget(3, 4, 12)):  # one CUDA graph per verify width
        assert generate(comp, PROMPT, 32, drafter=d, tree=tree).tokens == ref
    if dtype == torch.float32:
        assert ref == generate(Transformer(hf), PROMPT, 32).tokens


@cuda
def test_cuda_graph_outputs_survive_the_next_replay():
    comp = Transformer(tiny_llama(layers=2, vocab=V, seed=6).cuda()).compile()
    comp.setup_caches(64)
    with torch.no_grad():
        comp.step(torch.tensor([PROMPT], device="cuda"), torch.arange(len(PROMPT), device="cuda"), 6, eager=True)
        outs = []
        for i in range(4):  # record, then replay: each call's logits stay its own
            pos = torch.tensor([6 + i], device="cuda")
            outs.append(comp.step(torch.tensor([[i + 2]], device="cuda"), pos, 7 + i)[0])
        keep = [o.clone() for o in outs]
        comp.step(torch.tensor([[9]], device="cuda"), torch.tensor([10], device="cuda"), 11)
    for a, b in zip(outs, keep):
        assert torch.equal(a, b)


def test_a_session_without_autotuning_builds_the_target_and_its_drafters_untuned(default_session):
    """eval.autotune false: the target's steps and every drafter's are built in inductor's mode without autotuning
    (on a CPU; a GPU keeps its CUDA graphs). Nothing is built here: a step is built at its first call."""
    from koala.engine.compile import UNTUNED, compile_mode
    from koala.engine.drafters import drafter_models
    from koala.engine.session import Session

    s = Session(default_session.target, Transformer(default_session.target.model), compile_mode=UNTUNED)
    s.compile()
    d = s.drafter("truncate:1")
    assert s.engine.compiled.mode == UNTUNED and [m.compiled.mode for m in drafter_models(d)] == [UNTUNED]
    assert compile_mode(torch.device("cpu"), autotune=False) == UNTUNED
    assert compile_mode(torch.device("cpu")) is None and compile_mode(torch.device("cuda"), autotune=False) is None
