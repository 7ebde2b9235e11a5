"""common.fake_device: the stand-in accelerator raises where CUDA would refuse a device mix, and only there."""
from __future__ import annotations

import copy

import pytest
import torch

from common.fake_device import DeviceMixError, FakeDevice


def _lin() -> torch.nn.Linear:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(torch.randn(2, 3, generator=g))
    return m


def test_mixes_cuda_refuses_raise():
    with FakeDevice() as fd:
        m = _lin().to(fd.device)
        x = torch.randn(4, 3)
        with pytest.raises(DeviceMixError, match="linear"):
            m(x)  # a host batch into a model on the device
        y = m(x.to(fd.device))
        assert y.device == fd.device and fd.on(y)
        host = y.detach().cpu()
        with pytest.raises(DeviceMixError):
            torch.allclose(y, host)  # the self-check of session 18's first DAGER bug
        with pytest.raises(DeviceMixError, match="device indices"):
            host[torch.tensor([0, 1], device=fd.device)]  # its third bug
        with pytest.raises(DeviceMixError, match="numpy"):
            y.detach().numpy()


def test_what_cuda_allows_passes():
    with FakeDevice() as fd:
        m = _lin().to(fd.device)
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        y = m(x.to(fd.device))
        z = y * torch.tensor(2.0)  # a 0-dim host scalar
        rows = y[torch.tensor([0, 2])]  # a host index tensor
        w = torch.zeros(2, device=y.device)  # factories that follow .device land on the device
        assert fd.on(z) and fd.on(rows) and fd.on(w) and fd.on(y.double())
        c = copy.deepcopy(m).double()  # deepcopy bypasses the mode: the copy stays on the device
        assert fd.on(c.weight)
        (y.sum() * 1.0).backward()
        assert fd.on(m.weight.grad)
    torch.testing.assert_close(y.detach(), m(x).detach(), rtol=0, atol=0)  # values: the plain CPU's


def test_no_effect_outside_the_block():
    before = torch.Tensor.__deepcopy__
    with FakeDevice():
        assert torch.Tensor.__deepcopy__ is not before
    assert torch.Tensor.__deepcopy__ is before
    torch.nn.Linear(3, 2)(torch.randn(4, 3))  # no mode: plain CPU
