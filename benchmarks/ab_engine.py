"""A/B of the packed forward, one process, runs interleaved: an earlier commit's engine against this one.

    mkdir -p .dev/old && git archive <commit> src | tar -x -C .dev/old
    OUT=. python benchmarks/ab_engine.py        # on a GPU; writes $OUT/ab.json

Variants of this engine: as committed (every weight an nn.Parameter), the out/fc weights as the
model's own Parameters and the rest plain tensors (the earlier engine's mix), and plain tensors.
torch.compile treats Parameters as static inputs; the variants show what that is worth. (The run
in benchmarks/results/ab-engine-nvidia-h200-2026-11-30.* named the plain-tensor variant `new`.)
"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_embed import dataset
from engine_variants import load_old
from virnucpro_core.model import build_esm2
from virnucpro_core.options import ESM2_MODELS
from virnucpro_core.packing import build_plan
from virnucpro_core.tokenizer import Tokenizer
import virnucpro_core.packed_esm as new

load_old(".dev/old")
import oldcore.packed_esm as old


out = {"device": torch.cuda.get_device_name(0), "rows": []}
for shape, ntok in (("esm2_t33_650M_UR50D", 1_000_000), ("esm2_t36_3B_UR50D", 500_000)):
    layers, dim, heads = ESM2_MODELS[shape]
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = build_esm2(layers, dim, heads)
    m = m.to(torch.bfloat16).eval()
    seqs = dataset("uniref", ntok)
    plan = build_plan([len(s) for s in seqs], 65536, "truncate", 0)
    tok = Tokenizer(m.alphabet)
    packs = [(torch.from_numpy(tok.pack_tokens(seqs, p)).cuda(), torch.from_numpy(p.cu_seqlens).cuda(), int(p.lengths.max()) + 2) for p in plan.packs]
    ntoks = sum(int(t.shape[0]) for t, _, _ in packs)
    plain = new.PackedESM2(m, compile=True)
    plain.layers = [type(w)(*[t.detach().clone() if isinstance(t, torch.Tensor) else t for t in w]) for w in plain.layers]
    like_old = new.PackedESM2(m, compile=True)
    like_old.layers = [w._replace(out_w=l.self_attn.out_proj.weight, out_b=l.self_attn.out_proj.bias, fc1_w=l.fc1.weight,
                                  fc1_b=l.fc1.bias, fc2_w=l.fc2.weight, fc2_b=l.fc2.bias) for w, l in zip(plain.layers, m.layers)]
    engines = {"old": old.PackedESM2(m, compile=True), "new_plain_tensors": plain, "new_params_like_old": like_old,
               "new_all_params": new.PackedESM2(m, compile=True)}
    ref = None
    for name, e in engines.items():
        for t, c, mx in packs[:3]:
            e(t, c, mx, [layers])
        r = e(*packs[0], [layers])[layers]
        if ref is None: ref = r
        print(shape, name, "max abs diff vs old", float((r.float() - ref.float()).abs().max()), flush=True)
    times = {k: [] for k in engines}
    for rep in range(4):
        for name, e in engines.items():
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for t, c, mx in packs:
                e(t, c, mx, [layers])
            torch.cuda.synchronize(); times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        row = {"model": shape, "engine": name, "tok_per_s": ntoks / statistics.median(ts), "runs_s": ts}
        out["rows"].append(row); print(row, flush=True)
    del engines, m; torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab.json"), "w"), indent=1)
