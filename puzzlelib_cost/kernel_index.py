"""Every kernel the library can launch, from each cost family's launch plan.

The compile test (no spills on any architecture) and the emulation tests check
that each of these exists in kernels/all_costs.cu.
"""
from . import cross_entropy, ctc, elementwise_costs, row_softmax, sparse_teacher
from .backends.cuda_backend import label_kernel_names


def kernel_names(arch="sm_90"):
    """The kernels built for `arch` (those with thread-block clusters from sm_90 on)."""
    clusters = int(arch.removeprefix("sm_")) >= 90
    return sorted(set(row_softmax.kernel_names(clusters)) | set(elementwise_costs.kernel_names())
                  | set(cross_entropy.kernel_names()) | set(ctc.kernel_names()) | set(sparse_teacher.kernel_names())
                  | set(label_kernel_names()))
