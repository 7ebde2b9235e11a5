"""Speech cases (pure data). Clip lengths and front-end resolution are stated in the options."""
from common.case import Case
from common.threat import HONEST, HONEST_WITH_LABELS
from common.types import FLProtocol

#: Case options the speech kit reads (``--option KEY=VALUE``).
OPTIONS = frozenset({"task", "features", "seconds", "stage", "train_epochs", "channels", "hidden", "act",
                     "num_classes", "dim", "max_chars", "fixed_keywords", "feature_max", "oracle", "score_asr",
                     "frontend"})
#: The speech kit builds its model from the options (task, channels ...); ``--model`` would be ignored.
TAKES_MODEL = False

_KWS = "synthetic keywords (10 Speech Commands words, 8 flite/espeak-ng voices x 3 rate/pitch variants), 1 s, 16 kHz"


def _kws(name, features, *, protocol=None, stage="init", desc="", act="sigmoid", **extra):
    return Case(name, "speech", "kws-cnn", "synthetic-keywords", protocol or FLProtocol("fedsgd", batch_size=1), HONEST,
                options={"task": "kws", "features": features, "seconds": 1.0, "stage": stage, "act": act, **extra},
                description=f"{desc}KWS CNN (conv8-conv16-fc64, {act}) on {features} ({_KWS}); labels recovered from the gradient")


CASES = {
    "speech/kws-mel/fedsgd": _kws("speech/kws-mel/fedsgd", "mel", desc="Li et al. 2023 setting, mel front end: "),
    "speech/kws-mfcc/fedsgd": _kws("speech/kws-mfcc/fedsgd", "mfcc", desc="Li et al. 2023 setting, MFCC front end: "),
    "speech/kws-mel-relu/fedsgd": _kws("speech/kws-mel-relu/fedsgd", "mel", act="relu", desc="ReLU variant: "),
    "speech/kws-mel/fedsgd-trained": _kws("speech/kws-mel/fedsgd-trained", "mel", stage="trained",
                                          desc="trained model (15 epochs on the keyword pool): "),
    # training-stage sweep on the ReLU model (the sigmoid model does not leave chance level in 15 epochs)
    "speech/kws-mel-relu/fedsgd-mid": _kws("speech/kws-mel-relu/fedsgd-mid", "mel", act="relu", stage="trained",
                                           train_epochs=2, desc="ReLU variant, mid-training (2 epochs on the keyword pool): "),
    "speech/kws-mel-relu/fedsgd-trained": _kws("speech/kws-mel-relu/fedsgd-trained", "mel", act="relu", stage="trained",
                                               train_epochs=30,
                                               desc="ReLU variant, trained (30 epochs on the keyword pool): "),
    "speech/kws-mel/fedavg": _kws("speech/kws-mel/fedavg", "mel",
                                  protocol=FLProtocol("fedavg", batch_size=2, local_epochs=1, local_batch_size=1,
                                                      local_lr=0.01, shuffle=False),
                                  desc="FedAvg (2 local SGD steps, lr 0.01): "),
    "speech/ctc-mel/fedsgd": Case(
        "speech/ctc-mel/fedsgd", "speech", "ctc-conformer-lite", "rt-sentences", FLProtocol("fedsgd", batch_size=1),
        HONEST_WITH_LABELS, options={"task": "ctc", "features": "mel", "seconds": 4.0, "stage": "init"},
        description="CTC recogniser (2 strided convs + 1 attention block) on Rotten Tomatoes sentences "
                    "(flite, <= 60 characters), 4 s, transcripts granted (Dang et al. 2022 setting)"),
    "speech/ctc-mel/fedsgd-trained": Case(
        "speech/ctc-mel/fedsgd-trained", "speech", "ctc-conformer-lite", "rt-sentences", FLProtocol("fedsgd", batch_size=1),
        HONEST_WITH_LABELS, options={"task": "ctc", "features": "mel", "seconds": 4.0, "stage": "trained", "train_epochs": 500},
        description="CTC recogniser trained on the sentence pool (500 epochs of Adam: greedy WER ~0 on the pool's "
                    "originals, i.e. the attacked clips were in its training data), 4 s, transcripts granted"),
    "speech/ctc-mel/fedsgd-notext": Case(
        "speech/ctc-mel/fedsgd-notext", "speech", "ctc-conformer-lite", "rt-sentences", FLProtocol("fedsgd", batch_size=1),
        HONEST, options={"task": "ctc", "features": "mel", "seconds": 4.0, "stage": "init"},
        description="CTC recogniser, 4 s Rotten Tomatoes sentences, transcripts NOT granted (use speech-ctc-free)"),
    "speech/ctc-mel/fedavg": Case(
        "speech/ctc-mel/fedavg", "speech", "ctc-conformer-lite", "rt-sentences",
        FLProtocol("fedavg", batch_size=2, local_epochs=1, local_batch_size=1, local_lr=0.01, shuffle=False),
        HONEST_WITH_LABELS, options={"task": "ctc", "features": "mel", "seconds": 4.0, "stage": "init"},
        description="CTC recogniser, FedAvg (2 local SGD steps of one utterance each, lr 0.01), 4 s Rotten Tomatoes "
                    "sentences, transcripts granted"),
}
