"""Raw kernels: ``cpu`` (Numba njit, always available) and ``cuda`` (numba-cuda, optional).

Import ``cestudy.kernels.cuda`` only when the CUDA backend is wanted; it needs numba-cuda.
"""
