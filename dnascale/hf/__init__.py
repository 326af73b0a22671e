"""HF-format classes for the dnascale families, and export to / import from an HF directory.

base.py (shared config and model classes) + one file per family; auto.py lists them and registers them with
transformers' Auto classes, which importing this package does (and `import dnascale` does once transformers is
imported, see dnascale/_hf_hook.py); export.py writes an HF directory from a consolidated checkpoint; load.py
reads one back into dnascale weights at any TP size.
"""

# Every family module is imported before registering: a family module imported first on its own would otherwise
# be half-initialised when the registration looks up its classes.
from dnascale.hf import dnachunker, dnazen, enbed, encoder  # noqa: E402,F401
from dnascale.hf.auto import register_auto_classes  # noqa: E402

register_auto_classes()
