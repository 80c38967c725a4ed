"""quant kernels: see reference.py (the spec) and triton.py."""
