"""Reading the checkpoint to export, and extracting sub-networks from a full one.

A full TaskMoE checkpoint is turned into one merged sub-network per pair in this process, by
the extract command's own steps (:func:`taskmoe_fairseq.extract.load_model`, then
``model.extract(pair, merge=True)``, or ``model.prune_token_experts(pair, ..., 1, merge=True)``
with ``--prune-token-experts 1``): the same sub-network ``python -m taskmoe_fairseq.extract
--merge-experts`` writes, never written to disk here. An extracted checkpoint is used as it is.
"""

import argparse
import copy
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

from taskmoe_fairseq import safe_loading
from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.checkpoint_config import read_config
from taskmoe_fairseq.export.subnetwork import SIDES, moe_layer_names, not_dense_error, routed_layers


@dataclass
class LoadedCheckpoint:
    """``checkpoint``: the safe-loaded checkpoint dict; ``args``: its model options
    (``cfg["model"]``, argparse.Namespace); ``task_args``: ``cfg["task"]`` (or the model args of an
    old-style checkpoint)."""

    path: str
    checkpoint: Dict
    args: object
    task_args: object

    @property
    def state(self) -> Dict:
        """The model's state dict (``checkpoint["model"]``)."""
        return self.checkpoint["model"]

    @property
    def extracted_pair(self):
        return getattr(self.args, "moe_extracted_lang_pair", None)

    def known_pairs(self) -> List[str]:
        """The ``--lang-pairs`` the model was trained on, e.g. ``["en-de", "de-en"]``."""
        pairs = getattr(self.task_args, "lang_pairs", None) or getattr(self.args, "lang_pairs", None) or []
        return pairs.split(",") if isinstance(pairs, str) else list(pairs)

    def has_moe_layers(self) -> bool:
        """Whether any layer holds ``.moe.`` parameters (otherwise nothing needs extracting)."""
        return any(moe_layer_names(self.state, side) for side in SIDES)


def load(path: str) -> LoadedCheckpoint:
    """Safe-load ``path``; the one-line errors of :func:`taskmoe_fairseq.models.checkpoint_config.read_config`
    for anything that is not a TaskMoE checkpoint (or is one file of an expert-parallel one)."""
    checkpoint = safe_loading.safe_torch_load(path)
    saved = read_config(checkpoint, path, "export", hint="for a stock fairseq transformer use ct2-fairseq-converter")
    return LoadedCheckpoint(path, checkpoint, saved.model, saved.task or saved.model)


def choose_pairs(loaded: LoadedCheckpoint, requested: List[str], all_pairs: bool) -> List[str]:
    """The pairs to export; an extracted checkpoint serves only its own pair."""
    if loaded.extracted_pair:
        own = loaded.extracted_pair
        wrong = [pair for pair in requested if pair != own]
        if wrong:
            raise usage_error(f"{loaded.path} was extracted for {own} and serves only that pair (asked for {','.join(wrong)})")
        return [own]
    known = loaded.known_pairs()
    pairs = known if all_pairs else requested
    if not pairs:
        raise usage_error("say which pair: --lang-pair SRC-TGT (repeatable) or --all-lang-pairs")
    unknown = [pair for pair in pairs if pair not in known]
    if unknown:
        raise usage_error(f"unknown language pair {','.join(unknown)}; the model knows {','.join(known)}")
    return list(dict.fromkeys(pairs))


def refuse_routed_layers(loaded: LoadedCheckpoint, prune_token_experts=None):
    """Stop (one line) before any work if some MoE layer routes per token or sentence (token-routed
    layers of a full checkpoint count as dense when ``prune_token_experts`` is 1: extraction
    prunes them to one expert)."""
    args = loaded.args
    if prune_token_experts is not None:
        if prune_token_experts != 1:
            raise usage_error(
                f"--prune-token-experts {prune_token_experts}: a CTranslate2 Transformer needs dense layers, and only "
                "K = 1 makes a token-routed layer dense; pass --prune-token-experts 1"
            )
        if loaded.extracted_pair:
            raise usage_error(
                f"{loaded.path} is already the {loaded.extracted_pair} sub-network; --prune-token-experts works on "
                "the full checkpoint (or export a checkpoint extract pruned with --prune-token-experts 1, without the option)"
            )
        if not any(getattr(args, f"{side}_moe_routing", None) == "token" and moe_layer_names(loaded.state, side) for side in SIDES):
            raise usage_error(
                f"--prune-token-experts: {loaded.path} has no token-routed MoE layer "
                f"(routing {args.encoder_moe_routing}/{args.decoder_moe_routing}); drop the option"
            )
        args = copy.copy(args)
        args.moe_pruned_token_experts = 1
    routed = routed_layers(loaded.state, args)
    if routed:
        raise not_dense_error(loaded.path, routed)


def merged_subnetworks(loaded: LoadedCheckpoint, pairs: List[str], pruning: argparse.Namespace = None
                       ) -> Iterator[Tuple[str, Dict, argparse.Namespace]]:
    """``(pair, state dict, model args)`` of each pair's merged sub-network, extracted in this process
    from the full checkpoint ``loaded``, one pair at a time: what ``python -m taskmoe_fairseq.extract
    --merge-experts`` saves (its ``load_model`` and :func:`~taskmoe_fairseq.extract.cli.extracted_models`).

    ``pruning``: extract's ``--prune-token-experts`` / ``--pruning-*`` options and ``data_dir`` (the
    folder whose splits the samples come from); token-routed layers are pruned to that many experts.

    Raises:
        TaskMoeError: a pruning sample that cannot be read (one line, at the call: the samples are
            read before it returns, the sub-networks are extracted as they are iterated).
    """
    from taskmoe_fairseq.extract.cli import extracted_models, load_model, pruning_samples

    prune = pruning.prune_token_experts if pruning is not None else None
    samples = pruning_samples(pruning, loaded.checkpoint, loaded.args, pairs) if prune is not None else {}
    metric = pruning.pruning_metric if prune is not None else "load"

    def each():
        model = load_model(loaded.checkpoint, loaded.args)
        for pair, network, _ in extracted_models(model, pairs, True, prune, samples, metric):
            yield pair, network.state_dict(), network.args

    return each()
