"""Knowledge distillation: a linear student learns a fixed teacher's softened outputs with
KLDivergence(normTarget=True, temperature=2.0); then a second student learns from the same
teacher's top-3 logits alone (a sparse teacher, target = [indices, values]), and is measured
with the symmetric Jensen-Shannon divergence against the full teacher.

The teacher's logits are the target (normTarget=True: p = softmax(teacher / T)), the student's
logits the prediction (q = softmax(student / T)).  Only the cost call moves the logits to the GPU
(gpuarray.to_gpu) and brings grad back (grad.get()); without a usable GPU those are host arrays
and the cost runs on NumPy, so the same script runs everywhere.

`grad` is the NEGATIVE gradient of the mean KL with respect to the student's logits (it already
holds the 1/T of the softened softmax), so every update is `w += lr * dw`, as PuzzleLib's
optimizers do.
"""
import numpy as np

from puzzlelib_cost import KLDivergence, describe_backend, gpuarray

rng = np.random.default_rng(0)
samples, features, classes = 512, 16, 10

X = rng.standard_normal((samples, features)).astype(np.float32)
teacher_w = (rng.standard_normal((features, classes)) * 0.8).astype(np.float32)
teacher_logits = gpuarray.to_gpu(X @ teacher_w)          # fixed: the target of every step

W = np.zeros((features, classes), np.float32)            # the student: logits = X @ W + b
b = np.zeros(classes, np.float32)

cost = KLDivergence(normTarget=True, temperature=2.0)
lr, steps = 2.0, 100
print("backend: %s" % describe_backend())
first = None
for step in range(steps + 1):
    logits = X @ W + b
    kl, grad = cost(gpuarray.to_gpu(logits), teacher_logits)
    g = grad.get()                                       # -dKL/dlogits, float32 (512, 10)
    W += lr * (X.T @ g)
    b += lr * g.sum(axis=0)
    first = kl if first is None else first
    if step % 10 == 0:
        print("step %3d: KL(teacher || student) at T=2: %.5f" % (step, kl))
print("KL fell from %.4f to %.5f (%.0fx)" % (first, kl, first / kl))
assert kl < first / 20, "the student did not learn the teacher"

# A teacher stored as its top-3 logits per sample (as offline distillation keeps them): the
# softmax over those 3 at T = 2 is the target, and the student's other classes are pushed down.
full = X @ teacher_w
top = np.argsort(-full, axis=1)[:, :3].astype(np.int32)
sparse_teacher = [gpuarray.to_gpu(top), gpuarray.to_gpu(np.take_along_axis(full, top, axis=1))]
jsd = KLDivergence(normTarget=True, temperature=2.0, divergence="jsd", beta=0.5)
W[...], b[...] = 0, 0
before = jsd.validate(gpuarray.to_gpu(X @ W + b), teacher_logits)
for step in range(101):
    logits = X @ W + b
    kl, grad = cost(gpuarray.to_gpu(logits), sparse_teacher)
    g = grad.get()
    W += lr * (X.T @ g)
    b += lr * g.sum(axis=0)
    if step % 25 == 0:
        print("step %3d: KL(top-3 teacher || student) at T=2: %.5f" % (step, kl))
after = jsd.validate(gpuarray.to_gpu(X @ W + b), teacher_logits)
print("JSD(full teacher, student) at T=2: %.4f before, %.4f after learning from the top-3" % (before, after))
assert after < before / 2, "the student did not learn from the sparse teacher"
