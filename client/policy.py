"""The site's run check: train only runs a trusted operator signed and the kit's policy allows.

Defence in depth that holds even if the aggregator is compromised. Before Flower installs a
run's app at the site (client.approval, outside the app), `check_run` verifies

1. the operator's signature (common.runsign) over the FAB hash the site computes itself and the
   run's config overrides, against the operators the site's kit trusts (`[[operators]]`);
2. the effective config (the FAB's defaults fused with the signed overrides, which is what the
   app receives as its run config) against the kit's `[policy]` (common.policy): DP required by
   default, a largest epsilon, the allowed tasks and strategies;
3. the message's own config against the signed one on the settings that decide what the site
   discloses (`POLICY_FIELDS`): the aggregator writes every message, so it could otherwise sign
   nothing and still ask for a run without DP.

The deployed ClientApp repeats check 3 on every train and evaluate message (`check_message`),
against the run config it was started with. A refusal raises `RunRefused`, whose text reaches the
aggregator (recorded as `kind: refused`); it names what was refused and how the hospital or the
operator fixes it, never a path of the site.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.apps import fab_sha256
from common.config import ConfigError, RunConfig
from common.kit import KitError, SiteKit
from common.policy import RUN_REFUSAL_MARK
from common.runsign import RunSignatureError, verify_run

# The settings a message must carry exactly as the operator signed them: privacy, what is
# trained and how often a site is asked (each round spends epsilon), and the run's key, under
# which the site keeps the run's privacy state.
POLICY_FIELDS = (
    "dp", "target_epsilon", "delta", "max_grad_norm", "accountant", "task", "model", "strategy",
    "rounds", "local_epochs", "local_steps", "batch_size", "central_dp", "central_noise",
    "clip_norm", "secure_agg", "run_key",
)
# Where a message carries its run config: the Message API, and Flower's legacy FitIns and
# EvaluateIns (SecAgg+ runs).
CONFIG_RECORDS = ("config", "fitins.config", "evaluateins.config")


class RunRefused(RuntimeError):
    """The site refuses this run; the message says why and how to fix it."""


def _refuse(site: str, run_id: int, what: str, fix: str) -> RunRefused:
    return RunRefused(f"{RUN_REFUSAL_MARK}: site {site} refuses run {run_id}: {what}; {fix}")


def _signature_fix(error: str) -> str:
    if "not signed" in error:
        return ("submit runs with `medfed run --kit KITS/operator`, which signs them with the "
                "operator key; a plain `flwr run` is refused")
    if "does not trust" in error:
        return ("the hospital accepts an operator with `medfed site trust-operator --kit KIT "
                "--name NAME --public-key FILE`")
    return ("submit the run again with `medfed run`; if this persists, the aggregator changes "
            "runs after they are signed and must be investigated")


def check_signed(
    kit: SiteKit, *, fab_content: bytes, overrides: Mapping[str, Any],
    run_config: Mapping[str, Any], run_id: int,
) -> RunConfig:
    """The run's signed, effective config when the kit's operators and policy accept it.

    Args:
        fab_content: the app bundle's bytes as the site received them.
        overrides: the run's `override_config` (what the operator signed).
        run_config: the config the app will run with (the FAB's defaults fused with
            `overrides`); it must hold exactly the signed overrides.

    Raises RunRefused otherwise.

    """
    try:
        verify_run(overrides, fab_sha256=fab_sha256(fab_content),
                   trusted=kit.trusted_operators())
    except RunSignatureError as exc:
        raise _refuse(kit.site, run_id, str(exc), _signature_fix(str(exc))) from None
    changed = sorted(k for k, v in overrides.items() if run_config.get(k) != v)
    if changed:
        raise _refuse(kit.site, run_id, f"the run config differs from the signed one in "
                      f"{', '.join(changed)}", _signature_fix(""))
    try:
        signed = RunConfig.from_mapping(run_config, strict=False)
    except ConfigError as exc:
        raise _refuse(kit.site, run_id, f"invalid run config ({exc})",
                      "submit a valid run with `medfed run`") from None
    violations = kit.policy.violations(signed)
    if violations:
        raise _refuse(
            kit.site, run_id, "; ".join(violations),
            "the operator submits a run within this site's policy, or the hospital changes it "
            "with `medfed site policy --kit KIT` (e.g. --allow-no-dp, --max-epsilon E, "
            "--tasks, --strategies)",
        )
    return signed


def check_message(
    signed: RunConfig, config: Mapping[str, Any], *, site: str, run_id: int
) -> None:
    """Refuse a message whose config differs from the signed run's on POLICY_FIELDS."""
    try:
        sent = RunConfig.from_mapping(config, strict=False)
    except ConfigError as exc:
        raise _refuse(site, run_id, f"the aggregator sent an invalid config ({exc})",
                      _signature_fix("")) from None
    expected = {name: getattr(signed, name) for name in POLICY_FIELDS}
    # deployed, the ServerApp names the run's state after Flower's run id
    expected["run_key"] = signed.run_key or str(run_id)
    changed = [
        name.replace("_", "-") for name in POLICY_FIELDS if getattr(sent, name) != expected[name]
    ]
    if changed:
        raise _refuse(
            site, run_id,
            f"the aggregator asked for {', '.join(changed)} other than the operator signed",
            _signature_fix(""),
        )


def message_configs(records: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The run configs a message's config records carry (none for a SecAgg+ key exchange)."""
    return [records[name] for name in CONFIG_RECORDS if name in records]


def check_task(
    kit_dir: Path, *, fab_content: bytes, overrides: Mapping[str, Any],
    run_config: Mapping[str, Any], run_id: int, configs: list[Mapping[str, Any]],
    app_config: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Everything the site checks before it runs a task of a run; RunRefused when it refuses.

    Args:
        configs: the run configs the task's message carries (`message_configs`).
        app_config: the run config the app will be handed (Flower's Context), which must
            equal `run_config`.

    A kit that cannot be read accepts no run.

    """
    try:
        kit = SiteKit.load(kit_dir, check_permissions=False)
    except KitError as exc:
        raise RunRefused(
            f"{RUN_REFUSAL_MARK}: the site's kit cannot be read, so no run is accepted "
            f"({type(exc).__name__}); the hospital checks its kit with `medfed site policy "
            "--kit KIT`"
        ) from None
    try:
        signed = check_signed(kit, fab_content=fab_content, overrides=overrides,
                              run_config=run_config, run_id=run_id)
        if app_config is not None and dict(app_config) != dict(run_config):
            raise _refuse(kit.site, run_id, "the run config prepared for the app differs from "
                          "the signed one", _signature_fix(""))
        for config in configs:
            check_message(signed, config, site=kit.site, run_id=run_id)
    except RunRefused as exc:
        print(f"medfed: {exc}", file=sys.stderr)  # the site's own log says it too
        raise
    return signed


def check_deployed_message(context: Any, config: Mapping[str, Any]) -> None:
    """In the deployed ClientApp: refuse a message that differs from the signed run config.

    `context` is Flower's Context: its run_config is the one client.approval verified before
    the app was loaded. A simulation (no `data-path` in the node config) has no kit, no
    signature and nothing to check.
    """
    node = context.node_config
    if "data-path" not in node:
        return
    site = str(node.get("site-name", "")) or "this site"
    run_id = int(context.run_id)
    try:
        signed = RunConfig.from_mapping(context.run_config, strict=False)
    except ConfigError as exc:
        raise _refuse(site, run_id, f"invalid run config ({exc})",
                      "submit a valid run with `medfed run`") from None
    if not signed.run_signature:
        raise _refuse(site, run_id, "the run is not signed by an operator",
                      _signature_fix("not signed"))
    check_message(signed, config, site=site, run_id=run_id)
