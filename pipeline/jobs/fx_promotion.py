"""Move a symbol's ``champion`` alias to its gated challenger, with an audit record.

A run decides every symbol first (:func:`stored_gate_failures` plus the check record),
then moves the aliases of the symbols that passed (:func:`promote_passing`). Each
symbol's promotion is all or nothing: ``previous_champion`` moves first (``champion``
still serves the old version, a valid state), then ``champion``; when the second move
fails, the first is rolled back. The ``gold/model_events`` row is written only after
both moves, and a retry that finds the aliases already moved writes a missing row.
"""

import datetime as dt
from dataclasses import dataclass

from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store


@dataclass(frozen=True)
class Promotion:
    """What happened to one symbol of a promotion run."""

    symbol: str
    from_version: str
    to_version: str
    action: str  # "promoted", "unchanged", "refused" or "error"
    reason: str = ""

    @property
    def ok(self) -> bool:
        """The symbol's champion is the gated challenger now."""
        return self.action in ("promoted", "unchanged")


def stored_gate_failures(
    symbol: str, *, lake: LakeResource, tracking: TrackingResource
) -> list[str]:
    """The promotion rule on the stored evaluation, and its match with the `challenger` alias.

    A challenger that already failed in service (reverted, or its KPI regressed) is refused
    too, so a rerun cannot put a reverted version back (one still serving, for want of a
    sound version to revert to, is left alone: promoting it again moves nothing).
    """
    name = tracking.model_name(symbol)
    challenger = tracking.alias_version(name, store.CHALLENGER)
    evaluation = store.latest_evaluation(lake, symbol)
    failures = store.promotion_rule_failures(evaluation)
    if challenger is None:
        failures.append(f"model {name} has no `challenger` alias")
        return failures
    if evaluation and evaluation["model_version"] != str(challenger.version):
        failures.append(
            f"latest evaluation is of version {evaluation['model_version']}, but "
            f"`challenger` points at {challenger.version}"
        )
    champion = tracking.alias_version(name, store.CHAMPION)
    serving = champion is not None and champion.version == challenger.version
    failed = "" if serving else store.failed_in_service(challenger)
    if failed:
        failures.append(f"challenger failed in service before ({failed}); train a new one")
    return failures


def promote_passing(
    symbols: list[str],
    refused: dict[str, list[str]],
    *,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
) -> list[Promotion]:
    """Promote every symbol not in ``refused``; one symbol's failure does not stop the rest.

    A refused symbol keeps its champion; a symbol whose alias moves fail (MLflow down)
    is rolled back and reported as ``error``.
    """
    outcomes = []
    for symbol in symbols:
        if symbol in refused:
            current = tracking.alias_version(tracking.model_name(symbol), store.CHAMPION)
            version = str(current.version) if current is not None else ""
            outcomes.append(
                Promotion(symbol, version, version, "refused", "; ".join(refused[symbol]))
            )
            continue
        try:
            moved = promote_challenger(
                symbol, lake=lake, tracking=tracking, dagster_run_id=dagster_run_id
            )
        except Exception as exc:  # reported per symbol; the caller fails the step
            outcomes.append(Promotion(symbol, "", "", "error", f"{type(exc).__name__}: {exc}"))
            continue
        outcomes.append(Promotion(symbol, *moved))
    return outcomes


def promote_challenger(
    symbol: str, *, lake: LakeResource, tracking: TrackingResource, dagster_run_id: str
) -> tuple[str, str, str]:
    """Point ``champion`` at the challenger, keeping the replaced one as ``previous_champion``.

    Call only after :func:`stored_gate_failures` returned nothing. Every state in between
    is valid: after the first move ``champion`` still serves the old version; when moving
    ``champion`` fails, ``previous_champion`` is put back and the error raised.

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
        if store.champion_on(lake, symbol, dt.datetime.now(dt.UTC)) != new_version:
            # the aliases moved in an earlier attempt that failed before its record
            previous = tracking.alias_version(name, store.PREVIOUS_CHAMPION)
            before = str(previous.version) if previous is not None else ""
            _record(lake, tracking, symbol, before, new_version, dagster_run_id)
        return old_version, new_version, "unchanged"
    if current is not None:
        prior = tracking.alias_version(name, store.PREVIOUS_CHAMPION)
        tracking.set_alias(name, store.PREVIOUS_CHAMPION, old_version)
        try:
            tracking.set_alias(name, store.CHAMPION, new_version)
        except BaseException as exc:
            try:
                if prior is not None:
                    tracking.set_alias(name, store.PREVIOUS_CHAMPION, prior.version)
                else:
                    tracking.delete_alias(name, store.PREVIOUS_CHAMPION)
            except BaseException as undo:
                exc.add_note(
                    f"rolling back `previous_champion` of {name} failed too ({undo!r}); "
                    f"`champion` still serves {old_version}"
                )
            raise
    else:
        tracking.set_alias(name, store.CHAMPION, new_version)
    _record(lake, tracking, symbol, old_version, new_version, dagster_run_id)
    return old_version, new_version, "promoted"


def _record(
    lake: LakeResource,
    tracking: TrackingResource,
    symbol: str,
    from_version: str,
    to_version: str,
    dagster_run_id: str,
) -> None:
    """Append the promotion to ``gold/model_events`` (after the aliases moved)."""
    evaluation = store.latest_evaluation(lake, symbol) or {}
    store.record_model_event(
        lake,
        symbol=symbol,
        model_name=tracking.model_name(symbol),
        event="promoted",
        from_version=from_version,
        to_version=to_version,
        reason=store.promotion_reason(evaluation),
        dagster_run_id=dagster_run_id,
    )
