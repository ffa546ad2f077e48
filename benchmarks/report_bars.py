"""The targets (bars) judged on measured ratios, the summary numbers the README quotes, and
the explanations of the missed bars, from the records of the measuring scripts.

``records``: kind ("decoding", "training", "memory") -> the JSON a measuring script wrote;
any of them may be missing, and each function says only what its inputs allow.
"""

from typing import List

from models import LABELS
from timing import median

SETTINGS = ["greedy b64", "beam4 b64", "greedy b1", "beam4 b1"]
HEADLINE = "greedy b64"
TASK_ROUTED_TRAINING = ["token/target", "target/target", "pair/pair", "static-pair/static-pair"]


def experts_of(record) -> List[int]:
    return sorted(int(e) for e in record["results"] if e.isdigit()) if record else []


def decode_ratio(decode, e, key, setting, ref):
    return decode["results"][str(e)]["models"][key]["settings"][setting][f"ratio_vs_{ref}"]


def slash(values, digits=2):
    return "/".join(f"{v:.{digits}f}" for v in values)


def bars(records) -> List[dict]:
    out = []
    decode = records.get("decoding")
    experts = experts_of(decode)
    if experts:
        for key in ("extracted", "extracted_merged"):
            parts, worst = [], float("inf")
            for name in SETTINGS:
                values = [decode_ratio(decode, e, key, name, "dense_kffn") for e in experts]
                parts.append(f"{name} {slash(values)}")
                worst = min(worst, *values)
            out.append({
                "bar": f"{LABELS[key]} decoding >= 0.95x dense of identical active shape (K*ffn), every setting and E",
                "measured": "; ".join(parts) + f" (E={slash(experts, 0)}); worst {worst:.2f}x",
                "pass": worst >= 0.95,
            })
        ratios = [decode_ratio(decode, e, "extracted", HEADLINE, "full_token_token") for e in experts]
        at32 = ratios[experts.index(32)] if 32 in experts else None
        out.append({
            "bar": "extracted decoding >= 2x full token/token MoE at E=32 (greedy, batch 64)",
            "measured": f"{at32:.2f}x" if at32 is not None else "E=32 not measured",
            "pass": at32 is not None and at32 >= 2.0,
        })
        out.append({
            "bar": "... and that ratio grows with E",
            "measured": ", ".join(f"E={e} {r:.2f}x" for e, r in zip(experts, ratios)),
            "pass": len(ratios) > 1 and all(b > a for a, b in zip(ratios, ratios[1:])),
        })
        lo, hi = experts[0], experts[-1]
        changes = flatness(decode, lo, hi)
        out.append({
            "bar": f"full token/target TaskMoE decoding speed at E={hi} >= 0.90x of E={lo}",
            "measured": "; ".join(f"{name} {c:.2f}x" for name, c in changes.items())
            + " (speed relative to the dense K*ffn model measured in the same rounds)",
            "pass": len(experts) > 1 and min(changes.values()) >= 0.90,
        })
    train = records.get("training")
    for routing in TASK_ROUTED_TRAINING:
        rows = [(e, train["results"][str(e)][routing]) for e in experts_of(train) if routing in train["results"][str(e)]]
        if not rows:
            continue
        out.append({
            "bar": f"{routing} training words/s >= 0.85x dense of the same active shape (K*ffn), every E",
            "measured": ", ".join(
                f"E={e} {row['ratio_vs_dense_kffn']:.2f}x (fwd+bwd only {row['fb_ratio_vs_dense_kffn']:.2f}x)" for e, row in rows
            ),
            "pass": min(row["ratio_vs_dense_kffn"] for _, row in rows) >= 0.85,
        })
    return out


def flatness(decode, lo, hi) -> dict:
    """Full TaskMoE speed at E=hi over E=lo, each relative to dense K*ffn in its own rounds
    (cross-E runs are not in one round; the dense model does not depend on E)."""
    return {
        name: decode_ratio(decode, hi, "full_token_target", name, "dense_kffn")
        / decode_ratio(decode, lo, "full_token_target", name, "dense_kffn")
        for name in SETTINGS
    }


def summary(records) -> List[str]:
    """The numbers of README.md's "Serving cost" paragraph, in the order it uses them."""
    out = []
    decode, memory, train = records.get("decoding"), records.get("memory"), records.get("training")
    experts = experts_of(decode)
    if experts:
        es = slash(experts, 0)
        ratios = [decode_ratio(decode, e, "extracted", HEADLINE, "full_token_token") for e in experts]
        out.append(f"Greedy decoding at batch 64, E = {es}: extracted en-de / full token/token = {slash(ratios)}x.")
        if len(experts) > 1:
            changes = flatness(decode, experts[0], experts[-1])
            out.append(
                f"Full token/target TaskMoE speed at E = {experts[-1]} / E = {experts[0]}: "
                f"{min(changes.values()):.2f}-{max(changes.values()):.2f}x over the four settings."
            )
        values = [decode_ratio(decode, e, key, name, "dense_kffn") for e in experts for name in SETTINGS for key in ("extracted", "extracted_merged")]
        out.append(f"Extracted (plain and merged) / dense K*ffn: {min(values):.2f}-{max(values):.2f}x over settings and E.")
        same = [decode["results"][str(e)]["models"][k]["identical_to_full_token_target"] for e in experts for k in ("extracted", "extracted_merged")]
        spreads = [max(r) / min(r) for e in experts for k in ("dense", "dense_kffn") for n in SETTINGS
                   for r in [decode["results"][str(e)]["models"][k]["settings"][n]["seconds_per_round"]]]
        out.append(
            f"Noise: the dense models' own round-to-round spread (slowest / fastest round of one setting) is "
            f"{median(spreads):.2f}x median, {max(spreads):.2f}x worst in this run (the machine was shared); single rounds of a setting vary by about that much, and the medians of 3 rounds are correspondingly rough."
        )
        share = f"{min(same):.0%}" if min(same) == max(same) else f"{min(same):.0%}-{max(same):.0%}"
        out.append(f"Extracted greedy-b64 hypotheses identical to the full model's: {share} of sentences.")
    mem_experts = experts_of(memory)
    if mem_experts:
        mib = {k: [memory["results"][str(e)][k]["checkpoint_bytes"] / 2**20 for e in mem_experts] for k in ("extracted", "full_token_token")}
        out.append(
            f"Checkpoint MiB at E = {slash(mem_experts, 0)}: extracted {slash(mib['extracted'], 0)} vs full token/token "
            f"{slash(mib['full_token_token'], 0)}."
        )
    if train:
        for routing in TASK_ROUTED_TRAINING:
            values = [train["results"][str(e)][routing]["ratio_vs_dense_kffn"] for e in experts_of(train)]
            out.append(f"{routing} training / dense K*ffn words/s at E = {slash(experts_of(train), 0)}: {slash(values)}x.")
    return out


def explanations(records) -> List[str]:
    """Why each missed bar is missed, with the numbers of this run."""
    out = []
    decode, train = records.get("decoding"), records.get("training")
    experts = experts_of(decode)
    if experts:
        hi = experts[-1]
        row = {k: decode["results"][str(hi)]["models"][k]["settings"]["greedy b1"] for k in ("dense_kffn", "extracted", "extracted_merged")}
        out.append(
            f"**Extracted vs dense of the same active shape.** Time per sentence at batch 1 (greedy, E={hi}, all rounds): "
            f"encoder {row['extracted']['encoder_ms_per_sentence']:.1f} ms extracted vs {row['dense_kffn']['encoder_ms_per_sentence']:.1f} ms "
            f"dense; decoder {row['extracted']['decoder_ms_per_sentence']:.1f} ms extracted, "
            f"{row['extracted_merged']['decoder_ms_per_sentence']:.1f} ms merged, {row['dense_kffn']['decoder_ms_per_sentence']:.1f} ms "
            "dense (the decoder includes the output projection). The extracted token/target model keeps its token-routed "
            "encoder whole (token routing cannot be extracted): each source runs the token gate, the sort-based dispatch and "
            "one small matmul pair per touched expert. In the decoder nothing routes; the unmerged form runs k expert FFNs "
            "and a weighted sum per MoE layer and step where the dense model runs one FFN, which `merge=True` removes."
        )
        profiles = decode["results"].get("32", {}).get("profiles") or {}
        if "full_token_token" in profiles and "extracted" in profiles:
            a, b = profiles["full_token_token"], profiles["extracted"]
            diff = {k: a[k] - b[k] for k in ("total", "gate", "dispatch", "experts")}
            outside = diff["total"] - diff["gate"] - diff["dispatch"] - diff["experts"]
            out.append(
                f"**Extracted vs full token/token (2x at E=32).** One profiled greedy-b64 run each at E=32: token/token "
                f"{a['total']:.0f} ms, extracted {b['total']:.0f} ms; of the {diff['total']:.0f} ms difference, expert FFNs "
                f"{diff['experts']:.0f} ms, gates {diff['gate']:.0f} ms, dispatch {diff['dispatch']:.0f} ms, outside the MoE "
                f"layers {outside:.0f} ms (profiles of single runs are noisy). The paper's 1.87x/2.6x were measured on 32 TPU "
                "cores, where the token MoE also pays the all-to-all (26.9% of its step time) and its expert memory limits the "
                "batch; one CPU has neither cost."
            )
        if len(experts) > 1:
            changes = flatness(decode, experts[0], hi)
            out.append(
                f"**Full TaskMoE flat in E.** Speed at E={hi} relative to E={experts[0]}: "
                + "; ".join(f"{n} {c:.2f}x" for n, c in changes.items())
                + ". The decoder's task gates run once per forward, in the encoder's router (the decision rides in "
                "`encoder_out`), so no decoding step runs a gate whatever E is; what can still grow with E is the token-routed "
                "encoder, whose sources touch more distinct experts."
            )
    train_experts = experts_of(train)
    if train_experts:
        largest = str(train_experts[-1])
        parts = []
        for routing in TASK_ROUTED_TRAINING:
            row = train["results"][largest].get(routing)
            if row:
                p, total = row["profile"], row["profile"]["total"] or float("nan")
                parts.append(
                    f"{routing} {row['ratio_vs_dense_kffn']:.2f}x (fwd+bwd {row['fb_ratio_vs_dense_kffn']:.2f}x; update "
                    f"{median(row['update_seconds']) * 1e3:.0f} ms for {row['params_with_adam_state'] / 1e6:.1f}M parameters vs "
                    f"{median(row['dense_kffn_update_seconds_same_rounds']) * 1e3:.0f} ms; gate {p['gate'] / total:.1%}, "
                    f"dispatch {p['dispatch'] / total:.1%} of the step)"
                )
        dense_params = train["dense_params"]["dense_kffn"] / 1e6
        out.append(
            f"**Task-routed training vs dense.** At E={largest}: " + "; ".join(parts) + f". The dense K*ffn model has "
            f"{dense_params:.1f}M parameters. (a) The update: a mixed-direction batch routes its sentences to up to "
            "(tasks x k) experts per task-routed layer and a token-routed encoder touches all its experts, so several times "
            "the dense model's parameters get gradients and an Adam update (fairseq's `Adam` updates one tensor at a time); "
            f"this does not shrink with the batch, so a {train['ntokens']}-token CPU batch exaggerates it (the fwd+bwd ratio "
            "is the large-batch limit). (b) Forward+backward: each layer runs one pair of expert matmuls per (task group, "
            "expert), many matmuls of a few dozen rows instead of one large one."
        )
    return out
