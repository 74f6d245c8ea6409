"""Two CPU processes (gloo): after several DRO steps both models are identical on both ranks and metrics agree, a NaN
loss on one rank skips the update on both (instead of hanging DDP), and each rank's rewards are its own rows'."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it), for torch.distributed's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_two_processes_keep_selector_and_generator_in_sync(tmp_path, mode):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    port = str(free_port())  # not a fixed one: another test run or launcher on this machine may hold it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(HERE / "dist_train.py"), str(tmp_path), mode]
    # A rank that leaves DDP's all-reduce out of step hangs the other one: the timeout turns that into a failure,
    # and takes the launcher's worker processes down with it.
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("the two processes did not finish within 300 s (a hang in a collective)")
    assert launcher.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["final"] == ranks[1]["final"]  # gradients of both models were all-reduced
    assert ranks[0]["final"][0] != ranks[0]["initial"][0] and ranks[0]["final"][1] != ranks[0]["initial"][1]
    # every logged metric is gathered over both ranks, so both processes log the same values
    keys = ("selector/support_recall", "generator/answer_logprob", "weights/ess", "reward", "selector/loss",
            "generator/loss")
    for a, b in zip(ranks[0]["logs"], ranks[1]["logs"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    # rank 1's NaN loss at the second step: both ranks skipped that update and said so
    assert [h.get("guard/skipped_nonfinite_loss") for h in ranks[0]["logs"]] == [None, 1.0, None]
    assert [h.get("guard/skipped_nonfinite_loss") for h in ranks[1]["logs"]] == [None, 1.0, None]
    assert all(r["rewards_are_local"] and r["scored_in_loss"] for r in ranks)
