"""AIGC Studio: train, sample, evaluate and serve classic generative models on your own data."""

__version__ = "0.1.0"
