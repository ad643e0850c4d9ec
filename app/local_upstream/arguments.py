"""Arguments for the local upstream's tool calls: a JSON Schema filled from the user's words.

`build_arguments(parameters, text, tool_name=...)` is pure: the same schema and text always give the
same dict, and the dict fits the schema's types, enums, bounds and `required` list. The heuristic
is deliberately small; it plays a model well enough for tests and the demo, nothing more:

- **Which properties.** Those in `properties`, in schema order, then any other name in
  `required`. A required property always gets a value; an optional one only when the text
  supplies one (an unused phrase, a number, a yes/no word, a mentioned enum value), as a model
  leaves out what it does not know.
- **`const` and `enum`.** The const; else the enum value mentioned in the text (as a word, `_`
  read as a space), else the schema's `default` if it is one of them, else the first value.
- **Strings.** If the property's name is in the text, the phrase after it ("city Paris",
  "from London to Rome"). Otherwise the next unused *candidate phrase*, candidates being, in this
  order: text in double quotes; the phrase after the tool's name; the phrase after each of the
  cue words "in", "for", "about", "of", "at", "near", "called", "named"; a run of capitalized
  words not starting a sentence (a city, a person). A phrase skips leading articles, cue words,
  "is", "to" and ":"; it is a run of capitalized words if it starts with one ("New York"), else
  up to five words, stopping at punctuation, "please" or another cue word but "of" ("history of
  jazz"). Candidates equal to an enum value of the schema are left out. A required string with
  nothing left reuses the first candidate, else takes the whole text. `maxLength` truncates,
  `minLength` pads with "x"; `pattern` and `format` are not honoured.
- **Integers and numbers.** Among the numbers written in digits and not used yet, the one
  nearest the property's name ("3 days", "limit 5"; after it on a tie), else the first; an
  integer property truncates a decimal. Then clamped into `minimum`/`maximum` (exclusive
  forms too). No number: the schema's `default`, else 1, clamped.
- **Booleans.** The first of "yes"/"true" (True) or "no"/"false" (False) after the property's
  name, else in the whole text; else the `default`, else False.
- **Arrays and objects.** Objects are built by the same rules, nested; arrays hold `minItems`
  items (none by default) built from `items`. Optional arrays and objects are left out.
- **Types.** A list of types takes its first that is not "null"; `anyOf`/`oneOf` take their first
  branch; with no type, `properties` means an object, `items` an array, anything else a string.

    >>> schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    >>> build_arguments(schema, "what time is it in Paris")
    {'city': 'Paris'}
"""

from __future__ import annotations

import bisect
import copy
import math
import re
from typing import Any

_MISSING: Any = object()  # "the text supplies nothing for this optional property"

_TOKEN = re.compile(r"[\w'’-]+|[^\w\s]")
# Digits standing alone ("3", "-2.5", "5." at a sentence's end), not in "mp3", "3rd" or "1.2.3";
# longer runs are ignored, so a number always fits a float.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,15}(?:\.\d{1,15})?(?!\.?\w)")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
CUES = frozenset(("in", "for", "about", "of", "at", "near", "called", "named"))
_SKIPPED = CUES | {"a", "an", "the", "is", "are", "to", "be", "=", ":"}
_ENDS = (CUES - {"of"}) | {"please"}
_SENTENCE_ENDS = frozenset(".!?")
_I = re.compile(r"I(['’]\w+)?")  # "I", "I'm": capitalized, but never a value
_TRUE, _FALSE = frozenset(("yes", "true")), frozenset(("no", "false"))
MAX_PHRASE_WORDS = 5


def build_arguments(parameters: Any, text: str, *, tool_name: str = "") -> dict[str, Any]:
    """Arguments for a call of a function whose `parameters` schema is given, from `text`.

    Args:
        parameters: The tool's `parameters` JSON Schema (an object schema); anything else, or a
            schema without properties, gives `{}`.
        text: The user's last words.
        tool_name: The function's name; the phrase after it in the text is a candidate value.

    Returns:
        A dict that fits the schema (see the module docstring for the rules).
    """
    if not isinstance(parameters, dict):
        return {}
    value = _Reader(text, tool_name, _enum_words(parameters)).object(parameters)
    return value if isinstance(value, dict) else {}


class _Reader:
    """The text, split once, and what the properties filled so far have used of it."""

    def __init__(self, text: str, tool_name: str, enum_words: set[str]) -> None:
        matches = list(_TOKEN.finditer(text))
        self.tokens = [m.group() for m in matches]
        self.lower = [token.lower() for token in self.tokens]
        self.text = text.strip().rstrip(".!?").strip()
        starts = [m.start() for m in matches]
        # Each number written in digits, with the index of the token it starts at.
        self.numbers = [
            (bisect.bisect_right(starts, m.start()) - 1, m.group()) for m in _NUMBER.finditer(text)
        ]
        self.candidates = [
            c for c in self._candidates(text, tool_name) if c.lower() not in enum_words
        ]
        self.used_phrases: set[str] = set()
        self.used_numbers: set[int] = set()

    def object(self, schema: dict[str, Any]) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [r for r in schema.get("required", ()) if isinstance(r, str)]
        names = list(properties) + [name for name in required if name not in properties]
        result: dict[str, Any] = {}
        for name in names:
            sub = properties.get(name)
            value = self.value(sub if isinstance(sub, dict) else {}, name, name in required)
            if value is not _MISSING:
                result[name] = value
        return result

    def value(self, schema: dict[str, Any], name: str, required: bool) -> Any:
        """The value of property `name`; `_MISSING` when optional and the text has none."""
        schema = _first_branch(schema)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            found = next((v for v in enum if self._find(str(v)) is not None), _MISSING)
            if found is not _MISSING or not required:
                return found
            return schema["default"] if schema.get("default", _MISSING) in enum else enum[0]
        kind = _type_of(schema)
        if kind == "string":
            found = self._string(name)
        elif kind in ("integer", "number"):
            found = self._number(schema, name, integer=kind == "integer")
        elif kind == "boolean":
            found = self._boolean(name)
        else:  # null, arrays and objects: only when required
            found = _MISSING
        if found is not _MISSING or not required:
            return _fit_string(found, schema) if isinstance(found, str) else found
        if "default" in schema:
            return copy.deepcopy(schema["default"])
        return self._fallback(kind, schema)

    def _fallback(self, kind: str, schema: dict[str, Any]) -> Any:
        if kind == "string":
            return _fit_string(self.candidates[0] if self.candidates else self.text, schema)
        if kind in ("integer", "number"):
            return _clamp(1, schema, integer=kind == "integer")
        if kind == "array":
            items = schema.get("items")
            items = items if isinstance(items, dict) else {}
            count = schema.get("minItems", 0)
            count = count if isinstance(count, int) else 0
            return [self.value(items, "", True) for _ in range(count)]
        if kind == "object":
            return self.object(schema)
        return None if kind == "null" else False

    def _string(self, name: str) -> Any:
        after = self._find(name)
        phrase = self._phrase(after) if after is not None else None
        if phrase is None:
            phrase = next((c for c in self.candidates if c.lower() not in self.used_phrases), None)
        if phrase is None:
            return _MISSING
        self.used_phrases.add(phrase.lower())
        return phrase

    def _number(self, schema: dict[str, Any], name: str, *, integer: bool) -> Any:
        unused = [i for i in range(len(self.numbers)) if i not in self.used_numbers]
        if not unused:
            return _MISSING
        span = self._span(name)
        index = unused[0]
        if span is not None:  # the number nearest the name: "3 days", "limit 5"
            index = min(unused, key=lambda i: _distance(self.numbers[i][0], *span))
        self.used_numbers.add(index)
        written = self.numbers[index][1]
        number: float = int(written) if "." not in written else float(written)
        if integer:
            number = int(number)
        return _clamp(number, schema, integer)

    def _boolean(self, name: str) -> Any:
        after = self._find(name)
        for start in ((after,) if after is not None else ()) + (0,):
            for word in self.lower[start:]:
                if word in _TRUE or word in _FALSE:
                    return word in _TRUE
        return _MISSING

    def _find(self, words: str) -> int | None:
        """The token index just after `words` (a name or value) in the text, if there."""
        span = self._span(words)
        return None if span is None else span[1]

    def _span(self, words: str) -> tuple[int, int] | None:
        """The first tokens spelling `words` as one token or, `_` read as space, as several."""
        wanted = words.lower().replace("_", " ").split()
        if not wanted:
            return None
        for forms in ([words.lower()], wanted):
            width = len(forms)
            for i in range(len(self.lower) - width + 1):
                if self.lower[i : i + width] == forms:
                    return i, i + width
        return None

    def _phrase(self, start: int) -> str | None:
        """The phrase starting at token `start`, after skipped words (see the module docstring)."""
        tokens, lower = self.tokens, self.lower
        while start < len(tokens) and lower[start] in _SKIPPED:
            start += 1
        if start >= len(tokens) or not _is_word(tokens[start]):
            return None
        end = start + 1
        if tokens[start][0].isupper():
            while end < len(tokens) and _is_word(tokens[end]) and tokens[end][0].isupper():
                end += 1
        else:
            while (
                end < len(tokens)
                and end - start < MAX_PHRASE_WORDS
                and _is_word(tokens[end])
                and lower[end] not in _ENDS
            ):
                end += 1
        return " ".join(tokens[start:end])

    def _candidates(self, text: str, tool_name: str) -> list[str]:
        found = [next(g for g in m.groups() if g).strip() for m in _QUOTED.finditer(text)]
        after_name = self._find(tool_name) if tool_name else None
        starts = [after_name] if after_name is not None else []
        starts += [i + 1 for i, word in enumerate(self.lower) if word in CUES]
        found += [p for p in map(self._phrase, starts) if p is not None]
        # Capitalized runs; a sentence's first word is capitalized anyway, so it is left out.
        in_run = False
        for i, token in enumerate(self.tokens):
            capital = _is_word(token) and token[0].isupper() and not _I.fullmatch(token)
            sentence_start = i == 0 or self.tokens[i - 1] in _SENTENCE_ENDS
            if capital and not sentence_start and not in_run:
                found.append(self._phrase(i) or token)
            in_run = capital
        unique: dict[str, str] = {}
        for phrase in found:
            if phrase:
                unique.setdefault(phrase.lower(), phrase)
        return list(unique.values())


def _distance(index: int, name_start: int, name_end: int) -> tuple[int, int]:
    """How far token `index` is from a name (tokens `name_start` to `name_end`); after wins ties."""
    if index >= name_end:
        return index - name_end, 0
    return name_start - index - 1, 1


def _is_word(token: str) -> bool:
    return token[0].isalnum() or token[0] == "_"


def _enum_words(schema: dict[str, Any]) -> set[str]:
    """Every string enum value of the schema's properties: these are not free-text candidates."""
    properties = schema.get("properties")
    words: set[str] = set()
    for sub in (properties if isinstance(properties, dict) else {}).values():
        enum = sub.get("enum") if isinstance(sub, dict) else None
        if isinstance(enum, list):
            words.update(v.lower() for v in enum if isinstance(v, str))
    return words


def _first_branch(schema: dict[str, Any]) -> dict[str, Any]:
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if "type" not in schema and isinstance(branches, list) and branches:
            first = branches[0]
            return _first_branch(first) if isinstance(first, dict) else {}
    return schema


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind in ("string", "integer", "number", "boolean", "array", "object", "null"):
        return str(kind)
    if "properties" in schema:
        return "object"
    return "array" if "items" in schema else "string"


def _fit_string(value: str, schema: dict[str, Any]) -> str:
    longest, shortest = schema.get("maxLength"), schema.get("minLength")
    if isinstance(longest, int) and len(value) > longest:
        value = value[:longest].rstrip() or value[:longest]
    if isinstance(shortest, int) and len(value) < shortest:
        value = value.ljust(shortest, "x")
    return value


def _clamp(value: float, schema: dict[str, Any], integer: bool) -> Any:
    """`value` moved into the schema's bounds; exclusive bounds move it just inside."""
    low, high = -math.inf, math.inf
    low_open = high_open = False
    for key, is_low, is_open in (
        ("minimum", True, False),
        ("exclusiveMinimum", True, True),
        ("maximum", False, False),
        ("exclusiveMaximum", False, True),
    ):
        bound = schema.get(key)
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            continue  # draft 4's boolean exclusive flags are not honoured
        if integer:  # an integer bound is inclusive: 3.5 < x means 4 <= x
            if is_low:
                low = max(low, math.floor(bound) + 1 if is_open else math.ceil(bound))
            else:
                high = min(high, math.ceil(bound) - 1 if is_open else math.floor(bound))
        elif is_low and bound >= low:
            low, low_open = bound, is_open
        elif not is_low and bound <= high:
            high, high_open = bound, is_open
    value = min(max(value, low), high)
    if (low_open and value <= low) or (high_open and value >= high):
        finite = math.isfinite(low) and math.isfinite(high)
        value = (low + high) / 2 if finite else (low + 1 if math.isfinite(low) else high - 1)
    return int(value) if integer else value
