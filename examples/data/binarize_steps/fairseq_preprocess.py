"""binarize.py's last step: ``fairseq-preprocess`` for every pair with the shared dictionary.

Reads the piece-encoded text ``BIN/spm/{split}.<src>-<tgt>.{<src>,<tgt>}`` (en-xx or any other
pair) and ``BIN/dict.txt``; writes ``BIN/{split}.<src>-<tgt>.{<src>,<tgt>}.{bin,idx}``. Each run writes into a temporary folder inside BIN
and its outputs are moved into place only when it succeeded; several pairs run side by side
(``--workers``). Each run is fairseq-preprocess's own ``main`` in a process forked from this one,
which imports fairseq once (a new interpreter per pair cost about 4 s of imports each), or, with
``--fairseq-preprocess COMMAND``, that command as a new process. Entry point: ``run_preprocess``.
"""

import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from layout import pair_name
from script_support import UserError, atomic_move, log


def _preprocess_main(argv, log_fd):
    """In the forked child: fairseq-preprocess's ``main`` on ``argv``, its output to ``log_fd``."""
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
    for handler in logging.getLogger().handlers:  # the command logs to stdout (its basicConfig)
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stdout)
    from fairseq import options
    from fairseq_cli import preprocess

    preprocess.main(options.get_preprocessing_parser().parse_args(argv))


class ForkedPreprocess:
    """fairseq-preprocess with ``argv`` in a forked child, with the part of ``subprocess.Popen``'s
    interface that ``run_preprocess`` uses (``poll``, ``returncode``, ``kill``). An exception
    in the child is printed to the log and exits 1, as the command would."""

    def __init__(self, argv, logf):
        self._process = multiprocessing.get_context("fork").Process(target=_preprocess_main, args=(argv, logf.fileno()))
        self._process.start()

    def poll(self):
        return self._process.exitcode  # None while it runs

    @property
    def returncode(self):
        return self._process.exitcode

    def kill(self):
        self._process.kill()


def import_fairseq_preprocess():
    """Import fairseq-preprocess here, once, before the pairs are forked (raises UserError)."""
    try:
        import fairseq_cli.preprocess  # noqa: F401  (configures logging to stdout, as the command does)
    except ImportError as error:
        raise UserError(f"fairseq is not importable ({error}); install it (pip install ve-fairseq) "
                        "or pass --fairseq-preprocess COMMAND")


def preprocess_cmd(args, pair, splits, spm_dir, dest, dict_path, workers):
    """fairseq-preprocess's command line for ``pair`` = (source, target)."""
    source, target = pair
    cmd = [args.fairseq_preprocess or "fairseq-preprocess", "--source-lang", source, "--target-lang", target,
           "--destdir", dest, "--srcdict", dict_path, "--tgtdict", dict_path,
           "--workers", str(workers), "--dataset-impl", "mmap"]
    for split in splits:
        cmd += ["--%spref" % split, os.path.join(spm_dir, "%s.%s-%s" % (split, source, target))]
    return cmd


def pair_outputs(out, pair, splits):
    """The ``.bin``/``.idx`` files fairseq-preprocess writes for ``pair`` = (source, target)."""
    return [os.path.join(out, "%s.%s" % (pair_name(split, pair[0], pair[1], side), ext))
            for split in splits for side in pair for ext in ("bin", "idx")]


def run_preprocess(args, jobs, dict_path, spm_dir):
    """Run fairseq-preprocess for every ((source, target), splits) in ``jobs``, --workers at a time;
    returns ``{"source-target": {"max_unk_percent": ...}}``."""
    if not jobs:
        return {}
    parallel = max(1, min(args.workers, len(jobs)))
    per_job_workers = max(1, args.workers // parallel)
    pending = list(jobs)
    running = []
    stats = {}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.fairseq_preprocess is None:
        import_fairseq_preprocess()
    while pending or running:
        while pending and len(running) < parallel:
            pair, splits = pending.pop(0)
            name = "-".join(pair)
            tmp = tempfile.mkdtemp(dir=args.out, prefix=".tmp-%s." % name)
            cmd = preprocess_cmd(args, pair, splits, spm_dir, tmp, dict_path, per_job_workers)
            logf = open(os.path.join(tmp, "stdout.log"), "w+", encoding="utf-8")
            try:
                if args.fairseq_preprocess is None:
                    proc = ForkedPreprocess(cmd[1:], logf)
                else:
                    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            except FileNotFoundError:
                raise UserError("--fairseq-preprocess %s: no such command" % cmd[0])
            running.append((proc, pair, splits, tmp, logf, time.time()))
        time.sleep(0.2)
        for item in list(running):
            proc, pair, splits, tmp, logf, t0 = item
            name = "-".join(pair)
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.seek(0)
            output = logf.read()
            logf.close()
            if proc.returncode != 0:
                lines = [l for l in output.strip().splitlines() if l.strip()]
                for p, _, _, other_tmp, other_log, _ in running:
                    p.kill()
                    other_log.close()
                    shutil.rmtree(other_tmp, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)  # nothing of a failed run is left in the output
                raise UserError("fairseq-preprocess %s failed: %s"
                                % (name, lines[-1] if lines else "exit %d" % proc.returncode))
            replaced = [float(x) for x in re.findall(r"([0-9.]+)% replaced", output)]
            for path in pair_outputs(tmp, pair, splits):
                if not os.path.exists(path):
                    raise UserError("fairseq-preprocess %s wrote no %s"
                                    % (name, os.path.basename(path)))
                atomic_move(path, os.path.join(args.out, os.path.basename(path)))
            shutil.rmtree(tmp, ignore_errors=True)
            stats[name] = {"max_unk_percent": max(replaced) if replaced else None}
            log("[fairseq] %s binarized (%s) in %.1fs, <unk> at most %s%%"
                % (name, ",".join(splits), time.time() - t0,
                   max(replaced) if replaced else "?"))
    return stats
