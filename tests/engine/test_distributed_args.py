"""Where a process finds its multi-host group: flags, our environment variables,
a Kubernetes LeaderWorkerSet's, or a StatefulSet pod's ordinal."""

from __future__ import annotations

import argparse

import pytest

from engine.distributed import ProcessGroup, add_distributed_arguments, process_group


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_distributed_arguments(parser)
    return parser.parse_args(argv)


def test_one_process_needs_nothing():
    assert process_group(_args(), environ={}) is None
    assert process_group(_args("--num-processes", "1"), environ={}) is None


def test_flags():
    group = process_group(_args("--num-processes", "2", "--process-id", "1", "--coordinator-address", "h:1234"),
                          environ={})
    assert group == ProcessGroup("h:1234", 2, 1)


def test_our_environment_variables():
    env = {"BALANSIS_NUM_PROCESSES": "4", "BALANSIS_PROCESS_ID": "3", "BALANSIS_COORDINATOR_ADDRESS": "lead:99"}
    assert process_group(_args(), environ=env) == ProcessGroup("lead:99", 4, 3)
    # A flag wins over the environment.
    assert process_group(_args("--process-id", "0"), environ=env) == ProcessGroup("lead:99", 4, 0)


def test_a_leader_worker_set():
    env = {"LWS_LEADER_ADDRESS": "llm-0.llm.default", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    assert process_group(_args(), environ=env) == ProcessGroup("llm-0.llm.default:8476", 2, 1)
    env["BALANSIS_COORDINATOR_PORT"] = "9000"
    assert process_group(_args(), environ=env).coordinator_address == "llm-0.llm.default:9000"


def test_a_stateful_set_pod_ordinal():
    env = {"BALANSIS_NUM_PROCESSES": "3", "BALANSIS_COORDINATOR_ADDRESS": "balansis-0.balansis:8476",
           "HOSTNAME": "balansis-2"}
    assert process_group(_args(), environ=env).process_id == 2


@pytest.mark.parametrize("argv, env, message", [
    (("--num-processes", "2", "--process-id", "0"), {}, "coordinator's address"),
    (("--num-processes", "2", "--coordinator-address", "h:1"), {"HOSTNAME": "laptop"}, "this process's id"),
    (("--num-processes", "2", "--process-id", "2", "--coordinator-address", "h:1"), {}, "not in [0, 2)"),
])
def test_an_incomplete_group_is_a_clear_error(argv, env, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        process_group(_args(*argv), environ=env)
