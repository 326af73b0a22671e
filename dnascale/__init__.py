"""dnascale: a cluster-scale training stack for DNA language models."""

__version__ = "0.1.0"
