r"""Person names in adjuster notes without NER: cue words and a list of given names.

Offline there is no named-entity model (see :mod:`pipeline.domain.pii`), so a witness or
the other driver, who is neither the row's policyholder nor after a title, has to be
found from the prose around the name or from the name itself:

* **cue before**: a capitalised name sequence after a role or reporting phrase adjuster
  notes use (``witness``, ``the other driver,``, ``according to``, ``spoke with``, ...);
* **cue after**: a capitalised name sequence followed by a role in brackets or after a
  comma (``X (passenger)``, ``X, the tenant``) or by a reporting verb (``X confirmed``);
* **given name**: a given name from ``given_names.txt`` (a list written for this
  package, not derived from the demo generator) followed by a capitalised surname.

What this still misses: a name with no cue whose given name is not in the list
(``Bartholomew Quigley paid``), a surname alone without a cue, names written in lower
case. Patterns run with Presidio's ``regex`` engine (variable-width look-behind,
``\p{Lu}``), case-sensitive: a name is capitalised.
"""

import re
from functools import lru_cache
from pathlib import Path

from presidio_analyzer import Pattern, PatternRecognizer

GIVEN_NAMES_FILE = Path(__file__).with_name("given_names.txt")

_SP = r"[ \t]+"
NAME_PART = r"(?:\p{Lu}['’])?\p{Lu}\p{Ll}+(?:\p{Lu}\p{Ll}+)?(?:-\p{Lu}\p{Ll}+)?"
"""One capitalised name part: ``Okafor``, ``O'Brien``, ``McKenzie``, ``Al-Rashid``."""
PARTICLE = r"(?:van|von|der|den|de|da|di|del|della|du|dos|das|la|le|ter|ten|al|el|bin|ibn)"
"""Lower-case surname particles (``van der Berg``, ``de Souza``)."""
NOT_A_NAME = (
    "The", "This", "That", "These", "Those", "He", "She", "They", "We", "It", "His", "Her",
    "Their", "Our", "Mr", "Ms", "Mrs", "Miss", "Dr", "Mx", "Policy", "Customer", "Client",
    "Claim", "Garage", "Police", "Insurer",
    "Reserve", "Refund", "Premium", "Loss", "Invoice", "Monday", "Tuesday", "Wednesday",
    "Thursday", "Friday", "Saturday", "Sunday", "January", "February", "March", "April",
    "May", "June", "July", "August", "September", "October", "November", "December",
)  # fmt: skip
"""Capitalised words a cue is often followed by that are not names."""
ROLES = (
    "witness", "witnesses", "driver", "other driver", "third party", "third-party",
    "claimant", "passenger", "neighbour", "neighbor", "tenant", "landlord", "lodger",
    "cyclist", "pedestrian", "owner", "wife", "husband", "partner", "son", "daughter",
    "mother", "father", "brother", "sister", "assessor", "engineer", "plumber", "builder",
    "contractor", "roofer", "electrician", "mechanic", "colleague", "friend",
)  # fmt: skip
"""Roles of third parties in claims prose."""
CUES_BEFORE = (
    *ROLES,
    "spoke with", "spoke to", "speaking with", "called", "phoned", "rang", "contacted",
    "e-mailed", "emailed", "wrote to", "met", "met with", "visited", "according to",
    "statement from", "statement by", "statement of", "reported by", "confirmed by",
    "signed by", "sent by", "sent in by", "provided by", "voicemail for", "message for",
    "on behalf of", "named", "called back",
)  # fmt: skip
"""Words after which a capitalised sequence is taken for a name."""
VERBS_AFTER = (
    "said", "says", "stated", "states", "confirmed", "confirms", "called", "rang",
    "phoned", "reported", "reports", "admitted", "denied", "disputes", "disputed",
    "claims", "claimed", "explained", "agreed", "refused", "wrote", "sent",
)  # fmt: skip
"""Reporting verbs after which a preceding capitalised sequence is taken for a name."""


def _alternatives(words: tuple[str, ...]) -> str:
    """Case-insensitive alternation, longest first (so ``other driver`` beats ``driver``)."""
    ordered = sorted(words, key=len, reverse=True)
    escaped = (_SP.join(re.escape(part) for part in w.split()) for w in ordered)
    return "(?i:" + "|".join(escaped) + ")"


def name_sequence(min_parts: int) -> str:
    """A name of ``min_parts`` to four capitalised parts (particles allowed between)."""
    stop = r"(?!(?:" + "|".join(NOT_A_NAME) + r")\b)"
    part = rf"{_SP}(?:{PARTICLE}{_SP}){{0,2}}{NAME_PART}"
    return rf"{stop}{NAME_PART}(?:{part}){{{min_parts - 1},3}}\b"


def cue_before_pattern() -> str:
    """A name after a cue (an optional comma and title between): ``driver, Mr X``."""
    title = rf"(?:(?:Mr|Ms|Mrs|Miss|Dr|Mx)\.?{_SP})?"
    return rf"(?<=\b{_alternatives(CUES_BEFORE)},?{_SP}{title}){name_sequence(1)}"


def cue_after_pattern() -> str:
    """A full name before ``(role)``, ``, the role`` or a reporting verb."""
    role = rf"[ \t]*(?:\(|,[ \t]*)(?:(?i:the|our|a|an|his|her|their){_SP})?{_alternatives(ROLES)}"
    verb = rf"{_SP}{_alternatives(VERBS_AFTER)}"
    return rf"\b{name_sequence(2)}(?=(?:{role}|{verb})\b)"


@lru_cache(maxsize=1)
def given_names() -> tuple[str, ...]:
    """The packaged given-name list (comments and blank lines skipped)."""
    lines = GIVEN_NAMES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(n for n in (ln.split("#", 1)[0].strip() for ln in lines) if n)


def given_name_pattern() -> str:
    """A listed given name followed by one to three capitalised parts (middle names, surname).

    Presidio's own ``deny_list`` would match the given name alone and leave the surname
    in the text, so the list is compiled into a pattern that takes both.
    """
    names = "|".join(re.escape(n) for n in sorted(given_names(), key=len, reverse=True))
    part = rf"{_SP}(?:{PARTICLE}{_SP}){{0,2}}{NAME_PART}"
    return rf"\b(?:{names})(?:{part}){{1,3}}\b"


def name_recognizers() -> list[PatternRecognizer]:
    """The three recognizers; scores rank them below the record's own name (0.9)."""
    specs = [
        ("CueBeforeNameRecognizer", "name after a cue", cue_before_pattern(), 0.7),
        ("CueAfterNameRecognizer", "name before a role or verb", cue_after_pattern(), 0.65),
        ("GivenNameRecognizer", "listed given name and surname", given_name_pattern(), 0.6),
    ]
    return [
        PatternRecognizer(
            supported_entity="PERSON",
            name=name,
            patterns=[Pattern(label, pattern, score)],
            global_regex_flags=re.DOTALL | re.MULTILINE,  # case matters
        )
        for name, label, pattern, score in specs
    ]
