"""Translate raw text with a full, extracted or exported model (``python -m taskmoe_fairseq.translate``).

:mod:`.cli` holds the command and the library functions the server and the tests share
(:func:`load_translator`, :func:`translate_lines`).
"""

from taskmoe_fairseq.translate.cli import (  # noqa: F401
    FairseqTranslator,
    load_fairseq,
    load_spm,
    load_translator,
    main,
    translate_lines,
)
