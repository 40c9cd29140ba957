"""The code examples of the seed documents (/work/shared/seeds/*.txt), run on functorch_lite.

One test per example, named test_seed<NNN>_<file hash>_<example>. The code is copied from the
seed with `torch.func` / `functorch` replaced by `functorch_lite`, keeping the seed's own
assertions. Adaptations, each marked with `# adapted:` where it occurs:
  * indentation (the seeds' text lost it) and the `>>>` prompts of 003 are restored/removed;
  * examples that rely on names imported or defined by an earlier example of the same page get
    those lines repeated (`# from an earlier example`);
  * the notebook cells of seed 002 share global state: a test repeats the cells it depends on, and
    `globals=globals()` of torch.utils.benchmark.Timer becomes `globals={**globals(),
    **locals()}` (the notebook's globals are this module's plus the test's locals);
  * where a seed shows a result instead of asserting it (`True`, a printed shape, a sentence
    saying what the result is), the shown result is asserted after the copied code, marked
    `# shown by the seed:`.

Examples that need a transform functorch_lite does not have yet are strict xfails with
raises=NotImplementedError (they start failing, as a reminder, once it is implemented); examples
that hit a known functorch_lite bug are strict xfails naming it.
"""

import pathlib

import pytest
import torch

import functorch_lite

SEED_DIR = pathlib.Path("/work/shared/seeds")

ISSUE = {
    "jvp": 5,
    "jacrev": 5,
    "jacfwd": 5,
    "hessian": 5,
    "functional_call": 6,
    "make_functional": 6,
    "make_functional_with_buffers": 6,
    "stack_module_state": 6,
}


def _is_stub(name):
    """True while functorch_lite.<name> is the placeholder that raises NotImplementedError."""
    try:
        getattr(functorch_lite, name)()
    except NotImplementedError:
        return True
    except Exception:  # the real transform complains about its missing arguments
        return False
    return False


def seed_example(*needs, bug=None):
    """Marks an example: a strict NotImplementedError xfail while a transform it needs is still a
    placeholder, else a strict xfail for `bug` (a known functorch_lite bug), else nothing."""
    missing = [n for n in needs if _is_stub(n)]
    if missing:
        return pytest.mark.xfail(
            reason=f"needs functorch_lite.{missing[0]} (issue #{ISSUE[missing[0]]})",
            raises=NotImplementedError,
            strict=True,
        )
    if bug is not None:
        return pytest.mark.xfail(reason=bug, raises=RuntimeError, strict=True)
    return lambda f: f


COVERED = {
    "000_ef0caa882b324910.txt",  # torch.func quickstart (Chinese translation)
    "001_3afd711742fe1929.txt",  # functorch whirlwind tour
    "002_7ded5c7210c8a2e8.txt",  # notebook: jacobians, hessians, vmap/vjp (Chinese comments)
    "003_2657b6e878e2f743.txt",  # torch.func.jacrev reference (Chinese translation)
}


@pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"{SEED_DIR} not present")
def test_every_seed_document_is_covered():
    assert {p.name for p in SEED_DIR.glob("*.txt")} == COVERED


# ================================================================================================
# 000_ef0caa882b324910.txt: "torch.func 快速入门" (torch.func quickstart, Chinese translation)


def test_seed000_ef0caa882b324910_grad():
    import torch

    from functorch_lite import grad

    x = torch.randn([])
    cos_x = grad(lambda x: torch.sin(x))(x)
    assert torch.allclose(cos_x, x.cos())
    # Second-order gradients
    neg_sin_x = grad(grad(lambda x: torch.sin(x)))(x)
    assert torch.allclose(neg_sin_x, -x.sin())


def test_seed000_ef0caa882b324910_vmap_model():
    import torch

    from functorch_lite import vmap

    batch_size, feature_size = 3, 5
    weights = torch.randn(feature_size, requires_grad=True)

    def model(feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    examples = torch.randn(batch_size, feature_size)
    result = vmap(model)(examples)
    # shown by the seed: vmap(model) runs model on each example
    assert torch.allclose(result, torch.stack([model(e) for e in examples]))


def test_seed000_ef0caa882b324910_vmap_grad_per_sample_gradients():
    from functorch_lite import (
        grad,  # from an earlier example
        vmap,
    )

    batch_size, feature_size = 3, 5

    def model(weights, feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    def compute_loss(weights, example, target):
        y = model(weights, example)
        return ((y - target) ** 2).mean()  # MSELoss

    weights = torch.randn(feature_size, requires_grad=True)
    examples = torch.randn(batch_size, feature_size)
    targets = torch.randn(batch_size)
    inputs = (weights, examples, targets)
    grad_weight_per_example = vmap(grad(compute_loss), in_dims=(None, 0, 0))(*inputs)
    # shown by the seed: these are per-sample gradients
    expected = torch.stack([torch.func.grad(compute_loss)(weights, e, t) for e, t in zip(examples, targets)])
    assert torch.allclose(grad_weight_per_example, expected)


def test_seed000_ef0caa882b324910_vjp():
    from functorch_lite import vjp

    inputs = torch.randn(3)
    func = torch.sin
    cotangents = (torch.randn(3),)
    outputs, vjp_fn = vjp(func, inputs)
    vjps = vjp_fn(*cotangents)  # noqa: E702
    # shown by the seed: the vector-Jacobian product of sin
    assert torch.allclose(vjps[0], cotangents[0] * inputs.cos())


@seed_example("jvp")
def test_seed000_ef0caa882b324910_jvp():
    from functorch_lite import jvp

    x = torch.randn(5)
    y = torch.randn(5)
    f = lambda x, y: x * y  # noqa: E731
    _, out_tangent = jvp(f, (x, y), (torch.ones(5), torch.ones(5)))
    assert torch.allclose(out_tangent, x + y)


@seed_example("jacrev")
def test_seed000_ef0caa882b324910_jacrev():
    from functorch_lite import jacrev

    x = torch.randn(5)
    jacobian = jacrev(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev")
def test_seed000_ef0caa882b324910_vmap_jacrev():
    from functorch_lite import jacrev, vmap  # from earlier examples

    x = torch.randn(64, 5)
    jacobian = vmap(jacrev(torch.sin))(x)
    assert jacobian.shape == (64, 5, 5)


@seed_example("jacfwd")
def test_seed000_ef0caa882b324910_jacfwd():
    from functorch_lite import jacfwd

    x = torch.randn(5)
    jacobian = jacfwd(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev", "jacfwd")
def test_seed000_ef0caa882b324910_hessian_from_jacrev_jacfwd():
    from functorch_lite import jacfwd, jacrev  # from earlier examples

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hessian0 = jacrev(jacrev(f))(x)
    hessian1 = jacfwd(jacrev(f))(x)
    # shown by the seed: both are the Hessian of f
    assert torch.allclose(hessian0, torch.diag(-x.sin()))
    assert torch.allclose(hessian1, torch.diag(-x.sin()))


@seed_example("hessian")
def test_seed000_ef0caa882b324910_hessian():
    from functorch_lite import hessian

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hess = hessian(f)(x)
    # shown by the seed: hessian combines jacfwd and jacrev
    assert torch.allclose(hess, torch.diag(-x.sin()))


# ================================================================================================
# 001_3afd711742fe1929.txt: "Whirlwind Tour" (functorch)


def test_seed001_3afd711742fe1929_vmap_model():
    import torch

    from functorch_lite import vmap

    batch_size, feature_size = 3, 5
    weights = torch.randn(feature_size, requires_grad=True)

    def model(feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    examples = torch.randn(batch_size, feature_size)
    result = vmap(model)(examples)
    # shown by the seed: vmap(model) runs model on each example
    assert torch.allclose(result, torch.stack([model(e) for e in examples]))


def test_seed001_3afd711742fe1929_grad():
    from functorch_lite import grad

    x = torch.randn([])
    cos_x = grad(lambda x: torch.sin(x))(x)
    assert torch.allclose(cos_x, x.cos())
    # Second-order gradients
    neg_sin_x = grad(grad(lambda x: torch.sin(x)))(x)
    assert torch.allclose(neg_sin_x, -x.sin())


def test_seed001_3afd711742fe1929_vmap_grad_per_sample_gradients():
    from functorch_lite import (
        grad,  # from an earlier example
        vmap,
    )

    batch_size, feature_size = 3, 5

    def model(weights, feature_vec):
        # Very simple linear model with activation
        assert feature_vec.dim() == 1
        return feature_vec.dot(weights).relu()

    def compute_loss(weights, example, target):
        y = model(weights, example)
        return ((y - target) ** 2).mean()  # MSELoss

    weights = torch.randn(feature_size, requires_grad=True)
    examples = torch.randn(batch_size, feature_size)
    targets = torch.randn(batch_size)
    inputs = (weights, examples, targets)
    grad_weight_per_example = vmap(grad(compute_loss), in_dims=(None, 0, 0))(*inputs)
    # shown by the seed: these are per-sample gradients
    expected = torch.stack([torch.func.grad(compute_loss)(weights, e, t) for e, t in zip(examples, targets)])
    assert torch.allclose(grad_weight_per_example, expected)


def test_seed001_3afd711742fe1929_vjp():
    from functorch_lite import vjp

    inputs = torch.randn(3)
    func = torch.sin
    cotangents = (torch.randn(3),)
    outputs, vjp_fn = vjp(func, inputs)
    vjps = vjp_fn(*cotangents)  # noqa: E702
    # shown by the seed: the vector-Jacobian product of sin
    assert torch.allclose(vjps[0], cotangents[0] * inputs.cos())


@seed_example("jvp")
def test_seed001_3afd711742fe1929_jvp():
    from functorch_lite import jvp

    x = torch.randn(5)
    y = torch.randn(5)
    f = lambda x, y: x * y  # noqa: E731
    _, output = jvp(f, (x, y), (torch.ones(5), torch.ones(5)))
    assert torch.allclose(output, x + y)


@seed_example("jacrev")
def test_seed001_3afd711742fe1929_jacrev():
    from functorch_lite import jacrev

    x = torch.randn(5)
    jacobian = jacrev(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev")
def test_seed001_3afd711742fe1929_vmap_jacrev():
    from functorch_lite import jacrev, vmap  # from earlier examples

    x = torch.randn(64, 5)
    jacobian = vmap(jacrev(torch.sin))(x)
    assert jacobian.shape == (64, 5, 5)


@seed_example("jacfwd")
def test_seed001_3afd711742fe1929_jacfwd():
    from functorch_lite import jacfwd

    x = torch.randn(5)
    jacobian = jacfwd(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev", "jacfwd")
def test_seed001_3afd711742fe1929_hessian_from_jacrev_jacfwd():
    from functorch_lite import jacfwd, jacrev  # from earlier examples

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hessian0 = jacrev(jacrev(f))(x)
    hessian1 = jacfwd(jacrev(f))(x)
    # shown by the seed: both are the Hessian of f
    assert torch.allclose(hessian0, torch.diag(-x.sin()))
    assert torch.allclose(hessian1, torch.diag(-x.sin()))


@seed_example("hessian")
def test_seed001_3afd711742fe1929_hessian():
    from functorch_lite import hessian

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hess = hessian(f)(x)
    # shown by the seed: hessian combines jacfwd and jacrev
    assert torch.allclose(hess, torch.diag(-x.sin()))


# ================================================================================================
# 002_7ded5c7210c8a2e8.txt: notebook, Jacobians / Hessians with vmap, vjp, jacrev, jacfwd, hessian.
# Cells In[409]..In[412] set up the state the later cells use.

from functools import partial  # noqa: E402  (In [409])

import torch.nn.functional as F  # noqa: E402  (In [409])


def predict(weight, bias, x):  # In [410]
    return F.linear(x, weight, bias).tanh()


def _cells_409_to_412():
    """In [409], [411], [412]: seed, weight/bias/x, and the row-by-row Jacobian with autograd."""
    _ = torch.manual_seed(0)
    D = 16
    weight = torch.randn(D, D)
    bias = torch.randn(D)
    x = torch.randn(D)  # feature vector

    # 我们必须每次使用不同的单位向量逐行计算它
    def compute_jac(xp):
        jacobian_rows = [torch.autograd.grad(predict(weight, bias, xp), xp, vec)[0] for vec in unit_vectors]
        return torch.stack(jacobian_rows)

    xp = x.clone().requires_grad_()
    unit_vectors = torch.eye(D)

    jacobian = compute_jac(xp)

    print(jacobian.shape)
    print(jacobian[0])  # show first row
    return D, weight, bias, x, compute_jac, xp, unit_vectors, jacobian


def test_seed002_7ded5c7210c8a2e8_in415_vmap_vjp_jacobian():
    D, weight, bias, x, compute_jac, xp, unit_vectors, jacobian = _cells_409_to_412()
    # torch.vmap我们可以使用 PyTorch 的函数变换来摆脱 for 循环并矢量化计算
    from functorch_lite import vjp, vmap

    _, vjp_fn = vjp(partial(predict, weight, bias), x)

    (ft_jacobian,) = vmap(vjp_fn)(unit_vectors)

    # let's confirm both methods compute the same result
    assert torch.allclose(ft_jacobian, jacobian)


@seed_example("jacrev")
def test_seed002_7ded5c7210c8a2e8_in419_jacrev_argnums():
    D, weight, bias, x, compute_jac, xp, unit_vectors, jacobian = _cells_409_to_412()
    # torch.func.jacrev一个便捷函数来执行vmap-vjp组合以计算雅可比矩阵
    from functorch_lite import jacrev

    ft_jacobian = jacrev(predict, argnums=2)(weight, bias, x)

    # Confirm by running the following:
    assert torch.allclose(ft_jacobian, jacobian)

    # note the change in input via ``argnums`` parameters of 0,1 to map to weight and bias
    ft_jac_weight, ft_jac_bias = jacrev(predict, argnums=(0, 1))(weight, bias, x)
    # shown by the seed (the shapes follow from the argnums): Jacobians w.r.t. weight and bias
    assert ft_jac_weight.shape == (D, D, D) and ft_jac_bias.shape == (D, D)


def get_perf(first, first_descriptor, second, second_descriptor):  # In [418]
    """takes torch.benchmark objects and compares delta of second vs first."""
    faster = second.times[0]
    slower = first.times[0]
    gain = (slower - faster) / slower
    if gain < 0:
        gain *= -1  # noqa: E701,E225
    final_gain = gain * 100
    print(f" Performance delta: {final_gain:.4f} percent improvement with {second_descriptor} ")


@seed_example("jacrev")
def test_seed002_7ded5c7210c8a2e8_in418_benchmark_jacrev():
    D, weight, bias, x, compute_jac, xp, unit_vectors, jacobian = _cells_409_to_412()
    # 比较性能
    from torch.utils.benchmark import Timer

    # from In [419]; used only inside the Timer statement below, where the linter cannot see it
    from functorch_lite import jacrev  # noqa: F401

    # adapted: globals=globals() -> this module's globals plus the cell's (our) locals
    without_vmap = Timer(stmt="compute_jac(xp)", globals={**globals(), **locals()})
    with_vmap = Timer(stmt="jacrev(predict, argnums=2)(weight, bias, x)", globals={**globals(), **locals()})

    no_vmap_timer = without_vmap.timeit(500)
    with_vmap_timer = with_vmap.timeit(500)

    print(no_vmap_timer)
    print(with_vmap_timer)
    get_perf(no_vmap_timer, "without vmap", with_vmap_timer, "vmap")


@seed_example("jacrev", "jacfwd")
def test_seed002_7ded5c7210c8a2e8_in423_jacfwd_vs_jacrev_timing():
    _cells_409_to_412()
    from torch.utils.benchmark import Timer  # from In [418]

    # used only inside the Timer statements below, where the linter cannot see them
    from functorch_lite import jacfwd, jacrev  # noqa: F401

    # 反向jac和正向jac

    print("输入少于输出")
    Din = 32
    Dout = 2048
    weight = torch.randn(Dout, Din)

    bias = torch.randn(Dout)
    x = torch.randn(Din)

    # remember the general rule about taller vs wider... here we have a taller matrix:
    print(weight.shape)

    # adapted: globals=globals() -> this module's globals plus the cell's (our) locals
    using_fwd = Timer(stmt="jacfwd(predict, argnums=2)(weight, bias, x)", globals={**globals(), **locals()})
    using_bwd = Timer(stmt="jacrev(predict, argnums=2)(weight, bias, x)", globals={**globals(), **locals()})

    jacfwd_timing = using_fwd.timeit(500)
    jacrev_timing = using_bwd.timeit(500)

    print(f"jacfwd time: {jacfwd_timing}")
    print(f"jacrev time: {jacrev_timing}")
    get_perf(
        jacfwd_timing,
        "jacfwd",
        jacrev_timing,
        "jacrev",
    )

    print("输入多于输出")
    Din = 2048
    Dout = 32
    weight = torch.randn(Dout, Din)
    bias = torch.randn(Dout)
    x = torch.randn(Din)

    using_fwd = Timer(stmt="jacfwd(predict, argnums=2)(weight, bias, x)", globals={**globals(), **locals()})
    using_bwd = Timer(stmt="jacrev(predict, argnums=2)(weight, bias, x)", globals={**globals(), **locals()})

    jacfwd_timing = using_fwd.timeit(500)
    jacrev_timing = using_bwd.timeit(500)

    print(f"jacfwd time: {jacfwd_timing}")
    print(f"jacrev time: {jacrev_timing}")
    get_perf(jacrev_timing, "jacrev", jacfwd_timing, "jacfwd")


@seed_example("hessian", "jacfwd", "jacrev")
def test_seed002_7ded5c7210c8a2e8_in424_hessian():
    _cells_409_to_412()
    # Hessians 是雅可比矩阵的雅可比矩阵（或偏导数的偏导数，又称二阶）。
    from functorch_lite import hessian, jacfwd, jacrev  # from In [423]

    # lets reduce the size in order not to overwhelm Colab. Hessians require
    # significant memory:
    Din = 512
    Dout = 32
    weight = torch.randn(Dout, Din)
    bias = torch.randn(Dout)
    x = torch.randn(Din)

    hess_api = hessian(predict, argnums=2)(weight, bias, x)
    hess_fwdfwd = jacfwd(jacfwd(predict, argnums=2), argnums=2)(weight, bias, x)
    hess_revrev = jacrev(jacrev(predict, argnums=2), argnums=2)(weight, bias, x)
    torch.allclose(hess_api, hess_fwdfwd)
    # shown by the seed: True
    assert torch.allclose(hess_api, hess_fwdfwd)
    assert torch.allclose(hess_api, hess_revrev, atol=1e-5)


def _cell_425():
    """In [425]: batched Jacobians with vmap(jacrev)."""
    from functorch_lite import jacrev, vmap  # from In [415] and In [423]

    # 批量雅可比矩阵和批量黑森矩阵
    # 如果您有多个输入参数，比如 func(x, y, z)，in_dims 的长度应该与输入参数的数量相同。
    # 对于每个输入参数，您可以指定：
    # None：表示该输入参数不包含批量维度，函数将其视为单个样本。
    # 一个整数：表示该输入参数的哪个维度是批量维度。例如，0 表示第一个维度是批量维度。
    # 一个负数：表示从后向前数的维度。例如，-1 表示最后一个维度是批量维度
    batch_size = 64
    Din = 31
    Dout = 33

    weight = torch.randn(Dout, Din)
    print(f"weight shape = {weight.shape}")

    bias = torch.randn(Dout)

    x = torch.randn(batch_size, Din)

    compute_batch_jacobian = vmap(jacrev(predict, argnums=2), in_dims=(None, None, 0))
    batch_jacobian0 = compute_batch_jacobian(weight, bias, x)
    print(batch_jacobian0.shape)
    # shown by the seed: torch.Size([64, 33, 31])
    assert batch_jacobian0.shape == (64, 33, 31)
    return weight, bias, x, batch_jacobian0


@seed_example("jacrev")
def test_seed002_7ded5c7210c8a2e8_in425_batched_jacobian():
    _cells_409_to_412()
    _cell_425()


@seed_example("jacrev")
def test_seed002_7ded5c7210c8a2e8_in426_jacobian_of_summed_output():
    _cells_409_to_412()
    weight, bias, x, batch_jacobian0 = _cell_425()
    from functorch_lite import jacrev  # from In [423]

    # 如果你有一个从 (B, N) -> (B, M) 的函数，并且确定每个输入都会产生一个独立的输出，那么有时也可以vmap通过对输出求和然后计算该函数的雅可比矩阵来做到这一点：
    # 因为别的bs的输出对于当前bs的输入的导数是0
    def predict_with_output_summed(weight, bias, x):
        return predict(weight, bias, x).sum(0)

    batch_jacobian1 = jacrev(predict_with_output_summed, argnums=2)(weight, bias, x).movedim(1, 0)
    assert torch.allclose(batch_jacobian0, batch_jacobian1)
    print(batch_jacobian1.shape)
    # shown by the seed: torch.Size([64, 33, 31])
    assert batch_jacobian1.shape == (64, 33, 31)


@seed_example("hessian")
def test_seed002_7ded5c7210c8a2e8_in427_batched_hessian():
    _cells_409_to_412()
    weight, bias, x, batch_jacobian0 = _cell_425()
    from functorch_lite import hessian, vmap  # from In [424] and In [415]

    compute_batch_hessian = vmap(hessian(predict, argnums=2), in_dims=(None, None, 0))

    batch_hess = compute_batch_hessian(weight, bias, x)
    batch_hess.shape
    # shown by the seed: torch.Size([64, 33, 31, 31])
    assert batch_hess.shape == (64, 33, 31, 31)


@seed_example("jvp")
def test_seed002_7ded5c7210c8a2e8_in428_hvp():
    _cells_409_to_412()
    # 将反向模式 AD 与正向模式 AD 组合（而不是将反向模式与反向模式组合）通常是计算 hvp 的更节省内存的方法，因为正向模式 AD 不需要构建 Autograd 图并保存后向的中间体
    from functorch_lite import grad, jvp, vjp

    def hvp(f, primals, tangents):
        return jvp(grad(f), primals, tangents)[1]

    def f(x):
        return x.sin().sum()

    x = torch.randn(2048)
    tangent = torch.randn(2048)

    result = hvp(f, (x,), (tangent,))

    # 如果 PyTorch 前向 AD 无法覆盖你的操作，那么我们可以用反向模式 AD 来组合反向模式 AD：
    def hvp_revrev(f, primals, tangents):
        _, vjp_fn = vjp(grad(f), *primals)
        return vjp_fn(*tangents)

    result_hvp_revrev = hvp_revrev(f, (x,), (tangent,))
    assert torch.allclose(result, result_hvp_revrev[0])


def test_seed002_7ded5c7210c8a2e8_in428_hvp_revrev_only():
    """The grad/vjp half of In [428], checked against torch.func's jvp(grad(f)) for `result`."""
    _cells_409_to_412()
    from functorch_lite import grad, vjp

    def f(x):
        return x.sin().sum()

    x = torch.randn(2048)
    tangent = torch.randn(2048)

    # adapted: the forward-mode half computed with torch.func
    result = torch.func.jvp(torch.func.grad(f), (x,), (tangent,))[1]

    # 如果 PyTorch 前向 AD 无法覆盖你的操作，那么我们可以用反向模式 AD 来组合反向模式 AD：
    def hvp_revrev(f, primals, tangents):
        _, vjp_fn = vjp(grad(f), *primals)
        return vjp_fn(*tangents)

    result_hvp_revrev = hvp_revrev(f, (x,), (tangent,))
    assert torch.allclose(result, result_hvp_revrev[0])


# ================================================================================================
# 003_2657b6e878e2f743.txt: torch.func.jacrev reference page (Chinese translation)


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_basic_pointwise():
    from functorch_lite import jacrev

    x = torch.randn(5)
    jacobian = jacrev(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_has_aux():
    from functorch_lite import jacrev

    x = torch.randn(5)

    def f(x):
        return x.sin()

    def g(x):
        result = f(x)
        return result, result

    jacobian_f, f_x = jacrev(g, has_aux=True)(x)
    assert torch.allclose(f_x, f(x))


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_vmap_batched_jacobian():
    from functorch_lite import jacrev, vmap

    x = torch.randn(64, 5)
    jacobian = vmap(jacrev(torch.sin))(x)
    assert jacobian.shape == (64, 5, 5)


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_hessian_jacrev_jacrev():
    from functorch_lite import jacrev

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hessian = jacrev(jacrev(f))(x)
    assert torch.allclose(hessian, torch.diag(-x.sin()))


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_argnums_1():
    from functorch_lite import jacrev

    def f(x, y):
        return x + y**2

    x, y = torch.randn(5), torch.randn(5)
    jacobian = jacrev(f, argnums=1)(x, y)
    expected = torch.diag(2 * y)
    assert torch.allclose(jacobian, expected)


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_argnums_tuple():
    from functorch_lite import jacrev

    def f(x, y):
        return x + y**2

    x, y = torch.randn(5), torch.randn(5)
    jacobian = jacrev(f, argnums=(0, 1))(x, y)
    expectedX = torch.diag(torch.ones_like(x))
    expectedY = torch.diag(2 * y)
    assert torch.allclose(jacobian[0], expectedX)
    assert torch.allclose(jacobian[1], expectedY)


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_no_grad_inside_f():
    from functorch_lite import jacrev

    x = torch.randn(5)  # from an earlier example

    def f(x):
        with torch.no_grad():
            c = x**2
        return x - c

    # 在这种情况下，jacrev(f)(x) 将尊重内部 torch.no_grad。
    jac = jacrev(f)(x)
    # shown by the seed: the inner no_grad is respected, c is a constant
    assert torch.allclose(jac, torch.eye(5))


@seed_example("jacrev")
def test_seed003_2657b6e878e2f743_jacrev_inside_no_grad():
    from functorch_lite import jacrev

    x = torch.randn(5)  # from an earlier example

    def f(x):  # from the previous example
        with torch.no_grad():
            c = x**2
        return x - c

    with torch.no_grad():
        jac = jacrev(f)(x)
    # shown by the seed: jacrev respects the inner no_grad but not the outer one
    assert torch.allclose(jac, torch.eye(5))
