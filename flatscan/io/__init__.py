"""Input: loading models (:mod:`.models`, transformers classifiers in :mod:`.hf_transformers`) and evaluation data
(:mod:`.data`)."""
