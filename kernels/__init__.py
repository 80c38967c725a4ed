"""Triton kernels for the formats dsquant writes, each family with a pure-torch reference twin.

Import families by module path (`dsquant.kernels.quant`, `dsquant.kernels.gemm`, ...). This
package imports nothing eagerly, so a machine without a GPU can import any family's reference.
"""

__all__ = ["quant", "gemm", "moe", "mla", "norm", "rope", "sample"]
