"""One worker thread runs the model; requests that wait together are decoded together, per pair.

HTTP handlers :meth:`BatchingWorker.submit` a :class:`Job` and await its future. The worker takes
the oldest job and every job queued behind it, groups them by ``(lang_pair, beam, max_len_b)``
(a pair's sub-network and the generator's options are one batch's), and decodes each group's
texts in one :func:`~taskmoe_fairseq.translate.translate_lines` call (length-sorted batches of
``batch_size`` sentences), groups in the order their first job came. So concurrent requests never
run the model at the same time (the model and fairseq's generator are not shared across threads),
and a burst of small requests for one pair costs about one batch, not one decode per request.

A job nobody waits for any more is dropped: one whose client went away or whose deadline passed
(:meth:`Job.abandon`, or ``time.monotonic()`` past ``Job.deadline``) is skipped before its group is
decoded, and a group whose jobs are all abandoned stops between two fairseq batches
(``translate_lines``'s ``on_batch`` hook). :meth:`BatchingWorker.stop` fails the queued jobs with
:class:`ServerStopping` and stops the running group between batches. Any exception of a decode
fails only its group's jobs, logged with its traceback; the worker carries on.
"""

import collections
import concurrent.futures
import logging
import math
import queue
import threading
import time
from typing import Callable, List

logger = logging.getLogger(__name__)


class ServerStopping(Exception):
    """The server is shutting down: a queued or running job is refused."""


class Abandoned(Exception):
    """Raised from ``on_batch`` to stop decoding a group nobody waits for any more."""


def settle(future: concurrent.futures.Future, result=None, error: BaseException = None) -> bool:
    """Set ``future``'s result (or ``error``) unless it is done already (cancelled, or settled by the
    other thread); True if this call settled it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except concurrent.futures.InvalidStateError:
        return False


class Job:
    """``texts`` to translate for ``lang_pair``; ``future`` gets their translations (a list of str).

    ``deadline``: a ``time.monotonic()`` instant after which nobody waits for the answer (default: never);
    ``cost``: what the job holds of the server's queue bound (the handler's accounting, not used here).
    """

    def __init__(self, lang_pair: str, texts: List[str], beam: int, max_len_b: int, deadline: float = math.inf,
                 cost: int = 0):
        self.lang_pair, self.texts, self.beam, self.max_len_b = lang_pair, list(texts), beam, max_len_b
        self.deadline, self.cost = deadline, cost
        self.abandoned = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    @property
    def group(self):
        return self.lang_pair, self.beam, self.max_len_b

    def abandon(self):
        """Nobody waits for this job any more (its client left or its deadline passed); thread-safe."""
        self.abandoned = True
        self.future.cancel()  # a job not started yet is never decoded

    @property
    def wanted(self) -> bool:
        return not self.abandoned and not self.future.done() and time.monotonic() < self.deadline


class BatchingWorker:
    """Args:
        translate: ``translate(lang_pair, texts, beam, max_len_b, on_batch) -> translations`` (run on the
            worker thread; ``on_batch(n)`` is called after each fairseq batch and may raise :class:`Abandoned`).
        max_group_texts: at most this many texts decoded in one group (later jobs wait for the next round).

    Counters (read by ``GET /health``): ``rounds``, ``groups`` (decodes started), ``jobs_done`` (answered),
    ``jobs_dropped`` (never decoded, or stopped between batches, because nobody waited for them).
    """

    def __init__(self, translate: Callable, max_group_texts: int = 256):
        self.translate, self.max_group_texts = translate, max_group_texts
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="taskmoe-serve-worker", daemon=True)
        self.rounds = 0
        self.groups = 0
        self.jobs_done = 0
        self.jobs_dropped = 0
        self.stopping = False
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        if self.stopping:
            settle(job.future, error=ServerStopping("the server is shutting down"))
        else:
            self._queue.put(job)
        return job.future

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuse the queued jobs (:class:`ServerStopping`), stop the running group between two batches and
        wait at most ``timeout`` seconds for the thread (a batch being decoded is not interrupted).
        True if the thread ended."""
        self.stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                settle(job.future, error=ServerStopping("the server is shutting down"))
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
                        job = group_jobs[start]
                        start += 1
                        if self.stopping:
                            settle(job.future, error=ServerStopping("the server is shutting down"))
                        elif not job.wanted or not job.future.set_running_or_notify_cancel():
                            self.jobs_dropped += 1  # its client left or its deadline passed before it ran
                        else:
                            chunk.append(job)
                            count += len(job.texts)
                    if chunk:
                        self._decode(chunk)

    def _decode(self, jobs: List[Job]):
        first = jobs[0]
        texts = [text for job in jobs for text in job.texts]
        self.groups += 1

        def on_batch(_):
            if self.stopping:
                raise ServerStopping("the server is shutting down")
            if not any(job.wanted for job in jobs):
                raise Abandoned()

        try:
            out = self.translate(first.lang_pair, texts, first.beam, first.max_len_b, on_batch)
        except Abandoned:
            self.jobs_dropped += len(jobs)
            for job in jobs:
                settle(job.future, error=Abandoned())
            return
        except Exception as error:  # noqa: BLE001  (reported to the requests; the worker keeps serving)
            if not isinstance(error, ServerStopping):
                logger.exception("translation failed for %s (%d texts)", first.lang_pair, len(texts))
            for job in jobs:
                settle(job.future, error=error)
            return
        self.jobs_done += len(jobs)  # counted before the answers go out: a client that reads /health next sees it
        offset = 0
        for job in jobs:
            settle(job.future, out[offset:offset + len(job.texts)])
            offset += len(job.texts)
