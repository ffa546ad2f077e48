from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.moe_transformer_layer import MoeDecoderLayer, MoeEncoderLayer
from taskmoe_fairseq.modules.routing_decision import MoeAux, RoutingDecision

__all__ = [
    "ExtractedFeedForward",
    "MoeAux",
    "MoeDecoderLayer",
    "MoeEncoderLayer",
    "MoeFeedForward",
    "RoutingDecision",
]
