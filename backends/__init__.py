"""Backends: who runs the MoE hot path (routing, gather/combine, grouped expert FFN and their adjoints).

    tm.backends.available()          # e.g. ["numpy", "numba"]
    tm.set_backend("numba"); tm.get_backend()
    with tm.use_backend("numpy"): ...

"numpy" is the readable reference (`tinymoe.dispatch`) and always there. Every other backend is a module with
the same functions and signatures (see `PRIMITIVES`); gradients are composed once above them, in
`tinymoe.moe_ops`. A backend that cannot load is reported with the reason, never a failed `import tinymoe`:
numba and cupy are imported only when that backend is asked for (or, for cupy, when `available()` checks for a
GPU). TINYMOE_BACKEND picks the default.

Where the arrays live decides the device, the current backend the implementation on it (`for_arrays`): an MoE op
on CuPy arrays runs on the cupy backend (or on the NumPy reference, which runs on any array module, when that is
the current backend), one on NumPy arrays on the current backend when that is a host backend (numpy, numba), else
on the best host backend. So `tm.set_backend("cupy")` with a model left on the host still trains (on the host),
and a model moved with `model.to("cuda")` runs its MoE ops on the GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

import numpy as np

from ..arrays import CUDA_INSTALL

PRIMITIVES = ("capacity_keep", "route", "gather", "gather_backward", "expert_ffn", "expert_ffn_backward", "combine",
              "combine_backward")

NAMES = ("numpy", "numba", "cupy")  # every backend tinymoe knows (the one list of names), the reference first
_MODULES = {"numpy": "tinymoe.dispatch", "numba": "tinymoe.backends.numba", "cupy": "tinymoe.backends.cupy"}
HOST = ("numpy", "numba")  # the backends that take NumPy arrays
_INSTALL = {"numba": "pip install 'tinymoe[numba]' (numba and scipy)", "cupy": CUDA_INSTALL}
_loaded: dict = {}
_current: str | None = None
_held = contextlib.ExitStack()  # the current backend's session, held for as long as it is current (set_backend)
_held_for: str | None = None  # whose session _held holds (None: nobody's yet, or it was left)
_cupy_why: list = []  # the cached result of _probe_cupy (probing imports CuPy and asks the driver: once)


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for that cannot run here; the message says why and how to get it."""


def _why_unavailable(name):
    """None when `name` can load, else the reason (checked without importing the package)."""
    if name == "numba":
        missing = [pkg for pkg in ("numba", "scipy") if importlib.util.find_spec(pkg) is None]
        if missing:
            return f"{' and '.join(missing)} not installed; install with: {_INSTALL['numba']}"
    if name == "cupy":
        if not _cupy_why:
            _cupy_why.append(_probe_cupy())
        return _cupy_why[0]
    if name not in NAMES:
        return f"unknown backend {name!r}; known backends are {list(NAMES)}"
    return None


def _probe_cupy():
    """None when CuPy, a GPU and cuBLAS are usable here, else why not (with the install command)."""
    if importlib.util.find_spec("cupy") is None:
        return f"CuPy not installed; install with: {_INSTALL['cupy']}"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, a driver older than the CUDA runtime, no device node
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"CuPy is installed but cannot reach an NVIDIA GPU here ({first}); the cupy backend needs an NVIDIA "
                f"GPU and its driver ({_INSTALL['cupy']}); on this machine use 'numba' or 'numpy'")
    if count == 0:
        return (f"CuPy is installed but this machine has no NVIDIA GPU; the cupy backend needs one "
                f"({_INSTALL['cupy']}); here use 'numba' or 'numpy'")
    for lib, use in (("cublas", "the expert GEMMs call it directly"), ("nvrtc", "it compiles the backend's kernels")):
        try:  # CuPy loads its CUDA libraries (from the wheels of [ctk], else the system) when first used: do it here
            module = getattr(importlib.import_module("cupy_backends.cuda.libs"), lib)  # as `from ... import cublas`
            if lib == "nvrtc":
                module.getVersion()  # NVRTC is linked at run time: only a call finds out whether it is there
        except Exception as e:
            name = {"cublas": "cuBLAS", "nvrtc": "NVRTC"}[lib]
            return (f"CuPy sees a GPU but cannot load {name}, which the cupy backend needs ({use}): "
                    f"{str(e).splitlines()[0] if str(e) else repr(e)}; install the CUDA libraries as wheels with "
                    f"{_INSTALL['cupy']}, or the CUDA toolkit")
    return None


def available() -> list[str]:
    """The backends that can run on this machine, the reference first."""
    return [name for name in _MODULES if _why_unavailable(name) is None]


def why_unavailable(name) -> str | None:
    """None when backend `name` can run here, else why not (with the install command); probes only that backend."""
    return _why_unavailable(name)


def unavailable() -> dict[str, str]:
    """Backend name -> why it cannot run here."""
    return {name: why for name in NAMES if (why := _why_unavailable(name)) is not None}


def load(name):
    """The backend module `name`, imported on first use; raises BackendUnavailable with the reason."""
    if name not in _loaded:
        why = _why_unavailable(name)
        if why is not None:
            raise BackendUnavailable(f"backend {name!r} is not available: {why}")
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def auto() -> str:
    """The backend `auto` means: cupy when a GPU is usable here, else numba when it can run, else the NumPy reference.

    The numba backend decides per call how many threads a kernel gets (one for small work, where waking a second
    worker costs more than it saves), so that it is at least as fast as the reference at every size measured: a
    whole MoE layer step at d=16, 4 experts, 32 rows per expert 0.53 ms against 0.68 on numpy, and 12x faster at
    512 rows per expert; whole transformer training steps in benchmarks/train_step.py. Without that rule,
    numba lost 3-4x at the small sizes, which is why `auto` looks no further than availability."""
    if _why_unavailable("cupy") is None:
        return "cupy"
    return _host_auto()


def _host_auto() -> str:
    """The best backend for NumPy arrays here: numba when it can run, else the NumPy reference."""
    return "numba" if _why_unavailable("numba") is None else "numpy"


def _where(a) -> str:
    """"host" (NumPy), "cupy" (an NVIDIA GPU), or "other" (another NumPy-like module, e.g. tinymoe.guarded). From
    the type's module alone: unlike tinymoe.arrays.device_of, it never imports CuPy."""
    if isinstance(a, (np.ndarray, np.generic)):
        return "host"
    return "cupy" if type(a).__module__.startswith("cupy") else "other"


def for_arrays(*arrays):
    """The backend module for an MoE op on these arrays (None entries ignored): where they live picks the device,
    the current backend the implementation when it runs there.

    NumPy arrays -> the current backend when it is a host one (numpy, numba), else the best host backend. CuPy
    arrays -> the cupy backend, or the NumPy reference when that is the current backend (it takes its array module
    from the data, so it runs on the GPU too: the slow, readable twin). Other NumPy-like arrays -> the reference.
    Host and device arrays mixed in one op are a ValueError naming both."""
    given = [a for a in arrays if a is not None]
    where = {_where(a) for a in given}
    if len(where) > 1:
        kinds = ", ".join(f"{type(a).__module__.split('.')[0]}.{type(a).__name__}" for a in given)
        raise ValueError(f"an MoE op got arrays on different devices ({kinds}); move them to one device first "
                         f"(model.to('cuda') or model.to('cpu'))")
    name = get_backend()
    if where == {"cupy"}:
        return load("numpy" if name == "numpy" else "cupy")
    if where == {"other"}:
        return load("numpy")
    return load(name if name in HOST else _host_auto())


def set_backend(name):
    """Run the MoE hot path on `name` from now on (loads it first, so a bad name fails here).

    A backend with a `session` holds it for as long as it is current. The numba backend's pins NumPy's BLAS to one
    thread and runs tinymoe's dense products on numba's threads (see `session`), so switching to numba changes how
    many threads other NumPy code in this process gets; switching to another backend gives them back."""
    global _current
    module = load(name)
    if name == _current and _held_for == name:
        return
    _leave()
    _current = name
    _hold(name, module)


def _hold(name, module):
    """Enter `name`'s session (if it has one) into _held, and note whose it is once it is entered."""
    global _held_for
    enter = getattr(module, "session", None)
    if enter is not None:
        _held.enter_context(enter())
    _held_for = name


def _leave():
    """Leave the held session (the previous backend's): its settings go back to what they were before it."""
    global _held_for
    _held_for = None
    _held.close()


def get_backend() -> str:
    """The name of the current backend: set_backend's, else TINYMOE_BACKEND's, else 'numpy'."""
    global _current
    if _current is None:
        env = os.environ.get("TINYMOE_BACKEND", "numpy").strip() or "numpy"
        try:
            set_backend(env)
        except BackendUnavailable as e:
            raise BackendUnavailable(f"TINYMOE_BACKEND={env}: {e}") from None
    return _current


def backend_module():
    """The module of the current backend, whose functions run the hot path."""
    return load(get_backend())


def session():
    """The current backend's context for a whole training run, or a no-op when it has none. set_backend already
    holds it while the backend is current, and this is then a no-op: a second copy would, on leaving, restore the
    settings the first one made, and so outlive a switch of backend made inside it. `fit` still enters it, for a
    backend made current some other way (a test that assigns the registry's `_current` directly).

    The numba backend pins NumPy's BLAS to one thread there and runs the engine's dense products on its own
    threads, so that OpenBLAS's busy-waiting workers do not take the cores from its parallel expert kernels."""
    name = get_backend()
    if _held_for == name:  # held by set_backend: a second copy would restore, on leaving, what the first one set
        return contextlib.nullcontext()
    enter = getattr(load(name), "session", None)
    return enter() if enter is not None else contextlib.nullcontext()


@contextlib.contextmanager
def use_backend(name):
    """Temporarily switch backend: `with tm.use_backend("numpy"): ...` (the previous one, and its session, after)."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        if previous is None:
            _leave()
            _current = None
        else:
            set_backend(previous)
