"""What a CTranslate2 caller must do to translate like ``fairseq-generate`` on the sub-network.

fairseq's ``translation_multi_simple_epoch`` (which ``multilingual_translation_taskmoe`` extends),
without ``--lang-tok-replacing-bos-eos``:

* source: with ``--encoder-langtok tgt`` the target-language tag (``__de__``) is prepended to
  the SentencePiece pieces (``src`` prepends the source language's tag); the binarized source
  ends with ``</s>`` (CTranslate2 appends it itself: ``add_source_eos`` in its config);
* target: the decoder starts from ``</s>``; with ``--decoder-langtok`` the target tag is a forced
  first token (``prefix_tokens`` in ``inference_step``), so it is CTranslate2's
  ``target_prefix`` and is stripped from the output, as ``fairseq-generate`` strips it;
* the end token is ``</s>``; scores are natural-log probabilities (``fairseq-generate``
  prints base 2), and a hypothesis' length counts the tag and ``</s>``;
* the encoder reads at most ``max_source_positions`` tokens (fairseq's ``--max-source-positions``:
  tag, pieces and ``</s>``); fairseq refuses a longer source, CTranslate2 would truncate it.

Sources: ``fairseq/tasks/translation_multi_simple_epoch.py`` (``inference_step``),
``fairseq/data/multilingual/multilingual_data_manager.py`` and ``multilingual_utils.get_lang_tok``.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

from taskmoe_fairseq.errors import usage_error

CONVENTIONS_FILE = "taskmoe_export.json"
SPM_FILE = "spm.model"
#: fairseq's ``--max-source-positions`` default (``DEFAULT_MAX_SOURCE_POSITIONS``), also CTranslate2's
#: ``max_input_length`` default: the limit of an export whose conventions do not record it
DEFAULT_MAX_SOURCE_POSITIONS = 1024


def lang_tag(lang: str, task_args) -> str:
    """fairseq's tag for ``lang`` under the task's ``--lang-tok-style`` (``__de__`` by default)."""
    from fairseq.data.multilingual.multilingual_utils import get_lang_tok

    return get_lang_tok(lang, getattr(task_args, "lang_tok_style", "multilingual") or "multilingual")


def conventions(pair: str, task_args, source_symbols: Sequence[str], target_symbols: Sequence[str]) -> Dict:
    """The conventions of ``pair`` (``"en-de"``) under the task options it was trained with."""
    if getattr(task_args, "lang_tok_replacing_bos_eos", False):
        raise usage_error("--lang-tok-replacing-bos-eos models are not supported by the exporter")
    source, target = pair.split("-")
    encoder_langtok = getattr(task_args, "encoder_langtok", None)
    decoder_langtok = bool(getattr(task_args, "decoder_langtok", False))
    source_prefix: List[str] = []
    if encoder_langtok in ("src", "tgt"):
        source_prefix = [lang_tag(source if encoder_langtok == "src" else target, task_args)]
    target_prefix = [lang_tag(target, task_args)] if decoder_langtok else []
    for tag, symbols in [(t, source_symbols) for t in source_prefix] + [(t, target_symbols) for t in target_prefix]:
        if tag not in symbols:
            raise usage_error(f"the language tag {tag} is not in the dictionary; pass the --data-dir the model was trained on")
    return {
        "lang_pair": pair,
        "source_lang": source,
        "target_lang": target,
        "sentencepiece_model": SPM_FILE,
        "source_prefix": source_prefix,
        "source_suffix_added_by_ctranslate2": ["</s>"],
        "target_prefix": target_prefix,
        "decoder_start_token": "</s>",
        "end_token": "</s>",
        "strip_from_output": target_prefix,
        "max_source_positions": max_source_positions(task_args),
        "fairseq_options": {
            "encoder_langtok": encoder_langtok,
            "decoder_langtok": decoder_langtok,
            "lang_tok_style": getattr(task_args, "lang_tok_style", "multilingual"),
        },
        "notes": [
            "source tokens = source_prefix + SentencePiece pieces; CTranslate2 appends </s> (config add_source_eos)",
            "translate_batch(..., target_prefix=[target_prefix]); drop the first len(target_prefix) output tokens",
            "scores are natural logs; fairseq-generate prints base-2 scores and counts the tag and </s> in the length",
            "max_decoding_length counts the target prefix: fairseq's max length N (--max-len-a/b) is N here",
            "the encoder reads at most max_source_positions tokens (source_prefix + pieces + </s>); longer inputs "
            "are refused, as fairseq refuses them (CTranslate2 would truncate them at max_input_length)",
        ],
    }


def max_source_positions(task_args) -> int:
    """The most tokens the encoder reads (tags, pieces and ``</s>``): fairseq's ``--max-source-positions``."""
    return int(getattr(task_args, "max_source_positions", None) or DEFAULT_MAX_SOURCE_POSITIONS)


def source_limit(conv: Dict) -> int:
    """``max_source_positions`` of an export (:data:`DEFAULT_MAX_SOURCE_POSITIONS` for one written before it was recorded)."""
    return int(conv.get("max_source_positions") or DEFAULT_MAX_SOURCE_POSITIONS)


def source_tokens(conv: Dict, pieces: Sequence[str]) -> List[str]:
    """CTranslate2 source tokens for SentencePiece ``pieces`` (``</s>`` is added by CTranslate2)."""
    return list(conv["source_prefix"]) + list(pieces)


def target_prefix(conv: Dict) -> Optional[List[str]]:
    """CTranslate2's ``target_prefix`` for one sentence (``["__de__"]``), or None without ``--decoder-langtok``."""
    return list(conv["target_prefix"]) or None


def strip_output(conv: Dict, tokens: Sequence[str]) -> List[str]:
    """Output pieces without the forced target prefix (as ``fairseq-generate`` prints them)."""
    prefix = list(conv["strip_from_output"])
    tokens = list(tokens)
    return tokens[len(prefix):] if tokens[: len(prefix)] == prefix else tokens


def task_dictionaries(task_args, data_dir: str, pair: str) -> Tuple[List[str], List[str]]:
    """Source and target dictionary symbols (index order) exactly as the fairseq task builds them
    for ``pair`` from ``data_dir`` (language tags included), ``<pad>`` renamed ``<blank>``."""
    import fairseq.tasks

    import taskmoe_fairseq  # noqa: F401  (registers the task)

    args = copy.deepcopy(task_args)
    args.data = data_dir
    args.source_lang, args.target_lang = pair.split("-")
    try:
        task = fairseq.tasks.setup_task(args)
    except (OSError, FileNotFoundError) as error:
        raise usage_error(f"cannot read the dictionaries in {data_dir} ({error}); pass the --data-dir the model was trained on") from None

    def symbols(dictionary):
        return ["<blank>" if s == "<pad>" else s for s in dictionary.symbols]

    return symbols(task.source_dictionary), symbols(task.target_dictionary)
