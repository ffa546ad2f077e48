"""The sample a pair's token-routed layers are pruned on (``extract --prune-token-experts``).

``--pruning-data`` is either a split of the binarized data folder (``valid``, the default,
``train``, ``test``: fairseq's ``{split}.{src}-{tgt}.{lang}`` files, read by the model's own
task, ``multilingual_translation_taskmoe``, with its language tags), whose first N sentence
pairs are run teacher-forced through the model, or a UTF-8 text file of source sentences, one
a line (encoded with the data folder's ``spm.model`` and dictionary as
``taskmoe_fairseq.translate`` does, run through the encoder only: enough when only encoder
layers route per token).
"""

import copy
import os
from typing import Dict, List, Tuple

import torch

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.checkpoint_config import saved_options

BATCH_SENTENCES = 32


def task_for_pair(checkpoint: dict, pair: str, data_dir: str):
    """The checkpoint's fairseq task (its ``cfg.task``, or legacy ``args``) set up for ``pair``
    on ``data_dir`` (fairseq's ``tasks.setup_task``, as ``fairseq-generate`` does)."""
    from fairseq import tasks

    task_args = saved_options(checkpoint)[1]
    if task_args is None:
        raise usage_error("the checkpoint records no task options, so its data cannot be read; pass --pruning-data FILE")
    task_args = copy.deepcopy(task_args)
    source, target = pair.split("-")
    task_args.data = data_dir
    task_args.source_lang, task_args.target_lang = source, target
    return tasks.setup_task(task_args)


def split_files(data_dir: str, split: str, pair: str) -> List[str]:
    """The index files of ``split`` for ``pair`` that fairseq would read (either direction's prefix)."""
    source, target = pair.split("-")
    found = []
    for prefix in (f"{split}.{source}-{target}", f"{split}.{target}-{source}"):
        files = [os.path.join(data_dir, f"{prefix}.{lang}.idx") for lang in (source, target)]
        if all(os.path.isfile(f) for f in files):
            found = files
            break
    return found


def _collate(dataset, indices: List[int]) -> List[Dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(indices), BATCH_SENTENCES):
        sample = dataset.collater([dataset[i] for i in indices[start:start + BATCH_SENTENCES]])
        if sample:
            batches.append(sample["net_input"])
    return batches


def read_text(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as stream:
            return [line.strip() for line in stream if line.strip()]
    except UnicodeDecodeError as error:
        raise usage_error(f"--pruning-data {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise usage_error(f"--pruning-data {path}: cannot read it ({error.strerror})") from None


def pair_sample(checkpoint: dict, pair: str, data_dir: str, spec: str, sentences: int) -> Tuple[List[dict], dict]:
    """``(batches, description)``: up to ``sentences`` sentences of ``pair`` from ``spec`` (a text
    file, else a split of ``data_dir``) as fairseq ``net_input`` dicts (``src_tokens`` ``[B, S]``,
    ``src_lengths``, ``src_lang_id``/``tgt_lang_id`` ``[B]``, and ``prev_output_tokens``
    ``[B, T]`` for a split), batches of at most 32 sentences in file order.

    Raises:
        TaskMoeError: neither a file nor a split of ``data_dir`` for ``pair``; no sentence.
    """
    if sentences < 1:
        raise usage_error(f"--pruning-sentences must be at least 1, got {sentences}")
    source, _ = pair.split("-")
    if os.path.isfile(spec):
        lines = read_text(spec)[:sentences]
        if not lines:
            raise usage_error(f"--pruning-data {spec} has no sentence; pass a file of {source} sentences or a split (valid)")
        task = task_for_pair(checkpoint, pair, data_dir)
        spm_path = os.path.join(data_dir, "spm.model")
        if not os.path.isfile(spm_path):
            raise usage_error(f"--pruning-data {spec} is text, but {data_dir} has no spm.model to encode it; pass --data-dir")
        from taskmoe_fairseq.translate import load_spm

        sp = load_spm(spm_path)
        dictionary = task.source_dictionary
        tokens = [
            dictionary.encode_line(" ".join(sp.encode(line, out_type=str)), add_if_not_exist=False, append_eos=True).long()
            for line in lines
        ]
        dataset = task.build_dataset_for_inference(tokens, [t.numel() for t in tokens])
        batches = _collate(dataset, list(range(len(tokens))))
        return batches, {"data": os.path.abspath(spec), "kind": "source text", "sentences": len(tokens)}
    if os.sep in spec or spec.endswith(".txt"):
        raise usage_error(f"--pruning-data {spec}: no such file; pass a file of {source} sentences or a split of the data (valid)")
    if not split_files(data_dir, spec, pair):
        raise usage_error(
            f"--pruning-data {spec}: {data_dir} has no {spec} split for {pair} ({spec}.{pair}.{source}.idx); "
            f"pass another split (valid, train, test), a file of {source} sentences, or --data-dir"
        )
    task = task_for_pair(checkpoint, pair, data_dir)
    task.load_dataset(spec)
    dataset = task.dataset(spec)
    count = min(sentences, len(dataset))
    batches = _collate(dataset, list(range(count)))
    return batches, {"data": os.path.join(os.path.abspath(data_dir), spec), "kind": "split", "sentences": count}
