import os
import shutil

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flite_keyword():
    """A real 1 s keyword clip ("stop", flite slt) at 16 kHz, or skip when flite is absent."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (apt-get install flite)")
    from speechleak import data as D

    path = D.synthesize("stop", D.Voice("flite", "slt"))
    return D.trim_and_fit(D.read_wav(path), 16000)
