"""Throughput of every contender in one process on one GPU (issue: throughput).

    python benchmarks/bench_embed.py --out benchmarks/results/<device>-<date>.json

Random-weight ESM-2 of the real shapes, bf16. Datasets (fixed seed): "uniref", proteins with
log-normal lengths (median 300, clipped to 30..1022: real lengths); "short", the six-frame proteins of
300-bp reads as the workflow translates them (``inputs.short_proteins``, median 45 residues); "reads",
lengths uniform in 60..166. Tokens = residues + BOS + EOS. Contenders, each from sequences to
pooled (mean) embeddings on the host:
- baseline (a), fair-esm's forward at its best: bf16, length-sorted batches tokenised ahead into
  pinned memory and copied asynchronously, the best of 4096, 16384 and 32768 tokens per batch
  (the ratio docs/performance.md quotes);
- baseline (b), fair-esm as ``esm-extract`` runs: its ``FastaBatchedDataset``, batch converter and
  ``DataLoader``, its default 4096 tokens per batch, representations copied to the host and
  averaged per sequence there; fp32 (its default) and bf16;
- Hugging Face ``EsmModel`` with SDPA attention, length-sorted batches of 16384 tokens;
- this engine (packed, varlen FlashAttention), in several settings (``--variants``: attention backend, GELU
  and token budget; the first is the default configuration, the one the acceptance block judges);
- the whole embed stage, FASTA file -> shard -> plan -> Parquet file (``--no-stage`` leaves it out).
MFU = tokens/s x 2 x parameters / the measured bf16 matmul peak. ``--profile`` adds a table of
where the engine's GPU time goes (torch profiler, kernels grouped by kind). The ``acceptance`` block holds
the default engine's share of the peak and ratio to (a) against the bars of issue 28.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inputs import short_proteins
from virnucpro_core.engine.embedder import Embedder, Outputs
from virnucpro_core.models.loader import LoadedModel, build_esm2
from virnucpro_core.options import ESM2_MODELS, EmbeddingOptions, Options, PackingOptions
from virnucpro_core.engine.attention import available_backends
from virnucpro_core.engine.packing import build_plan
from virnucpro_core.stages import embed, shard

AA = "ACDEFGHIKLMNPQRSTVWY"
SHAPES = {"650M": "esm2_t33_650M_UR50D", "3B": "esm2_t36_3B_UR50D", "15B": "esm2_t48_15B_UR50D", "8M": "esm2_t6_8M_UR50D"}
# issue 28's bars: (model, dataset) -> (share of the bf16 peak, ratio to fair-esm at its best), None: no bar
BARS = {("esm2_t33_650M_UR50D", "uniref"): (0.62, 3.7), ("esm2_t36_3B_UR50D", "uniref"): (0.74, 2.6),
        ("esm2_t48_15B_UR50D", "uniref"): (0.84, None), ("esm2_t33_650M_UR50D", "short"): (None, 2.2)}


def dataset(kind: str, n_tokens: int, seed: int = 0) -> list[str]:
    if kind == "short":
        return short_proteins(n_tokens, seed)
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < n_tokens:
        if kind == "uniref":
            lengths.append(int(np.clip(rng.lognormal(np.log(300), 0.6), 30, 1022)))
        else:
            lengths.append(int(rng.integers(60, 167)))
        total += lengths[-1] + 2
    alphabet = np.frombuffer(AA.encode(), dtype=np.uint8)
    return [alphabet[rng.integers(0, 20, n)].tobytes().decode() for n in lengths]


def random_esm2(shape: str):
    """Random weights of a real shape on the GPU, bf16: (fair-esm name, model, parameter count)."""
    name = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device("cuda"):
        esm2 = build_esm2(*ESM2_MODELS[name])
    esm2 = esm2.to(torch.bfloat16).eval()
    return name, esm2, sum(p.numel() for p in esm2.parameters())


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def matmul_times(n: int = 8192, reps: int = 10, warm_s: float = 0.0, warmup_calls: int = 3) -> list[float]:
    """Seconds of each of ``reps`` timed bf16 ``torch.mm`` calls on n x n (CUDA events), after ``warmup_calls``
    calls and then ``warm_s`` seconds of back-to-back calls."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup_calls):
        a @ b
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        a @ b
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return times


def matmul_peak(n: int = 8192, reps: int = 10, warm_s: float = 0.0) -> float:
    """The bf16 rate of ``torch.mm`` on n x n (FLOP/s, median of ``reps``): after 3 calls (a cold burst, the MFU's
    denominator), or after ``warm_s`` seconds of back-to-back calls (sustained: on an H200 12-13% lower,
    docs/performance.md)."""
    return 2 * n**3 / statistics.median(matmul_times(n, reps, warm_s))


def sorted_batches(seqs: list[str], toks_per_batch: int) -> list[list[int]]:
    """esm-extract's batching: sequences sorted by length, (max_len + 2) x n <= toks_per_batch."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(seqs[i]) + 2
        if cur and max(cur_max, n) * (len(cur) + 1) > toks_per_batch:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    return batches


def pretokenised(alphabet, seqs, batches) -> list[tuple[list[int], torch.Tensor]]:
    """fair-esm's batch converter applied ahead, into pinned host memory (outside the timed region)."""
    conv = alphabet.get_batch_converter()
    return [(b, conv([(str(i), seqs[i]) for i in b])[2].pin_memory()) for b in batches]


@torch.inference_mode()
def run_fair_esm_best(model, alphabet, n_seqs, ready) -> np.ndarray:
    """Baseline (a): fair-esm's own forward, batches ready in pinned memory, copied asynchronously."""
    layer = model.num_layers
    out = torch.empty(n_seqs, model.embed_dim, device="cuda")
    for b, toks in ready:
        toks = toks.cuda(non_blocking=True)
        rep = model(toks, repr_layers=[layer])["representations"][layer]
        mask = ((toks != alphabet.padding_idx) & (toks != alphabet.cls_idx) & (toks != alphabet.eos_idx)).unsqueeze(-1)
        out[torch.tensor(b).cuda(non_blocking=True)] = (rep.float() * mask).sum(1) / mask.sum(1)
    return out.cpu().numpy()


@torch.inference_mode()
def run_esm_extract(model, alphabet, fasta: Path, toks_per_batch: int = 4096) -> dict:
    """Baseline (b): the loop of fair-esm's ``scripts/extract.py`` (esm-extract) with ``--include mean``."""
    import esm

    dataset = esm.FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches)
    layer, means = model.num_layers, {}
    for labels, strs, toks in loader:
        toks = toks.to(device="cuda", non_blocking=True)
        out = model(toks, repr_layers=[layer], return_contacts=False)
        rep = out["representations"][layer].to(device="cpu")
        for i, label in enumerate(labels):
            n = min(1022, len(strs[i]))
            means[label] = rep[i, 1 : n + 1].mean(0).clone()
    return means


def profile_engine(emb, seqs, plan, outputs, top: int = 0) -> dict:
    """Share of GPU kernel time by kind over one pass, the host gap (wall - kernel time), and the
    ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]):  # the profiler's own start-up, outside the measured pass
        torch.zeros(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        emb.embed(seqs, plan, outputs, progress_every=1e9)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    # attention first: FlashAttention-3 kernels are CUTLASS kernels, named like GEMMs
    kinds = {"attention": ("flash", "fmha", "attention"), "gemm": ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_"),
             "fc1 + GELU (Triton matmul)": ("_linear",),
             "element-wise, norm, rotary (Triton, fused)": ("triton", "rotary", "layer_norm", "gelu"), "copies": ("memcpy", "memset", "copy")}
    totals: dict[str, float] = {}
    rows = sorted(((e.key, e.count, e.self_device_time_total / 1e6) for e in prof.key_averages() if e.device_type.name == "CUDA"),
                  key=lambda r: -r[2])
    for key, _, seconds in rows:
        kind = next((k for k, keys in kinds.items() if any(x in key.lower() for x in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + seconds
    kernel = sum(totals.values())
    out = {"wall_s": wall, "kernel_s": kernel, "share_of_wall": {k: v / wall for k, v in sorted(totals.items())},
           "host_gap_share": max(0.0, 1 - kernel / wall)}
    if top:
        out["top"] = [{"kernel": k[:160], "calls": c, "s": s, "share": s / wall} for k, c, s in rows[:top]]
    return out


@torch.inference_mode()
def run_hf(model, alphabet, seqs, batches) -> np.ndarray:
    conv = alphabet.get_batch_converter()
    out = torch.empty(len(seqs), model.config.hidden_size, device="cuda")
    for b in batches:
        _, _, toks = conv([(str(i), seqs[i]) for i in b])
        toks = toks.cuda(non_blocking=True)
        att = (toks != alphabet.padding_idx).long()
        rep = model(input_ids=toks, attention_mask=att).last_hidden_state
        mask = (att.bool() & (toks != alphabet.cls_idx) & (toks != alphabet.eos_idx)).unsqueeze(-1)
        out[torch.tensor(b, device="cuda")] = (rep.float() * mask).sum(1) / mask.sum(1)
    return out.cpu().numpy()


def hf_model(layers, dim, heads):
    from transformers import EsmConfig, EsmModel

    cfg = EsmConfig(
        vocab_size=33, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * dim,
        position_embedding_type="rotary", token_dropout=True, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5,
        emb_layer_norm_before=False, max_position_embeddings=1026,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        m = EsmModel(cfg, add_pooling_layer=False)
    return m.to(torch.bfloat16).eval()


def acceptance(doc: dict) -> None:
    """The default engine against issue 28's bars, for the (model, dataset) pairs measured so far."""
    out = {}
    for key, d in doc.get("default_engine", {}).items():
        bar = BARS.get(tuple(key.split("/")))
        if bar is None:
            continue
        mfu_bar, ratio_bar = bar
        out[key] = {"mfu": d["mfu"], "mfu_bar": mfu_bar, "ratio": d["ratio_vs_baseline"], "ratio_bar": ratio_bar,
                    "pass": (mfu_bar is None or d["mfu"] >= mfu_bar) and (ratio_bar is None or (d["ratio_vs_baseline"] or 0) >= ratio_bar)}
    doc["acceptance"] = out
    doc["acceptance_all_pass"] = all(v["pass"] for v in out.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="650M,3B")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--tokens-3b", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=2)
    ap.add_argument("--variants", default="auto:auto:model,auto:auto:65536,auto:auto:131072,auto:exact:model,fa2:exact:65536",
                    help="engine settings, attention:gelu:budget each (fa2: the FlashAttention-2 backend found; model: the "
                         "model's default budget); the first is the default configuration, the last the engine before issue 28")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--datasets", default="uniref,short", help="short and reads run for the 650M shape only")
    ap.add_argument("--baseline-budgets", default="4096,16384,32768", help="baseline (a): fair-esm tokens per batch")
    ap.add_argument("--extract-tokens", type=int, default=300_000, help="baseline (b) runs on the first sequences of this many tokens")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="no baselines and no whole-stage run")
    ap.add_argument("--engine-only-shapes", default="15B", help="shapes measured without baselines or whole-stage run")
    ap.add_argument("--no-stage", action="store_true", help="no whole-stage run")
    ap.add_argument("--tokens-15b", type=int, default=120_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak()
    sustained = matmul_peak(reps=50, warm_s=1.0)
    print(f"bf16 matmul peak (8192^3, median of 10): {peak / 1e12:.0f} TFLOP/s; sustained (after 1 s): {sustained / 1e12:.0f}",
          flush=True)
    records = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "commit": commit,
           "torch": torch.__version__, "bf16_peak_tflops": peak / 1e12, "bf16_sustained_tflops": sustained / 1e12,
           "records": records}
    fa2 = next(b for b in available_backends(torch.device("cuda"), torch.bfloat16) if b in ("flash_attn", "torch_varlen"))
    variant_specs = [v.split(":") for v in args.variants.split(",")]

    def record(model, data, variant, times, tokens, params, peak_gib, base=None):
        tps = tokens / statistics.median(times)
        r = {
            "model": model, "dataset": data, "variant": variant, "tok_per_s": tps,
            "ratio_vs_baseline": tps / base if base else 1.0 if variant.startswith("(a)") else None, "mfu": tps * 2 * params / peak,
            "share_of_sustained": tps * 2 * params / sustained, "peak_gib": peak_gib, "runs_s": times, "tokens": tokens,
        }
        records.append(r)
        print(f"{model:>20} {data:>7} {variant:<40} {tps:>10.0f} tok/s  x{r['ratio_vs_baseline'] or 0:.2f}  MFU {100 * r['mfu']:.1f}%  "
              f"peak {peak_gib:.1f} GiB  runs {[round(t, 2) for t in times]}", flush=True)
        if args.out:  # after every record, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(doc, indent=1))
        return tps

    for shape in args.shapes.split(","):
        engine_only = args.engine_only or shape in args.engine_only_shapes.split(",")
        name, esm2, params = random_esm2(shape)
        layers, dim, heads = ESM2_MODELS[name]
        loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
        datasets = [d for d in args.datasets.split(",") if d == "uniref" or shape == "650M"]
        for data in datasets:
            seqs = dataset(data, {"3B": args.tokens_3b, "15B": args.tokens_15b}.get(shape, args.tokens))
            tokens = sum(len(s) + 2 for s in seqs)
            batches = sorted_batches(seqs, 16384)
            print(f"\n{name}: {params / 1e6:.0f}M parameters; {data}: {len(seqs)} sequences, {tokens} tokens", flush=True)

            def timed(fn, repeats, warm=None):
                (warm or fn)()  # one warm-up pass (kernels, cuBLAS heuristics, allocator)
                torch.cuda.reset_peak_memory_stats()
                times = [sync_time(fn) for _ in range(repeats)]
                return times, torch.cuda.max_memory_allocated() / 2**30

            best, base = (0.0, 0), None
            for tpb in () if engine_only else (int(x) for x in args.baseline_budgets.split(",")):
                ready = pretokenised(esm2.alphabet, seqs, sorted_batches(seqs, tpb))
                warm = ready[:: max(1, len(ready) // 8)]  # a few batches of every length: kernels and heuristics
                t, m = timed(lambda: run_fair_esm_best(esm2, esm2.alphabet, len(seqs), ready), args.baseline_repeats,
                             lambda: run_fair_esm_best(esm2, esm2.alphabet, len(seqs), warm))
                tps = record(name, data, f"(a) fair-esm bf16 pre-tokenised pinned {tpb} tok/batch", t, tokens, params, m)
                best = max(best, (tps, tpb))
                ready = None  # frees the pinned batches
            if not engine_only:
                base = best[0]
                doc.setdefault("baseline_a", {})[f"{name}/{data}"] = {"tok_per_s": best[0], "tokens_per_batch": best[1]}
            if data == "uniref" and args.extract_tokens and not engine_only:
                sub, n_tok = [], 0
                for q in seqs:
                    if n_tok >= args.extract_tokens // (3 if shape == "3B" else 1):
                        break
                    sub.append(q)
                    n_tok += len(q) + 2
                with tempfile.TemporaryDirectory() as tmp:
                    fasta = Path(tmp) / "sub.faa"
                    fasta.write_text("".join(f">s{i}\n{q}\n" for i, q in enumerate(sub)))
                    for dt in ("float32", "bfloat16"):
                        model = esm2.float() if dt == "float32" else esm2.to(torch.bfloat16)
                        t, m = timed(lambda: run_esm_extract(model, esm2.alphabet, fasta), 1)
                        record(name, data, f"(b) esm-extract {dt} 4096 tok/batch", t, n_tok, params, m, base)
                    esm2 = esm2.to(torch.bfloat16)
            if not args.skip_hf and not engine_only:
                hf = hf_model(layers, dim, heads)
                t, m = timed(lambda: run_hf(hf, esm2.alphabet, seqs, batches), args.baseline_repeats)
                record(name, data, "HF EsmModel SDPA bf16 sorted 16384", t, tokens, params, m, base)
                del hf
                torch.cuda.empty_cache()
            lengths = [len(s) for s in seqs]
            outputs = Outputs.resolve(layers, EmbeddingOptions())
            variants = [(fa2 if b == "fa2" else b, g, PackingOptions().budget(dim) if n == "model" else int(n)) for b, g, n in variant_specs]
            for i, (backend, gelu, budget) in enumerate(dict.fromkeys(variants)):  # each once, in order
                emb = Embedder(loaded, "cuda", "bfloat16", backend, gelu)  # over the same weights (already bf16 there)
                plan = build_plan(lengths, budget, "truncate", 0)

                def go():
                    return emb.embed(seqs, plan, outputs, progress_every=1e9)

                t, m = timed(go, args.repeats)
                label = f"engine {emb.backend} {emb.packed.gelu}-GELU budget {budget}"
                tps = record(name, data, label, t, tokens, params, m, base)
                if i == 0:
                    doc.setdefault("default_engine", {})[f"{name}/{data}"] = {"variant": label, "tok_per_s": tps, "mfu": tps * 2 * params / peak,
                                                                             "share_of_sustained": tps * 2 * params / sustained,
                                                                             "ratio_vs_baseline": tps / base if base else None}
                if args.profile and i == 0 and data == "uniref":
                    prof = profile_engine(emb, seqs, plan, outputs)
                    doc.setdefault("profile", {})[name] = prof
                    print(f"profile {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in prof["share_of_wall"].items())
                          + f", host gap {100 * prof['host_gap_share']:.1f}%", flush=True)
            emb = None
            acceptance(doc)
            if args.out:
                Path(args.out).write_text(json.dumps(doc, indent=1))
            if engine_only or args.no_stage:
                continue
            # the whole stage: FASTA -> shard -> plan -> embed -> Parquet
            with tempfile.TemporaryDirectory() as tmp:
                fasta = Path(tmp) / "in.faa"
                fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))

                opts = Options().replace(shards=1, input_parts=1, **{"embedding.device": "cuda",
                                                      "embedding.lock_dir": str(Path(tmp) / "locks")})

                def stage():
                    man = shard.run([str(fasta)], Path(tmp) / "shards", opts)
                    parts = [Path(tmp) / "shards" / f"{p}.parquet" for p in man["shards"][0]["parts"]]
                    embed.run(parts, loaded, Path(tmp) / "emb.parquet", opts)

                t, m = timed(stage, args.repeats)
                record(name, data, "stage FASTA->Parquet (defaults)", t, tokens, params, m, base)
        esm2 = loaded = None  # frees the GPU memory for the next shape
        torch.cuda.empty_cache()

    return 0


if __name__ == "__main__":
    sys.exit(main())
