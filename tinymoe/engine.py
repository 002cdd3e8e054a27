"""A reverse-mode autodiff engine on NumPy (and, unchanged, on CuPy).

The design follows micrograd: every op builds its output and, right under it, the closure `_backward` that
sends the output's gradient to its inputs. `Tensor.backward()` sorts the graph topologically and runs those
closures in reverse. Broadcasting is undone in one place (`unbroadcast`: the adjoint of broadcast is a sum).

The array module `xp` is taken from the data (`array_module`), never hard-wired, so the same graph runs on
CuPy arrays on the GPU (`Tensor.to("cuda")`, `Module.to("cuda")`). An op never moves data between devices by
itself: operands on two devices are an error that names both and the fix.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

from . import activations as A
from .arrays import array_module, device_of, module_for, move, to_host

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block, ops record no graph (evaluation, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def _as_array(data, dtype=None, copy=True):
    """Wrap `data` as an array: float32 by default, float64 kept, integer/bool kept (indices, masks).

    A float32 array given by the user is copied (a Tensor owns its data: the optimizer updates it in place);
    an op's fresh result is wrapped as it is (copy=False), which saves a full copy of every op output."""
    if isinstance(data, Tensor):
        data = data.data
    xp = array_module(data)
    if dtype is not None:
        return xp.asarray(data, dtype=dtype)
    arr = xp.asarray(data)
    python_value = not hasattr(data, "dtype")  # a Python float or list defaults to float32 too
    if arr.dtype.kind == "f" and (arr.dtype != np.float64 or python_value):
        arr = arr.astype(np.float32, copy=copy)  # float16/float32 -> float32; float64 is kept for gradient checks
    elif arr.dtype.kind not in "fbiu":
        raise TypeError(f"Tensor: unsupported dtype {arr.dtype}; give a float, integer or bool array")
    return arr


def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: the adjoint of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def check_device(op, a, b):
    """Both operands on one device (Tensors or arrays; Python data and scalars go anywhere), else an error that
    names both devices and the fix."""
    da = a.data if isinstance(a, Tensor) else a
    db = b.data if isinstance(b, Tensor) else b
    if type(da) is type(db) or not (hasattr(da, "ndim") and hasattr(db, "ndim")) \
            or isinstance(da, np.generic) or isinstance(db, np.generic):
        return
    if array_module(da) is not array_module(db):
        first, second = device_of(da), device_of(db)
        to = second if first == "cpu" else first  # the device to move to, when one of them is the host
        raise RuntimeError(f"{op}: the operands are on different devices, {first} and {second}; put them on one "
                           f"device first: tensor.to({to!r}), model.to({to!r}), or xp.asarray(array) for a raw array")


def _check_broadcast(op, a, b):
    check_device(op, a, b)
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"{op}: shapes {a.shape} and {b.shape} do not broadcast; make trailing dimensions equal or 1"
        ) from None


class Tensor:
    """An n-d array that remembers how it was made, so that `backward()` can send gradients to its inputs."""

    __array_priority__ = 100  # so that `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False, dtype=None, _parents=(), _op="", _fresh=False):
        self.data = _as_array(data, dtype, copy=not _fresh)  # _fresh: an op's own result, wrapped without a copy
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"Tensor: only float tensors can require grad, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._parents = _parents
        self._backward = None
        self._op = _op
        self._graph_freed = False

    # ---- small conveniences -------------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    T = property(lambda self: self.transpose())
    xp = property(lambda self: array_module(self.data))
    device = property(lambda self: device_of(self.data), doc='"cpu", "cuda", or the device of another array module')

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def item(self):
        return self.data.item()

    def numpy(self):
        """The data as a host NumPy array (the array itself on the CPU, one explicit copy from a device)."""
        return to_host(self.data)

    def to(self, device):
        """This tensor on `device` ("cpu", "cuda", or an array module such as numpy); itself when it is there.
        Differentiable: the gradient is sent back to this tensor's device."""
        xp = module_for(device, "Tensor.to")
        if xp is None:
            raise ValueError(f"Tensor.to({device!r}): expected a device ('cpu', 'cuda') or an array module")
        if array_module(self.data) is xp:
            return self
        home = self.xp
        out = self._make(move(self.data, xp), (self,), "to")
        out._backward = lambda g: self._accumulate(move(g, home))
        return out

    def detach(self):
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    def astype(self, dtype):
        """A cast; the gradient is cast back. Returns self when the dtype already matches."""
        if self.dtype == dtype:
            return self
        out = self._make(self.data.astype(dtype), (self,), "astype")
        out._backward = lambda g: self._accumulate(g.astype(self.dtype))
        return out

    # ---- graph construction -------------------------------------------------------------------------------
    def _make(self, data, parents, op):
        """The output of an op. It joins the graph only when grad is on and some input needs a gradient."""
        parents = tuple(p for p in parents if p.requires_grad)
        if _grad_enabled and parents:
            out = Tensor(data, _parents=parents, _op=op, _fresh=True)
            out.requires_grad = True
            return out
        return Tensor(data, _fresh=True)

    def _accumulate(self, grad):
        if grad.dtype != self.dtype:  # e.g. a float64 constant met a float32 tensor
            grad = grad.astype(self.dtype)
        if grad.shape != self.shape:
            raise RuntimeError(f"backward of {self._op or 'leaf'}: gradient shape {grad.shape} != {self.shape}")
        self.grad = grad if self.grad is None else self.grad + grad

    def backward(self, grad=None):
        """Reverse-mode: d(self)/d(every tensor that requires grad), accumulated into `.grad`."""
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad (no input had requires_grad=True)")
        if self._graph_freed:
            raise RuntimeError("backward: this graph was freed by an earlier backward(); run the forward pass again "
                               "(gradients would otherwise silently stop at this tensor)")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward: output has shape {self.shape}; pass grad= of that shape or reduce it to a scalar"
                )
            grad = self.xp.ones_like(self.data)
        grad = _as_array(grad, self.dtype).copy()  # ours: it may become a leaf's .grad, which clipping scales in place
        if grad.shape != self.shape:
            raise ValueError(f"backward: grad shape {grad.shape} does not match tensor shape {self.shape}")

        # 1. topological order, iteratively (deep graphs would overflow Python's recursion limit)
        order, seen, stack = [], set(), [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if id(p) not in seen)
        # 2. seed and run each op's backward closure from the output down
        self._accumulate(grad)
        while order:  # output first; popping drops the list's hold, so a passed node's arrays can be freed now
            node = order.pop()
            if node._backward is not None and node.grad is not None:
                node._backward(node.grad)
                if node._parents:  # free intermediate gradients and the graph; leaves keep theirs
                    node.grad = None
                    node._backward = None
                    node._parents = ()
                    node._graph_freed = True

    # ---- elementwise arithmetic ---------------------------------------------------------------------------
    def _lift(self, other):
        """A constant as a Tensor of our dtype (a Python float meeting an integer tensor becomes float32)."""
        if isinstance(other, Tensor):
            return other
        dtype = self.dtype
        if dtype.kind != "f" and isinstance(other, float):
            dtype = self.xp.float32
        check_device("a constant", self, other)  # (a Python number goes anywhere)
        return Tensor(self.xp.asarray(other, dtype=dtype))

    def __add__(self, other):
        other = self._lift(other)
        _check_broadcast("add", self, other)
        out = self._make(self.data + other.data, (self, other), "add")

        def _backward(g):
            if self.requires_grad:
                self._accumulate(unbroadcast(g, self.shape))
            if other.requires_grad:
                other._accumulate(unbroadcast(g, other.shape))

        out._backward = _backward
        return out

    def __mul__(self, other):
        other = self._lift(other)
        _check_broadcast("mul", self, other)
        out = self._make(self.data * other.data, (self, other), "mul")

        def _backward(g):
            if self.requires_grad:
                self._accumulate(unbroadcast(g * other.data, self.shape))
            if other.requires_grad:
                other._accumulate(unbroadcast(g * self.data, other.shape))

        out._backward = _backward
        return out

    def __truediv__(self, other):
        other = self._lift(other)
        _check_broadcast("div", self, other)
        out = self._make(self.data / other.data, (self, other), "div")

        def _backward(g):
            if self.requires_grad:
                self._accumulate(unbroadcast(g / other.data, self.shape))
            if other.requires_grad:
                other._accumulate(unbroadcast(-g * self.data / (other.data * other.data), other.shape))

        out._backward = _backward
        return out

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):  # a ** b = exp(b log a), for positive a
            return (self.log() * exponent).exp()
        if not isinstance(exponent, numbers.Real):
            raise TypeError(f"pow: exponent must be a number or a Tensor, got {type(exponent).__name__}")
        out = self._make(self.data**exponent, (self,), "pow")
        if exponent == 0:  # d/dx x**0 = 0 everywhere, also at x = 0 (where 0 · x**-1 would be NaN)
            out._backward = lambda g: self._accumulate(self.xp.zeros_like(self.data))
        else:
            out._backward = lambda g: self._accumulate(g * exponent * self.data ** (exponent - 1))
        return out

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-self._lift(other))

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return self._lift(other) - self

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __rpow__(self, base):
        return self._lift(base) ** self

    # ---- comparisons: not differentiable, they return bool tensors ----------------------------------------
    def _compare(self, other, fn):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(fn(self.data, other))

    __lt__ = lambda self, o: self._compare(o, lambda a, b: a < b)  # noqa: E731
    __le__ = lambda self, o: self._compare(o, lambda a, b: a <= b)  # noqa: E731
    __gt__ = lambda self, o: self._compare(o, lambda a, b: a > b)  # noqa: E731
    __ge__ = lambda self, o: self._compare(o, lambda a, b: a >= b)  # noqa: E731
    eq = lambda self, o: self._compare(o, lambda a, b: a == b)  # noqa: E731
    ne = lambda self, o: self._compare(o, lambda a, b: a != b)  # noqa: E731
    __hash__ = object.__hash__  # tensors are graph nodes: hashed by identity, == is not overloaded

    # ---- unary functions ----------------------------------------------------------------------------------
    def exp(self):
        out = self._make(self.xp.exp(self.data), (self,), "exp")
        out._backward = lambda g: self._accumulate(g * out.data)
        return out

    def log(self):
        out = self._make(self.xp.log(self.data), (self,), "log")
        out._backward = lambda g: self._accumulate(g / self.data)
        return out

    def tanh(self):
        out = self._make(self.xp.tanh(self.data), (self,), "tanh")
        out._backward = lambda g: self._accumulate(g * (1 - out.data * out.data))
        return out

    def sigmoid(self):
        out = self._make(A.sigmoid(self.data), (self,), "sigmoid")  # stable in both tails
        out._backward = lambda g: self._accumulate(g * out.data * (1 - out.data))
        return out

    def sqrt(self):
        out = self._make(self.xp.sqrt(self.data), (self,), "sqrt")
        out._backward = lambda g: self._accumulate(g * 0.5 / out.data)
        return out

    def abs(self):
        out = self._make(self.xp.abs(self.data), (self,), "abs")
        out._backward = lambda g: self._accumulate(g * self.xp.sign(self.data))
        return out

    def relu(self):
        out = self._make(A.relu(self.data), (self,), "relu")
        out._backward = lambda g: self._accumulate(g * A.relu_grad(self.data))
        return out

    def clip(self, low=None, high=None):
        """Clamp to [low, high]; the gradient passes where the value was not clipped."""
        out = self._make(self.xp.clip(self.data, low, high), (self,), "clip")
        out._backward = lambda g: self._accumulate(g * (out.data == self.data))
        return out

    # ---- reductions ---------------------------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        out = self._make(self.data.sum(axis=axis, keepdims=keepdims), (self,), "sum")

        def _backward(g):
            if not keepdims and axis is not None:
                g = self.xp.expand_dims(g, _normalize_axes(axis, self.ndim))
            self._accumulate(self.xp.broadcast_to(g, self.shape).astype(self.dtype))

        out._backward = _backward
        return out

    def mean(self, axis=None, keepdims=False):
        count = self.size if axis is None else int(np.prod([self.shape[a] for a in _normalize_axes(axis, self.ndim)]))
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / max(count, 1))

    def var(self, axis=None, keepdims=False):
        """Biased variance (divides by n), as layer norm uses it."""
        centred = self - self.mean(axis=axis, keepdims=True)
        return (centred * centred).mean(axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        """Maximum; ties share the gradient equally (so the result is symmetric in its inputs)."""
        data = self.data.max(axis=axis, keepdims=True)
        out = self._make(data if keepdims else _squeeze(data, axis), (self,), "max")

        def _backward(g):
            g = g if keepdims else g.reshape(data.shape)
            winners = self.data == data
            self._accumulate(winners * (g / winners.sum(axis=axis, keepdims=True)))

        out._backward = _backward
        return out

    # ---- shape ops ----------------------------------------------------------------------------------------
    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        try:
            data = self.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {self.shape} ({self.size} elements) into {shape}") from None
        out = self._make(data, (self,), "reshape")
        out._backward = lambda g: self._accumulate(g.reshape(self.shape))
        return out

    def transpose(self, *axes):
        """Permute axes (all reversed when none are given); `permute` is the same op."""
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        axes = tuple(axes) if axes else tuple(reversed(range(self.ndim)))
        if sorted(a % self.ndim for a in axes) != list(range(self.ndim)):
            raise ValueError(f"transpose: {axes} is not a permutation of the {self.ndim} axes of {self.shape}")
        out = self._make(self.data.transpose(axes), (self,), "transpose")
        inverse = tuple(int(i) for i in np.argsort([a % self.ndim for a in axes]))  # host metadata
        out._backward = lambda g: self._accumulate(g.transpose(inverse))
        return out

    permute = transpose

    def swapaxes(self, a, b):
        axes = list(range(self.ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return self.transpose(axes)

    def __getitem__(self, index):
        """Basic and integer-array indexing; the adjoint scatter-adds, so repeated indices sum their gradients."""
        index = _check_index(index, self.data)
        out = self._make(self.data[index], (self,), "getitem")

        def _backward(g):
            full = self.xp.zeros_like(self.data)
            _scatter_add(full, index, g)
            self._accumulate(full)

        out._backward = _backward
        return out

    # ---- matmul ---------------------------------------------------------------------------------------------
    def __matmul__(self, other):
        other = self._lift(other)
        check_device("matmul", self, other)
        if self.ndim == 0 or other.ndim == 0:
            raise ValueError("matmul: scalars are not allowed; use * instead")
        a = self if self.ndim > 1 else self.reshape(1, -1)  # 1-D operands as in np.matmul
        b = other if other.ndim > 1 else other.reshape(-1, 1)
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {self.shape} and {other.shape} do not align ({a.shape[-1]} != {b.shape[-2]})")
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of {self.shape} and {other.shape} do not broadcast") from None
        if b.ndim == 2 and a.ndim > 2:
            out = _rows_matmul(a, b)
        else:
            out = a._make(a.data @ b.data, (a, b), "matmul")
            out._backward = _matmul_backward(a, b)
        if self.ndim == 1:
            out = out.reshape(out.shape[:-2] + out.shape[-1:])
        if other.ndim == 1:
            out = out.reshape(out.shape[:-1])
        return out

    def __rmatmul__(self, other):
        return self._lift(other) @ self


def _matmul_backward(a, b):
    """The adjoint of a @ b (any batch shapes): da = g·bᵀ, db = aᵀ·g, each summed over broadcast batch axes."""

    def _backward(g):
        if a.requires_grad:
            a._accumulate(unbroadcast(g @ b.data.swapaxes(-1, -2), a.shape))
        if b.requires_grad:
            b._accumulate(unbroadcast(a.data.swapaxes(-1, -2) @ g, b.shape))

    return _backward


_gemm_hook = None  # a backend's 2-D product while it is the current backend (numba: row blocks on its threads)


@contextlib.contextmanager
def gemm_hook(gemm):
    """Inside this block the engine's 2-D products (the (N, k)·(k, n) GEMMs of `_rows_matmul`, forward and both
    adjoints) go to gemm(a, b) first; None from it means "not mine" and NumPy's `a @ b` runs. The operands are
    2-D arrays, `a` possibly a transposed view (aᵀ·g of a weight gradient). A backend enters this while it is the
    current one (tinymoe.backends.set_backend); the engine itself stays NumPy."""
    global _gemm_hook
    previous, _gemm_hook = _gemm_hook, gemm
    try:
        yield
    finally:
        _gemm_hook = previous


def _gemm(a, b):
    """a @ b for 2-D arrays, on the current backend's product when it takes them (see gemm_hook)."""
    out = None if _gemm_hook is None else _gemm_hook(a, b)
    return a @ b if out is None else out


def _rows_matmul(a, b, bias=None):
    """(..., k) @ (k, n) as one GEMM on the flattened rows (..., k) -> (N, k), and so its adjoint: db = a2ᵀ·g2 is
    one (k, N)·(N, n) product, where the batched form made one small product per leading index and then summed
    a (batch, k, n) temporary over the batch. A `bias` (n,) of the product's dtype is added in place (`linear`)."""
    rows, n = int(np.prod(a.shape[:-1])), b.shape[-1]
    a2 = a.data.reshape(rows, a.shape[-1])  # (N, k); a copy only when a is not contiguous (e.g. permuted)
    data = _gemm(a2, b.data)  # (N, n)
    if bias is not None:
        data += bias.data
    parents = (a, b) if bias is None else (a, b, bias)
    out = a._make(data.reshape(a.shape[:-1] + (n,)), parents, "matmul" if bias is None else "linear")

    def _backward(g):
        g2 = g.reshape(rows, n)  # (N, n)
        if a.requires_grad:
            a._accumulate(_gemm(g2, b.data.T).reshape(a.shape))
        if b.requires_grad:
            b._accumulate(_gemm(a2.T, g2))
        if bias is not None and bias.requires_grad:
            bias._accumulate(g2.sum(axis=0))

    out._backward = _backward
    return out


# ---- functions over several tensors ---------------------------------------------------------------------------
def tensor(data, requires_grad=False, dtype=None):
    return data if isinstance(data, Tensor) and dtype is None else Tensor(data, requires_grad, dtype)


def linear(x, weight, bias=None):
    """x @ weight + bias, weight (in, out), bias (out,) or None. One node for (..., in) inputs: the bias is added
    into the product in place, so the product before the bias is not kept alive for backward (the composed
    `x @ weight + bias` keeps both full-size arrays)."""
    x, weight = tensor(x), tensor(weight)
    bias = None if bias is None else tensor(bias)
    check_device("linear", x, weight)
    if bias is not None:
        check_device("linear (bias)", x, bias)
    fused = (x.ndim >= 2 and weight.ndim == 2 and x.shape[-1] == weight.shape[0] and bias is not None
             and bias.shape == (weight.shape[1],) and np.result_type(x.dtype, weight.dtype) == bias.dtype)
    if not fused:
        y = x @ weight
        return y if bias is None else y + bias
    return _rows_matmul(x, weight, bias)


def concatenate(tensors, axis=0):
    """Join along an existing axis; the adjoint slices the gradient back into pieces."""
    tensors = [tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    xp = tensors[0].xp
    for t in tensors[1:]:
        check_device("concatenate", tensors[0], t)
    try:
        data = xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as e:
        raise ValueError(f"concatenate: shapes {[t.shape for t in tensors]} along axis {axis}: {e}") from None
    out = tensors[0]._make(data, tensors, "concatenate")
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1].tolist()  # host metadata

    def _backward(g):
        for t, piece in zip(tensors, xp.split(g, bounds, axis=axis)):
            if t.requires_grad:
                t._accumulate(piece)

    out._backward = _backward
    return out


def stack(tensors, axis=0):
    """Join along a new axis (expand each, then concatenate)."""
    tensors = [tensor(t) for t in tensors]
    if len({t.shape for t in tensors}) > 1:
        raise ValueError(f"stack: all shapes must be equal, got {[t.shape for t in tensors]}")
    ax = axis % (tensors[0].ndim + 1)
    return concatenate([t.reshape(t.shape[:ax] + (1,) + t.shape[ax:]) for t in tensors], axis=ax)


def where(condition, a, b):
    """Pick `a` where condition holds, else `b`; each gets the gradient of the places it was picked."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    if isinstance(a, Tensor):
        b = a._lift(b)  # a Python scalar takes the tensor's dtype instead of upcasting it
    else:
        b = tensor(b)
        a = b._lift(a)
    check_device("where", a, b)
    check_device("where (condition)", a, cond)
    out = a._make(a.xp.where(cond, a.data, b.data), (a, b), "where")

    def _backward(g):
        zero = a.xp.zeros_like(g)
        if a.requires_grad:
            a._accumulate(unbroadcast(a.xp.where(cond, g, zero), a.shape))
        if b.requires_grad:
            b._accumulate(unbroadcast(a.xp.where(cond, zero, g), b.shape))

    out._backward = _backward
    return out


def maximum(a, b):
    a, b = tensor(a), tensor(b)
    return where(a.data >= b.data, a, b)


# ---- helpers ------------------------------------------------------------------------------------------------
def _normalize_axes(axis, ndim):
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _squeeze(data, axis):
    return data.reshape(()) if axis is None else data.squeeze(axis=axis)


def _check_index(index, data):
    """Unwrap Tensor indices, put lists on data's device, and reject float index arrays or index arrays on another
    device than `data` with a clear message."""
    items = index if isinstance(index, tuple) else (index,)
    clean = []
    for item in items:
        if isinstance(item, Tensor):
            item = item.data
        if isinstance(item, list):
            item = array_module(data).asarray(item)
        if getattr(item, "ndim", 0):
            check_device("getitem (index)", data, item)
        if hasattr(item, "dtype") and item.dtype.kind not in "iub":
            raise TypeError(f"getitem: index arrays must be integer or bool, got dtype {item.dtype}")
        clean.append(item)
    return tuple(clean) if isinstance(index, tuple) else clean[0]


def _is_basic(index):
    """True for basic indexing (ints, slices, Ellipsis, None): it selects every element at most once."""
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, (slice, numbers.Integral)) for item in items)


def _scatter_add(target, index, values):
    """target[index] += values, summing repeated indices, on target's device.

    Basic indices (e.g. qkv[0], x[:, 1:]) cannot repeat an element, so there a plain add into the view does it
    (~15x faster than np.add.at). Integer arrays into the leading axes (embeddings, t[rows, idx] in the gates)
    become row ids of a flattened view, summed by sorting; np.add.at is left for mixed and boolean indices."""
    xp = array_module(target)
    if _is_basic(index):
        target[index] += values
    elif _integer_array(index):
        _scatter_add_rows(target, index, values)
    elif _integer_arrays(index) and len(index) <= target.ndim and target.flags.c_contiguous:
        arrays = index
        lead = target.shape[: len(arrays)]
        arrays = [xp.where(a < 0, a + n, a) for a, n in zip(xp.broadcast_arrays(*arrays), lead)]
        _scatter_add_rows(target.reshape(-1, *target.shape[len(lead):]), xp.ravel_multi_index(arrays, lead), values)
    else:
        xp.add.at(target, index, values)  # (cupy.add.at on the GPU)


def _integer_array(a):
    """True when `a` is an integer array (of any array module), not a scalar."""
    return getattr(a, "ndim", 0) > 0 and a.dtype.kind in "iu"


def _integer_arrays(index):
    """True when `index` is a tuple of integer arrays (no slices, no booleans)."""
    return isinstance(index, tuple) and bool(index) and all(_integer_array(a) for a in index)


def _scatter_add_rows(target, index, values):
    """target[index] += values for one integer array `index` into axis 0 (the embedding adjoint), by sorting the
    ids and summing each run with add.reduceat: ~8x faster than np.add.at, and in a fixed order. The runs are
    summed in float64 and rounded once: as fast here, more accurate (float32 runs that cancel lost up to 0.4 %),
    and safe on CuPy, whose reduceat takes differences of one running sum over all the rows."""
    xp = array_module(target)
    flat = index.reshape(-1).astype(np.int64)
    if flat.size == 0:
        return
    flat = xp.where(flat < 0, flat + target.shape[0], flat)
    rows = values.reshape(flat.size, *target.shape[1:])
    order = xp.argsort(flat, kind="stable")
    ids = flat[order]
    if xp is np:
        starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
        target[ids[starts]] += np.add.reduceat(rows[order], starts, axis=0, dtype=np.float64).astype(target.dtype)
        return
    # On a device, the number of distinct ids would have to come back to the host (a sync). Instead every target
    # row r gets its run bounds[r]:bounds[r+1] of the sorted ids by binary search (a fixed size) and the same sum
    # in the same order; rows without ids get zero. The zero row appended is the last, discarded run [len:], so
    # that an empty run at the end has a row to read (reduceat reads one row for an empty run: masked below).
    n = target.shape[0]
    bounds = xp.searchsorted(ids, xp.arange(n + 1))  # (n + 1,); bounds[n] = len(ids)
    padded = xp.concatenate([rows[order], xp.zeros((1,) + rows.shape[1:], dtype=rows.dtype)])
    sums = xp.add.reduceat(padded, bounds, axis=0, dtype=np.float64)[:n].astype(target.dtype)  # (n, ...)
    present = (bounds[1:] > bounds[:-1]).reshape((n,) + (1,) * (rows.ndim - 1))
    target += xp.where(present, sums, 0)
