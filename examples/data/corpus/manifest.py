"""Step 5, manifest: what was built, from what, with which tools.

Reads ``OUT/raw/``, ``OUT/meta/`` and the apt lists folder; writes ``OUT/manifest.json``: the
command and options, each package's version, size and sha256, the DDTP index files and release
dates, tool versions, licences, the sha256 of every raw/meta file, and the split and cleaning
statistics. Two builds from the same Debian snapshot and options differ only in ``date`` and
``command``. Entry point: ``write_manifest``.
"""

import datetime
import json
import os
import shlex
import subprocess
import sys

from corpus.fetch import translation_files
from layout import DEBIAN_NAMES
from script_support import atomic_write_text, sha256_file


def tool_version(cmd):
    """First line of ``cmd``'s output, or None when it cannot run."""
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        return out.splitlines()[0].strip() if out else None
    except OSError:
        return None


def index_info(lists_dir, langs):
    """Describe the apt index files the DDTP pairs came from (name, size, sha256, Date)."""
    files = []
    for code in ["en"] + [DEBIAN_NAMES[l]["ddtp"] for l in langs]:
        for path in translation_files(lists_dir, code):
            files.append({"file": os.path.basename(path), "size": os.path.getsize(path),
                          "sha256": sha256_file(path)})
    releases = {}
    for name in sorted(os.listdir(lists_dir)):
        if name.endswith(("InRelease", "_Release")):
            with open(os.path.join(lists_dir, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("Date:"):
                        releases[name] = line.split(":", 1)[1].strip()
                        break
    return {"translation_files": files, "release_dates": releases}


def write_manifest(path, out, config, pkg_info, lists_dir, stats):
    """Write the manifest of the corpus in ``out`` to ``path``; ``stats`` is appended as is."""
    files = {}
    for sub in ("raw", "meta"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            if not name.startswith("."):
                files["%s/%s" % (sub, name)] = sha256_file(os.path.join(out, sub, name))
    manifest = {
        "description": "en<->xx human translations from Debian packages "
                       "(LibreOffice help, LibreOffice UI, Debian description translations)",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
        "config": config,
        "packages": {p: {k: v for k, v in i.items() if k != "dir"} for p, i in pkg_info.items()},
        "ddtp_indexes": (index_info(lists_dir, config["langs"])
                         if "ddtp" in config["sources"] else None),
        "tools": {"apt-get": tool_version(["apt-get", "--version"]),
                  "dpkg-deb": tool_version(["dpkg-deb", "--version"]),
                  "python": sys.version.split()[0]},
        "licenses": {"help": "MPL-2.0 (LibreOffice)", "ui": "MPL-2.0 (LibreOffice)",
                     "ddtp": "Debian package descriptions: each under its package's licence "
                             "(translations via DDTP)"},
        "layout": "raw/{split}.en-{xx}.{en,xx}: parallel lines; meta/{split}.en-{xx}.source: "
                  "source of each line; valid/test are multi-way (same English, same order, "
                  "for every language)",
        "sha256": files,
    }
    manifest.update(stats)
    atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
