"""The hook that makes Flower's ClientApp runtime check each app bundle before installing it.

What is approved is client.approval's (tests/deploy/test_approval.py, tests/client/test_policy.py);
here: that Flower's runtime is still the code the hook was written for, that the hook installs
and loads only what the check passed, and that an unchecked Flower release runs no app.
"""

import hashlib
import inspect
from pathlib import Path

import flwr
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp as runtime

from common.apps import build_app_bundle
from common.flower_compat import FlowerVersionError
from common.flower_compat.clientapp_runtime import (
    GATE,
    HOOKED,
    INSTALLED_MARK,
    PulledTask,
    guard_clientapp_runtime,
    task_commands,
)
from tests.apps import tiny_app


class Refused(Exception):
    """What the test's check raises."""


@pytest.fixture
def fab(tmp_path: Path) -> bytes:
    root = tiny_app(tmp_path / "tinyapp")
    with (root / "pyproject.toml").open("a") as pyproject:  # a default for the run config
        pyproject.write("\n[tool.flwr.app.config]\nrounds = 3\n")
    return build_app_bundle(root)[0]


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the hook rebinds names in Flower's module: have them restored after each test
    for name in HOOKED:
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def test_flowers_clientapp_runtime_is_the_code_the_hook_was_built_for() -> None:
    # Fails loudly when an upgrade of flwr moves what the hook wraps: the bundle is pulled,
    # checked while installed, then loaded; an exception becomes an error reply carrying its
    # text to the aggregator.
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    assert GATE.holds(), GATE.problem()
    source = inspect.getsource(runtime.run_clientapp)
    steps = [
        "message, context, run, fab = pull_task_input(client)",
        "install_from_fab(fab.content, skip_prompt=True)",
        "load_client_app_fn = get_load_client_app_fn(",
        "client_app(message=message, context=context)",
        "except Exception as ex:",
        """reason = str(type(ex)) + ":<'" + str(ex) + "'>\"""",
        "Message(Error(code=e_code, reason=reason), reply_to=message)",
        "push_message(client, reply_message, context)",
    ]
    at = [source.find(step) for step in steps]
    assert -1 not in at, [s for s, i in zip(steps, at, strict=True) if i < 0]
    assert at == sorted(at)
    assert source.count("install_from_fab(") == 1
    assert source.count("pull_task_input(") == 1  # the task the check reads is this one
    # the SuperExec starts tasks by command name, found on PATH
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in inspect.getsource(SubprocessExecutor.launch)
    assert "flwr-clientapp" in task_commands()


@pytest.mark.usefixtures("restored", "task_identity")
def test_only_what_the_check_passed_is_installed_and_loaded(
    fab: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[PulledTask | None] = []
    approve = {"ok": False}

    def check(fab_file: object, task: PulledTask | None) -> str:
        seen.append(task)
        if not approve["ok"]:
            raise Refused("not approved")
        assert isinstance(fab_file, bytes)
        return hashlib.sha256(fab_file).hexdigest()

    def pull(client: object) -> tuple:  # what Flower's SuperNode hands its ClientApp process
        run = Run.create_empty(7)
        run.override_config = {"rounds": 5}
        context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                          run_config={"rounds": 5})
        message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1,
                          message_type="train")
        return message, context, run, None

    monkeypatch.setattr(runtime, "pull_task_input", pull)
    guard_clientapp_runtime(check, lambda *what: Refused(f"unchecked {what}"))
    with pytest.raises(Refused, match="not approved"):
        runtime.install_from_fab(fab, skip_prompt=True)
    assert seen == [None]  # no task pulled yet: the check is told so
    assert not (tmp_path / "flwr-home").exists()  # nothing of the app reached the disk

    runtime.pull_task_input(None)
    with pytest.raises(Refused, match="not approved"):
        runtime.install_from_fab(fab, skip_prompt=True)
    task = seen[-1]
    assert task is not None and task.run_id == 7 and task.overrides == {"rounds": 5}
    assert task.app_config == {"rounds": 5} and task.config_records["config"]["x"] == 1
    assert task.run_config_for(fab) == {"rounds": 5}  # the app's default, overridden

    load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    digest = hashlib.sha256(fab).hexdigest()
    with pytest.raises(Refused, match="unchecked"):  # whatever is on disk
        load("hospital-tests/tinyapp", "1.0.0", digest)
    approve["ok"] = True
    assert Path(runtime.install_from_fab(fab, skip_prompt=True)).is_dir()
    with pytest.raises(Refused, match="unchecked"):  # another bundle than the one checked
        load("hospital-tests/tinyapp", "1.0.0", "0" * 64)
    try:
        load("hospital-tests/tinyapp", "1.0.0", digest)
    except Refused:  # pragma: no cover - the failure this test looks for
        pytest.fail("a checked bundle was refused by the loader")
    except Exception:  # noqa: BLE001 - Flower's own loader may reject the tiny app; not ours
        pass


@pytest.mark.usefixtures("restored")
def test_an_unchecked_flower_release_is_refused_before_anything_is_hooked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = {name: getattr(runtime, name) for name in HOOKED}
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError) as refused:
        guard_clientapp_runtime(lambda f, t: "", lambda *w: Refused())
    text = str(refused.value)
    assert "Flower 9.9.9 is installed" in text and "1.41.0" in text
    assert "flwr/supernode/runtime/run_clientapp.py" in text  # what to re-read
    assert "test_clientapp_runtime.py" in text  # what to run
    assert {name: getattr(runtime, name) for name in HOOKED} == before
    with pytest.raises(FlowerVersionError):
        task_commands()


@pytest.mark.usefixtures("restored")
def test_a_runtime_without_a_hooked_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(runtime, "install_from_fab")
    with pytest.raises(FlowerVersionError, match="run_clientapp has no install_from_fab"):
        guard_clientapp_runtime(lambda f, t: "", lambda *w: Refused())


@pytest.mark.usefixtures("restored", "task_identity")
def test_a_bundle_is_unpacked_once_and_checked_at_every_task(
    fab: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []

    def check(fab_file: object, task: PulledTask | None) -> str:
        assert isinstance(fab_file, bytes)
        checks.append(hashlib.sha256(fab_file).hexdigest())
        return checks[-1]

    def pull(client: object) -> tuple:
        run = Run.create_empty(7)
        run.fab_id, run.fab_version = "hospital-tests/tinyapp", "1.0.0"
        context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
        message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1,
                          message_type="train")
        return message, context, run, None

    monkeypatch.setattr(runtime, "pull_task_input", pull)
    guard_clientapp_runtime(check, lambda *what: Refused(f"unchecked {what}"))
    runtime.pull_task_input(None)
    folder = Path(runtime.install_from_fab(fab, skip_prompt=True))
    assert (folder / INSTALLED_MARK).read_text() == checks[-1]
    (folder / "pyproject.toml").unlink()  # would be back if the bundle were unpacked again
    runtime.pull_task_input(None)
    assert Path(runtime.install_from_fab(fab, skip_prompt=True)) == folder
    assert not (folder / "pyproject.toml").exists()
    assert len(checks) == 2  # the app check ran for both tasks
    # a mark of another bundle: Flower's own install runs (it unpacks and verifies the bundle,
    # and keeps an existing folder), and the mark is this bundle's again
    (folder / INSTALLED_MARK).write_text("0" * 64)
    assert Path(runtime.install_from_fab(fab, skip_prompt=True)) == folder
    assert (folder / INSTALLED_MARK).read_text() == checks[-1]
