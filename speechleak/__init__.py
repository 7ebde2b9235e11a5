"""speechleak: speech gradient inversion (keyword spotting, CTC recognition).

Plain tables only: nothing heavy is imported here.
"""
from common.preset import Preset
from common.metrics import MetricInfo

KITS = {"speech": "speechleak.kit:SpeechKit"}
CASE_MODULES = ("speechleak.cases",)
ATTACKS = {"speech-inversion": "speechleak.attack:SpeechGradientInversion"}
# The L-BFGS presets build on one another (each a few keys over the one it names).
_LBFGS = {"optimizer": "lbfgs", "precision": "float64", "init_scale": 0.0, "tv_weight": 1e-5, "iterations": 300,
          "restarts": 1}
_CTC_LBFGS = {**_LBFGS, "init_seconds_per_char": 0.066}
_CTC_TTS = {**_CTC_LBFGS, "init_tts_voice": "espeak-ng:en-us,espeak-ng:en-gb,espeak-ng:en-us+f3,espeak-ng:en-us+m3",
            "init_warp_grid": 0, "init_warp_iterations": 60, "init_warp_knots": 1}
_CTC_TTS_AVG = {**_CTC_TTS, "iterations": 150, "init_tts_average": 2, "output_time_blur": 5.0}
PRESETS = {
    "speech-li23": Preset("speech-inversion", {},
                          "Li et al. 2023: L2 gradient distance + anisotropic TV, Adam, features then Griffin-Lim"),
    "speech-ig": Preset("speech-inversion", {"distance": "cosine", "signed_grad": True, "lr": 0.05},
                        "Inverting Gradients on speech features: cosine distance, signed Adam, TV"),
    "speech-li23-layerweighted": Preset("speech-inversion", {"layer_weights": "inverse-norm"},
                                        "Li et al. 2023 with per-layer weighting (each layer's L2 term scaled by 1/||g*_l||^2)"),
    "speech-li23-refine": Preset("speech-inversion", {"refine_iterations": 300},
                                 "Li et al. 2023 + waveform refinement through the differentiable front end after Griffin-Lim"),
    "speech-lbfgs": Preset("speech-inversion", _LBFGS,
                           "Li et al. 2023 objective (L2 + TV) solved to high accuracy: zero init, TV 1e-5, float64 "
                           "L-BFGS (as Zeng & Rudzicz 2025), 300 iterations; NNLS mel inversion + Griffin-Lim"),
    "speech-ctc-lbfgs": Preset("speech-inversion", _CTC_LBFGS,
                               "speech-lbfgs for CTC recognisers (transcript known): silence start outside a centred "
                               "block of 0.066 s per transcript character (the public pool's mean TTS rate)"),
    "speech-ctc-tts": Preset("speech-inversion", _CTC_TTS,
                             "speech-ctc-lbfgs started from the attacker's own espeak-ng rendering of the granted "
                             "transcript (4 public voices; the voice, block width, centre, linear time warp and per-band "
                             "offset chosen by the matching objective) instead of a silent block"),
    "speech-ctc-tts-avg": Preset("speech-inversion", _CTC_TTS_AVG,
                                 "speech-ctc-tts with two 150-iteration searches (from the two best-aligned voices) "
                                 "averaged, then a Gaussian blur over time (sigma 5 frames) of the recovered "
                                 "features: shrinkage for the timing the update leaves uncertain (issue 21)"),
    "speech-ctc-tts-c2f": Preset("speech-inversion", {**_CTC_TTS_AVG, "iterations": 100, "output_time_blur": 8.0,
                                                      "coarse_time_factor": 8, "coarse_iterations": 50},
                                 "speech-ctc-tts-avg with each of its two searches coarse-to-fine in time (50 L-BFGS "
                                 "iterations on a residual at 1/8 of the frame rate, then 100 frame-wise: 150 per search "
                                 "as before) and a wider time blur (sigma 8 frames instead of 5); session 14, issue 21"),
    "speech-ctc-tts-c2f-f32": Preset("speech-inversion", {**_CTC_TTS_AVG, "iterations": 150, "output_time_blur": 8.0,
                                                          "coarse_time_factor": 8, "coarse_iterations": 75,
                                                          "precision": "float32"},
                                     "speech-ctc-tts-c2f in float32 with 1.5x its search iterations (75 coarse + 150 "
                                     "frame-wise per search) at about its CPU time (float32 steps cost ~2/3); session "
                                     "19, issue 21, development seeds only"),
    "speech-ctc-free": Preset("speech-inversion", {**_LBFGS, "ctc_targets": "free", "init_block_seconds": 2.9},
                              "CTC without the transcript: features and per-frame alignment optimised jointly "
                              "(soft-target loss), silence start outside a centred 2.9 s block (public pool mean)"),
    "speech-waveform": Preset("speech-inversion", {"domain": "waveform", "lr": 0.01, "tv_weight": 0.0},
                              "end-to-end: optimise the raw waveform through the front end against the gradient"),
}

_S = "speechleak.metrics:"
_INF = float("inf")
# Every key SpeechKit.score writes into a record. ``*_original`` keys score the original audio
# (the ceiling an attack is compared with); ``*_n`` keys and ``speakers_enrolled`` are counts
# (no direction). Non-finite reconstructions get the bad end of ``range`` (see common.metrics).
METRICS = (
    MetricInfo("feature_similarity", _S + "feature_similarity", "speech", ("feature_mse", "feature_cosine"),
               higher_is_better=None, range=None,
               description="feature-map MSE (lower is better) and cosine (higher is better)"),
    MetricInfo("feature_mse", _S + "feature_similarity", "speech", ("feature_mse",), higher_is_better=False,
               range=(0.0, _INF), description="feature-map mean squared error"),
    MetricInfo("feature_cosine", _S + "feature_similarity", "speech", ("feature_cosine", "mel_cosine"),
               range=(-1.0, 1.0), description="cosine of the feature map / of the mel power spectrogram"),
    MetricInfo("feature_cosine_ge90", _S + "feature_cosine_share", "speech", ("feature_cosine_ge90",), range=(0.0, 1.0),
               description="share of the batch's utterances with feature cosine >= 0.9"),
    MetricInfo("speech_region_similarity", _S + "speech_region_similarity", "speech",
               ("speech_cosine", "dynamics_cosine", "shift_cosine"), range=(-1.0, 1.0),
               description="CTC diagnostics: feature cosine over the speech frames, over their time-varying part "
                           "(per-bin mean removed), and at the best time shift (the headline stays feature_cosine)"),
    MetricInfo("snr", _S + "snr", "speech", ("snr", "si_sdr"), range=(-300.0, _INF),
               description="waveform SNR and SI-SDR in dB (Griffin-Lim phase makes these low; floor -300 dB)"),
    MetricInfo("mel_snr", _S + "spectral_snr", "speech", ("mel_snr",), range=(-300.0, _INF),
               description="SNR in dB of the recovered mel power spectrogram"),
    MetricInfo("logmel_snr", _S + "db_spectral_snr", "speech", ("logmel_snr",), range=(-300.0, _INF),
               description="SNR in dB of the recovered dB-scaled mel spectrogram (10 log10(mel + 1e-5))"),
    MetricInfo("pesq_wb", _S + "pesq_wb", "speech", ("pesq_wb", "oracle_pesq_wb"), range=(-0.5, 4.5),
               description="wide-band PESQ (pesq package)"),
    MetricInfo("pesq_wb_n", _S + "pesq_wb", "speech", ("pesq_wb_n", "oracle_pesq_wb_n"), higher_is_better=None,
               range=(0.0, _INF), description="number of examples PESQ was defined for (a count)"),
    MetricInfo("stoi", _S + "stoi", "speech", ("stoi", "oracle_stoi"), range=(-1.0, 1.0),
               description="STOI (pystoi); only where defined (>= 30 non-silent frames)"),
    MetricInfo("stoi_n", _S + "stoi", "speech", ("stoi_n", "oracle_stoi_n"), higher_is_better=None,
               range=(0.0, _INF), description="number of examples STOI was defined for (a count)"),
    MetricInfo("mcd", _S + "mcd", "speech", ("mcd",), higher_is_better=False, range=(0.0, _INF),
               description="mel-cepstral distortion in dB (c1..c24, no DTW)"),
    MetricInfo("asr_wer", _S + "word_error", "speech",
               ("asr_wer", "asr_cer", "asr_vs_original_wer", "asr_vs_original_cer", "asr_original_wer",
                "asr_original_cer"), higher_is_better=False, range=(0.0, _INF),
               description="pocketsphinx WER/CER of the reconstruction (asr_original_: of the original) "
                           "against the reference / original's transcript"),
    MetricInfo("transcript_wer", _S + "word_error", "speech", ("transcript_wer", "transcript_cer"), higher_is_better=False,
               range=(0.0, _INF), description="WER/CER of the transcript recovered by the transcript-free CTC attack"),
    MetricInfo("keyword_accuracy", _S + "keyword_accuracy", "speech", ("keyword_accuracy", "keyword_accuracy_original"),
               description="accuracy of a separately trained keyword classifier on the reconstruction (_original: on "
                           "the original)"),
    MetricInfo("speaker_top1", _S + "speaker_reid", "speech", ("speaker_top1", "speaker_top1_original"),
               description="top-1 speaker re-identification among the enrolled voices (_original: of the original)"),
    MetricInfo("speakers_enrolled", _S + "speaker_reid", "speech", ("speakers_enrolled",), higher_is_better=None,
               range=(0.0, _INF), description="number of enrolled voices for speaker re-id (chance = 1 / that)"),
    MetricInfo("speech_label_accuracy", _S + "label_accuracy", "speech", ("label_accuracy",),
               description="recovered keyword labels (multiset)"),
    MetricInfo("char_histogram", _S + "char_histogram", "speech", ("char_hist_cosine", "char_set_recall"),
               description="CTC bag-of-characters recovery from the output-bias gradient"),
)
