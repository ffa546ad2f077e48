from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

__all__ = ["TaskMoeTransformerModel"]
