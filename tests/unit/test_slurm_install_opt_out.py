"""The local SLURM cluster of tests/slurm/ installs system packages only when allowed: LITEPPO_SLURM=skip
refuses before apt-get runs, and an install announces itself first."""

import pytest

from tests.slurm import cluster


def _missing_everything(monkeypatch):
    monkeypatch.setattr(cluster, "find_programs", lambda: {name: None for name in cluster.DAEMONS + cluster.CLIENTS})
    monkeypatch.setattr(cluster, "_install_failure", None)
    monkeypatch.setattr(cluster.sys, "platform", "linux")


def test_skip_refuses_before_installing(monkeypatch):
    _missing_everything(monkeypatch)
    monkeypatch.setenv("LITEPPO_SLURM", "skip")
    ran = []
    monkeypatch.setattr(cluster.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(cluster.SlurmUnavailable, match="LITEPPO_SLURM=skip"):
        cluster.ensure_slurm()
    assert ran == []


def test_an_install_is_announced_first(monkeypatch, capsys):
    _missing_everything(monkeypatch)
    monkeypatch.delenv("LITEPPO_SLURM", raising=False)
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda name, path=None: "/usr/bin/apt-get")
    monkeypatch.setattr(cluster.os.path, "exists", lambda p: True)  # a policy-rc.d exists: none is written
    said = []
    monkeypatch.setattr(cluster.sys, "__stderr__", type("E", (), {"write": lambda self, t: said.append(t),
                                                                    "flush": lambda self: None})())

    class Failed:
        returncode, stdout, stderr = 1, "", "offline"

    monkeypatch.setattr(cluster.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(cluster.SlurmUnavailable, match="apt-get failed"):
        cluster.ensure_slurm()
    assert any("installing" in t and "apt-get (as root)" in t and "LITEPPO_SLURM=skip" in t for t in said)
