import errno
import threading
import time

import grpc
import pytest

from csi.errors import code_for
from engine import errors
from engine.locks import KeyLocks


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.InvalidSpec("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.OutOfCapacity("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.InUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Busy("x"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Precondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.StaleVersion("x"), grpc.StatusCode.ABORTED),
        (errors.InvalidToken("x"), grpc.StatusCode.ABORTED),
        (errors.DataLoss("x"), grpc.StatusCode.DATA_LOSS),
        (errors.CommandFailed(["mkfs"], 1, "", "bad"), None),  # -> INTERNAL with traceback
        (ValueError("x"), None),
    ],
)
def test_code_table(exc, code):
    assert code_for(exc) == code


def test_key_locks_answer_busy_instead_of_queueing():
    locks = KeyLocks()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with locks.hold("vol-1"):
            inside.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    with pytest.raises(errors.Busy):
        with locks.hold("vol-1"):
            pass
    with locks.hold("vol-2"):
        pass
    release.set()
    t.join()
    with locks.hold("vol-1"):
        pass


@pytest.mark.parametrize("err, code", [
    (errno.ENOENT, grpc.StatusCode.NOT_FOUND),
    (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errno.ESTALE, grpc.StatusCode.ABORTED),
    (errno.EIO, grpc.StatusCode.UNAVAILABLE),
    (errno.EPROTO, None),  # no domain meaning: INTERNAL with its traceback
])
def test_replica_errnos_translate_through_the_one_table(err, code):
    from mirror.client import Fenced, ReplicaError
    assert code_for(ReplicaError(err, "replica said no")) == code
    assert code_for(Fenced(errno.ESTALE, "fenced")) == grpc.StatusCode.ABORTED


def test_key_locks_can_wait_for_a_holder_that_finishes():
    locks = KeyLocks()
    inside = threading.Event()

    def hold_briefly():
        with locks.hold("vol-1"):
            inside.set()
            time.sleep(0.2)

    t = threading.Thread(target=hold_briefly)
    t.start()
    inside.wait()
    with pytest.raises(errors.OperationPending):
        with locks.hold("vol-1", wait_s=0.01):
            pass
    with locks.hold("vol-1", wait_s=5):  # released meanwhile: held now
        assert not t.is_alive()
    t.join()
