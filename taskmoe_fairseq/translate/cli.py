"""Translate raw text: ``python -m taskmoe_fairseq.translate``.

Examples::

    python -m taskmoe_fairseq.translate --model serve/en-de.pt --lang-pair en-de --beam 4 < in.txt > out.txt
    python -m taskmoe_fairseq.translate --model ckpt/checkpoint_best.pt --lang-pair de-en < in.de > out.en
    python -m taskmoe_fairseq.translate --model serve/ct2-en-de --lang-pair en-de < in.txt > out.txt

One raw sentence per input line, one detokenized translation per output line, in input order.
``--model`` is a fairseq checkpoint (full or extracted by ``taskmoe_fairseq.extract``) or a folder
written by ``python -m taskmoe_fairseq.export --format ctranslate2``:

* checkpoint: fairseq's hub interface (``TaskMoeTransformerModel.from_pretrained``) loads it with
  the task options it was trained with; the hub's SentencePiece BPE splits each line, the task adds
  the language tags, the hub's generator decodes (``--beam``, ``--max-len-a 0 --max-len-b N``:
  what ``fairseq-generate`` does with the same options) and the tags are stripped;
* CTranslate2 folder: the export's ``taskmoe_export.json`` says which tags go where, and
  :func:`taskmoe_fairseq.export.ct2_decode.translate_pieces` decodes (ranking finished beams as
  fairseq does, so beam search picks fairseq's hypothesis).

The output pieces are turned into text with the SentencePiece model itself
(``SentencePieceProcessor.decode``), so byte-fallback pieces (``<0xE2>``...) become their
characters (fairseq's ``--post-process sentencepiece`` only joins pieces and leaves them as text);
leading and trailing spaces are stripped, as fairseq's post-processing strips them. Empty (or whitespace-only) lines are never sent to the model: they come out empty. Lines are
sorted by length inside windows of :data:`WINDOW` lines, decoded in batches of ``--batch-size``
sentences and written back in input order, window by window. A progress bar goes to stderr when it
is a terminal or the input has at least :data:`LARGE_INPUT` sentences.

A line longer than the encoder takes (``--max-source-positions``, 1024 by default: the language tag, the
pieces and ``</s>``; an export records it as ``max_source_positions``) is refused on both paths by
:func:`check_source_length`, never truncated.

``--device auto`` (the default) runs on CUDA device ``--device-index`` (0) when one is present,
else on the CPU; ``--device cpu`` / ``cuda`` choose (:mod:`taskmoe_fairseq.devices`).

Bad input (no such model, a folder that is not an export, a pair the model does not serve, an
unreadable SentencePiece model, a line too long...) is one line ``taskmoe_fairseq.translate: error: ...`` and exit
status 2; the library functions raise :class:`~taskmoe_fairseq.errors.TaskMoeError`.
"""

import argparse
import errno
import json
import os
import re
import sys
import warnings
from typing import Callable, List, Optional, Sequence

from taskmoe_fairseq.devices import add_device_args, resolve_device
from taskmoe_fairseq.errors import run_cli, usage_error

PROG = "taskmoe_fairseq.translate"
WINDOW = 10000  # lines sorted and decoded together; their output is written before the next window is read
LARGE_INPUT = 1000  # sentences from which progress is shown even when stderr is not a terminal


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are TaskMoeErrors (one line, exit status 2, through run_cli)."""

    def error(self, message):
        raise usage_error(message)


def parse_args(argv=None):
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Translate raw text (one sentence per line, stdin to stdout) with a TaskMoE "
        "checkpoint (full or extracted) or a CTranslate2 export.",
    )
    parser.add_argument("--model", required=True, metavar="CHECKPOINT_OR_CT2_DIR",
                        help="fairseq checkpoint (full or extracted) or a folder from python -m taskmoe_fairseq.export")
    parser.add_argument("--lang-pair", required=True, metavar="SRC-TGT", help="the direction, e.g. en-de")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5, as fairseq-generate; 1 = greedy)")
    parser.add_argument("--max-len-b", type=int, default=200,
                        help="at most N output tokens, counting the target tag and </s> "
                        "(fairseq's --max-len-a 0 --max-len-b N; default 200, as fairseq-generate)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    parser.add_argument("--data-dir", help="checkpoint only: the binarized data folder with the dictionaries "
                        "(default: the checkpoint's own folder when extract put them there, else the one recorded "
                        "in the checkpoint)")
    parser.add_argument("--spm-model", help="SentencePiece model (default: DATA_DIR/spm.model for a checkpoint, "
                        "the export's spm.model for a CTranslate2 folder)")
    parser.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    add_device_args(parser)
    options = parser.parse_args(argv)
    for name in ("beam", "max_len_b", "batch_size"):
        if getattr(options, name) < 1:
            raise usage_error(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(options, name)})")
    return options


def split_pair(pair: str):
    if not re.fullmatch(r"[^\s-]+-[^\s-]+", pair or ""):
        raise usage_error(f"--lang-pair {pair!r} is not of the form SRC-TGT (e.g. en-de)")
    return pair.split("-")


def load_spm(path: str):
    """The SentencePiece processor of ``path``; an unreadable file is a TaskMoeError."""
    import sentencepiece

    if not os.path.isfile(path):
        raise usage_error(f"SentencePiece model {path} not found; pass --spm-model")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise usage_error(f"{path}: not a readable SentencePiece model ({first}); pass the spm.model the data was built with") from None


def check_source_length(line_number: int, tokens: int, tags: int, limit: Optional[int]):
    """The rule of both paths: the encoder reads ``tags`` language tags, the line's ``tokens``
    (SentencePiece pieces and ``</s>``, as ``fairseq-generate`` counts them) and at most ``limit``
    positions in all (``--max-source-positions``); longer lines are refused, never truncated.

    Raises:
        TaskMoeError: the line is too long (one line naming it, its length and the limit).
    """
    if limit is not None and tokens + tags > limit:
        raise usage_error(
            f"input line {line_number} has {tokens} tokens; the model takes at most {limit - tags} (split the line)"
        )


class FairseqTranslator:
    """A checkpoint served by fairseq's hub interface (language tags stripped)."""

    kind = "fairseq"

    def __init__(self, hub):
        self.hub = hub
        self.max_source_tokens = hub.max_positions[0] if isinstance(hub.max_positions, tuple) else hub.max_positions
        # the task prepends one tag with --encoder-langtok src|tgt
        self.source_tags = 1 if getattr(hub.task.args, "encoder_langtok", None) in ("src", "tgt") else 0

    def encode(self, line: str):
        return self.hub.encode(line)

    def check_length(self, encoded, line_number: int):
        check_source_length(line_number, encoded.numel(), self.source_tags, self.max_source_tokens)

    def generate(self, encoded: Sequence, beam: int, max_len_b: int) -> List[List[str]]:
        with warnings.catch_warnings():
            # fairseq's batch iterator asks for pinned memory; torch warns on every batch without an accelerator
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            hypotheses = self.hub.generate(list(encoded), beam=beam, max_len_a=0, max_len_b=max_len_b)
        return [self.hub.string(hypos[0]["tokens"]).split() for hypos in hypotheses]

    def detokenize(self, pieces: Sequence[str]) -> str:
        return self.hub.bpe.sp.decode(list(pieces))


class Ct2Translator:
    """A CTranslate2 folder written by ``python -m taskmoe_fairseq.export``."""

    kind = "ctranslate2"

    def __init__(self, translator, conv, sp):
        from taskmoe_fairseq.export.conventions import source_limit

        self.translator, self.conv, self.sp = translator, conv, sp
        self.max_source_tokens = source_limit(conv)

    def encode(self, line: str):
        return self.sp.encode(line, out_type=str)

    def check_length(self, encoded, line_number: int):
        # +1: </s>, which CTranslate2 appends (fairseq's encoded line carries it)
        check_source_length(line_number, len(encoded) + 1, len(self.conv["source_prefix"]), self.max_source_tokens)

    def generate(self, encoded: Sequence, beam: int, max_len_b: int) -> List[List[str]]:
        from taskmoe_fairseq.export.ct2_decode import translate_pieces

        # what check_length admitted is never truncated
        return translate_pieces(self.translator, self.conv, list(encoded), beam_size=beam, max_decoding_length=max_len_b,
                                fairseq_ranking=True, max_input_length=self.max_source_tokens)

    def detokenize(self, pieces: Sequence[str]) -> str:
        return self.sp.decode(list(pieces))


def load_ct2(folder: str, pair: str, spm_model: Optional[str] = None, data_dir: Optional[str] = None,
             device: str = "auto", device_index: Optional[int] = None) -> Ct2Translator:
    from taskmoe_fairseq.export.conventions import CONVENTIONS_FILE

    conventions_path = os.path.join(folder, CONVENTIONS_FILE)
    if not os.path.isfile(conventions_path) or not os.path.isfile(os.path.join(folder, "model.bin")):
        raise usage_error(
            f"{folder} is a folder but not a CTranslate2 export (no {CONVENTIONS_FILE} and model.bin); pass a "
            "checkpoint file or a folder written by python -m taskmoe_fairseq.export"
        )
    if data_dir:
        raise usage_error(f"--data-dir is for checkpoints; the CTranslate2 folder {folder} carries its own vocabulary")
    try:
        with open(conventions_path, encoding="utf-8") as stream:
            conv = json.load(stream)
        own = conv["lang_pair"]
        conv["source_prefix"], conv["target_prefix"], conv["strip_from_output"]  # noqa: B018  (required keys)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise usage_error(f"{conventions_path}: not a readable export description ({type(error).__name__}: {error}); re-export the model") from None
    if pair != own:
        raise usage_error(
            f"{folder} is the CTranslate2 export of {own}; it cannot translate {pair} "
            f"(export that pair: python -m taskmoe_fairseq.export --lang-pair {pair} ...)"
        )
    sp = load_spm(spm_model or os.path.join(folder, conv.get("sentencepiece_model") or "spm.model"))
    try:
        import ctranslate2
    except ImportError:
        raise usage_error("CTranslate2 is not installed: pip install 'taskmoe-fairseq[ctranslate2]' (or ctranslate2)") from None
    # CTranslate2's own CUDA build decides whether it can use a GPU, not torch's
    target = resolve_device(device, device_index, ctranslate2.get_cuda_device_count())
    try:
        translator = ctranslate2.Translator(folder, device=target.type, device_index=target.index or 0)
    except (RuntimeError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise usage_error(f"{folder}: CTranslate2 cannot load the model ({first}); re-export it") from None
    return Ct2Translator(translator, conv, sp)


def load_fairseq(checkpoint: str, pair: str, data_dir: Optional[str] = None, spm_model: Optional[str] = None,
                 device: str = "auto", device_index: Optional[int] = None) -> FairseqTranslator:
    from fairseq.dataclass.utils import open_dict

    from taskmoe_fairseq import safe_loading
    from taskmoe_fairseq.extract import assets
    from taskmoe_fairseq.models.checkpoint_config import read_config
    from taskmoe_fairseq.models.taskmoe_transformer import TaskMoeTransformerModel

    source, target = split_pair(pair)
    on = resolve_device(device, device_index)
    state = safe_loading.safe_torch_load(checkpoint, mmap=True)  # one-line errors for unreadable files
    saved = read_config(state, checkpoint, "translate")
    # --data-dir, else the dictionaries beside the checkpoint (extract writes them), else the training data folder;
    # absolute: fairseq reads a path starting with "." relative to the model folder
    data_dir = assets.data_dir_for(checkpoint, assets.recorded_data_dir(state), assets.model_languages(saved.model)[0], data_dir)
    state = None
    spm_model = os.path.abspath(spm_model or os.path.join(data_dir, "spm.model"))
    load_spm(spm_model)  # a clear error before fairseq opens it
    path = os.path.abspath(checkpoint)
    try:
        hub = TaskMoeTransformerModel.from_pretrained(
            os.path.dirname(path), checkpoint_file=os.path.basename(path), data_name_or_path=data_dir,
            source_lang=source, target_lang=target, bpe="sentencepiece", sentencepiece_model=spm_model,
            cpu=on.type == "cpu",
        )
    except FileNotFoundError as error:
        raise usage_error(f"cannot load {checkpoint} with the data in {data_dir} ({error}); pass the --data-dir the model was trained on") from None
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        raise usage_error(f"{checkpoint} does not fit the dictionaries in {data_dir} (its embeddings have another "
                          "vocabulary size); pass the --data-dir the model was trained on") from None
    hub.to(on).eval()  # fairseq's hub runs its batches on its parameters' device
    with open_dict(hub.cfg):
        hub.cfg.dataset.max_tokens = None  # our batches are the batches (the hub would re-split by the training --max-tokens)
        hub.cfg.dataset.batch_size = None
    return FairseqTranslator(hub)


def load_translator(model: str, lang_pair: str, data_dir: Optional[str] = None, spm_model: Optional[str] = None,
                    device: str = "auto", device_index: Optional[int] = None):
    """A translator for ``model`` (checkpoint file or CTranslate2 folder) and ``lang_pair``, on
    ``device`` / ``device_index`` (:func:`taskmoe_fairseq.devices.resolve_device`).

    Raises:
        TaskMoeError: no such model, not an export, unknown pair, unreadable SentencePiece model,
            ``cuda`` without a CUDA device...
    """
    split_pair(lang_pair)
    if os.path.isdir(model):
        return load_ct2(model, lang_pair, spm_model=spm_model, data_dir=data_dir, device=device, device_index=device_index)
    if not os.path.exists(model):
        from taskmoe_fairseq.safe_loading import missing_checkpoint

        raise usage_error(missing_checkpoint(model, "checkpoint file or CTranslate2 folder"))
    if not os.path.isfile(model):  # a pipe would block the read forever
        raise usage_error(f"{model} is neither a checkpoint file nor a CTranslate2 folder (a pipe or device); pass one")
    return load_fairseq(model, lang_pair, data_dir=data_dir, spm_model=spm_model, device=device, device_index=device_index)


def translate_lines(
    translator,
    lines: Sequence[str],
    beam: int = 5,
    max_len_b: int = 200,
    batch_size: int = 64,
    on_batch: Optional[Callable[[int], None]] = None,
    first_line_number: int = 1,
) -> List[str]:
    """Translations of ``lines`` in their order; empty or whitespace-only lines give ``""``.

    The non-empty lines are sorted by length (stable) and decoded ``batch_size`` at a time;
    ``on_batch(n)`` is called after each batch of ``n`` sentences.

    Raises:
        TaskMoeError: ``lines`` a string or holding a non-string, ``beam``, ``max_len_b`` or ``batch_size``
            not a positive integer, a line longer than the model takes.
    """
    if isinstance(lines, (str, bytes)) or not all(isinstance(line, str) for line in lines):
        raise usage_error("translate_lines takes a list of strings (one sentence each), not "
                          + (type(lines).__name__ if isinstance(lines, (str, bytes)) else "a list holding other objects"))
    for name, value in (("beam", beam), ("max_len_b", max_len_b), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise usage_error(f"translate_lines: {name} must be a positive integer, got {value!r}")
    out = [""] * len(lines)
    todo = [i for i, line in enumerate(lines) if line.strip()]
    encoded = {}
    for i in todo:
        encoded[i] = translator.encode(lines[i])
        translator.check_length(encoded[i], first_line_number + i)
    todo.sort(key=lambda i: -len(encoded[i]))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        for i, pieces in zip(batch, translator.generate([encoded[i] for i in batch], beam, max_len_b)):
            out[i] = re.sub(r"\s*[\r\n]+\s*", " ", translator.detokenize(pieces)).strip()
        if on_batch is not None:
            on_batch(len(batch))
    return out


def _progress(total: int, disabled: bool):
    show = not disabled and total > 0 and (sys.stderr.isatty() or total >= LARGE_INPUT)
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sent", file=sys.stderr, desc="translating", mininterval=1.0 if sys.stderr.isatty() else 30.0)


def read_input(stream) -> List[str]:
    try:
        return [line.rstrip("\n").rstrip("\r") for line in stream]
    except UnicodeDecodeError as error:
        raise usage_error(f"the input is not UTF-8 text ({error.reason} at byte {error.start} of a block)") from None


def write_output(text: str) -> None:
    """Write ``text`` to standard output, all of it or a one-line error. Written to the file
    descriptor and every count checked: a write that a full disk or a file-size limit cuts short
    returns fewer bytes without an error, and Python's buffered stdout then lost the rest silently
    (exit 0, lines missing).

    Raises:
        TaskMoeError: the write failed (ENOSPC, EFBIG, EIO, ...).
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): its own write
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()
    data = memoryview(text.encode("utf-8"))
    while data:
        try:
            written = os.write(descriptor, data)
        except OSError as error:
            name = errno.errorcode.get(error.errno, str(error.errno))
            raise usage_error(f"cannot write the translations to standard output: {error.strerror} ({name}); "
                              "the output is incomplete: free space or raise the limit and run it again") from None
        data = data[written:]


def run(argv=None) -> int:
    options = parse_args(argv)
    translator = load_translator(options.model, options.lang_pair, options.data_dir, options.spm_model,
                                 options.device, options.device_index)
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(encoding="utf-8", errors="strict")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    lines = read_input(stdin)
    bar = _progress(sum(1 for line in lines if line.strip()), options.no_progress)
    try:
        for start in range(0, len(lines), WINDOW):
            window = lines[start:start + WINDOW]
            translations = translate_lines(
                translator, window, beam=options.beam, max_len_b=options.max_len_b, batch_size=options.batch_size,
                on_batch=bar.update if bar is not None else None, first_line_number=start + 1,
            )
            write_output("".join(text + "\n" for text in translations))
    finally:
        if bar is not None:
            bar.close()
    return 0


def main(argv=None) -> int:
    """The command's entry point: :func:`run` with one-line errors (exit status 2)."""
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
