"""The packed ESM-2 engine: the forward (kernels, attention, rotary), tokens, packs prepared ahead, the embedder
and the unpacked reference it is checked against."""
