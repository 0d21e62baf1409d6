"""The fused CPU lookup-reduce against the reference gather-then-sum: forward, both gradients, edge shapes."""

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.ops.lookup_inputs import check_main_grad_accumulation, forward_backward, make_inputs, upstream_gradient
from umtrain.ops.fused_lookup_reduce import SOURCE, fused_lookup_reduce
from umtrain.ops.lookup_reduce import get_lookup_reduce, lookup_reduce_reference

# (tokens T, top-m K, d_v, blocks E, rows N, cores h); N < K forces rows repeated within and across tokens.
SHAPES = [
    (6, 8, 8, 4, 5, 2),
    (5, 3, 6, 1, 40, 1),
    (7, 5, 12, 4, 9, 3),
    (4, 6, 8, 2, 100, 2),
    (3, 10, 4, 4, 2, 1),
    (8, 4, 8, 1, 3, 2),
    (300, 5, 4, 3, 7, 2),   # more entries than one parallel chunk of the C++ loops
]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_forward_and_gradients(shape):
    inputs = make_inputs(*shape)
    num_blocks = shape[3]
    expected = forward_backward(lookup_reduce_reference, *inputs, num_blocks)
    actual = forward_backward(fused_lookup_reduce, *inputs, num_blocks)
    for name, want, got in zip(("pooled", "grad scores", "grad table"), expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_hand_computed_example():
    rows = torch.tensor([[1, 0, 1]])
    blocks = torch.tensor([[0, 1, 0]])
    scores = torch.tensor([[[2.0, 3.0, 5.0]], [[1.0, -1.0, 0.5]]])     # h=2
    table = torch.tensor([[1.0, 10.0], [2.0, 20.0]])                     # d_v=2: core i owns column i
    pooled = fused_lookup_reduce(rows, blocks, scores, table, 2)
    # block 0 gets k=0 and k=2 (row 1): column 0 weighted 2+5, column 1 weighted 1+0.5.
    expected = torch.tensor([[[7 * 2.0, 1.5 * 20.0], [3 * 1.0, -1 * 10.0]]])
    torch.testing.assert_close(pooled, expected)


def test_zero_tokens():
    rows = blocks = torch.zeros(0, 4, dtype=torch.int64)
    scores = torch.zeros(2, 0, 4, requires_grad=True)
    table = torch.randn(5, 8, requires_grad=True)
    pooled = fused_lookup_reduce(rows, blocks, scores, table, 3)
    assert pooled.shape == (0, 3, 8)
    pooled.sum().backward()
    assert scores.grad.shape == (2, 0, 4)
    assert torch.equal(table.grad, torch.zeros(5, 8))


def test_only_requested_gradients():
    rows, blocks, scores, table = make_inputs(5, 4, 8, 2, 6, 2)
    scores.requires_grad_()
    fused_lookup_reduce(rows, blocks, scores, table, 2).sum().backward()
    reference_scores = scores.detach().clone().requires_grad_()
    lookup_reduce_reference(rows, blocks, reference_scores, table, 2).sum().backward()
    assert table.grad is None
    torch.testing.assert_close(scores.grad, reference_scores.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_gradient_is_added_into_megatrons_main_grad(dtype):
    check_main_grad_accumulation(fused_lookup_reduce, dtype, "cpu")


def test_a_table_with_a_gradient_hook_keeps_the_usual_path():
    """The hook (`parallel.memory_tables`' 1/TP) must see the real gradient: no adding into main_grad then."""
    inputs = make_inputs(3, 5, 8, 4, 3, 2)
    _, _, want_table = forward_backward(lookup_reduce_reference, *inputs, 4)
    rows, blocks, scores, table = inputs
    param = torch.nn.Parameter(table.clone())
    param.main_grad, param.grad_added_to_main_grad = torch.zeros_like(param), False
    param.register_hook(lambda grad: grad / 2)
    fused_lookup_reduce(rows, blocks, scores, param, 4).backward(upstream_gradient(torch.empty(3, 4, 8)))
    assert not param.grad_added_to_main_grad and torch.equal(param.main_grad, torch.zeros_like(param))
    torch.testing.assert_close(param.grad, want_table / 2)


def test_gradcheck_float64():
    rows, blocks, scores, table = make_inputs(3, 5, 4, 2, 3, 2, dtype=torch.float64)
    scores.requires_grad_()
    table.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, v: fused_lookup_reduce(rows, blocks, s, v, 2), (scores, table))


def test_bf16_table_within_one_ulp_of_exact():
    rows, blocks, scores, table = make_inputs(4, 64, 8, 2, 3, 2)          # ~32 terms per sum
    scores, table = scores.abs().bfloat16(), table.abs().bfloat16()     # positive terms: no cancellation
    exact = forward_backward(lookup_reduce_reference, rows, blocks, scores.double(), table.double(), 2)
    actual = forward_backward(fused_lookup_reduce, rows, blocks, scores, table, 2)
    for name, want, got in zip(("pooled", "grad scores", "grad table"), exact, actual):
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=0, msg=lambda m: f"{name}: {m}")


def test_non_contiguous_inputs():
    rows, blocks, scores, table = make_inputs(5, 4, 8, 2, 6, 2)
    strided = (rows.t().contiguous().t(), blocks.t().contiguous().t(), scores.permute(2, 0, 1).contiguous()
               .permute(1, 2, 0), table.t().contiguous().t())
    assert not any(x.is_contiguous() for x in strided)
    expected = forward_backward(lookup_reduce_reference, rows, blocks, scores, table, 2)
    actual = forward_backward(fused_lookup_reduce, *strided, 2)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, change, num_blocks", [
    ("blocks", lambda r, b, s, v: (r, b + 4, s, v), 4),
    ("rows", lambda r, b, s, v: (r - 1, b, s, v), 4),
    ("rows and blocks must be int64", lambda r, b, s, v: (r.int(), b, s, v), 4),
    ("scores must be", lambda r, b, s, v: (r, b, s[:, :-1], v), 4),
    ("d_v", lambda r, b, s, v: (r, b, s, v[:, :7]), 4),
    ("num_blocks", lambda r, b, s, v: (r, b, s, v), 0),
])
def test_bad_input_names_the_field(field, change, num_blocks):
    inputs = change(*make_inputs(4, 3, 8, 4, 5, 2))
    with pytest.raises(ValueError, match=field):
        fused_lookup_reduce(*inputs, num_blocks)


def test_registered_without_importing_triton():
    code = ("import sys; from umtrain.ops import get_lookup_reduce, LOOKUP_REDUCE_IMPLS; "
            "from umtrain.ops.fused_lookup_reduce import fused_lookup_reduce; "
            "assert get_lookup_reduce('fused') is fused_lookup_reduce; "
            "assert 'triton' not in sys.modules, 'fused path imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert get_lookup_reduce("fused") is fused_lookup_reduce


def test_auto_dispatches_on_the_table_device(monkeypatch):
    """A model built with `auto` on a CUDA machine still runs a CPU table (a portable checkpoint decoded on CPU):
    the choice is per call, on the table's device, and a CPU table never imports the Triton kernel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "umtrain.ops.triton_lookup_reduce", raising=False)
    lookup = get_lookup_reduce("auto")
    rows, blocks, scores, table = make_inputs(5, 4, 8, 2, 6, 2)
    torch.testing.assert_close(lookup(rows, blocks, scores, table, 2),
                               lookup_reduce_reference(rows, blocks, scores, table, 2), rtol=1e-5, atol=1e-5)
    assert "umtrain.ops.triton_lookup_reduce" not in sys.modules


def test_every_file_the_package_reads_besides_python_ships_as_package_data():
    """An installed (non-editable) umtrain compiles the fused kernel from its packaged C++ source: every non-Python
    file under umtrain/ must match a `[tool.setuptools.package-data]` pattern, or a wheel leaves it out."""
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["umtrain"]
    package = root / "umtrain"
    data_files = [path.relative_to(package).as_posix() for path in package.rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc")]
    assert SOURCE.relative_to(package).as_posix() in data_files
    assert [name for name in data_files if not any(fnmatch.fnmatch(name, p) for p in patterns)] == []
