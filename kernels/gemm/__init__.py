"""gemm kernels: see reference.py (the spec) and triton.py."""
