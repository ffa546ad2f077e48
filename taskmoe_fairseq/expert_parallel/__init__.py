"""Expert parallelism (GShard, Lepikhin et al., 2021, section 2.2): each of P ranks holds E / P
experts of every MoE layer; tokens go to their experts' ranks by all-to-all.

Switched on only by ``--moe-expert-parallel-size P`` > 1 (several ``torchrun`` ranks); a run
without it imports none of the trainer changes below (:func:`taskmoe_fairseq.compat.apply_for_training`).

* :mod:`.dispatch`             the process groups and the all-to-all dispatch an MoE layer calls
* :mod:`.training`             fairseq's trainer with expert parameters: kept out of DDP, their
                               gradients reduced over the replicas, one gradient norm
* :mod:`.sharded_checkpoint`   the file set ``<name>-shared.pt`` + ``<name>-rank-N.pt``
* :mod:`.fairseq_checkpoints`  fairseq's save/resume writing and reading that set
* :mod:`.sharded_extraction`   extracting a pair from the set, reading only its experts' shards
* :mod:`.consolidate`          ``python -m taskmoe_fairseq.consolidate``: the set as one checkpoint
"""
