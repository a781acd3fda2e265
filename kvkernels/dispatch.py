"""Backend dispatch: each op has implementations per backend; the first that supports a case runs.

Priority: ``cuda`` > ``triton`` > ``torch`` (the reference). A ``backend=`` argument or the
``KVKERNELS_BACKEND`` environment variable picks one; if it (or every backend) refuses, the
error lists each backend's reason. Resolution happens at call time and is cached per case.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Hashable, List, Optional, Tuple

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "torch")
ENV_VAR = "KVKERNELS_BACKEND"


class BackendError(RuntimeError):
    """No backend can run this case (the message lists every backend's reason)."""


class _Lazy:
    """``module:attr`` imported on first use (keeps triton and the extension out of import time)."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr, self._fn = module, attr, None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self.module), self.attr)
        return self._fn(*args, **kwargs)


# op -> backend -> (implementation, supports(*case_args) -> reason or None)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Callable]]] = {}
_AVAILABILITY: Dict[str, Callable[[], Optional[str]]] = {}
_CACHE: Dict[Hashable, Tuple[str, Callable]] = {}
_ORDER: Dict[str, Tuple[str, ...]] = {}  # per-op backend order where it differs from BACKENDS
_AVAIL_CACHE: Dict[str, Optional[str]] = {}


def register_backend(name: str, availability: Callable[[], Optional[str]]) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _AVAILABILITY[name] = availability


def register(op: str, backend: str, module: str, fn: str, supports: Optional[str] = None) -> None:
    """Register ``module.fn`` as ``op``'s implementation on ``backend``; ``module.supports``
    (if given) returns a reason string when the backend cannot run a case."""
    impl = _Lazy(module, fn)
    sup = _Lazy(module, supports) if supports else (lambda *a, **k: None)
    _REGISTRY.setdefault(op, {})[backend] = (impl, sup)


def prefer(op: str, order: Tuple[str, ...], why: str) -> None:
    """Try ``op``'s backends in ``order`` instead of ``BACKENDS`` when none is requested, e.g.
    where the bench measures the Triton kernel ahead of the CUDA one. ``why`` documents the
    measurement (kept in ``preferences()``)."""
    if sorted(order) != sorted(BACKENDS):
        raise ValueError(f"order: expected a permutation of {BACKENDS}, got {order}")
    _ORDER[op] = tuple(order)
    _WHY[op] = why
    _CACHE.clear()


_WHY: Dict[str, str] = {}


def preferences() -> Dict[str, Tuple[Tuple[str, ...], str]]:
    """{op: (backend order, why)} for the ops whose order differs from ``BACKENDS``."""
    return {op: (o, _WHY[op]) for op, o in _ORDER.items()}


def ops() -> List[str]:
    return sorted(_REGISTRY)


def backends_of(op: str) -> List[str]:
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]


def availability(name: str) -> Optional[str]:
    """None if the backend can run on this machine, else why not (cached)."""
    if name not in _AVAIL_CACHE:
        try:
            _AVAIL_CACHE[name] = _AVAILABILITY[name]()
        except Exception as e:  # an availability probe must never take the package down
            _AVAIL_CACHE[name] = f"{type(e).__name__}: {e}"
    return _AVAIL_CACHE[name]


def requested_backend(backend: Optional[str]) -> Optional[str]:
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None and name not in BACKENDS:
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}: expected one of {BACKENDS}, got {name!r}")
    return name


def refusal(op: str, name: str, *case_args) -> Optional[str]:
    """None if backend ``name`` can run ``op`` on this case, else the reason it refuses."""
    impls = _REGISTRY.get(op, {})
    if name not in impls:
        return f"{op} has no {name} implementation"
    why = availability(name)
    if why is None:
        try:
            why = impls[name][1](*case_args)
        except ImportError as e:  # e.g. a kernel module that cannot load on this machine
            why = f"cannot import its kernels ({e})"
    return why


def resolve(op: str, key: Hashable, case_args: tuple, backend: Optional[str] = None,
            device_type: str = "cuda") -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for a case on ``device_type``. ``key`` must determine
    every backend's answer for ``case_args`` (it is the cache key)."""
    want = requested_backend(backend)
    ck = (op, want, device_type, key)
    hit = _CACHE.get(ck)
    if hit is not None:
        return hit
    impls = _REGISTRY.get(op)
    if not impls:
        raise BackendError(f"{op}: no implementation registered")
    reasons = []
    for name in ([want] if want else _ORDER.get(op, BACKENDS)):
        if not want and name == "triton" and device_type == "cpu":
            reasons.append("triton: CPU tensors run in the Triton interpreter (a test tool) only when "
                           "backend='triton' is requested")
            continue
        why = refusal(op, name, *case_args)
        if why is None:
            _CACHE[ck] = (name, impls[name][0])
            return _CACHE[ck]
        reasons.append(f"{name}: {why}")
    how = f"backend {want!r} was requested and refused" if want else "no backend can run it"
    raise BackendError(f"{op}: {how}:\n  " + "\n  ".join(reasons))


# ---- backend availability -------------------------------------------------------------------
def _torch_available() -> Optional[str]:
    return None


def _triton_available() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton cannot be imported ({e})"
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return None
    return "no CUDA device and TRITON_INTERPRET is not 1"


def _cuda_available() -> Optional[str]:
    from .cuda import quant

    return quant.available()


register_backend("torch", _torch_available)
register_backend("triton", _triton_available)
register_backend("cuda", _cuda_available)


def backend_report() -> Dict[str, Optional[str]]:
    return {b: availability(b) for b in BACKENDS}
