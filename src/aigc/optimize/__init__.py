"""Feedback -> better runs (docs/optimize.md): what `aigc optimize` does per modality (text.py, image.py; the
service's OPTIMIZERS), the feedback read from the store (feedback.py, no torch), the reward model and best-of-n
reranking (reward.py, rerank.py), and the before-and-after judgement (judge.py)."""
