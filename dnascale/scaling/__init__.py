"""Scaling experiments and models of training at scale. The CLIs are thin faces in tools/scaling/.

Sweeps (spec -> runs -> rows -> fits -> figures):
    spec.py        the typed sweep spec (YAML) and its one validation pass
    sweep.py       grid expansion: runs with stable ids, their launcher / sbatch commands, "is it finished?"
    runner.py      local execution (sequential or --jobs N, threads split, resuming)
    model_size.py  parameter counts (total / non-embedding) of a resolved model config
    units.py       tokenisation normalisation: nats per target -> bits per base
    collect.py     metrics.jsonl + run.json -> one typed row per run, TSV and markdown
    fit.py         power-law fits L(C) = a C^-b (+ E), bootstrap CIs, frontier, matched-FLOPs comparison
    plots.py       the figures (matplotlib, Agg)

Memory / throughput model (tools/scaling/memory_model.py): layout.py (a training layout: nodes x GPUs, TP, PP,
ZeRO stage and buffers, the model's input) and the modules it drives (memory, activations, param_census,
communication, throughput, default_layout, ...); each module's docstring says what it holds.
"""
