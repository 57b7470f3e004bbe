"""The site's run policy and signed runs: what a hospital's kit accepts, checked at the site.

Unit tests of the kit's `[policy]` and trusted operators, the check the site runs before it
installs a run's app (against real FAB bytes built by Flower and real signatures), the check the
deployed ClientApp runs on every message, and the `medfed site policy` / `trust-operator` /
`distrust-operator` commands. tests/deploy/test_policy.py runs them in a real federation.
"""

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import get_fused_config_from_fab
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp as runtime
from typer.testing import CliRunner

from client.approval import AppNotApproved, install_check
from client.policy import RunRefused, check_deployed_message, check_task
from common.apps import build_app_bundle
from common.config import RunConfig
from common.kit import KIT_FILE, KitError, SiteKit
from common.kit_edits import approve_app, distrust_operator, set_policy, trust_operator
from common.operator_kit import OperatorKit
from common.policy import RUN_REFUSAL_MARK, PolicyError, RunPolicy, parse_run_refusal
from common.runsign import OPERATOR_KEY, SIGNATURE_KEY, load_private_key, new_operator_key, sign_run
from medfed.cli import app as cli
from server.provision import add_site, provision
from tests.apps import TINY_PYPROJECT, tiny_app

CONFIG_DEFAULTS = """
[tool.flwr.app.config]
dp = true
target-epsilon = 8.0
task = "classify"
strategy = "fedavg"
rounds = 5
run-signature = ""
run-operator = ""
"""


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    provision(tmp_path / "kits", project="p", server_hosts=["127.0.0.1"], sites=["h1", "h2"])
    return tmp_path / "kits"


@pytest.fixture
def fab(tmp_path: Path) -> bytes:
    app = tiny_app(tmp_path / "tinyapp")
    (app / "pyproject.toml").write_text(TINY_PYPROJECT + CONFIG_DEFAULTS)
    return build_app_bundle(app)[0]


def _operator_key(kits: Path) -> ec.EllipticCurvePrivateKey:
    return load_private_key(OperatorKit.load(kits / "operator").key.read_bytes(), where="key")


def _signed(kits: Path, fab: bytes, **overrides: object) -> dict:
    import hashlib

    return sign_run(overrides, fab_sha256=hashlib.sha256(fab).hexdigest(), operator="operator",
                    private_key=_operator_key(kits))


def _check(kits: Path, fab: bytes, overrides: dict, *, site: str = "h1",
           configs: list | None = None) -> RunConfig:
    run = Run.create_empty(7)
    run.override_config = overrides
    fused = get_fused_config_from_fab(fab, run)  # what Flower hands the app as its run config
    return check_task(kits / "sites" / site, fab_content=fab, overrides=overrides,
                      run_config=fused, run_id=7, configs=configs or [])


# --- the kits provision writes ------------------------------------------------------------------


def test_provision_gives_the_operator_a_key_and_every_site_trusts_it(kits: Path) -> None:
    operator = OperatorKit.load(kits / "operator")
    assert operator.name == "operator"
    assert stat.S_IMODE(operator.key.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(operator.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert b"BEGIN PRIVATE KEY" in operator.key.read_bytes()  # PKCS8
    public = (kits / "operator" / "operator.pub").read_text()
    for site in ("h1", "h2"):
        kit = SiteKit.load(kits / "sites" / site)
        assert kit.trusted_operators() == {"operator": public}
        assert kit.policy == RunPolicy()  # DP required, no other limit
        assert not (kits / "sites" / site / "operator.key").exists()
    # a hospital added later trusts the same operator
    folder, _ = add_site(kits, "h3")
    assert SiteKit.load(folder).trusted_operators() == {"operator": public}


def test_a_kit_without_a_policy_table_requires_dp(kits: Path) -> None:
    path = kits / "sites" / "h1" / KIT_FILE
    text = path.read_text()
    start = text.index("[policy]")
    end = text.index("\n\n", start) if "\n\n" in text[start:] else len(text)
    path.write_text(text[:start] + text[end:])
    assert "[policy]" not in path.read_text()
    assert SiteKit.load(kits / "sites" / "h1").policy.require_dp


# --- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cfg", "refused"),
    [
        (RunPolicy(), RunConfig(), []),
        (RunPolicy(), RunConfig(dp=False), ["require-dp"]),
        (RunPolicy(require_dp=False), RunConfig(dp=False), []),
        (RunPolicy(max_epsilon=4), RunConfig(target_epsilon=8), ["max-epsilon"]),
        (RunPolicy(max_epsilon=8), RunConfig(target_epsilon=8), []),
        (RunPolicy(require_dp=False, max_epsilon=8), RunConfig(dp=False), ["max-epsilon"]),
        (RunPolicy(tasks=("segment",)), RunConfig(), ["allowed tasks"]),
        (RunPolicy(tasks=("classify",)), RunConfig(), []),
        (RunPolicy(strategies=("fedprox",)), RunConfig(), ["allowed strategies"]),
        (RunPolicy(max_epsilon=1, tasks=("segment",)), RunConfig(dp=False),
         ["require-dp", "max-epsilon", "allowed tasks"]),
    ],
)
def test_policy_violations(policy: RunPolicy, cfg: RunConfig, refused: list[str]) -> None:
    found = policy.violations(cfg)
    assert len(found) == len(refused)
    for text, needle in zip(found, refused, strict=True):
        assert needle in text


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"require-dp": "yes"}, "require-dp must be true or false"),
        ({"max-epsilon": float("nan")}, "max-epsilon must be a finite number > 0"),
        ({"max-epsilon": float("inf")}, "max-epsilon must be a finite number > 0"),
        ({"max-epsilon": 0}, "max-epsilon must be a finite number > 0"),
        ({"max-epsilon": "8"}, "max-epsilon must be a finite number > 0"),
        ({"tasks": ["classify", "teleport"]}, "tasks: unknown 'teleport'"),
        ({"tasks": []}, "tasks allows nothing"),
        ({"strategies": "fedavg"}, "strategies must be a list"),
        ({"max-epsilom": 3}, "unknown keys max-epsilom"),
    ],
)
def test_a_bad_policy_table_is_named(kits: Path, table: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        RunPolicy.from_toml(table, "kit.toml")
    import tomli_w

    path = kits / "sites" / "h1" / KIT_FILE
    import tomllib

    values = tomllib.loads(path.read_text())
    values["policy"] = table
    path.write_text(tomli_w.dumps(values))
    with pytest.raises(KitError, match=rf"{KIT_FILE}: \[policy\]"):
        SiteKit.load(kits / "sites" / "h1")


# --- the check before a run's app is installed --------------------------------------------------


def test_a_signed_dp_run_is_accepted(kits: Path, fab: bytes) -> None:
    signed = _check(kits, fab, _signed(kits, fab, rounds=1, **{"target-epsilon": 4.0}))
    assert signed.rounds == 1 and signed.target_epsilon == 4.0 and signed.dp


def _refusal(kits: Path, fab: bytes, overrides: dict, **kwargs: object) -> str:
    with pytest.raises(RunRefused) as refused:
        _check(kits, fab, overrides, **kwargs)  # type: ignore[arg-type]
    text = str(refused.value)
    assert text.startswith(f"{RUN_REFUSAL_MARK}: site h1 refuses run 7: ")
    assert str(kits) not in text  # no path of the site leaves it
    reason = str(type(refused.value)) + ":<'" + text + "'>"  # as Flower words it
    assert parse_run_refusal(reason) == (text, "h1")
    return text


def test_the_operators_own_no_dp_run_is_refused_by_a_default_site(kits: Path, fab: bytes) -> None:
    text = _refusal(kits, fab, _signed(kits, fab, dp=False))
    assert "without differential privacy" in text
    assert "medfed site policy --kit KIT" in text and "--allow-no-dp" in text
    set_policy(kits / "sites" / "h1", RunPolicy(require_dp=False))
    assert not _check(kits, fab, _signed(kits, fab, dp=False)).dp


def test_runs_outside_the_policy_are_refused(kits: Path, fab: bytes) -> None:
    set_policy(kits / "sites" / "h1", RunPolicy(max_epsilon=4, strategies=("fedprox",)))
    text = _refusal(kits, fab, _signed(kits, fab, **{"target-epsilon": 8.0}))
    assert "target epsilon 8 is above this site's largest, 4" in text
    assert "strategy fedavg is not among" in text


def test_an_unsigned_run_is_refused(kits: Path, fab: bytes) -> None:
    text = _refusal(kits, fab, {"rounds": 1})  # a plain `flwr run`
    assert "not signed" in text and "medfed run --kit KITS/operator" in text


@pytest.mark.parametrize(
    ("key", "value"), [("dp", False), ("target-epsilon", 80.0), ("rounds", 50), ("task", "x")]
)
def test_a_tampered_config_is_refused(kits: Path, fab: bytes, key: str, value: object) -> None:
    tampered = {**_signed(kits, fab, rounds=1), key: value}
    assert "changed after the operator signed" in _refusal(kits, fab, tampered)


def test_a_tampered_app_bundle_is_refused(kits: Path, fab: bytes, tmp_path: Path) -> None:
    signed = _signed(kits, fab, rounds=1)
    other = tiny_app(tmp_path / "other", "app = 'evil'\n")
    (other / "pyproject.toml").write_text(TINY_PYPROJECT + CONFIG_DEFAULTS)
    with pytest.raises(RunRefused, match="does not match its app bundle"):
        _check(kits, build_app_bundle(other)[0], signed)


def test_the_config_the_app_gets_must_be_the_signed_one(kits: Path, fab: bytes) -> None:
    overrides = _signed(kits, fab, rounds=1)
    run = Run.create_empty(7)
    run.override_config = overrides
    fused = {**get_fused_config_from_fab(fab, run), "rounds": 9}
    with pytest.raises(RunRefused, match="differs from the signed one in rounds"):
        check_task(kits / "sites" / "h1", fab_content=fab, overrides=overrides,
                   run_config=fused, run_id=7, configs=[])


def test_an_unknown_or_removed_operator_is_refused(kits: Path, fab: bytes) -> None:
    private, public = new_operator_key()
    import hashlib

    stranger = sign_run({"rounds": 1}, fab_sha256=hashlib.sha256(fab).hexdigest(),
                        operator="stranger", private_key=load_private_key(private, where="k"))
    text = _refusal(kits, fab, stranger)
    assert "stranger" in text and "medfed site trust-operator" in text
    # the same name with another key: the kit's key decides
    impostor = {**stranger, OPERATOR_KEY: "operator"}
    assert "changed after" in _refusal(kits, fab, impostor)
    assert trust_operator(kits / "sites" / "h1", "stranger", public)
    assert not trust_operator(kits / "sites" / "h1", "stranger", public)  # already
    assert _check(kits, fab, stranger).rounds == 1
    removed = distrust_operator(kits / "sites" / "h1", "operator")
    assert removed.name == "operator"
    assert "does not trust" in _refusal(kits, fab, _signed(kits, fab, rounds=1))
    with pytest.raises(ValueError, match="not a trusted operator"):
        distrust_operator(kits / "sites" / "h1", "operator")


def test_a_kit_that_cannot_be_read_accepts_no_run(kits: Path, fab: bytes, tmp_path: Path) -> None:
    with pytest.raises(RunRefused, match="kit cannot be read") as refused:
        check_task(tmp_path / "gone", fab_content=fab, overrides={}, run_config={}, run_id=1,
                   configs=[])
    assert str(tmp_path) not in str(refused.value)


def test_a_message_must_carry_the_signed_settings(kits: Path, fab: bytes) -> None:
    overrides = _signed(kits, fab, rounds=2)
    signed = _check(kits, fab, overrides)
    sent = {**signed.to_mapping(), "run-key": "7", "server-round": 1}
    _check(kits, fab, overrides, configs=[sent])
    for key, value in [("dp", False), ("target-epsilon", 50.0), ("rounds", 20),
                       ("local-epochs", 9), ("batch-size", 1), ("max-grad-norm", 100.0),
                       ("run-key", "fresh"), ("strategy", "fedprox")]:
        text = _refusal(kits, fab, overrides, configs=[{**sent, key: value}])
        assert f"asked for {key} other than the operator signed" in text


# --- Flower's runtime, hooked -------------------------------------------------------------------


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("pull_task_input", "install_from_fab", "get_load_client_app_fn"):
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.mark.usefixtures("hooked", "task_identity")
def test_flowers_runtime_installs_only_signed_runs_within_policy(
    kits: Path, fab: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hashlib

    site = kits / "sites" / "h1"
    approve_app(site, hashlib.sha256(fab).hexdigest())
    task: dict = {}

    def pull(client: object) -> tuple:  # what Flower's SuperNode hands its ClientApp process
        run = Run.create_empty(7)
        run.override_config = task["overrides"]
        fused = get_fused_config_from_fab(fab, run)
        context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                          run_config={**fused, **task.get("context", {})})
        config = RunConfig.from_mapping(context.run_config, strict=False).to_mapping()
        message = Message(RecordDict({"config": ConfigRecord({**config, **task["sent"]})}),
                          dst_node_id=1, message_type="train")
        return message, context, run, None

    monkeypatch.setattr(runtime, "pull_task_input", pull)
    install_check(site)
    for overrides, sent, error in [
        ({"rounds": 1}, {}, "not signed"),
        (_signed(kits, fab, dp=False), {}, "without differential privacy"),
        (_signed(kits, fab, rounds=1), {"dp": False, "run-key": "7"}, "asked for dp"),
        (_signed(kits, fab, rounds=1), {"run-key": "7"}, "prepared for the app differs"),
    ]:
        # the last: the app would be handed another config than the signed one
        task.update(overrides=overrides, sent=sent, context={"dp": False} if
                    "prepared" in error else {})
        runtime.pull_task_input(None)
        with pytest.raises(RunRefused, match=error):
            runtime.install_from_fab(fab, skip_prompt=True)
        assert not (tmp_path / "flwr-home").exists()  # nothing of the app reached the disk
    task.update(overrides=_signed(kits, fab, rounds=1), sent={"run-key": "7"}, context={})
    runtime.pull_task_input(None)
    assert Path(runtime.install_from_fab(fab, skip_prompt=True)).is_dir()


@pytest.mark.usefixtures("hooked")
def test_without_a_pulled_task_nothing_is_installed(kits: Path, fab: bytes) -> None:
    import hashlib

    approve_app(kits / "sites" / "h1", hashlib.sha256(fab).hexdigest())
    install_check(kits / "sites" / "h1")
    with pytest.raises(RunRefused, match="could not be checked"):
        runtime.install_from_fab(fab, skip_prompt=True)
    with pytest.raises(AppNotApproved):  # the app check still comes first
        runtime.install_from_fab(b"another bundle", skip_prompt=True)


# --- the deployed ClientApp, on every message ---------------------------------------------------


def test_the_deployed_app_refuses_messages_that_differ_from_the_signed_run(kits: Path) -> None:
    signed = {**RunConfig(rounds=2).to_mapping(), SIGNATURE_KEY: "sig", OPERATOR_KEY: "operator"}
    deployed = Context(run_id=7, node_id=1, state=RecordDict(), run_config=signed,
                       node_config={"data-path": "/srv/h1", "site-name": "h1"})
    ok = {**RunConfig(rounds=2).to_mapping(), "run-key": "7", "server-round": 1}
    check_deployed_message(deployed, ok)
    with pytest.raises(RunRefused, match="site h1 refuses run 7: the aggregator asked for dp"):
        check_deployed_message(deployed, {**ok, "dp": False})
    with pytest.raises(RunRefused, match="rounds"):
        check_deployed_message(deployed, {**ok, "rounds": 3})
    unsigned = Context(run_id=7, node_id=1, state=RecordDict(),
                       run_config=RunConfig().to_mapping(), node_config=deployed.node_config)
    with pytest.raises(RunRefused, match="not signed"):
        check_deployed_message(unsigned, ok)
    # a simulation has no kit and nothing signed: nothing to check
    simulated = Context(run_id=7, node_id=1, state=RecordDict(), run_config={},
                        node_config={"partition-id": 0, "num-partitions": 2})
    check_deployed_message(simulated, {**ok, "dp": False})


# --- the commands -------------------------------------------------------------------------------


def test_site_policy_shows_and_edits_the_policy(kits: Path) -> None:
    runner = CliRunner()
    kit = str(kits / "sites" / "h1")
    shown = runner.invoke(cli, ["site", "policy", "--kit", kit])
    assert shown.exit_code == 0, shown.output
    assert "differential privacy: required" in shown.output
    assert "trusted operators: operator" in shown.output
    done = runner.invoke(cli, ["site", "policy", "--kit", kit, "--allow-no-dp", "--max-epsilon",
                               "6", "--tasks", "classify,segment", "--strategies", "fedavg"])
    assert done.exit_code == 0, done.output
    assert SiteKit.load(Path(kit)).policy == RunPolicy(False, 6.0, ("classify", "segment"),
                                                       ("fedavg",))
    reset = runner.invoke(cli, ["site", "policy", "--kit", kit, "--require-dp", "--max-epsilon",
                                "none", "--tasks", "all", "--strategies", "all"])
    assert reset.exit_code == 0, reset.output
    assert SiteKit.load(Path(kit)).policy == RunPolicy()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-epsilon", "nan"], "--max-epsilon must be a finite number > 0"),
        (["--max-epsilon", "inf"], "--max-epsilon must be a finite number > 0"),
        (["--max-epsilon", "-1"], "--max-epsilon must be a finite number > 0"),
        (["--max-epsilon", "lots"], "--max-epsilon must be a number > 0 or `none`"),
        (["--tasks", "classify,teleport"], "--tasks: unknown 'teleport'"),
        (["--strategies", "fedmagic"], "--strategies: unknown 'fedmagic'"),
        (["--tasks", ","], "--tasks allows nothing"),
    ],
)
def test_site_policy_refuses_bad_values_naming_the_flag(
    kits: Path, flags: list[str], message: str
) -> None:
    kit = kits / "sites" / "h1"
    before = (kit / KIT_FILE).read_text()
    done = CliRunner().invoke(cli, ["site", "policy", "--kit", str(kit), *flags])
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())
    assert (kit / KIT_FILE).read_text() == before


def test_trust_and_distrust_operator_commands(kits: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    kit = str(kits / "sites" / "h1")
    _, public = new_operator_key()
    pem = tmp_path / "second.pub"
    pem.write_text(public)
    added = runner.invoke(cli, ["site", "trust-operator", "--kit", kit, "--name", "second",
                                "--public-key", str(pem)])
    assert added.exit_code == 0 and "now accepts runs signed by operator second" in added.output
    assert set(SiteKit.load(Path(kit)).trusted_operators()) == {"operator", "second"}
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    bad = runner.invoke(cli, ["site", "trust-operator", "--kit", kit, "--name", "third",
                              "--public-key", str(garbage)])
    assert bad.exit_code == 2 and "--public-key" in bad.output and "not a PEM" in bad.output
    missing = runner.invoke(cli, ["site", "trust-operator", "--kit", kit, "--name", "third",
                                  "--public-key", str(tmp_path / "nope.pub")])
    assert missing.exit_code == 2 and "--public-key" in missing.output
    bad_name = runner.invoke(cli, ["site", "trust-operator", "--kit", kit, "--name", "a/b",
                                   "--public-key", str(pem)])
    assert bad_name.exit_code == 2 and "operator name 'a/b'" in bad_name.output
    gone = runner.invoke(cli, ["site", "distrust-operator", "--kit", kit, "--name", "operator"])
    assert gone.exit_code == 0 and "no longer accepts" in gone.output
    assert set(SiteKit.load(Path(kit)).trusted_operators()) == {"second"}
    again = runner.invoke(cli, ["site", "distrust-operator", "--kit", kit, "--name", "operator"])
    assert again.exit_code == 2 and "not a trusted operator" in again.output


# --- the operator's side ------------------------------------------------------------------------


def test_medfed_run_signs_with_the_operator_kit_key_and_refuses_an_unsafe_one(
    kits: Path, fab: bytes
) -> None:
    import hashlib
    import os

    from server.submit import OperatorError, sign_overrides

    operator = OperatorKit.load(kits / "operator")
    digest = hashlib.sha256(fab).hexdigest()
    signed = sign_overrides(operator, {"rounds": 1}, fab_sha256=digest)
    assert signed[OPERATOR_KEY] == "operator"
    assert _check(kits, fab, signed).rounds == 1
    os.chmod(operator.key, 0o644)
    with pytest.raises(OperatorError, match="readable or writable by other users"):
        sign_overrides(operator, {"rounds": 1}, fab_sha256=digest)
    operator.key.unlink()
    with pytest.raises(OperatorError, match="no run-signing key, and sites refuse unsigned"):
        sign_overrides(operator, {"rounds": 1}, fab_sha256=digest)
