"""train.cpu_workers > 1: a CPU training step whose forward/backward passes run on threads of the
process (pipeline.stages.train.Trainer imports it by name, so only a script whose recipe sets
train.cpu_workers > 1 carries it; pipeline.stages.train.train_modules).

    total, grad_norm = step_threaded(trainer)   # Trainer.step_on_device's threaded path

The whole step runs single-threaded inside (the passes on the workers, the optimizers on the
calling thread): on a shared CPU an OpenMP team stalls at every tiny kernel's barrier whenever one
of its threads is descheduled, while lone threads only lose their share.
"""

from __future__ import annotations

import threading

import torch


def step_threaded(tr) -> tuple[torch.Tensor, torch.Tensor]:
    """`tr.optimizer_step` with its passes shared among `tr.fast.cpu_workers` threads; returns what it does."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tr.optimizer_step(lambda: passes_threaded(tr))
    finally:
        torch.set_num_threads(threads_before)


def passes_threaded(tr) -> torch.Tensor:
    """train.cpu_workers: the step's passes (in loader order) split into contiguous shares, one
    per thread, each thread single-threaded inside; per-thread gradient sums are added in
    thread order, so the result is deterministic. Batches are read on this thread, in order."""
    r = tr.recipe
    chunks = tr.local_tokens // (r.train.seq_len * tr.chunk_seqs)
    batches = []
    for _ in range(tr.accum):
        x, y = tr.loader.next_batch()
        for c in range(chunks):
            rows = slice(c * tr.chunk_seqs, (c + 1) * tr.chunk_seqs)
            batches.append((x[rows], y[rows]))
    n, workers = len(batches), tr.fast.cpu_workers
    shares = [batches[i * n // workers:(i + 1) * n // workers] for i in range(workers)]
    params = [p for p in tr.model.parameters() if p.requires_grad]
    results: list = [None] * workers

    def work(i: int) -> None:
        try:
            grads, total = [None] * len(params), torch.zeros(())
            for x, y in shares[i]:
                with tr.passes_context():
                    loss, _aux = tr.step_model(x, y, tr.step)
                got = torch.autograd.grad(loss / n, params, allow_unused=True)
                grads = [g if a is None else (a if g is None else a.add_(g)) for a, g in zip(grads, got)]
                total += loss.detach()
            results[i] = (grads, total)
        except BaseException as e:  # re-raised on the calling thread below
            results[i] = e

    helpers = [threading.Thread(target=work, args=(i,), name=f"pgolf-cpu-worker-{i}") for i in range(1, workers)]
    try:
        for h in helpers:
            h.start()
        work(0)
    finally:
        for h in helpers:
            h.join()
    for res in results:
        if isinstance(res, BaseException):
            raise res
    total = torch.zeros(())
    for p, *per_worker in zip(params, *(res[0] for res in results)):
        got = [g for g in per_worker if g is not None]
        if got:
            g = got[0]
            for more in got[1:]:
                g = g.add_(more)
            p.grad = g if p.grad is None else p.grad.add_(g)
    for _, t in results:
        total += t
    return total
