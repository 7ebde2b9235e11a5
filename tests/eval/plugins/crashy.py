"""A test plugin (loaded through GRADLEAK_PLUGINS): an attack whose process dies once.

The first time a trial with ``crash_trial == trial`` runs, it creates a marker file and
kills its own process with SIGKILL, as an out-of-memory kill or a lost node would.
"""
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from common.attack import Preset
from common.baselines import IDLG, GradientMatchingConfig


@dataclass(frozen=True)
class CrashConfig(GradientMatchingConfig):
    marker: str = ""
    sleep_s: float = 0.0


class CrashOnce(IDLG):
    info = IDLG.info.__class__("crash-once", "continuous", IDLG.info.requires, "test plugin", prior="continuous")

    @classmethod
    def default_config(cls):
        return CrashConfig(distance="l2", optimizer="lbfgs", lr=1.0, iterations=20, labels="idlg")

    def reconstruct(self, obs, model, prior, *, generator):
        import time

        time.sleep(self.config.sleep_s)
        marker = Path(self.config.marker)
        if self.config.marker and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().reconstruct(obs, model, prior, generator=generator)


ATTACKS = {"crash-once": "crashy:CrashOnce"}
PRESETS = {"crash-once": Preset("crash-once", {}, "test: dies once")}
