"""examples/quickstart.py: its copied test sets and their manifest agree, and it prints a time
estimate from its first logged updates (issue 31)."""

import hashlib
import json
import os
import sys

from cli_helpers import REPO

sys.path.insert(0, os.path.join(REPO, "examples"))
import quickstart  # noqa: E402  (examples/quickstart.py)


def _train_inner(updates):
    return f"2026-12-08 01:00:00 | INFO | train_inner | epoch 001:  {updates} / 141 loss=9.1, num_updates={updates}, wps=900\n"


def test_unpacked_test_sets_are_the_manifests_counts_and_checksums(tmp_path):
    for lines in (7, 20, 3):  # a later run may ask for more sentences than the last one kept
        raw = quickstart.unpack(str(tmp_path), lines)
        manifest = json.load(open(os.path.join(tmp_path, "libreoffice-6pairs", "manifest.json"), encoding="utf-8"))
        for xx in quickstart.XX:
            test = manifest["counts"][f"en-{xx}"]["test"]
            assert test["total"] == lines and test["bundled"]["total"] == 300
            for lang in ("en", xx):
                path = os.path.join(raw, f"test.en-{xx}.{lang}")
                with open(path, "rb") as stream:
                    data = stream.read()
                assert data.count(b"\n") == lines
                assert manifest["sha256"][f"raw/test.en-{xx}.{lang}"] == hashlib.sha256(data).hexdigest()
        # train and valid stay as bundled
        assert sum(1 for _ in open(os.path.join(raw, "valid.en-de.de"), encoding="utf-8")) == manifest["counts"]["en-de"]["valid"]["total"]


def test_estimate_is_printed_once_from_the_first_two_progress_lines():
    clock = quickstart.TrainingClock(now=0)
    assert clock.training_seconds(1231) is None
    clock.see(_train_inner(50), now=70)  # start-up and the first 50 updates: 70 s
    assert clock.training_seconds(1231) is None
    clock.see(_train_inner(100), now=110)  # then 0.8 s per update
    clock.see(_train_inner(150), now=500)  # later lines do not change the estimate
    assert clock.training_seconds(1231) == 110 + 0.8 * 1131
    line = quickstart.estimate_line(clock.training_seconds(1231))
    assert line.startswith("estimate on this machine: training about 16:55, the whole quickstart about 19:44")
    assert "15.4 min" in line and "27-29 min" in line
    assert "15.4 min" in quickstart.__doc__ and "1,231 updates" in quickstart.__doc__ and quickstart.UPDATES == 1231


def test_training_run_prints_the_estimate_once(capsys):
    lines = "".join(_train_inner(updates) for updates in (50, 100, 150, 200))
    quickstart.run([sys.executable, "-c", f"import sys; sys.stdout.write({lines!r})"], show=r"train_inner",
                   total_updates=1231, estimate=True)
    out = capsys.readouterr().out
    assert out.count("estimate on this machine: training about") == 1 and out.count("update ") == 4
    assert out.index("update 100/1231") < out.index("estimate on this machine") < out.index("update 150/1231")
