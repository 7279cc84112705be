"""Committing with many records in flight per partition: only up to the lowest unfinished one."""

from aiokafka.structs import TopicPartition

from services.worker.offsets import OffsetTracker

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def test_out_of_order_completion_commits_only_up_to_the_lowest_unfinished():
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.start(TP, offset)
    tracker.finish(TP, 7)
    tracker.finish(TP, 6)
    assert tracker.committable() == {TP: 5}
    tracker.finish(TP, 5)
    assert tracker.committable() == {TP: 8}


def test_partitions_are_independent_and_forgotten_on_revoke():
    tracker = OffsetTracker()
    tracker.start(TP, 0)
    tracker.start(TP1, 10)
    tracker.finish(TP1, 10)
    assert tracker.committable() == {TP: 0, TP1: 11}
    tracker.forget([TP])
    assert tracker.committable() == {TP1: 11}
