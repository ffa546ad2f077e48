#!/usr/bin/env python3
"""The README's main job: train a token/target TaskMoE on the bundled real text, extract every
language pair, and show that the extracted sub-networks translate exactly like the full model.

Steps (each a real CLI; re-running reuses finished steps):

1. unpack ``examples/data/bundled/libreoffice-6pairs.tar.xz`` (LibreOffice help and UI text,
   en <-> de, fr, es, ru, ja, zh: 12 directions);
2. ``examples/data/binarize.py``: one shared SentencePiece model, ``fairseq-preprocess``;
3. ``fairseq-train --arch taskmoe_transformer_small`` (token routing in the encoder, target-
   language routing in the decoder, the paper's best) for ``--minutes`` of wall time;
4. ``python -m taskmoe_fairseq.extract --all-lang-pairs``;
5. ``fairseq-generate`` on every test set from the full and from each extracted checkpoint;
6. sacrebleu (BLEU and chrF on SentencePiece-decoded text) and one table: pair, BLEU full,
   BLEU extracted, parameters full vs extracted, decoding speed extracted / full.

Usage::

    python examples/quickstart.py                 # about 15 minutes on 2 CPU cores
    python examples/quickstart.py --minutes 2     # a shorter smoke run
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))  # the data scripts' shared modules
from data.layout import XX_LANGS as XX  # noqa: E402
from data.script_support import atomic_write_bytes, atomic_write_text  # noqa: E402

BUNDLED = os.path.join(REPO, "examples", "data", "bundled", "libreoffice-6pairs.tar.xz")
PLUGIN = os.path.join(REPO, "taskmoe_fairseq")
LANGS = "en," + ",".join(XX)
PAIRS = [pair for xx in XX for pair in (f"en-{xx}", f"{xx}-en")]
# sacrebleu's tokenizer per target language: Chinese by character ('zh'), Japanese by
# character ('char'; 'ja-mecab' needs MeCab), everything else the standard '13a'.
BLEU_TOKENIZE = {"zh": "zh", "ja": "char"}


def task_args():
    return [
        "--user-dir", PLUGIN, "--task", "multilingual_translation_taskmoe",
        "--lang-pairs", ",".join(PAIRS), "--langs", LANGS,
        "--encoder-langtok", "tgt", "--decoder-langtok",
    ]


def step(number, title):
    print(f"\n[{number}/6] {title}", flush=True)


def progress_line(line):
    """fairseq's long log lines, shortened to what tells progress."""
    fields = dict(re.findall(r"(\w+)[= ]([\d.]+)", line.split("valid on", 1)[-1]))
    if "train_inner" in line:
        return f"update {fields.get('num_updates')}: loss {fields.get('loss')}, ppl {fields.get('ppl')}, {fields.get('wps')} words/s, {fields.get('wall')} s"
    if "valid on" in line:
        return f"validation at update {fields.get('num_updates')}: loss {fields.get('loss')}, ppl {fields.get('ppl')}"
    return line.rstrip()[-160:]


def run(command, log_path=None, show=None, env=None, prefix=""):
    """Run a CLI; stream lines matching ``show`` as progress (each starting with ``prefix``); keep
    the whole log in ``log_path``. ``env``: extra environment variables."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", **(env or {}))  # progress as it happens
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if show and re.search(show, line):
                sys.stdout.write("    " + prefix + progress_line(line) + "\n")  # one write: callers may use threads
                sys.stdout.flush()
    output = "".join(lines)
    if log_path:
        atomic_write_text(log_path, output)
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        sys.exit(f"quickstart: {command[0]} failed (exit {process.returncode}); last lines:\n{tail}")
    return output


def train(options, data, save_dir):
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.exists(os.path.join(save_dir, "done")):
        print(f"    {checkpoint} exists (delete {save_dir} to retrain)")
        return checkpoint
    command = [
        "fairseq-train", data, *task_args(),
        "--arch", "taskmoe_transformer_small",
        "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
        "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
        "--share-all-embeddings", "--moe-expert-count", str(options.experts),
        "--encoder-moe-routing", "token", "--decoder-moe-routing", "target",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "3e-3",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "150",
        "--max-tokens", "4096", "--dropout", "0.1",
        "--sampling-method", "temperature", "--sampling-temperature", "5",
        "--stop-time-hours", str(options.minutes / 60), "--max-update", str(options.max_update),
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--save-interval-updates", "500",
        "--keep-interval-updates", "1", "--cpu", "--seed", "1",
        "--log-format", "simple", "--log-interval", "50",
    ]
    run(command, os.path.join(save_dir + ".log"), show=r"train_inner|valid on|done training")
    atomic_write_bytes(os.path.join(save_dir, "done"), b"")
    return checkpoint


def decode_pieces(text, processor):
    return processor.decode_pieces(text.split())


def test_references(data, pair):
    """The raw references of ``pair``'s test set (``xx-en`` reads the ``en-xx`` files)."""
    source, target = pair.split("-")
    en_xx = "en-" + (target if target != "en" else source)
    with open(os.path.join(data, "raw", f"test.{en_xx}.{target}"), encoding="utf-8") as lines:
        return lines.read().splitlines()


def generate(data, checkpoint, pair, processor, log_path=None, beam=4, batch_size=64, env=None):
    """Translate ``pair``'s test set with fairseq-generate; return the detokenised hypotheses in
    test-set order and fairseq's target tokens/s."""
    source, target = pair.split("-")
    output = run([
        "fairseq-generate", data, *task_args(), "--source-lang", source, "--target-lang", target,
        "--path", checkpoint, "--gen-subset", "test", "--beam", str(beam),
        "--max-len-a", "1.2", "--max-len-b", "10", "--batch-size", str(batch_size),
        "--required-batch-size-multiple", "1", "--cpu",
    ], log_path, env=env)
    hypotheses = {}
    for line in output.splitlines():
        match = re.match(r"^H-(\d+)\t\S+\t(.*)$", line)
        if match:
            hypotheses[int(match.group(1))] = decode_pieces(match.group(2), processor)
    expected = len(test_references(data, pair))
    if sorted(hypotheses) != list(range(expected)):
        sys.exit(f"{os.path.basename(sys.argv[0])}: fairseq-generate gave {len(hypotheses)} hypotheses for the "
                 f"{expected} {pair} test sentences ({checkpoint})")
    speed = re.search(r"Translated .* \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", output)
    return [hypotheses[i] for i in range(expected)], float(speed.group(2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time (default 10)")
    parser.add_argument("--max-update", type=int, default=100000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--test-lines", type=int, default=100, help="test sentences per direction (default 100 of 300)")
    options = parser.parse_args(argv)
    import sacrebleu
    import sentencepiece

    started = time.time()
    os.makedirs(options.workdir, exist_ok=True)
    step(1, "unpack the bundled LibreOffice corpus (en <-> de fr es ru ja zh)")
    raw = os.path.join(options.workdir, "libreoffice-6pairs", "raw")
    if not os.path.isdir(raw):
        with tarfile.open(BUNDLED) as archive:
            archive.extractall(options.workdir, filter="data")
    for xx in XX:  # the first --test-lines of each multi-way test set: generation is the slow part
        for lang in ("en", xx):
            path = os.path.join(raw, f"test.en-{xx}.{lang}")
            lines = open(path, encoding="utf-8").readlines()[: options.test_lines]
            atomic_write_text(path, "".join(lines))
    print(f"    {raw} (test sets: first {options.test_lines} sentences)")

    step(2, "SentencePiece + fairseq-preprocess")
    data = os.path.join(options.workdir, "bin")
    run([sys.executable, os.path.join(REPO, "examples", "data", "binarize.py"), "--raw", raw, "--out", data,
         "--vocab-size", "4000"], os.path.join(options.workdir, "binarize.log"), show=r"^\[|^done")
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data, "spm.model"))

    step(3, f"fairseq-train: token/target TaskMoE, {options.experts} experts, {options.minutes:g} minutes")
    checkpoint = train(options, data, os.path.join(options.workdir, "checkpoints"))

    step(4, "python -m taskmoe_fairseq.extract --all-lang-pairs")
    extracted = os.path.join(options.workdir, "extracted")
    shutil.rmtree(extracted, ignore_errors=True)
    run([sys.executable, "-m", "taskmoe_fairseq.extract", "--checkpoint", checkpoint, "--all-lang-pairs",
         "--output-dir", extracted], os.path.join(options.workdir, "extract.log"), show=r"parameters")

    step(5, "fairseq-generate (beam 4) on every test set, full and extracted")
    rows = []
    for pair in PAIRS:
        target = pair.split("-")[1]
        full_hyps, full_speed = generate(data, checkpoint, pair, processor, os.path.join(extracted, f"{pair}.full.log"))
        ext_hyps, ext_speed = generate(data, os.path.join(extracted, f"{pair}.pt"), pair, processor,
                                       os.path.join(extracted, f"{pair}.extracted.log"))
        references = test_references(data, pair)
        tokenize = BLEU_TOKENIZE.get(target, "13a")
        report = json.load(open(os.path.join(extracted, f"{pair}.report.json")))
        row = {
            "pair": pair,
            "bleu_full": sacrebleu.corpus_bleu(full_hyps, [references], tokenize=tokenize).score,
            "bleu_extracted": sacrebleu.corpus_bleu(ext_hyps, [references], tokenize=tokenize).score,
            "chrf_full": sacrebleu.corpus_chrf(full_hyps, [references]).score,
            "identical_hypotheses": full_hyps == ext_hyps,
            "params_full": report["params_before"],
            "params_extracted": report["params_after"],
            "speed_ratio": ext_speed / full_speed,
        }
        rows.append(row)
        print(f"    {pair}: BLEU {row['bleu_full']:.1f} (full) {row['bleu_extracted']:.1f} (extracted), "
              f"same hypotheses: {row['identical_hypotheses']}", flush=True)

    step(6, "results")
    header = "| pair | BLEU full | BLEU extracted | chrF | same output | params full | params extracted | decoding speed extracted / full |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['pair']} | {row['bleu_full']:.1f} | {row['bleu_extracted']:.1f} | {row['chrf_full']:.1f} | "
            f"{'yes' if row['identical_hypotheses'] else 'NO'} | {row['params_full']:,} | {row['params_extracted']:,} | "
            f"{row['speed_ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    elapsed = time.time() - started
    summary = (
        f"\nBLEU: sacrebleu {sacrebleu.__version__} on SentencePiece-decoded output (tokenize 13a; zh: 'zh', "
        f"ja: 'char'). Speed: fairseq-generate's target tokens/s, one run each, same machine.\n"
        f"Total wall time: {elapsed / 60:.1f} min."
    )
    print(summary)
    atomic_write_text(os.path.join(options.workdir, "results.md"), table + "\n" + summary + "\n")
    atomic_write_text(os.path.join(options.workdir, "results.json"),
                      json.dumps({"rows": rows, "minutes": options.minutes, "experts": options.experts,
                                  "wall_seconds": elapsed}, indent=2))
    if not all(row["identical_hypotheses"] for row in rows):
        sys.exit("quickstart: an extracted checkpoint translated differently from the full model")


if __name__ == "__main__":
    main()
