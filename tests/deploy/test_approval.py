"""App approval: a site runs only the app versions (FAB hashes) its hospital approved in its kit.

Unit tests of the kit's list, the hash (against Flower's own `flwr build`), the check hooked into
Flower's ClientApp runtime and the launchers, then one real deployed federation on 127.0.0.1 in
which a site whose kit does not approve the app refuses it while an approving site trains.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from flwr.supernode.runtime import run_clientapp as runtime

from bench.federation import BIN, Federation, snapshot_app
from bench.federation import finish as _finish
from bench.federation import results as _results
from client.approval import (
    CLIENTAPP_COMMAND,
    AppNotApproved,
    check_bundle,
    install_check,
    main,
    write_launchers,
)
from client.policy import RunRefused
from client.supernode import SiteSettings
from common.apps import APP_REFUSAL_MARK, AppBundle, build_app_bundle, parse_app_refusal
from common.flower_compat import FlowerVersionError
from common.kit import KIT_FILE, KitError, SiteKit
from common.kit_edits import approve_app, revoke_app
from server.provision import provision
from tests.apps import tiny_app
from tests.medfed.helpers import free_port
from tests.simulations.conftest import write_easy_hospitals


@pytest.fixture
def site_kit(tmp_path: Path) -> Path:
    provision(tmp_path / "kits", project="p", server_hosts=["127.0.0.1"], sites=["h1"])
    return tmp_path / "kits" / "sites" / "h1"


# --- the kit's list ------------------------------------------------------------------------------


def test_a_new_site_kit_approves_nothing(site_kit: Path) -> None:
    assert SiteKit.load(site_kit).approved_apps == ()
    assert not SiteKit.load(site_kit).approves("a" * 64)


def test_approve_and_revoke_persist_and_keep_the_rest_of_the_kit(site_kit: Path) -> None:
    path = site_kit / KIT_FILE
    path.write_text(path.read_text().replace('site = "h1"', 'site = "h1"\nbudget-epsilon = 3.5'))
    assert approve_app(site_kit, "A" * 64, app="x/y 1.0", note="reviewed by the DPO")
    assert not approve_app(site_kit, "a" * 64)  # already there (hashes are case-insensitive)
    assert approve_app(site_kit, "b" * 64)
    kit = SiteKit.load(site_kit)
    assert [a.fab_sha256 for a in kit.approved_apps] == ["a" * 64, "b" * 64]
    assert kit.approved_apps[0].app == "x/y 1.0"
    assert kit.approved_apps[0].note == "reviewed by the DPO"
    assert kit.approved_apps[0].approved_at  # when, for the hospital's records
    assert kit.budget_epsilon == 3.5 and kit.superlink == "127.0.0.1:9092"
    assert kit.approves("b" * 64)

    removed = revoke_app(site_kit, "a" * 64)
    assert removed.app == "x/y 1.0"
    kit = SiteKit.load(site_kit)
    assert [a.fab_sha256 for a in kit.approved_apps] == ["b" * 64]
    assert not kit.approves("a" * 64)
    assert kit.budget_epsilon == 3.5
    with pytest.raises(ValueError, match="not approved in"):
        revoke_app(site_kit, "a" * 64)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "a" * 63, "a" * 65, "sha256:" + "a" * 64])
def test_a_bad_hash_is_refused_naming_the_flag(site_kit: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="--fab-hash .* must be the 64 hex digits"):
        approve_app(site_kit, bad)
    assert SiteKit.load(site_kit).approved_apps == ()


def test_a_hand_edited_kit_may_list_plain_hashes_but_not_garbage(site_kit: Path) -> None:
    path = site_kit / KIT_FILE
    text = path.read_text().replace("approved = []", f'approved = ["{"c" * 64}"]')
    path.write_text(text)
    assert SiteKit.load(site_kit).approves("c" * 64)
    path.write_text(text.replace("c" * 64, "not-a-hash"))
    with pytest.raises(KitError, match=r"medfed-kit.toml: \[apps\] approved"):
        SiteKit.load(site_kit)


def test_a_missing_kit_is_named(tmp_path: Path) -> None:
    with pytest.raises(KitError, match=f"{tmp_path / 'nowhere'}: no such kit folder"):
        approve_app(tmp_path / "nowhere", "a" * 64)


# --- the hash ------------------------------------------------------------------------------------


def test_the_hash_is_the_one_flower_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.build import build

    app = tiny_app(tmp_path / "tinyapp")
    content, bundle = build_app_bundle(app)
    monkeypatch.chdir(tmp_path)
    build(app=app)  # `flwr build`: writes <publisher>.<name>.<version>.<hash[:8]>.fab here
    (fab,) = tmp_path.glob("*.fab")
    assert fab.read_bytes() == content
    assert bundle.sha256 == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab.name == f"hospital-tests.tinyapp.1-0-0.{bundle.sha256[:8]}.fab"
    assert bundle.label == "hospital-tests/tinyapp 1.0.0"
    # deterministic: the same files give the same hash, any change another
    assert build_app_bundle(app)[1].sha256 == bundle.sha256
    (app / "tinyapp" / "client.py").write_text("app = None  # changed\n")
    assert build_app_bundle(app)[1].sha256 != bundle.sha256


def test_a_folder_that_is_no_app_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a Flower App"):
        build_app_bundle(tmp_path)


def test_an_unreadable_bundle_still_has_a_hash() -> None:
    bundle = AppBundle.from_content(b"not a zip")
    assert bundle.sha256 == hashlib.sha256(b"not a zip").hexdigest()
    assert bundle.label == "?/? ?"


# --- the check -----------------------------------------------------------------------------------


def test_an_unapproved_app_is_refused_with_how_to_approve_it(
    site_kit: Path, tmp_path: Path
) -> None:
    content, bundle = build_app_bundle(tiny_app(tmp_path / "tinyapp"))
    with pytest.raises(AppNotApproved) as refused:
        check_bundle(site_kit, content)
    text = str(refused.value)
    assert text.startswith(f"{APP_REFUSAL_MARK}: site h1 refuses hospital-tests/tinyapp 1.0.0")
    assert f"medfed site approve --kit KIT --fab-hash {bundle.sha256}" in text
    assert str(site_kit) not in text  # the kit's location stays at the site

    approve_app(site_kit, bundle.sha256)
    assert check_bundle(site_kit, content) == bundle
    # another version of the same app is another bundle: refused
    other, _ = build_app_bundle(tiny_app(tmp_path / "v2", "app = 1\n"))
    with pytest.raises(AppNotApproved):
        check_bundle(site_kit, other)
    revoke_app(site_kit, bundle.sha256)
    with pytest.raises(AppNotApproved):
        check_bundle(site_kit, content)


def test_an_unreadable_kit_approves_nothing(tmp_path: Path) -> None:
    with pytest.raises(AppNotApproved, match="kit cannot be read"):
        check_bundle(tmp_path / "gone", b"anything")


def test_the_refusal_reaches_the_aggregator_as_a_refusal(site_kit: Path, tmp_path: Path) -> None:
    content, bundle = build_app_bundle(tiny_app(tmp_path / "tinyapp"))
    with pytest.raises(AppNotApproved) as refused:
        check_bundle(site_kit, content)
    ex = refused.value
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # how Flower's run_clientapp words it
    parsed = parse_app_refusal(reason)
    assert parsed == (str(ex), "h1")
    assert parse_app_refusal("<class 'ValueError'>:<'boom'>") is None


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # install_check rebinds three names in Flower's module: have them restored after the test
    monkeypatch.setattr(runtime, "pull_task_input", runtime.pull_task_input)
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)
    monkeypatch.setattr(runtime, "get_load_client_app_fn", runtime.get_load_client_app_fn)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.mark.usefixtures("hooked")
def test_flowers_clientapp_runtime_installs_only_approved_bundles(
    site_kit: Path, tmp_path: Path
) -> None:
    content, bundle = build_app_bundle(tiny_app(tmp_path / "tinyapp"))
    install_check(site_kit)
    with pytest.raises(AppNotApproved, match="medfed site approve --kit KIT --fab-hash"):
        runtime.install_from_fab(content, skip_prompt=True)
    assert not (tmp_path / "flwr-home").exists()  # nothing of the app reached the disk
    # a loader for a bundle this process did not check refuses, whatever is on disk
    load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    with pytest.raises(AppNotApproved, match="not checked"):
        load("hospital-tests/tinyapp", "1.0.0", bundle.sha256)

    approve_app(site_kit, bundle.sha256)
    # approved, the bundle passes; the run is checked next, and with no task pulled it cannot
    # be (tests/client/test_policy.py installs a signed run's bundle)
    with pytest.raises(RunRefused, match="the run could not be checked"):
        runtime.install_from_fab(content, skip_prompt=True)
    assert not (tmp_path / "flwr-home").exists()


def test_a_flower_release_the_hook_was_not_checked_against_runs_no_app(
    site_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    # the site does not start: writing its launchers fails, naming the version and the fix
    with pytest.raises(FlowerVersionError, match="Flower 9.9.9 is installed.*app approval"):
        write_launchers(tmp_path / "bin", site_kit)
    assert not (tmp_path / "bin").exists()
    # a launcher written before the upgrade: the task fails with the reason, not a traceback
    with pytest.raises(SystemExit) as stopped:
        main(["--kit", str(site_kit), "--", "--help"])
    assert "medfed site: Flower 9.9.9 is installed" in str(stopped.value.code)
    assert "test_clientapp_runtime.py" in str(stopped.value.code)


def test_the_supernode_finds_the_checking_launcher_first(site_kit: Path, tmp_path: Path) -> None:
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    settings = SiteSettings(SiteKit.load(site_kit), tmp_path / "data", tmp_path / "state")
    folder = write_launchers(settings.launcher_dir, site_kit)
    env = settings.environment()
    assert shutil.which(CLIENTAPP_COMMAND, path=env["PATH"]) == str(folder / CLIENTAPP_COMMAND)
    for command in TASK_TYPE_TO_COMMAND.values():
        assert os.access(folder / command, os.X_OK)
    # any other kind of task (an AgentApp, ...) is refused outright
    other = subprocess.run([str(folder / "flwr-agentapp")], capture_output=True, text=True)
    assert other.returncode == 1 and "refusing" in other.stderr
    # the launcher runs Flower's own flwr-clientapp (here its --help), from any folder
    done = subprocess.run(
        [str(folder / CLIENTAPP_COMMAND), "--help"], capture_output=True, text=True,
        cwd=tmp_path, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Run a Flower ClientApp" in done.stdout


# --- the commands --------------------------------------------------------------------------------


def test_the_site_commands_approve_list_and_revoke(site_kit: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app as cli

    runner = CliRunner()
    tiny = tiny_app(tmp_path / "tinyapp")
    _, bundle = build_app_bundle(tiny)
    kit = str(site_kit)

    shown = runner.invoke(cli, ["site", "app-hash", str(tiny)])
    assert shown.exit_code == 0 and f"{bundle.sha256}  hospital-tests/tinyapp 1.0.0" in shown.output
    empty = runner.invoke(cli, ["site", "apps", "--kit", kit])
    assert empty.exit_code == 0 and "approves no app" in empty.output

    ok = runner.invoke(cli, ["site", "approve", "--kit", kit, "--app", str(tiny), "--note", "ok"])
    assert ok.exit_code == 0, ok.output
    assert f"approves hospital-tests/tinyapp 1.0.0 ({bundle.sha256})" in ok.output
    listed = runner.invoke(cli, ["site", "apps", "--kit", kit])
    assert f"{bundle.sha256}  hospital-tests/tinyapp 1.0.0" in listed.output
    as_json = runner.invoke(cli, ["site", "apps", "--kit", kit, "--json"])
    assert json.loads(as_json.output)[0]["fab-sha256"] == bundle.sha256

    both = runner.invoke(cli, ["site", "approve", "--kit", kit])
    assert both.exit_code == 2 and "exactly one of --fab-hash HASH or --app APP_DIR" in both.output
    bad = runner.invoke(cli, ["site", "approve", "--kit", kit, "--fab-hash", "12ab"])
    assert bad.exit_code == 2 and "--fab-hash '12ab' is not a FAB hash" in bad.output
    nowhere = str(tmp_path / "nowhere")
    missing = runner.invoke(cli, ["site", "approve", "--kit", nowhere, "--fab-hash", "a" * 64])
    assert missing.exit_code == 2 and f"{nowhere}: no such kit folder" in missing.output
    no_app = runner.invoke(cli, ["site", "approve", "--kit", kit, "--app", nowhere])
    assert no_app.exit_code == 2 and "not a Flower App" in no_app.output

    revoked = runner.invoke(cli, ["site", "revoke-app", "--kit", kit, "--fab-hash", bundle.sha256])
    assert revoked.exit_code == 0 and "no longer approves" in revoked.output
    again = runner.invoke(cli, ["site", "revoke-app", "--kit", kit, "--fab-hash", bundle.sha256])
    assert again.exit_code == 2 and "not approved in" in again.output
    assert SiteKit.load(site_kit).approved_apps == ()


def test_a_read_only_kit_says_where_to_edit_it(
    site_kit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from typer.testing import CliRunner

    import common.kit_edits
    from medfed.cli import app as cli

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    # a kit mounted from a Kubernetes Secret (a test as root could write through chmod 500)
    monkeypatch.setattr(common.kit_edits, "write_text", read_only)
    done = CliRunner().invoke(
        cli, ["site", "approve", "--kit", str(site_kit), "--fab-hash", "a" * 64]
    )
    assert done.exit_code == 2, done.output
    assert "read-only file system" in done.output and "Secret" in done.output


# --- a real federation ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_site_refuses_an_app_its_hospital_did_not_approve(tmp_path: Path) -> None:
    approving, refusing = "hospital-a", "hospital-b"
    app, fab_hash = snapshot_app(tmp_path / "app")
    data = write_easy_hospitals(
        tmp_path / "data", [(approving, 30, 0.5), (refusing, 30, 0.5)], test_images=6, seed=5
    )
    fed = Federation(
        root=tmp_path, kits=tmp_path / "kits", data=data, state=tmp_path / "server-state",
        port=free_port(), health_port=free_port(), metrics_port=free_port(),
    )
    medfed = str(BIN / "medfed")
    subprocess.run(
        [medfed, "provision", "--project", "approval", "--server-host", "127.0.0.1",
         "--port", str(fed.port), "--sites", f"{approving},{refusing}", "--out", str(fed.kits)],
        check=True, capture_output=True,
    )
    # hospital-a approves this app version; hospital-b's kit approves nothing (the default)
    approved = subprocess.run(
        [medfed, "site", "approve", "--kit", str(fed.kits / "sites" / approving),
         "--fab-hash", fab_hash],
        capture_output=True, text=True, timeout=120,
    )
    assert approved.returncode == 0, approved.stderr
    try:
        fed.start_server("server.log")
        for name in (approving, refusing):
            fed.start_site(name)
        for proc in fed.sites.values():
            proc.wait_for("SuperNode ID", timeout=120)
        assert "approves no app" in fed.sites[refusing].text()

        code, _, stderr = _finish(
            fed.run("run", "--rounds", "1", "--min-sites", "1", "--app", str(app),
                    "--no-cross-site"), timeout=300
        )
        assert code == 0, stderr[-3000:]
        assert f"FAB sha256 {fab_hash}" in stderr  # the operator sees what sites must approve
        (entry,) = _results(tmp_path / "run")["rounds"]
        assert entry["participants"] == [approving]
        refused = [f for f in entry["failures"] if f["kind"] == "refused"]
        assert [(f["site"], f["stage"]) for f in refused] == [
            (refusing, "train"), (refusing, "evaluate"),
        ], entry["failures"]
        for failure in refused:
            assert failure["reason"].startswith(f"{APP_REFUSAL_MARK}: site {refusing} refuses ")
            assert f"medfed site approve --kit KIT --fab-hash {fab_hash}" in failure["reason"]
        # the refusing site's own log names its kit in the same instruction
        kit = fed.kits / "sites" / refusing
        assert f"--kit {kit} --fab-hash {fab_hash}" in fed.sites[refusing].text()
    finally:
        for proc in fed.sites.values():
            proc.stop()
        if fed.server is not None:
            fed.server.stop()
