"""A stand-in accelerator on the CPU, to catch device mixing without a GPU (issue 18).

Code written and tested on the CPU mixes tensors of two devices without noticing: a CUDA run then fails
("Expected all tensors to be on the same device"), or worse, a ``try/except RuntimeError`` turns the
failure into a silent fallback. ``FakeDevice`` runs the same code on the CPU while tracking which tensors
would live on the accelerator, and raises where CUDA would:

    with FakeDevice() as fd:
        model = fd.place(model)            # parameters and buffers are "on the device"
        ... the attack, with ``fd.device`` where it would pass ``torch.device("cuda")`` ...

Tracked tensors report ``fd.device`` (``cpu:0``, distinct from plain ``cpu``) as their ``.device``, so code that
follows ``x.device`` or ``next(model.parameters()).device`` creates its tensors there. The rules (those of
CUDA): every op's tensor operands are on one device, except 0-dim host tensors (scalars) and host index
tensors in indexing; ``.cpu()`` / ``.to("cpu")`` / ``.numpy()`` leave the device (``.numpy()`` of a device
tensor raises, as on CUDA); ``.to(fd.device)`` and factories with ``device=fd.device`` enter it; every other
op's outputs are on the device when an operand is. Ops the mode does not see (work inside autograd's engine)
are covered through ``.grad`` and ``torch.autograd.grad``'s outputs; ops on ``torch.func`` (vmap, grad)
wrappers are not checked (their identity is not tracked). ``copy.deepcopy`` of a tensor or module also bypasses
the mode: inside the block ``Tensor.__deepcopy__`` and ``Parameter.__deepcopy__`` are wrapped to carry the mark. A development and test tool (see
``tests/eval/test_device_placement.py``); no effect outside the ``with`` block.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DeviceMixError", "FakeDevice"]

FAKE = torch.device("cpu", 0)
DEV, HOST = "device", "host"
_T = torch.Tensor
_DEVICE_GET = _T.device.__get__
_GRAD_GET = _T.grad.__get__
_DATA_SET = _T.data.__set__
_INDEXING = {_T.__getitem__, _T.__setitem__}
_LEAVE = {_T.cpu, _T.numpy, _T.tolist, _T.item}
_CROSS = {_T.copy_, torch._has_compatible_shallow_copy_type}  # cross-device by design (or no arithmetic)
# by name (ATen's bindings): how many leading operands must be on the device; targets and lengths may stay on the host
# (``speechleak.ctc`` keeps them there when ``device.type == "cpu"``, which the stand-in device reports)
_LEADING = {"_ctc_loss": 1, "ctc_loss": 1, "_ctc_loss_backward": 2}


class DeviceMixError(RuntimeError):
    """An op mixed accelerator and host tensors as CUDA would refuse."""


def _tensors(obj: Any, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _wrapped(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _is_fake(dev: Any) -> bool:
    if isinstance(dev, str):
        dev = torch.device(dev)
    return isinstance(dev, torch.device) and dev == FAKE


def _target(args: tuple, kwargs: dict) -> bool | None:
    """``.to(...)``'s destination: True (the device), False (plain host), None (dtype only: stays)."""
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return _is_fake(a)
        if isinstance(a, torch.Tensor):  # .to(other): other's device
            return None if a is None else a  # resolved by the caller
    return None


class FakeDevice(TorchFunctionMode):
    """The mode (module docstring). ``place(module)`` puts a module's parameters and buffers on the device."""

    device = FAKE

    def __init__(self) -> None:
        super().__init__()
        self._where = WeakIdKeyDictionary()  # tensor -> DEV or HOST (unknown where absent)
        self.ops = 0

    def __enter__(self):
        # copy.deepcopy of a module or tensor bypasses the mode: its copies stay where the original is
        self._saved = (torch.Tensor.__deepcopy__, torch.nn.Parameter.__deepcopy__)
        for cls, orig in zip((torch.Tensor, torch.nn.Parameter), self._saved):
            setattr(cls, "__deepcopy__", self._deepcopy(orig))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.__deepcopy__, torch.nn.Parameter.__deepcopy__ = self._saved
        return super().__exit__(*exc)

    def _deepcopy(self, orig):
        def deepcopy(t, memo):
            out = orig(t, memo)
            self._put(self._where.get(t), out)
            return out
        return deepcopy

    def _put(self, where: str | None, *ts) -> None:
        for t in ts:
            if isinstance(t, torch.Tensor):
                if where is None:
                    self._where.pop(t, None)
                else:
                    self._where[t] = where

    def mark(self, *ts: torch.Tensor) -> None:
        """Put tensors on the device."""
        self._put(DEV, *ts)

    def on(self, t: torch.Tensor) -> bool:
        return self._where.get(t) == DEV

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        self.mark(*module.parameters(), *module.buffers())
        return module

    def _check(self, func, ts: list) -> str | None:
        """Where the op's outputs go (DEV, HOST or None: unknown); raises on a mix CUDA would refuse."""
        where = [self._where.get(t) for t in ts]
        if DEV not in where:
            return HOST if HOST in where else None
        lead = _LEADING.get(getattr(func, "__name__", None))
        if lead:
            where, ts = where[:lead], ts[:lead]
        if func in _CROSS or HOST not in where or any(map(_wrapped, ts)):
            return DEV  # (inside torch.func transforms the wrappers' identity is not tracked: not checked)
        if func in _INDEXING:  # host index tensors are fine; the indexed tensor and a set value are not
            base = ts[0]
            if self.on(base):
                vals = _tensors(ts[2:] if func is _T.__setitem__ and len(ts) > 2 else [], [])
                bad = [t for t in vals if self._where.get(t) == HOST and t.dim() > 0]
            elif any(self.on(t) for t in ts[1:]):
                raise DeviceMixError(f"{getattr(func, '__qualname__', func)}: a host tensor indexed with device "
                                     f"indices (CUDA would refuse this)")
            else:
                bad = []
        else:
            bad = [t for t, w in zip(ts, where) if w == HOST and t.dim() > 0]
        if bad:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
            raise DeviceMixError(f"{name}: host tensor(s) of shape {[tuple(t.shape) for t in bad]} mixed with "
                                 f"device tensors (CUDA would refuse this)")
        return DEV

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func == _DEVICE_GET:
            return FAKE if self.on(args[0]) else func(*args, **kwargs)
        if func == _DATA_SET:  # Module.to: ``param.data = param.to(device)`` moves the parameter itself
            out = func(*args, **kwargs)
            self._put(self._where.get(args[1]), args[0])
            return out
        if func == _GRAD_GET:
            g = func(*args, **kwargs)
            if g is not None and args[0] in self._where:
                self._put(self._where[args[0]], g)
            return g
        if func in _LEAVE:
            if func is _T.numpy and self.on(args[0]):
                raise DeviceMixError(".numpy() of a device tensor (CUDA would refuse: .cpu() first)")
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                out = out.view_as(out) if out is args[0] else out
                self._put(HOST, out)
            return out
        if func is _T.to or func is _T.cuda:
            dest = _target(args[1:], kwargs) if func is _T.to else True
            if isinstance(dest, torch.Tensor):
                dest = self._where.get(dest) == DEV
            out = func(*args, **kwargs)
            if dest is None:  # a dtype change: stays where it is
                self._put(self._where.get(args[0]), out)
                return out
            if out is args[0]:
                out = out.view_as(out)
            self._put(DEV if dest else HOST, out)
            return out
        ts = _tensors(args, [])
        _tensors(kwargs, ts)
        where = self._check(func, ts) if ts else None
        out = func(*args, **kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            where = DEV if _is_fake(kwargs["device"]) else HOST
        elif not ts:
            where = HOST  # a factory without a device: the host (torch.tensor, zeros, arange, from_numpy ...)
        if where is not None and not (isinstance(out, torch.Tensor) and out is args[0] if args else False):
            self._put(where, *_tensors(out, []))
        return out
