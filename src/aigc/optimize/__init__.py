"""Feedback -> better runs (docs/optimize.md): what `aigc optimize` does per modality, the reward model and
best-of-n reranking, and the before-and-after judgement. OPTIMIZERS: the modalities optimize takes, each a
module with METHODS, TRAIN_DEFAULTS, prepare, fit and finish."""

from aigc.optimize import image, text

OPTIMIZERS = {"text": text, "image": image}
