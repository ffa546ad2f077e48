"""The files a checkpoint needs besides its weights, kept beside it so it works on its own.

fairseq's hub archives keep ``dict.*.txt`` (and the BPE model) beside ``model.pt`` and load with
``data_name_or_path="."`` (``fairseq.hub_utils.from_pretrained``): the checkpoint's folder is its
data folder. ``python -m taskmoe_fairseq.extract`` follows that convention: beside its output it
writes, from the data folder the model was trained on,

* ``dict.<lang>.txt`` for every language of the model (what ``translation_multi_simple_epoch``'s
  ``MultilingualDatasetManager.load_all_dictionaries`` reads: ``<data>/dict.<lang>.txt``);
* ``spm.model``, the SentencePiece model of ``examples/data/binarize.py`` (when the data folder
  has one).

``python -m taskmoe_fairseq.translate``, ``python -m taskmoe_fairseq.serve`` and
``TaskMoeTransformerModel.from_pretrained`` then find them there (:func:`data_dir_for`) when the
data folder is gone or moved. A full checkpoint of ``fairseq-train`` keeps only the path
``cfg.task.data``; it needs that folder (or ``--data-dir``).
"""

import filecmp
import logging
import os
from typing import Dict, Iterable, List, Optional, Tuple

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.files import atomic_copy
from taskmoe_fairseq.models.checkpoint_config import saved_options

SPM_MODEL = "spm.model"

logger = logging.getLogger(__name__)


def dictionary_name(lang: str) -> str:
    """``dict.<lang>.txt``, the file fairseq's multilingual data manager reads for ``lang``."""
    return f"dict.{lang}.txt"


def recorded_data_dir(state: dict) -> Optional[str]:
    """The data folder a checkpoint was trained on (``cfg.task.data``, or the legacy ``args.data``),
    first path only (fairseq's ``a:b:c`` sharded paths); None if it records none."""
    model, task = saved_options(state)  # cfg["model"], cfg["task"], each else the legacy args
    for source in (task, model):
        data = source.get("data") if isinstance(source, dict) else getattr(source, "data", None)
        if isinstance(data, str) and data:
            return data if os.path.isdir(data) else data.split(os.pathsep)[0]
    return None


def model_languages(args) -> Tuple[List[str], List[str]]:
    """``(required, optional)`` languages of a model's legacy args: those of its ``--lang-pairs``
    (fairseq-train loaded their dictionaries, so the data folder has them) and the other
    ``--langs`` (zero-shot pairs between them need their dictionary where the data has one)."""
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else list(args.lang_pairs or [])
    required = list(dict.fromkeys(lang for pair in pairs for lang in pair.split("-")))
    optional = [lang for lang in (getattr(args, "taskmoe_langs", None) or []) if lang not in required]
    return required, optional


def needed_files(langs: Iterable[str]) -> List[str]:
    """The dictionaries a model of languages ``langs`` loads from its data folder, and the
    SentencePiece model: the file names :func:`plan_copies` writes."""
    return [dictionary_name(lang) for lang in langs] + [SPM_MODEL]


def has_assets(folder: str, langs: Iterable[str]) -> bool:
    """Whether ``folder`` holds the dictionary of every language in ``langs``."""
    return all(os.path.isfile(os.path.join(folder, dictionary_name(lang))) for lang in langs)


def plan_copies(data_dir: str, out_dir: str, langs: Iterable[str], optional_langs: Iterable[str] = (),
                force: bool = False) -> Dict[str, str]:
    """``{destination: source}`` for the files of ``langs`` (and of ``optional_langs`` where the data
    folder has their dictionary) to put in ``out_dir``, checked before
    anything is written: a destination that already holds the same bytes is left out; a different
    file there is refused unless ``force``; a folder or other non-file there is always refused.
    A data folder without ``spm.model`` (another tokenizer) gives the dictionaries only.

    Raises:
        TaskMoeError: the data folder or one of its dictionaries is missing, or a destination
            is taken (see above).
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise usage_error(
            f"data folder {data_dir!r} not found: the dictionaries and spm.model are copied from it beside "
            "the output; pass --data-dir (the binarized data the model was trained on)"
        )
    copies = {}
    optional = [dictionary_name(lang) for lang in optional_langs]
    for name in needed_files(langs) + optional:
        source = os.path.join(data_dir, name)
        if not os.path.isfile(source):
            if name == SPM_MODEL or name in optional:
                continue
            raise usage_error(f"{source} not found: {data_dir} is not the model's data folder; pass --data-dir")
        destination = os.path.join(out_dir, name)
        if os.path.lexists(destination):
            if not os.path.isfile(destination) or os.path.islink(destination):
                raise usage_error(f"{destination} exists and is not a regular file; remove it or choose another output folder")
            if filecmp.cmp(source, destination, shallow=False):
                continue
            # not the model's file (another data folder's, the user's): never replaced, --force or not
            raise usage_error(f"{destination} exists with other content than the model's {name}; extract never replaces "
                              "a file it did not write, even with --force: choose another output folder or remove it")
        copies[destination] = source
    return copies


def write_copies(copies: Dict[str, str]):
    """Copy each planned file atomically (``taskmoe_fairseq.files.atomic_copy``)."""
    for destination, source in copies.items():
        atomic_copy(source, destination)


def data_dir_for(checkpoint: str, recorded: Optional[str], langs: Iterable[str], data_dir: Optional[str] = None) -> str:
    """The folder to load ``checkpoint``'s dictionaries from, as an absolute path:

    1. ``data_dir`` when given;
    2. the checkpoint's own folder when it holds the dictionaries of ``langs`` (an extracted
       checkpoint: extract wrote them there, with ``spm.model``);
    3. ``recorded``, the data folder of training (:func:`recorded_data_dir`).

    Raises:
        TaskMoeError: none of them exists (the line says to pass --data-dir).
    """
    if data_dir:
        if not os.path.isdir(data_dir):
            raise usage_error(f"--data-dir {data_dir} is not a folder; pass the binarized data with the dictionaries")
        return os.path.abspath(data_dir)
    beside = os.path.dirname(os.path.abspath(checkpoint))
    if has_assets(beside, langs):
        return beside
    if recorded and os.pathsep in recorded and not os.path.isdir(recorded):
        recorded = recorded.split(os.pathsep)[0]  # fairseq's sharded data paths
    if recorded and os.path.isdir(recorded):
        return os.path.abspath(recorded)
    raise usage_error(
        f"data folder {recorded!r} not found and {beside} lacks the dictionaries "
        f"({', '.join(dictionary_name(lang) for lang in langs)}); pass --data-dir (the binarized data with the dictionaries), "
        "or extract the model (python -m taskmoe_fairseq.extract writes them beside it)"
    )


def plan_beside_outputs(state: dict, args, outputs: Iterable[Optional[str]], data_dir: Optional[str] = None,
                        force: bool = False) -> Dict[str, str]:
    """:func:`plan_copies` into the folder of every output checkpoint (None entries: nothing is
    written), from ``data_dir`` or the data folder the checkpoint ``state`` records, for the
    languages of the model's legacy ``args`` (:func:`model_languages`).

    A checkpoint that records no data folder (a model built in code) gets no copies: a warning.

    Raises:
        TaskMoeError: as :func:`plan_copies`.
    """
    folders = sorted({os.path.dirname(os.path.abspath(path)) for path in outputs if path})
    if not folders:
        return {}
    required, optional = model_languages(args)
    source = data_dir or recorded_data_dir(state)
    if source is None:  # a model built in code, not trained by fairseq-train on a data folder
        logger.warning("the checkpoint records no data folder and no --data-dir was given: the output holds no "
                       "dictionaries or spm.model, so translating it needs --data-dir")
        return {}
    copies = {}
    for folder in folders:
        copies.update(plan_copies(source, folder, required, optional, force=force))
    return copies
