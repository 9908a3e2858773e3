"""int8 weight-only targets (koala.engine.quantize): the layer is its dequantised weight, and speculative decoding of
the int8 target is exactly the int8 target's own output, eager and ahead-of-time compiled."""

import pytest
import torch

from koala.engine.decode import generate
from koala.engine.drafters import DraftVocab, LookupFirstDrafter, ModelDrafter
from koala.engine.model import Transformer
from koala.engine.quantize import Int8Linear, quantize_weights, weights_of
from koala.engine.tree import TreeBudget
from koala.errors import KoalaError
from tests.conftest import tiny_llama

V = 64
PROMPT = [3, 17, 29, 4, 11, 8]


def test_an_int8_layer_is_its_dequantised_weight_within_half_a_step():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20, bias=True)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127  # every row spans the int8 range
    deq = q.qweight.float() * q.scales[:, None]
    assert ((deq - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-7).all()  # rounding: at most half a step
    for x in (torch.randn(2, 5, 48), torch.randn(1, 40, 48)):  # the int8 kernel; a prefill's width, dense
        torch.testing.assert_close(q(x), x @ deq.T + lin.bias, atol=1e-4, rtol=1e-4)
    with pytest.raises(AttributeError):
        q.weight  # noqa: B018 - a layer that keeps no full-precision weight says so


def test_the_int8_target_decodes_its_own_output_with_chains_trees_and_a_draft_vocabulary():
    from koala.engine.calibrate import step_parameters

    hf = tiny_llama(layers=3, vocab=V, seed=0)
    read = step_parameters(Transformer(hf))
    assert weights_of(hf) == "full"
    embed = hf.model.embed_tokens.weight
    assert quantize_weights(hf, "int8") == 3 * 7 + 1 and weights_of(hf) == "int8"  # 7 per layer, and the head
    assert hf.lm_head.weight is embed  # a tied head's full weight stays readable (a draft vocabulary's rows)
    target = Transformer(hf)
    assert weights_of(target) == "int8" and step_parameters(target) == read  # a step reads as many weights
    ref = generate(target, PROMPT, 30).tokens
    d = ModelDrafter(target.truncated(1))
    for drafter in (d, LookupFirstDrafter(d)):
        assert generate(target, PROMPT, 30, drafter=drafter, gamma=3).tokens == ref
    assert generate(target, PROMPT, 30, drafter=d, tree=TreeBudget(2, 2, 4)).tokens == ref
    vocab = DraftVocab(torch.arange(0, V, 2), hf.lm_head, V)
    torch.testing.assert_close(vocab.weight, embed.detach()[::2])


def test_the_compiled_int8_step_decodes_as_eager_and_is_keyed_by_its_int8_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_AOT_DIR", str(tmp_path / "aot"))
    hf = tiny_llama(layers=2, vocab=V, seed=1)
    full_digest = Transformer(hf).compile(mode="default").compiled.weights_digest()
    quantize_weights(hf, "int8")
    eager, comp = Transformer(hf), Transformer(hf).compile(mode="default")
    assert comp.compiled.weights_digest() != full_digest  # never the full-precision package
    ref = generate(eager, PROMPT, 24).tokens
    assert generate(comp, PROMPT, 24).tokens == ref
    assert generate(comp, PROMPT, 24, drafter=ModelDrafter(eager.truncated(1)), gamma=3).tokens == ref
    assert comp.compiled.built == 1
    q = hf.model.layers[0].self_attn.q_proj.qweight
    q[0, 0] = 1 if q[0, 0] != 1 else 2  # other int8 weights: another package
    assert Transformer(hf).compile(mode="default").compiled.weights_digest() != comp.compiled.weights_digest()


def test_unknown_weights_are_refused_with_the_choices():
    from koala.config import EvalConfig

    with pytest.raises(KoalaError, match="use one of full, bf16, int8"):
        quantize_weights(tiny_llama(), "int4")
    with pytest.raises(ValueError, match="weights"):
        EvalConfig(weights="int4")
    assert quantize_weights(tiny_llama(), "full") == 0


@pytest.mark.slow
def test_the_real_target_at_int8_is_measured_against_itself(tmp_path):
    """`eval.weights: int8` on the default target: the report says int8, the baseline is the int8 target's own
    decoding, and the speculative output is identical to it."""
    from koala.config import EvalConfig
    from koala.engine.session import Session
    from koala.evaluate import evaluate
    from koala.render import summary_line

    s = Session.open("smollm2-135m-instruct", dtype="bfloat16", weights="int8")  # int8's activations: bf16
    assert s.weights == "int8" and "int8 weights" in s.describe()
    report = evaluate(s, "truncate:4", EvalConfig(limit=1, max_new_tokens=12, gamma=3, warmup=0, lookup=True),
                      out_dir=tmp_path)
    ll = report.lossless
    assert report.weights == "int8" and ll.identical + len(ll.near_ties) == 1 and not ll.differences, ll
    assert "int8 weights" in summary_line(report) and "int8 weights" in (tmp_path / "report.md").read_text()
