"""Step 1, fetch: the Debian package lists, translation indexes and LibreOffice packages.

Reads the Debian mirror that apt is configured for. Writes, under the cache folder:

* ``apt-lists/``: a private ``Dir::State::Lists`` filled by ``apt-get update`` with the package
  lists and the ``Translation-<lang>`` indexes (the system's own lists are not touched), and
  ``apt-lists/complete.json`` (which languages it holds);
* ``debs/<package>_<version>_<arch>.deb``: ``apt-get download`` of each package;
* ``extract/<package>_<version>_<arch>/``: the package unpacked with ``dpkg-deb -x``.

Each of these is reused when present (``refresh`` fetches and unpacks again). Entry point:
``fetch_sources``.
"""

import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

from layout import DEBIAN_NAMES
from script_support import UserError, atomic_move, atomic_write_text, log, sha256_file


def run_tool(cmd, cwd=None, what=None):
    """Run a command and return its stdout; on failure raise UserError with its last error line."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, errors="replace")
    except FileNotFoundError:
        raise UserError("command not found: %s" % cmd[0])
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        errs = [l for l in lines if l.startswith("E:")] or lines
        detail = errs[-1] if errs else "exit status %d" % proc.returncode
        raise UserError("%s failed: %s" % (what or " ".join(cmd[:2]), detail))
    return proc.stdout


def check_tools():
    """Fail with one line unless apt-get and dpkg-deb are on PATH."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError("'%s' not found on PATH: this script needs a Debian-style system "
                            "with apt and dpkg" % tool)


def apt_options(lists_dir):
    """apt options that keep apt's state in a private lists folder and touch no system cache."""
    opts = ["-o", "Dir::State::Lists=" + lists_dir,
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Acquire::GzipIndexes=false"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root apt would drop to the _apt user, which cannot write into our private folders
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def translation_files(lists_dir, code):
    """The ``Translation-<code>`` index files in an apt lists folder (any compression)."""
    pattern = re.compile(r"_i18n_Translation-%s(\.[a-z0-9]+)?$" % re.escape(code.replace("_", "%5f")),
                         re.IGNORECASE)
    return sorted(os.path.join(lists_dir, n) for n in os.listdir(lists_dir) if pattern.search(n))


def update_lists(cache, langs, force):
    """Fetch package lists and Translation-* indexes into CACHE/apt-lists (private)."""
    lists_dir = os.path.join(cache, "apt-lists")
    stamp = os.path.join(lists_dir, "complete.json")
    want = ["en"] + [DEBIAN_NAMES[l]["ddtp"] for l in langs]
    if not force and os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            have = json.load(f).get("languages", [])
        if set(want) <= set(have):
            log("[lists] reusing %s" % lists_dir)
            return lists_dir
    os.makedirs(os.path.join(lists_dir, "partial"), exist_ok=True)
    log("[lists] apt-get update into private folder %s (languages %s)" % (lists_dir, ",".join(want)))
    t = time.time()
    run_tool(["apt-get", "update", "-q"] + apt_options(lists_dir)
             + ["-o", "Acquire::Languages=" + ",".join(want)], what="apt-get update")
    names = os.listdir(lists_dir)
    if not any("_Packages" in n for n in names):
        raise UserError("apt-get update fetched no package lists into %s (no network access to "
                        "the Debian mirror?)" % lists_dir)
    missing = [code for code in want if not translation_files(lists_dir, code)]
    if "en" in missing:
        raise UserError("apt-get update fetched no Translation-en index (no network access?)")
    for code in missing:
        log("[lists] warning: no Translation-%s index was fetched" % code)
    atomic_write_text(stamp, json.dumps({"languages": want,
                                         "date": datetime.datetime.utcnow().isoformat() + "Z"}))
    log("[lists] done in %.1fs" % (time.time() - t))
    return lists_dir


def cached_debs(cache, pkg):
    """The .deb files of PKG already in CACHE/debs, oldest version name first."""
    return sorted(glob.glob(os.path.join(cache, "debs", glob.escape(pkg) + "_*.deb")))


def download(pkg, cache, lists_dir, force):
    """Return the path of PKG's .deb in CACHE/debs, downloading it with apt-get if needed."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    existing = cached_debs(cache, pkg)
    if existing and not force:
        return existing[-1]
    tmp = tempfile.mkdtemp(dir=debs, prefix=".tmp-" + pkg + ".")
    try:
        try:
            run_tool(["apt-get", "download", "-q"] + apt_options(lists_dir) + [pkg], cwd=tmp,
                     what="apt-get download")
        except UserError as e:
            raise UserError("could not download package '%s' (%s)" % (pkg, e))
        got = glob.glob(os.path.join(tmp, "*.deb"))
        if len(got) != 1:
            raise UserError("could not download package '%s' (no .deb was written)" % pkg)
        for old in existing:
            os.unlink(old)
        dest = os.path.join(debs, os.path.basename(got[0]))
        atomic_move(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack(deb, cache, force):
    """Unpack a .deb with dpkg-deb -x into CACHE/extract/<name>_<version>; return that folder."""
    name = os.path.basename(deb)[:-len(".deb")]
    dest = os.path.join(cache, "extract", name)
    if os.path.isdir(dest) and not force:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".tmp-" + name + ".")
    try:
        run_tool(["dpkg-deb", "-x", deb, tmp], what="dpkg-deb -x %s" % os.path.basename(deb))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        atomic_move(tmp, dest)  # a folder: renamed whole, so it is complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def packages_for(langs, sources):
    """The Debian packages the sources need, in download order."""
    pkgs = []
    if "help" in sources:
        pkgs += [DEBIAN_NAMES[l]["help_pkg"] for l in ["en"] + list(langs)]
    if "ui" in sources:
        pkgs += [DEBIAN_NAMES[l]["ui_pkg"] for l in langs]
    return pkgs


def fetch_sources(cache, langs, sources, refresh):
    """Make the lists and packages ready; return ({pkg: {"version", "deb", "size", "sha256",
    "dir"}}, apt lists folder)."""
    pkgs = packages_for(langs, sources)
    lists_dir = os.path.join(cache, "apt-lists")
    need_lists = ("ddtp" in sources or refresh
                  or any(not cached_debs(cache, p) for p in pkgs))
    if need_lists:
        lists_dir = update_lists(cache, langs, refresh)
    t = time.time()
    info = {}
    for i, pkg in enumerate(pkgs, 1):
        deb = download(pkg, cache, lists_dir, refresh)
        folder = unpack(deb, cache, refresh)
        version = run_tool(["dpkg-deb", "-f", deb, "Version"], what="dpkg-deb -f").strip()
        info[pkg] = {"version": version, "deb": os.path.basename(deb),
                     "size": os.path.getsize(deb), "sha256": sha256_file(deb), "dir": folder}
        log("[debs] %2d/%d %s %s (%.1f MB)" % (i, len(pkgs), pkg, version, info[pkg]["size"] / 1e6))
    log("[debs] %d packages ready in %.1fs" % (len(pkgs), time.time() - t))
    return info, lists_dir
