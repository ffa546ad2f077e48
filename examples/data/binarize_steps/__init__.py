"""The steps of ``binarize.py`` that are more than a few lines: ``sentencepiece_model`` (the
shared model and fairseq dictionary) and ``fairseq_preprocess`` (running fairseq-preprocess)."""
