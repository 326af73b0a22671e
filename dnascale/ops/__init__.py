"""Python faces of the compute kernels.

Each op has a pure-torch reference (the test oracle) and dispatches to an optimised implementation when one is
installed and the device fits: flash-attn here; the csrc/ extensions and mamba-ssm as they land. Model code
never imports the optional kernels itself: it goes through these modules, which report availability instead of
failing at import time on machines without them.
"""
