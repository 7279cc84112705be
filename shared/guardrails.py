"""Inline guardrails: redact personal data, screen prompt injections, check a JSON reply against its schema.

Both text checks first fold what evades a pattern: NFKC ("ｊｏｈｎ" is "john", "ﬁ" is "fi"), format
characters (Unicode category Cf: zero-width spaces and joiners, bidi controls, soft hyphens) dropped, and
digits of every script read as ASCII digits. screen_injection() also maps Cyrillic and Greek lookalikes
of Latin letters to them ("іgnоre" is "ignore"), in a text that has Latin letters at all: see normalise(),
which is for matching only, never for display.

redact_pii() finds emails (also "name [at] example [dot] com", "name at example dot com"), phone numbers,
payment card numbers (Luhn), US social security numbers, IBANs (mod 97) and IPv4 addresses, and replaces
each with a placeholder ("[EMAIL]", "[PHONE]", "[CARD]", "[SSN]", "[IBAN]", "[IP]") at its ORIGINAL
position: it detects on a copy folded one character at a time and maps each match back through the
folding, so the rest of the text comes back exactly as it was (a text with nothing to redact comes back
as the same string). Where two overlap, the first of email, IBAN, card, SSN, IPv4 and phone wins. Choices:

- A spelled-out email needs "[at]" (or "(at)", "{at}", "<at>") or a spelled "dot", a known top-level
  domain, and no "the", "this", "my"... among its parts: "look at the dot com bubble" is a phrase.
- Phone numbers have 9 to 12 digits (15 after "+" or "00"), as one block of digits and separators: a
  grouped number ("555-123-4567", "(555) 123 4567", "+44 20 7946 0958") counts, and so does a bare run
  that starts with the trunk "0"; a bare run, a number grouped like thousands ("1 234 567 890") or digits
  spaced one by one count only after a word such as "phone", "call" or "my number". So
  "123456789 * 987654321", dates and times ("2024-01-15 12:30") and build numbers ("10.0.19041.1234")
  stay.
- Card numbers: 13 to 19 digits that start with 2 to 6 (the issuers' ranges) and pass Luhn, bare,
  printed in groups (4-4-4-4, 4-6-5) or spaced one by one; a candidate that fails is tried again cut at
  its group boundaries, so a card followed by an expiry or a CVC is still found.
- Social security numbers are ddd-dd-dddd or ddd dd dddd under the SSA's rules (no area 000, 666 or
  9xx, no group 00, no serial 0000); nine bare digits are not one.
- An IPv4 address is a dotted quad of octets 0 to 255 without leading zeros: "1.2.3.4" is one (as in
  "ping 1.2.3.4") unless a version cue comes right before it ("version 1.2.3.4", "v1.2.3.4",
  "pkg==1.2.3.4"); five parts ("1.2.3.4.5") never are. IPv6, names and postal addresses are not detected.

screen_injection() applies rules, then optionally an embedding index of known injections
(services/router/data/injections.jsonl). The rules read a view of the folded text in small Latin letters
only, one space between words, leetspeak read (0 o, 1 i, 3 e, 4 a, 5 s, 7 t, @ a, $ s), and words
spelled out letter by letter joined ("i g n o r e", "i.g.n.o.r.e"); every space in a rule is optional,
so words run together match too. Base64 and hex runs are decoded and screened by the same rules. The
rules know English phrasings; other languages and paraphrases are left to the embedding index. Known
false positives: talk about injections that quotes one ("why do LLMs ignore previous instructions?"),
and role play with a character called "DAN" in capitals.

check_json() parses with the standard library (no jsonschema: it is not a dependency of this project)
and validates a practical subset of JSON Schema, see its docstring; repair_prompt() is the user message
for one retry through the same model.

Untrusted input: every pattern runs in linear time (a repeated group is either bounded or unambiguous,
each repeat starting with a character the one before cannot end in; a pattern that needs something after
a run may only start where the run starts), Python retries at most MOST_REJECTED failed candidates of one
kind, and each check has a cap: redact_pii scans all of a text up to MAX_REDACT_CHARS (every text a
request can carry) and refuses a longer one, screen_injection screens the first and last
MAX_SCREEN_CHARS / 2 characters of a longer text (so the middle of a long document is not screened),
check_json refuses an output over MAX_JSON_CHARS. A megabyte of adversarial text takes under a second to
redact (0.9 s for one of every Unicode character) and 0.15 s to screen; a 500-character prompt tens of
microseconds. The first text with characters beyond ASCII costs about 0.2 s more, once per process, to
list the Unicode format characters and digits.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_REDACT_CHARS = 1_000_000  # schemas.request.MAX_TEXT_CHARS: redaction never leaves a tail unscanned
MAX_SCREEN_CHARS = 200_000
MAX_JSON_CHARS = 1_000_000
MAX_REPAIR_ECHO_CHARS = 20_000  # of the failed reply, quoted back in the repair prompt
MAX_DECODED = 8  # base64 or hex runs decoded and screened per text

DEFAULT_EXAMPLES = Path(__file__).resolve().parents[1] / "services" / "router" / "data" / "injections.jsonl"

Embed = Callable[[list[str]], np.ndarray]

# ---------------------------------------------------------------------------------------------- folding

_HOMOGLYPHS = str.maketrans("аеорсухѕіјԁһԛԝӏүкАВЕКМНОРСТХУЅІЈԚԜӀαορνικτυεχγϲϳΑΒΕΖΗΙΚΜΝΟΡΤΥΧıɑɡɩ",
                            "aeopcyxsijdhqwlykABEKMHOPCTXYSIJQWIaopviktuexycjABEZHIKMNOPTYXiagi")
_HOMOGLYPH_CHARS = frozenset(map(chr, _HOMOGLYPHS))
_LATIN_LETTER = re.compile("[A-Za-z]")


@cache
def _unicode_classes() -> tuple[frozenset[str], frozenset[str], dict[str, str]]:
    """The format characters (Unicode category Cf: zero-width spaces and joiners, bidi controls, soft hyphens,
    tags), the digits of other scripts, and each one's ASCII digit. Found once, in about 0.2 s."""
    dropped, digits = [], {}
    for code in range(128, sys.maxunicode + 1):
        category = unicodedata.category(char := chr(code))
        if category == "Cf":
            dropped.append(char)
        elif category == "Nd":
            digits[char] = str(unicodedata.decimal(char))
    return frozenset(dropped), frozenset(digits), digits


def _fold_table(text: str, lookalikes: bool) -> dict[int, str]:
    """A str.translate table for the characters of text that folding changes: NFKC, format characters
    dropped, digits in ASCII, and with `lookalikes`, Cyrillic and Greek lookalikes in Latin. ASCII never changes."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    odd_codes = np.unique(codes[codes > 127])
    odd = odd_codes.tobytes().decode("utf-32-le", "surrogatepass")  # the distinct characters, as one string
    dropped, digit_chars, digits = _unicode_classes()
    table = {ord(c): "" for c in dropped.intersection(odd)}
    table.update((ord(c), digits[c]) for c in digit_chars.intersection(odd))
    if lookalikes:
        table.update((ord(c), chr(_HOMOGLYPHS[ord(c)])) for c in _HOMOGLYPH_CHARS.intersection(odd))
    joined = "\n".join(odd)  # a newline, which nothing folds into, keeps the characters apart through NFKC
    if unicodedata.is_normalized("NFKC", joined):
        return table
    nfkc = unicodedata.normalize("NFKC", joined)
    folded = np.frombuffer(nfkc.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    ends = np.append(np.flatnonzero(folded == 10), len(folded))
    if len(ends) == len(odd):  # the characters whose NFKC is not themselves, found without a loop over all
        starts = np.append(0, ends[:-1] + 1)
        changed = (ends - starts != 1) | (folded[np.minimum(starts, len(folded) - 1)] != odd_codes)
        parts = ((int(odd_codes[i]), nfkc[starts[i]:ends[i]]) for i in np.flatnonzero(changed).tolist())
    else:  # a character folded into a newline (none is known): one at a time
        parts = ((ord(c), f) for c in odd if (f := unicodedata.normalize("NFKC", c)) != c)
    for code, part in parts:
        part = "".join(digits.get(c, c) for c in part if c not in dropped)
        table[code] = part.translate(_HOMOGLYPHS) if lookalikes else part
    return table


def normalise(text: str) -> str:
    """text as the checks match it: NFKC, no format characters, Latin lookalikes, whitespace collapsed.
    Lookalikes are mapped only in a text with Latin letters: one without hides no Latin word."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        lookalikes = _LATIN_LETTER.search(text) is not None
        if not text.isascii() and (table := _fold_table(text, lookalikes)):
            text = text.translate(table)
    return " ".join(text.split())


def _folded_with_ends(text: str) -> tuple[str, np.ndarray | None]:
    """text folded one character at a time (NFKC, format characters dropped, digits in ASCII; lookalike
    letters stay, an address in Cyrillic is one too), and for each original character where its folding
    ends in the folded text (None when every position is unchanged), to map matches back."""
    if text.isascii() or not (table := _fold_table(text, lookalikes=False)):
        return text, None
    folded = text.translate(table)
    if all(len(v) == 1 for v in table.values()):
        return folded, None
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    lengths = np.ones(int(codes.max()) + 1, dtype=np.int32)
    lengths[list(table)] = [len(v) for v in table.values()]
    return folded, np.cumsum(lengths[codes], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- PII

@dataclass(frozen=True)
class Redaction:
    """A text with its personal data replaced by placeholders."""

    text: str
    found: dict[str, int]  # kind -> how many were replaced


_PLACEHOLDERS = {"email": "[EMAIL]", "iban": "[IBAN]", "credit_card": "[CARD]", "us_ssn": "[SSN]", "ipv4": "[IP]",
                 "phone": "[PHONE]"}
# Candidates of one kind that may fail their check and still be tried again, cut at their group boundaries and
# from their next character; later ones are skipped whole. No person writes that many near misses (a data dump or
# an attack does), and Python's work per character stays bounded.
MOST_REJECTED = 2_000

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_AT = r"(?:\s*[\[({<]\s*(?i:at)\s*[\])}>]\s*|\s+(?i:at)\s+)"  # " [at] ", " (AT) ", " at "
_DOT = r"(?:\.|\s*[\[({<]\s*(?i:dot)\s*[\])}>]\s*|\s+(?i:dot)\s+)"
_SPELLED_EMAIL = re.compile(rf"(?<![\w.+-])[\w.+-]+{_AT}[\w-]+(?:{_DOT}[\w-]+)+")
_TLDS = frozenset({"com", "org", "net", "edu", "gov", "mil", "int", "io", "co", "uk", "us", "ca", "au", "nz", "ie",
                   "de", "fr", "es", "it", "nl", "be", "at", "ch", "se", "no", "dk", "fi", "pl", "pt", "cz", "ru", "ua",
                   "jp", "cn", "kr", "in", "br", "mx", "ar", "za", "eu", "info", "biz", "me", "ai", "dev", "app",
                   "tech", "online", "site", "xyz"})
# Spelled-out addresses are ordinary words: one of these as a part makes a phrase ("look at the dot com bubble").
_NOT_IN_ADDRESSES = frozenset({"a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "his", "her",
                               "their", "its", "it", "me", "you", "us", "them"})
_IBAN = re.compile(r"(?<!\w)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?!\w)")
_IBAN_DIGITS = str.maketrans({chr(ord("A") + i): str(10 + i) for i in range(26)})
# Patterns that begin with one character class, lookbehinds after it, are searched several times faster.
_CARD = re.compile(r"[0-9](?<![\w.,][0-9])(?:[ -]?[0-9]){12,18}(?!\w|[.,][0-9])")
_SSN = re.compile(r"[0-8](?<![\w-][0-8])[0-9]{2}(?<!000)(?<!666)([- ])(?!00)[0-9]{2}\1(?!0000)[0-9]{4}(?![\w-])")
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_NOT_A_VERSION = "".join(f"(?<!{cue})" for cue in [r"\bversion ", r"\bversion: ", r"\bversions ", r"\bver ",
                                                    r"\bver\. ", r"\brelease ", r"\bbuild ", r"\bfirmware ", "==",
                                                    ">=", "<=", "~=", "!=", "@"])
_IPV4 = re.compile(rf"(?<![\w.]){_NOT_A_VERSION}{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?!\w|\.\d)", re.IGNORECASE)
# A whole block of digits and separators or nothing: "4111 1111 1111 1112" holds no "1111 1111 1112".
_PHONE = re.compile(r"(?<![\w+.-])(?:\+|(?<!\d )(?<!\) ))\(?\d[\d ().-]{7,22}\d(?!\w|[ ().-]\d)")
_ODD_SEPARATORS = re.compile(r"[.-] ?[.(-]|  ")
_PHONE_CUE = re.compile(r"(?<![a-z])(?:phones?|tel|telephone|mobile|cell|cellphone|call|whatsapp|fax|sms"
                        r"|(?:my|his|her|their|your|our) number)(?![a-z])")  # on small letters: \b and re.I are slow
_DATE = re.compile(r"(?<!\d)(?:(?:19|20)\d\d[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./](?:19|20)\d\d)(?!\d)")
_DIGITS = re.compile(r"\d+")
_DOUBLED = str.maketrans("0123456789", "0246813579")  # a digit doubled, its two digits added


def _is_spelled_email(candidate: str, _text: str, _start: int) -> bool:
    parts = re.split(r"\W+", candidate.lower())
    bracketed = any(c in candidate for c in "[({<")
    return (parts[-1] in _TLDS and _NOT_IN_ADDRESSES.isdisjoint(parts)
            and (bracketed or "dot" in parts))  # "mail me at home.com" is a phrase, "at" alone is too common


def _is_iban(candidate: str, _text: str, _start: int) -> bool:
    compact = candidate.replace(" ", "")
    return (15 <= len(compact) <= 34 and 2 <= int(compact[2:4]) <= 98
            and int((compact[4:] + compact[:4]).translate(_IBAN_DIGITS)) % 97 == 1)


def _is_card(candidate: str, _text: str, _start: int) -> bool:
    if candidate[0] not in "23456":  # the issuers' ranges
        return False
    groups = candidate.replace("-", " ").split(" ")
    if len(groups) > 1 and max(map(len, groups)) > 1 and not (
            len(groups[0]) == 4 and all(3 <= len(g) <= 6 for g in groups[1:-1]) and len(groups[-1]) <= 6):
        return False  # printed in fours (or 4-6-5), or spaced out one digit at a time: not "123-45-6789 1234"
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and (
        sum(map(int, digits[-1::-2])) + sum(map(int, digits[-2::-2].translate(_DOUBLED)))) % 10 == 0  # Luhn


def _is_phone(candidate: str, text: str, start: int) -> bool:
    lengths = [len(g) for g in _DIGITS.findall(candidate)]
    international = candidate[0] == "+" or candidate.startswith("00")
    digits = sum(lengths) - (2 if candidate.startswith("00") else 0)
    if not 9 <= digits <= (15 if international else 12) or candidate.count("(") != candidate.count(")"):
        return False
    if _ODD_SEPARATORS.search(candidate):
        return False
    if international or "(" in candidate:
        return True
    if lengths == [3, 2, 4] or _DATE.search(candidate):
        return False  # a social security number's shape (one that breaks the SSA's rules), or a date and time
    if "." in candidate and not all(2 <= n <= 4 for n in lengths):
        return False  # versions and build numbers
    thousands = lengths[0] <= 3 and all(n == 3 for n in lengths[1:]) and "-" not in candidate
    spaced_out = all(n == 1 for n in lengths)  # "5 5 5 1 2 3 ...", or a list of digits
    if (len(lengths) > 1 and not thousands and not spaced_out) or (len(lengths) == 1 and candidate[0] == "0"):
        return True
    # A bare run, thousands or spaced-out digits: only after "phone", "call"...
    return _PHONE_CUE.search(text[max(0, start - 40):start].lower()) is not None


def _prefixes(candidate: str, cut: re.Pattern | None) -> Iterator[str]:
    """candidate, then its prefixes that end where `cut` matches, longest first."""
    yield candidate
    if cut is not None:
        for match in reversed(list(cut.finditer(candidate))):
            yield candidate[:match.start()]


def _maybe_spelled(text: str) -> bool:
    lower = text.lower()
    return "dot" in lower or _BRACKETED_AT.search(lower) is not None


_BRACKETED_AT = re.compile(r"at\s{0,3}[\])}>]")
_DETECTORS = [  # in order of precedence where two overlap: kind, the fewest digits it holds, what else a text
    # needs for the pattern to be run, the pattern, the check of a candidate (None: the pattern says it all), where
    # a failed candidate is cut and tried again
    ("email", 0, re.compile("@").search, _EMAIL, None, None),
    ("email", 0, _maybe_spelled, _SPELLED_EMAIL, _is_spelled_email, None),
    ("iban", 8, re.compile("[0-9](?<=[A-Z]{2}[0-9])[0-9]").search, _IBAN, _is_iban, re.compile(" ")),
    ("credit_card", 13, None, _CARD, _is_card, re.compile("[ -]")),
    ("us_ssn", 9, None, _SSN, None, None),
    ("ipv4", 4, re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\.").search, _IPV4, None, None),
    ("phone", 9, re.compile("[0-9](?:[ ().-]{0,3}[0-9]){8}").search, _PHONE, _is_phone, None),
]


def _spans(folded: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each item to redact in folded text; an earlier kind wins an overlap."""
    taken = bytearray(len(folded))
    spans = []
    digits = sum(map(folded.count, "0123456789"))  # digits of other scripts are ASCII ones by now
    for kind, fewest_digits, cue, pattern, check, cut in _DETECTORS:
        if digits < fewest_digits or (cue is not None and not cue(folded)):
            continue
        position, rejected = 0, 0
        while match := pattern.search(folded, position):
            start, end = match.span()
            if taken[start]:
                position = taken.find(0, start)
                if position < 0:
                    break
                continue
            if (overlap := taken.find(1, start, end)) >= 0:
                end = overlap if check is not None and cut else start  # only a cut candidate can pass
            thorough = rejected < MOST_REJECTED
            if check is not None and end > start:
                candidate = folded[start:end]
                candidates = _prefixes(candidate, cut) if thorough else (candidate,)
                end = next((start + len(c) for c in candidates if check(c, folded, start)), start)
            if end == start:  # failed; it may hide one that passes, so go on from its next character
                rejected += 1
                position = start + 1 if thorough else match.end()
                continue
            taken[start:end] = b"\x01" * (end - start)
            spans.append((start, end, kind))
            position = end
    return sorted(spans)


def redact_pii(text: str) -> Redaction:
    """text with each email, phone, card, SSN, IBAN and IPv4 address replaced by a placeholder such as
    "[EMAIL]", at its original position; found counts them by kind. Raises ValueError over MAX_REDACT_CHARS."""
    if len(text) > MAX_REDACT_CHARS:
        raise ValueError(f"redact_pii: text of {len(text)} characters is over MAX_REDACT_CHARS ({MAX_REDACT_CHARS})")
    folded, ends = _folded_with_ends(text)
    spans = _spans(folded)
    if not spans:
        return Redaction(text, {})
    if ends is not None:  # folded positions to original ones: a span covers every character folded into it
        starts = np.searchsorted(ends, [s for s, _, _ in spans], side="right")
        stops = np.searchsorted(ends, [e - 1 for _, e, _ in spans], side="right") + 1
        spans = [(int(s), int(e), kind) for s, e, (_, _, kind) in zip(starts, stops, spans, strict=True)]
    pieces, found, done = [], {}, 0
    for start, end, kind in spans:
        if start < done:  # two matches inside one expanded character ("½" is "1⁄2")
            continue
        pieces += [text[done:start], _PLACEHOLDERS[kind]]
        found[kind] = found.get(kind, 0) + 1
        done = end
    pieces.append(text[done:])
    return Redaction("".join(pieces), found)


# ---------------------------------------------------------------------------------------------- injections

@dataclass(frozen=True)
class Screen:
    """Whether a text is blocked as a prompt injection, and why."""

    blocked: bool
    reason: str | None  # for people: what the rule saw, and the words that tripped it
    rule: str | None  # ignore_instructions, role_play_override, system_prompt_exfiltration, developer_mode,
    # encoded_payload or similar_to_known
    score: float | None  # the best cosine to a known injection, when there was an index to compare with


class _Rule(NamedTuple):
    name: str
    meaning: str
    triggers: frozenset[str]  # every match holds one of these: without any, the pattern is not run
    pattern: re.Pattern
    confirm: re.Pattern | None  # must also be in the normalised text, or the rules' view of it
    unless_after: re.Pattern | None  # a match right after what this matches does not count


_PASSED = Screen(False, None, None, None)
# ASCII other than letters is a space, leetspeak digits and signs are letters.
_VIEW = {i: " " for i in range(128) if not chr(i).isalpha()} | str.maketrans("013457@$", "oieastas")
_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")
_SPELLED_CUE = re.compile(" [a-z] [a-z] [a-z] ")
_SPELLED_OUT = re.compile(r"(?<![a-z])[a-z](?: [a-z](?![a-z])){2,}")  # three or more single letters


def _words(normal: str) -> str:
    """The rules' view: small Latin letters, leetspeak read, one space between words and one at each end,
    spelled-out words joined ("i g n o r e" is "ignore"). Other scripts are not the rules' business."""
    if not normal.isascii():
        normal = _NOT_ASCII.sub(" ", normal)
    words = f" {' '.join(normal.lower().translate(_VIEW).split())} "
    if _SPELLED_CUE.search(words):
        words = _SPELLED_OUT.sub(lambda m: m.group().replace(" ", ""), words)
    return words


def _rule(name: str, meaning: str, lead: str, rest: str, triggers: str = "", confirm: re.Pattern | None = None,
          unless_after: str | None = None) -> _Rule:
    """A rule over _words(): one of the `lead` phrases (separated by "|"), then `rest`. Each space is optional,
    so words run together match too. Triggers: the longest word of each lead phrase, unless given."""
    phrases = lead.split("|")
    found = triggers.split() or [max(reversed(p.split(" ")), key=len) for p in phrases]
    pattern = re.compile(f"(?:{lead}) {rest}".replace(" ", " ?"))
    found = [t for t in dict.fromkeys(found) if not any(u != t and u in t for u in found)]  # "follow", "following"
    return _Rule(name, meaning, frozenset(found), pattern, confirm, re.compile(unless_after) if unless_after else None)


_FILL = "(?:(?:all|any|every|each|the|your|of|these|those|its|such|other|everything|that|you|were|have|been) ){0,4}"
_EARLIER = ("(?:previous|previously|prior|above|preceding|earlier|foregoing|former|original|initial|old|existing"
            "|system|developer|default|programmed|built in|standing|hidden)")
_ORDERS = ("(?:instructions?|rules?|prompts?|directions?|directives?|guidelines?|guidance|commands?|orders"
           "|programming|constraints?|restrictions?|polic(?:y|ies)|training|system prompt)")
_GIVEN = "(?:you (?:were|have been|ve been|got) (?:given|told)|given to you|you received|you were told)"
_NO_RULES = ("(?:(?:any|all|the|your|such|ethical|moral|content|safety|openai s|anthropic s|usual|normal"
             "|programmed|built in) ){0,3}(?:restrictions?|rules|filters?|filtering|limits|limitations|guidelines"
             "|boundaries|constraints|censorship|polic(?:y|ies)|ethics|morals|safeguards|guardrails|programming"
             "|restraints)")
_NO_RULES_TRIGGERS = ("restrict rule filter limit guideline boundar constraint censor polic ethic moral safeguard "
                      "guardrail programming restraint")
_UNBOUND = ("(?:unrestricted|unfiltered|uncensored|unchained|unbound|unlimited|unleashed|jailbroken|jail broken"
            "|amoral|immoral|unethical|evil|rogue)")
_UNBOUND_TRIGGERS = ("unrestrict unfilter uncensor unchain unbound unlimit unleash jail amoral immoral unethical evil "
                     "rogue")
_AI = "(?:ai|model|assistant|chatbot|bot|language model|llm|gpt|version of (?:yourself|you|chatgpt))"
_PERSONA = re.compile(r"\b(?:D\W?A\W?N|S\W?T\W?A\W?N|DUDE)\b|do ?anything ?now|strive ?to ?avoid ?norms|jailbr")
_MODES = ("(?:developer|dev|god|sudo|admin|administrator|root|jailbreak|jailbroken|unrestricted|unfiltered|uncensored"
          "|dan)")
_SHOW = ("reveal|print|repeat|show|display|output|tell|give|leak|dump|recite|write out|disclose|expose|spell out|echo"
         "|share|copy|paste|provide|type out|return|state|quote|translate|summarise|summarize|what is|what s"
         "|what are|what were|what was|read back|read out")

_RULES = [
    _rule("ignore_instructions", "asks to ignore its earlier instructions",
          "ignore|ignoring|disregard|forget|override|bypass|discard|neglect|abandon|skip|drop|throw out|set aside"
          "|stop following|cancel|do not follow|don t follow|no longer follow",
          _FILL + f"(?:{_EARLIER} (?:{_EARLIER} )?{_ORDERS}|{_ORDERS} (?:above|before|so far|{_GIVEN})"
          "|(?:everything|all|anything) (?:above|before this|said before|you (?:were|have been|ve been) "
          r"(?:told|given|instructed))|(?:the )?(?:above|previous|prior)(?: (?:and|then|instead)\b|\s?$))",
          unless_after=r" (?:i|we|they|t|dont|not|never) $"),  # "I ignore...", "don't forget the previous rules"
    _rule("role_play_override", "asks it to become a persona without rules", "you are now|you re now|youre now",
          "(?:(?:a|an|the|in|my|called|named|known as|completely|totally|fully|truly|an ai|ai|model|assistant"
          f"|chatbot|that is|who is|which is) ){{0,3}}(?:{_UNBOUND}|free from|freed from|liberated|without (?:any )?"
          "(?:restrictions|limits|rules|filters|guidelines|morals|ethics|censorship)|with no (?:restrictions|limits"
          "|rules|filters|guidelines|morals|ethics|censorship))"),
    _rule("role_play_override", "asks it to act as no longer bound",
          "you are no longer|you re no longer|youre no longer",
          "(?:bound|restricted|limited|constrained|subject to|governed|required to follow|an ai|a language model"
          "|an assistant|chatgpt|claude)"),
    _rule("role_play_override", "asks it to become a jailbreak persona",
          "you are now|you re now|from now on you are|you will be|you ll be|act as|acting as|behave as|respond as"
          "|answer as|pretend to be|roleplay as|role play as|become",
          r"(?:called |named |known as )?(?:dan|stan|dude)\b", triggers="dan stan dude", confirm=_PERSONA),
    _rule("role_play_override", "asks it to pretend it has no rules",
          "pretend|act as if|act like|behave as if|behave like|respond as if|answer as if|reply as if"
          "|roleplay as if|role play as if|from now on",
          "(?:that )?(?:you|you re|youre|you are|you have|you ve|you were|you had|you do|you don t have|there are"
          "|there is|to be) (?:(?:a|an|ai|model|assistant|chatbot|version|of|yourself|now|really|truly|completely"
          "|totally|have|had|are|were|with|has|that|is|absolutely|literally) ){0,4}(?:no|zero|any|without|free of"
          "|free from|not bound by|no longer bound by|not subject to|exempt from|unbound by|beyond|outside) "
          + _NO_RULES, triggers=_NO_RULES_TRIGGERS),
    _rule("role_play_override", "asks it to play an AI without rules",
          "you are|you re|be|act as|become|play|roleplay as|role play as|simulate|emulate|pretend to be",
          f"(?:an? )?(?:{_UNBOUND} ){{0,2}}{_AI} (?:with no|without any|without|with zero|free of|free from"
          "|that has no|that ignores|who ignores|who has no|which has no|that doesn t follow|unbound by) "
          + _NO_RULES, triggers=_NO_RULES_TRIGGERS),
    _rule("role_play_override", "asks it to answer as an unrestricted AI",
          "act|behave|respond|answer|reply|roleplay|role play|write|speak|talk",
          f"(?:as|like) (?:an? )?(?:{_UNBOUND} ){{1,3}}{_AI}\\b", triggers=_UNBOUND_TRIGGERS),
    _rule("developer_mode", "says it is in a 'developer mode' without rules", "you are|you re|youre",
          "(?:now )?(?:in|entering|operating in|running in|switched to|switching to|going into) (?:the )?"
          f"{_MODES} mode", triggers="mode"),
    _rule("developer_mode", "asks it to act in a 'developer mode' without rules",
          "simulate|emulate|pretend to be in|act as if you are in|act as if you were in|act as if you re in|stay in"
          "|remain in|respond in|answer in|reply in", f"(?:the )?{_MODES} mode", triggers="mode"),
    _rule("developer_mode", "asks it to turn on a jailbreak mode",
          "enter|activate|enable|unlock|engage|turn on|switch to|switch into|go into",
          "(?:the )?(?:jailbreak|jailbroken|unrestricted|unfiltered|uncensored|dan) mode", triggers="mode"),
    _rule("developer_mode", "speaks of a model in 'developer mode'",
          "chatgpt|gpt|assistant|ai|model|claude|llama|llm|bot|gemini|copilot",
          f"(?:with|in) (?:the )?{_MODES} mode", triggers="mode"),
    _rule("developer_mode", "asks for 'developer mode' output", "developer|dev|jailbreak|dan",
          r"mode (?:output|response|reply|answer)s?\b", triggers="mode"),
    _rule("system_prompt_exfiltration", "asks for its system prompt or hidden instructions", _SHOW,
          "(?:(?:me|us|back|out|your|the|its|all|of|full|entire|complete|exact|whole|verbatim|word for word|current"
          "|actual|real|precise|literal|text|contents?|words) ){0,5}(?:system (?:prompt|message|instructions?|rules"
          "|directives?)|(?:hidden|secret|internal|confidential|developer|pre|meta|underlying|private|operator)"
          " (?:instructions|prompts?|directives|configuration)|(?:developer|operator) message|(?:initial|original"
          "|first|starting|opening|very first) prompt|your (?:initial|original|first|starting|hidden|secret|internal"
          "|underlying|core|base|exact|full) (?:instructions|prompt|rules|guidelines|directives|programming"
          "|configuration)|(?:instructions|prompt|rules|guidelines) (?:verbatim|word for word))",
          triggers="system instruction prompt directive configuration message rules guidelines programming"),
    _rule("system_prompt_exfiltration", "asks to repeat what came before the conversation",
          "repeat|print|output|recite|echo|copy|paste|dump|reveal|leak|disclose|spell out|write out|type out|quote",
          "(?:(?:me|us|back|out|the|all|of|full|entire|exact|verbatim) ){0,3}(?:instructions|prompts?|words"
          "|everything|all) (?:above|before this|before my|at the start|at the beginning|at the top|from the start"
          "|from the beginning|you were given|you have been given|you ve been given|you received)",
          triggers="above before start beginning top given received"),
    _rule("system_prompt_exfiltration", "asks what it was instructed", "what",
          "(?:instructions|rules|guidelines|directives|prompt) (?:were|have) you (?:been )?(?:given|told|programmed)",
          triggers="instructions rules guidelines directives prompt"),
]
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{24,}(?: [A-Za-z0-9+/]{24,})*={0,2}")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){12,}(?![0-9A-Fa-f])")
_DECODE_CUE = re.compile(r"\b(?:decode|decoded|decoding|decipher|base ?64|b64)\b")
_ACT_CUE = re.compile(r"\b(?:follow|execute|obey|run|carry out|comply|act on|do what|perform|instructions?)\b")


# Each trigger that holds a shorter one stands for it (a rule then runs a little more often, never less),
# so that a text is searched for fewer of them, once.
_TRIGGERS = sorted({t for rule in _RULES for t in rule.triggers}, key=len)
_SHORTEST = {t: next(u for u in _TRIGGERS if u in t) for t in _TRIGGERS}
_RULES = [rule._replace(triggers=frozenset(map(_SHORTEST.get, rule.triggers))) for rule in _RULES]
_TRIGGERS = sorted(set(_SHORTEST.values()))


def _ruled(normal: str) -> tuple[str, str] | None:
    """(rule, reason) of the first rule that matches normalised text, else None."""
    words = _words(normal)
    present = {t for t in _TRIGGERS if t in words}
    for rule in _RULES:
        if present.isdisjoint(rule.triggers):
            continue
        for match in rule.pattern.finditer(words):
            if rule.unless_after and rule.unless_after.search(words, max(0, match.start() - 8), match.start()):
                continue
            if rule.confirm is None or rule.confirm.search(normal) or rule.confirm.search(words):
                return rule.name, f'{rule.meaning}: "{match.group().strip()}"'
            break  # unconfirmed: later matches of this rule are no more likely to be
    return None


def _decoded(run: str, hex_run: bool) -> str | None:
    try:
        if hex_run:
            raw = bytes.fromhex(run)
        else:
            run = run.replace(" ", "").rstrip("=")
            run = run[:len(run) - len(run) % 4] if len(run) % 4 == 1 else run + "=" * (-len(run) % 4)
            raw = base64.b64decode(run, validate=True)
        return raw.decode("utf-8")
    except (ValueError, binascii.Error):
        return None


def _encoded(normal: str) -> tuple[str, str] | None:
    """(rule, reason) when a long base64 run comes after words asking to decode and follow it, or a
    base64 or hex run decodes to text the rules block."""
    if max(map(len, normal.split()), default=0) < 24:  # both kinds of run are at least 24 characters
        return None
    runs = [(m, False) for m in _BASE64.finditer(normal)] + [(m, True) for m in _HEX.finditer(normal)]
    for match, hex_run in sorted(runs, key=lambda r: r[0].start())[:MAX_DECODED]:
        if not hex_run and len(match.group()) >= 200:
            before = normal[max(0, match.start() - 160):match.start()].lower()
            if _DECODE_CUE.search(before) and _ACT_CUE.search(before):
                return "encoded_payload", "asks to decode and follow a long base64 payload"
        text = _decoded(match.group(), hex_run)
        if text and (inner := _ruled(normalise(text))):
            return "encoded_payload", f"{'hex' if hex_run else 'base64'} text that {inner[1]}"
    return None


def screen_injection(text: str, *, embed: Embed | None = None, patterns: PatternIndex | None = None,
                     threshold: float = 0.82) -> Screen:
    """Blocks text that tries to override the model's instructions: rules first, then (with both `embed`,
    texts to unit rows, and `patterns`) a cosine of `threshold` or more to a known injection."""
    if (embed is None) != (patterns is None):
        raise TypeError("screen_injection needs both embed and patterns, or neither")
    if len(text) > MAX_SCREEN_CHARS:
        half = MAX_SCREEN_CHARS // 2
        text = text[:half] + "\n" + text[-half:]
    normal = normalise(text)
    if hit := _ruled(normal) or _encoded(normal):
        return Screen(True, hit[1], hit[0], None)
    if embed is None or patterns is None:
        return _PASSED
    score, kind = patterns.nearest(np.asarray(embed([normal]), dtype=np.float32)[0])
    if score >= threshold:
        return Screen(True, f"close to a known {kind} phrasing (cosine {score:.2f})", "similar_to_known", score)
    return Screen(False, None, None, score)


@dataclass(frozen=True)
class Example:
    """A line of injections.jsonl."""

    text: str
    kind: str  # "benign", or the kind of injection


def load_examples(path: Path | str | None = None) -> list[Example]:
    """The lines of injections.jsonl (default: the packaged one), benign ones included, for evaluations."""
    lines = Path(path or DEFAULT_EXAMPLES).read_text(encoding="utf-8").splitlines()
    return [Example(row["text"], row["kind"]) for row in map(json.loads, filter(str.strip, lines))]


@dataclass(frozen=True, eq=False)
class PatternIndex:
    """Known injections, embedded: one unit row of `matrix` per text."""

    texts: tuple[str, ...]
    kinds: tuple[str, ...]
    matrix: np.ndarray

    @classmethod
    def load(cls, path: Path | str | None = None, *, embed: Embed) -> PatternIndex:
        known = [e for e in load_examples(path) if e.kind != "benign"]
        if not known:
            raise ValueError(f"no injections in {path or DEFAULT_EXAMPLES}")
        matrix = np.asarray(embed([normalise(e.text) for e in known]), dtype=np.float32)
        # Re-normalised: an embedder that does not quite return unit rows would skew every cosine.
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        return cls(tuple(e.text for e in known), tuple(e.kind for e in known), matrix)

    def nearest(self, vector: np.ndarray) -> tuple[float, str]:
        """The best cosine of a vector to a known injection, and that injection's kind."""
        scores = self.matrix @ (vector / max(float(np.linalg.norm(vector)), 1e-12))
        best = int(np.argmax(scores))
        return float(scores[best]), self.kinds[best]


# ---------------------------------------------------------------------------------------------- JSON

def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unfenced(output: str) -> str:
    """The inside of an output that is one ```json (or bare ```) block; otherwise output as it is."""
    stripped = output.strip()
    newline = stripped.find("\n")
    if (newline > 0 and stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= newline + 4
            and stripped[3:newline].strip().lower() in ("", "json")):
        return stripped[newline + 1:-3]
    return output


def check_json(output: str, schema: dict | None) -> str | None:
    """None when output is JSON (the inside of one ```json fenced block counts) that satisfies schema, else
    why not: "not JSON: ...", or a path and what it breaks ("$.age: expected integer, got string").

    Schema keywords checked: type (one or a list), properties, required, additionalProperties (false or a
    schema), items (a schema, or a list of schemas by position), enum, const, minLength, maxLength, minimum,
    maximum, exclusiveMinimum, exclusiveMaximum (numbers), minItems, maxItems. Others ($ref, anyOf, pattern,
    format, ...) are ignored, so such a schema is checked less strictly, never more."""
    if len(output) > MAX_JSON_CHARS:
        return f"too long to check: {len(output)} characters (MAX_JSON_CHARS is {MAX_JSON_CHARS})"
    try:
        value = json.loads(_unfenced(output), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # NaN or Infinity, or an integer of more digits than Python converts
        return f"not JSON: {str(e).partition(':')[0]}"
    except RecursionError:
        return "not JSON: nested too deeply"
    if schema is None:
        return None
    try:
        return _violation(value, schema, "$")
    except RecursionError:
        return "schema nested too deeply to check"


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _is_type(value, name: str) -> bool:
    actual = _json_type(value)
    return (actual == name or (name == "number" and actual == "integer")
            or (name == "integer" and actual == "number" and value.is_integer()) or name not in _TYPE_NAMES)


_TYPE_NAMES = frozenset(["null", "boolean", "integer", "number", "string", "array", "object"])


def _same(a, b) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _limit(schema: dict, keyword: str) -> int | float | None:
    """A numeric keyword's value; None when absent or not a number (a malformed schema is not the reply's fault)."""
    limit = schema.get(keyword)
    return limit if isinstance(limit, (int, float)) and not isinstance(limit, bool) else None


def _violation(value, schema, path: str) -> str | None:
    """The first way value breaks schema, as "path: what", else None. A keyword of the wrong shape is ignored:
    a malformed schema is not the reply's fault."""
    if schema is False:
        return f"{path}: not allowed"
    if not isinstance(schema, dict):
        return None
    names = schema.get("type")
    names = [n for n in (names if isinstance(names, list) else [names]) if isinstance(n, str)]
    if names and not any(_is_type(value, n) for n in names):
        return f"{path}: expected {' or '.join(names)}, got {_json_type(value)}"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{path}: expected {_short(schema['const'])}"
    if isinstance(schema.get("enum"), list) and not any(_same(value, e) for e in schema["enum"]):
        return f"{path}: expected one of {_short(schema['enum'])}"
    if isinstance(value, str):
        if (least := _limit(schema, "minLength")) is not None and len(value) < least:
            return f"{path}: shorter than {least} characters"
        if (most := _limit(schema, "maxLength")) is not None and len(value) > most:
            return f"{path}: longer than {most} characters"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        for keyword, broken, words in (("minimum", value.__lt__, "less than the minimum"),
                                       ("maximum", value.__gt__, "more than the maximum"),
                                       ("exclusiveMinimum", value.__le__, "not more than"),
                                       ("exclusiveMaximum", value.__ge__, "not less than")):
            if (limit := _limit(schema, keyword)) is not None and broken(limit) is True:
                return f"{path}: {value} is {words} {limit}"
    elif isinstance(value, list):
        if (least := _limit(schema, "minItems")) is not None and len(value) < least:
            return f"{path}: fewer than {least} items"
        if (most := _limit(schema, "maxItems")) is not None and len(value) > most:
            return f"{path}: more than {most} items"
        items = schema.get("items")
        for i, item in enumerate(value):
            item_schema = (items[i] if i < len(items) else None) if isinstance(items, list) else items
            if item_schema is not None and (why := _violation(item, item_schema, f"{path}[{i}]")):
                return why
    elif isinstance(value, dict):
        required = schema.get("required")
        for key in required if isinstance(required, list) else ():
            if isinstance(key, str) and key not in value:
                return f"{path}: missing required property {json.dumps(key)}"
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                why = _violation(item, properties[key], _key_path(path, key))
            elif extra is False:
                why = f"{path}: unexpected property {json.dumps(key)}"
            else:
                why = _violation(item, extra, _key_path(path, key))
            if why:
                return why
    return None


def repair_prompt(output: str, reason: str, schema: dict | None) -> str:
    """The user message for one retry of a reply that check_json() refused, through the same model. Quotes
    at most MAX_REPAIR_ECHO_CHARS of the reply."""
    quoted = output if len(output) <= MAX_REPAIR_ECHO_CHARS else (
        output[:MAX_REPAIR_ECHO_CHARS] + f"\n[... {len(output) - MAX_REPAIR_ECHO_CHARS} more characters]")
    ask = "Write your reply again as JSON only: no explanation before or after it, and no code fences."
    if schema is not None:
        ask += " It must match this JSON Schema:\n" + json.dumps(schema, ensure_ascii=False)
    return f"Your previous reply could not be used: {reason}.\n\nYour previous reply:\n{quoted}\n\n{ask}"
