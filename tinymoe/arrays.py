"""Which array library holds some data: NumPy on the host, CuPy on an NVIDIA GPU, or another NumPy-like module.

The lowest module of the package: the engine, the activations, the gates, the dispatch reference and the
optimizers all take their array module from the data through `array_module` (`xp = array_module(a)`, then
`xp.argsort`, `xp.zeros`, ...), so the same code runs on any of them, and CuPy is imported only when a CuPy
array is actually seen.

The hook: an array type that is neither NumPy nor CuPy names its module with a method `__array_module__(types)`
(NEP 37, "a dispatch protocol for NumPy-like modules"); `tinymoe.guarded` uses it to stand in for a GPU in CI.
The module returned must offer NumPy's functions under NumPy's names, as CuPy does.

A device is named after its module: "cpu" for NumPy, "cuda" for CuPy, else the module's `device` attribute.
"""
import numpy as np


def array_module(*arrays):
    """NumPy, or the module of the first array that is not NumPy's: CuPy's, or the one its `__array_module__`
    names (CuPy is never imported otherwise)."""
    for a in arrays:
        cls = type(a)
        if cls is np.ndarray:
            continue
        if cls.__module__.startswith("cupy"):
            import cupy

            return cupy
        hook = getattr(cls, "__array_module__", None)
        if hook is not None:
            return hook(a, {cls})
    return np


def device_name(xp) -> str:
    """The device an array module computes on: "cpu" (NumPy), "cuda" (CuPy), or the module's own `device` name."""
    if xp is np:
        return "cpu"
    name = getattr(xp, "__name__", "")
    if name == "cupy":
        return "cuda"
    return getattr(xp, "device", None) or name or repr(xp)


def device_of(a) -> str:
    """The device that holds array `a` (see `device_name`)."""
    return device_name(array_module(a))


def to_host(a):
    """`a` as a NumPy array: itself when it is on the host already, else one explicit copy (`.get()`, as CuPy's)."""
    return a if isinstance(a, (np.ndarray, np.generic)) else a.get()


# ---- devices by name -------------------------------------------------------------------------------------------
HOST_NAMES = ("cpu", "numpy")
CUDA_NAMES = ("cuda", "gpu", "cupy")
CUDA_INSTALL = "pip install 'tinymoe[cuda12]' (CUDA 12; 'tinymoe[cuda13]' for CUDA 13) on a machine with an NVIDIA GPU"


class DeviceUnavailable(RuntimeError):
    """A device was asked for that cannot run here (no CuPy, or no GPU); the message names the install command."""


def module_for(device, where="to"):
    """The array module of `device`: a name ("cpu", "numpy"; "cuda", "gpu", "cupy") or an array module itself
    (numpy, cupy, or any NumPy-like module with `asarray`, such as tinymoe.guarded.xp). None when `device` is
    neither (the caller may then read it as a dtype)."""
    if isinstance(device, str):
        name = device.lower()
        if name in HOST_NAMES:
            return np
        return _cuda_module(where) if name in CUDA_NAMES else None
    if device is np:
        return np
    if getattr(device, "__name__", None) == "cupy":
        return _cuda_module(where)
    return device if callable(getattr(device, "asarray", None)) and not isinstance(device, type) else None


def _cuda_module(where):
    """The cupy module, or DeviceUnavailable naming the install command when CuPy or a GPU is missing."""
    try:
        import cupy
    except ImportError:
        raise DeviceUnavailable(f"{where}('cuda'): CuPy is not installed; {CUDA_INSTALL}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken: cupy raises its own runtime errors
        raise DeviceUnavailable(f"{where}('cuda'): CuPy is installed but finds no usable GPU ({e}); {CUDA_INSTALL}"
                                ) from None
    if count < 1:
        raise DeviceUnavailable(f"{where}('cuda'): CuPy is installed but finds no GPU; {CUDA_INSTALL}")
    return cupy


def move(a, xp):
    """Array `a` on the device of module `xp`: itself when it is there already, else one explicit copy (through
    the host when it moves between two devices)."""
    if array_module(a) is xp:
        return a
    host = to_host(a)
    return host if xp is np else xp.asarray(host)


def host_min_max(a):
    """(min, max) of a non-empty array as Python numbers, in one copy from its device (one sync on a GPU)."""
    xp = array_module(a)
    return tuple(to_host(xp.stack([a.min(), a.max()])).tolist())


class HostCopies:
    """Arrays kept where they were made (e.g. a model's last gate weights on the GPU), copied to the host the first
    time they are read: what a forward pass records for plots and logs costs no transfer until someone looks."""

    def __init__(self, arrays=()):
        self._arrays, self._host = list(arrays), None

    def get(self) -> list:
        if self._host is None:
            self._host = [to_host(a) for a in self._arrays]
        return self._host
