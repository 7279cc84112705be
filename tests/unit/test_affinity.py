"""Prefix affinity and its overflow path, against a HealthBoard fed reports as workers send them."""

from __future__ import annotations

import time

from schemas import ModelHealth
from services.router.affinity import Affinity, home_partition
from services.router.health import HealthBoard

PARTITIONS = 6


def report(board: HealthBoard, backlog: dict[int, int], *, worker: str = "w1", full: bool = True) -> None:
    board.report(ModelHealth(model="m", worker=worker, ts_ms=int(time.time() * 1000), interval_s=2, window_s=60,
                             requests=0, errors=0, in_flight=8 if full else 0, capacity=8,
                             backlog=sum(backlog.values()), partition_backlog=backlog))


def key_with_home(partition: int) -> bytes:
    return next(k for i in range(10_000) if home_partition(k := f"conv-{i}".encode(), PARTITIONS) == partition)


def test_murmur2_is_aiokafkas_for_every_length_and_byte():
    import random

    from aiokafka.partitioner import murmur2 as reference

    from services.router.affinity import murmur2

    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(n)) for n in range(70) for _ in range(20)]
    keys += [b"", b"\xff" * 33, b"0123456789abcdef0123456789abcdef"]
    for key in keys:
        assert murmur2(key) == reference(key), key


def test_home_partition_is_kafkas_default_partitioner():
    from aiokafka.partitioner import DefaultPartitioner

    for i in range(200):
        key = f"k{i}".encode()
        assert home_partition(key, PARTITIONS) == DefaultPartitioner()(key, list(range(PARTITIONS)), None)


def test_without_reports_affinity_holds():
    affinity = Affinity(HealthBoard())
    key = key_with_home(3)
    assert [affinity.choose("m", key, PARTITIONS, 0) for _ in range(50)] == [(3, False)] * 50


def test_a_partition_over_its_bound_spills_to_the_least_loaded():
    board = HealthBoard()
    affinity = Affinity(board)
    report(board, {0: 9, 1: 4, 2: 30, 3: 2, 4: 7, 5: 5})
    assert affinity.choose("m", key_with_home(1), PARTITIONS, 8) == (1, False)  # 4 waiting: stays home
    assert affinity.choose("m", key_with_home(2), PARTITIONS, 8) == (3, True)   # 30 waiting: to the least
    assert affinity.choose("m", key_with_home(2), PARTITIONS, 100) == (2, False)


def test_what_this_router_sent_to_a_full_worker_counts_until_the_next_report():
    board = HealthBoard()
    affinity = Affinity(board)
    report(board, {p: 0 for p in range(PARTITIONS)}, full=True)
    key = key_with_home(4)
    chosen = [affinity.choose("m", key, PARTITIONS, 3)[0] for _ in range(6)]
    # Four stay home (0, 1, 2, 3 already sent there are not over 3), then it spills.
    assert chosen[:4] == [4, 4, 4, 4] and chosen[4] != 4
    time.sleep(0.002)
    report(board, {p: 0 for p in range(PARTITIONS)}, full=True)  # a new report counts them
    assert affinity.choose("m", key, PARTITIONS, 3) == (4, False)


def test_a_worker_with_room_takes_what_is_sent_so_nothing_piles_up():
    board = HealthBoard()
    affinity = Affinity(board)
    report(board, {p: 0 for p in range(PARTITIONS)}, full=False)
    key = key_with_home(5)
    assert {affinity.choose("m", key, PARTITIONS, 3) for _ in range(40)} == {(5, False)}
