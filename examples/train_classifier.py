"""Train a small classifier (dense -> ReLU -> dense, in NumPy) with CrossEntropy, PuzzleLib-style.

The network runs in NumPy; only the cost call moves its scores and labels to the GPU
(gpuarray.to_gpu) and brings grad back (grad.get()).  Without a usable GPU those are host
arrays and the cost runs on NumPy, so the same script runs everywhere.

`grad` is the NEGATIVE gradient of the error with respect to the scores, so every update is
`w += lr * dw`, as PuzzleLib's optimizers do.
"""
import numpy as np

from puzzlelib_cost import CrossEntropy, describe_backend, gpuarray

rng = np.random.default_rng(0)

# Data: 4 Gaussian blobs in 8 dimensions, 3000 samples, 2400 to train and 600 held out.
classes, features, samples = 4, 8, 3000
centres = rng.normal(0, 1.5, size=(classes, features))
y = rng.integers(0, classes, size=samples).astype(np.int32)
x = (centres[y] + rng.normal(0, 1.0, size=(samples, features))).astype(np.float32)
x_train, y_train, x_val, y_val = x[:2400], y[:2400], x[2400:], y[2400:]

# The network: scores = relu(x @ w1 + b1) @ w2 + b2.
hidden = 32
w1 = (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32)
b1 = np.zeros(hidden, np.float32)
w2 = (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
b2 = np.zeros(classes, np.float32)


def forward(inputs):
    h = np.maximum(inputs @ w1 + b1, 0)
    return h, h @ w2 + b2


cost = CrossEntropy()
lr, batch, epochs = 0.1, 100, 20
print("backend: %s" % describe_backend())
_, scores = forward(x_val)
val_scores, val_labels = gpuarray.to_gpu(scores), gpuarray.to_gpu(y_val)
error, _ = cost(val_scores, val_labels)     # (the first epoch resets the accumulator)
print("untrained: held-out error %.4f, validation top-1 error rate %.3f"
      % (error, cost.validate(val_scores, val_labels)))
for epoch in range(1, epochs + 1):
    cost.resetAccumulator()
    order = rng.permutation(len(x_train))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        xb = x_train[idx]
        h, scores = forward(xb)
        grad = cost(gpuarray.to_gpu(scores), gpuarray.to_gpu(y_train[idx]), queryError=False)
        g = grad.get()                 # -dE/dscores, E the batch's mean error
        # Backpropagate the negative gradient by hand: every d* below is a negative gradient.
        dw2, db2 = h.T @ g, g.sum(axis=0)
        dh = (g @ w2.T) * (h > 0)
        dw1, db1 = xb.T @ dh, dh.sum(axis=0)
        w2 += lr * dw2
        b2 += lr * db2
        w1 += lr * dw1
        b1 += lr * db1
    if epoch == 1 or epoch % 5 == 0:
        _, scores = forward(x_val)
        val_rate = cost.validate(gpuarray.to_gpu(scores), val_labels)   # top-1 error rate, no accumulators touched
        print("epoch %2d: mean training error %.4f, validation top-1 error rate %.3f"
              % (epoch, cost.getMeanError(), val_rate))
