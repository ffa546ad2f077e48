"""One worker thread runs the model; requests that wait together are decoded together, per pair.

HTTP handlers :meth:`BatchingWorker.submit` a :class:`Job` and await its future. The worker takes
the oldest job and every job queued behind it, groups them by ``(lang_pair, beam, max_len_b)``
(a pair's sub-network and the generator's options are one batch's), and decodes each group's
texts in one :func:`~taskmoe_fairseq.translate.translate_lines` call (length-sorted batches of
``batch_size`` sentences), groups in the order their first job came. So concurrent requests never
run the model at the same time (the model and fairseq's generator are not shared across threads),
and a burst of small requests for one pair costs about one batch, not one decode per request.

A :class:`~taskmoe_fairseq.errors.TaskMoeError` fails only its group's jobs (with its one line);
any other exception too, logged with its traceback; the worker carries on.
"""

import collections
import concurrent.futures
import logging
import queue
import threading
from typing import Callable, List

from taskmoe_fairseq.errors import TaskMoeError

logger = logging.getLogger(__name__)


class Job:
    """``texts`` to translate for ``lang_pair``; ``future`` gets their translations (a list of str)."""

    def __init__(self, lang_pair: str, texts: List[str], beam: int, max_len_b: int):
        self.lang_pair, self.texts, self.beam, self.max_len_b = lang_pair, list(texts), beam, max_len_b
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    @property
    def group(self):
        return self.lang_pair, self.beam, self.max_len_b


class BatchingWorker:
    """Args:
        translate: ``translate(lang_pair, texts, beam, max_len_b) -> translations`` (run on the worker thread).
        max_group_texts: at most this many texts decoded in one group (later jobs wait for the next round).
    """

    def __init__(self, translate: Callable, max_group_texts: int = 256):
        self.translate, self.max_group_texts = translate, max_group_texts
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="taskmoe-serve-worker", daemon=True)
        self.rounds = 0
        self.groups = 0
        self.jobs_done = 0
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self._queue.put(job)
        return job.future

    def stop(self, timeout: float = 30.0):
        """Finish the queued jobs, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self) -> List[Job]:
        first = self._queue.get()
        jobs = [first]
        while first is not None:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            if job is None:
                break
        return jobs

    def _run(self):
        stopping = False
        while not stopping:
            jobs = self._take()
            stopping = jobs[-1] is None
            groups = collections.OrderedDict()
            for job in (job for job in jobs if job is not None):
                groups.setdefault(job.group, []).append(job)
            self.rounds += 1
            for group_jobs in groups.values():
                start = 0
                while start < len(group_jobs):  # split a group into chunks of at most max_group_texts texts
                    chunk, count = [], 0
                    while start < len(group_jobs) and (not chunk or count + len(group_jobs[start].texts) <= self.max_group_texts):
                        chunk.append(group_jobs[start])
                        count += len(group_jobs[start].texts)
                        start += 1
                    self._decode(chunk)

    def _decode(self, jobs: List[Job]):
        first = jobs[0]
        texts = [text for job in jobs for text in job.texts]
        self.groups += 1
        try:
            out = self.translate(first.lang_pair, texts, first.beam, first.max_len_b)
        except Exception as error:  # noqa: BLE001  (reported to the requests; the worker keeps serving)
            if not isinstance(error, TaskMoeError):
                logger.exception("translation failed for %s (%d texts)", first.lang_pair, len(texts))
            for job in jobs:
                job.future.set_exception(error)
            return
        offset = 0
        for job in jobs:
            job.future.set_result(out[offset:offset + len(job.texts)])
            offset += len(job.texts)
            self.jobs_done += 1
