"""``multilingual_translation_taskmoe``: fairseq's ``translation_multi_simple_epoch``
(shared dictionary, ``--lang-pairs``, ``--langs``, ``--encoder-langtok tgt`` for
the paper's ``<2xx>`` tag, ``--decoder-langtok``, temperature sampling) plus
what task-level MoE needs:

* every batch carries each sentence's source and target language ids, in
  training, validation, ``fairseq-generate`` and ``fairseq-interactive``;
* an extracted sub-network is refused, at start-up, for a pair it does not serve;
* validation and generation see every sentence: fairseq's batch sampler trims the last
  batch to a multiple of ``--required-batch-size-multiple`` (default 8), which silently drops
  sentences (13 sentences, ``--batch-size 16``: 8 translated), so outside the training split
  the multiple is 1;
* bad language options stop at start-up with one line.
"""

import inspect
import logging
import os

import torch
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from taskmoe_fairseq import compat
from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import adding
from taskmoe_fairseq.models.moe_options import check_quant_noise, check_training_backend
from taskmoe_fairseq.modules import routing_kinds
from taskmoe_fairseq.tasks.language_id_dataset import LanguageIdDataset
from taskmoe_fairseq.tasks.taskmoe_dataset_manager import TaskMoeDatasetManager

logger = logging.getLogger(__name__)


def _as_list(value):
    """``--langs`` / ``--lang-pairs`` as a list: a list as given, or the command line's comma form
    (``"en,de,fr"``, as the hub's keyword arguments pass it: ``from_pretrained(..., langs="en,de")``)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return None if value is None else list(value)


def _check_language_options(args):
    """The checks fairseq makes with asserts and tracebacks, as one-line errors; ``--langs`` and
    ``--lang-pairs`` become lists (fairseq's ``csv_str_list`` would have split the command line's)."""
    args.langs, args.lang_pairs = _as_list(args.langs), _as_list(args.lang_pairs)
    if not args.lang_pairs:
        raise usage_error("--lang-pairs is required, e.g. --lang-pairs en-de,de-en,en-fr")
    pairs = args.lang_pairs
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
        known = set(langs if langs is not None else [lang for p in pairs for lang in p.split("-")])
        if pair not in pairs and not (args.source_lang in known and args.target_lang in known):
            raise usage_error(
                f"unknown language pair {pair}: the model knows {','.join(pairs)} "
                f"(and zero-shot pairs between {','.join(sorted(known))}); pass --source-lang/--target-lang of one of them"
            )
        if pair not in pairs:
            logger.warning("%s is zero-shot: not among --lang-pairs; the routing's source/target tasks serve it", pair)
    targets = {pair.split("-")[1] for pair in pairs}
    if len(targets) > 1 and args.encoder_langtok != "tgt" and not args.decoder_langtok:
        raise usage_error(
            "the data carries no target-language tag, so the model cannot tell which language to "
            "produce: add --encoder-langtok tgt (the paper's <2xx> tag) and/or --decoder-langtok"
        )
    if args.lang_tok_replacing_bos_eos:
        raise usage_error("--lang-tok-replacing-bos-eos is not supported by multilingual_translation_taskmoe; drop it")


def _check_takes_language_ids(model, args):
    """Every batch of this task carries ``src_lang_id``/``tgt_lang_id`` in its ``net_input``."""
    if "src_lang_id" not in inspect.signature(model.forward).parameters:
        arch = getattr(args, "arch", None) or getattr(args, "_name", None) or type(model).__name__
        raise usage_error(
            f"--arch {arch} takes no language ids, which every batch of --task multilingual_translation_taskmoe "
            "carries: use --arch taskmoe_transformer (or taskmoe_transformer_small, taskmoe_transformer_tiny; with "
            "--encoder-moe-freq 0 --decoder-moe-freq 0 it is exactly fairseq's transformer)"
        )


@register_task("multilingual_translation_taskmoe")
class MultilingualTranslationTaskMoeTask(TranslationMultiSimpleEpochTask):
    #: read by taskmoe_transformer: batches from this task carry language ids
    provides_language_ids = True

    @classmethod
    def setup_task(cls, args, **kwargs):
        _check_language_options(args)
        data = getattr(args, "data", None)
        if isinstance(data, str) and data:
            # absolute, as the checkpoint records it: translate, serve and extract read the data folder
            # from there, whatever folder they run in (a relative one found nothing, or another dataset)
            args.data = os.pathsep.join(os.path.abspath(part) for part in data.split(os.pathsep))
        return super().setup_task(args, **kwargs)

    def __init__(self, args, langs, dicts, training):
        super().__init__(args, langs, dicts, training)
        # (MultilingualDatasetManager.setup_data_manager hard-codes its own class)
        self.data_manager = TaskMoeDatasetManager(args, self.lang_pairs, langs, dicts, self.sampling_method)

    def pairs_given(self):
        """``--lang-pairs`` as a list (fairseq's ``self.lang_pairs`` is only the ``-s``/``-t`` pair at inference)."""
        pairs = self.args.lang_pairs
        return pairs.split(",") if isinstance(pairs, str) else list(pairs)

    def language_ids(self, src_lang: str, tgt_lang: str):
        return routing_kinds.language_index(self.langs, src_lang), routing_kinds.language_index(self.langs, tgt_lang)

    def build_model(self, args, from_checkpoint=False):
        """fairseq's; a model that takes no language ids (``--arch transformer``: its ``forward``
        would fail on the first batch with a ``TypeError``), a training backend the gates cannot
        keep float32 in (``--ddp-backend fully_sharded``) or a pair it cannot serve stops with one line.

        ``from_checkpoint`` (fairseq's ``load_model_ensemble``: generate, interactive, the hub): the
        random initialisation the checkpoint overwrites draws from a fork of torch's CPU generator
        (``torch.random.fork_rng``), so the stream ``fairseq-generate --seed`` set is the same
        afterwards for a full and an extracted model (they draw different numbers of initial
        weights) and ``--sampling`` samples the same tokens. Training (a new model) draws from the
        stream as fairseq does, and gets the trainer's shims it needs
        (:func:`taskmoe_fairseq.compat.apply_for_training`: the resume checks; the DDP settings on
        several ranks; expert parallelism with ``--moe-expert-parallel-size`` > 1)."""
        if from_checkpoint:
            with torch.random.fork_rng(devices=[]):
                model = super().build_model(args, from_checkpoint)
        else:  # training (fairseq-train builds the model, then FSDP or DDP wraps it)
            check_training_backend(args)
            check_quant_noise(args)
            model = super().build_model(args, from_checkpoint)
            if adding.added_langs(getattr(model, "args", args)):  # adding languages: only the new parameters train
                adding.freeze_for_adding(model)
            # the trainer's shims this run needs, before fairseq-train builds its Trainer
            compat.apply_for_training(args)
        _check_takes_language_ids(model, args)
        router = getattr(getattr(model, "encoder", None), "moe_router", None)
        if router is None or not (self.args.source_lang and self.args.target_lang):
            return model
        pair = f"{self.args.source_lang}-{self.args.target_lang}"
        if pair not in self.pairs_given() and router.routes_by_pair():
            raise usage_error(
                f"{pair} is not among --lang-pairs and this model routes by language pair: its gate never saw "
                f"{pair} (zero-shot works with source or target routing); pass one of {','.join(self.pairs_given())}"
            )
        if router.extracted_tasks:
            # fail before translating anything; the router checks every batch as well
            src, tgt = self.language_ids(self.args.source_lang, self.args.target_lang)
            router.check_pair(torch.tensor([src]), torch.tensor([tgt]))
        return model

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        """fairseq's, taking ``prefix_allowed_tokens_fn`` as the hub interface passes it."""
        if prefix_allowed_tokens_fn is not None:
            extra_gen_cls_kwargs = dict(extra_gen_cls_kwargs or {}, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)
        return super().build_generator(models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra_gen_cls_kwargs)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        pair = f"{self.args.source_lang}-{self.args.target_lang}"
        if not self.training and self.args.source_lang and pair not in self.pairs_given():
            raise usage_error(
                f"{pair} is zero-shot: --lang-pairs has no {split} data for it; translate raw text with "
                f"fairseq-interactive, or add {pair} to --lang-pairs with data binarized for it"
            )
        return super().load_dataset(split, epoch, combine, **kwargs)

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's, with ``required_batch_size_multiple`` 1 for every dataset but the training split."""
        training = dataset is self.datasets.get(getattr(self.args, "train_subset", "train"))
        if not training:
            if len(args) >= 5:  # (dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs, multiple)
                args = args[:4] + (1,) + args[5:]
            elif kwargs.get("required_batch_size_multiple", 1) != 1:
                kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, *args, **kwargs)

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
