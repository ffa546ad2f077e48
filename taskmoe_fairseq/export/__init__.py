"""Export TaskMoE sub-networks to inference engines (``python -m taskmoe_fairseq.export``).

* :mod:`.subnetwork`  which layers have a dense form; merging the kept experts into one FFN
* :mod:`.ct2_spec`    CTranslate2's ``TransformerSpec`` filled through its own converter API
* :mod:`.conventions` language tags, target prefix and end token for CTranslate2 callers
* :mod:`.checkpoints` reading checkpoints; a full one's merged sub-networks, extracted in this process
* :mod:`.cli`         the command line
"""
