"""puzzlelib_cost.nn: each cost as a torch module, on CPU tensors (the NumPy backend), against
independent torch formulas; autograd scaling, opcheck, torch.compile without a graph break,
double backward and a target that requires grad refused."""
import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import puzzlelib_cost  # noqa: E402
import puzzlelib_cost.nn as pnn  # noqa: E402
from puzzlelib_cost import CostError  # noqa: E402


def hinge(s, y):
    return torch.clamp(1 - s * y, min=0).mean()


def svm(mode):
    def loss(s, y):
        cls = 2 * F.one_hot(y.long(), s.shape[1]).movedim(-1, 1).to(s.dtype) - 1
        h = torch.clamp(1 - s * cls, min=0)
        return (h if mode == "l1" else h * h).mean()
    return loss


def l1hinge(pair, y):
    d = (pair[0] - pair[1]).abs()
    same = y.to(d.dtype).reshape(-1, *([1] * (d.dim() - 1)))
    return (same * d + (1 - same) * torch.clamp(1 - d, min=0)).mean()


def kl(pred, target):
    return F.kl_div(F.log_softmax(pred.flatten(1), 1), F.log_softmax(target.flatten(1), 1), reduction="batchmean",
                    log_target=True)


WEIGHTS = [0.5, 1.0, 2.0, 0.25, 3.0]
# name: (module, independent torch formula, input maker(generator, dtype))
CASES = {
    "MSE": (lambda: pnn.MSE(), lambda p, t: 0.5 * F.mse_loss(p, t), "pair"),
    "Abs": (lambda: pnn.Abs(), F.l1_loss, "pair"),
    "SmoothL1": (lambda: pnn.SmoothL1(), F.smooth_l1_loss, "pair"),
    "BCE": (lambda: pnn.BCE(), lambda s, y: F.binary_cross_entropy_with_logits(s, y.to(s.dtype)), "binary"),
    "Hinge": (lambda: pnn.Hinge(), lambda s, y: hinge(s, y.to(s.dtype)), "sign"),
    "SVM-l1": (lambda: pnn.SVM("l1"), svm("l1"), "class"),
    "SVM-l2": (lambda: pnn.SVM(mode="l2"), svm("l2"), "class"),
    "CrossEntropy": (lambda: pnn.CrossEntropy(), lambda s, y: F.cross_entropy(s, y.long()), "class"),
    "CrossEntropy-weighted": (lambda: pnn.CrossEntropy(weights=WEIGHTS),
                              lambda s, y: F.cross_entropy(s, y.long(), weight=torch.tensor(WEIGHTS, dtype=s.dtype),
                                                           reduction="sum") / (s.numel() // s.shape[1]), "class"),
    "KLDivergence": (lambda: pnn.KLDivergence(normTarget=True), kl, "pair"),
    "L1Hinge": (lambda: pnn.L1Hinge(), l1hinge, "siamese"),
}


def inputs(kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 5, 3) if kind == "class" else (4, 5)
    pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    # Away from the hinges' kink |s| = 1, where the costs' (sub)gradient and torch's clamp differ
    # (bfloat16 rounds values near 1 to exactly 1).
    pred = torch.where((pred.abs() - 1).abs() < 0.05, pred * 1.2, pred).to(dtype)
    if kind == "pair":
        return pred, torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "binary":
        return pred, torch.randint(0, 2, shape, generator=gen, dtype=torch.int32)
    if kind == "sign":
        return pred, 2 * torch.randint(0, 2, shape, generator=gen, dtype=torch.int32) - 1
    if kind == "class":
        return pred, torch.randint(0, 5, (4, 3), generator=gen, dtype=torch.int64)
    other = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return [pred, other], torch.randint(0, 2, (4,), generator=gen, dtype=torch.int8)


def leaves(pred):
    return [p.detach().clone().requires_grad_() for p in (pred if isinstance(pred, list) else [pred])]


def as_pred(ps):
    return ps if len(ps) > 1 else ps[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grad_match_torch(name, dtype):
    make, formula, kind = CASES[name]
    pred, target = inputs(kind, dtype)
    ours, theirs = leaves(pred), [p.double() for p in leaves(pred)]
    theirs = [t.detach().requires_grad_() for t in theirs]
    loss = make()(as_pred(ours), target)
    reference = formula(as_pred(theirs), target.double() if target.is_floating_point() else target)
    loss.backward()
    reference.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == () and loss.device == ours[0].device
    # float64 inputs: the same arithmetic as torch's to rounding; 16/32-bit: inputs rounded the same way
    # for both, so only the float32 loss and the rounding of the grad to the input dtype differ.
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    grad_rtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=rtol, abs=1e-12)
    for mine, ref in zip(ours, theirs):
        assert mine.grad.dtype == dtype
        scale = float(ref.grad.abs().max()) or 1.0
        assert float((mine.grad.double() - ref.grad).abs().max()) <= grad_rtol * scale


@pytest.mark.parametrize("name", ["BCE", "L1Hinge"])
def test_a_bool_mask_is_taken_as_labels(name):
    """torch's formula (the same in float64) on the mask's 0s and 1s: what integer labels give."""
    make, formula, kind = CASES[name]
    pred, labels = inputs(kind, torch.float64, seed=5)
    mask = labels.bool()
    ours, theirs = leaves(pred), leaves(pred)
    loss, reference = make()(as_pred(ours), mask), formula(as_pred(theirs), labels)
    loss.backward()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    for mine, ref in zip(ours, theirs):
        assert torch.allclose(mine.grad, ref.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["MSE", "CrossEntropy-weighted", "L1Hinge"])
def test_loss_equals_the_librarys_error(name):
    make, _, kind = CASES[name]
    pred, target = inputs(kind, torch.float64, seed=3)
    module = make()
    cost = getattr(puzzlelib_cost, module.cost_name)(**({"weights": WEIGHTS} if "weighted" in name else {}))
    numpy_pred = [p.numpy() for p in pred] if isinstance(pred, list) else pred.numpy()
    error, grad = cost(numpy_pred, target.numpy())
    assert float(module(pred, target)) == pytest.approx(error, rel=1e-15)


def test_backward_scales_with_the_incoming_gradient():
    pred, target = inputs("pair", torch.float32)
    once, thrice = leaves(pred)[0], leaves(pred)[0]
    pnn.MSE()(once, target).backward()
    (3 * pnn.MSE()(thrice, target)).backward()
    torch.testing.assert_close(thrice.grad, 3 * once.grad, rtol=1e-6, atol=0)


def test_a_scaled_loss_gives_16_bit_grads_rounded_once():
    """The incoming dL/dE is applied in float32 and rounded once: a float16 loss scaled by 65536 (a
    GradScaler's first scale) gave inf everywhere, its grads fitting float16; a bfloat16 loss scaled
    by 0.3 took 0.30078 (0.3 in bfloat16), +0.26 % on every grad."""
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(64, 50, generator=gen, dtype=torch.float64)
    target = torch.randn(64, 50, generator=gen, dtype=torch.float64)
    for dtype, scale in [(torch.float16, 65536.0), (torch.bfloat16, 0.3)]:
        plain, scaled = leaves(pred.to(dtype))[0], leaves(pred.to(dtype))[0]
        pnn.MSE()(plain, target.to(dtype)).backward()
        (pnn.MSE()(scaled, target.to(dtype)) * scale).backward()
        expected = plain.grad.double() * scale   # (the unscaled grad, exactly scaled)
        assert torch.isfinite(scaled.grad).all()
        ratio = scaled.grad.double()[expected != 0] / expected[expected != 0]
        assert (ratio - 1).abs().max() <= torch.finfo(dtype).eps / 2 * 1.01
        assert abs(float(ratio.mean()) - 1) < 5e-4   # (no bias: the old 0.30078 gave 2.6e-3)


@pytest.mark.parametrize("name", ["KLDivergence", "CrossEntropy-weighted", "L1Hinge", "BCE"])
def test_opcheck(name):
    make, _, kind = CASES[name]
    pred, target = inputs(kind, torch.float32)
    preds = leaves(pred)
    torch.library.opcheck(torch.ops.puzzlelib_cost.cost.default, (make().spec, preds, [target], False))


def ctc_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames, n, vocab = 12, 3, 6
    data = torch.randn(frames, n, vocab, generator=gen, dtype=torch.float64).to(dtype)
    datalen = torch.tensor([12, 9, 7], dtype=torch.int32)
    lengths = torch.tensor([4, 0, 3], dtype=torch.int32)
    labels = torch.randint(1, vocab, (int(lengths.sum()),), generator=gen, dtype=torch.int32)
    return data, datalen, labels, lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ctc_module_matches_torch_ctc_loss(dtype):
    data, datalen, labels, lengths = ctc_inputs(dtype)
    ours = data.detach().clone().requires_grad_()
    theirs = data.detach().double().requires_grad_()
    loss = pnn.CTC(blank=0)([ours, datalen], [labels, lengths])
    reference = F.ctc_loss(F.log_softmax(theirs, 2), labels.long(), datalen.long(), lengths.long(), blank=0,
                           reduction="sum") / data.shape[1]
    loss.backward()
    reference.backward()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=rtol)
    assert ours.grad.dtype == dtype
    assert float((ours.grad.double() - theirs.grad).abs().max()) <= (1e-12 if dtype == torch.float64 else 1e-5) \
        * float(theirs.grad.abs().max())


def test_ctc_opcheck():
    data, datalen, labels, lengths = ctc_inputs(torch.float32)
    torch.library.opcheck(torch.ops.puzzlelib_cost.cost.default,
                          (pnn.CTC(blank=0).spec, [data.requires_grad_(), datalen], [labels, lengths], True))


def test_sparse_teacher_module_matches_torch():
    """A sparse top-k teacher (target = [indices, values]) through the module: against the dense
    KL of the teacher's logits scattered into a row of -inf, in torch."""
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(6, 20, generator=gen, dtype=torch.float64)
    indices = torch.stack([torch.randperm(20, generator=gen)[:4] for _ in range(6)])
    values = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ours, theirs = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = pnn.KLDivergence(normTarget=True, temperature=2.0)(ours, [indices, values])
    log_p = torch.full((6, 20), -torch.inf, dtype=torch.float64).scatter(1, indices, values / 2)
    log_p = torch.log_softmax(log_p, 1)
    p = log_p.exp()
    reference = (p * (torch.where(p > 0, log_p, 0) - torch.log_softmax(theirs / 2, 1))).sum() / 6
    loss.backward()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-14)


def test_compiled_two_layer_model_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    loss_fn = pnn.CrossEntropy(weights=WEIGHTS)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))

    def step(x, y):
        return loss_fn(model(x), y)
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = step(x, y)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step)(x, y)
    compiled.backward()
    assert float(compiled) == pytest.approx(float(eager), rel=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_a_module_made_inside_a_fullgraph_compiled_function():
    """As torch's own losses are, inline in a compiled step: the cost's lock and json broke the graph."""
    gen = torch.Generator().manual_seed(10)
    x, teacher = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)

    def step(pred, target):
        return pnn.KLDivergence(normTarget=True, temperature=2.0)(pred, target)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(ours, teacher)
    reference = F.kl_div(F.log_softmax(theirs / 2, 1), F.log_softmax(teacher / 2, 1), reduction="batchmean",
                         log_target=True)
    loss.backward()
    reference.backward()
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="CostError: temperature"):   # (checked as the graph is traced)
        torch.compile(lambda p, t: pnn.KLDivergence(temperature=-1.0)(p, t), fullgraph=True)(x, teacher)


def test_double_backward_is_a_clear_error():
    pred, target = inputs("pair", torch.float64)
    x = leaves(pred)[0]
    (grad,) = torch.autograd.grad(pnn.MSE()(x, target), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not available"):
        grad.sum().backward()


@pytest.mark.parametrize("name", ["MSE", "L1Hinge", "CrossEntropy-weighted"])
def test_eager_calls_skip_the_custom_operator_and_match_it(name, monkeypatch):
    """An eager call runs without the custom operator's Python layers (which made the module's
    GPU calls host-bound): the same loss and grads as the operator's, bitwise, with the operator
    replaced by a failure; a call on the meta device still goes through it (its fake)."""
    module, _, kind = CASES[name]
    pred, target = inputs(kind, torch.float32)
    held = module()   # (holds the class weights its spec names)
    loss, grads = torch.ops.puzzlelib_cost.cost(held.spec, leaves(pred), [target], False)
    calls = []
    monkeypatch.setattr(pnn, "_cost_op", lambda *args: calls.append(args) or (_ for _ in ()).throw(AssertionError))
    eager = leaves(pred)
    loss_eager = held(as_pred(eager), target)
    loss_eager.backward()
    assert not calls
    assert torch.equal(loss_eager, loss)
    for leaf, grad in zip(eager, grads):
        assert torch.equal(leaf.grad, -grad)
    monkeypatch.undo()
    meta = [p.to("meta") for p in leaves(pred)]
    assert held(as_pred(meta), target.to("meta")).device.type == "meta"


def test_a_retained_graph_gives_the_same_grads_twice():
    pred, target = inputs("pair", torch.float32)
    x = leaves(pred)[0]
    loss = pnn.MSE()(x, target)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)


def test_the_library_grad_is_freed_by_backward_and_a_second_backward_is_refused():
    """The grad the kernels computed in the forward pass (a pred-sized buffer) lives until the
    backward that uses it, not as long as the loss: a training loop's old loss, alive until the
    next forward returns, held one more.  So after backward the loss's node holds no tensor (its
    saved ones freed, none kept beside them), and a second backward without retain_graph is
    refused, as torch's own losses refuse it (it added the grad twice)."""
    pred, target = inputs("pair", torch.float32)
    x = leaves(pred)[0]
    loss = pnn.MSE()(x, target)
    loss.backward()

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        return [t for v in value for t in tensors(v)] if isinstance(value, (list, tuple)) else []
    assert not [t for value in vars(loss.grad_fn).values() for t in tensors(value)]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.grad_fn.saved_tensors
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_a_target_that_requires_grad_is_refused():
    pred, target = inputs("pair", torch.float32)
    with pytest.raises(CostError, match="target: requires grad"):
        pnn.KLDivergence()(pred, target.requires_grad_())


def test_bad_constructor_arguments_are_refused_at_construction():
    with pytest.raises(CostError, match="mode"):
        pnn.SVM("l3")


def test_ctc_on_probabilities_is_refused_and_log_probabilities_give_the_logits_loss():
    """CTC(normalized=True)'s grad is with respect to the logits behind the probabilities
    (PuzzleLib's): as a module, backward put that in the probabilities' .grad (off by 2.4).  It is
    refused; log-probabilities in its place give the loss and, through log_softmax, the grad of
    the logits (torch's ctc_loss, float64, is the reference)."""
    with pytest.raises(CostError, match="normalized"):
        pnn.CTC(0, normalized=True)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    datalen, labels, lengths = torch.tensor([6, 5]), torch.tensor([1, 2, 3]), torch.tensor([2, 1])
    loss = pnn.CTC(0)([F.log_softmax(logits, 2), datalen], [labels, lengths])
    loss.backward()
    mine = logits.grad.clone()
    logits.grad = None
    expected = F.ctc_loss(F.log_softmax(logits, 2), labels, datalen, lengths, blank=0, reduction="sum") / 2
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(mine, logits.grad, rtol=1e-10, atol=1e-12)


def test_importing_the_library_does_not_import_torch():
    code = "import sys, puzzlelib_cost; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_nn_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import puzzlelib_cost.nn\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'puzzlelib_cost[torch]'" in out


def test_distillation_options_match_torch():
    """temperature and ignoreLabel through the module: F.cross_entropy(x / T, ignore_index=-100)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 3, -100, 0, 4])
    loss = pnn.KLDivergence(ignoreLabel=-100, temperature=2.0)(x, y)
    loss.backward()
    ref_x = x.detach().clone().requires_grad_()
    reference = F.cross_entropy(ref_x / 2.0, y, ignore_index=-100)
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-15)
    every_row_ignored = pnn.KLDivergence(ignoreLabel=-100)(x, torch.full((6,), -100))
    assert float(every_row_ignored.detach()) == 0.0


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_a_non_contiguous_pred_compiles_and_passes_opcheck(layout):
    """The fake (meta) kernel gave grads pred's strides, the real op contiguous ones: torch.compile
    refused a transposed or channels_last pred ("incorrect fake kernel"), opcheck a stride mismatch."""
    gen = torch.Generator().manual_seed(3)
    if layout == "transposed":
        pred = torch.randn(5, 6, generator=gen, dtype=torch.float64).t()   # (6, 5), strides (1, 6)
        target = torch.randint(0, 5, (6,), generator=gen)
    else:
        pred = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
        target = torch.randint(0, 5, (2, 3, 4), generator=gen)
    assert not pred.is_contiguous()
    loss_fn = pnn.CrossEntropy()
    torch.library.opcheck(torch.ops.puzzlelib_cost.cost.default, (loss_fn.spec, [pred], [target], False))
    want = F.cross_entropy(pred, target)
    got = torch.compile(lambda p, t: loss_fn(p, t))(pred, target)
    assert float(got) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_float_dtypes_are_promoted_as_torch_promotes_them(pred_dtype, target_dtype):
    """Autocast's bfloat16 pred beside a float32 target (or teacher logits made outside autocast):
    torch's losses promote, and so do the modules (they were refused: the library takes one dtype a
    call).  E and dE/dpred as torch's formula on the promoted pair; pred.grad in pred's dtype."""
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 9, generator=gen).to(pred_dtype)
    target = torch.randn(6, 9, generator=gen).to(target_dtype)
    wide = torch.promote_types(pred_dtype, target_dtype)
    # (the reference in float64 on the same values; grads to the float32 or 16-bit grad's rounding of
    # their largest, as p - q cancels)
    eps = 1e-2 if torch.finfo(pred_dtype).bits == 16 else 1e-6   # (pred.grad is in pred's dtype)
    for module, formula in ((pnn.MSE(), lambda p, t: 0.5 * F.mse_loss(p, t)), (pnn.KLDivergence(normTarget=True), kl)):
        ours, theirs = leaves(pred)[0], pred.double().requires_grad_()
        loss = module(ours, target)
        want = formula(theirs, target.double())
        assert loss.dtype == (torch.float64 if wide == torch.float64 else torch.float32)
        torch.testing.assert_close(loss.double(), want, rtol=1e-12 if wide == torch.float64 else 1e-6, atol=0)
        loss.backward(), want.backward()
        assert ours.grad.dtype == pred_dtype
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=eps, atol=eps * float(theirs.grad.abs().max()))


def test_autocast_outputs_beside_float32_targets():
    lin = torch.nn.Linear(5, 7)
    x, y = torch.randn(6, 5), torch.randn(6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        assert out.dtype == torch.bfloat16
        loss = pnn.MSE()(out, y)
        want = 0.5 * F.mse_loss(out.float(), y)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-9)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_a_target_that_requires_grad_is_taken_where_no_grad_flows():
    pred, target = inputs("pair", torch.float32)
    target = target.requires_grad_()
    with torch.no_grad():
        got = pnn.MSE()(pred, target)
    assert float(got) == pytest.approx(float(0.5 * F.mse_loss(pred, target.detach())), rel=1e-6)


def test_the_costs_arguments_are_the_modules_attributes():
    """An annealed temperature set on the module is the next call's (it was stored and ignored)."""
    gen = torch.Generator().manual_seed(5)
    pred, target = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    module = pnn.KLDivergence(normTarget=True)
    assert module.temperature == 1.0 and module.normTarget is True
    module.temperature = 2.5
    want = F.kl_div(F.log_softmax(pred / 2.5, 1), F.log_softmax(target / 2.5, 1), reduction="batchmean",
                    log_target=True)
    assert float(module(pred, target)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(CostError, match="temperature"):
        module.temperature = -1.0
    assert module.temperature == 2.5 and float(module(pred, target)) == pytest.approx(float(want), rel=1e-6)
    weighted = pnn.CrossEntropy()
    weighted.weights = [1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.0]
    labels = torch.randint(0, 7, (4,), generator=gen)
    w = weighted.weights.float()
    assert float(weighted(pred, labels)) == pytest.approx(
        float(F.cross_entropy(pred, labels, weight=w, reduction="sum") / 4), rel=1e-6)
    module.note = "anything else is an ordinary attribute"
    assert module.note.startswith("anything")


def test_cross_entropy_weights_are_a_buffer_as_torchs_weight_is():
    """The class weights were in no state_dict (a checkpoint lost them, loading one left the module's
    own), and an edit of them in place was not seen.  torch's CrossEntropyLoss keeps them as a buffer."""
    gen = torch.Generator().manual_seed(6)
    scores, labels = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 1])

    def want(w):
        return float(F.cross_entropy(scores, labels, weight=torch.tensor(w, dtype=torch.float64), reduction="sum") / 6)
    trained = pnn.CrossEntropy(weights=WEIGHTS)
    assert torch.equal(trained.state_dict()["weights"], torch.tensor(WEIGHTS, dtype=torch.float64))
    fresh = pnn.CrossEntropy(weights=[1.0] * 5)
    fresh.load_state_dict(trained.state_dict())
    assert float(fresh(scores, labels)) == pytest.approx(want(WEIGHTS), rel=1e-12)
    fresh.weights[1] = 7.0   # in place, as torch's module allows
    edited = [WEIGHTS[0], 7.0, *WEIGHTS[2:]]
    assert float(fresh(scores, labels)) == pytest.approx(want(edited), rel=1e-12)
    with pytest.raises(CostError, match="weights"):   # checked before torch copies it in
        fresh.load_state_dict({"weights": torch.ones(5, 2, dtype=torch.float64)})
    assert fresh.weights.tolist() == edited and float(fresh(scores, labels)) == pytest.approx(want(edited), rel=1e-12)
    assert pnn.CrossEntropy(weights=torch.tensor(WEIGHTS)).state_dict()["weights"].tolist() == WEIGHTS
    assert pnn.CrossEntropy().state_dict() == {} and pnn.KLDivergence().state_dict() == {}


def test_cross_entropy_weights_under_inference_mode_and_after_moves():
    """Made, cast or loaded under inference_mode, a weighted module failed on every later call (an
    inference tensor has no version counter); an edit between two casts could go unseen (the stamp
    kept the old buffer's id, which the new one could take: 29 of 50 runs used the old weights)."""
    x, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(11)), torch.tensor([0, 1, 2, 3, 4, 1])

    def want(w):
        return float(F.cross_entropy(x, labels, weight=torch.tensor(w, dtype=torch.float32), reduction="sum") / 6)
    with torch.inference_mode():
        module = pnn.CrossEntropy(weights=WEIGHTS)
        module.float()
        module.load_state_dict(module.state_dict())
        assert float(module(x, labels)) == pytest.approx(want(WEIGHTS), rel=1e-6)
    assert float(module(x, labels)) == pytest.approx(want(WEIGHTS), rel=1e-6)
    for trial in range(20):
        module = pnn.CrossEntropy(weights=[1.0] * 5)
        module(x, labels)
        module.float()
        with torch.no_grad():
            module.weights.mul_(trial + 2)
        module.double()
        assert float(module(x, labels)) == pytest.approx(want([trial + 2.0] * 5), rel=1e-6), trial


def test_positional_tensor_weights_and_a_module_pickled_before_the_registry():
    x, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(12)), torch.tensor([0, 1, 2, 3, 4, 1])
    want = float(F.cross_entropy(x, labels, weight=torch.tensor(WEIGHTS), reduction="sum") / 6)
    module = pnn.CrossEntropy(None, torch.tensor(WEIGHTS, requires_grad=True))   # (positional, as torch's)
    assert float(module(x, labels)) == pytest.approx(want, rel=1e-6)
    # A module of the earlier format: its spec held the weights' values, no registry entry, no buffer.
    old = pnn.CrossEntropy()
    arguments = {"maxlabels": None, "weights": list(WEIGHTS)}
    old.__dict__.update(_arguments=arguments, spec=json.dumps(["CrossEntropy", arguments]))
    del old.__dict__["_weights_host"], old.__dict__["_weights_seen"]
    del old._buffers["weights"]
    revived = pickle.loads(pickle.dumps(old))
    assert float(revived(x, labels)) == pytest.approx(want, rel=1e-6)
    assert revived.weights.tolist() == list(WEIGHTS)


def test_inputs_that_are_not_tensors_are_a_cost_error():
    """torch's schema error named the op's List[Tensor] argument; a list of labels was a 'list target'."""
    x = torch.randn(3, 5)
    for target, message in ((np.zeros((3, 5), np.float32), "target: expected a torch.Tensor .* got ndarray"),
                            ([0, 1, 2], r"target\[0\]: expected a torch.Tensor .* got int in a list"),
                            (0.0, "target: expected a torch.Tensor .* got float")):
        with pytest.raises(CostError, match=message):
            pnn.MSE()(x, target)
    with pytest.raises(CostError, match=r"pred\[1\]: expected a torch.Tensor .* got int in a tuple"):
        pnn.L1Hinge()((x, 1), torch.ones(3))


def test_a_meta_tensor_beside_a_real_one_is_a_cost_error():
    """A meta target sent the op to its fake implementation, which answered with a loss and a grad
    of uninitialised memory and no check at all (labels out of range went through).  Every input on
    the meta device gives a meta loss, as torch's own losses do."""
    x = torch.randn(4, 5, requires_grad=True)
    for module, target, message in ((pnn.MSE(), torch.randn(4, 5, device="meta"), "pred on cpu, target on meta"),
                                     (pnn.CrossEntropy(), torch.full((4,), 9, device="meta"), "target on meta")):
        with pytest.raises(CostError, match="must all be on the meta device or none, got .*" + message):
            module(x, target)
    with pytest.raises(CostError, match=r"pred\[1\] on meta"):
        pnn.L1Hinge()([x, torch.randn(4, 5, device="meta")], torch.ones(4, 5, dtype=torch.int64))
    loss = pnn.MSE()(torch.randn(4, 5, device="meta"), torch.randn(4, 5, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    assert x.grad is None


def test_tensors_the_op_cannot_take_are_a_cost_error():
    """Sparse and nested tensors, float8, and such tensors as constructor arguments raised torch's
    or NumPy's errors (unsupported memory format, a failed promotion, NotImplementedError), which
    named neither the input nor the cost."""
    x, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for call, message in (
            (lambda: pnn.MSE()(x.to_sparse(), x), "pred: expected a dense tensor, got a torch.sparse_coo one"),
            (lambda: pnn.CrossEntropy()(x, labels.to_sparse()), "target: expected a dense tensor"),
            (lambda: pnn.MSE()(x, x.to(torch.float8_e4m3fn)), "target: expected float16, bfloat16, float32 or "
                                                              "float64, got torch.float8_e4m3fn"),
            (lambda: pnn.CrossEntropy()(torch.nested.nested_tensor([x[0], x[1]]), labels[:2]),
             "pred: expected a dense tensor, got a nested one"),
            (lambda: pnn.CrossEntropy(weights=torch.ones(5, device="meta")), "weights: expected a tensor with values"),
            (lambda: pnn.CrossEntropy(torch.ones(5).to_sparse()), "argument 0: expected a tensor with values"),
            (lambda: pnn.KLDivergence(temperature=torch.tensor(2.0, device="meta")), "temperature: expected")):
        with pytest.raises(CostError, match=re.escape(message)):
            call()


def test_weights_are_named_in_the_spec_not_spelled_out():
    """The op's spec carried every weight's value (0.6 MB at 32K classes, passed and hashed each call:
    a weighted call took 1.5 to 2.2 times an unweighted one); a module unpickled in another process
    brings its weights along."""
    classes = 32000
    weights = torch.rand(classes, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.5
    module = pnn.CrossEntropy(weights=weights)
    assert len(module.spec) < 200
    assert repr(module) == "CrossEntropy(maxlabels=None, weights=<32000 values>)"
    scores, labels = torch.randn(4, classes, dtype=torch.float64), torch.tensor([0, 5, 31999, 7])
    want = float(F.cross_entropy(scores, labels, weight=weights, reduction="sum") / 4)
    # (its weights registered as it is unpickled, not at its first eager call: a compiled call skips that)
    script = ("import json, pickle, sys, torch, puzzlelib_cost.nn as pnn; "
              "module, scores, labels = pickle.loads(sys.stdin.buffer.read()); "
              "assert json.loads(module.spec)[1]['weights'] in pnn._WEIGHTS; "
              "print(float(module(scores, labels)).hex())")
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps((module, scores, labels)),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert float.fromhex(done.stdout.decode().strip()) == pytest.approx(want, rel=1e-12)
    assert float(module(scores, labels)) == pytest.approx(want, rel=1e-12)


def test_a_0_d_tensor_argument_is_taken_as_its_number():
    """kl.temperature = torch.tensor(2.0) said 'expected a finite number > 0, got tensor(2.)'."""
    module = pnn.KLDivergence(normTarget=True, temperature=torch.tensor(3.0))
    module.temperature = torch.tensor(2.0)
    assert module.temperature == 2.0 and type(module.temperature) is float


def test_torch_func_transforms_and_forward_mode_are_refused():
    """jacfwd gave zeros (the op has no forward-mode formula, and torch gave the loss no tangent)."""
    x, t = torch.randn(3, 5), torch.randn(3, 5)
    module = pnn.KLDivergence(normTarget=True)
    for transform in (torch.func.jacfwd, torch.func.grad, torch.func.jacrev, torch.func.vmap):
        with pytest.raises(CostError, match="torch.func transform"):
            transform(lambda a: module(a, t))(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(CostError, match="forward-mode AD"):
            module(dual, t)


def test_the_op_is_kept_out_of_cuda_graphs():
    # (the library refuses a call on a capturing stream: inductor's reduce-overhead mode must not
    # put it in a graph)
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert tag in torch.ops.puzzlelib_cost.cost.default.tags


def test_the_cached_costs_hold_no_grad_and_are_bounded():
    """The module's cost objects are cached per thread; they let the grad go once autograd has it
    (else a pred-sized block stayed alive after the module, pred and loss were gone), and only the
    ones used last are kept (an annealed temperature is a new cost each step)."""
    torch.manual_seed(0)
    pred = torch.randn(64, 100, requires_grad=True)
    target = torch.softmax(torch.randn(64, 100), dim=1)
    for step in range(3 * pnn._KEEP_COSTS):
        pnn.KLDivergence(temperature=1.0 + step / 10)(pred, target).backward()
    costs = pnn._local.costs
    assert len(costs) == pnn._KEEP_COSTS
    assert all(cost.grad is None for cost in costs.values())


def test_the_modules_show_their_costs_arguments():
    """help(pnn.KLDivergence) showed (*args, **kwargs)."""
    import inspect
    for name in pnn.__all__:
        assert inspect.signature(getattr(pnn, name)) == inspect.signature(getattr(puzzlelib_cost, name)), name
    assert "temperature" in pnn.KLDivergence.__doc__


def test_kl_divergence_with_ignore_label_is_cross_entropys_ignore_index():
    """The README points torch users there for CrossEntropy's missing ignore index."""
    gen = torch.Generator().manual_seed(9)
    ours = torch.randn(6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    labels = torch.tensor([3, -100, 0, 6, -100, 2])
    loss = pnn.KLDivergence(ignoreLabel=-100)(ours, labels)
    reference = F.cross_entropy(theirs, labels, ignore_index=-100)
    loss.backward()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype,ignore", [(torch.uint8, 255), (torch.uint8, -100), (torch.int16, -100),
                                          (torch.int64, 2 ** 40)], ids=str)
def test_the_loss_divides_by_the_rows_ignore_label_leaves_in_any_label_dtype(dtype, ignore):
    """The module counts the rows left with torch, on the labels' device (a GPU training call's
    count is on the device alone): a label value the dtype cannot hold ignores no row."""
    gen = torch.Generator().manual_seed(10)
    ours = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 0, 5, 1, 2, 4, 0, 1], dtype=dtype)
    ignored = torch.tensor([False, True, False, False, True, True, False, False])
    if torch.iinfo(dtype).min <= ignore <= torch.iinfo(dtype).max:
        labels[ignored] = ignore
    else:
        ignored[:] = False
    loss = pnn.KLDivergence(ignoreLabel=ignore)(ours, labels)
    reference = F.cross_entropy(ours[~ignored], labels[~ignored].long())
    assert float(loss) == pytest.approx(float(reference), rel=1e-12)


def test_new_class_weights_from_another_thread_mid_call_leave_the_call_its_own():
    """A call reads the spec and the weights it names in one step and holds them: another thread's
    new weights between its read and the op let this call's weights drop from the registry (a
    KeyError, 750 in 3 s of two threads)."""
    import gc
    x, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(13)), torch.tensor([0, 1, 2, 3, 4, 1])
    unique = [0.5, 1.0, 2.0, 0.25, 3.125]   # (weights no other test's module holds)
    module = pnn.CrossEntropy(weights=torch.tensor(unique))
    want = float(F.cross_entropy(x, labels, weight=torch.tensor(unique, dtype=torch.float64).float(), reduction="sum") / 6)
    promoted = pnn._promoted

    def others_weights_meanwhile(preds, targets):
        module.weights = torch.tensor([1.0] * 5)   # (as another thread would, after this call's read)
        gc.collect()
        return promoted(preds, targets)
    pnn._promoted = others_weights_meanwhile
    try:
        assert float(module(x, labels)) == pytest.approx(want, rel=1e-6)
    finally:
        pnn._promoted = promoted


def test_a_spec_whose_weights_no_module_holds_is_a_cost_error():
    """An exported or traced program run after the module it came from is gone: a CostError that says
    so (a bare KeyError of the weights' digest)."""
    import gc
    import threading
    module = pnn.CrossEntropy(weights=torch.tensor([0.5, 1.0, 2.0, 0.25, 3.25]))
    spec = module.spec
    del module
    gc.collect()
    found = []
    thread = threading.Thread(target=lambda: found.append(pytest.raises(CostError, pnn._cost, spec, torch.device("cpu"))))
    thread.start()
    thread.join(30)
    assert found and "held by no module in this process" in str(found[0].value)


def test_weights_cast_by_half_stay_half_after_a_call():
    """.half() casts the weights' buffer as torch's loss's; a call read the edited buffer again into
    a float64 one (state_dict's dtype flipped)."""
    x, labels = torch.randn(4, 5, generator=torch.Generator().manual_seed(14)), torch.tensor([0, 1, 2, 3])
    module = pnn.CrossEntropy(weights=torch.tensor(WEIGHTS)).half()
    assert module.weights.dtype == torch.float16
    module(x, labels)
    assert module.weights.dtype == torch.float16 and module.state_dict()["weights"].dtype == torch.float16
