"""norm kernels: RMSNorm and fused add + RMSNorm (reference.py is the spec, triton.py the kernels)."""
