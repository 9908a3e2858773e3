"""koala's engine beside llama.cpp on this CPU: the same prompts, threads and weights, in one run.

    python bench/llamacpp.py --json bench/results/llamacpp.json

llama.cpp is what a CPU user would run instead of koala's engine. This bench builds `llama-cpp-python` from PyPI's
source distribution into a venv of its own under $KOALA_CACHE/llamacpp (once per machine and Python; minutes; it
never touches koala's venv or pulls torch), converts the default target's shipped Q4_1 GGUF to BF16, F32 and Q8_0
with llama.cpp's own quantizer (so BF16 and F32 hold the same weights koala decodes: the Q4_1 values, dequantised;
Q8_0 requantises them to 8 bits in blocks of 32), and measures, on the first prompts of MT-bench (one per category,
chat-templated by the target's tokenizer), greedy:

* llama.cpp's plain decoding at Q4_1, BF16, F32 and Q8_0: end-to-end tokens/s (every repetition prefills its prompt,
  as koala's does) and decode-only (after the first new token);
* koala's compiled engine, autoregressive and speculative (the drafter given, prompt lookup in front, draft shape
  `auto`), at float32, bfloat16, and int8 weights on bfloat16 activations (`eval.weights: int8`: 8 bits per weight
  and a scale per output channel, set beside Q8_0), or those `--precisions` names, through `koala.evaluate` (the
  same measurement as `koala eval`), end to end and decode-only;
* with `--gguf-drafter`, llama.cpp decoding F32 and BF16 with a koala independent drafter as its draft model
  (`koala.export.llamacpp_draft.GGUFDraftModel`, k tokens per round), and whether its tokens are its plain decoding's.

Every figure is a mean over `--reps` repetitions of every prompt. The JSON records the CPU model and its matrix-unit
flags, threads, torch and llama-cpp-python versions, and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
FTYPES = {"F32": 0, "BF16": 32, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, _MOSTLY_BF16, _MOSTLY_Q8_0
# koala's precision (its key in the JSON) -> (eval dtype, eval weights, the llama.cpp precision it is set beside)
# koala's precisions: (dtype, eval.weights, the llama.cpp weights it is compared with). bf16-weights is llama.cpp's
# BF16 exactly: bf16 weights, float32 arithmetic; bfloat16 computes in bf16 too.
KOALA = {"float32": ("float32", "full", "F32"), "bf16-weights": ("float32", "bf16", "BF16"),
         "bfloat16": ("bfloat16", "full", "BF16"), "int8": ("bfloat16", "int8", "Q8_0")}

# Runs inside llama.cpp's venv: reads a job on stdin, prints one JSON line.
WORKER = r'''
import json, sys, time
import llama_cpp
job = json.load(sys.stdin)
sys.path.insert(0, job["root"])  # koala.export.llamacpp_draft: numpy and llama_cpp only
out = {"version": llama_cpp.__version__, "models": {}, "speculative": {}}
for name, src in job["convert"].items():
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = job["ftypes"][name]
    p.allow_requantize = True
    if llama_cpp.llama_model_quantize(src["from"].encode(), src["to"].encode(), p) != 0:
        raise SystemExit(f"llama.cpp could not convert {src['from']} to {name}")

def measure(llm):
    eos = llm.token_eos()
    rows = []
    for ids in job["prompts"]:
        for _ in range(job["reps"]):
            llm.reset()  # every repetition prefills its prompt, as koala's does (no prefix reused from the last)
            t0 = time.perf_counter()
            t1, toks = None, []
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if t1 is None:
                    t1 = time.perf_counter()
                if tok == eos:
                    break
                toks.append(tok)
                if len(toks) >= job["max_new_tokens"]:
                    break
            t2 = time.perf_counter()
            rows.append({"new_tokens": len(toks), "wall_s": t2 - t0, "decode_s": t2 - t1, "tokens": toks})
    return rows

def model(path, draft=None):
    return llama_cpp.Llama(model_path=path, n_ctx=job["n_ctx"], n_threads=job["threads"],
                           n_threads_batch=job["threads"], verbose=False, draft_model=draft)

for name, path in job["models"].items():
    llm = model(path)
    out["models"][name] = measure(llm)
    del llm
if job.get("drafter"):
    from koala.export.llamacpp_draft import GGUFDraftModel
    for name in job["draft_on"]:
        for k in job["draft_tokens"]:
            draft = GGUFDraftModel(job["drafter"], num_pred_tokens=k, n_ctx=job["n_ctx"], n_threads=job["threads"])
            llm = model(job["models"][name], draft)
            out["speculative"][f"{name} k={k}"] = measure(llm)
            del llm, draft
print(json.dumps(out))
'''


# llama.cpp's CPU kernels for this CPU's vector units without GGML_NATIVE: a native build may emit instructions a VM
# masks (AMX tiles the kernel has not granted), which stop llama.cpp with SIGILL on its first matrix product.
PORTABLE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
            "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
DECODES = "koala-decodes"  # written into a build's venv once it has decoded on this CPU
SMOKE = "import llama_cpp, sys; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); " \
        "next(iter(llm.generate([1, 2, 3], top_k=1, temp=0.0)))"


def llamacpp_python(cache: Path, gguf: Path, build: str = "auto") -> tuple[Path, str]:
    """The python of a venv holding a llama-cpp-python that decodes on this CPU, and its build flags: built here
    from the sdist on first use (minutes), natively, or with portable flags where the native build cannot run."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    for name, flags in (("native", ""), ("portable", PORTABLE)):
        if build not in ("auto", name):
            continue
        venv = cache / "llamacpp" / f"venv-{version}-py{sys.version_info.major}{sys.version_info.minor}-{name}"
        py = venv / "bin" / "python"
        if not py.exists():
            print(f"building {LLAMA_CPP_PYTHON} ({name}) into {venv}: minutes, once per machine", file=sys.stderr,
                  flush=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            env = {**os.environ, **({"CMAKE_ARGS": flags} if flags else {})}
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA_CPP_PYTHON], check=True,
                           env=env)
        r = subprocess.run([str(py), "-c", SMOKE, str(gguf)], capture_output=True)
        if r.returncode == 0:
            (venv / DECODES).write_text(flags or "native")  # what the tests look for
            return py, flags or "native"
        print(f"the {name} build cannot decode here (exit status {r.returncode}); trying the next", file=sys.stderr)
    raise SystemExit("llama-cpp-python could not be built to decode on this CPU")


def run_llamacpp(py: Path, gguf: Path, work: Path, prompts: list[list[int]], threads: int, max_new: int,
                 reps: int, drafter: Path | None = None, draft_tokens: tuple[int, ...] = ()) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    convert = {n: {"from": str(gguf), "to": str(work / f"target-{n}.gguf")} for n in FTYPES
               if not (work / f"target-{n}.gguf").exists()}
    models = {"Q4_1": str(gguf), **{n: str(work / f"target-{n}.gguf") for n in FTYPES}}
    job = {"convert": convert, "ftypes": FTYPES, "models": models, "prompts": prompts, "threads": threads,
           "max_new_tokens": max_new, "reps": reps, "n_ctx": 1024, "root": str(ROOT),
           "drafter": str(drafter) if drafter else None, "draft_on": ["F32", "BF16"],
           "draft_tokens": list(draft_tokens)}
    r = subprocess.run([str(py), "-c", WORKER], input=json.dumps(job), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp's run failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise_llamacpp(rows: list[dict], plain: list[dict] | None = None) -> dict:
    """Tokens/s end to end (each repetition prefills its prompt) and decoding alone (after the first new token);
    with `plain`, whether every repetition's tokens are those of llama.cpp's plain decoding at that precision."""
    n = sum(r["new_tokens"] for r in rows)
    out = {"tokens_per_s": round(n / sum(r["wall_s"] for r in rows), 2),
           "decode_tokens_per_s": round(sum(r["new_tokens"] - 1 for r in rows) / sum(r["decode_s"] for r in rows), 2),
           "new_tokens": n}
    if plain is not None:
        same = sum(r["tokens"] == p["tokens"] for r, p in zip(rows, plain))
        out["identical_to_plain"] = f"{same}/{len(rows)}"
    return out


def export_gguf(spec: str, work: Path) -> Path:
    """An independent koala drafter (a directory) exported to GGUF, or a GGUF file as it is."""
    from koala.export import export, open_drafter
    from koala.export.gguf import FILE

    if spec.endswith(".gguf"):
        return Path(spec)
    out = work / "drafter-gguf"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    export(open_drafter(Path(spec)), "gguf", out)
    return out / FILE


def run_koala(dtype: str, weights: str, drafter: str, limit: int, max_new: int, reps: int) -> dict:
    from koala.config import EvalConfig
    from koala.engine.compile import compile_seconds
    from koala.engine.session import Session
    from koala.evaluate import evaluate

    s = Session.open("smollm2-135m-instruct", dtype=dtype, compile=True, weights=weights)
    cfg = EvalConfig(bench="mtbench", limit=limit, max_new_tokens=max_new, gamma="auto", lookup=True, threshold=0.5,
                     compile=True)
    ar, sp, taus, shapes, rows = [], [], [], [], []
    for _ in range(reps):
        s.autoregressive.clear()  # each repetition measures the target alone again
        r = evaluate(s, drafter, cfg)
        ar.append(r.tokens_per_s.autoregressive)
        sp.append(r.tokens_per_s.speculative)
        taus.append(r.tau)
        shapes.append(r.tree or f"chain {r.gamma}")
        rows += r.per_prompt
    # decoding alone, as llama.cpp's decode_tokens_per_s: the tokens after the first over the time after it
    ar_decode = sum(p.ar_new_tokens - 1 for p in rows) / sum(p.ar_wall_s - p.ar_prefill_s for p in rows)
    sp_decode = sum(p.new_tokens - 1 for p in rows) / sum(p.wall_s - p.prefill_s for p in rows)
    return {"engine": s.describe(), "autoregressive_tokens_per_s": round(sum(ar) / reps, 2),
            "speculative_tokens_per_s": round(sum(sp) / reps, 2), "autoregressive_decode_tokens_per_s":
            round(ar_decode, 2), "speculative_decode_tokens_per_s": round(sp_decode, 2),
            "tau": round(sum(taus) / reps, 3),
            "draft_shapes": shapes, "lossless": r.lossless.text, "near_ties": len(r.lossless.near_ties),
            "compile_s": round(compile_seconds(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="heads:runs/default/drafter/heads/heads",
                    help="koala's drafter (prompt lookup goes in front)")
    ap.add_argument("--prompts", type=int, default=4, help="the first N MT-bench prompts (one per category)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", choices=("auto", "native", "portable"), default="auto",
                    help="llama.cpp's build: native (this CPU's every instruction), portable (its vector units "
                    "without GGML_NATIVE), auto (native, else portable)")
    ap.add_argument("--gguf-drafter", default=None,
                    help="an independent koala drafter (its directory, exported here with `--format gguf`) or a GGUF "
                    "file: llama.cpp also decodes with it as its draft model (koala.export.llamacpp_draft)")
    ap.add_argument("--draft-tokens", default="2,4", help="tokens the GGUF drafter drafts per round, each measured")
    ap.add_argument("--precisions", default=",".join(KOALA),
                    help="koala's precisions measured, of " + ", ".join(KOALA) + " (a CPU without a bf16 matrix unit "
                    "decodes bf16 slowly: koala decodes float32 there)")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args()
    precisions = a.precisions.split(",")
    if unknown := [p for p in precisions if p not in KOALA]:
        raise SystemExit(f"--precisions {','.join(unknown)}: give some of {', '.join(KOALA)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import assets, benchinfo
    from koala.evaluate import load_bench
    from koala.targets import encode_chat, load_target
    from koala.threads import configure_threads

    threads = configure_threads()
    gguf = assets.path("smollm2-135m-instruct")
    tok = load_target("smollm2-135m-instruct").tokenizer
    prompts = [encode_chat(tok, list(r.messages)) for r in load_bench("mtbench", a.prompts)]
    t0 = time.perf_counter()
    py, flags = llamacpp_python(assets.cache_dir(), gguf, a.build)
    build_s = time.perf_counter() - t0
    work = assets.cache_dir() / "llamacpp" / "models"
    drafter = export_gguf(a.gguf_drafter, work) if a.gguf_drafter else None
    k = tuple(int(x) for x in a.draft_tokens.split(",")) if drafter else ()
    lc = run_llamacpp(py, gguf, work, prompts, threads, a.max_new_tokens, a.reps, drafter, k)
    llama = {name: summarise_llamacpp(rows) for name, rows in lc["models"].items()}
    llama_spec = {name: summarise_llamacpp(rows, lc["models"][name.split()[0]])
                  for name, rows in lc["speculative"].items()}
    for name, s in llama_spec.items():
        s["over_plain"] = round(s["tokens_per_s"] / llama[name.split()[0]]["tokens_per_s"], 3)
    koala = {name: run_koala(dtype, weights, a.drafter, a.prompts, a.max_new_tokens, a.reps)
             for name, (dtype, weights, _) in KOALA.items() if name in precisions}
    pairs = {name: lc_name for name, (_, _, lc_name) in KOALA.items()}
    out = {**benchinfo.header(), "command": "python bench/llamacpp.py " + " ".join(sys.argv[1:]),
           "llama_cpp_python": lc["version"], "llama_cpp_build": flags, "llama_cpp_build_s": round(build_s, 1),
           "threads": threads,
           "prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "reps": a.reps, "drafter": a.drafter,
           "llama_cpp": llama, "gguf_drafter": a.gguf_drafter, "llama_cpp_speculative": llama_spec, "koala": koala,
           "ratios": {d: {"koala_ar_over_llamacpp_ar": round(k["autoregressive_tokens_per_s"] /
                                                            llama[pairs[d]]["tokens_per_s"], 3),
                          "koala_speculative_over_llamacpp_ar": round(k["speculative_tokens_per_s"] /
                                                                    llama[pairs[d]]["tokens_per_s"], 3),
                          "decode_koala_ar_over_llamacpp_ar": round(k["autoregressive_decode_tokens_per_s"] /
                                                                   llama[pairs[d]]["decode_tokens_per_s"], 3),
                          "decode_koala_speculative_over_llamacpp_ar": round(
                              k["speculative_decode_tokens_per_s"] / llama[pairs[d]]["decode_tokens_per_s"], 3)}
                      for d, k in koala.items()}}
    benchinfo.write(out, a.json)


if __name__ == "__main__":
    main()
