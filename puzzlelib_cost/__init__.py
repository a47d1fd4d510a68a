"""PuzzleLib's Cost module: Cost and KLDivergence, on NumPy or hand-written CUDA kernels.

    from puzzlelib_cost import KLDivergence, gpuarray
    error, grad = KLDivergence(normTarget=True)(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))

grad is the NEGATIVE gradient of the mean error (PuzzleLib's optimizers add lr * grad).
"""
from . import gpuarray
from .backends import active_backend, describe_backend
from .cost import Cost
from .errors import CostError
from .kl_divergence import KLDivergence

__all__ = ["Cost", "CostError", "KLDivergence", "gpuarray", "active_backend", "describe_backend"]
__version__ = "0.1.0"
