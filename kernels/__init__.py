"""Compute kernels behind the backend seam: CPU (NumPy/Numba) and GPU (CuPy/numba.cuda)."""
