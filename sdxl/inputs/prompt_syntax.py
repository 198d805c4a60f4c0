"""compel 2.5.1's prompt syntax, read in time linear in the text's length.

compel reads prompts with a pyparsing grammar that tries each parenthesised group as several alternatives and
re-reads it for each (exponential in nesting; linear but ~1 ms a character with pyparsing's memo). This reader
follows the same grammar (compel.prompt_parser.build_parser_syntax) rule for rule, character for character, but
reads each operand once and then looks at what follows it, and remembers each group and quoted string by position,
so each character is read a bounded number of times. It returns compel's own objects (Conjunction, Blend,
FlattenedPrompt, Fragment), flattened as compel's PromptParser.flatten does, so the encoding is unchanged.

Read as compel reads them: words, `word+` / `word-` (runs of signs), `(group)1.3` / `(group)+` / `"quoted"1.3`
nested to any weight product, `\\(`-style escapes, words compel keeps as plain text (`a(b)`, `x - y`, a group it
cannot read is plain text from its `(`), quoted strings with pyparsing's unescaping, and a whole prompt
`(target, ...).blend(weights)` / `.and(weights)` / `.add(weights)`.
Refused (compel would read them differently or not at all): `.swap()`, `.attend()`, `withLora()` / `useLora()`,
operator options (`name=value`), a `.blend()` / `.and()` that is not the whole prompt or is followed by text (compel
silently drops that text), and groups nested past `max_nesting` (reachable only through escapes in quoted strings).
"""

from __future__ import annotations

import re
import string

from compel.prompt_parser import Blend, Conjunction, FlattenedPrompt, Fragment

PLUS_BASE, MINUS_BASE = 1.1, 0.9  # compel's PromptParser defaults: word+ = x1.1, word- = x0.9 per sign
SKIPPED = " \t\n\r"  # pyparsing's default whitespace: skipped before each element, and what White() matches
WORD_END = string.whitespace  # compel's words (CharsNotIn) stop at these, \v and \f included
SYNTAX = '()",.+-='  # compel's syntactic characters; each may be escaped with a backslash inside a word
KEYWORD = frozenset(string.ascii_letters + string.digits + "_-")
# Where compel would read an operator call (pyparsing skips whitespace before the parenthesis).
OPERATOR = re.compile(r"\.(swap|attend|blend|and|add)\s*\(|(useLora|withLora)\s*\(")
UNESCAPED = {"t": "\t", "n": "\n", "f": "\f", "r": "\r"}  # pyparsing QuotedString's whitespace escapes
HEX = frozenset(string.hexdigits)
HEX_TAIL = {"x": "2", "u": "4"}  # see _unquoted


class Refused(ValueError):
    """The text is outside what is read here (or compel could not read it either)."""


def parse_conjunction(text: str, max_nesting: int) -> Conjunction:
    """compel's PromptParser().parse_conjunction(text), or Refused."""
    text = re.sub(r",(\S)", r", \1", text)  # compel enforces whitespace after commas first
    if len(text.strip()) == 0:
        return Conjunction(prompts=[FlattenedPrompt([("", 1.0)])], weights=[1.0])
    calls = list(OPERATOR.finditer(text))
    for call in calls:
        if call.group(1) in (None, "swap", "attend"):
            name = f".{call.group(1)}" if call.group(1) else call.group(2)
            if name == ".swap":
                raise Refused(".swap() (cross-attention control) is not supported here")
            raise Refused(f"{name}() is not supported here; weigh words with (words)1.2 or words++")
    reader = _Reader(text, max_nesting)
    if calls:
        if len(calls) > 1:
            raise Refused("only one .blend() or .and() is read, around the whole prompt")
        return reader.operator_prompt(calls[0].group(1))
    return _conjunction([reader.whole()], [1.0])


# ---------------------------------------------------------------------------------------------------------------------
# Flattening (compel's PromptParser.flatten): weights multiply down the nesting, equal neighbours fuse


def _flatten(items: list, scale: float, out: list) -> list:
    for item in items:
        if isinstance(item, Fragment):
            out.append(Fragment(item.text, item.weight * scale))
        else:
            weight, children = item
            _flatten(children, scale * weight, out)
    return out


def _fused(items: list) -> list:
    """compel's fuse_fragments: neighbours of equal weight joined with a space. compel rebuilds the joined Fragment
    at each step (quadratic in the run), re-reading its escapes each time; so here each run is joined once, each
    part's escapes read as many times as compel's steps read them."""
    runs: list[list] = []
    for fragment in _flatten(items, 1.0, []):
        if runs and runs[-1][0].weight == fragment.weight:
            runs[-1].append(fragment)
        else:
            runs.append([fragment])
    return [run[0] if len(run) == 1 else _joined(run) for run in runs]


def _joined(run: list) -> Fragment:
    """compel's step i (1..k-1) rebuilds parts 0..i: part 0 is read k-1 more times, part j k-j. The last read is
    the Fragment built here (escapes never span the joining space)."""
    texts = [_unescaped(part.text, len(run) - max(j, 1) - 1) for j, part in enumerate(run)]
    return Fragment(" ".join(texts), run[0].weight)


def _unescaped(text: str, times: int) -> str:
    """Fragment's escape reading, `times` times (each time that changes the text shortens it)."""
    for _ in range(times):
        if "\\(" not in text and "\\)" not in text and '\\"' not in text:
            break
        text = text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
    return text


def _conjunction(prompts: list, weights: list) -> Conjunction:
    """Each prompt's fused fragments; a prompt that flattens to nothing is left out with its weight, as compel does."""
    parts, kept = [], []
    for items, weight in zip(prompts, weights):
        fused = _fused(items)
        if fused:
            parts.append(FlattenedPrompt(parts=fused))
            kept.append(weight)
    return Conjunction(parts, kept)


# ---------------------------------------------------------------------------------------------------------------------
# Numbers and options


def _unquoted(raw: str) -> str:
    """pyparsing QuotedString's unquoting, then \\" -> ". Its numeric escapes are built in an f-string, where `{3}`
    reads as 3: what it converts is `\\` + octal digit + `3` (to those two characters), `\\0` (NUL), `\\x` + hex
    digit + `2` and `\\u` + hex digit + `4` (to chr of those two hex digits); besides \\t \\n \\f \\r."""
    out, i = [], 0
    while i < len(raw):
        char, escape = raw[i], raw[i + 1 : i + 3]
        if char != "\\" or not escape:
            out.append(char)
            i += 1
        elif escape[0] in UNESCAPED:
            out.append(UNESCAPED[escape[0]])
            i += 2
        elif len(escape) == 2 and escape[0] in "01234567" and escape[1] == "3":
            out.append(escape)
            i += 3
        elif escape[0] == "0":
            out.append("\0")
            i += 2
        elif escape[0] in "xu" and raw[i + 2 : i + 3] in HEX and raw[i + 3 : i + 4] == HEX_TAIL[escape[0]]:
            out.append(chr(int(raw[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(char)
            i += 1
    return "".join(out).replace('\\"', '"')


def _digits(text: str, pos: int, ascii_only: bool) -> int:
    while pos < len(text) and (text[pos] in "0123456789" if ascii_only else text[pos].isdecimal()):
        pos += 1
    return pos


def _real(text: str, pos: int) -> int:
    """End of pyparsing_common.real (`[+-]?(\\d+\\.\\d*|\\.\\d+)`, Unicode digits) at pos, or pos."""
    start = pos + 1 if text[pos : pos + 1] in ("+", "-") else pos
    digits = _digits(text, start, ascii_only=False)
    if digits > start and text[digits : digits + 1] == ".":
        return _digits(text, digits + 1, ascii_only=False)
    if digits == start and text[start : start + 1] == ".":
        end = _digits(text, start + 1, ascii_only=False)
        return end if end > start + 1 else pos
    return pos


def _number(text: str, pos: int, signed: bool) -> int:
    """End of compel's `number` (a real, else an integer with an optional '-'), or pos. Unsigned after an operand,
    where a sign is read as `+`/`-` weighting first."""
    end = _real(text, pos) if signed or text[pos : pos + 1] not in ("+", "-") else pos
    if end > pos:
        return end
    start = pos + 1 if signed and text[pos : pos + 1] == "-" else pos
    end = _digits(text, start, ascii_only=True)
    return end if end > start else pos


def _flag_weight(flag: str, operator: str) -> float:
    try:
        return float(flag)  # compel converts every option with float(): "inf" and "nan" pass (and are refused later)
    except ValueError:
        raise Refused(f".{operator}() weights are numbers; {flag!r} is not one") from None


# ---------------------------------------------------------------------------------------------------------------------
# The reader. Items: Fragment (compel's, unflattened) or (weight, [items]) for a weighted operand.


class _Reader:
    def __init__(self, text: str, max_nesting: int, depth: int = 0):
        self.text, self.max_nesting, self.depth = text, max_nesting, depth
        self.groups: dict[int, tuple | None] = {}
        self.quotes: dict[tuple[int, bool], tuple | None] = {}

    def skip(self, pos: int) -> int:
        text = self.text
        while pos < len(text) and text[pos] in SKIPPED:
            pos += 1
        return pos

    def word(self, pos: int) -> int:
        """End of compel's non_syntax_word at pos (pos if none): escaped syntax, '+'/'-' followed by a word
        character, anything else but whitespace and syntax."""
        text, end = self.text, len(self.text)
        while pos < end:
            char, follow = text[pos], text[pos + 1 : pos + 2]
            if char == "\\" and follow and follow in SYNTAX:
                pos += 2
            elif char in "+-" and follow and follow not in SYNTAX and follow not in SKIPPED:
                pos += 1
            elif char in WORD_END or char in SYNTAX:
                break
            else:
                pos += 1
        return pos

    def free_word(self, pos: int) -> int:
        """End of compel's free_word (any run of non-whitespace) at pos."""
        text = self.text
        while pos < len(text) and text[pos] not in WORD_END:
            pos += 1
        return pos

    def signs(self, pos: int) -> tuple[float, int] | None:
        """A run of '+' or '-' at pos: its weight and end."""
        text, end = self.text, pos
        sign = text[pos : pos + 1]
        if sign not in ("+", "-"):
            return None
        while end < len(text) and text[end] == sign:
            end += 1
        return pow(PLUS_BASE if sign == "+" else MINUS_BASE, end - pos), end

    def weight(self, pos: int) -> tuple[float, int] | None:
        """compel's weight right after a group or quoted string: signs, else a number."""
        signs = self.signs(pos)
        if signs:
            return signs
        end = _number(self.text, pos, signed=False)
        return (float(self.text[pos:end]), end) if end > pos else None

    def group(self, pos: int, depth: int) -> tuple | None:
        """`(` items `)` at pos: (items, end), or None where compel's group fails (remembered by position)."""
        if pos not in self.groups:
            if depth > self.max_nesting:
                raise Refused(f"parentheses nest more than {self.max_nesting} deep")
            items, end = self.sequence(pos + 1, depth, inner=True)
            end = self.skip(end)
            self.groups[pos] = (items, end + 1) if self.text[end : end + 1] == ")" else None
        return self.groups[pos]

    def quoted(self, pos: int, depth: int, inner: bool = True) -> tuple | None:
        """`"..."` at pos: (items, end), its content read as a group's inside (inner) or as a whole prompt."""
        key = (pos, inner)
        if key not in self.quotes:
            found = self.quote_end(pos)
            self.quotes[key] = None
            if found is not None:
                content = _unquoted(self.text[pos + 1 : found - 1])
                items = self.content(content, depth, inner)
                self.quotes[key] = None if items is None else (items, found)
        return self.quotes[key]

    def quote_end(self, pos: int) -> int | None:
        """End of pyparsing's QuotedString('"', esc_quote='\\\\"') at pos: the first '"' not escaped on the line;
        failing that, the last escaped one (how its regex backtracks)."""
        text, index, last_escaped = self.text, pos + 1, None
        while index < len(text):
            if text[index] == "\\" and text[index + 1 : index + 2] == '"':
                last_escaped, index = index, index + 2
            elif text[index] in '"\n\r':
                break
            else:
                index += 1
        if text[index : index + 1] == '"':
            return index + 1
        return None if last_escaped is None else last_escaped + 2

    def content(self, content: str, depth: int, inner: bool) -> list | None:
        """compel's parse_fragment_str: blank is one empty fragment, else every character must be read."""
        if len(content.strip()) == 0:
            return [Fragment("")]
        reader = _Reader(content.replace('"', '\\"'), self.max_nesting)
        items, end = reader.sequence(0, depth, inner)
        return items if reader.skip(end) == len(reader.text) else None

    def sequence(self, pos: int, depth: int, inner: bool) -> tuple[list, int]:
        """compel's ZeroOrMore of elements from pos: inside a group or quotes (inner) or a whole prompt."""
        items: list = []
        while True:
            pos = self.skip(pos)
            found = self.element(pos, depth, inner) if pos < len(self.text) else None
            if found is None:
                return items, pos
            found_items, pos = found
            items.extend(found_items)

    def element(self, pos: int, depth: int, inner: bool) -> tuple[list, int] | None:
        """One element at pos, the alternatives in compel's order (attention, group, quoted, word; a whole prompt's
        last resort is any run of non-whitespace, a group's is a lone ',' or '.')."""
        text = self.text
        if text[pos] in '("':
            operand = self.group(pos, depth + 1) if text[pos] == "(" else self.quoted(pos, depth)
            if operand is not None:
                items, end = operand
                weight = self.weight(end) if text[end : end + 1] not in SKIPPED else None
                return ([(weight[0], items)], weight[1]) if weight else (items, end)
        else:
            end = self.word(pos)
            signs = self.signs(end) if end > pos else None
            if signs:
                return [(signs[0], [Fragment(text[pos:end])])], signs[1]
            if end > pos and inner:
                return [Fragment(text[pos:end])], end
        if inner:
            return ([Fragment(text[pos])], pos + 1) if text[pos] in ",." else None
        end = self.free_word(pos)
        return ([Fragment(text[pos:end])], end) if end > pos else None

    def whole(self) -> list:
        """A prompt without operators: every character read, else Refused (compel fails on it too)."""
        items, end = self.sequence(0, 0, inner=False)
        end = self.skip(end)
        if end < len(self.text):
            raise Refused(f"character {end + 1} ({self.text[end]!r}) cannot be read")
        return items

    # -----------------------------------------------------------------------------------------------------------------
    # ("a", "b").blend(0.7, 0.3) / .and() / .add(): the whole prompt

    def operator_prompt(self, operator: str) -> Conjunction:
        form = f'the whole prompt must be ("a", "b").{operator}(...)'
        targets, pos = self.targets(form)
        if not self.text.startswith(f".{operator}", pos):
            raise Refused(form)
        weights, normalize, pos = self.options(self.skip(pos + len(operator) + 1), operator, form)
        if self.skip(pos) < len(self.text):
            raise Refused(f"{form}, with nothing after it")
        weights = weights or [1.0] * len(targets)
        if len(weights) != len(targets):
            raise Refused(f".{operator}() has {len(targets)} prompts and {len(weights)} weights")
        if operator != "blend":
            return _conjunction(targets, weights)
        flattened = [FlattenedPrompt(parts=fused) for fused in map(_fused, targets) if fused]
        if len(flattened) != len(targets):
            raise Refused(".blend() of an empty prompt")
        return Conjunction([Blend(flattened, weights, normalize_weights=normalize)], [1.0])

    def targets(self, form: str) -> tuple[list, int]:
        """`(` target, target... `)`: each a quoted string, a group or one word."""
        pos, targets = self.skip(0), []
        if self.text[pos : pos + 1] != "(":
            raise Refused(form)
        while True:
            pos = self.skip(pos + 1)
            found = self.target(pos)
            if found is None:
                raise Refused(f"{form}: cannot read the prompt at character {pos + 1}")
            targets.append(found[0])
            pos = self.skip(found[1])
            if self.text[pos : pos + 1] != ",":
                break
        if self.text[pos : pos + 1] != ")":
            raise Refused(form)
        return targets, self.skip(pos + 1)

    def target(self, pos: int) -> tuple | None:
        char = self.text[pos : pos + 1]
        if char == '"':
            return self.quoted(pos, 1) or self.quoted(pos, 1, inner=False)
        if char == "(":
            return self.group(pos, 2)
        end = self.word(pos)
        return ([Fragment(self.text[pos:end])], end) if end > pos else None

    def options(self, pos: int, operator: str, form: str) -> tuple[list, bool, int]:
        """`(` weights `)`: numbers, the last of a .blend()'s may be no_normalize. Their weights, normalize, end."""
        if self.text[pos : pos + 1] != "(":
            raise Refused(form)
        values, pos = [], self.skip(pos + 1)
        while self.text[pos : pos + 1] != ")" or values:
            value, pos = self.option(pos, operator, form)
            values.append(value)
            pos = self.skip(pos)
            if self.text[pos : pos + 1] != ",":
                break
            pos = self.skip(pos + 1)
        if self.text[pos : pos + 1] != ")":
            raise Refused(f"{form}: cannot read its weights at character {pos + 1}")
        normalize = not (operator == "blend" and values and values[-1] == "no_normalize")
        values = values if normalize else values[:-1]
        return [v if isinstance(v, float) else _flag_weight(v, operator) for v in values], normalize, pos + 1

    def option(self, pos: int, operator: str, form: str) -> tuple[float | str, int]:
        """compel's option: name=value (not supported here), else a number, else a flag."""
        text, keyword = self.text, pos
        while keyword < len(text) and text[keyword] in KEYWORD:
            keyword += 1
        if keyword > pos and text[self.skip(keyword) : self.skip(keyword) + 1] == "=":
            raise Refused(f".{operator}() options (name=value) are not supported here")
        end = _number(text, pos, signed=True)
        if end > pos:
            return float(text[pos:end]), end
        if keyword > pos:
            return text[pos:keyword], keyword
        raise Refused(f"{form}: cannot read its weights at character {pos + 1}")
