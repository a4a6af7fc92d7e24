"""The threads that wait on the endpoint while the main thread filters answers and writes rows."""
import threading
from queue import Empty, Queue


class WorkerPool:
    """`size` daemon threads, each running fn(job) on the jobs submitted; `next_result` hands their results to
    the calling thread in the order they finish and re-raises there whatever a job raised.

    The threads are daemons so that a run stopping on an error does not wait for requests still in flight.
    The caller never blocks for good: `next_result` refuses to wait when no job is outstanding, and it waits
    in slices, raising when a worker thread has ended (threads end only after close(), so that is a bug in
    the pool, not a slow endpoint; a slow endpoint is bounded by the client's own timeouts and retries).
    """

    POLL_S = 1.0  # how often a waiting next_result checks that the threads are alive; not a deadline

    def __init__(self, fn, size, name="self-instruct"):
        self.fn = fn
        self.jobs, self.results = Queue(), Queue()
        self.pending = 0  # jobs submitted whose result has not been taken yet
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self.threads:
            thread.start()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                result = self.fn(job)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread by next_result
                result = exc
            self.results.put(result)

    def submit(self, job):
        if self.closed:
            raise RuntimeError("WorkerPool.submit after close")
        self.jobs.put(job)
        self.pending += 1

    def next_result(self):
        """The result of the next job to finish; what the job raised is raised here."""
        if not self.pending:
            raise RuntimeError("WorkerPool.next_result with no job outstanding would wait forever")
        while True:
            try:
                result = self.results.get(timeout=self.POLL_S)
                break
            except Empty:
                dead = [t.name for t in self.threads if not t.is_alive()]
                if dead:
                    raise RuntimeError(f"worker thread {dead[0]} ended with {self.pending} job(s) outstanding; "
                                       "their results will never come") from None
        self.pending -= 1
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self):
        """Let every thread end after its current job (they are not waited for)."""
        if not self.closed:
            self.closed = True
            for _ in self.threads:
                self.jobs.put(None)
