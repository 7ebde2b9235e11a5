"""DTW combination of search results (speechleak.multistart; a session-14 development tool, issue 21)."""
import pytest
import torch

from speechleak.multistart import dtw_average, dtw_path, warp_to


def _smooth(f: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(f, t, generator=g, dtype=torch.float64)
    k = torch.exp(-0.5 * (torch.arange(-6, 7, dtype=torch.float64) / 2.0) ** 2)
    return torch.nn.functional.conv1d(x.unsqueeze(1), (k / k.sum()).view(1, 1, -1), padding=6).squeeze(1)


def test_warp_undoes_a_time_stretch():
    """A map resampled 15 % slower and shifted is warped back onto the reference's time axis (error far below the
    unaligned one), and the path is monotone from corner to corner."""
    ref = _smooth(8, 120, 0)
    src = ((torch.arange(120, dtype=torch.float64) - 60) * 0.85 + 60 - 4).clamp(0, 119)
    i0 = src.floor().clamp(max=118).long()
    w = src - i0
    other = ref[:, i0] * (1 - w) + ref[:, i0 + 1] * w
    path = dtw_path(ref, other, band=30)
    assert path[0] == (0, 0) and path[-1] == (119, 119)
    assert all(b[0] - a[0] in (0, 1) and b[1] - a[1] in (0, 1) for a, b in zip(path, path[1:]))
    before = float((other - ref).norm())
    after = float((warp_to(ref, other, band=30) - ref)[:, 10:-10].norm())
    assert after < 0.25 * before
    avg = dtw_average([ref, other], band=30)
    assert float((avg - ref)[:, 10:-10].norm()) < 0.25 * before


def test_dtw_refuses_mismatched_maps():
    with pytest.raises(ValueError, match="same F"):
        dtw_path(torch.zeros(4, 10), torch.zeros(5, 10))
