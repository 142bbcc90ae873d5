"""Two nodes on one machine: two torchrun agents (--nnodes 2, --node_rank 0 and 1) meeting at one
rendezvous on loopback, and the DeepSpeed launcher with a two-entry hostfile reaching both
"nodes" through pdsh and ssh, against an sshd this test starts on loopback.

The ssh test installs Debian's openssh-server and pdsh where it can (root with apt-get, as the
Slurm tests install Slurm), and is skipped with the reason elsewhere.
"""

import os
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.dist.parallel_worker import TINY
from tests.helpers import ROOT, TORCH_EXTENSIONS, launch_env, make_word_shards
from tests.test_deepspeed import free_port, run_overrides

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_word_shards(tmp_path_factory.mktemp("corpus"), seq_len=16)


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]


def test_two_torchrun_agents_are_two_nodes_of_one_job(shards, tmp_path):
    """Each agent starts one worker; together they are dp=2 (global ranks from the node rank)."""
    run_dir, port = tmp_path / "run", free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "pretrain.cli", "train", *TINY, *run_overrides(shards, run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env(), cwd=ROOT) for node in (0, 1)]
    outputs = []
    for agent in agents:
        out, _ = agent.communicate(timeout=300)
        outputs.append(out)
        assert agent.returncode == 0, out[-4000:]
    assert "dp=2" in outputs[0] and "model:" not in outputs[1]  # rank 0 (node 0) logs, rank 1 does not
    assert steps(run_dir) == [1, 2, 3, 4]


def _install(*packages: str) -> str | None:
    """Install Debian packages (root and apt-get only); the reason when that is impossible."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "needs root and apt-get to install " + " ".join(packages)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(command, capture_output=True, env=env, timeout=600).returncode == 0:
        return None
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return None if done.returncode == 0 else f"apt-get install {' '.join(packages)} failed: {done.stderr[-300:]}"


@pytest.fixture
def sshd(tmp_path):
    """An sshd on a free loopback port that admits root with a key made here; yields (port, ssh args)."""
    if not (shutil.which("pdsh") and Path("/usr/sbin/sshd").is_file()):
        problem = _install("openssh-server", "pdsh")
        if problem:
            pytest.skip(problem)
    folder = tmp_path / "ssh"
    folder.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "id.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    daemon = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    args = (f"-p {port} -i {folder / 'id'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR -o BatchMode=yes")
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["ssh", *args.split(), "127.0.0.1", "true"], capture_output=True).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not come up: {daemon.stderr.read()[-300:] if daemon.poll() is not None else ''}")
            time.sleep(0.2)
        yield port, args
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.mark.skipif(find_spec("deepspeed") is None, reason="deepspeed is not installed (extra: deepspeed)")
def test_deepspeed_launcher_hostfile_two_nodes_over_pdsh_and_ssh(shards, tmp_path, sshd):
    """`deepspeed --hostfile` with two hosts (localhost and 127.0.0.1, one slot each): pdsh logs in
    to each over ssh, starts DeepSpeed's per-node launcher with its node rank, and the two
    workers train one dp=2 job (the native engine: the launcher starts any engine)."""
    port, ssh_args = sshd
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # pdsh passes on only some variables: the rest go through DeepSpeed's environment file.
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text(f"OMP_NUM_THREADS=1\nTORCH_EXTENSIONS_DIR={TORCH_EXTENSIONS}\n")
    run_dir = tmp_path / "run"
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    command = [launcher, "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--no_ssh_check", "--module", "pretrain.cli", "train", *TINY,
               *run_overrides(shards, run_dir)]
    env = launch_env(PDSH_SSH_ARGS_APPEND=ssh_args, DS_ENV_FILE=str(env_file))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "localhost: " in output and "127.0.0.1: " in output, output[-3000:]  # pdsh's per-host prefixes
    assert "dp=2" in output and steps(run_dir) == [1, 2, 3, 4], output[-3000:]
