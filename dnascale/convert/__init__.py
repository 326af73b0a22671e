"""Checkpoint conversion: DeepSpeed/TP checkpoints <-> one full TP=1 state dict (consolidate.py, tp_layout.py).

The HF side (config/model classes, export and import) lives in dnascale/hf; the command-line faces are
tools/convert_to_hf.py and tools/convert_from_hf.py.
"""
