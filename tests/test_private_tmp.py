"""No fixed shared /tmp path is trusted as root (issue 37, item 4): slurm/local_cluster.sh and benchmarks/gpu.sh
refuse or ignore a folder that another local user could have made first, or could change."""

import hashlib
import io
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
GPU = REPO / "benchmarks" / "gpu.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("bash"),
                                reason="simulating another local user needs root (chown to nobody)")
NOBODY = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else 65534
KINDS = ["another_user", "world_writable", "symlink"]


def planted(tmp_path, kind):
    """The folder a local user made before us: theirs, or ours but writable by anyone, or a link to elsewhere.
    Returns (the path to hand the script, the real folder behind it)."""
    real = tmp_path / "planted"
    real.mkdir(mode=0o700)
    if kind == "another_user":
        os.chown(real, NOBODY, -1)
    elif kind == "world_writable":
        real.chmod(0o777)
    elif kind == "symlink":
        link = tmp_path / "link"
        link.symlink_to(real)  # ours and private behind it, but the name can be pointed anywhere
        return link, real
    return real, real


@pytest.fixture
def bystander():
    """An unrelated process, the one a planted or stale pid file names."""
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


def stub_bin(folder: Path) -> Path:
    """Stand-ins for apt, munge and Slurm: if the script wrongly goes on, it does so harmlessly and quickly (it
    would otherwise install packages and start daemons in the planted folder)."""
    folder.mkdir(parents=True)
    stubs = {"sinfo": 'printf "n1 idle\\nn2 idle\\n"'}
    for name in ["dpkg", "apt-get", "getent", "mungekey", "chown", "chmod", "munge", "unmunge", "runuser",
                 "slurmctld", "slurmd", "scontrol", "squeue", "sinfo"]:
        (folder / name).write_text(f"#!/bin/sh\n{stubs.get(name, 'exit 0')}\n")
        (folder / name).chmod(0o755)
    return folder


def cluster(command, slurm_dir, tmp_path, stubs=True):
    env = {**os.environ, "DENSESSL_SLURM_DIR": str(slurm_dir)}
    if stubs:
        env["PATH"] = f"{stub_bin(tmp_path / 'bin')}:{env['PATH']}"
    return subprocess.run(["bash", str(CLUSTER), command], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", KINDS)
def test_local_cluster_refuses_a_folder_that_is_not_privately_ours(tmp_path, kind, bystander):
    slurm_dir, real = planted(tmp_path, kind)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (real / "slurm.conf").symlink_to(victim)  # `up` would write the config through it
    (real / "slurmctld.pid").write_text(f"{bystander.pid}\n")  # `down` would kill it
    before = sorted(p.name for p in real.iterdir())
    for command in ["up", "down", "status"]:
        out = cluster(command, slurm_dir, tmp_path / command)
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and str(slurm_dir) in lines[0] and "DENSESSL_SLURM_DIR" in lines[0], out.stderr
        assert bystander.poll() is None, f"{command} killed the process a planted pid file named"
        assert victim.read_text() == "precious\n"
        assert sorted(p.name for p in real.iterdir()) == before


def test_local_cluster_refuses_a_folder_under_a_parent_another_user_owns(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, -1)  # they can rename our folder away and put theirs in its place
    out = cluster("up", parent / "slurm", tmp_path)
    assert out.returncode == 1 and "DENSESSL_SLURM_DIR" in out.stderr, out.stderr
    assert not (parent / "slurm" / "slurm.conf").exists()


def fake_daemon(folder: Path, name: str, conf: Path) -> subprocess.Popen:
    """A process that looks like our `NAME -f CONF` in /proc (its comm is the script's name)."""
    exe = folder / name
    exe.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    exe.chmod(0o755)
    return subprocess.Popen([str(exe), "-f", str(conf)])


def test_down_kills_only_this_clusters_daemons(tmp_path, bystander):
    """A pid file naming a process that is not this cluster's daemon (stale, the pid reused, or planted) is
    removed and the process left alone; the daemon a pid file rightly names is stopped."""
    slurm_dir = tmp_path / "slurm"
    slurm_dir.mkdir(mode=0o700)
    conf = slurm_dir / "slurm.conf"
    other = fake_daemon(tmp_path, "slurmd", tmp_path / "another-cluster.conf")
    ours = fake_daemon(tmp_path, "slurmctld", conf)
    try:
        time.sleep(0.5)
        (slurm_dir / "slurmd-n1.pid").write_text(f"{bystander.pid}\n")
        (slurm_dir / "slurmd-n2.pid").write_text(f"{other.pid}\n")
        (slurm_dir / "slurmctld.pid").write_text(f"{ours.pid}\n")
        out = cluster("down", slurm_dir, tmp_path)
        assert out.returncode == 0, out.stderr
        assert bystander.poll() is None and other.poll() is None, out.stderr
        assert ours.wait(timeout=10) == -signal.SIGTERM
        assert not list(slurm_dir.glob("*.pid"))
    finally:
        for p in (other, ours):
            p.kill()
            p.wait()


# --- benchmarks/gpu.sh

def fake_repo(tmp_path) -> Path:
    """gpu.sh in a folder of its own (it works from its repository root), a carried DALI part and its SHA256,
    a carried core bundle, and a stand-in Python that records what it is asked to install."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(GPU, repo / "benchmarks" / "gpu.sh")
    (repo / "slurm").mkdir()
    shutil.copy(REPO / "slurm" / "private_dir.sh", repo / "slurm" / "private_dir.sh")
    (repo / ".gpu-bundle" / "core").mkdir(parents=True)
    (repo / ".gpu-bundle" / "core" / "densessl-0-py3-none-any.whl").write_bytes(b"core")
    (repo / "py").write_text('#!/bin/sh\necho "$*" >>"$(dirname "$0")/py.log"\n'
                             'case "$*" in *nvidia.dali*) exit 1 ;; esac\n')
    (repo / "py").chmod(0o755)
    return repo


def dali_parts(folder: Path) -> None:
    """What `make gpu-bundle DALI=1` cuts, small: a tar of one wheel, as one part, and SHA256 of the whole."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("nvidia_dali-0-py3-none-any.whl")
        info.size = 4
        t.addfile(info, io.BytesIO(b"dali"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-00").write_bytes(buf.getvalue())
    (folder / "SHA256").write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  1 parts\n")


def gpu(repo, dali_dir, *args):
    env = {**os.environ, "DALI_DIR": str(dali_dir), "PYTHON": str(repo / "py"), "DATA": str(repo / "data"),
           "BUNDLE": str(repo / ".gpu-bundle")}
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def installed_dali(repo) -> bool:
    log = (repo / "py.log").read_text() if (repo / "py.log").exists() else ""
    return any("pip install" in line and "nvidia_dali-0" in line for line in log.splitlines())


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_sh_ignores_dali_parts_in_a_folder_that_is_not_privately_ours(tmp_path, kind):
    repo = fake_repo(tmp_path)
    dali_dir, real = planted(tmp_path, kind)
    dali_parts(real)  # a consistent set: parts and the SHA256 beside them, both theirs
    out = gpu(repo, dali_dir, "--rehearse", str(repo / "out"))
    results = (repo / "out" / "results.md").read_text()
    assert not installed_dali(repo), (repo / "py.log").read_text()
    assert "DALI carried: no" in results and str(dali_dir) in out.stdout, out.stdout + results
    assert not (real / "wheels").exists()


def test_gpu_sh_installs_dali_parts_it_received_itself(tmp_path):
    """The way the parts are meant to arrive still works: each --receive-dali N into a private folder that
    gpu.sh makes, then the run joins, checks and installs them."""
    repo = fake_repo(tmp_path)
    dali_parts(repo / ".gpu-bundle" / "dali")
    dali_dir = tmp_path / "received" / "dali"
    out = gpu(repo, dali_dir, "--receive-dali", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert dali_dir.stat().st_mode & 0o777 == 0o700
    out = gpu(repo, dali_dir, "--rehearse", str(repo / "out"))
    results = (repo / "out" / "results.md").read_text()
    assert installed_dali(repo) and "DALI carried: yes" in results, out.stdout + results


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_sh_will_not_receive_dali_parts_into_a_folder_that_is_not_privately_ours(tmp_path, kind):
    repo = fake_repo(tmp_path)
    dali_parts(repo / ".gpu-bundle" / "dali")
    dali_dir, real = planted(tmp_path, kind)
    out = gpu(repo, dali_dir, "--receive-dali", "0")
    assert out.returncode == 1 and str(dali_dir) in out.stdout + out.stderr, out.stdout + out.stderr
    assert not list(real.iterdir())
