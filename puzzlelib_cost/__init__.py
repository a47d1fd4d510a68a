"""PuzzleLib's Cost module on NumPy or hand-written CUDA kernels: Cost, Abs, BCE, CrossEntropy, CTC, Hinge,
KLDivergence, L1Hinge, MSE, Multi, SVM and SmoothL1.

    from puzzlelib_cost import KLDivergence, gpuarray
    error, grad = KLDivergence(normTarget=True)(gpuarray.to_gpu(pred), gpuarray.to_gpu(target))

grad is the NEGATIVE gradient of the mean error (PuzzleLib's optimizers add lr * grad).
"""
from . import gpuarray
from .backends import active_backend, describe_backend
from .cost import Cost
from .errors import CostError
from .cross_entropy import CrossEntropy
from .ctc import CTC
from .elementwise_costs import BCE, MSE, SVM, Abs, Hinge, L1Hinge, SmoothL1
from .kl_divergence import KLDivergence
from .multi import Multi

__all__ = ["Abs", "BCE", "CTC", "Cost", "CostError", "CrossEntropy", "Hinge", "KLDivergence", "L1Hinge", "MSE", "Multi",
           "SVM", "SmoothL1", "gpuarray", "active_backend", "describe_backend"]
__version__ = "0.1.0"
