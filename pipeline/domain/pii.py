"""Personal data in delivered rows: detect with Presidio, then redact or tokenise by policy.

The scan runs offline. spaCy's trained pipelines cannot be downloaded here (and the
re-uploads of them on PyPI are not from spaCy's authors), so the analyzer uses
Presidio's :class:`~presidio_analyzer.nlp_engine.NoOpNlpEngine`: no tokens, no lemmas,
no named-entity recognition. What that leaves:

* Presidio's pattern recognizers with validation: e-mail addresses, phone numbers
  (``phonenumbers``), IBANs (ISO 13616 check digits) and card numbers (Luhn);
* domain :class:`~presidio_analyzer.PatternRecognizer` s: policy numbers and names
  after a title (``Mr Okafor``);
* names without NER (:mod:`pipeline.domain.pii_names`): after a cue word (``witness``,
  ``according to``), before a role (``X (passenger)``) or a reporting verb, or starting
  with a listed given name;
* values the record itself declares: each delivered personal column of a row (name,
  phone, e-mail, IBAN, card) is searched for in that row's notes (a string search per
  row), so a number a validator rejects (``+44 7700 ...`` is unallocated for
  ``phonenumbers``) is still found when it is the row's own;
* declared personal columns (:data:`PiiPolicy.columns`) are personal data by
  definition and are never scanned: the whole value is the span.

The cost: a name with no cue, not after a title, not the row's own and not starting
with a listed given name is not found without NER (measured figures on generated notes
are in the README, an upper bound for real prose). Presidio's context words cannot
raise a score either, since the no-op engine yields no tokens; cues are in the patterns.
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import polars as pl
import tldextract
import yaml
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
)
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig
from presidio_anonymizer.operators import Hash

from pipeline.domain.errors import DomainError
from pipeline.domain.pii_names import name_recognizers

ACTIONS = ("redact", "tokenise", "keep")
MIN_SALT_BYTES = 16
"""Presidio's hash operator refuses shorter salts (128 bits)."""
TOKEN_HEX_CHARS = 16
LOG_COLUMNS = {
    "document_id": pl.String,
    "column": pl.String,
    "entity_type": pl.String,
    "start": pl.Int64,
    "end": pl.Int64,
    "score": pl.Float64,
    "recognizer": pl.String,
    "policy_version": pl.String,
    "action": pl.String,
}
"""Schema of a detection log: one row per span acted on (never the span's text)."""


class PiiPolicyError(DomainError):
    """A PII policy file is malformed: names the file, the entry and the value."""


class PiiSaltError(DomainError):
    """The tokenisation salt is missing or too short."""


@dataclass(frozen=True)
class EntityRule:
    """What to do with one entity type: ``action`` on spans scoring >= ``threshold``."""

    action: str
    threshold: float


@dataclass(frozen=True)
class PiiPolicy:
    """A versioned PII policy (``pipeline/pii_policy.yaml``).

    Attributes
    ----------
    version
        Recorded on every detection-log row.
    entities
        Entity type to rule; types not listed are not looked for.
    columns
        Declared personal column to its entity type: the whole value is one span.
    text_columns
        Free-text columns scanned with the analyzer; the row's own values of ``columns``
        are looked for in them.
    """

    version: str
    entities: dict[str, EntityRule]
    columns: dict[str, str]
    text_columns: tuple[str, ...]

    def changed_entities(self, other: "PiiPolicy") -> list[str]:
        """Entity types whose rule differs between this policy and ``other``."""
        names = sorted(set(self.entities) | set(other.entities))
        return [e for e in names if self.entities.get(e) != other.entities.get(e)]


def parse_policy(text: str, source: str) -> PiiPolicy:
    """Parse and validate a policy document; ``source`` names it in errors.

    Raises
    ------
    PiiPolicyError
        When the version is missing, an action is not one of :data:`ACTIONS`, a
        threshold is outside [0, 1] or a column names an entity type without a rule.
    """
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not str(doc.get("version", "")).strip():
        raise PiiPolicyError(f"{source}: a PII policy needs a non-empty 'version'")
    entities = {}
    for name, rule in (doc.get("entities") or {}).items():
        action = (rule or {}).get("action")
        threshold = (rule or {}).get("threshold", 0.5)
        if action not in ACTIONS:
            raise PiiPolicyError(
                f"{source}: entities.{name}.action is {action!r}, not one of {', '.join(ACTIONS)}"
            )
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise PiiPolicyError(
                f"{source}: entities.{name}.threshold is {threshold!r}, not within [0, 1]"
            )
        entities[str(name)] = EntityRule(action, float(threshold))
    columns = {str(c): str(e) for c, e in (doc.get("columns") or {}).items()}
    for column, entity in columns.items():
        if entity not in entities:
            raise PiiPolicyError(
                f"{source}: columns.{column} is {entity!r}, which has no rule under entities"
            )
    return PiiPolicy(
        version=str(doc["version"]),
        entities=entities,
        columns=columns,
        text_columns=tuple(doc.get("text_columns") or ()),
    )


def check_salt(salt: str, variable: str) -> bytes:
    """The salt as bytes; ``variable`` names where it comes from in the error.

    Raises
    ------
    PiiSaltError
        When the salt is empty or shorter than :data:`MIN_SALT_BYTES` bytes.
    """
    raw = (salt or "").encode()
    if len(raw) < MIN_SALT_BYTES:
        raise PiiSaltError(
            f"the PII tokenisation salt {variable} is "
            f"{'unset or empty' if not raw else 'too short'} ({len(raw)} bytes); "
            f"set {variable} to a secret of at least {MIN_SALT_BYTES} bytes"
        )
    return raw


def token(value: str, entity_type: str, salt: bytes) -> str:
    """Deterministic token of ``value`` for one salt: ``<ENTITY:sha256(value + salt)[:16]>``.

    Presidio's :class:`~presidio_anonymizer.operators.Hash` does the hashing; the same
    value gives the same token in a column and in free text, so joins still work.
    """
    digest = Hash().operate(value, {"salt": salt, "hash_type": "sha256"})
    return f"<{entity_type}:{digest[:TOKEN_HEX_CHARS]}>"


def _domain_recognizers() -> list[PatternRecognizer]:
    """Patterns of this business: policy numbers, names after a title."""
    return [
        PatternRecognizer(
            supported_entity="POLICY_NUMBER",
            name="PolicyNumberRecognizer",
            patterns=[Pattern("policy number", r"\bP\d{13}\b", 0.85)],
        ),
        PatternRecognizer(
            supported_entity="PERSON",
            name="TitledNameRecognizer",
            patterns=[
                Pattern(
                    "name after a title",
                    r"(?:(?<=\bMr )|(?<=\bMs )|(?<=\bDr )|(?<=\bMrs )|(?<=\bMr\. )|(?<=\bMiss ))"
                    r"[A-Z][a-z]*(?:['\- ][A-Z][a-z]+)?",
                    0.6,
                )
            ],
            global_regex_flags=re.DOTALL | re.MULTILINE,  # case matters: a name is capitalised
        ),
    ]


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, validating domains against tldextract's bundled list.

    The stock recognizer calls ``tldextract.extract``, which first tries to download the
    Public Suffix List; offline that logs a traceback per process before falling back.
    """

    _extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        """True when the address ends in a known public suffix."""
        return self._extract(pattern_text).fqdn != ""


@lru_cache(maxsize=1)
def build_analyzer() -> AnalyzerEngine:
    """A Presidio analyzer that needs no downloaded model (see the module docstring)."""
    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no-op"}])
    analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
    analyzer.registry.recognizers = []
    for recognizer in (
        OfflineEmailRecognizer(),
        PhoneRecognizer(),
        IbanRecognizer(),
        CreditCardRecognizer(),
        *_domain_recognizers(),
        *name_recognizers(),
    ):
        analyzer.registry.add_recognizer(recognizer)
    return analyzer


def _record_spans(text: str, known: dict[str, str]) -> list[RecognizerResult]:
    """Where ``text`` repeats one of the row's own declared values (score 0.9).

    Whitespace is ignored on both sides, so a name split over a line break and an IBAN
    or card typed in fours are found. A string search, not a pattern per row and value:
    Presidio ad-hoc recognizers or ``re`` patterns compiled per row tripled the scan time
    (and evicted the compiled patterns of ``phonenumbers`` from ``re``'s cache).
    """
    chars = [(i, c) for i, c in enumerate(text) if not c.isspace()]
    compact = "".join(c for _, c in chars)
    found = []
    for entity, value in known.items():
        needle = "".join((value or "").split())
        name = "RecordNameRecognizer" if entity == "PERSON" else "RecordValueRecognizer"
        at = compact.find(needle) if needle else -1
        while at >= 0:
            start, end = chars[at][0], chars[at + len(needle) - 1][0] + 1
            if _standalone(text, start, end):
                meta = {"recognizer_name": name}
                found.append(RecognizerResult(entity, start, end, 0.9, recognition_metadata=meta))
            at = compact.find(needle, at + 1)
    return found


def _standalone(text: str, start: int, end: int) -> bool:
    """No letter or digit glued to either end: ``Ann Lee`` is not found in ``Ann Leeds``."""
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not (before.isalnum() or before == "_" or after.isalnum() or after == "_")


def scan_text(
    text: str, policy: PiiPolicy, known: dict[str, str] | None = None
) -> list[RecognizerResult]:
    """Spans of ``text`` the policy acts on: above their threshold, overlaps resolved.

    ``known`` maps entity types to the record's own declared values, looked for as
    such. Of two overlapping spans the higher score wins (then the longer one).
    """
    if not text:
        return []
    found = build_analyzer().analyze(text, language="en", entities=list(policy.entities))
    found += _record_spans(text, {e: v for e, v in (known or {}).items() if e in policy.entities})
    kept: list[RecognizerResult] = []
    for r in sorted(found, key=lambda r: (-r.score, r.start - r.end, r.start)):
        if r.score < policy.entities[r.entity_type].threshold:
            continue
        if all(r.end <= k.start or r.start >= k.end for k in kept):
            kept.append(r)
    return sorted(kept, key=lambda r: r.start)


def _operators(policy: PiiPolicy, salt: bytes) -> dict[str, OperatorConfig]:
    ops = {}
    for entity, rule in policy.entities.items():
        if rule.action == "redact":
            ops[entity] = OperatorConfig("replace", {"new_value": f"<{entity}>"})
        elif rule.action == "tokenise":
            ops[entity] = OperatorConfig("custom", {"lambda": _tokeniser(entity, salt)})
        else:
            ops[entity] = OperatorConfig("keep")
    return ops


def _tokeniser(entity: str, salt: bytes):  # a Presidio custom operator
    return lambda value: token(value, entity, salt)


def _apply(value: str, entity: str, policy: PiiPolicy, salt: bytes) -> str:
    action = policy.entities[entity].action
    if action == "redact":
        return f"<{entity}>"
    return token(value, entity, salt) if action == "tokenise" else value


def scrub(
    frame: pl.DataFrame, policy: PiiPolicy, salt: bytes, *, document_id: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Redact or tokenise the personal data of ``frame`` as ``policy`` says.

    Parameters
    ----------
    frame
        Text columns as delivered; personal columns the frame lacks are skipped.
    policy
        What to look for and what to do with it.
    salt
        Tokenisation salt (:func:`check_salt`).
    document_id
        Expression naming each row in the log (e.g. file and row number).

    Returns
    -------
    tuple of (scrubbed, log)
        ``scrubbed`` is ``frame`` with personal values replaced; ``log`` has
        :data:`LOG_COLUMNS`, one row per span acted on (``keep`` included).
    """
    ids = frame.select(document_id.alias("id"))["id"].to_list()
    log: list[tuple[Any, ...]] = []
    out = {}
    for column, entity in policy.columns.items():
        if column not in frame.columns:
            continue
        values = frame[column].to_list()
        rule = policy.entities[entity]
        out[column] = [v if not v else _apply(v, entity, policy, salt) for v in values]
        log += [
            (i, column, entity, 0, len(v), 1.0, "declared column", policy.version, rule.action)
            for i, v in zip(ids, values, strict=True)
            if v
        ]
    anonymizer, operators = AnonymizerEngine(), _operators(policy, salt)
    declared = [c for c in policy.columns if c in frame.columns]
    known = [
        {policy.columns[c]: row[c] for c in declared} for row in frame.select(declared).to_dicts()
    ]
    for column in (c for c in policy.text_columns if c in frame.columns):
        texts, scrubbed = frame[column].to_list(), []
        for doc_id, text, values in zip(ids, texts, known, strict=True):
            spans = scan_text(text, policy, values)
            log += [
                (doc_id, column, s.entity_type, s.start, s.end, round(s.score, 4),
                 (s.recognition_metadata or {}).get("recognizer_name", ""), policy.version,
                 policy.entities[s.entity_type].action)
                for s in spans
            ]  # fmt: skip
            scrubbed.append(anonymizer.anonymize(text, spans, operators).text if spans else text)
        out[column] = scrubbed
    scrubbed_frame = frame.with_columns([pl.Series(c, v, dtype=pl.String) for c, v in out.items()])
    return scrubbed_frame, pl.DataFrame(log, schema=LOG_COLUMNS, orient="row")


def detection_scores(found: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """Precision and recall per entity type of detected spans against true spans.

    Both frames have ``document_id``, ``entity_type``, ``start``, ``end``. A detection
    is a true positive when it overlaps a true span of the same type and document;
    a true span is recalled when some detection of its type overlaps it.
    """
    pairs = found.join(truth, on=["document_id", "entity_type"], suffix="_t").filter(
        (pl.col("start") < pl.col("end_t")) & (pl.col("start_t") < pl.col("end"))
    )
    hit = pairs.select("document_id", "entity_type", "start", "end").unique()
    recalled = pairs.select(
        "document_id", "entity_type", pl.col("start_t").alias("start"), pl.col("end_t").alias("end")
    ).unique()
    rows = []
    for entity in sorted(set(truth["entity_type"]) | set(found["entity_type"])):
        n_found = found.filter(pl.col("entity_type") == entity).height
        n_true = truth.filter(pl.col("entity_type") == entity).height
        tp = hit.filter(pl.col("entity_type") == entity).height
        rec = recalled.filter(pl.col("entity_type") == entity).height
        rows.append(
            {
                "entity_type": entity,
                "true_spans": n_true,
                "detected": n_found,
                "precision": tp / n_found if n_found else float("nan"),
                "recall": rec / n_true if n_true else float("nan"),
            }
        )
    return pl.DataFrame(rows)
