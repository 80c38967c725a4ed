"""sample kernels: top-k / top-p sampling from probabilities (reference.py is the spec, triton.py the kernel)."""
