"""The Makefile's first steps: `make demo`'s port check and `make test-deps`' installer."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def test_make_demo_checks_its_port_before_installing_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # a venv of its own: were the check not first, `make` would start installing into it
        done = subprocess.run(
            ["make", "demo", f"METRICS_PORT={port}", f"VENV={tmp_path / 'venv'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode != 0
    assert f"METRICS_PORT {port}" in done.stderr and "make demo METRICS_PORT=" in done.stderr
    assert not (tmp_path / "venv").exists()
    assert time.monotonic() - started < 30


def test_make_demo_metrics_port_reaches_the_simulation(tmp_path: Path) -> None:
    plan = subprocess.run(
        ["make", "-n", "demo", "METRICS_PORT=9555", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert "--metrics-port 9555" in plan.stdout, plan.stdout


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("apt_fails", [False, True])
def test_test_deps_installs_without_recommends_or_services(tmp_path: Path, apt_fails: bool) -> None:
    # apt-get, dpkg and deb-systemd-helper are stand-ins: a test must not install on the host.
    # They record what the script asked, and whether policy-rc.d refused services meanwhile.
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")  # the machine's own: restored afterwards
    _stub(bin_dir, "apt-get", f"""echo "apt-get $*" >> {log}
if [ "$1" = install ]; then
  {policy} start; echo "policy exit $?" >> {log}
  touch {tmp_path}/installed
  {"exit 100" if apt_fails else ""}
fi
""")
    _stub(bin_dir, "dpkg-query", f"""echo base
if [ -e {tmp_path}/installed ]; then echo nginx-light; echo nginx-common; fi
""")
    _stub(bin_dir, "dpkg", """[ "$2" = nginx-common ] && echo /lib/systemd/system/nginx.service
exit 0
""")
    _stub(bin_dir, "deb-systemd-helper", f'echo "systemd $*" >> {log}\n')
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MEDFED_TEST_TOOLS": f"{tmp_path}/no-nginx:nginx-light",
        "MEDFED_POLICY_RC": str(policy),
    }
    done = subprocess.run(
        ["sh", str(ROOT / "tests" / "install_tools.sh")], env=env, capture_output=True,
        text=True, timeout=60,
    )
    if os.geteuid() != 0:
        assert done.returncode == 0 and "sudo make test-deps" in done.stderr
        assert not log.exists()
        return
    calls = log.read_text()
    assert "install -y -q --no-install-recommends nginx-light" in calls
    assert "policy exit 101" in calls
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"  # restored, on failure too
    assert not (tmp_path / "policy-rc.d.medfed-saved").exists()
    if apt_fails:
        assert done.returncode != 0
    else:
        assert done.returncode == 0, done.stderr
        assert "systemd disable nginx.service" in calls
        assert "installed for the tests: nginx-light nginx-common" in done.stdout
