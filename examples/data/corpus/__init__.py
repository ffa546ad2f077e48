"""The steps of ``build_corpus.py``, one module each, in the order they run:

1. ``fetch``: ``apt-get update`` into a private lists folder, ``apt-get download`` and
   ``dpkg-deb -x`` of the LibreOffice packages (reads the network, writes ``CACHE/``).
2. ``sources``: candidate pairs per source format (reads ``CACHE/``, writes
   ``OUT/pairs/<source>.en-<xx>.tsv``); one module per format in ``sources/``.
3. ``clean``: cleaning rules and de-duplication (reads ``OUT/pairs/``, returns the clean pairs).
4. ``split``: the multi-way valid/test sets and the hash-ordered training set (writes
   ``OUT/raw/`` and ``OUT/meta/``).
5. ``manifest``: what was built from what (writes ``OUT/manifest.json``).

``text`` holds the text rules the steps share (whitespace normalisation, script detection).
Binarizing (``binarize.py``) and cutting the bundled slice (``make_bundled.py``) follow as
their own scripts.
"""
