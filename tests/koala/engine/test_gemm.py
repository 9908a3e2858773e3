"""koala's decode GEMM (koala.engine.gemm): the kernel is torch's linear, a row's result does not depend on the rows
beside it, and a packed target decodes its own output eager and ahead-of-time compiled."""

import json

import pytest
import torch

from koala.engine import gemm
from koala.engine.decode import generate
from koala.engine.drafters import LookupFirstDrafter, ModelDrafter
from koala.engine.model import Transformer
from koala.engine.tree import TreeBudget
from koala.errors import KoalaError
from tests.conftest import tiny_llama

needs_kernel = pytest.mark.skipif(gemm.unsupported() is not None, reason=f"koala's kernel: {gemm.unsupported()}")
PROMPT = [3, 17, 29, 4, 11, 8]


@pytest.fixture(scope="module")
def ops():
    assert gemm.load()


@needs_kernel
@pytest.mark.parametrize("dtype, stored", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16)])
def test_the_kernel_is_torch_linear_and_a_row_does_not_depend_on_the_rows_beside_it(ops, dtype, stored):
    g = torch.Generator().manual_seed(0)
    for n, k in ((100, 37), (48, 64), (1000, 576), (5, 3), (97, 150)):  # partial panels, odd K, a narrow panel, K
        # over several chunks with a partial last one
        w = torch.randn(n, k, generator=g).to(stored)
        p = torch.ops.koala.pack(w)
        assert p.shape == (-(-n // 48), k, 48) and p.dtype == stored
        x = torch.randn(41, k, generator=g).to(dtype)
        want = x.float() @ w.float().T  # the exact products, summed in fp32
        for m in (1, 2, 7, 8, 9, 13, 17, 32, 35, 41):  # beyond 32 rows: a second group, of up to 8 or more
            got = torch.ops.koala.small_linear(x[:m], p, n)
            assert got.shape == (m, n) and got.dtype == dtype
            tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
            torch.testing.assert_close(got.float(), want[:m], atol=tol * k ** 0.5, rtol=tol)
            for r in range(m):  # each row alone gives the same bits as in the batch
                assert torch.equal(torch.ops.koala.small_linear(x[r:r + 1], p, n)[0], got[r])
    with pytest.raises(RuntimeError, match="packed by koala::pack"):
        torch.ops.koala.small_linear(torch.randn(2, 5), torch.ops.koala.pack(torch.randn(8, 6)), 8)
    with pytest.raises(RuntimeError, match="x is BFloat16, the weight Float"):
        torch.ops.koala.small_linear(torch.randn(2, 6).bfloat16(), torch.ops.koala.pack(torch.randn(8, 6)), 8)


@needs_kernel
def test_a_packed_target_decodes_its_own_output_with_chains_trees_and_lookup(ops):
    hf = tiny_llama(layers=3, vocab=64, seed=0)
    plain = Transformer(hf)
    plain.setup_caches(64)
    before = plain.step(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), len(PROMPT), eager=True)[0]
    embed = hf.model.embed_tokens.weight
    assert gemm.pack_linears(hf) == 3 * 7 + 1 and gemm.packed(hf)  # 7 per layer, and the head
    assert hf.lm_head.weight is embed  # a tied head's weight stays readable
    target = Transformer(hf)
    target.setup_caches(64)
    after = target.step(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), len(PROMPT), eager=True)[0]
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # the same model, summed in another order
    ref = generate(target, PROMPT, 30).tokens
    d = ModelDrafter(target.truncated(1))
    for drafter in (d, LookupFirstDrafter(d)):
        assert generate(target, PROMPT, 30, drafter=drafter, gamma=3).tokens == ref
    assert generate(target, PROMPT, 30, drafter=d, tree=TreeBudget(2, 2, 4)).tokens == ref


@needs_kernel
def test_the_compiled_packed_step_decodes_as_eager_in_its_own_package(ops, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_AOT_DIR", str(tmp_path / "aot"))
    hf = tiny_llama(layers=2, vocab=64, seed=1)
    full = Transformer(hf).compile().compiled
    full_key = full.key((True, False, True, True, True, 1, 1, 1024))
    gemm.pack_linears(hf)
    eager, comp = Transformer(hf), Transformer(hf).compile()  # the default (autotuning) mode asked for
    assert comp.compiled.mode == "default"  # nothing left to autotune: the GEMMs are the kernel
    key = comp.compiled.key((True, False, True, True, True, 1, 1, 1024))
    assert key["weights"] != full_key["weights"] and key["engine_source"] != full_key["engine_source"]
    ref = generate(eager, PROMPT, 24).tokens
    assert generate(comp, PROMPT, 24).tokens == ref
    assert generate(comp, PROMPT, 24, drafter=ModelDrafter(eager.truncated(1)), gamma=3).tokens == ref
    assert comp.compiled.built == 1  # one build: no second, untuned one


def test_the_setting_is_checked_and_torch_leaves_the_model_alone(monkeypatch):
    hf = tiny_llama()
    with pytest.raises(KoalaError, match="use auto, koala or torch"):
        gemm.choose(hf, "mkl")
    monkeypatch.setenv(gemm.ENV, "fast")
    with pytest.raises(KoalaError, match="KOALA_GEMM='fast' is not one of auto, koala, torch"):
        gemm.choose(hf)
    monkeypatch.setenv(gemm.ENV, "torch")
    c = gemm.use_for(hf, "koala")  # the environment overrides the setting
    assert c.name == "torch" and "forced by KOALA_GEMM" in c.reason and not gemm.packed(hf)
    monkeypatch.delenv(gemm.ENV)
    monkeypatch.setattr(gemm, "unsupported", lambda: "no AVX-512 on this CPU")
    monkeypatch.setattr(gemm, "_loaded", False)
    assert gemm.choose(hf).name == "torch"
    with pytest.raises(KoalaError, match="no AVX-512 on this CPU.*KOALA_GEMM=torch"):
        gemm.choose(hf, "koala")


@needs_kernel
def test_auto_measures_once_per_machine_and_packs_where_the_kernel_is_faster(ops, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    hf = tiny_llama(layers=1)
    calls = []
    real = gemm.measure
    monkeypatch.setattr(gemm, "measure", lambda m: calls.append(1) or real(m, widths=gemm.MEASURE_WIDTHS, rounds=1))
    first = gemm.choose(hf)
    assert calls == [1] and gemm.choose(hf) == first and calls == [1]  # the second answer is the cached one
    (cached,) = (tmp_path / "calibration").glob("gemm-*.json")
    d = json.loads(cached.read_text())
    d["ms"] = {"koala": {"1": 1.0, "4": 1.0, "8": 1.0, "16": 1.0}, "torch": {"1": 1.0, "4": 2.0, "8": 3.0, "16": 3.0}}
    cached.write_text(json.dumps(d))
    assert gemm.choose(hf).name == "koala" and "2.25x torch's" in gemm.choose(hf).reason
    d["ms"]["koala"] = {w: 5.0 for w in d["ms"]["koala"]}
    cached.write_text(json.dumps(d))
    assert gemm.use_for(hf).name == "torch" and not gemm.packed(hf)
    cached.write_text("{damaged")
    gemm.choose(hf)
    assert calls == [1, 1]  # a damaged entry is measured again


@needs_kernel
def test_bf16_weights_are_stored_as_bf16_and_decode_their_own_output(ops):
    from koala.engine.quantize import quantize_weights, weights_of

    hf = tiny_llama(layers=2, vocab=64, seed=2)
    w = hf.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert quantize_weights(hf, "bf16") == 2 * 7 + 1 and weights_of(hf) == "bf16"
    r = hf.model.layers[0].mlp.up_proj.weight
    assert r.dtype == torch.float32 and torch.equal(r, w.bfloat16().float()) and not torch.equal(r, w)
    eager = generate(Transformer(hf), PROMPT, 24).tokens  # torch's GEMM on the rounded weights
    gemm.pack_linears(hf)
    up = hf.model.layers[0].mlp.up_proj
    assert up.packed.dtype == torch.bfloat16 and up.act_dtype == torch.float32 and weights_of(hf) == "bf16"
    target = Transformer(hf)
    ref = generate(target, PROMPT, 24).tokens
    assert ref == eager  # the same model: float32 arithmetic on the same bf16 values
    assert generate(target, PROMPT, 24, drafter=ModelDrafter(target.truncated(1)), tree=TreeBudget(2, 2, 4)).tokens \
        == ref


@needs_kernel
def test_an_eagle_head_packed_beside_its_packed_target_drafts_losslessly(ops):
    from koala.engine.drafters import EagleDrafter, drafter_models
    from koala.models.heads import EagleHead

    hf = tiny_llama(layers=2, vocab=64, seed=3)
    gemm.pack_linears(hf)
    target = Transformer(hf)
    torch.manual_seed(0)
    head = EagleHead(hf.config, 1).eval()
    drafter = EagleDrafter(head, target, "eagle")
    (model,) = drafter_models(drafter)
    own = {n: m.weight.detach().clone() for n, m in head.decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    # as Session.drafter packs it: its own layers rounded to bf16, stored as bf16
    assert gemm.pack_linears(model.hf_model[0], torch.bfloat16) == 7  # the head's layer; the shared head is packed
    assert gemm.packed(head.decoder) and model.lm_head is hf.lm_head and hf.lm_head.packed.dtype == torch.float32
    for name, w in own.items():
        layer = head.decoder.get_submodule(name)
        assert layer.packed.dtype == torch.bfloat16  # the kernel's copy, and the dense GEMM's: the same values
        assert torch.equal(layer.weight, w.bfloat16().float()) and not torch.equal(layer.weight, w)
    ref = generate(target, PROMPT, 24).tokens
    assert generate(target, PROMPT, 24, drafter=drafter, gamma=3).tokens == ref
    assert generate(target, PROMPT, 24, drafter=drafter, tree=TreeBudget(2, 2, 4)).tokens == ref
