"""GPU tests (marker ``gpu``): skipped without CUDA; run on the lent GPU with ``pytest -m gpu``."""

import copy

import numpy as np
import pytest
import torch

from conftest import sharpen
from virnucpro_core.engine import kernels
from virnucpro_core.engine import attention
from virnucpro_core.engine.attention import position_ids, reference_attention, resolve_backend, rotary_tables
from virnucpro_core.engine.equivalence import reference_hidden
from virnucpro_core.engine.packed_esm2 import (PYTORCH, TRITON, PackedESM2, Update, add_layer_norm, linear_gelu_tanh, pool,
                                               residues, rotate_qk)
from virnucpro_core.models.loader import LoadedModel, build_esm2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("heads,head_dim", [(20, 64), (20, 24), (40, 128)])
def test_triton_rotary_matches_pytorch(heads, head_dim):
    torch.manual_seed(0)
    T = 5000
    qkv = (torch.randn(T, 3, heads, head_dim, device="cuda") * 3).to(torch.bfloat16)
    cu = torch.tensor([0, 7, 1030, 2000, T], dtype=torch.int32, device="cuda")
    cos, sin = rotary_tables(position_ids(cu, T), head_dim)
    for got, want in zip(kernels.rotary_qk(qkv, cos, sin), rotate_qk(qkv, cos, sin)):
        assert got.shape == want.shape == (T, heads, head_dim) and got.is_contiguous()
        diff = (got.float() - want.float()).abs()
        assert bool((diff <= 1e-2 * want.float().abs() + 1e-6).all()), float(diff.max())  # one bf16 rounding at most
        assert float((got != want).float().mean()) < 1e-3


@pytest.mark.parametrize("dim", [320, 1280, 5120])
@pytest.mark.parametrize("biases,store", [((), True), ((False,), True), ((True,), True), ((True,), False),
                                          ((True, False), True), ((False, True), True)])
def test_triton_add_layer_norm_matches_pytorch(dim, biases, store):
    torch.manual_seed(0)
    T = 3000
    x = torch.randn(T, dim, device="cuda") * 4
    updates = tuple(Update((torch.randn(T, dim, device="cuda") * 2).to(torch.bfloat16),
                           torch.randn(dim, device="cuda").to(torch.bfloat16) if with_bias else None) for with_bias in biases)
    w, b = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda")
    want_x, want_h = add_layer_norm(x.clone(), updates, w, b, 1e-5, torch.bfloat16, store)
    x_in = x.clone()
    got_x, got_h = kernels.add_layer_norm(x_in, updates, w, b, 1e-5, torch.bfloat16, store)
    assert got_x.data_ptr() == x_in.data_ptr()  # the residual is updated in place (or left as it was)
    assert torch.equal(got_x, want_x)  # the same additions in the same order
    assert torch.equal(got_x, x) == (not store or not updates)
    assert got_h.dtype == torch.bfloat16 and got_h.shape == (T, dim)
    diff = (got_h.float() - want_h.float()).abs()
    assert bool((diff <= 8e-3 * want_h.float().abs() + 1e-5).all()), float(diff.max())  # one bf16 rounding at most
    assert float((got_h != want_h).float().mean()) < 1e-3


@pytest.mark.parametrize("programs", [None, 1 << 30])  # persistent grid, one program per tile
def test_triton_linear_gelu_is_the_exact_gelu_of_the_matmul_rounded_once(programs):
    torch.manual_seed(0)
    m, n, k = 1000, 1280, 320  # m not a multiple of the tile: the last tile's rows are clipped
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    b = (torch.randn(n, device="cuda") * 3).to(torch.bfloat16)  # pre-activations down to about -12
    pre = x.double() @ w.double().T + b.double()
    exact = pre * 0.5 * torch.special.erfc(-pre * 0.5**0.5)  # fp64 from erfc: no cancellation down to -12
    got = kernels.linear_gelu(x, w, b, programs=programs)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # one rounding of the fp32 result: half a bf16 step plus the fp32 sums' error
    assert bool(((got.double() - exact).abs() <= 2**-8 * 1.01 * exact.abs() + 1e-5).all())
    # PyTorch rounds the matmul to bf16 before its GELU, whose 1 + erf(x / sqrt(2)) cancels for x < 0
    torch_err = (torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)).double() - exact).abs()
    assert float((got.double() - exact).abs().mean()) < float(torch_err.mean())


def test_tanh_linear_gelu_is_the_tanh_gelu_of_the_matmul_rounded_once():
    torch.manual_seed(0)
    m, n, k = 1000, 1280, 320
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
    b = (torch.randn(n, device="cuda") * 3).to(torch.bfloat16)
    pre = x.double() @ w.double().T + b.double()
    tanh = torch.nn.functional.gelu(pre, approximate="tanh")
    got = linear_gelu_tanh(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert bool(((got.double() - tanh).abs() <= 2**-8 * 1.01 * tanh.abs() + 1e-5).all())  # cuBLAS's epilogue: tanh, rounded once
    exact = pre * 0.5 * torch.special.erfc(-pre * 0.5**0.5)
    assert float((got.double() - exact).abs().max()) <= 4.8e-4 + 2**-8 * float(exact.abs().max())


def test_flash_attn_3_matches_the_reference_and_hands_short_packs_to_flash_attention_2():
    dev = torch.device("cuda")
    if "flash_attn_3" not in attention.available_backends(dev, torch.bfloat16):
        pytest.skip("no FlashAttention-3 here (the fa3 extra on a Hopper GPU)")
    name, fa3 = resolve_backend(dev, torch.bfloat16)
    assert name == "flash_attn_3"  # auto picks it first
    fa2 = resolve_backend(dev, torch.bfloat16, "torch_varlen")[1]
    torch.manual_seed(0)
    for lengths in ([5, 300, 1000, 60, 2], [40, 90, 7, 128]):  # longest over FA2_MAX_SEQLEN, then at it
        cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=dev)
        T, ms = int(cu[-1]), max(lengths)
        q, k, v = ((torch.randn(T, 20, 64, device=dev) * 2.5).to(torch.bfloat16) for _ in range(3))  # sharpened
        got, two = fa3(q, k, v, cu, ms, 0.125), fa2(q, k, v, cu, ms, 0.125)
        want = reference_attention(q.float(), k.float(), v.float(), cu, 0.125)
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        err, err2 = (got.float() - want).abs(), (two.float() - want).abs()  # bf16 probabilities and output
        assert float(err.max()) <= 2 * float(err2.max()) and float(err.mean()) <= 1.25 * float(err2.mean())
        assert torch.equal(got, two) == (ms <= attention.FA2_MAX_SEQLEN)  # short packs: FlashAttention-2 itself


def test_a_pack_forward_and_its_pooling_never_wait_for_the_gpu():
    """Nothing in a pack's forward or pooling synchronises with the GPU, so the host queues the next pack while
    the GPU computes this one (a ``t[index] = n`` once copied n from pageable memory and waited for the pack)."""
    engine = PackedESM2(sharpened_model().to(torch.bfloat16))
    _, tokens, cu = pack_of_tokens([5, 300, 1000, 60])
    engine(tokens, cu, 1002, [6])  # kernels loaded, cuBLAS and attention set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = engine(tokens, cu, 1002, [3, 6])
        pooled = [pool(hidden[6], cu, how) for how in ("mean", "bos")]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.shape == (4, 320) and bool(torch.isfinite(p).all()) for p in pooled)


def sharpened_model(device="cuda"):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_esm2(6, 320, 20).eval()
    sharpen(model)
    return model


def pack_of_tokens(lengths):
    rng = np.random.default_rng(0)
    singles = [torch.tensor([0, *rng.integers(4, 24, n), 2], device="cuda") for n in lengths]
    cu = torch.tensor(np.cumsum([0, *[n + 2 for n in lengths]]), dtype=torch.int32, device="cuda")
    return singles, torch.cat(singles), cu


def test_fused_packed_forward_matches_unpacked():
    model = sharpened_model().to(torch.bfloat16)
    singles, tokens, cu = pack_of_tokens([5, 300, 1000, 60])
    ref = [h[1:-1] for h in reference_hidden(model, singles, 6)]
    exact, auto = PackedESM2(model, gelu="exact"), PackedESM2(model)
    assert exact.fused and exact.ops is TRITON and exact.gelu == "exact"
    assert auto.gelu == "tanh" and auto.ops == TRITON._replace(linear_gelu=linear_gelu_tanh)  # bf16 on a GPU
    for engine in (exact, auto):
        packed = residues(engine(tokens, cu, 1002, [6])[6], cu)
        for p, r in zip(packed, ref):
            cos = torch.nn.functional.cosine_similarity(p.float().mean(0), r.float().mean(0), dim=0)
            assert float(cos) > 0.9999


def test_packed_esm2_cast_to_the_gpu_equals_one_built_there(monkeypatch):
    """Built on the host and cast (``.to``), the engine picks the kernels and the GPU's attention and gives
    what the engine built from the cast model gives, bit for bit; with the kernels off, the PyTorch path."""
    _, tokens, cu = pack_of_tokens([5, 300, 1000, 60])
    cast = PackedESM2(sharpened_model("cpu")).to("cuda", torch.bfloat16)
    built = PackedESM2(sharpened_model("cpu").to("cuda", torch.bfloat16))
    assert cast.fused and cast.ops == built.ops and cast.ops.rotary_qk is kernels.rotary_qk
    assert cast.backend == built.backend != "reference" and cast.gelu == built.gelu == "tanh"
    assert cast.final_norm.weight.dtype == torch.float32 and cast.layers[0].fc1.weight.dtype == torch.bfloat16
    got, want = cast(tokens, cu, 1002, [3, 6]), built(tokens, cu, 1002, [3, 6])
    assert all(torch.equal(got[l], want[l]) for l in want)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    plain = PackedESM2(sharpened_model("cpu").to("cuda", torch.bfloat16))
    assert not plain.fused and plain.ops == PYTORCH._replace(linear_gelu=linear_gelu_tanh)
    for p, r in zip(residues(plain(tokens, cu, 1002, [6])[6], cu), residues(want[6], cu)):
        assert float(torch.nn.functional.cosine_similarity(p.float().mean(0), r.float().mean(0), dim=0)) > 0.9999


def test_pooled_rows_read_from_another_thread_while_the_gpu_computes_the_next_chunk(tiny_model, rng):
    from concurrent.futures import ThreadPoolExecutor

    from conftest import random_protein

    from virnucpro_core.engine.embedder import Embedder, Outputs
    from virnucpro_core.engine.packing import build_plan
    from virnucpro_core.options import EmbeddingOptions

    model = copy.deepcopy(tiny_model.model)  # the Embedder casts its model in place: not the session's CPU model
    emb = Embedder(LoadedModel(model, model.alphabet, "tiny", "-", "-"), "cuda", "bfloat16", "auto")
    outputs = Outputs.resolve(tiny_model.num_layers, EmbeddingOptions())
    seqs = [random_protein(rng, int(n)) for n in rng.integers(20, 900, 3000)]
    plan = build_plan([len(s) for s in seqs], 8192, "truncate", 0)
    first = emb.embed(seqs, plan, outputs)
    assert first.ready is not None and first.device_pooled["embedding"].is_cuda  # not copied yet
    with ThreadPoolExecutor(1) as pool:
        host = pool.submit(lambda: first.pooled["embedding"])  # as the chunk writer does, during the next chunk
        second = emb.embed(seqs, plan, outputs)
        got = host.result()
    assert got.shape == (len(seqs), model.embed_dim) and np.isfinite(got).all() and np.abs(got).sum() > 0
    # the same packs again, up to the order of atomic adds: a read racing the copy would differ wildly
    again = second.pooled["embedding"]
    cos = (got * again).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(again, axis=1)
    print("max |diff|", np.abs(got - again).max(), "min cosine", cos.min())
    assert cos.min() > 0.9999
