from taskmoe_fairseq.modules.extracted_feed_forward import ExtractedFeedForward
from taskmoe_fairseq.modules.moe_feed_forward import MoeFeedForward
from taskmoe_fairseq.modules.moe_transformer_layer import MoeDecoderLayer, MoeEncoderLayer
from taskmoe_fairseq.modules.routing_decision import RoutingDecision, RoutingInputs

__all__ = [
    "ExtractedFeedForward",
    "MoeDecoderLayer",
    "MoeEncoderLayer",
    "MoeFeedForward",
    "RoutingDecision",
    "RoutingInputs",
]
