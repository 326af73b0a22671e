"""Fine-tuning and evaluation on sequence-classification benchmarks (GUE format)."""
