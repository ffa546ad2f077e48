"""Puts each sentence's language ids into the batch, for task routing."""

import torch
from fairseq.data import BaseWrapperDataset


class LanguageIdDataset(BaseWrapperDataset):
    """Wraps one language pair's ``LanguagePairDataset``; its batches carry
    ``net_input["src_lang_id"]`` and ``net_input["tgt_lang_id"]`` (LongTensor ``[B]``).

    The ids travel with every sample rather than with the dataset, because
    fairseq's multilingual sampler collates a batch that mixes pairs with the
    first pair's collater (fairseq's own ``--enable-lang-ids`` would then label
    every sentence with the first pair's languages).
    """

    def __init__(self, dataset, src_lang_id: int, tgt_lang_id: int):
        super().__init__(dataset)
        self.src_lang_id = src_lang_id
        self.tgt_lang_id = tgt_lang_id

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        sample["src_lang_id"] = self.src_lang_id
        sample["tgt_lang_id"] = self.tgt_lang_id
        return sample

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        # The inner collater sorts by source length; give each sample its position
        # as id, so the collated ids tell us the order, then restore the real ids.
        renumbered = [dict(sample, id=position) for position, sample in enumerate(samples)]
        batch = self.dataset.collater(renumbered)
        if len(batch) == 0:
            return batch
        order = batch["id"]
        batch["id"] = torch.tensor([sample["id"] for sample in samples], dtype=torch.long)[order]
        for key in ("src_lang_id", "tgt_lang_id"):
            batch["net_input"][key] = torch.tensor([sample[key] for sample in samples], dtype=torch.long)[order]
        return batch
