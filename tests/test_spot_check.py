"""The spot-check stage on its own (stages/spot_check.py: a length-stratified sample of a shard's written embeddings
re-embedded unpacked and compared). The check the embed job runs in the workflow is checked end to end in
test_workflow.py."""

import pytest

from conftest import MODEL, cpu_options, example_stages
from virnucpro_core.stages import spot_check


@pytest.mark.slow
def test_spot_check_uses_the_configured_attention_backend(tmp_path):
    _, run = example_stages(tmp_path, 1, 65536, "att")
    opts = cpu_options(tmp_path, **{"embedding.attention": "torch_varlen"})
    with pytest.raises(ValueError, match="'torch_varlen' is not available for cpu"):
        spot_check.run([run.part("part_00000")], run.shard_embeddings("shard_0000"), str(MODEL), tmp_path / "spot.tsv", opts)
