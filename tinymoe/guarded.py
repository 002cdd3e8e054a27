"""A stand-in for a GPU array library, on the CPU: NumPy arrays behind a wall that host code cannot cross silently.

    from tinymoe import guarded
    model.to(guarded.xp)                     # every parameter becomes a GuardedArray: "on the device"
    with guarded.count_transfers() as moved:
        ...one training step...
    moved.to_host, moved.to_device            # explicit transfers made in the block

Why it exists: code that runs on NumPy can still be wrong for CuPy. Calling `np.argsort(a)`, `np.asarray(a)` or
mixing `a + host_array` on a CuPy array either fails or copies the whole array to the host and back, which is
the slowest thing a GPU program can do. CI has no GPU, so this module plays one. A `GuardedArray` behaves as a
`cupy.ndarray` does where it matters for those mistakes:

* implicit conversion to NumPy is refused with TypeError (`np.asarray(a)`, `np.array(a)`, `a.__array__()`), and so
  is every NumPy function or ufunc called on it (`np.exp(a)`, `np.argsort(a)`): use `xp = array_module(a)`;
* operators and `xp` functions that mix it with a host `np.ndarray` raise TypeError (Python numbers and NumPy
  scalars are fine, as in CuPy), also as an index (`a[host_idx]`) or an assigned value (`a[i] = host`);
* `.get()` copies to the host explicitly; `.item()`, `.tolist()`, `float(a)`, `int(a)`, `bool(a)` of a one-element
  array do too (CuPy allows them: each is a device synchronisation); `float(a)` of a bigger array is an error;
* `xp` is the module-like namespace of the NumPy functions, returning GuardedArrays; `xp.asarray(host)` is the
  explicit upload;
* what CuPy can only do by asking the device how big its result is — selecting with a boolean mask
  (`a[mask]`), `xp.nonzero`, `xp.flatnonzero`, `xp.unique`, ... — is counted as a transfer to the host too,
  since on a GPU it synchronises just the same.

Every transfer is counted (`count_transfers`), so a test can assert "at most a few scalar syncs per step". The
values inside are plain NumPy, computed by the same NumPy calls, so a guarded run equals a NumPy run bit for bit.

`tinymoe.arrays.array_module` finds `xp` through the array's `__array_module__` method (NEP 37's protocol:
an array names the NumPy-like module that handles it), the one hook any array type can use; nothing in the
library knows this module. Not imported by `import tinymoe`.
"""
from __future__ import annotations

import contextlib
import numbers
import operator

import numpy as np

DEVICE = "guarded"  # the device name Tensor.device reports for these arrays


class Transfers:
    """Counts of explicit copies: to_host (.get(), .item(), float(...), ...) and to_device (xp.asarray(host))."""

    def __init__(self):
        self.to_host = 0
        self.to_device = 0
        self.log: list[str] = []  # what each transfer was, in order (for a failing test's message)

    def __repr__(self):
        return f"Transfers(to_host={self.to_host}, to_device={self.to_device}, log={self.log})"


_counters: list[Transfers] = []


def _count(direction, what):
    for c in _counters:
        setattr(c, direction, getattr(c, direction) + 1)
        c.log.append(f"{direction}: {what}")


@contextlib.contextmanager
def count_transfers():
    """`with count_transfers() as moved:` counts the transfers made inside the block (blocks may nest)."""
    c = Transfers()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def _host_error(where):
    return TypeError(f"{where}: a host numpy.ndarray met a device array ({DEVICE}); move it first with "
                     f"xp.asarray(host) (or Tensor.to / Module.to), as CuPy requires")


def _unwrap(value, where):
    """The NumPy array inside a GuardedArray (recursively in lists and tuples); a host ndarray is an error."""
    if isinstance(value, GuardedArray):
        return value._a
    if isinstance(value, np.ndarray):
        raise _host_error(where)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where) for v in value)
    return value


def _wrap(value):
    """NumPy results as GuardedArrays (a NumPy scalar becomes a 0-d array, as CuPy returns); others as they are."""
    if isinstance(value, np.ndarray):
        return GuardedArray(value)
    if isinstance(value, np.generic):
        return GuardedArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _binary(op, name, reflected=False):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _host_error(f"GuardedArray.{name}")
        if not isinstance(other, (GuardedArray, numbers.Number, np.generic, bool)):
            return NotImplemented
        b = other._a if isinstance(other, GuardedArray) else other
        return _wrap(op(b, self._a) if reflected else op(self._a, b))

    method.__name__ = name
    return method


def _inplace(op, name):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _host_error(f"GuardedArray.{name}")
        op(self._a, other._a if isinstance(other, GuardedArray) else other)
        return self

    method.__name__ = name
    return method


# methods of ndarray that stay on the device: forwarded with their arguments unwrapped and their results wrapped
_METHODS = ("astype", "reshape", "transpose", "swapaxes", "sum", "mean", "max", "min", "argmax", "argmin", "any",
            "all", "copy", "ravel", "flatten", "squeeze", "cumsum", "prod", "var", "std", "dot", "fill", "clip",
            "argsort", "sort", "repeat", "take", "round", "view", "diagonal", "trace", "conj")
# attributes that are host metadata (shapes, dtypes): returned as they are
_METADATA = ("shape", "ndim", "dtype", "size", "itemsize", "nbytes", "strides", "flags")


class GuardedArray:
    """A NumPy array "on the device": see the module docstring for what it refuses and what it counts."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy ufuncs refuse it, and `ndarray + GuardedArray` defers to our __radd__
    __array_priority__ = 1000

    def __init__(self, array):
        self._a = array

    # ---- the hooks that keep it on the device ---------------------------------------------------------------
    def __array_module__(self, types):
        """NEP 37: the NumPy-like module that handles this array (tinymoe.arrays.array_module asks for it)."""
        return xp

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (a device array, like CuPy's): call "
                        ".get() to copy it to the host, or use xp = tinymoe.arrays.array_module(a) for the math")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"np.{func.__name__} was called on a device array ({DEVICE}): NumPy functions run on the host; "
                        f"call the function of the array's own module, xp = tinymoe.arrays.array_module(a)")

    # ---- explicit transfers ---------------------------------------------------------------------------------
    def get(self):
        """A host copy (NumPy), as cupy.ndarray.get()."""
        _count("to_host", f"get() of {self._a.shape} {self._a.dtype}")
        return self._a.copy()

    def _scalar(self, kind):
        if self._a.size != 1:
            raise TypeError(f"{kind}() of a device array of shape {self._a.shape}: only one-element arrays convert to "
                            "Python scalars; call .get() for a host copy")
        _count("to_host", f"{kind}() of {self._a.shape} {self._a.dtype}")
        return self._a.reshape(()).item()

    def item(self):
        return self._scalar("item")

    def tolist(self):
        _count("to_host", f"tolist() of {self._a.shape} {self._a.dtype}")
        return self._a.tolist()

    def __float__(self):
        return float(self._scalar("float"))

    def __int__(self):
        return int(self._scalar("int"))

    def __index__(self):
        return operator.index(self._scalar("index"))

    def __bool__(self):
        if self._a.size != 1:
            raise ValueError(f"The truth value of a device array of shape {self._a.shape} is ambiguous")
        return bool(self._scalar("bool"))

    # ---- metadata, indexing, methods ------------------------------------------------------------------------
    def __getattr__(self, name):
        if name in _METADATA:
            return getattr(self._a, name)
        if name in _METHODS:
            bound = getattr(self._a, name)

            def method(*args, **kwargs):
                where = f"GuardedArray.{name}"
                return _wrap(bound(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()}))

            return method
        raise AttributeError(f"GuardedArray has no attribute {name!r} (a device array offers {_METHODS + _METADATA})")

    T = property(lambda self: GuardedArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (GuardedArray(np.asarray(row)) for row in self._a)

    def __getitem__(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, GuardedArray) and i._a.dtype == bool and i._a.ndim for i in items):
            _count("to_host", f"boolean mask of {self._a.shape} (its result size comes from the device)")
        return _wrap(self._a[_unwrap(index, "GuardedArray[index]")])

    def __setitem__(self, index, value):
        self._a[_unwrap(index, "GuardedArray[index]")] = _unwrap(value, "GuardedArray[index] = value")

    def __repr__(self):
        return f"GuardedArray({self._a!r})"

    def __deepcopy__(self, memo):
        return GuardedArray(self._a.copy())

    # arithmetic, comparisons and bit operations, each refusing a host ndarray operand
    __add__, __radd__ = _binary(operator.add, "__add__"), _binary(operator.add, "__radd__", True)
    __sub__, __rsub__ = _binary(operator.sub, "__sub__"), _binary(operator.sub, "__rsub__", True)
    __mul__, __rmul__ = _binary(operator.mul, "__mul__"), _binary(operator.mul, "__rmul__", True)
    __truediv__, __rtruediv__ = _binary(operator.truediv, "__truediv__"), _binary(operator.truediv, "__rtruediv__", True)
    __floordiv__ = _binary(operator.floordiv, "__floordiv__")
    __rfloordiv__ = _binary(operator.floordiv, "__rfloordiv__", True)
    __mod__, __rmod__ = _binary(operator.mod, "__mod__"), _binary(operator.mod, "__rmod__", True)
    __pow__, __rpow__ = _binary(operator.pow, "__pow__"), _binary(operator.pow, "__rpow__", True)
    __matmul__, __rmatmul__ = _binary(operator.matmul, "__matmul__"), _binary(operator.matmul, "__rmatmul__", True)
    __and__, __rand__ = _binary(operator.and_, "__and__"), _binary(operator.and_, "__rand__", True)
    __or__, __ror__ = _binary(operator.or_, "__or__"), _binary(operator.or_, "__ror__", True)
    __xor__, __rxor__ = _binary(operator.xor, "__xor__"), _binary(operator.xor, "__rxor__", True)
    __lshift__, __rshift__ = _binary(operator.lshift, "__lshift__"), _binary(operator.rshift, "__rshift__")
    __lt__, __le__ = _binary(operator.lt, "__lt__"), _binary(operator.le, "__le__")
    __gt__, __ge__ = _binary(operator.gt, "__gt__"), _binary(operator.ge, "__ge__")
    __eq__, __ne__ = _binary(operator.eq, "__eq__"), _binary(operator.ne, "__ne__")
    __hash__ = None
    __iadd__, __isub__ = _inplace(operator.iadd, "__iadd__"), _inplace(operator.isub, "__isub__")
    __imul__, __itruediv__ = _inplace(operator.imul, "__imul__"), _inplace(operator.itruediv, "__itruediv__")
    __iand__, __ior__ = _inplace(operator.iand, "__iand__"), _inplace(operator.ior, "__ior__")

    def __neg__(self):
        return GuardedArray(-self._a)

    def __pos__(self):
        return GuardedArray(+self._a)

    def __abs__(self):
        return GuardedArray(abs(self._a))

    def __invert__(self):
        return GuardedArray(~self._a)


# functions whose result size depends on the data: on a GPU each synchronises to learn it
_SIZED_BY_DATA = ("nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract", "trim_zeros")


class _Function:
    """A NumPy function or ufunc on device arrays: arguments unwrapped (a host ndarray refused), results wrapped."""

    def __init__(self, name, func):
        self.__name__, self._func = name, func

    def __call__(self, *args, **kwargs):
        where = f"xp.{self.__name__}"
        if self.__name__ in _SIZED_BY_DATA:
            _count("to_host", f"{where} (its result size comes from the device)")
        return _wrap(self._func(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()}))

    def __getattr__(self, name):  # a ufunc's methods: xp.add.at, xp.add.reduceat, xp.maximum.reduce, ...
        return _Function(f"{self.__name__}.{name}", getattr(self._func, name))


def _upload(a, dtype=None, **kwargs):
    """xp.asarray: host data becomes a device array; copying a host ndarray counts as a transfer to the device."""
    if isinstance(a, GuardedArray):
        return GuardedArray(np.asarray(a._a, dtype=dtype, **kwargs))
    if isinstance(a, np.ndarray):
        _count("to_device", f"asarray of {a.shape} {a.dtype}")
    return GuardedArray(np.array(a, dtype=dtype, **kwargs))


def _concatenate(arrays, axis=0, **kwargs):
    """As cupy.concatenate: device arrays only (a Python list among them is refused, as CuPy refuses it)."""
    if not all(isinstance(a, GuardedArray) for a in arrays):
        raise TypeError(f"xp.concatenate: only device arrays can be joined, got {[type(a).__name__ for a in arrays]}")
    return GuardedArray(np.concatenate([a._a for a in arrays], axis=axis, **kwargs))


class _Namespace:
    """The array module of GuardedArrays: `xp.zeros`, `xp.argsort`, `xp.add.at`, ... (NumPy's, on the device)."""

    __name__ = "tinymoe.guarded.xp"
    device = DEVICE
    ndarray = GuardedArray
    asarray = array = ascontiguousarray = staticmethod(_upload)
    concatenate = staticmethod(_concatenate)

    def __getattr__(self, name):
        value = getattr(np, name)  # AttributeError for names NumPy lacks
        if isinstance(value, (type, np.dtype)) or not callable(value):  # dtypes, constants (float32, pi, newaxis)
            return value
        return _Function(name, value)

    def __repr__(self):
        return "<module-like tinymoe.guarded.xp: NumPy on a guarded stand-in device>"


xp = _Namespace()
