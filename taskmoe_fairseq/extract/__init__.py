"""Extraction of a language pair's sub-network (``python -m taskmoe_fairseq.extract``).

* :mod:`.cli`           the command: read a checkpoint, extract, write checkpoints and reports
* :mod:`.assets`        the dictionaries and SentencePiece model written beside an extracted checkpoint
* :mod:`.pruning_data`  the sample of a pair's own text that ``--prune-token-experts`` counts on

The model-side steps (gates evaluated once per task, experts kept) are
:mod:`taskmoe_fairseq.models.extraction` and :mod:`taskmoe_fairseq.models.pruning`; from an
expert-parallel checkpoint, :mod:`taskmoe_fairseq.expert_parallel.sharded_extraction`.
"""

from taskmoe_fairseq.extract.cli import (  # noqa: F401
    PRUNING_OPTIONS,
    known_pairs,
    load_model,
    main,
    model_args,
    refuse_pruning_options_alone,
)
