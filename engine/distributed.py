"""Serving across hosts with JAX's own multi-controller runtime.

Every process runs this same program over one global mesh (model.sharding)
spanning all processes' devices. Process 0 alone serves HTTP and schedules;
for each compiled call it makes, it first publishes the call's host inputs
(the step's arrays before packing, a few KB) through the key-value store of
JAX's distributed runtime (`jax.distributed`), and every other process makes
the same call with them. The collectives inside the forward programs keep
the processes in step (process 0 cannot finish such a call before every
process has read and joined it); the sampler's calls have none, so a
follower may trail by a call or two, and the last `_KEPT_CALLS` keys stay.

Where the processes find each other (flags, else environment):

- `--coordinator-address HOST:PORT`, `--num-processes N`, `--process-id I`;
- BALANSIS_COORDINATOR_ADDRESS, BALANSIS_NUM_PROCESSES, BALANSIS_PROCESS_ID;
- a Kubernetes LeaderWorkerSet: LWS_LEADER_ADDRESS (port BALANSIS_COORDINATOR_PORT,
  default 8476), LWS_GROUP_SIZE, LWS_WORKER_INDEX;
- a Kubernetes StatefulSet: the process id is the pod's ordinal, the number
  at the end of its host name (`balansis-3` → 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pickle
import re
import socket

DEFAULT_COORDINATOR_PORT = 8476
POLL_MS = 5_000  # a follower waits this long for the next call, then asks again (an idle server)
_STOP = "stop"
# Keys of past calls kept in the store. A call without collectives (the sampler's) lets process 0
# run ahead of a follower that has not read it yet; deleting it at once (as the next call was
# published) left a slow follower waiting for a key that was gone, and process 0's shutdown
# waiting for that follower (seen under load). Followers trail by a call or two: 16 is ample.
_KEPT_CALLS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessGroup:
    coordinator_address: str
    num_processes: int
    process_id: int


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (JAX's distributed runtime; see engine/distributed.py)")
    group.add_argument("--coordinator-address", default=None,
                       help="HOST:PORT of process 0 (env BALANSIS_COORDINATOR_ADDRESS, or LWS_LEADER_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="processes in all (env BALANSIS_NUM_PROCESSES, or LWS_GROUP_SIZE); default 1")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index, 0 serves HTTP (env BALANSIS_PROCESS_ID, LWS_WORKER_INDEX, "
                            "or a StatefulSet pod's ordinal)")


def process_group(args: argparse.Namespace, environ=os.environ) -> ProcessGroup | None:
    """The group these flags and this environment describe; None for a single process."""
    num = args.num_processes or _int(environ.get("BALANSIS_NUM_PROCESSES") or environ.get("LWS_GROUP_SIZE"))
    if not num or num == 1:
        return None
    address = args.coordinator_address or environ.get("BALANSIS_COORDINATOR_ADDRESS")
    if address is None and environ.get("LWS_LEADER_ADDRESS"):
        port = environ.get("BALANSIS_COORDINATOR_PORT", DEFAULT_COORDINATOR_PORT)
        address = f"{environ['LWS_LEADER_ADDRESS']}:{port}"
    if address is None:
        raise ValueError("multi-host needs the coordinator's address: --coordinator-address HOST:PORT "
                         "(or BALANSIS_COORDINATOR_ADDRESS)")
    process_id = args.process_id
    if process_id is None:
        process_id = _int(environ.get("BALANSIS_PROCESS_ID") or environ.get("LWS_WORKER_INDEX"))
    if process_id is None:
        ordinal = re.search(r"-(\d+)$", environ.get("HOSTNAME") or socket.gethostname())
        process_id = int(ordinal.group(1)) if ordinal else None
    if process_id is None:
        raise ValueError("multi-host needs this process's id: --process-id (or BALANSIS_PROCESS_ID)")
    if not 0 <= process_id < num:
        raise ValueError(f"process id {process_id} is not in [0, {num})")
    return ProcessGroup(address, num, process_id)


def initialize(group: ProcessGroup | None) -> None:
    """Join the group (before any other JAX call); nothing for a single process."""
    if group is None:
        return
    import jax

    # Collectives between CPU devices of different processes (tests, CPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(group.coordinator_address, num_processes=group.num_processes,
                               process_id=group.process_id)


def is_multi_process() -> bool:
    import jax

    return jax.process_count() > 1


class CallChannel:
    """Process 0 → every other process: the host inputs of each compiled call, in order."""

    _channels = itertools.count()  # one per runner, created in the same order everywhere

    def __init__(self):
        import jax
        from jax._src import distributed  # the runtime's key-value store client

        self._client = distributed.global_state.client
        self._prefix = f"balansis/calls/{next(CallChannel._channels)}"
        self._count = 0
        self.is_leader = jax.process_index() == 0

    def publish(self, call) -> None:
        """Process 0: announce the next call."""
        self._client.key_value_set_bytes(f"{self._prefix}/{self._count}", pickle.dumps(call))
        if self._count >= _KEPT_CALLS:
            self._client.key_value_delete(f"{self._prefix}/{self._count - _KEPT_CALLS}")
        self._count += 1

    def stop(self) -> None:
        self.publish(_STOP)

    def follow(self, run) -> None:
        """Any other process: run(call) for every call process 0 announces, until it stops."""
        import jax

        while True:
            key = f"{self._prefix}/{self._count}"
            try:
                data = self._client.blocking_key_value_get_bytes(key, POLL_MS)
            except jax.errors.JaxRuntimeError as e:  # the wait timed out: wait again; anything else ends it
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                raise
            self._count += 1
            call = pickle.loads(data)
            if call == _STOP:
                return
            run(call)


def _int(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None
