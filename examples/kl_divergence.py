"""The PuzzleLib documentation's KLDivergence example, unchanged apart from the imports.

Runs on the GPU when CUDA is usable, else on the CPU (NumPy).
"""
import numpy as np

from puzzlelib_cost import KLDivergence, describe_backend, gpuarray

scores = gpuarray.to_gpu(np.random.randn(10, 10).astype(np.float32))
labels = gpuarray.to_gpu(np.random.randn(10, 10).astype(np.float32))

div = KLDivergence(normTarget=True)
error, grad = div(scores, labels)

print("backend: %s" % describe_backend())
print("error: %s" % error)
print("grad: %s" % grad.get())
