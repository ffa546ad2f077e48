"""The plot of docs/benchmarks: decoding speed relative to dense K*ffn vs E in three
settings, and checkpoint size vs E (from the decoding and memory records)."""

from models import LABELS
from report_bars import HEADLINE, experts_of

from taskmoe_fairseq.files import atomic_write

STYLES = {
    "dense": ("0.55", ":", "s"),
    "dense_kffn": ("0.2", "--", "s"),
    "full_token_token": ("tab:red", "-", "o"),
    "full_token_target": ("tab:orange", "-", "o"),
    "extracted": ("tab:blue", "-", "^"),
    "extracted_merged": ("tab:green", "-", "v"),
}


def write_plot(records, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode, memory = records.get("decoding"), records.get("memory")
    panels = (3 if decode else 0) + (1 if memory else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    if decode:
        experts = experts_of(decode)
        for axis, name in zip(axes[:3], (HEADLINE, "beam4 b64", "greedy b1")):
            for key, (color, line, marker) in STYLES.items():
                values = [decode["results"][str(e)]["models"][key]["settings"][name]["ratio_vs_dense_kffn"] for e in experts]
                axis.plot(experts, values, line, color=color, marker=marker, label=LABELS[key])
            axis.set_xscale("log", base=2)
            axis.set_xticks(experts, [str(e) for e in experts])
            axis.set_xlabel("experts E")
            axis.set_ylabel("decoding speed / dense (K*ffn), same rounds")
            axis.set_title(f"decoding, {name}")
            axis.set_ylim(0, max(1.3, axis.get_ylim()[1]))
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize=8, loc="lower left")
    if memory:
        axis = axes[-1]
        experts = experts_of(memory)
        for key in ("full_token_token", "full_token_target", "extracted", "extracted_merged"):
            color, line, marker = STYLES[key]
            values = [memory["results"][str(e)][key]["checkpoint_bytes"] / 2**20 for e in experts]
            size = 9 if key in ("full_token_token", "extracted") else 5  # the pairs overlap
            axis.plot(experts, values, line, color=color, marker=marker, markersize=size, label=LABELS[key])
        dense = memory["results"]["dense"]["dense_kffn"]["checkpoint_bytes"] / 2**20
        axis.plot(experts, [dense] * len(experts), "--", color="0.2", label=LABELS["dense_kffn"])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(experts, [str(e) for e in experts])
        axis.set_xlabel("experts E")
        axis.set_ylabel("checkpoint MiB")
        axis.set_title("checkpoint size")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    first = (decode or memory)
    env, shape = first["environment"], first["config"]["shape"]
    fig.suptitle(
        "taskmoe-fairseq serving cost: " + "; ".join(f"`{r['environment']['command']}`" for r in (decode, memory) if r)
        + f"\n{env['date']}, {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch thread(s), torch {env['torch']}, "
        f"fairseq {env['fairseq']}; untrained {shape['layers']}+{shape['layers']} layers, d {shape['embed_dim']}, "
        f"FFN {shape['ffn_dim']}, top-{shape['top_k']}",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=110))
    plt.close(fig)
    return True
