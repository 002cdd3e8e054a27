"""Backends: who runs the MoE hot path (routing, gather/combine, grouped expert FFN and their adjoints).

    tm.backends.available()          # e.g. ["numpy", "numba"]
    tm.set_backend("numba"); tm.get_backend()
    with tm.use_backend("numpy"): ...

"numpy" is the readable reference (`tinymoe.dispatch`) and always there. Every other backend is a module with
the same functions and signatures (see `PRIMITIVES`); gradients are composed once above them, in
`tinymoe.moe_ops`. A backend that cannot load is reported with the reason, never a failed `import tinymoe`:
numba and cupy are imported only when that backend is asked for. TINYMOE_BACKEND picks the default.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

PRIMITIVES = ("capacity_keep", "route", "gather", "gather_backward", "expert_ffn", "expert_ffn_backward", "combine",
              "combine_backward")

NAMES = ("numpy", "numba", "cupy")  # every backend tinymoe knows (the one list of names), the reference first
_MODULES = {"numpy": "tinymoe.dispatch", "numba": "tinymoe.backends.numba"}  # the ones implemented in this version
_INSTALL = {"numba": "pip install 'tinymoe[numba]' (numba and scipy)"}
_loaded: dict = {}
_current: str | None = None


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for that cannot run here; the message says why and how to get it."""


def _why_unavailable(name):
    """None when `name` can load, else the reason (checked without importing the package)."""
    if name == "numba":
        missing = [pkg for pkg in ("numba", "scipy") if importlib.util.find_spec(pkg) is None]
        if missing:
            return f"{' and '.join(missing)} not installed; install with: {_INSTALL['numba']}"
    if name == "cupy":
        return ("the CuPy GPU backend is not part of this version yet; use 'numba' on the CPU "
                "(once it lands: pip install 'tinymoe[cuda12]' or 'tinymoe[cuda13]' on a machine with an NVIDIA GPU)")
    if name not in NAMES:
        return f"unknown backend {name!r}; known backends are {list(NAMES)}"
    return None


def available() -> list[str]:
    """The backends that can run on this machine, the reference first."""
    return [name for name in _MODULES if _why_unavailable(name) is None]


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
    """The backend `auto` means: numba when it can run here, else the NumPy reference.

    The numba backend decides per call how many threads a kernel gets (one for small work, where waking a second
    worker costs more than it saves), so that it is at least as fast as the reference at every size measured: a
    whole MoE layer step at d=16, 4 experts, 32 rows per expert 0.53 ms against 0.68 on numpy, and 12x faster at
    512 rows per expert; whole transformer training steps in benchmarks/train_step.py. Without that rule,
    numba lost 3-4x at the small sizes, which is why `auto` looks no further than availability."""
    return "numba" if "numba" in available() else "numpy"


def set_backend(name):
    """Run the MoE hot path on `name` from now on (loads it first, so a bad name fails here)."""
    global _current
    load(name)
    _current = name


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
    """The current backend's context for a whole training run (`fit` enters it), or a no-op when it has none.

    The numba backend pins NumPy's BLAS to one thread here, so OpenBLAS's busy-waiting workers do not take the
    cores from its parallel expert kernels."""
    enter = getattr(backend_module(), "session", None)
    return enter() if enter is not None else contextlib.nullcontext()


@contextlib.contextmanager
def use_backend(name):
    """Temporarily switch backend: `with tm.use_backend("numpy"): ...`."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        _current = previous
