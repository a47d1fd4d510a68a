"""Every cost as a torch.nn.Module with autograd, on the library's kernels.

    import puzzlelib_cost.nn as pnn
    loss = pnn.KLDivergence(normTarget=True)(student_logits, teacher_logits)
    loss.backward()                      # student_logits.grad = dE/dpred

`module(pred, target)` returns a 0-d tensor holding the cost's error E (float32 for 16- and
32-bit inputs, float64 for float64) on pred's device.  The kernels compute the gradient in the
forward pass (one fused pass, as for `cost(pred, target)`); the module keeps it, one buffer of
pred's size, and backward only scales it by the incoming gradient: no second pass over the data.
`pred.grad` is +dE/dpred, the usual torch sign (the library's own `grad` is its negative).

CUDA tensors run on the kernels on torch's current stream, without a host synchronisation
(integer labels' range check is read at the next call: label_checks; KLDivergence's
ignoreLabel rows are counted on the device for the loss, _rows_left; CTC's integer arrays are
read on the host).  CPU
tensors run on the NumPy backend.  A traced call (torch.compile, export, meta tensors) is the
custom operator `puzzlelib_cost::cost` (torch.library), with a fake implementation and an
autograd formula, so torch.compile traces through it without a graph break; an eager call runs
the same code as an autograd.Function, without the operator's Python layers (about 100 us of
host time a call).  A target that requires grad is refused (CostError): the costs give the
gradient with respect to pred only.  Second derivatives are not available (a RuntimeError says so).

Lists go as the library takes them: L1Hinge's [x1, x2], a sparse teacher's [indices, values],
CTC's [data, datalen] and [labels, lengths]; the floating-point preds get gradients.
Multi has no module: in PyTorch, add the losses.
"""
try:
    import torch
except ImportError as exc:   # torch is an optional extra
    raise ImportError("puzzlelib_cost.nn needs PyTorch: pip install 'puzzlelib_cost[torch]' "
                      "(or any torch >= 2.4)") from exc

import hashlib
import inspect
import json
import threading
import weakref
from collections import OrderedDict
from typing import List, Tuple

import numpy as np
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

import puzzlelib_cost
from .errors import CostError

_COSTS = ("Abs", "BCE", "CTC", "CrossEntropy", "Hinge", "KLDivergence", "L1Hinge", "MSE", "SVM", "SmoothL1")
_local = threading.local()   # per thread: the cost objects (they keep per-call state), by spec and device
_KEEP_COSTS = 32   # per thread, the cost objects used last (a temperature annealed each step makes a new spec each step)


# Class weights by digest: a spec names its weights (one of their values took 0.6 MB at 32K classes,
# passed and hashed on every call).  An entry lives while a module keeps the array (_weights_host).
_WEIGHTS = weakref.WeakValueDictionary()


def _registered(weights):
    """(the registry's array of these weights, its digest)."""
    digest = "sha256:" + hashlib.sha256(np.ascontiguousarray(weights, np.float64).tobytes()).hexdigest()
    return _WEIGHTS.setdefault(digest, weights), digest


def _cost(spec, device):
    """The cost object for a spec (class name and constructor arguments) on a device, made once
    per thread, so that its device scalars are allocated once; the _KEEP_COSTS used last are kept."""
    costs = _local.__dict__.setdefault("costs", OrderedDict())
    key = (spec, str(device))
    if key in costs:
        costs.move_to_end(key)
    else:
        name, kwargs = json.loads(spec)
        if kwargs.get("weights") is not None:
            weights = _WEIGHTS.get(kwargs["weights"])   # (kept by the module whose spec this is)
            if weights is None:   # (a bare KeyError)
                raise CostError(f"{name}: its class weights ({kwargs['weights']}) are held by no module in this "
                                "process: an exported or traced program runs while the module it was made from "
                                "lives, in the process that made it")
            kwargs["weights"] = weights
        costs[key] = getattr(puzzlelib_cost, name)(**kwargs)
        while len(costs) > _KEEP_COSTS:
            costs.popitem(last=False)
    return costs[key]


def _to_library(tensor):
    """What the library takes: a CUDA tensor as it is; a CPU tensor as a NumPy view (bfloat16,
    which NumPy lacks, as float32: exact, and the NumPy backend computes 16-bit inputs in float32
    anyway; _promoted has made target and pred one dtype before)."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        return tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def _from_library(grad, like):
    if isinstance(grad, torch.Tensor):
        return grad
    return torch.from_numpy(np.ascontiguousarray(grad)).to(like.dtype)


def _loss_dtype(pred):
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


# (cudagraph_unsafe: inductor keeps the op out of the CUDA graphs of mode="reduce-overhead"; the
# library refuses a call on a capturing stream, and allocates scratch and page-locked answers a call)
_OP_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _run_cost(spec, preds, targets, target_is_list):
    """(E as a 0-d tensor, the library's grads = -dE/dpred for each floating-point pred).  preds is
    pred, or its list (L1Hinge's pair; CTC's [data, datalen]); targets the target, or its list
    (a sparse teacher's [indices, values]; CTC's [labels, lengths]) when target_is_list.  The body
    of both ways in: the custom operator (traced) and _EagerCost (eager)."""
    pred = preds[0]
    cost = _cost(spec, pred.device)
    inputs = [_to_library(p) for p in preds]
    target = [_to_library(t) for t in targets]
    grad = cost(inputs if len(inputs) > 1 else inputs[0], target if target_is_list else target[0], queryError=False)
    cost.grad = None   # (autograd holds it from here: the cached cost kept a pred-sized block past the module's life)
    grads = grad if isinstance(grad, list) else [grad]
    if pred.is_cuda:   # the batch error stays on the device: no host synchronisation
        error = torch.as_tensor(cost.devErr, device=pred.device).reshape(())
    else:
        error = torch.tensor(float(cost.devErr), dtype=torch.float64)
    # E = summed per-sample error / the samples that count (KLDivergence's ignoreLabel leaves some out;
    # all of them left out: E = 0), divided in float64 and rounded once to the loss's dtype, into a
    # tensor of its own (the cost's devErr is overwritten by its next call): one kernel on CUDA,
    # where a copy, the division and the conversion were three.
    loss = torch.div(error, _rows_left(cost, targets[0], target_is_list),
                     out=torch.empty((), dtype=_loss_dtype(pred), device=error.device))
    return loss, [_from_library(g, p) for g, p in zip(grads, _differentiable(preds))]


def _rows_left(cost, target, target_is_list):
    """What E divides the summed error by: the batch's samples (at least 1), or with KLDivergence's
    ignoreLabel the label tensor's rows not ignored (at least 1), counted by torch on its device: a
    GPU training call's count is on the device alone (the cost's batchsize learns it at its next
    call), and reading it would make the host wait."""
    ignore = getattr(cost, "ignoreLabel", None)
    if ignore is None or target_is_list or target.dtype.is_floating_point or target.dtype == torch.bool:
        return max(cost.batchsize, 1)
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore <= info.max:   # (-100 among uint8 labels: no row is ignored)
        return max(target.shape[0], 1)
    return torch.count_nonzero(target != ignore).clamp_(min=1)


@torch.library.custom_op("puzzlelib_cost::cost", mutates_args=(), tags=_OP_TAGS)
def _cost_op(spec: str, preds: List[torch.Tensor], targets: List[torch.Tensor],
             target_is_list: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """_run_cost as a custom operator, for torch.compile, export and the meta device to trace."""
    return _run_cost(spec, preds, targets, target_is_list)


def _differentiable(preds):
    """The preds that get a gradient: the floating-point ones (not CTC's datalen)."""
    return [p for p in preds if p.is_floating_point()]


@_cost_op.register_fake
def _(spec, preds, targets, target_is_list):
    # (contiguous, as the real grads are: empty_like kept a transposed or channels_last pred's
    # strides, and torch.compile refused the real op's output as a mismatch)
    return preds[0].new_empty((), dtype=_loss_dtype(preds[0])), \
        [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in _differentiable(preds)]


@torch.library.custom_op("puzzlelib_cost::scale_grad", mutates_args=())
def _scale_grad(negative_grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """dL/dpred = -(library grad) * dL/dE, multiplied in float32 (float64 for float64) and rounded
    once: dL/dE rounded to a 16-bit grad's dtype first overflowed float16 at a GradScaler's 65536
    (every grad inf) and biased bfloat16's (0.3 became 0.30078)."""
    return _scaled(negative_grad, grad_output)


def _scaled(negative_grad, grad_output):
    """In one pass over the grad: the factor a 1-element tensor, not a 0-d one, so that torch takes
    the product in the wide type (a 0-d factor is cast to the grad's dtype first), written by
    out= straight in the grad's dtype (on CUDA the kernel converts as it stores; widening the grad,
    multiplying and narrowing the product were three passes, 20 bytes an element in bfloat16
    where this reads and writes 4)."""
    wide = torch.promote_types(negative_grad.dtype, torch.float32)
    factor = (-grad_output).to(wide).reshape((1,) * negative_grad.dim())
    if torch.is_grad_enabled() and (factor.requires_grad or negative_grad.requires_grad):
        # (out= takes no autograd: create_graph's case)
        return (negative_grad.to(wide) * factor).to(negative_grad.dtype)
    return torch.mul(negative_grad, factor, out=torch.empty_like(negative_grad))


@_scale_grad.register_fake
def _(negative_grad, grad_output):
    return torch.empty_like(negative_grad)


def _no_double_backward(ctx, grad):
    raise RuntimeError("puzzlelib_cost.nn: second derivatives are not available (the kernels compute the "
                       "gradient of the cost only); use a torch formula of the loss for double backward")


_scale_grad.register_autograd(_no_double_backward)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1])
    ctx.floating = [p.is_floating_point() for p in inputs[1]]
    ctx.targets = len(inputs[2])


def _pred_grads(ctx, grad_loss, scale):
    """dL/dpred for each pred (None for CTC's datalen): the saved library grads, scaled."""
    grads = iter(ctx.saved_tensors)
    return [scale(next(grads), grad_loss) if floating else None for floating in ctx.floating]


def _backward(ctx, grad_loss, grad_grads):
    return None, _pred_grads(ctx, grad_loss, _scale_grad), [None] * ctx.targets, None


_cost_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCost(torch.autograd.Function):
    """The eager way in: the custom operator's Python layers (its schema's flattening, the autograd
    and dynamo wrappers) cost about 100 us a call on the host, 5x the library's own call at 32x10
    on the CPU, and made the module's GPU calls host-bound (measured on an H200: 2.3x the plain
    call's time in float32).  The same _run_cost and the same scaling, without them; the custom
    operator stays for what traces (torch.compile, export, meta tensors, dispatch modes).  As the
    operator does, it returns the library's grads beside the loss and saves them as outputs:
    autograd frees them after backward, refuses a second backward without retain_graph, and with
    create_graph gives grads whose own backward reaches this node's, which refuses."""

    @staticmethod
    def forward(ctx, spec, target_is_list, count, *tensors):
        preds, targets = list(tensors[:count]), list(tensors[count:])
        loss, grads = _run_cost(spec, preds, targets, target_is_list)
        ctx.floating, ctx.inputs = [p.is_floating_point() for p in preds], len(tensors)
        ctx.set_materialize_grads(False)   # (the grads' incoming gradients stay None, not zeros)
        ctx.save_for_backward(*grads)
        return (loss, *grads)

    @staticmethod
    def backward(ctx, grad_loss, *grad_grads):
        if any(g is not None for g in grad_grads):
            _no_double_backward(ctx, grad_grads)
        pred_grads = _pred_grads(ctx, grad_loss, _scaled)
        return (None, None, None, *pred_grads, *[None] * (ctx.inputs - len(pred_grads)))


def _traced(tensors):
    """Whether this call must go through the custom operator: torch.compile or another tracer at
    work (a dispatch mode: FakeTensorMode, make_fx, export), or tensors on the meta device."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()
            or any(t.device.type == "meta" for t in tensors))


def _promoted(preds, targets):
    """preds and targets with their floating-point tensors in one dtype, the promotion of theirs, as
    torch's own losses take mixed dtypes (autocast's bfloat16 pred beside a float32 target or teacher,
    say): the library takes one dtype a call.  pred's cast is differentiable, so its grad comes back in
    pred's dtype.  (A bfloat16 CPU tensor reaches the library as float32, where a float32 partner
    would have passed unrounded anyway.)"""
    floats = [t for t in (*preds, *targets) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtype = floats[0].dtype if floats else None
    for t in floats[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if all(t.dtype == dtype for t in floats):
        return preds, targets

    def cast(group):
        return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in group]
    return cast(preds), cast(targets)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(pred, preds, target, targets):
    """CostError for inputs the op cannot take, naming which (torch's or NumPy's own errors said
    nothing of the cost): anything but a tensor (torch's message named the op's schema), sparse
    and nested tensors, floats other than the library's four (float8 failed in the dtype
    promotion), devices other than the CPU and CUDA, and the meta device beside a real one: the
    op's fake implementation answered such a call, with a loss and a gradient of uninitialised
    memory and no check.  (Every tensor on the meta device gives a meta loss, as torch's losses do.)"""
    named = []
    for what, given, group in (("pred", pred, preds), ("target", target, targets)):
        listed = isinstance(given, (list, tuple))
        for k, tensor in enumerate(group):
            name = f"{what}[{k}]" if listed else what
            if not isinstance(tensor, torch.Tensor):
                raise CostError(f"{name}: expected a torch.Tensor (a list of tensors where the cost takes a pair), "
                                f"got {type(tensor).__name__}" + (f" in a {type(given).__name__}" if listed else ""))
            named.append((name, tensor))
    for name, tensor in named:
        if tensor.layout != torch.strided or tensor.is_nested:
            raise CostError(f"{name}: expected a dense tensor, got a {'nested' if tensor.is_nested else tensor.layout} "
                            "one; pass tensor.to_dense()")
        if tensor.is_floating_point() and tensor.dtype not in _FLOATS:
            raise CostError(f"{name}: expected float16, bfloat16, float32 or float64, got {tensor.dtype}")
        if tensor.device.type not in ("cpu", "cuda", "meta"):
            raise CostError(f"{name}: expected a CPU or CUDA tensor, got one on {tensor.device}")
    on_meta = [tensor.device.type == "meta" for _, tensor in named]
    if any(on_meta) and not all(on_meta):
        raise CostError("the inputs must all be on the meta device or none, got "
                        + ", ".join(f"{name} on {tensor.device}" for name, tensor in named))


def _refuse_transforms(preds):
    """CostError for a pred inside a torch.func transform (grad, vmap, jacfwd, ...) or carrying a
    forward-mode tangent: the op has no batching rule nor forward-mode formula, and under forward
    mode torch gave the loss no tangent, so jacfwd returned zeros where it should have failed."""
    for p in preds:
        if isinstance(p, torch.Tensor) and (torch._C._functorch.is_functorch_wrapped_tensor(p)
                                            or torch.autograd.forward_ad.unpack_dual(p).tangent is not None):
            raise CostError("pred: inside a torch.func transform or forward-mode AD, which the costs do not support "
                            "(they compute the reverse-mode gradient in their forward pass); call the module "
                            "outside the transform, with loss.backward() or torch.autograd.grad")


def _untensored(argument, name):
    """A constructor argument as the cost takes it: a 0-d tensor (an annealed temperature, say) as its
    number, another tensor (CrossEntropy's weights) as a NumPy array; anything else as it is."""
    if not isinstance(argument, torch.Tensor):
        return argument
    if argument.layout != torch.strided or argument.is_nested or argument.is_meta:   # (no values to read as given)
        raise CostError(f"{name}: expected a tensor with values (dense, not on the meta device), got a "
                        f"{'nested' if argument.is_nested else argument.layout} one on {argument.device}")
    if argument.dim() == 0:
        return argument.item()
    argument = argument.detach().cpu()
    return (argument.double() if argument.is_floating_point() else argument).numpy()


@torch.compiler.assume_constant_result
def _checked_arguments(cost_name, args, kwargs):
    """(the cost's arguments as (name, value) pairs, its class weights or None, the op's spec) for a
    module's constructor arguments (kwargs as pairs), checked by making the cost.  torch.compile runs
    it as it is when it traces a module made inside the compiled function, its result a constant of
    the graph (the cost's lock and json would break the graph; class weights, an array, still do)."""
    cost = getattr(puzzlelib_cost, cost_name)(*args, **dict(kwargs))   # checks the arguments now
    if getattr(cost, "normalized", False):
        # (PuzzleLib's CTC(normalized=True) takes probabilities but gives the gradient with
        # respect to the logits that made them: not the dE/dpred that autograd needs)
        raise CostError("normalized: nn.CTC takes logits (normalized=False); with normalized=True the cost's "
                        "grad is with respect to the logits behind the probabilities, which autograd cannot "
                        "use: pass the logits, or the log-probabilities, which give the same loss and grad")
    pairs = tuple((key, getattr(cost, key)) for key in type(cost)._ARGUMENTS if key != "weights")
    weights = getattr(cost, "weights", None)
    spec_arguments = dict(pairs)
    if weights is not None:
        weights, spec_arguments["weights"] = _registered(weights)
    return pairs, weights, json.dumps([cost_name, spec_arguments])


class _CostModule(torch.nn.Module):
    """The cost's constructor arguments are the module's attributes: read them, or set one (an
    annealed temperature, say) and the next call uses it, checked as the constructor checks it."""
    cost_name = None
    _argument_names = frozenset()   # (the cost's constructor arguments, its _ARGUMENTS: set per module class below)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._configure(*args, **kwargs)

    def _configure(self, *args, **kwargs):
        """Check the arguments by making the cost, then keep them, the op's spec and (CrossEntropy)
        the class weights' buffer."""
        args = tuple(_untensored(a, f"argument {k}") for k, a in enumerate(args))
        kwargs = {key: _untensored(a, key) for key, a in kwargs.items()}
        pairs, weights, spec = _checked_arguments(self.cost_name, args, tuple(kwargs.items()))
        self.__dict__["_weights_host"] = weights
        self.__dict__["_arguments"] = dict(pairs)   # (past nn.Module.__setattr__, and so past ours)
        self.__dict__["spec"] = spec
        # (the spec and the weights it names, read in one step by forward: another thread's new
        # weights between two reads let this call's drop from the registry, a KeyError)
        self.__dict__["_spec_and_weights"] = (spec, weights)
        if "weights" in self._argument_names:
            # A buffer, as torch's CrossEntropyLoss keeps its weight: in state_dict, moved by .to()
            # (and cast by .half(): the dtype kept when the edited buffer is read again).
            old = self._buffers.get("weights")
            self._buffers["weights"] = None if weights is None else torch.tensor(
                weights, dtype=old.dtype if old is not None and old.is_floating_point() else torch.float64,
                device=old.device if old is not None else None)
            self.__dict__["_weights_seen"] = self._weights_stamp(self._buffers["weights"])

    def __setstate__(self, state):   # (an unpickled module's weights, in this process's registry)
        super().__setstate__(state)
        if "weights" in self._argument_names and "_weights_host" not in self.__dict__:
            self._configure(**self._kept_arguments())   # (pickled before the registry: its spec held the values)
        elif self.__dict__.get("_weights_host") is not None:
            self.__dict__["_weights_host"] = _registered(self._weights_host)[0]
        self.__dict__["_spec_and_weights"] = (self.spec, self.__dict__.get("_weights_host"))   # (pickled before it, too)

    @staticmethod
    def _weights_stamp(buffer):
        """What tells an edit of the weights' buffer since the spec: the buffer itself (a .to() replaces
        it; held, so that a later one cannot take its id) and its version (an in-place edit; not
        through .data, which keeps a version of its own, nor of an inference tensor, which has none)."""
        return None if buffer is None else (buffer, None if buffer.is_inference() else buffer._version)

    def _weights_changed(self):
        seen, now = self.__dict__.get("_weights_seen"), self._weights_stamp(self._buffers.get("weights"))
        if seen is None or now is None:
            return (seen is None) != (now is None)
        return seen[0] is not now[0] or seen[1] != now[1]

    def _kept_arguments(self):
        kept = {key: given for key, given in self._arguments.items() if key in self._argument_names}
        if self._buffers.get("weights") is not None:
            kept["weights"] = self._buffers["weights"]
        return kept

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The loaded weights are checked before torch copies them into the buffer (a CostError leaves
        # the module as it was), and become the spec's after.
        loaded = state_dict.get(prefix + "weights")
        if loaded is not None and self._buffers.get("weights") is not None:
            _checked_arguments(self.cost_name, (), tuple({**self._kept_arguments(), "weights": _untensored(loaded, "weights")}.items()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._buffers.get("weights") is not None:
            self._configure(**self._kept_arguments())

    def __getattr__(self, name):   # (only for names not found the usual way)
        arguments = self.__dict__.get("_arguments")
        if arguments is not None and name in arguments:
            return arguments[name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        arguments = self.__dict__.get("_arguments")
        if arguments is not None and name in self._argument_names:
            self._configure(**{**self._kept_arguments(), name: value})   # (a CostError leaves the module as it was)
        else:
            super().__setattr__(name, value)

    def forward(self, pred, target):
        preds = list(pred) if isinstance(pred, (list, tuple)) else [pred]
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        _check_tensors(pred, preds, target, targets)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in targets):
            raise CostError("target: requires grad, but the costs give the gradient with respect to pred only; "
                            "pass target.detach()")
        spec = self.spec
        if not torch.compiler.is_compiling():
            _refuse_transforms(preds)
            if self._weights_changed():
                self._configure(**self._kept_arguments())   # (the weights' buffer edited: read it once)
            spec, weights_held = self._spec_and_weights   # (held for the call: their registry entry with them)
        preds, targets = _promoted(preds, targets)
        target_is_list = isinstance(target, (list, tuple))
        if _traced(preds + targets):
            loss, _ = _cost_op(spec, preds, targets, target_is_list)
        else:
            loss = _EagerCost.apply(spec, target_is_list, len(preds), *preds, *targets)[0]
        return loss

    def extra_repr(self):   # (as the cost's repr: KLDivergence(maxlabels=None, normTarget=True, ...))
        weights = self._buffers.get("weights")
        return ", ".join([f"{name}={value!r}" for name, value in self._arguments.items()]
                         + ([f"weights=<{weights.numel()} values>"] if weights is not None else []))


for _name in _COSTS:
    _cost_class = getattr(puzzlelib_cost, _name)
    # (__signature__: help() and inspect show the cost's arguments, not (*args, **kwargs))
    globals()[_name] = type(_name, (_CostModule,), {
        "cost_name": _name, "__signature__": inspect.signature(_cost_class),
        "_argument_names": frozenset(_cost_class._ARGUMENTS),
        "__doc__": f"puzzlelib_cost.{_name} as a torch.nn.Module: module(pred, target) -> E; backward gives "
                   f"dE/dpred.  Its arguments are the cost's:\n\n{_cost_class.__doc__}"})
__all__ = list(_COSTS)
