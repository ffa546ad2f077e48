"""One process serves every language pair of a TaskMoE checkpoint (``python -m taskmoe_fairseq.serve``).

=====================  ==============================================================
``shared_weights.py``  the checkpoint read once: config, task, shared tensors, router
``pair_model.py``      one pair's sub-network: shared tensors + its experts (extraction's steps)
``expert_sets.py``     the loaded expert sets, least recently used evicted
``service.py``         checking and translating one request (the translate command's code path)
``batching.py``        the worker thread: concurrent requests decoded together, per pair
``app.py``             the aiohttp API and ``page.html``
``cli.py``             the command
=====================  ==============================================================
"""
