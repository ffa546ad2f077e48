"""fairseq's multilingual data manager, with language ids on every sentence."""

from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager

from taskmoe_fairseq.modules.routing_kinds import language_index
from taskmoe_fairseq.tasks.language_id_dataset import LanguageIdDataset


class TaskMoeDatasetManager(MultilingualDatasetManager):
    """Reads fairseq's standard multilingual layout unchanged (``{split}.{src}-{tgt}.{lang}``,
    shared dictionary, language tags, temperature sampling) and wraps each pair's
    dataset in :class:`LanguageIdDataset`; ids index ``--langs``."""

    def load_a_dataset(self, split, data_path, src, src_dict, tgt, tgt_dict, combine, **kwargs):
        dataset = super().load_a_dataset(split, data_path, src, src_dict, tgt, tgt_dict, combine, **kwargs)
        return LanguageIdDataset(dataset, language_index(self.langs, src), language_index(self.langs, tgt))
