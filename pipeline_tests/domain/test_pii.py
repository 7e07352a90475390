"""The PII scan: policy, tokens, detection quality on generated notes, policy changes."""

import dataclasses

import numpy as np
import polars as pl
import pytest

from pipeline.domain import pii, pii_names
from pipeline.domain.demo_data import (
    THIRD_PARTY_GIVEN,
    generate_adjuster_notes,
    generate_policyholders,
)
from pipeline.resources.pii import DEFAULT_POLICY

SALT = b"test-salt-0123456789abcdef"
POLICY = pii.parse_policy(DEFAULT_POLICY.read_text(), str(DEFAULT_POLICY))
DOC = pl.col("row").cast(pl.String)

# Lower bounds measured on 600 generated notes (seed [1, 3]); see README "PII".
# Offline there is no NER: PERSON is found as the record's own name, after a title,
# after or before a cue (witness, according to, (passenger), ... confirmed) or starting
# with a listed given name; every generated template has one of these, so these are an
# upper bound for real prose (test_a_name_without_cue_or_listed_given_name_is_missed).
# Phone precision may fall below 1: 8-digit invoice numbers and amounts score 0.4 with
# phonenumbers' leniency and are redacted too.
BOUNDS = {
    "CREDIT_CARD": (0.99, 0.99),
    "EMAIL_ADDRESS": (0.99, 0.99),
    "IBAN_CODE": (0.99, 0.99),
    "PERSON": (0.98, 0.99),
    "PHONE_NUMBER": (0.95, 0.99),
    "POLICY_NUMBER": (0.99, 0.99),
}


def _notes(n: int = 600) -> tuple[pl.DataFrame, pl.DataFrame]:
    holders = generate_policyholders(n, seed=[1, 2])
    notes, truth = generate_adjuster_notes(
        holders, [f"P202607{i:07d}" for i in range(n)], np.ones(n, dtype=bool), seed=[1, 3]
    )
    frame = pl.concat([holders, notes], how="horizontal").with_row_index("row")
    return frame, truth.with_columns(pl.col("row").cast(pl.String).alias("document_id"))


@pytest.fixture(scope="module")
def scanned() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    frame, truth = _notes()
    out, log = pii.scrub(frame, POLICY, SALT, document_id=DOC)
    return frame, truth, out, log


def test_precision_and_recall_per_entity_type_on_generated_notes(scanned) -> None:
    _, truth, _, log = scanned
    found = log.filter(pl.col("column") == "adjuster_notes")
    scores = pii.detection_scores(found, truth)
    with pl.Config(tbl_rows=20, tbl_cols=8):
        print(scores)  # the report asked for (pytest -s)
    for row in scores.iter_rows(named=True):
        p_min, r_min = BOUNDS[row["entity_type"]]
        assert row["precision"] >= p_min, row
        assert row["recall"] >= r_min, row


def test_no_raw_value_of_a_declared_column_or_a_true_span_survives(scanned) -> None:
    """Every personal value the generator inserted is gone, whole and in part."""
    frame, truth, out, log = scanned
    for column in POLICY.columns:
        assert not set(frame[column]) & set(out[column]), column
    acted = [e for e, rule in POLICY.entities.items() if rule.action != "keep"]
    true = truth.filter(pl.col("entity_type").is_in(acted))
    notes = out["adjuster_notes"].to_list()
    left = [(r, t) for r, t in true.select("row", "text").iter_rows() if t in notes[r]]
    assert left == [], f"{len(left)} of {true.height} true spans left raw: {left[:10]}"
    found = log.filter(pl.col("column") == "adjuster_notes")
    covered = true.join(found, on=["document_id", "entity_type"], suffix="_d").filter(
        (pl.col("start_d") <= pl.col("start")) & (pl.col("end") <= pl.col("end_d"))
    )
    partial = true.join(covered, on=["document_id", "entity_type", "start"], how="anti")
    assert partial.height == 0, partial.select("entity_type", "text").rows()[:10]
    assert set(log.columns) == set(pii.LOG_COLUMNS)  # offsets and scores, never the value


def test_a_name_without_cue_or_listed_given_name_is_missed() -> None:
    """The offline limit, stated in the README: no cue and an unlisted given name."""
    assert "Bartholomew" not in pii_names.given_names()

    def names(text: str) -> list[str]:
        return [
            text[r.start : r.end] for r in pii.scan_text(text, POLICY) if r.entity_type == "PERSON"
        ]

    assert names("Bartholomew Quigley paid the garage.") == []
    assert names("Anna Quigley paid the garage.") == ["Anna Quigley"]
    assert names("Bartholomew Quigley (passenger) paid.") == ["Bartholomew Quigley"]
    assert names("Statement from witness Bartholomew van der Berg taken.") == [
        "Bartholomew van der Berg"
    ]
    assert (
        names("Called the garage on Monday. According to Policy P2026070000001 it is fine.") == []
    )


def test_the_given_name_list_is_not_the_generators_answer_key() -> None:
    """Recall on generated notes must not come from reading the generator's names."""
    listed = set(pii_names.given_names())
    unlisted = sorted(set(THIRD_PARTY_GIVEN) - listed)
    assert len(listed) >= 300 and len(unlisted) >= 20, unlisted


def test_tokens_are_deterministic_for_a_salt_and_differ_across_salts() -> None:
    a = pii.token("amelia.okafor1@web.de", "EMAIL_ADDRESS", SALT)
    assert a == pii.token("amelia.okafor1@web.de", "EMAIL_ADDRESS", SALT)
    assert a != pii.token("amelia.okafor1@web.de", "EMAIL_ADDRESS", b"another-salt-0123456789")
    assert a != pii.token("amelia.okafor2@web.de", "EMAIL_ADDRESS", SALT)
    assert a.startswith("<EMAIL_ADDRESS:") and "amelia" not in a
    frame, _ = _notes(20)
    first, _ = pii.scrub(frame, POLICY, SALT, document_id=DOC)
    again, _ = pii.scrub(frame, POLICY, SALT, document_id=DOC)
    other, _ = pii.scrub(frame, POLICY, b"another-salt-0123456789", document_id=DOC)
    assert first.equals(again)
    assert (first["policyholder_email"] != other["policyholder_email"]).all()


def test_changing_only_the_email_action_touches_only_rows_with_emails(scanned) -> None:
    frame, _, before, log_before = scanned
    rules = {**POLICY.entities, "EMAIL_ADDRESS": pii.EntityRule("redact", 0.5)}
    changed = dataclasses.replace(POLICY, version=f"{POLICY.version}-email", entities=rules)
    assert POLICY.changed_entities(changed) == ["EMAIL_ADDRESS"]
    after, log_after = pii.scrub(frame, changed, SALT, document_id=DOC)
    email_docs = set(
        log_before.filter(
            (pl.col("entity_type") == "EMAIL_ADDRESS") & (pl.col("column") == "adjuster_notes")
        )["document_id"]
    )
    notes_changed = before["adjuster_notes"] != after["adjuster_notes"]
    assert set(before.filter(notes_changed)["row"].cast(pl.String)) == email_docs
    for column in ("policyholder_name", "policyholder_phone", "policyholder_iban"):
        assert before[column].equals(after[column])
    assert (before["policyholder_email"] != after["policyholder_email"]).all()
    spans = ["document_id", "column", "entity_type", "start", "end", "score"]
    assert log_before.select(spans).equals(log_after.select(spans))
    moved = log_before.with_columns(log_after["action"].alias("new")).filter(
        pl.col("action") != pl.col("new")
    )
    assert set(moved["entity_type"]) == {"EMAIL_ADDRESS"}
    assert set(log_after["policy_version"]) == {f"{POLICY.version}-email"}


def test_a_malformed_policy_names_the_file_and_the_entry() -> None:
    with pytest.raises(pii.PiiPolicyError, match=r"p\.yaml: entities\.EMAIL_ADDRESS\.action"):
        pii.parse_policy("version: 1\nentities:\n  EMAIL_ADDRESS: {action: hide}\n", "p.yaml")
    with pytest.raises(pii.PiiPolicyError, match="needs a non-empty 'version'"):
        pii.parse_policy("entities: {}\n", "p.yaml")
    with pytest.raises(pii.PiiPolicyError, match=r"columns\.email is 'EMAIL'"):
        pii.parse_policy("version: 1\ncolumns: {email: EMAIL}\n", "p.yaml")


def test_an_empty_or_short_salt_names_the_variable() -> None:
    with pytest.raises(pii.PiiSaltError, match="PIPELINE_PII_SALT is unset or empty"):
        pii.check_salt("", "PIPELINE_PII_SALT")
    with pytest.raises(pii.PiiSaltError, match="PIPELINE_PII_SALT is too short"):
        pii.check_salt("short", "PIPELINE_PII_SALT")


def test_the_rows_own_values_are_found_where_validators_and_cues_are_not() -> None:
    """``phonenumbers`` calls +44 7700 numbers unallocated; the row declares it anyway."""
    text = "Call +44 7700 225565 or write to Amelia\nOkafor; not Amelia Okaforova."
    own = {"PHONE_NUMBER": "+44 7700 225565", "PERSON": "Amelia Okafor"}
    spans = [(r.entity_type, text[r.start : r.end]) for r in pii.scan_text(text, POLICY, own)]
    assert spans == [("PHONE_NUMBER", "+44 7700 225565"), ("PERSON", "Amelia\nOkafor")]
    assert pii.scan_text(text, POLICY) == []
