"""``multilingual_translation_taskmoe``: fairseq's ``translation_multi_simple_epoch``
(shared dictionary, ``--lang-pairs``, ``--langs``, ``--encoder-langtok tgt`` for
the paper's ``<2xx>`` tag, ``--decoder-langtok``, temperature sampling) plus
what task-level MoE needs:

* every batch carries each sentence's source and target language ids, in
  training, validation, ``fairseq-generate`` and ``fairseq-interactive``;
* validation loss is reported per language pair (``loss_en-de``) as well as
  overall;
* bad language options stop at start-up with one line.
"""

import logging
import math

import torch
from fairseq import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.tasks.language_id_dataset import LanguageIdDataset
from taskmoe_fairseq.tasks.taskmoe_dataset_manager import TaskMoeDatasetManager

logger = logging.getLogger(__name__)

PAIR_LOSS = "pair_loss:"
PAIR_NLL_LOSS = "pair_nll_loss:"
PAIR_SAMPLE_SIZE = "pair_sample_size:"
PAIR_NTOKENS = "pair_ntokens:"


def _check_language_options(args):
    """The checks fairseq makes with asserts and tracebacks, as one-line errors."""
    if not args.lang_pairs:
        raise usage_error("--lang-pairs is required, e.g. --lang-pairs en-de,de-en,en-fr")
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else list(args.lang_pairs)
    for pair in pairs:
        if len(pair.split("-")) != 2 or not all(pair.split("-")):
            raise usage_error(f"--lang-pairs entry '{pair}' is not of the form src-tgt")
    langs = args.langs
    if langs is not None:
        missing = sorted({lang for pair in pairs for lang in pair.split("-")} - set(langs))
        if missing:
            raise usage_error(f"--lang-pairs uses {','.join(missing)}, which --langs ({','.join(langs)}) lacks; add it to --langs")
    if args.source_lang is not None or args.target_lang is not None:
        pair = f"{args.source_lang}-{args.target_lang}"
        if pair not in pairs:
            raise usage_error(
                f"unknown language pair {pair}: the model knows {','.join(pairs)}; "
                "pass --source-lang/--target-lang of one of them"
            )
    targets = {pair.split("-")[1] for pair in pairs}
    if len(targets) > 1 and args.encoder_langtok != "tgt" and not args.decoder_langtok:
        raise usage_error(
            "the data carries no target-language tag, so the model cannot tell which language to "
            "produce: add --encoder-langtok tgt (the paper's <2xx> tag) and/or --decoder-langtok"
        )
    if args.lang_tok_replacing_bos_eos:
        raise usage_error("--lang-tok-replacing-bos-eos is not supported by multilingual_translation_taskmoe; drop it")


def subset_sample(sample, rows: torch.Tensor, pad: int):
    """The sentences ``rows`` (LongTensor ``[b]``) of a collated batch."""
    batch_size = sample["id"].size(0)

    def select(value):
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch_size:
            return value.index_select(0, rows)
        if isinstance(value, dict):
            return {key: select(inner) for key, inner in value.items()}
        return value

    subset = select(sample)
    subset["nsentences"] = rows.numel()
    subset["ntokens"] = int(subset["target"].ne(pad).sum()) if subset.get("target") is not None else 0
    return subset


@register_task("multilingual_translation_taskmoe")
class MultilingualTranslationTaskMoeTask(TranslationMultiSimpleEpochTask):
    #: read by taskmoe_transformer: batches from this task carry language ids
    provides_language_ids = True

    @classmethod
    def setup_task(cls, args, **kwargs):
        _check_language_options(args)
        return super().setup_task(args, **kwargs)

    def __init__(self, args, langs, dicts, training):
        super().__init__(args, langs, dicts, training)
        # (MultilingualDatasetManager.setup_data_manager hard-codes its own class)
        self.data_manager = TaskMoeDatasetManager(args, self.lang_pairs, langs, dicts, self.sampling_method)

    def language_ids(self, src_lang: str, tgt_lang: str):
        return self.langs.index(src_lang), self.langs.index(tgt_lang)

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        dataset = super().build_dataset_for_inference(src_tokens, src_lengths, constraints)
        return LanguageIdDataset(dataset, *self.language_ids(self.args.source_lang, self.args.target_lang))

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        net_input = sample["net_input"]
        if "src_lang_id" not in net_input:
            # fairseq-interactive rebuilds net_input from src_tokens/src_lengths only.
            src_id, tgt_id = self.language_ids(self.args.source_lang, self.args.target_lang)
            batch_size = net_input["src_tokens"].size(0)
            net_input["src_lang_id"] = net_input["src_tokens"].new_full((batch_size,), src_id)
            net_input["tgt_lang_id"] = net_input["src_tokens"].new_full((batch_size,), tgt_id)
        return super().inference_step(generator, models, sample, prefix_tokens, constraints)

    def valid_step(self, sample, model, criterion):
        """Validate pair by pair (same total work), summing the logs and keeping each pair's loss."""
        net_input = sample["net_input"]
        if "src_lang_id" not in net_input:
            return super().valid_step(sample, model, criterion)
        num_langs = len(self.langs)
        pair_ids = net_input["src_lang_id"] * num_langs + net_input["tgt_lang_id"]
        total_loss, total_size, merged, per_pair = 0.0, 0, {}, {}
        # Every rank must log the same keys (fairseq all-reduces them by name), whichever pairs it saw.
        for name in self.lang_pairs:
            for prefix in (PAIR_LOSS, PAIR_NLL_LOSS, PAIR_SAMPLE_SIZE, PAIR_NTOKENS):
                per_pair[prefix + name] = 0.0
        for pair_id in pair_ids.unique().tolist():
            rows = (pair_ids == pair_id).nonzero().squeeze(1)
            loss, sample_size, log = super().valid_step(
                subset_sample(sample, rows, self.target_dictionary.pad()), model, criterion
            )
            total_loss, total_size = total_loss + loss, total_size + sample_size
            for key, value in log.items():
                merged[key] = merged.get(key, 0) + value
            name = f"{self.langs[pair_id // num_langs]}-{self.langs[pair_id % num_langs]}"
            # plain floats on every rank: fairseq reduces tensors and numbers in separate buffers
            per_pair[PAIR_LOSS + name] = float(log.get("loss", 0))
            per_pair[PAIR_NLL_LOSS + name] = float(log.get("nll_loss", 0))
            per_pair[PAIR_SAMPLE_SIZE + name] = float(log.get("sample_size", sample_size))
            per_pair[PAIR_NTOKENS + name] = float(log.get("ntokens", 0))
        merged.update(per_pair)
        return total_loss, total_size, merged

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        pairs = sorted({key[len(PAIR_LOSS):] for log in logging_outputs for key in log if key.startswith(PAIR_LOSS)})
        for pair in pairs:
            def total(prefix):
                return sum(float(log.get(prefix + pair, 0)) for log in logging_outputs)

            sample_size, ntokens = total(PAIR_SAMPLE_SIZE), total(PAIR_NTOKENS)
            # (a pair with no validation data logs nothing)
            if sample_size > 0:
                metrics.log_scalar(f"loss_{pair}", total(PAIR_LOSS) / sample_size / math.log(2), sample_size, round=3)
            if ntokens > 0:
                metrics.log_scalar(f"nll_loss_{pair}", total(PAIR_NLL_LOSS) / ntokens / math.log(2), ntokens, round=3)
