"""Phased per-document LoRA TTT (eval/ttt_lora.py): score-first by its event log, nothing carried
across documents, phases trained on scored documents only, one process = two.

    .venv/bin/python -m pytest -q tests/test_ttt_lora.py
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.byte_tables import ByteTables
from eval.ttt import check_score_before_update
from eval.ttt_ledger import IsolationLedger
from eval.ttt_lora import doc_queue, find_documents, phase_bounds, phased_lora_ttt
from pipeline.errors import UserError

V, SEQ = 32, 16
SETS = [f"model.vocab_size={V}", "model.num_layers=2", "model.model_dim=16", "model.num_heads=2",
        "model.num_kv_heads=1", f"eval.seq_len={SEQ}", "eval.stride=8", "ttt.mode=phased_lora",
        "ttt.lora_chunk_tokens=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(*extra):
    from pipeline.recipe import load_recipe

    return load_recipe("tiny", SETS + list(extra))


def _model(recipe, seed=0):
    from pipeline.model import build_model

    torch.manual_seed(seed)
    model = build_model(recipe.model)
    with torch.no_grad():  # the zero-initialised projections would make every adapter gradient vanish
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _tables():
    base = torch.tensor([0] * 4 + [1 + i % 3 for i in range(V - 4)], dtype=torch.int16)
    boundary = torch.tensor([True] * 4 + [False] * (V - 4))
    return ByteTables(base, torch.zeros(V, dtype=torch.bool), boundary)


def _ttt(recipe, **kw):
    base = dict(lora_rank=4, lora_chunk_tokens=4, lora_batch_docs=3, lora_lr=0.05, phase_prefix_docs=0,
                phases=1, chunk_tokens=24, epochs=1, lr=0.05, batch_seqs=4)
    base.update(kw)
    return replace(recipe.ttt, **base)


def _docs_stream(lengths, seed=0, copies=()):
    """[BOS] + random tokens per document; `copies` = (i, j): document j repeats document i."""
    rng = np.random.default_rng(seed)
    bodies = [list(rng.integers(4, V, size=n)) for n in lengths]
    for i, j in copies:
        bodies[j] = list(bodies[i])
    out = []
    for b in bodies:
        out += [1] + b
    return np.array(out, dtype=np.int64)


def _fit(stream):
    """Cut a stream to a whole number of eval windows + 1 (eval truncation keeps it whole)."""
    n = ((len(stream) - 1) // SEQ) * SEQ + 1
    return stream[:n]


# --------------------------------------------------------------------------------------------
# documents and schedule


def test_documents_tile_the_targets_and_the_queue_is_longest_first():
    tok = np.array([5, 6, 1, 7, 1, 1, 8, 9, 10, 1])  # no BOS first, an empty document, BOS last
    docs = find_documents(tok)
    assert docs.starts.tolist() == [0, 2, 4, 5]
    assert docs.lengths.tolist() == [2, 2, 1, 4]  # the final BOS is the last document's target
    covered = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in zip(docs.starts, docs.lengths)])
    assert sorted(covered.tolist()) == list(range(1, tok.size))
    assert doc_queue(docs).tolist() == [3, 0, 1, 2]  # longest first, ties by position
    assert phase_bounds(10, 6, 3) == [2, 4, 6]
    assert phase_bounds(4, 100, 2) == [2]  # capped, and no phase after the last document
    assert phase_bounds(10, 0, 3) == [] and phase_bounds(10, 2, 3) == [1, 2]


def _reference_check(events, context=()) -> list[str]:
    """The score-before-update rule position by position, with Python sets (slow, obviously right)."""
    scored, problems = set(), []
    for kind, tag, lo, hi in events:
        span = range(lo, hi + 1)
        if kind == "score":
            if scored.intersection(span):
                problems.append(f"score {tag}: positions {lo}..{hi} include already scored ones")
            scored.update(span)
        else:
            gap = next((p for p in range(max(lo, 1), hi + 1) if p not in scored and p not in set(context)), None)
            if gap is not None:
                problems.append(f"update {tag}: trains on positions {lo}..{hi}, but position "
                                f"{gap} was not scored before it")
    return problems


def test_interval_checker_agrees_with_a_position_by_position_reference():
    rng = random.Random(0)
    for _ in range(300):
        events = []
        for _ in range(rng.randint(1, 25)):
            lo = rng.randint(0, 60)
            events.append((rng.choice(["score", "score", "update"]), len(events), lo, lo + rng.randint(0, 9)))
        context = rng.sample(range(70), rng.randint(0, 5))
        assert check_score_before_update(events) == _reference_check(events)
        assert check_score_before_update(events, context) == _reference_check(events, context)


# --------------------------------------------------------------------------------------------
# score first


def test_every_target_is_scored_once_before_any_update_that_saw_it():
    recipe = _recipe()
    stream = _fit(_docs_stream([30, 7, 19, 3, 25, 11, 40]))
    cfg = _ttt(recipe, phase_prefix_docs=4, phases=2)
    events = []
    tables = _tables()
    res = phased_lora_ttt(_model(recipe), stream, tables, recipe.eval, cfg, "cpu", events=events)
    n = stream.size
    assert res.result.token_count == n - 1
    assert res.result.byte_count == tables.count_bytes(stream)
    assert res.phases_run == 2 and res.isolation == []
    times = np.zeros(n, dtype=int)
    for kind, _, lo, hi in events:
        if kind == "score":
            times[lo:hi + 1] += 1
    assert times[0] == 0 and (times[1:] == 1).all()  # every target exactly once
    assert sum(e[0] == "update" for e in events) > 20
    starts = res.documents.starts
    assert check_score_before_update(events, context=starts) == []
    # The existing checker agrees up to the one exemption: a window's first input is its
    # document's BOS, which is the previous document's (maybe later scored) last target.
    flagged = check_score_before_update(events)
    assert flagged  # longest-first order does read such BOS tokens early
    gaps = {int(msg.rsplit("position ", 1)[1].split()[0]) for msg in flagged}
    assert gaps <= set(starts.tolist()) and all(stream[g] == 1 for g in gaps)
    # and a log with an update moved before its score is caught
    i = next(k for k, e in enumerate(events) if e[0] == "update" and e[1][0] != "phase")
    j = max(k for k in range(i) if events[k][0] == "score" and events[k][1][0] == events[i][1][0])
    broken = events[:j] + [events[i]] + events[j:i] + events[i + 1:]
    assert check_score_before_update(broken, context=starts)


def test_score_ttt_dispatches_the_mode_and_reports_compliance():
    from pipeline.distributed import init
    from pipeline.stages.evaluate import Data, score_ttt

    recipe = _recipe("ttt.lora_rank=4", "ttt.lora_chunk_tokens=4", "ttt.phase_prefix_docs=2", "ttt.phases=1",
                     "ttt.epochs=1")
    stream = _fit(_docs_stream([20, 9, 14, 30]))
    tables = _tables()
    data = Data(None, [], stream.astype(np.uint16), tables, None, tables.count_bytes(stream))
    lines = []
    out = score_ttt(_model(recipe), data, recipe, init("cpu"), lines.append)
    assert out["compliant"] is True and out["token_count"] == stream.size - 1
    assert any(line.startswith("ttt_phase 1/1 trained_docs=2") for line in lines)
    assert any("ttt_exact mode=phased_lora" in line for line in lines)


# --------------------------------------------------------------------------------------------
# nothing carries across documents


def _copies_run(recipe, cfg):
    # Documents 0 and 2 are the same 24 tokens, longest: queued first, one after the other.
    stream = _fit(_docs_stream([24, 10, 24, 15, 6, 12], seed=3, copies=[(0, 2)]))
    res = phased_lora_ttt(_model(recipe), stream, _tables(), recipe.eval, cfg, "cpu")
    return res


def test_identical_documents_score_identically_and_a_carried_state_does_not(monkeypatch):
    recipe = _recipe()
    cfg = _ttt(recipe, lora_batch_docs=1)
    res = _copies_run(recipe, cfg)
    assert res.isolation == []
    assert res.doc_nats[0] == res.doc_nats[2]  # bitwise: the same fresh start, the same steps

    # Control: hand each batch the previous batch's (trained) adapters instead of fresh ones.
    from eval.lora_adapters import BatchedLoRA

    fresh, kept = BatchedLoRA.fresh, {}

    def carried(self, docs, ledger=None):
        if "state" not in kept:
            kept["state"] = fresh(self, docs, ledger)
        return kept["state"]

    monkeypatch.setattr(BatchedLoRA, "fresh", carried)
    leaky = _copies_run(recipe, cfg)
    assert leaky.doc_nats[0] == res.doc_nats[0]  # the first document sees the same fresh state
    assert leaky.doc_nats[2] < res.doc_nats[2] - 2.0  # the copy profits from its twin's training
    assert leaky.isolation and "adapter slot 0, last reset for document 0" in leaky.isolation[0]


def test_a_document_scores_the_same_whatever_its_batch():
    recipe = _recipe()
    stream = _fit(_docs_stream([17, 5, 33, 12, 12, 8, 26], seed=5))
    runs = [phased_lora_ttt(_model(recipe), stream, _tables(), recipe.eval, _ttt(recipe, lora_batch_docs=b), "cpu")
            for b in (1, 4)]
    np.testing.assert_allclose(runs[0].doc_nats, runs[1].doc_nats, rtol=1e-5)


def test_isolation_ledger_flags_foreign_slots_and_out_of_document_reads():
    ledger = IsolationLedger([0, 10], [10, 5])
    ledger.reset(0, 0)
    ledger.score(0, 0, 1, 4)
    ledger.update(0, 0, 0, 4)
    assert ledger.problems == []
    ledger.score(1, 0, 11, 12)  # slot 0 still holds document 0's state
    ledger.reset(1, 1)
    ledger.update(1, 1, 9, 12)  # reads position 9, inside document 0
    ledger.score(1, 1, 16, 16)  # past the document's last target
    assert len(ledger.problems) == 3


# --------------------------------------------------------------------------------------------
# phases


def test_phases_train_on_scored_documents_only_and_act_after_their_boundary():
    recipe = _recipe()
    stream = _fit(_docs_stream([22, 9, 31, 14, 5, 18, 27, 11], seed=7))
    docs = find_documents(stream)
    queue = doc_queue(docs)
    events = []
    cfg = _ttt(recipe, phase_prefix_docs=4, phases=2, lr=0.5)
    phased = phased_lora_ttt(_model(recipe), stream, _tables(), recipe.eval, cfg, "cpu", events=events)
    plain = phased_lora_ttt(_model(recipe), stream, _tables(), recipe.eval, replace(cfg, phase_prefix_docs=0), "cpu")
    assert phased.phases_run == 2 and plain.phases_run == 0
    # Phase p trains on exactly the first 2*(p+1) queued documents, every one already scored.
    for p, k in enumerate(phase_bounds(len(docs), 4, 2)):
        rows = {(lo, hi) for kind, tag, lo, hi in events if kind == "update" and tag[:2] == ("phase", p)}
        spans = [(docs.starts[d], docs.starts[d] + docs.lengths[d]) for d in queue[:k]]
        assert rows and all(any(s <= lo and hi <= e for s, e in spans) for lo, hi in rows)
        covered = {x for lo, hi in rows for x in range(lo + 1, hi + 1)}
        assert covered == {x for s, e in spans for x in range(s + 1, e + 1)}  # all their targets
    assert check_score_before_update(events, context=docs.starts) == []
    # Documents scored before the first phase are untouched by it; later ones are not.
    first = queue[:2]
    np.testing.assert_array_equal(phased.doc_nats[first], plain.doc_nats[first])
    later = queue[2:]
    assert np.abs(phased.doc_nats[later] - plain.doc_nats[later]).max() > 1e-3


# --------------------------------------------------------------------------------------------
# configuration, head adapter, shipping


def test_recipe_refuses_a_chunk_longer_than_the_window():
    with pytest.raises(UserError, match="lora_chunk_tokens"):
        _recipe(f"ttt.lora_chunk_tokens={SEQ + 1}")


def test_head_adapter_needs_a_hidden_method_and_targets_must_match():
    from eval.lora_adapters import BatchedLoRA

    recipe = _recipe()

    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = torch.nn.Embedding(V, 8)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
            self.head = torch.nn.Linear(8, V)

        def forward(self, ids):
            return self.head(self.blocks[0](self.tok_emb(ids)))

    cfg = _ttt(recipe, lora_targets=r"blocks\.\d+")
    with pytest.raises(UserError, match="lora_head"):
        BatchedLoRA(NoHidden(), cfg, "cpu", 0)
    lora = BatchedLoRA(NoHidden(), replace(cfg, lora_head=False), "cpu", 0)
    assert [(s.name, s.d_in, s.d_out) for s in lora.sites] == [("blocks.0", 8, 8)]
    with pytest.raises(UserError, match="matches no module"):
        BatchedLoRA(NoHidden(), replace(cfg, lora_head=False, lora_targets="nothing"), "cpu", 0)
    # The default targets on the trunk: Q, K, V, attention output and MLP of both blocks, plus the head.
    lora = BatchedLoRA(_model(recipe), recipe.ttt, "cpu", 0)
    assert len(lora.sites) == 2 * 5 and lora.head_dims == (16, V)


def test_the_script_carries_the_mode_only_when_a_recipe_uses_it():
    from pipeline.codegen import runtime_modules

    mine = {"eval/ttt_lora.py", "eval/lora_adapters.py", "eval/ttt_ledger.py"}
    assert mine <= set(runtime_modules(_recipe()))
    assert not mine & set(runtime_modules(_recipe("ttt.mode=score_first")))
    assert not mine & set(runtime_modules(_recipe("ttt.enabled=false")))


# --------------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    res, events = _world_run(rank, world)
    if rank == 0:
        torch.save({"loss": res.result.loss_sum, "tokens": res.result.token_count, "bytes": res.result.byte_count,
                    "events_ok": check_score_before_update(events, context=res.documents.starts) == []}, out)
    dist.barrier()
    dist.destroy_process_group()


def _world_run(rank, world):
    recipe = _recipe()
    stream = _fit(_docs_stream([21, 8, 30, 13, 6, 17, 25, 10, 19], seed=11))
    events = []
    cfg = _ttt(recipe, lora_batch_docs=2, phase_prefix_docs=5, phases=2, batch_seqs=2)
    res = phased_lora_ttt(_model(recipe), stream, _tables(), recipe.eval, cfg, "cpu", rank=rank, world_size=world,
                          events=events)
    return res, events


def test_two_gloo_ranks_give_one_processs_result(tmp_path):
    import torch.multiprocessing as mp

    one, _ = _world_run(0, 1)
    out = str(tmp_path / "two.pt")
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    assert two["events_ok"]
    assert two["tokens"] == one.result.token_count and two["bytes"] == one.result.byte_count
    assert abs(two["loss"] - one.result.loss_sum) < 1e-6 * abs(one.result.loss_sum)
