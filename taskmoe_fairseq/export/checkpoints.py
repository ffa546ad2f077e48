"""Reading the checkpoint to export, and extracting sub-networks from a full one.

A full TaskMoE checkpoint is turned into one merged sub-network per pair by the extract CLI
(``python -m taskmoe_fairseq.extract ... --merge-experts``, run as a subprocess: its
internals are not part of the contract); an extracted checkpoint is used as it is.
"""

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence

from taskmoe_fairseq import safe_loading
from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.models.checkpoint_config import read_config
from taskmoe_fairseq.export.subnetwork import SIDES, moe_layer_names, not_dense_error, routed_layers


@dataclass
class LoadedCheckpoint:
    """``state``: the model's state dict; ``args``: ``cfg["model"]`` (argparse.Namespace);
    ``task_args``: ``cfg["task"]`` (or the model args of an old-style checkpoint)."""

    path: str
    state: Dict
    args: object
    task_args: object

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
    return LoadedCheckpoint(path, checkpoint["model"], saved.model, saved.task or saved.model)


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


def extract_subnetworks(loaded: LoadedCheckpoint, pairs: List[str], folder: str, pruning: Sequence[str] = ()) -> Dict[str, str]:
    """``{pair: path}`` of merged sub-networks written into ``folder`` by the extract CLI;
    ``pruning``: its ``--prune-token-experts 1 --data-dir ...`` options (token-routed layers pruned)."""
    command = [
        sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", loaded.path,
        "--lang-pairs", ",".join(pairs), "--output-dir", folder, "--merge-experts", "--force", *pruning,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise usage_error(f"extraction failed: {lines[-1] if lines else 'exit status %d' % result.returncode}")
    paths = {pair: os.path.join(folder, f"{pair}.pt") for pair in pairs}
    missing = [pair for pair, path in paths.items() if not os.path.exists(path)]
    if missing:
        raise usage_error(f"extraction wrote no checkpoint for {','.join(missing)}")
    return paths
