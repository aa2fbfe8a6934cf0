"""bench/copy_stages.py's reading of the stamps: which stage each figure is, per rep."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from copy_stages import best_round, stages, table

US = 1000  # stamps are in ns


def piece_rep(start: int) -> tuple[tuple[int, int], list, list]:
    """One upload in two pieces and a synchronize: the notebook sends at 0, 10 and 20 µs; the
    worker starts each batch 30 µs apart from 40 µs, runs it 20 µs (the call 15), replies in
    2; the notebook has the last answer at 140 µs."""
    client = [("C.send", start + t * US, start + (t + 5) * US, q)
              for q, t in enumerate((0, 10, 20))]
    worker = []
    for q, t in enumerate((40, 70, 100)):
        worker += [("W.run", start + t * US, start + (t + 20) * US, q),
                   ("W.op", start + (t + 2) * US, start + (t + 17) * US, "htod"),
                   ("W.send", start + (t + 20) * US, start + (t + 22) * US, 0)]
    client.append(("C.recv", start + 125 * US, start + 140 * US, 2))
    return (start, start + 140 * US), client, worker


def test_stages_reads_each_stage_of_a_pipelined_copy() -> None:
    marks, client, worker = [], [], []
    for start in (1_000_000, 2_000_000):
        mark, mine, theirs = piece_rep(start)
        marks.append(mark)
        client += mine
        worker += theirs
    # a stamp outside every rep (the next operation's) is no rep's
    worker.append(("W.run", 5_000_000, 5_100_000, 9))
    found = stages(marks, client, worker)
    assert found["total"] == 140
    assert found["client_sent"] == 25
    assert found["first_batch"] == 40
    assert found["worker_op"] == 15
    assert found["worker_per_batch"] == 22
    assert found["batch_to_batch"] == 30
    assert found["send_to_send"] == 10
    assert found["reply_after"] == 140 - 120
    assert found["batches"] == 3


def test_a_rep_without_worker_stamps_is_left_out() -> None:
    found = stages([(0, 100 * US)], [("C.send", 0, 5 * US, 0)], [])
    assert math.isnan(found["total"])


def test_each_operation_comes_from_its_best_round() -> None:
    rounds = [{"read": {"total": 90.0, "batches": 1.0}, "copy": {"total": 300.0, "batches": 4.0}},
              {"read": {"total": 80.0, "batches": 1.0}, "copy": {"total": 310.0, "batches": 5.0}}]
    best = best_round(rounds)
    assert best["read"]["total"] == 80.0
    assert best["copy"] == {"total": 300.0, "batches": 4.0}


def test_table_sets_pieces_against_the_wire() -> None:
    raw = {"read 4 B": {"p50": 40.0}, "upload 1MiB": {"p50": 160.0}}
    shim = {"read 4 B": dict.fromkeys(("total", "client_sent", "first_batch", "worker_per_batch",
                                       "worker_op", "batch_to_batch", "send_to_send",
                                       "reply_after"), 50.0) | {"batches": 1.0},
            "upload 1MiB": dict.fromkeys(("client_sent", "first_batch", "worker_per_batch",
                                          "worker_op", "batch_to_batch", "reply_after"), 10.0)
            | {"total": 200.0, "send_to_send": 36.0, "batches": 5.0}}
    rows = table(raw, shim)
    read, upload = rows[2], rows[3]
    assert "| 0.80 |" in read and read.endswith("|  |")
    # four pieces (the fifth batch is the synchronize): the wire's (160 - 40) / 4 = 30 a piece
    assert "| 0.80 |" in upload and upload.endswith("| 36.0 / 30.0 |")
