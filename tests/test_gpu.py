"""GPU tests (marker ``gpu``): skipped without CUDA; run on the lent GPU with ``pytest -m gpu``."""

import numpy as np
import pytest
import torch

from virnucpro_core import kernels
from virnucpro_core.attention import position_ids, rotary_tables
from virnucpro_core.equivalence import reference_hidden
from virnucpro_core.model import build_esm2
from virnucpro_core.packed_esm import PackedESM2, residues, rotate_qk

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


def test_compiled_packed_forward_matches_unpacked():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_esm2(6, 320, 20).eval()
    for layer in model.layers:  # sharpen attention: random init is near uniform and hides position errors
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.data *= 2.5
            proj.bias.data *= 2.5
    model = model.to(torch.bfloat16)
    lengths = [5, 300, 1000, 60]
    rng = np.random.default_rng(0)
    singles = [torch.tensor([0, *rng.integers(4, 24, n), 2], device="cuda") for n in lengths]
    tokens = torch.cat(singles)
    cu = torch.tensor(np.cumsum([0, *[n + 2 for n in lengths]]), dtype=torch.int32, device="cuda")
    packed = residues(PackedESM2(model, compile=True)(tokens, cu, 1002, [6])[6], cu)
    ref = [h[1:-1] for h in reference_hidden(model, singles, 6)]
    for p, r in zip(packed, ref):
        cos = torch.nn.functional.cosine_similarity(p.float().mean(0), r.float().mean(0), dim=0)
        assert float(cos) > 0.9999
