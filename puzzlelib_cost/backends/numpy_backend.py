"""The NumPy backend: the exact semantics, computed in float64 on the host.

It is the definition every other backend is checked against, so it favours
clarity over speed: the whole batch is promoted to float64, the log-softmax is
taken as x - max - log(sum(exp(x - max))) so that underflowing probabilities
keep finite, exact logarithms, and sums run in NumPy's pairwise order.
"""
import numpy as np


class NumpyBackend:
    name = "cpu"

    def new_scalar(self, value=0.0):
        return np.array(value, dtype=np.float64)

    def read_scalar(self, scalar):
        return float(scalar)

    def write_scalar(self, scalar, value):
        scalar[...] = value

    def labels_to_host(self, info):
        return np.asarray(info.array)

    def kl_divergence(self, pred, target, labels, norm_target, batch_error, accumulator, want_grad):
        shape, n = pred.shape, pred.shape[0]
        x = np.asarray(pred.array, dtype=np.float64).reshape(n, -1)
        with np.errstate(all="ignore"):   # inf/NaN inputs give inf/NaN outputs, by design
            log_q = log_softmax(x)
            if labels is not None:
                p = np.zeros_like(x)
                p[np.arange(n), labels] = 1.0
                log_p = np.zeros_like(x)      # only read where p == 1
            elif norm_target:
                log_p = log_softmax(np.asarray(target.array, dtype=np.float64).reshape(n, -1))
                p = np.exp(log_p)
            else:
                p = np.asarray(target.array, dtype=np.float64).reshape(n, -1)
                log_p = np.log(p)
            # p == 0 contributes exactly 0 (0 log 0 = 0, and 0 * log q = 0 even where q = 0);
            # written as p == 0 rather than p > 0 so that a NaN p stays NaN.
            terms = np.where(p == 0, 0.0, p * (log_p - log_q))
            batch_error[...] = terms.sum()
            if accumulator is not None:
                accumulator += batch_error
            if not want_grad:
                return None
            grad = (p - np.exp(log_q)) / n
        # Same kind of array as pred: a HostArray in gives a HostArray (with .get()) out.
        return grad.astype(pred.array.dtype).reshape(shape).view(type(pred.array))


def log_softmax(x):
    """Row-wise log-softmax of a 2-D float64 array, exact for any finite row."""
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
