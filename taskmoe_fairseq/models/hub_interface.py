"""``TaskMoeTransformerModel.from_pretrained(...)``: fairseq's hub interface for TaskMoE checkpoints.

fairseq's ``GeneratorHubInterface`` decodes hypotheses with ``tgt_dict.string``,
which keeps the target-language tag that ``--decoder-langtok`` forces as the first
output token (fairseq-generate strips it through the generator's
``symbols_to_strip_from_output``). This interface strips every language tag of the
model's languages, so ``hub.translate(["..."])`` returns plain text, for full and
extracted checkpoints alike (an extracted one raises :class:`TaskMoeError` for a
pair it does not serve).
"""

from fairseq.hub_utils import GeneratorHubInterface


class TaskMoeHubInterface(GeneratorHubInterface):
    def __init__(self, cfg, task, models):
        super().__init__(cfg, task, models)
        from taskmoe_fairseq.export.conventions import lang_tag  # fairseq's get_lang_tok, under the task's style

        tags = [lang_tag(lang, getattr(task, "args", None)) for lang in getattr(task, "langs", [])]
        self.language_tags = {self.tgt_dict.index(tag) for tag in tags if tag in self.tgt_dict.indices}

    def string(self, tokens) -> str:
        return self.tgt_dict.string(tokens, extra_symbols_to_ignore=self.language_tags)
