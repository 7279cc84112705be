"""The semantic cache's guard: what two conversations must share, whatever their embeddings say.

An embedding puts "convert 100 USD to EUR" next to "convert 100 EUR to USD", "what is 15% of 80"
next to "what is 15% of 60", and "which fruits are safe for dogs" next to "which fruits are not safe
for dogs": few words change, so the vector barely moves (a static embedder, a bag of words, cannot
see word order at all). But one cached answer cannot serve the other. So each cached entry carries
`signature(text)`, a digest of the features below, and a lookup only considers entries with the
same signature; the cosine threshold then decides among those. scripts/eval_semantic measures the
effect on services/router/data/paraphrases.jsonl.

What is compared, over the whole conversation text (every turn, role prefixes included):

- Numbers, in order: digit runs with their decimals ("3.14159"), thousands separators dropped
  ("1,000" is "1000"), a following "%" or "percent" kept as a mark ("15%"), digits inside words
  too ("x^3", "Q3", "IPv6"), and the number words two to ninety-nine ("fifteen" is "15",
  "twenty-five" is "25"). In order, because "subtract 7 from 20" is not "subtract 20 from 7".
  "one" and "first" are left out: they are more often a pronoun ("a new one") or a figure of
  speech ("first, ...") than a number, and a change from one to two still shows as the "2".
- Negations, counted: not, no, never, none, nothing, nobody, nowhere, neither, nor, without,
  cannot, except, excluding, non, against, and every "n't" (also without the apostrophe, "dont").
  "Which fruits are safe" and "which fruits are not safe" differ by one.
- Identifiers, in order, case folded: programming languages by name ("Python", "C++", "C#";
  "golang" is "go", "js" is "javascript"; names that are also ordinary words, "Go", "C", "Swift",
  only capitalized and not opening a sentence), all-capitals tokens of two capitals or more
  ("USD", "HTTPS", "2FA"; the plural "APIs" is "api"; not when most words are capitals, which is
  shouting), words with a capital inside ("MySQL", "iPhone", "macOS"), capitalized words that do
  not open a sentence, that is names ("France", "Monday", "Gmail"), and code: dotted names
  ("os.path", "Node.js"), file extensions (".txt"), calls ("sqrt(" is "sqrt()") and names with
  underscores ("max_tokens"). They say what a request is about: "in Python" and "in Rust", "JSON
  to YAML" and "YAML to JSON", "the capital of France" and "of Spain" ask different things.
- Directions: the word after "from" and the one after the "to" or "into" that follows it ("from
  my savings account to my checking account" is "savings>checking"), articles and possessives
  skipped: a bag of words cannot tell a transfer from its reverse.

Numbers and identifiers are kept in order and negations counted (not just their parity): both are
the stricter choice, and on the eval pairs neither costs a paraphrase that the looser one keeps.
There, the signatures of 78% of the paraphrases agree, and they tell apart every changed number
and programming language, 80 to 85% of the changed names, negations and word orders, 4 of the 7
other passages and 1 of the 16 other questions on the same topic.

Precision over recall: a wrong hit serves a wrong answer, a miss costs one model call. A feature
that a paraphrase changes costs a miss ("database" and "DB", "Docker" and "docker", "two-factor"
and "2FA"), the cheaper error; "15%" and "fifteen percent" agree. Left to the embedding and its
threshold is what no surface feature shows: antonyms ("public", "private"), another common noun
("gold", "silver"), a swap without "from" ("is every square a rectangle"), another passage under
the same instruction.

Untrusted input: every pattern runs in linear time (no nested or overlapping quantifiers; a pattern
that needs something after a run of word characters may only start where the run starts), Python
only handles what a pattern matched, and a text with more than MOST matches of one pattern (no
person writes that many numbers or names; a data dump or an attack does) is compared whole: its
signature is a digest of the text itself, so only the same text matches it. A megabyte of
adversarial text takes about half a second, ordinary text less.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from itertools import islice

# More numbers, or identifiers of one kind, than a person writes (a data dump, or an attack): such a
# text is compared whole, and Python never handles more than this many matches of a pattern.
MOST = 20_000

_UNIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS_WORDS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNIT_WORDS)} | {w: 10 * (i + 2) for i, w in enumerate(_TENS_WORDS)}

_NEGATIONS = """not no never none nothing nobody nowhere neither nor without cannot except excluding non against
    dont doesnt didnt isnt arent wasnt werent cant couldnt wouldnt shouldnt wont havent hasnt hadnt aint mustnt
    neednt""".split()
# Programming languages named by a word of their own (any case), and other names for them.
_LANGUAGES = """python javascript typescript java kotlin scala haskell ruby php perl lua rust bash powershell zsh
    elixir erlang clojure ocaml fortran cobol matlab sql solidity groovy""".split()
_ALIASES = {"golang": "go", "js": "javascript", "ts": "typescript", "cpp": "c++", "csharp": "c#"}
# Language names that are also ordinary words (or letters): only capitalized and inside a sentence.
_CASED_LANGUAGES = frozenset(["Go", "C", "R", "Swift", "Dart", "Julia", "Zig", "Nim", "Crystal", "Elm"])
_CHAT = frozenset("ok fyi asap btw imo imho tl dr tldr pls plz thx lol aka".split())  # capitals naming nothing
_NEGATION_WORDS = frozenset(_NEGATIONS)
_SKIPPED_NAMES = frozenset(_NUMBER_WORDS) | _NEGATION_WORDS | frozenset(_LANGUAGES) | frozenset(_ALIASES)
_SENTENCE_END = frozenset(".!?:;\n")


def _words(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_W = r"[^\W_]"  # a letter or a digit
# Digits joined by single dots or commas ("3.14", "1,000", "1.2.3"), or a number word; then a percent mark.
_NUMBER = re.compile(
    rf"(?:(\d+(?:[.,]\d+)*)|\b(?=[efnstz])((?:{_words(_TENS_WORDS)})(?:[- ](?:{_words(_UNIT_WORDS[1:10])}))?"
    rf"|{_words(_UNIT_WORDS[:1] + _UNIT_WORDS[2:])})\b)(\s?(?:%|per\s?cent\b))?")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LETTERS = re.compile(r"[^\W\d_]+")
_LANGUAGE = re.compile(rf"\b(?=[{''.join(sorted({w[0] for w in [*_LANGUAGES, *_ALIASES]}))}])(?<!\.)"
                       rf"({_words(_LANGUAGES + list(_ALIASES))})(?![^\W\d_])(?!\.\w)")
_SYMBOL_LANGUAGE = re.compile(r"\b(?<![+#])(?:c\+\+|c#|f#|objective-c)(?![\w+#])")
# A word starting with a capital, with a possessive or contraction after it ("Australia's", "I'm").
_CAPITALIZED = re.compile(r"\b(?<!\.)([A-ZÀ-ÖØ-ÞĀ-ſΑ-ΩЀ-Я][^\W\d_]*)(?:['’][^\W\d_]+)?(?![\w'’])(?!\.\w)")
_CAPITALS = re.compile(r"\b(?<!\.)[A-Z0-9]{2,}s?\b(?!\.\w)(?!['’][Tt]\b)")
_INNER_CAPITAL = re.compile(rf"\b(?<!\.){_W}(?=[^\W_]*[A-Z]){_W}*\b(?!\.\w)")
_ALNUM = re.compile(rf"{_W}+")
# Code: dotted names, extensions, calls, names with underscores.
_DOTTED = re.compile(r"\b(?<!\.)[^\W\d]\w*(?:\.\w+)+")
_EXTENSION = re.compile(r"\.(?<![\w.]\.)[^\W\d_]\w{0,9}\b")
_CALL = re.compile(r"\b(?<!\.)[^\W\d]\w*\(")
_UNDERSCORED = re.compile(rf"\b_*{_W}+(?:_+{_W}+)+_*")
# What a text must hold for the patterns above to match, found by a quick scan for a fixed
# character: most texts hold none, and each saves a slow scan (a word boundary at every position).
_SYMBOL_MARK = re.compile(r"[+#]|-c")  # _SYMBOL_LANGUAGE's "c++", "c#", "f#", "objective-c"
_DOT_WORD = re.compile(r"\.\w")  # _DOTTED's "os.path", _EXTENSION's ".txt"
_WORD_PAREN = re.compile(r"\((?<=\w\()")  # _CALL's "sqrt("
# The word after "from", "to" or "into", past an article or a possessive.
_DIRECTION = re.compile(r"\b(from|to|into)\s{1,8}(?:(?:the|a|an|my|your|our|their|his|her|its|this|that|these|those)"
                        r"\s{1,8})?([^\W\d_][\w'’-]*)")


def _number(digits: str, word: str, percent: str) -> list[str]:
    if word:
        parts = [str(sum(_NUMBER_WORDS[w] for w in re.split(r"[- ]", word)))]
    else:
        if not digits.isascii():  # other scripts' digits, as ASCII
            digits = "".join(str(unicodedata.decimal(c, c)) for c in digits)
        if "," not in digits:
            parts = [digits]
        elif _THOUSANDS.fullmatch(digits):
            parts = [digits.replace(",", "")]
        else:
            parts = digits.split(",")  # "4,8,15": a list
    if percent:
        parts[-1] += "%"
    return parts


def _opens_sentence(text: str, start: int) -> bool:
    """Whether the word at `start` is the first of a sentence, a turn or the text."""
    i = start - 1
    while i >= 0 and text[i] in " \t\"'“‘(":
        if start - i > 8:  # looks back a bounded way: a long gap counts as a start
            return True
        i -= 1
    return i < 0 or text[i] in _SENTENCE_END


class _TooMany(Exception):
    pass


def _matches(pattern: re.Pattern, text: str, needs: str | re.Pattern = "") -> list[re.Match]:
    """The pattern's matches in text (none, without a scan, when text lacks `needs`: a string it
    must hold, or a pattern it must match somewhere, that finds it much faster than `pattern`)."""
    if (needs not in text) if isinstance(needs, str) else (needs.search(text) is None):
        return []
    found = list(islice(pattern.finditer(text), MOST + 1))
    if len(found) > MOST:
        raise _TooMany
    return found


def features(text: str) -> dict | None:
    """What signature() digests, readable: numbers, identifiers and directions in order, negations
    counted; None for a text with more than MOST matches of one kind, which is its own signature."""
    # The case-blind patterns run on the text in small letters (a few times faster than ignoring case).
    small = text.lower()
    if len(small) != len(text):  # "İ" lowers to two characters: keep positions
        small = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    try:
        return _features(text, small)
    except _TooMany:
        return None


def _features(text: str, small: str) -> dict:
    numbers = [n for m in _matches(_NUMBER, small) for n in _number(*m.groups())]
    if len(numbers) > MOST:  # "1,2,3,...": one match, many numbers
        raise _TooMany
    negations = sum(map(_NEGATION_WORDS.__contains__, _LETTERS.findall(small)))
    negations += small.count("n't") + small.count("n’t")

    identifiers = [(m.start(), _ALIASES.get(m.group(1), m.group(1))) for m in _matches(_LANGUAGE, small)]
    identifiers += [(m.start(), m.group(0)) for m in _matches(_SYMBOL_LANGUAGE, small, _SYMBOL_MARK)]
    cased = text != small  # any capital letter at all
    for match in _matches(_CAPITALIZED, text) if cased else ():
        word, start = match.group(1), match.start()
        if (len(word) < 2 and word not in _CASED_LANGUAGES) or (word[1:] and not word[1:].islower()):
            continue  # "I"; "USD" and "McDonald" are counted below
        after = text[match.end():match.end() + 1]
        if word in _CASED_LANGUAGES and (text[start - 1:start] == "°" or after == "#" or after == "+"):
            continue  # 30 °C; C# and C++ are counted above
        name = word.lower()
        if name not in _SKIPPED_NAMES and not _opens_sentence(text, start):
            identifiers.append((start, name))

    capitals = [(m.start(), m.group(0)) for m in _matches(_CAPITALS, text)] if cased else []
    capitals = [(start, token) for start, token in capitals if sum(c.isalpha() for c in token) >= 2]
    if capitals and len(capitals) * 2 <= len(_ALNUM.findall(text)):  # not shouting
        for start, token in capitals:
            name = token.lower()
            if name not in _CHAT and name not in _SKIPPED_NAMES:
                identifiers.append((start, name[:-1] if token.endswith("s") else name))  # "APIs" is "api"
    for match in _matches(_INNER_CAPITAL, text) if cased else ():
        token = match.group(0)
        name = token.lower()
        if not (token.isupper() or (token.endswith("s") and token[:-1].isupper()) or name in _SKIPPED_NAMES):
            identifiers.append((match.start(), name))  # "MySQL", "iPhone"; not "USD", "APIs", "JavaScript"

    for match in _matches(_DOTTED, small, _DOT_WORD):
        if max(map(len, match.group(0).split("."))) > 1:  # not "e.g"
            identifiers.append((match.start(), match.group(0)))
    identifiers += [(m.start(), m.group(0)) for m in _matches(_EXTENSION, small, _DOT_WORD)]
    identifiers += [(m.start(), m.group(0) + ")") for m in _matches(_CALL, small, _WORD_PAREN)]
    identifiers += [(m.start(), m.group(0)) for m in _matches(_UNDERSCORED, small, "_")]
    identifiers.sort()

    ends = [m.groups() for m in _matches(_DIRECTION, small, "from")]
    directions = [f"{origin}>{target}" for (o, origin), (t, target) in zip(ends, ends[1:]) if o == "from" != t]

    return {"numbers": numbers, "negations": negations, "identifiers": [name for _, name in identifiers],
            "directions": directions}


def signature(text: str) -> str:
    """16 hex characters, equal for two texts whose numbers, negations, identifiers and directions agree."""
    f = features(text)
    if f is None:  # too much to compare: only the same text matches
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                               person=b"switchyard-text").hexdigest()
    canonical = "\x1e".join(["\x1f".join(f["numbers"]), str(f["negations"]), "\x1f".join(f["identifiers"]),
                             "\x1f".join(f["directions"])])
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8,
                           person=b"switchyard-guard").hexdigest()
