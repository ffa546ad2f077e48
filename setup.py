"""taskmoe-fairseq: Task-level Mixture-of-Experts for fairseq.

Install torch first (``pip install torch==2.13.0`` takes the CPU wheel on the
project's machines); the requirement below is a range, so an installed torch
is kept rather than replaced by a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="taskmoe-fairseq",
    version="0.1.0",
    description="Task-level Mixture-of-Experts (Kudugunta et al., 2021) as a fairseq plugin: "
    "train one multilingual MoE, serve each language pair from an extracted sub-network",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["taskmoe_fairseq", "taskmoe_fairseq.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.1",
        # upstream fairseq 0.12.2 does not import on Python 3.11; ve-fairseq is upstream main
        # with the dataclass default fixed, and provides the `fairseq` module and fairseq-* CLIs.
        "ve-fairseq==0.12.3",
        "fairscale==0.4.13",
        "sentencepiece>=0.1.99",
        "sacrebleu>=2.3",
        "numpy",
        # progress of python -m taskmoe_fairseq.translate on large inputs (fairseq needs it too)
        "tqdm",
    ],
    package_data={"taskmoe_fairseq.serve": ["page.html"]},
    extras_require={
        # pytest-xdist runs the suite on both cores (-n 2; 3.8 for pytest.ini's --no-loadscope-reorder);
        # filelock lets its workers share one trained model per routing instead of training it once
        # per worker; selenium drives Debian's chromium (+ chromium-driver) for the serving page's test
        "test": ["pytest>=7", "pytest-xdist>=3.8", "filelock>=3.12", "selenium>=4.10"],
        # python -m taskmoe_fairseq.serve: aiohttp's server (HTTP, body-size limit, JSON) and client (load test)
        "serve": ["aiohttp>=3.9"],
        "bench": ["matplotlib>=3.7"],
        # python -m taskmoe_fairseq.export --format ctranslate2
        "ctranslate2": ["ctranslate2>=4.5,<5"],
    },
    license="MIT",
)
