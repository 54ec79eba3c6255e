"""Our Pallas kernels (TPU Mosaic and GPU Triton)."""
