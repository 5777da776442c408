"""Authenticated by default: with no secret given, every process of one user uses that user's own secret.

The secret, ``$XDG_CONFIG_HOME/zpar/secret``, is made on first use (0600 in
a 0700 directory, whatever the umask, once even when many processes start
together); a directory others could write to is refused. A cluster started
with nothing configured speaks CurveZMQ on loopback too: another user's
secret, or a client that says insecure, is refused at once, and a client
holding a secret is refused by a broker run --insecure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import zpar
from zpar import security
from zpar.errors import ConfigError
from zpar.testing import LocalCluster

sys.path.insert(0, os.path.dirname(__file__))
import tasks

REFUSAL_BAR = 5.0  # seconds: a refused peer must know within this


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    """A fresh XDG_CONFIG_HOME for this test (the suite's own is set by conftest)."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def _counters(cluster: LocalCluster) -> dict:
    return cluster.status()["counters"]


# ---------------------------------------------------------------------- this user's secret


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_the_user_secret_is_made_on_first_use_0600_in_a_0700_directory_whatever_the_umask(config_home, umask):
    old = os.umask(umask)
    try:
        secret = security.user_secret()
    finally:
        os.umask(old)
    path = security.user_secret_path()
    assert path == config_home / "zpar" / "secret"
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert secret.startswith(security.FILE_FORMAT.encode()) and security.check_secret(secret)
    assert security.user_secret() == secret == path.read_bytes().strip()
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret"]  # no temporary file left


# Each child imports zpar, says it is ready, and waits for the word to ask for its secret: all at once.
_ASK_TOGETHER = ("import sys; from zpar import security; print('ready', flush=True); sys.stdin.readline(); "
                 "print(security.user_secret().decode(), flush=True)")


def test_processes_starting_together_all_get_the_same_new_secret(config_home):
    children = [subprocess.Popen([sys.executable, "-c", _ASK_TOGETHER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "XDG_CONFIG_HOME": str(config_home)})
                for _ in range(8)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=30) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    seen = {out.strip() for out, _ in outputs}
    assert len(seen) == 1
    path = config_home / "zpar" / "secret"
    assert seen == {path.read_text().strip()}
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret"]


@pytest.mark.parametrize("mode", [0o720, 0o702, 0o777])
def test_a_zpar_directory_others_may_write_to_is_refused_with_chmod_700(config_home, mode):
    folder = config_home / "zpar"
    folder.mkdir(parents=True)
    folder.chmod(mode)
    with pytest.raises(ConfigError, match=f"chmod 700 {folder}"):
        security.user_secret()
    assert not (folder / "secret").exists()
    with pytest.raises(ConfigError, match="chmod 700"):  # a client given nothing says so too
        zpar.Client("tcp://127.0.0.1:1", connect_timeout=0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_zpar_directory_owned_by_another_user_is_refused(config_home):
    folder = config_home / "zpar"
    folder.mkdir(parents=True, mode=0o700)
    os.chown(folder, 65534, -1)  # nobody
    with pytest.raises(ConfigError, match="chmod 700") as info:
        security.user_secret()
    assert "owner uid 65534" in str(info.value)


def test_a_secret_file_others_may_read_in_the_zpar_directory_is_refused(config_home):
    secret = security.user_secret()
    security.user_secret_path().chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        security.user_secret()
    security.user_secret_path().chmod(0o600)
    assert security.user_secret() == secret


@pytest.mark.parametrize("blocked", ["a file in the way", "a read-only directory"])
def test_an_unwritable_config_home_names_xdg_config_home_and_insecure(tmp_path, monkeypatch, blocked):
    home = tmp_path / "config"
    if blocked == "a file in the way":
        home.write_text("not a directory\n")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        home.mkdir(mode=0o500)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    with pytest.raises(ConfigError, match="XDG_CONFIG_HOME") as info:
        security.user_secret()
    assert "--insecure" in str(info.value)


def test_insecure_with_nothing_given_uses_no_secret_and_makes_none(config_home):
    assert security.client_credentials("producer", insecure=True) is None
    assert security.broker_credentials(insecure=True) is None
    assert not config_home.exists()


# ---------------------------------------------------------------------- a cluster given nothing


def test_a_cluster_given_no_secret_runs_tasks_with_this_users_secret(cluster, cluster_client):
    assert list(cluster_client.map(tasks.square, range(20), timeout=30)) == [i * i for i in range(20)]
    assert cluster.status()["security"] == f"curve, this user's secret {security.user_secret_path()}"


# A client as another user would run it: the same code, an XDG_CONFIG_HOME (so a secret) of its own.
_OTHER_USER = """
import sys, time
import zpar
start = time.monotonic()
try:
    zpar.Client(sys.argv[1], connect_timeout=20)
except zpar.AuthenticationError as exc:
    print(f"{time.monotonic() - start:.3f}", exc, flush=True)
    sys.exit(3)
sys.exit(0)
"""


def test_a_client_with_another_users_secret_is_refused_fast_and_nothing_runs(cluster, tmp_path):
    before = cluster.status()
    other = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "other-user")}
    proc = subprocess.run([sys.executable, "-c", _OTHER_USER, cluster.frontend], env=other,
                          capture_output=True, text=True, timeout=40)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    took, _, message = proc.stdout.partition(" ")
    assert float(took) <= REFUSAL_BAR, f"refused after {took} s"
    assert "this user's secret" in message and "another user's own" in message
    assert (tmp_path / "other-user" / "zpar" / "secret").exists(), "the other user made a secret of its own"
    after = cluster.status()
    assert after["counters"]["handshakes_failed"] > before["counters"].get("handshakes_failed", 0)
    assert after["counters"].get("submitted", 0) == before["counters"].get("submitted", 0)
    assert (after["done"], after["queued"], after["running"]) == (before["done"], 0, 0)


def test_an_insecure_client_is_refused_by_a_default_broker_naming_insecure(cluster):
    start = time.monotonic()
    with pytest.raises(zpar.AuthenticationError, match="insecure=True/--insecure") as info:
        zpar.Client(cluster.frontend, insecure=True, connect_timeout=REFUSAL_BAR + 5)
    assert time.monotonic() - start <= REFUSAL_BAR
    assert "requires authentication" in str(info.value)
    with pytest.raises(zpar.AuthenticationError, match="--insecure"):
        zpar.client.broker_status(cluster.frontend, REFUSAL_BAR + 5, insecure=True)


def test_a_broker_run_insecure_refuses_a_default_client_saying_it_runs_insecure(new_cluster):
    c = new_cluster(agents=1, workers=1, insecure=True)
    assert c.status()["security"] == "INSECURE: no authentication (--insecure)"
    with c.client() as client:  # insecure=True, as the cluster
        assert client.submit(tasks.square, 6).result(timeout=30) == 36
    start = time.monotonic()
    with pytest.raises(zpar.AuthenticationError, match="runs --insecure"):
        zpar.Client(c.frontend, connect_timeout=REFUSAL_BAR + 5)
    assert time.monotonic() - start <= REFUSAL_BAR


def _bytes_of(n: int) -> bytes:
    return b"\x01" * n


def test_a_64_mib_first_result_on_a_new_authenticated_connection_reaches_the_client(new_cluster):
    """With CurveZMQ and ZAP a socket may say POLLIN before a large first message has arrived: the
    broker's reader must wait for it, not die (it once did, on a fresh default cluster)."""
    cluster = new_cluster(agents=1, workers=1)
    with cluster.client() as client:
        assert len(client.submit(_bytes_of, 64 << 20).result(timeout=50)) == 64 << 20
        assert client.submit(tasks.square, 7).result(timeout=20) == 49
    assert cluster.broker.poll() is None
