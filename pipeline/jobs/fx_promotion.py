"""Move a symbol's ``champion`` alias to its gated challenger, with an audit record."""

from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store


def stored_gate_failures(
    symbol: str, *, lake: LakeResource, tracking: TrackingResource
) -> list[str]:
    """The promotion rule on the stored evaluation, and its match with the `challenger` alias."""
    name = tracking.model_name(symbol)
    challenger = tracking.alias_version(name, store.CHALLENGER)
    evaluation = store.latest_evaluation(lake, symbol)
    failures = store.promotion_rule_failures(evaluation)
    if challenger is None:
        failures.append(f"model {name} has no `challenger` alias")
    elif evaluation and evaluation["model_version"] != str(challenger.version):
        failures.append(
            f"latest evaluation is of version {evaluation['model_version']}, but "
            f"`challenger` points at {challenger.version}"
        )
    return failures


def promote_challenger(
    symbol: str, *, lake: LakeResource, tracking: TrackingResource, dagster_run_id: str
) -> tuple[str, str, str]:
    """Point ``champion`` at the challenger, keeping the replaced one as ``previous_champion``.

    Call only after :func:`stored_gate_failures` returned nothing.

    Returns
    -------
    tuple of (from version, to version, action)
        ``action`` is ``"promoted"`` or ``"unchanged"`` (already champion).
    """
    name = tracking.model_name(symbol)
    new_version = str(tracking.alias_version(name, store.CHALLENGER).version)
    current = tracking.alias_version(name, store.CHAMPION)
    old_version = str(current.version) if current is not None else ""
    if old_version == new_version:
        return old_version, new_version, "unchanged"
    if current is not None:
        tracking.set_alias(name, store.PREVIOUS_CHAMPION, old_version)
    tracking.set_alias(name, store.CHAMPION, new_version)
    evaluation = store.latest_evaluation(lake, symbol) or {}
    store.record_model_event(
        lake,
        symbol=symbol,
        model_name=name,
        event="promoted",
        from_version=old_version,
        to_version=new_version,
        reason=(
            f"challenger AP {evaluation.get('challenger_average_precision', float('nan')):.3f} "
            "passed the gate"
        ),
        dagster_run_id=dagster_run_id,
    )
    return old_version, new_version, "promoted"
