"""FP8 quantization kernels (per-token activation quantization, scaled GEMM)."""
