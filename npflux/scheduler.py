"""Continuous batching: one thread runs the model for every request at once, step by step.

    requests --submit--> waiting queue (bounded) --next step--> running batch (DecodeBatch) --tokens--> tickets

A request is a ``generate.Sequence`` (its prompt, sampling settings and own
random generator). ``submit`` puts it in the waiting queue and hands back a
``Ticket``, the request's side: an iterator over its tokens (``for`` in a
thread, ``async for`` on an event loop). The scheduler thread loops:

1. drop what was cancelled (a client that went away frees its row here);
2. move waiting requests into the running batch while it has room;
3. run the step (``DecodeBatch.step``): ONE forward for every decoding row,
   and on a step where requests joined, one more for their prompts (padding
   every decoding row to a prompt's length would cost far more); every row
   gets its next token;
4. hand each token to its ticket; a request that produced its end token or its
   last allowed token leaves the batch now, without waiting for the others.

Because every row is decoded as if alone (``nn.RowLayout``), a request's
tokens do not depend on which others share its steps: the same seed gives the
same text alone or under load. A full waiting queue refuses new requests at
once (``Overloaded``, which a server answers 503 with Retry-After) instead of
letting latency grow without bound.
"""
import asyncio
import collections
import math
import queue
import threading
import time

from .generate import DecodeBatch

_END = object()  # the token stream's end marker
# The longest the model thread waits for an event loop to take a step's tokens. A loop that is busy
# (refusing hundreds of requests a second under overload) must not hold the running ones up: measured
# with 64 clients against 4 rows and a queue of 4 for 10 s, 0.05 s served 56 and 56 requests, 0.01 s 120 and 72.
HANDOFF_WAIT_S = 0.01


class Overloaded(RuntimeError):
    """The waiting queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class Ticket:
    """One request's side of the scheduler: its tokens as they are sampled, then the end.

    Iterate it in a thread (blocking) or ``async for`` it on the event loop it
    was submitted from (``loop``). ``close()`` (or leaving the loop early)
    cancels the request: the scheduler drops it at its next step. After the end,
    ``seq.finish_reason`` says why it stopped ("stop" or "length"), and
    ``error`` holds the exception if the model failed.
    """

    def __init__(self, seq, loop=None):
        self.seq, self.loop, self.error = seq, loop, None
        self.submitted, self.first_token_at = time.monotonic(), None
        self.cancelled = False
        self._queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def _put(self, item):
        """Called by the scheduler thread (for one item; a step's tokens go through ``_deliver``)."""
        if self.loop is None:
            self._queue.put(item)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def close(self):
        self.cancelled = True

    def __iter__(self):
        try:
            while (item := self._queue.get()) is not _END:
                yield item
        finally:
            self.close()  # a no-op once it ended; a cancel when the reader stopped early
        self._raise_error()

    async def __aiter__(self):
        try:
            while (item := await self._queue.get()) is not _END:
                yield item
        finally:
            self.close()
        self._raise_error()

    def _raise_error(self):
        if self.error is not None:
            raise RuntimeError(f"generation failed: {type(self.error).__name__}: {self.error}") from self.error


class Scheduler:
    """The running batch, its bounded waiting queue and the thread that steps them (see the module docstring).

    ``max_batch``: rows decoded together (the KV caches hold this many);
    ``max_queue``: requests that may wait when every row is taken (so at most
    max_batch + max_queue are admitted at once), beyond which ``submit`` raises
    ``Overloaded``; ``lock``: held around each forward (others share the
    model: a retrieval index embeds queries with it); ``metrics``: an object
    with ``on_step(batch_size, tokens, seconds)``, ``on_first_token(seconds)``
    and ``set_queue(waiting, running)``, or None.
    """

    def __init__(self, model, max_batch=16, max_queue=64, lock=None, metrics=None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"Scheduler: max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.batch = DecodeBatch(model, max_batch, lock=lock)
        self.max_queue, self.metrics = int(max_queue), metrics
        self.waiting = collections.deque()
        self.tickets = {}  # id(seq) -> its ticket, for the running rows
        self.cond = threading.Condition()
        self.thread, self.stopping = None, False
        self.step_seconds = 0.0  # moving average, for Retry-After

    # -- the requests' side --------------------------------------------------------
    def submit(self, seq, loop=None):
        """A Ticket for ``seq``, which joins the batch at a coming step; Overloaded if the queue is full."""
        ticket = Ticket(seq, loop)
        with self.cond:
            free_rows = self.batch.capacity - len(self.batch)
            if len(self.waiting) >= self.max_queue + free_rows:
                raise Overloaded(f"the server is busy: {len(self.waiting)} requests are waiting already "
                                 f"(the limit is {self.max_queue})", self.retry_after())
            if seq.finish_reason is not None:  # nothing to generate (max_new_tokens 0)
                ticket._put(_END)
                return ticket
            self.waiting.append(ticket)
            self._start()
            self.cond.notify()
        return ticket

    def retry_after(self):
        """Whole seconds until a row is likely free: the waiting requests' share of steps, at least 1."""
        per_request = self.step_seconds * 32  # a typical request's tokens; a rough, cheap estimate
        return max(1, math.ceil(len(self.waiting) * per_request / self.batch.capacity))

    def load(self):
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.batch), "max_batch": self.batch.capacity,
                    "max_queue": self.max_queue}

    def close(self):
        """Stop the thread (after its current step); requests still waiting or running end now."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(10)

    # -- the scheduler thread -----------------------------------------------------------
    def _start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="npflux-scheduler")
            self.thread.start()

    def _run(self):
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not len(self.batch):
                    self.cond.wait()
                if self.stopping:
                    break
                self._admit()
            self._step()
        for ticket in list(self.tickets.values()) + list(self.waiting):
            ticket._put(_END)

    def _admit(self):
        """Under the condition: drop cancelled requests, then fill free rows from the queue (oldest first)."""
        for seq in [s for s in self.batch.rows if self.tickets[id(s)].cancelled]:
            self.batch.remove(seq)
            self.tickets.pop(id(seq))._put(_END)
        for ticket in [t for t in self.waiting if t.cancelled]:
            self.waiting.remove(ticket)
            ticket._put(_END)
        while self.waiting and len(self.batch) < self.batch.capacity:
            ticket = self.waiting.popleft()
            self.batch.add(ticket.seq)
            self.tickets[id(ticket.seq)] = ticket
        if self.metrics is not None:
            self.metrics.set_queue(len(self.waiting), len(self.batch))

    def _step(self):
        size, t0 = len(self.batch), time.monotonic()
        if not size:
            return
        try:
            produced = self.batch.step()
        except Exception as exc:  # the model failed: every running request ends with the error
            for seq in list(self.batch.rows):
                self.batch.remove(seq)
                ticket = self.tickets.pop(id(seq))
                ticket.error = exc
                ticket._put(_END)
            return
        dt = time.monotonic() - t0
        self.step_seconds = dt if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * dt
        now, out = time.monotonic(), []
        for seq, token in produced:
            ticket = self.tickets[id(seq)]
            if ticket.first_token_at is None:
                ticket.first_token_at = now
                if self.metrics is not None:
                    self.metrics.on_first_token(now - ticket.submitted)
            out.append((ticket, token))
            if seq.finish_reason is not None:
                del self.tickets[id(seq)]
                out.append((ticket, _END))
        _deliver(out)
        if self.metrics is not None:
            self.metrics.on_step(size, len(produced), dt)


def _deliver(items, wait=HANDOFF_WAIT_S):
    """Hand (ticket, token or end) pairs to their readers, and wait (at most ``wait`` s) until each
    event loop has taken them.

    ONE wake-up per event loop per step, not one per token. And the scheduler
    waits for the loop before computing the next step, because the two threads
    share the GIL: every socket send of the loop releases it, and while the
    model thread runs Python the loop then waits up to the interpreter's switch
    interval (5 ms) to get it back, for EACH send (measured: 0.46 ms per send
    at 16 clients, most of the server's time). Taking turns, the loop sends a
    step's tokens without that contention, then the model computes the next.
    """
    by_loop = collections.defaultdict(list)
    for ticket, item in items:
        if ticket.loop is None:
            ticket._queue.put(item)
        else:
            by_loop[ticket.loop].append((ticket, item))
    taken = []
    for loop, pairs in by_loop.items():
        if not loop.is_closed():
            event = threading.Event()
            loop.call_soon_threadsafe(_put_all, loop, pairs, event)
            taken.append(event)
    deadline = time.monotonic() + wait
    for event in taken:
        event.wait(max(0.0, deadline - time.monotonic()))


def _put_all(loop, pairs, event):
    """On the event loop: queue every token; ``event`` is set once the readers woken by them have run
    (their wake-ups were scheduled first, so a callback scheduled now runs after them)."""
    for ticket, item in pairs:
        ticket._queue.put_nowait(item)
    loop.call_soon(_after_readers, loop, event, 2)


def _after_readers(loop, event, hops):
    """A reader may need a few loop iterations (queue, generator, send): wait ``hops`` more of them."""
    if hops:
        loop.call_soon(_after_readers, loop, event, hops - 1)
    else:
        event.set()
