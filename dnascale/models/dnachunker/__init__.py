"""DNACHUNKER: BiMamba encoders, two-stage learned routing and chunking, RoPE Transformer trunk, bidirectional
gated-smoothing dechunk, mask protection, masked residual gating, ratio loss (arXiv 2601.03019).

One idea per module: `scan` (first-order linear recurrences), `ssd` (Mamba-2 scan), `selective_scan` (Mamba-1
scan), `ssm` (the scan backend choice), `bimamba` (mixers, blocks, stacks), `routing`, `chunking`, `dechunk`,
`model` (config, model, sizes, recipe hooks).
"""

from dnascale.models.dnachunker.model import (
    MASK_ID,
    TOKENIZER,
    DNAChunkerConfig,
    DNAChunkerForMLM,
    DNAChunkerOutput,
    StageRouting,
    build,
    count_parameters,
    data_window,
    flops_per_token,
    make_collator,
)

__all__ = [
    "MASK_ID", "TOKENIZER", "DNAChunkerConfig", "DNAChunkerForMLM", "DNAChunkerOutput", "StageRouting", "build",
    "count_parameters", "data_window", "flops_per_token", "make_collator",
]
