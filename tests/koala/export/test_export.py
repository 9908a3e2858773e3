"""Round trips of `koala export`, one per format: each export is loaded back with the format's own loader
(transformers, transformers' GGUF reader, the Medusa package's classes, the speculators package's classes) and must
draft what koala's drafter drafts. The drafters belong to a tiny random Llama with the default target's tokenizer
(fast: the formats do not depend on size); the tokenizer copied from a GGUF is checked on the default target's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from koala.config import DrafterConfig
from koala.errors import KoalaError
from koala.export import EXPORT_JSON, export, open_drafter
from koala.models.draft_model import build_drafter, save_drafter
from koala.models.heads import build_heads, load_heads, save_heads
from tests.koala.data.test_shards import tiny_target_dir  # noqa: F401 - fixture reuse

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = ROOT / ".venv" / "overlays"  # the Makefile installs the formats' own packages here
pytestmark = pytest.mark.slow


def needs_overlay(name: str) -> Path:
    path = OVERLAYS / name
    if not path.is_dir():
        pytest.skip(f"{path} missing: `make test` installs the {name} package there")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_target_dir):  # noqa: F811
    """The target: a tiny random Llama (2 layers, hidden 32) with the default target's tokenizer, on disk."""
    from koala.targets import load_target

    return load_target(str(tiny_target_dir))


@pytest.fixture(scope="module")
def drafter_dir(tiny, tmp_path_factory):
    """An independent drafter for the target (1 of its layers, a draft vocabulary), as koala saves one."""
    model = build_drafter(tiny, DrafterConfig(layers=1), seed=0)
    out = tmp_path_factory.mktemp("drafter") / "drafter"
    return save_drafter(model, tiny.tokenizer, out, {"target": {"name": tiny.info.source}}, torch.arange(0, 8000, 2))


def heads_dir(t, root: Path, kind: str, layers: int, vocab=None, embed_norm: bool = True) -> Path:
    """Heads for the default target with every weight perturbed at random, saved as koala saves them."""
    heads = build_heads(kind, t.model, layers, n_heads=3, embed_norm=embed_norm)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    info = {"kind": kind, "layers": layers, "n_heads": 3, "hidden_size": t.model.config.hidden_size,
            "vocab_size": t.info.vocab_size, "target": {"name": t.info.source}, "embed_norm": embed_norm}
    return save_heads(heads, root / f"{kind}{layers}", info, vocab)


def test_hf_export_drafts_as_assistant_model_and_keeps_the_targets_greedy_tokens(tiny, drafter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = tiny
    m = export(open_drafter(drafter_dir), "hf", tmp_path / "hf")
    assert m["round_trip"]["max_abs_logit_diff"] == 0.0 and m["round_trip"]["greedy_tokens_identical"] > 0
    drafter = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert drafter.config.vocab_size == t.info.vocab_size  # the full vocabulary
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        [{"role": "user", "content": "Name three rivers in Europe."}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    kw = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    alone = t.model.generate(ids, **kw)
    assisted = t.model.generate(ids, assistant_model=drafter, **kw)
    assert torch.equal(alone, assisted)
    assert json.loads((tmp_path / "hf" / EXPORT_JSON).read_text())["format"] == "hf"


def test_gguf_export_reloads_with_transformers_gguf_reader_equal_to_the_source(default_target, drafter_dir, tmp_path):
    """The target is a Hugging Face model here: the vocabulary is written from its tokenizer, and must be what
    llama.cpp's converter wrote for the default target (the same tokenizer) token for token."""
    from gguf import GGUFReader

    from koala.export.gguf import FILE

    m = export(open_drafter(drafter_dir), "gguf", tmp_path / "g")  # its check: reloaded by transformers' reader
    rt = m["round_trip"]
    assert rt["max_abs_logit_diff"] <= 1e-5 * rt["logit_scale"] and rt["greedy_tokens_identical"] == 32
    assert rt["loaded_with"] == "transformers' GGUF reader" and m["tokenizer_from"].startswith("hf tokenizer")
    src = GGUFReader(default_target.info.source).fields
    out = GGUFReader(tmp_path / "g" / FILE).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert out[key].contents() == src[key].contents(), key
    assert out["general.architecture"].contents() == "llama" and out["llama.block_count"].contents() == 1


def test_gguf_vocabulary_of_a_gguf_target_is_copied_field_by_field(default_target, tmp_path):
    """llama.cpp drafts only with the target's vocabulary: from a GGUF target, every tokenizer field is copied."""
    import gguf
    from gguf import GGUFReader

    from koala.export.gguf import _add_tokenizer

    w = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    assert _add_tokenizer(w, "smollm2-135m-instruct", default_target.tokenizer, default_target.info.vocab_size) \
        == default_target.info.source
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = GGUFReader(tmp_path / "v.gguf").fields, GGUFReader(default_target.info.source).fields
    keys = [k for k in theirs if k.startswith("tokenizer.")]
    assert len(keys) >= 10 and all(ours[k].contents() == theirs[k].contents() for k in keys)


@pytest.mark.parametrize("layers,vocab", [(1, None), (2, torch.arange(0, 6000, 2))])
def test_medusa_export_reloads_in_the_medusa_packages_head_and_in_vllms_layout(tiny, tmp_path, layers, vocab):
    from koala.export.medusa import MEDUSA_PT, VLLM_WEIGHTS, medusa_repo_heads, vllm_logits

    t = tiny
    src = heads_dir(t, tmp_path, "medusa", layers, vocab)
    m = export(open_drafter(src), "medusa", tmp_path / "m")
    assert m["medusa_repo_loads"] == (layers == 1)
    heads, _ = load_heads(src, t.model)
    f = torch.randn(20, t.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = t.model.lm_head(heads(f))  # what koala's MedusaDrafter drafts from: (heads, N, V)
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        state = torch.load(tmp_path / "m" / MEDUSA_PT, weights_only=True)
        resblock = None
        if layers == 1:  # the Medusa package's own ResBlock (its loader ties K > 1 blocks into one)
            sys.path.insert(0, str(needs_overlay("medusa")))
            try:
                from medusa.model.medusa_model import ResBlock as resblock
            finally:
                sys.path.pop(0)
        repo = medusa_repo_heads(state, 3, layers, config["hidden_size"], config["vocab_size"], resblock)
        theirs = torch.stack([h(f) for h in repo])
        vllm = vllm_logits(load_file(tmp_path / "m" / VLLM_WEIGHTS), config, f)
    cols = torch.arange(t.info.vocab_size) if vocab is None else vocab
    torch.testing.assert_close(theirs[..., cols], ours[..., cols], atol=1e-4, rtol=0)
    torch.testing.assert_close(vllm[..., cols], ours[..., cols], atol=1e-4, rtol=0)
    assert torch.equal(vllm.argmax(-1), cols[ours[..., cols].argmax(-1)])  # vLLM drafts over the same subset
    if vocab is not None:
        assert config["truncated_vocab_size"] == len(vocab) and torch.isinf(vllm[..., 1]).all()


def test_speculators_export_loads_with_the_speculators_package_and_drafts_as_koalas_eagle(tiny, tmp_path):
    """Loaded back by speculators 0.4.0.1's own SpeculatorModel.from_pretrained (in its own Python path: it needs
    transformers 4.x), the export's logits on the target's features equal koala's EAGLE drafter's."""
    from koala.export.speculators import compare, koala_inputs

    overlay = needs_overlay("speculators")
    src = heads_dir(tiny, tmp_path, "eagle", 1, torch.arange(0, 6000, 3))
    m = export(open_drafter(src), "speculators", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle" and cfg["layernorms"] and cfg["fusion_bias"]
    assert set(load_file(tmp_path / "s" / "model.safetensors")) >= {"fusion_fc.weight", "fusion_fc.bias",
                                                                    "embedding_layernorm.weight",
                                                                    "pre_lm_head_layernorm.weight",
                                                                    "transformer.self_attn.q_proj.weight"}
    ours, embed, lm, ids, feats, vocab = koala_inputs(open_drafter(src), tiny.info.source)
    save_file({"embed": embed.contiguous(), "lm_head": lm.clone(), "ids": ids.contiguous(),
               "feats": feats.contiguous()}, tmp_path / "in.safetensors")
    env = {**os.environ, "PYTHONPATH": f"{overlay}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "koala.export.speculators", str(tmp_path / "s"),
                        str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(tmp_path / "out.safetensors")["logits"]
    got = compare(ours, theirs, vocab, "speculators 0.4.0.1")
    assert got["max_abs_logit_diff"] <= 1e-4 * got["logit_scale"]
    assert m["round_trip"]["loaded_with"] in ("reference forward", "speculators 0.4.0.1")


@pytest.mark.parametrize("vocab", [None, torch.arange(0, 6000, 3)])
def test_eagle3_export_loads_with_speculators_0_9_and_drafts_as_koalas(tiny, tmp_path, vocab):
    """An EAGLE-3 head (K = 2), exported and loaded back by speculators 0.9.0's own SpeculatorModel.from_pretrained
    (the release vLLM reads eagle3 speculators with), run by the package's own modules on the target's fused states:
    its logits equal koala's, and its d2t maps the draft vocabulary onto koala's."""
    from koala.export.speculators_eagle3 import compare, koala_inputs

    overlay = needs_overlay("speculators-0.9")
    src = heads_dir(tiny, tmp_path, "eagle3", 2, vocab)
    m = export(open_drafter(src), "speculators", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["transformer_layer_config"]["num_hidden_layers"] == 2
    assert cfg["eagle_aux_hidden_state_layer_ids"] == json.loads((src / "heads.json").read_text())["aux_layers"]
    w = load_file(tmp_path / "s" / "model.safetensors")
    assert {"fc.weight", "layers.0.hidden_norm.weight", "layers.1.self_attn.q_proj.weight", "norm.weight",
            "lm_head.weight"} <= set(w) and ("d2t" in w) == (vocab is not None)
    assert m["round_trip"]["loaded_with"] in ("koala's head, reloaded", "speculators 0.9.0")
    ours, embed, ids, aux, v = koala_inputs(open_drafter(src), tiny.info.source)
    save_file({"embed": embed.contiguous(), "ids": ids.contiguous(), "aux": aux.contiguous()}, tmp_path / "in.st")
    env = {**os.environ, "PYTHONPATH": f"{overlay}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "koala.export.speculators_eagle3", str(tmp_path / "s"),
                        str(tmp_path / "in.st"), str(tmp_path / "out.st")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(tmp_path / "out.st")
    got = compare(ours, theirs["logits"], theirs["to_target"], v, "speculators 0.9.0")
    assert got["max_abs_logit_diff"] <= 1e-4 * got["logit_scale"] and got["greedy_drafts_identical"] == len(ids)


@pytest.mark.parametrize("vocab", [None, torch.arange(0, 6000, 3)])
def test_eagle3_export_in_sglangs_layout_loads_with_specforge_and_drafts_as_koalas(tiny, tmp_path, vocab):
    """An EAGLE-3 head (one layer) in SGLang's / SpecForge's checkpoint layout, loaded back by SpecForge's own
    LlamaForCausalLMEagle3.from_pretrained and run by its own modules on the target's fused states: its logits equal
    koala's and its d2t maps the draft vocabulary onto koala's. Two layers are refused, naming speculators."""
    from koala.export.speculators_eagle3 import compare, koala_inputs

    src = heads_dir(tiny, tmp_path, "eagle3", 1, vocab)
    m = export(open_drafter(src), "sglang", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    aux = json.loads((src / "heads.json").read_text())["aux_layers"]
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [a - 1 for a in aux]  # outputs of layer a-1
    w = load_file(tmp_path / "s" / "model.safetensors")
    assert {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "norm.weight",
            "lm_head.weight", "embed_tokens.weight", "d2t", "t2d"} <= set(w)
    assert m["round_trip"]["loaded_with"] in ("koala's head, reloaded", "SpecForge 0.2.0 LlamaForCausalLMEagle3")
    with pytest.raises(KoalaError, match="use --format speculators"):
        export(open_drafter(heads_dir(tiny, tmp_path / "k2", "eagle3", 2, vocab)), "sglang", tmp_path / "x")
    overlay = needs_overlay("specforge")
    ours, _, ids, aux_states, v = koala_inputs(open_drafter(src), tiny.info.source)
    save_file({"ids": ids.contiguous(), "aux": aux_states.contiguous()}, tmp_path / "in.st")
    env = {**os.environ, "PYTHONPATH": f"{overlay}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "koala.export.sglang", str(tmp_path / "s"), str(tmp_path / "in.st"),
                        str(tmp_path / "out.st")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(tmp_path / "out.st")
    got = compare(ours, theirs["logits"], theirs["to_target"], v if v is not None else list(range(ours.shape[-1])),
                  "SpecForge 0.2.0", "sglang")
    assert got["max_abs_logit_diff"] <= 1e-4 * got["logit_scale"] and got["greedy_drafts_identical"] == len(ids)


def test_export_refuses_what_a_format_cannot_hold_and_writes_nothing(tiny, drafter_dir, tmp_path):
    t = tiny
    with pytest.raises(KoalaError, match="use --format hf or gguf"):
        export(open_drafter(drafter_dir), "medusa", tmp_path / "x")
    with pytest.raises(KoalaError, match="holds one"):
        export(open_drafter(heads_dir(t, tmp_path, "eagle", 2)), "speculators", tmp_path / "x")
    old = heads_dir(t, tmp_path / "old", "eagle", 1, embed_norm=False)  # heads saved before the embedding norm
    info = json.loads((old / "heads.json").read_text())
    del info["embed_norm"]
    (old / "heads.json").write_text(json.dumps(info))
    assert load_heads(old, t.model)[0].embed_norm is None  # still loads, and drafts as it was trained
    with pytest.raises(KoalaError, match="train it again"):
        export(open_drafter(old), "speculators", tmp_path / "x")
    with pytest.raises(KoalaError, match="must be one of"):
        export(open_drafter(drafter_dir), "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_koala_export_from_the_registry_alias_logs_the_export_on_the_version(drafter_dir, tmp_path, monkeypatch):
    """`koala export models:/NAME@champion`: the registered drafter, downloaded, exported, and logged as artifacts
    of its version's run with the tag export.FORMAT."""
    import mlflow
    from typer.testing import CliRunner

    from koala.cli import app
    from koala.tracking import Registry, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with Tracker.start(uri, "export-test", "register") as tr:
        logged = tr.log_drafter(drafter_dir, registered_name="koala-drafter-test")
    Registry(uri).make_champion("koala-drafter-test", logged["version"])
    r = CliRunner().invoke(app, ["export", "models:/koala-drafter-test@champion", "--format", "hf", "--out",
                                 str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "logged on koala-drafter-test version 1" in r.output
    assert (tmp_path / "out" / "model.safetensors").exists()
    mv = mlflow.MlflowClient(uri).get_model_version("koala-drafter-test", "1")
    assert mv.tags["export.hf"] == f"runs:/{mv.run_id}/exports/v1/hf"
    files = {f.path for f in mlflow.MlflowClient(uri).list_artifacts(mv.run_id, "exports/v1/hf")}
    assert "exports/v1/hf/model.safetensors" in files and "exports/v1/hf/koala_export.json" in files
    bad = CliRunner().invoke(app, ["export", "models:/koala-drafter-test@nosuch", "--format", "hf", "--out",
                                   str(tmp_path / "out2")])
    assert bad.exit_code == 1 and "not in the registry" in bad.output and not (tmp_path / "out2").exists()


def test_a_killed_export_leaves_no_debris_once_run_again(drafter_dir, tmp_path):
    """`koala export` SIGKILLed after writing, before its rename, twice: --out stays as it was (absent here), each
    run removes the temporary sibling an earlier killed one left, and the next export puts --out in place whole."""
    out = tmp_path / "exported"
    argv = [sys.executable, "-m", "koala_flows.cli", "export", str(drafter_dir), "--format", "hf", "--out", str(out)]
    env = {**os.environ, "KOALA_FAULT": "drafter.rename"}
    left = []
    for _ in range(2):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == -9, r.stderr[-2000:]
        assert not out.exists()
        left.append(set(tmp_path.glob(".exported.*.tmp")))
    assert len(left[0]) == 1 and len(left[1]) == 1 and left[0] != left[1]  # the first kill's debris is gone
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").exists() and not list(tmp_path.glob(".exported.*"))


LLAMA_CPP_CHECK = r'''
import json, sys
import numpy as np
import llama_cpp
path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
llm.eval(ids)
last = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
toks = []
for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
    toks.append(int(t))
    if len(toks) == n:
        break
print(json.dumps({"logits": last.tolist(), "tokens": toks}))
'''


def llama_cpp_python() -> Path:
    """The python of the llama-cpp-python venv `bench/llamacpp.py` builds (minutes: not within the suite's budget)."""
    import subprocess

    from koala.assets import cache_dir

    for marker in sorted((cache_dir() / "llamacpp").glob("venv-*/koala-decodes")):  # a build that decodes here
        py = marker.parent / "bin" / "python"
        if subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return py
    pytest.skip("llama.cpp is not built on this machine (building it takes minutes): `make bench-llamacpp` "
                "builds it into $KOALA_CACHE/llamacpp, and this test then runs")


def test_gguf_export_decodes_in_llama_cpp_as_in_koala(drafter_dir, tmp_path):
    """llama.cpp itself loads the exported drafter: its logits match the export's own reload, and its greedy tokens
    are the same."""
    import subprocess

    from transformers import AutoModelForCausalLM

    from koala.export.gguf import FILE

    py = llama_cpp_python()
    export(open_drafter(drafter_dir), "gguf", tmp_path / "g")
    ids = [1, 504, 3458, 314, 253, 1345, 28, 2]
    r = subprocess.run([str(py), "-c", LLAMA_CPP_CHECK, str(tmp_path / "g" / FILE), json.dumps(ids), "12"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=FILE).eval()
    seq, want = list(ids), []
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0, -1].double()
        for _ in range(12):  # greedy, through end-of-sequence tokens as llama.cpp's generate does
            want.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(want[-1])
    diff = (torch.tensor(got["logits"]) - logits).abs().max().item()
    assert diff <= 1e-3 * max(1.0, logits.abs().max().item()), diff
    assert got["tokens"] == want, (got["tokens"], want)


LLAMA_CPP_SPECULATIVE = r"""
import json, sys
import numpy as np
import llama_cpp
sys.path.insert(0, sys.argv[1])
from koala.export.llamacpp_draft import GGUFDraftModel
source, target, drafters, prompts, n = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.allow_requantize = 0, True  # LLAMA_FTYPE_ALL_F32
assert llama_cpp.llama_model_quantize(source.encode(), target.encode(), p) == 0

def decode(llm, ids):
    llm.reset()
    evals = [0]
    eval_ = llm.eval
    def counted(tokens):
        evals[0] += 1
        return eval_(tokens)
    llm.eval = counted
    toks = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        toks.append(int(t))
        if len(toks) == n:
            break
    llm.eval = eval_
    return toks, evals[0]

out = {"plain": [decode(llama_cpp.Llama(model_path=target, n_ctx=512, verbose=False), ids) for ids in prompts]}
for name, path in drafters.items():
    llm = llama_cpp.Llama(model_path=target, n_ctx=512, verbose=False,
                          draft_model=GGUFDraftModel(path or target, num_pred_tokens=4, n_ctx=512))
    out[name] = [decode(llm, ids) for ids in prompts]
# the drafter's cache across rounds: its drafts after a context that grew, was cut back (rejected drafts) and grew
# again are what a fresh drafter drafts from the whole context
d, fresh = GGUFDraftModel(drafters["export"], 4, n_ctx=512), GGUFDraftModel(drafters["export"], 4, n_ctx=512)
ctx, checks = list(prompts[0]), []
for step in range(8):
    got = [int(t) for t in d(np.asarray(ctx, dtype=np.intc))]
    fresh.llm.reset()
    checks.append((got, [int(t) for t in fresh(np.asarray(ctx, dtype=np.intc))]))
    ctx = ctx + got[:step % 3] + [1000 + step, 2000 + step] if step % 4 != 3 else ctx[:-3]
out["checks"] = checks
print(json.dumps(out))
"""


def test_gguf_export_drafts_for_llama_cpp_and_keeps_its_greedy_tokens(drafter_dir, tmp_path):
    """llama.cpp decodes the default target (F32, converted by llama.cpp from its Q4_1 GGUF) with the exported
    drafter as its draft model (koala.export.llamacpp_draft): greedy tokens identical to its plain decoding, both with
    a drafter it mostly rejects (the random export) and with one it mostly accepts (the target drafting for itself:
    its drafts accepted, so the target runs far fewer times than it emits tokens); and the drafter's own cache, kept
    across rounds, drafts what a fresh one drafts from the whole context. F32: at Q4_1 llama.cpp's batched
    verification and its one-token steps can order a near-tie differently (docs/guides/export.md)."""
    import subprocess

    from koala import assets
    from koala.export.gguf import FILE

    py = llama_cpp_python()
    export(open_drafter(drafter_dir), "gguf", tmp_path / "g")
    prompts = [[1, 504, 3458, 314, 253, 1345, 28, 2], [1, 9690, 198, 2683, 339, 253, 2115]]
    drafters = {"export": str(tmp_path / "g" / FILE), "self": ""}
    r = subprocess.run([str(py), "-c", LLAMA_CPP_SPECULATIVE, str(ROOT), str(assets.path("smollm2-135m-instruct")),
                        str(tmp_path / "target-F32.gguf"), json.dumps(drafters), json.dumps(prompts), "40"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    plain = [toks for toks, _ in got["plain"]]
    assert all(len(t) == 40 for t in plain)
    for name in drafters:
        assert [toks for toks, _ in got[name]] == plain, name
    assert all(evals < 0.5 * 40 for _, evals in got["self"]), got["self"]
    assert all(len(g) == 4 and g == w for g, w in got["checks"]), got["checks"]
