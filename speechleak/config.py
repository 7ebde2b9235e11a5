"""The frozen configuration of :class:`speechleak.attack.SpeechGradientInversion` (Li et al. 2023
defaults; every field's deviation or addition is commented) and the attacker-TTS voice list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = ["TTS_ENGINES", "SpeechInversionConfig", "tts_voices"]


#: speech synthesisers an attacker's TTS start may name (``init_tts_voice``)
TTS_ENGINES = ("espeak-ng", "flite")


def tts_voices(spec: str) -> list[str]:
    """The voices of a comma-separated ``init_tts_voice`` ("" = none)."""
    return [v.strip() for v in spec.split(",") if v.strip()]


@dataclass(frozen=True)
class SpeechInversionConfig:
    RANGES: ClassVar[dict[str, str]] = {  # checked by common.attack.validate_config
        "layer_decay": "(0,1]", "lr": ">0", "iterations": ">=1", "restarts": ">=1",
        "griffin_lim_iters": ">=1", "init_seconds_per_char": ">=0", "init_warp_iterations": ">=0",
        "init_warp_knots": ">=1", "init_warp_grid": ">=0", "init_tts_average": ">=1", "refine_first_layer_steps": ">=0",
        "refine_first_layer_ridge": ">0", "refine_first_layer_margin": ">=0", "output_time_blur": ">=0",
        "coarse_time_factor": ">=1", "coarse_iterations": ">=0", "search_threads": ">=1"}
    distance: Literal["l2", "cosine", "layer-cosine"] = "l2"
    layer_weights: Literal["uniform", "inverse-norm", "depth-decay"] = "uniform"
    layer_decay: float = 0.8  # depth-decay: weight of layer l is decay**l (input layers heaviest)
    domain: Literal["features", "waveform"] = "features"
    optimizer: Literal["adam", "lbfgs"] = "adam"
    precision: Literal["float32", "float64"] = "float32"  # float64 lets L-BFGS reach relative gradient distances ~1e-10
    lr: float = 0.1
    iterations: int = 2000
    restarts: int = 4
    lr_schedule: bool = True  # x0.1 at 3/8, 5/8, 7/8 of the iterations (as Inverting Gradients)
    signed_grad: bool = False
    tv_weight: float = 1e-2  # anisotropic TV over (freq, time), Li et al. (weight not published; 1e-2 measured best of 1e-4, 1e-3, 1e-2)
    smooth_weight: float = 0.0  # squared first differences over time (smoothness prior)
    init_scale: float = 0.5
    # CTC, transcript known: start from the mel floor (silence) outside a centred block of
    # len(transcript) * init_seconds_per_char (clips are centred, a public protocol fact); breaks
    # the time-shift symmetry of silence-padded clips (the model has no positional encoding). 0 = off.
    init_seconds_per_char: float = 0.0
    # CTC, transcript known: fill that block with the attacker's own TTS rendering of the transcript
    # ("engine:name", e.g. "espeak-ng:en-us"; "" = off), aligned first by init_warp_iterations of L-BFGS
    # over a few warp parameters (block centre and width, a monotone time warp of init_warp_knots
    # segments, a per-band offset) against the same matching objective (our addition, issue 21).
    init_tts_voice: str = ""
    init_warp_iterations: int = 0
    init_warp_knots: int = 1  # 1 = linear (measured >= 8 segments on development clips)
    # before that L-BFGS: a grid of init_warp_grid block widths (0.6-1.4x the rate prior's) x 5 centres
    # (within ±5 % of the clip) scored by the objective, the best kept (the warp landscape is rugged); 0 = off
    init_warp_grid: int = 0
    # with several TTS voices: run the search from the init_tts_average voices of lowest objective after their
    # alignment (one full search each) and average the searched features (the different voices' errors are
    # partly independent); 1 = one search from the best voice (our addition, issue 21)
    init_tts_average: int = 1
    # CTC transcript: "observed" (granted, Dang et al.) or "free" (not granted: the per-frame
    # alignment γ = softmax(a) is optimised jointly with the features through the soft-target loss
    # −Σ γ·log p, whose logit gradient p − γ equals CTC's at the true occupancy; decoded greedily).
    ctc_targets: Literal["observed", "free"] = "observed"
    init_block_seconds: float = 0.0  # free transcript: centred speech block of this length (0 = off)
    # CTC, FedSGD: after the search, steps of the first-layer fixed point (ctc.first_layer_refine): the input
    # solved in closed form from conv1's weight gradient with its output error taken at the current estimate,
    # frames outside the start's speech block (± margin frames) held at the floor; 0 = off (our addition, issue 21)
    refine_first_layer_steps: int = 0
    refine_first_layer_ridge: float = 1.0
    refine_first_layer_margin: int = 8
    # features domain: after the search (and any averaging), a Gaussian blur over time of this many frames (σ) of the
    # recovered features before the waveform stage; a shrinkage for the timing the update leaves uncertain
    # (speechleak.ctc.time_blur; our addition, issue 21); 0 = off
    output_time_blur: float = 0.0
    # features domain: before each search, coarse_iterations of the same optimiser over a residual of the start held at
    # 1/coarse_time_factor of the frame rate (linearly interpolated over time), so the slow (timing) components move
    # first; then the usual iterations frame by frame (coarse-to-fine; our addition, issue 21); 0 / 1 = off
    coarse_time_factor: int = 1
    coarse_iterations: int = 0
    # run the attacker-TTS voices' alignments and the init_tts_average searches (independent jobs) on up to this many
    # Python threads at once, each with its own model copy and torch threads // search_threads intra-op threads
    # (speechleak.search.run_concurrently; session 19): the same results bit for bit at one intra-op thread, less wall
    # time on idle cores; 1 = one after another
    search_threads: int = 1
    labels: Literal["observed", "recover"] = "recover"
    griffin_lim_iters: int = 100
    mel_inversion: Literal["nnls", "lstsq"] = "nnls"  # mel -> linear before Griffin-Lim (see FrontEnd.mel_to_linear)
    refine_iterations: int = 0  # waveform refinement through the front end after Griffin-Lim
    batched: bool = True

    def __post_init__(self) -> None:
        if self.init_tts_voice and not tts_voices(self.init_tts_voice):
            raise ValueError(f"init_tts_voice {self.init_tts_voice!r} names no voice; use e.g. init_tts_voice=espeak-ng:en-us")
        for voice in tts_voices(self.init_tts_voice):  # refused when the config is made, not mid-attack
            engine, _, name = voice.partition(":")
            if engine not in TTS_ENGINES or not name:
                raise ValueError(f"init_tts_voice {voice!r}: use comma-separated 'engine:name' voices with engine one of "
                                 f"{', '.join(TTS_ENGINES)}, e.g. init_tts_voice=espeak-ng:en-us")
