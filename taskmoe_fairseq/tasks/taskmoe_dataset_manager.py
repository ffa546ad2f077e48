"""fairseq's multilingual data manager, with language ids on every sentence."""

from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models import adding
from taskmoe_fairseq.modules.routing_kinds import language_index
from taskmoe_fairseq.tasks.language_id_dataset import LanguageIdDataset


class TaskMoeDatasetManager(MultilingualDatasetManager):
    """Reads fairseq's standard multilingual layout unchanged (``{split}.{src}-{tgt}.{lang}``,
    shared dictionary, language tags, temperature sampling) and wraps each pair's
    dataset in :class:`LanguageIdDataset`; ids index ``--langs``."""

    def load_a_dataset(self, split, data_path, src, src_dict, tgt, tgt_dict, combine, **kwargs):
        dataset = super().load_a_dataset(split, data_path, src, src_dict, tgt, tgt_dict, combine, **kwargs)
        return LanguageIdDataset(dataset, language_index(self.langs, src), language_index(self.langs, tgt))

    def get_data_paths_and_lang_pairs(self, split):
        """fairseq's; when languages are added (``--moe-add-langs``), training and validation read only the
        pairs that reach a new parameter (:func:`taskmoe_fairseq.models.adding.pair_trains`): the old pairs
        are frozen, so their batches would train nothing. ``--lang-pairs`` still lists every pair (the
        checkpoint records what the model serves).

        Raises:
            TaskMoeError: no pair of ``--lang-pairs`` reaches a new parameter.
        """
        paths, lang_pairs = super().get_data_paths_and_lang_pairs(split)
        training = split in (getattr(self.args, "train_subset", None), *str(getattr(self.args, "valid_subset", "")).split(","))
        if adding.added_langs(self.args) and training:
            for key, pairs in lang_pairs.items():
                kept = [pair for pair in pairs if adding.pair_trains(self.args, pair, self.langs)]
                if not kept:
                    raise usage_error(
                        f"--moe-add-langs {','.join(adding.added_langs(self.args))}: no pair of --lang-pairs "
                        f"({','.join(pairs)}) reaches a new parameter; add the new language's pairs "
                        "(with --encoder-langtok tgt / --decoder-langtok, a pair into the new language always does)"
                    )
                lang_pairs[key] = kept
        return paths, lang_pairs
