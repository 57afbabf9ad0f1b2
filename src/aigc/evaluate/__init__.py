"""Metrics for generated content: text (diversity, novelty, verse form, the HTML report), images (FID, KID,
precision/recall and their floors in the project's own feature space; the families' pictures) and series (the
rolling-origin back-test). The evaluation of a run, which reads it and writes eval.json, is its modality's
(aigc.modalities)."""
