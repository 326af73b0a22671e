"""dnascale: a cluster-scale training stack for DNA language models."""

__version__ = "0.1.0"

from dnascale import _hf_hook  # noqa: E402

_hf_hook.install()  # AutoConfig/AutoModel*.register for the dnascale families, once transformers is imported
