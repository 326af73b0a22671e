"""Genome-scale inference to zarr (tools/infer.py) and variant scoring (tools/score_variants.py).

One idea per module: `tiling` (windows and the stitching rule), `families` (per-family states, masked-LM base
probabilities and boundaries at base resolution), `backbone` (loading a checkpoint or HF export for inference),
`writer` (the zarr store and its resume bookkeeping), `run` (the driver), `variants` (SNV log-likelihood ratios).
"""
