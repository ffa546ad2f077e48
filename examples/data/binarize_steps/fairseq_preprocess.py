"""binarize.py's last step: ``fairseq-preprocess`` for every en-xx pair with the shared dictionary.

Reads the piece-encoded text ``BIN/spm/{split}.en-<xx>.{en,<xx>}`` and ``BIN/dict.txt``; writes
``BIN/{split}.en-<xx>.{en,<xx>}.{bin,idx}``. Each run writes into a temporary folder inside BIN
and its outputs are moved into place only when it succeeded; several pairs run side by side
(``--workers``). Entry point: ``run_preprocess``.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time

from layout import raw_name
from script_support import UserError, atomic_move, log


def preprocess_cmd(args, lang, splits, spm_dir, dest, dict_path, workers):
    cmd = [args.fairseq_preprocess, "--source-lang", "en", "--target-lang", lang,
           "--destdir", dest, "--srcdict", dict_path, "--tgtdict", dict_path,
           "--workers", str(workers), "--dataset-impl", "mmap"]
    for split in splits:
        cmd += ["--%spref" % split, os.path.join(spm_dir, "%s.en-%s" % (split, lang))]
    return cmd


def pair_outputs(out, lang, splits):
    return [os.path.join(out, "%s.%s" % (raw_name(split, lang, side), ext))
            for split in splits for side in ("en", lang) for ext in ("bin", "idx")]


def run_preprocess(args, jobs, dict_path, spm_dir):
    """Run fairseq-preprocess for every (lang, splits) in ``jobs``, --workers at a time."""
    if not jobs:
        return {}
    parallel = max(1, min(args.workers, len(jobs)))
    per_job_workers = max(1, args.workers // parallel)
    pending = list(jobs)
    running = []
    stats = {}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    while pending or running:
        while pending and len(running) < parallel:
            lang, splits = pending.pop(0)
            tmp = tempfile.mkdtemp(dir=args.out, prefix=".tmp-en-%s." % lang)
            cmd = preprocess_cmd(args, lang, splits, spm_dir, tmp, dict_path, per_job_workers)
            logf = open(os.path.join(tmp, "stdout.log"), "w+", encoding="utf-8")
            try:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            except FileNotFoundError:
                raise UserError("fairseq-preprocess not found (install fairseq, or pass "
                                "--fairseq-preprocess PATH)")
            running.append((proc, lang, splits, tmp, logf, time.time()))
        time.sleep(0.2)
        for item in list(running):
            proc, lang, splits, tmp, logf, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.seek(0)
            output = logf.read()
            logf.close()
            if proc.returncode != 0:
                lines = [l for l in output.strip().splitlines() if l.strip()]
                for p, *_ in running:
                    p.kill()
                raise UserError("fairseq-preprocess en-%s failed: %s"
                                % (lang, lines[-1] if lines else "exit %d" % proc.returncode))
            replaced = [float(x) for x in re.findall(r"([0-9.]+)% replaced", output)]
            for path in pair_outputs(tmp, lang, splits):
                if not os.path.exists(path):
                    raise UserError("fairseq-preprocess en-%s wrote no %s"
                                    % (lang, os.path.basename(path)))
                atomic_move(path, os.path.join(args.out, os.path.basename(path)))
            shutil.rmtree(tmp, ignore_errors=True)
            stats[lang] = {"max_unk_percent": max(replaced) if replaced else None}
            log("[fairseq] en-%s binarized (%s) in %.1fs, <unk> at most %s%%"
                % (lang, ",".join(splits), time.time() - t0,
                   max(replaced) if replaced else "?"))
    return stats
