"""Modalities: what a kind of content (text, images, series, music, video, sound) does at each stage of a run's life.

A modality is one module implementing the `Modality` protocol: its configuration sections, how it turns a
training request into data and a model (`prepare`, or `reload` to resume), how it trains and scores them,
its model card, how it loads a finished run, generates from it and evaluates it. The run lifecycle around
these stages (checks, claiming and committing the run directory, the record, failures, several
processes) is written once, in `aigc.service`. A new modality is one module here and one line in
MODALITIES (docs/design.md, "Adding a modality").

Generation returns its outputs and a record (`Generation`); writing files is the caller's choice
(`save`), as diffusers' pipelines return images and leave saving to the caller.
"""

from __future__ import annotations

from aigc.modalities import image, music, series, sound, text, video
from aigc.modalities.base import Generation, Modality, Prepared

MODALITIES: dict[str, Modality] = {"text": text, "image": image, "series": series, "music": music,
                                   "video": video, "sound": sound}

__all__ = ["MODALITIES", "Generation", "Modality", "Prepared"]
