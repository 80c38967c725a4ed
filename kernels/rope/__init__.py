"""rope kernels: DeepSeek interleaved RoPE from a cos/sin cache, in place (reference.py is the spec)."""
