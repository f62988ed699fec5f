"""Probe (issue 28, finished experiment): the residual stream stored every second layer norm (22 instead of 24 bytes an
element a layer), the layer-norm kernel's warps, and a rotary kernel with one program a head and block of tokens.

    python benchmarks/residual_rotary_probe.py OUT.json   (on a GPU; result: benchmarks/results/residual-rotary-probe-*)
"""
import json, statistics, sys, time
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")  # run from the repository root
from bench_embed import dataset, random_esm2, sync_time, matmul_peak
from virnucpro_core.engine import kernels, packed_esm2
from virnucpro_core.engine.packed_esm2 import Update, Residual
from virnucpro_core.engine.attention import position_ids, rotary_tables
from virnucpro_core.engine.embedder import Embedder, Outputs
from virnucpro_core.engine.packing import build_plan
from virnucpro_core.models.loader import LoadedModel
from virnucpro_core.options import ESM2_MODELS, EmbeddingOptions, PackingOptions

out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
OUT = sys.argv[1]

def gpu_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

@triton.jit(do_not_specialize=["T"])
def _rotary_grid(qkv, cos, sin, out, T, H: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program a block of tokens and one head of q or k (the 2H heads of a block are neighbours: the tables in L2)."""
    D: tl.constexpr = H * 2 * HALF
    pid = tl.program_id(0)
    i = pid % (2 * H)
    t = ((pid // (2 * H)) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    j = tl.arange(0, HALF_P2)[None, :]
    m = (t < T) & (j < HALF)
    c = tl.load(cos + t * (2 * HALF) + j, mask=m, other=0.0)
    s = tl.load(sin + t * (2 * HALF) + j, mask=m, other=0.0)
    src = qkv + t * (3 * D) + i * (2 * HALF) + j
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = out + ((i // H) * T + t) * D + (i % H) * (2 * HALF) + j
    tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=m)

BEST_ROTARY = {}

def rotary_variant(kernel, qkv, cos, sin, block, warps):
    T, _, H, d = qkv.shape
    o = torch.empty(2, T, H, d, dtype=qkv.dtype, device=qkv.device)
    grid = triton.cdiv(T, block) * (2 * H if kernel is _rotary_grid else 1)
    kernel[(grid,)](qkv, cos, sin, o, T, H=H, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2), BLOCK_T=block, num_warps=warps)
    return o[0], o[1]

# -- kernels --------------------------------------------------------------------------------------------------
micro = []
for shape, T, D, H in [("650M", 131072, 1280, 20), ("3B", 65536, 2560, 40), ("15B", 65536, 5120, 40)]:
    d = D // H
    x = torch.randn(T, D, device="cuda")
    buf = torch.empty_like(x)
    copy_ms = gpu_ms(lambda: buf.copy_(x))
    r = {"shape": shape, "T": T, "D": D, "copy_GBps": 2 * x.numel() * 4 / copy_ms / 1e6}
    y1 = torch.randn(T, D, device="cuda").bfloat16(); y2 = torch.randn(T, D, device="cuda").bfloat16()
    bias = torch.randn(D, device="cuda").bfloat16(); w = torch.randn(D, device="cuda"); b = torch.randn(D, device="cuda")
    for label, ups, store, nbytes in [("1 update, stored (before)", (Update(y1, bias),), True, 12),
                                      ("1 update, not stored", (Update(y1, bias),), False, 8),
                                      ("2 updates, stored", (Update(y1, bias), Update(y2)), True, 14)]:
        ms = gpu_ms(lambda: kernels.add_layer_norm(x, ups, w, b, 1e-5, torch.bfloat16, store))
        r[f"add_ln {label} ms"] = ms
        r[f"add_ln {label} GBps"] = T * D * nbytes / ms / 1e6
    h = torch.empty(T, D, device="cuda", dtype=torch.bfloat16)
    for ups, store, nbytes in [(1, True, 12), (1, False, 8), (2, True, 14)]:
        for warps in (2, 4, 8, 16):
            ms = gpu_ms(lambda: kernels._add_layer_norm[(T,)](x, y1, bias, y2, bias, w, b, h, D, 1e-5, UPDATES=ups, BIAS1=True, BIAS2=False,
                                                              STORE=store, BLOCK=triton.next_power_of_2(D), num_warps=warps))
            r[f"add_ln {ups} updates store={store} {warps} warps GBps"] = T * D * nbytes / ms / 1e6
    qkv = torch.randn(T, 3, H, d, device="cuda").bfloat16()
    cos, sin = rotary_tables(position_ids(torch.tensor([0, T], device="cuda", dtype=torch.int32), T), d)
    rbytes = T * (2 * D * 2 * 2 + d * 4)  # q, k read and written; cos/sin halves
    ms = gpu_ms(lambda: kernels.rotary_qk(qkv, cos, sin))
    r["rotary ms"], r["rotary GBps"] = ms, rbytes / ms / 1e6
    want = kernels.rotary_qk(qkv, cos, sin)
    best = (0.0, None)
    for kname, kern in [("loop", kernels._rotary_qk), ("grid", _rotary_grid)]:
        for block, warps in [(32, 4), (64, 4), (16, 2)] if kname == "loop" else [(16, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8)]:
            got = rotary_variant(kern, qkv, cos, sin, block, warps)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kname
            ms = gpu_ms(lambda: rotary_variant(kern, qkv, cos, sin, block, warps))
            r[f"rotary {kname} {block}x{warps} GBps"] = rbytes / ms / 1e6
            if kname == "grid":
                best = max(best, (rbytes / ms / 1e6, (block, warps)))
    r["rotary grid best"] = best[1]
    BEST_ROTARY[shape] = best[1]
    print(json.dumps(r), flush=True)
    micro.append(r)
    del x, buf, y1, y2, qkv
    torch.cuda.empty_cache()
out["kernels"] = micro
json.dump(out, open(OUT, "w"), indent=1)

# -- engine A/B: before (every layer norm stores, 16 warps from 8192 columns, rotary loop) against the changes -------
new_ln = Residual.layer_norm
def old_ln(self, weight, bias, eps):
    self.x, h = self.ops.add_layer_norm(self.x, self.pending, weight, bias, eps, self.dtype, True)
    self.pending = ()
    return h
new_warps = kernels.norm_warps
old_warps = lambda block: min(16, max(4, block // 512))

def set_variant(emb, v, shape):
    Residual.layer_norm = old_ln if v == "before" else new_ln
    kernels.norm_warps = old_warps if v == "before" else new_warps
    rot = kernels.rotary_qk
    if v == "norm + rotary grid":
        block, warps = BEST_ROTARY[shape]
        rot = lambda qkv, cos, sin: rotary_variant(_rotary_grid, qkv, cos, sin, block, warps)
    emb.packed.ops = emb.packed.ops._replace(rotary_qk=rot)

VARIANTS = ["before", "norm", "norm + rotary grid"]
torch.backends.cuda.matmul.allow_tf32 = False
out["bf16_peak_tflops"] = matmul_peak() / 1e12
ab = []
for shape, n_tok, reps in [("650M", 600_000, 4), ("3B", 300_000, 3), ("15B", 120_000, 3)]:
    name, esm2, params = random_esm2(shape)
    layers, dim, heads = ESM2_MODELS[name]
    loaded = LoadedModel(esm2, esm2.alphabet, name, "random", "-")
    seqs = dataset("uniref", n_tok)
    tokens = sum(len(s) + 2 for s in seqs)
    emb = Embedder(loaded, "cuda", "bfloat16", "auto", "auto")
    plan = build_plan([len(s) for s in seqs], PackingOptions().budget(dim), "truncate", 0)
    outputs = Outputs.resolve(layers, EmbeddingOptions())
    pack = plan.packs[len(plan.packs) // 2]
    tok, cu = emb._to_device(seqs, pack)
    hid = {}
    for v in VARIANTS + ["before"]:
        set_variant(emb, v, shape)
        hid.setdefault(v, []).append(emb.packed(tok, cu, int(pack.lengths.max()) + 2, [layers])[layers])
    row = {"shape": shape, "tokens": tokens,
           "bitwise_equal_to_before": {v: bool(torch.equal(hid[v][0], hid["before"][0])) for v in VARIANTS},
           "before_is_deterministic": bool(torch.equal(hid["before"][0], hid["before"][1]))}
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        set_variant(emb, v, shape)
        emb.embed(seqs, plan, outputs, progress_every=1e9)  # warm-up
    for _ in range(reps):
        for v in VARIANTS:
            set_variant(emb, v, shape)
            times[v].append(sync_time(lambda: emb.embed(seqs, plan, outputs, progress_every=1e9)))
    for v, ts in times.items():
        tps = tokens / statistics.median(ts)
        row[v] = {"tok_per_s": tps, "mfu": tps * 2 * params / (out["bf16_peak_tflops"] * 1e12), "runs_s": ts,
                  "gain": tps / (tokens / statistics.median(times["before"])) - 1}
    if shape == "650M":
        from bench_embed import profile_engine
        set_variant(emb, "norm", shape)
        row["profile_norm"] = profile_engine(emb, seqs, plan, outputs, top=14)
    print(json.dumps(row), flush=True)
    ab.append(row)
    out["engine_ab"] = ab
    json.dump(out, open(OUT, "w"), indent=1)
    emb = esm2 = loaded = None
    torch.cuda.empty_cache()
