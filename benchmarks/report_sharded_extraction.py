"""docs/benchmarks/sharded_extraction.md from the record of measure_sharded_extraction.py: peak
memory of extracting one pair from expert-parallel shards vs from the consolidated checkpoint.
Nothing is measured here; ``report.py`` calls :func:`markdown`."""


def markdown(record: dict) -> str:
    env, config, results = record["environment"], record["config"], record["results"]
    shape = config["shape"]
    reference = results["consolidated"]["peak_rss_mib"]
    lines = [
        "# Extracting one pair from expert-parallel shards", "",
        f"`{env['command']}`", "",
        f"{shape['layers']}+{shape['layers']} layers, d {shape['embed_dim']}, FFN {shape['ffn_dim']}, MoE in every "
        f"{shape['moe_freq']}nd layer, E = {config['experts']}, {config['routing']}, untrained; extraction of "
        f"{config['pair']} by `python -m taskmoe_fairseq.extract` in a fresh interpreter each; peak = its VmHWM. "
        f"{env['cpu']}, {env['cores']} cores; torch {env['torch']}; {env['date']}.", "",
        "| read from | files (MiB) | shards read | peak memory (MiB) | vs consolidated | output equal to the consolidated file's |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        line = row.get("shards_read_line")
        read = line.split("read expert shards ")[1].split(" of ")[0] if line else "(one file)"
        count = f"{len(read.strip('[]').split(','))} of {name.split('=')[1]}" if line else "-"
        lines.append(f"| {name} | {row['bytes'] / 2**20:,.0f} | {count} | {row['peak_rss_mib']:,.0f} | "
                     f"{row['peak_rss_mib'] / reference:.2f}x | {'yes' if row['same_as_consolidated'] else 'NO'} |")
    lines += ["", "From shards, the model is built on torch's meta device and only the kept experts' tensors are read "
              "(memory-mapped), so peak memory is the shared weights plus the kept experts; from the consolidated file "
              "the whole model is built first. Memory does not depend on machine load.", ""]
    return "\n".join(lines)
