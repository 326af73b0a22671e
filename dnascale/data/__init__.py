"""Data pipeline: FASTA reading and cleaning, tokenizers, shards, G-gram vocabularies, masking collators."""
