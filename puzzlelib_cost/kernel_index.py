"""Every kernel the library can launch, from each cost family's launch plan.

The compile test (no spills on any architecture) and the emulation tests check
that each of these exists in kernels/all_costs.cu.
"""
from . import cross_entropy, ctc, elementwise_costs, row_softmax, sparse_teacher


def kernel_names():
    return sorted(set(row_softmax.kernel_names()) | set(elementwise_costs.kernel_names())
                  | set(cross_entropy.kernel_names()) | set(ctc.kernel_names()) | set(sparse_teacher.kernel_names()))
