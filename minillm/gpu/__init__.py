"""GPU kernels: loading the CUDA sources in cuda_kernels/ with cupy.RawModule, and launch wrappers.

Nothing here imports model.py: the model calls these through its layers (quant/qlinear.py), and the
array module comes from backend.py.
"""
