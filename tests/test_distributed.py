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
ROOT = HERE.parent


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it), for torch.distributed's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(script: str, *args) -> str:
    """``script`` on two gloo processes; fails with the workers' output when they fail or hang, else returns their
    standard output."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    port = str(free_port())  # not a fixed one: another test run or launcher on this machine may hold it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(HERE / script), *map(str, args)]  # a script of tests/, or a path
    # A rank that leaves DDP's all-reduce out of step hangs the other one: the timeout turns that into a failure,
    # and takes the launcher's worker processes down with it.
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("the two processes did not finish within 300 s (a hang in a collective)")
    assert launcher.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_two_processes_keep_selector_and_generator_in_sync(tmp_path, mode):
    two_processes("dist_train.py", tmp_path, mode)
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


@pytest.mark.slow
def test_a_two_process_run_resumed_inside_a_later_pass_equals_the_uninterrupted_run(tmp_path):
    """Resumed from checkpoint-4 (inside the second pass over the data) to step 7 (in the third): both ranks must
    draw the uninterrupted run's questions. accelerate's wrapper around a resumed pass's batches hid the sampler
    from the Trainer's set_epoch, so the resumed ranks replayed the first pass's order."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    two_processes("dist_resume.py", straight, 7)
    two_processes("dist_resume.py", resumed, 4)
    two_processes("dist_resume.py", resumed, 7, "resume")
    for rank in (0, 1):
        a, b = (json.loads((d / f"rank{rank}.json").read_text()) for d in (straight, resumed))
        assert [h["step"] for h in b["logs"]] == [1, 2, 3, 4, 5, 6, 7]
        assert (b["selector"], b["generator"]) == (a["selector"], a["generator"]), rank  # bit for bit
        assert b["logs"] == a["logs"], rank


@pytest.mark.slow
def test_the_training_command_runs_its_stages_on_two_processes(tmp_path):
    """scripts/train_rl.py under a two-process launcher: every rank trains the warm-up and probes the run folder; one
    writes. Before, the ranks' probes and warm-up saves removed each other's files (about every other start); and
    rank 1 repeated the log lines, saying on a fresh run that it reused the data and evaluation rank 0 had just
    written."""
    out = tmp_path / "run"
    said = two_processes(ROOT / "scripts" / "train_rl.py", "--config", ROOT / "configs" / "demo.yaml",
                         "--output_dir", out, "--max_steps", "2", "--demo_num_train", "32", "--demo_num_eval", "8",
                         "--generator_warmup_steps", "2", "--per_device_train_batch_size", "16", "--disable_tqdm",
                         "true")
    state = json.loads((out / "trainer_state.json").read_text())
    # 8 questions per step (4 on each rank) of 32: two steps are half a pass; on one process they would be a quarter
    assert [h["epoch"] for h in state["log_history"] if "selector/loss" in h] == [0.5]
    assert (out / "warmup" / "generator" / "model.safetensors").exists() and (out / "report.json").exists()
    assert "reusing" not in said
    for line in ("retrieval: ranking", "warm-up: generator SFT, 2 steps", "evaluation (before DRO): 8 questions"):
        assert said.count(line) == 1, (line, said)


def test_the_process_group_waits_as_long_as_ddp_timeout_on_a_cpu(tmp_path):
    """The other processes wait for the main one's stages (retrieval, the "before" evaluation) at a barrier. With
    use_cpu, transformers created the process group with gloo's default 30 minutes whatever --ddp_timeout said."""
    probe = ("from datetime import timedelta\n"
             "import torch\n"
             "from dro_rl import DROConfig\n"
             "from dro_rl.recipe import use_ddp_timeout\n"
             f"dro = DROConfig(output_dir={str(tmp_path)!r}, use_cpu=True, bf16=False, report_to='none', "
             "ddp_timeout=77)\n"
             "group = torch.distributed.distributed_c10d._get_default_group()\n"
             "use_ddp_timeout(dro)\n"
             "assert group._get_backend(torch.device('cpu')).options._timeout == timedelta(seconds=77)\n")
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
