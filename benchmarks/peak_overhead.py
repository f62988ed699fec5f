"""What the share of the bf16 peak rests on (issue 28): the peak's measurement, an embed call's fixed cost, cuBLASLt.

    python benchmarks/peak_overhead.py      # writes $OUT/probe2.json (OUT defaults to /tmp/out)

- the bf16 matmul rate of ``torch.mm`` measured nearly as ``bench_embed.py`` does (8192^3, median of 10: a cold
  burst; without its 3 warm-up calls), then after 1 s of back-to-back matmuls (8192^3 and 16384^3, sustained), the
  burst again, and once more at the end;
- the engine's rate (default configuration, real lengths) on 600k and on 2.4M tokens a call (650M): the difference
  is what an ``embed`` call costs besides its packs; with cuBLAS and with cuBLASLt as PyTorch's preferred BLAS
  library for every matmul (650M, 3B, 15B).
"""
import json, os, statistics, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_embed import dataset, matmul_times, random_esm2  # noqa
from virnucpro_core.engine.embedder import Embedder, Outputs  # noqa
from virnucpro_core.engine.packing import build_plan  # noqa
from virnucpro_core.models.loader import LoadedModel  # noqa
from virnucpro_core.options import EmbeddingOptions, PackingOptions  # noqa

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RES = {}


def peak(n, warm_s, reps):
    ts = matmul_times(n, reps, warm_s, warmup_calls=0)
    return {"median": 2 * n**3 / statistics.median(ts) / 1e12, "best": 2 * n**3 / min(ts) / 1e12}


def rate(emb, seqs, budget, reps=2):
    outputs = Outputs.resolve(emb.packed.num_layers, EmbeddingOptions())
    plan = build_plan([len(s) for s in seqs], budget, "truncate", 0)
    emb.embed(seqs, plan, outputs, progress_every=1e9)
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter()
        emb.embed(seqs, plan, outputs, progress_every=1e9)
        torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return sum(len(s) + 2 for s in seqs) / min(ts)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    RES["peak_as_bench"] = peak(8192, 0.0, 10)
    RES["peak_warm1s_8192"] = peak(8192, 1.0, 50)
    RES["peak_warm1s_16384"] = peak(16384, 1.0, 20)
    RES["peak_as_bench_again"] = peak(8192, 0.0, 10)
    print(RES, flush=True)
    for shape, toks in (("650M", (600_000, 2_400_000)), ("3B", (300_000,)), ("15B", (60_000,))):
        name, esm2, params = random_esm2(shape)
        loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
        emb = Embedder(loaded, "cuda", "bfloat16", "auto")
        budget = PackingOptions().budget(esm2.embed_dim)
        for n in toks:
            seqs = dataset("uniref", n)
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                r = rate(emb, seqs, budget)
                RES[f"{shape}/{n}/{lib}"] = {"tok_s": r, "tflops": r * 2 * params / 1e12}
                print(shape, n, lib, RES[f"{shape}/{n}/{lib}"], flush=True)
                (OUT / "probe2.json").write_text(json.dumps(RES, indent=1))
        torch.backends.cuda.preferred_blas_library("cublas")
        del emb, esm2, loaded
        torch.cuda.empty_cache()
    RES["peak_end_warm1s_8192"] = peak(8192, 1.0, 50)
    print(RES["peak_end_warm1s_8192"])
    (OUT / "probe2.json").write_text(json.dumps(RES, indent=1))


if __name__ == "__main__":
    main()
