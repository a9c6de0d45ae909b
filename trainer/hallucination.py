"""Hallucination measures on generated text, offline and exact: pure functions of strings.

Two definitions (docs/evaluation.md, "Hallucination rate", states them with their limits):
- GSM8K-style reasoning: the share of arithmetic statements (`a op b = c`, chains `a = b = c`, and
  `<<a*b=c>>` calculator annotations) whose result is wrong, and the share of answers with no final
  answer (common.gsm8k.gsm8k_final_answer, the rule the gsm8k metric scores by).
- Grounded answers (dolly's closed_qa / information_extraction): the share of the numbers and
  capitalised names of a generated answer that appear neither in its prompt nor in its context.

Arithmetic is exact (fractions.Fraction), parsed by a small recursive-descent parser: nothing is
passed to eval(). Knows text only: no models, tokenizers, data sets or caches.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from common.gsm8k import gsm8k_final_answer

# ---------------------------------------------------------------------------------------------
# Arithmetic statements

# A number: thousands groups (1,234,567) or plain digits, an optional decimal part. "7." ends a sentence: the
# decimal part needs a digit after the point.
_NUMBER = r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|(?<!\d)\.\d+"
_ARITH_TOKEN = re.compile(
    rf"(?P<num>{_NUMBER})(?P<pct> ?%)?"
    r"|(?P<op>\\times|\\cdot|\\div|[-+*/×÷·−–])"
    r"|(?P<lp>\()|(?P<rp>\))|(?P<eq>=)"
    r"|(?P<skip>\\?[$€£]|[ \t]+)"  # currency signs and spaces: transparent inside an expression
    r"|(?P<word>[^\W\d_]+)"
    r"|(?P<other>\\[()\[\]]|.|\n)"  # LaTeX \( \) \[ \] delimiters, punctuation, newlines: break an expression
)
_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "·": "*", "\\times": "*", "\\cdot": "*",
        "/": "/", "÷": "/", "\\div": "/"}
_ANNOTATION = re.compile(r"<<([^<>\n]*)>>")


@dataclass(frozen=True)
class _Token:
    kind: str  # num, op, lp, rp, eq; word, other (what ends a run)
    text: str  # as written
    start: int  # its span in the text
    end: int
    value: Fraction | str | None = None  # num: its value; op: one of + - * /
    decimals: int = 0  # num: digits written after the point
    scale: Fraction = Fraction(1)  # num: 1/100 for a percentage


@dataclass(frozen=True)
class _Run:
    """A maximal sequence of numbers, operators, parentheses and '=' in the text."""

    tokens: list[_Token]
    variable_before: bool  # its first segment continues an expression with a letter in it ("W/2 - 2 = 55")
    variable_after: bool  # its last segment does ("100 = 5A", "90 = 30 + M")


@dataclass(frozen=True)
class ArithmeticStatement:
    """One checked equality: `left = right`, both sides as written, and whether it holds."""

    left: str
    right: str
    correct: bool
    annotation: bool  # inside a <<...>> calculator annotation


def _lex(text: str) -> list[_Token]:
    """Every token of text but spaces and currency signs; 'x'/'X' and 'of' between two numbers become '*'
    ("0.2 x 50", "15% of 80")."""
    tokens = []
    for m in _ARITH_TOKEN.finditer(text):
        kind = m.lastgroup if m.lastgroup != "pct" else "num"
        if kind == "num":
            digits = m.group("num")
            scale = Fraction(1, 100) if m.group("pct") else Fraction(1)
            tokens.append(_Token("num", m.group(0).replace(" ", ""), m.start(), m.end(),
                                 Fraction(digits.replace(",", "")) * scale,
                                 len(digits.split(".")[1]) if "." in digits else 0, scale))
        elif kind == "op":
            tokens.append(_Token("op", m.group(0), m.start(), m.end(), _OPS[m.group(0)]))
        elif kind != "skip":
            tokens.append(_Token(kind, m.group(0), m.start(), m.end()))
    for i, t in enumerate(tokens):
        if (t.kind == "word" and t.text in ("x", "X", "of") and 0 < i < len(tokens) - 1
                and tokens[i - 1].kind in ("num", "rp") and tokens[i + 1].kind in ("num", "lp")):
            tokens[i] = _Token("op", t.text, t.start, t.end, "*")
    return tokens


def _is_variable(token: _Token | None, neighbour: _Token) -> bool:
    """token is a one-letter word or a ':' written against the number neighbour: "5A", "D3", "0.25G", "6:48"."""
    return (token is not None and (token.kind == "word" and len(token.text) == 1 or token.text == ":")
            and neighbour.kind == "num" and (token.end == neighbour.start or neighbour.end == token.start))


def _is_sign(tokens: list[_Token], i: int, text: str) -> bool:
    """tokens[i] is a '-' written against the number after it, with a space or nothing before it ("is -3")."""
    t = tokens[i]
    return (t.kind == "op" and t.value == "-" and i + 1 < len(tokens) and tokens[i + 1].start == t.end
            and (t.start == 0 or text[t.start - 1].isspace()))


def _tokenize(text: str) -> list[_Run]:
    """The arithmetic runs of text. A word, punctuation or a newline ends a run; spaces and currency signs
    do not. Leading and trailing operators are cut off (a bullet '- ', bold '**'; a sign, '-3', stays): a
    run they join to a word ("W/2 - 2 = 55", "= 30 + M trees", "Week 1 + Week 2 = 70") continues an
    expression with a variable."""
    tokens = _lex(text)
    runs, i = [], 0
    while i < len(tokens):
        if tokens[i].kind in ("word", "other"):
            i += 1
            continue
        j = i
        while j < len(tokens) and tokens[j].kind not in ("word", "other"):
            j += 1
        before, after = (tokens[i - 1] if i > 0 else None), (tokens[j] if j < len(tokens) else None)
        start, end = i, j
        while start < end and tokens[start].kind == "op" and not _is_sign(tokens, start, text):
            start += 1
        while end > start and tokens[end - 1].kind == "op":
            end -= 1
        if start < end:
            word_before, word_after = before is not None and before.kind == "word", after is not None and after.kind == "word"
            after_op = i > 1 and word_before and tokens[i - 2].kind == "op"  # "... + Week 2 = 70"
            runs.append(_Run(tokens[start:end],
                             (start > i and word_before) or after_op or _is_variable(before, tokens[start]),
                             (end < j and word_after) or _is_variable(after, tokens[end - 1])))
        i = j
    return runs


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := ('+'|'-') factor | num | '(' expr ')'.

    Values are exact Fractions; a division by zero makes the value None (undefined).
    """

    def __init__(self, tokens: list[_Token]):
        self.tokens, self.pos, self.num_binary = tokens, 0, 0

    def parse(self) -> Fraction | None:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self):
        value = self._term()
        while (t := self._peek()) is not None and t.kind == "op" and t.value in "+-":
            self.pos += 1
            self.num_binary += 1
            right = self._term()
            value = None if value is None or right is None else (value + right if t.value == "+" else value - right)
        return value

    def _term(self):
        value = self._factor()
        while (t := self._peek()) is not None and t.kind == "op" and t.value in "*/":
            self.pos += 1
            self.num_binary += 1
            right = self._factor()
            if value is None or right is None or (t.value == "/" and right == 0):
                value = None
            else:
                value = value * right if t.value == "*" else value / right
        return value

    def _factor(self):
        t = self._peek()
        if t is None:
            raise ValueError("expression ends early")
        self.pos += 1
        if t.kind == "op" and t.value in "+-":
            value = self._factor()
            return None if value is None else (-value if t.value == "-" else value)
        if t.kind == "num":
            return t.value
        if t.kind == "lp":
            value = self._expr()
            closing = self._peek()
            if closing is None or closing.kind != "rp":
                raise ValueError("unclosed parenthesis")
            self.pos += 1
            return value
        raise ValueError(f"unexpected {t.text!r}")


@dataclass(frozen=True)
class _Side:
    text: str
    readings: tuple[tuple[Fraction, Fraction], ...]  # (value, tolerance) it may mean; () when undefined
    num_binary: int  # binary operators in it (0: a single number, possibly signed)
    leading: tuple[tuple[Fraction, Fraction], ...]  # readings of its first number, when it starts with one


def _readings(token: _Token) -> tuple[tuple[Fraction, Fraction], ...]:
    """(value, half a unit of its last written digit) of a written number; a percentage may also mean its
    number of percent ("3/4 * 100 = 75%")."""
    tolerance = Fraction(1, 2 * 10 ** token.decimals)
    if token.scale == 1:
        return ((token.value, tolerance),)
    return ((token.value, tolerance * token.scale), (token.value / token.scale, tolerance))


def _side(tokens: list[_Token]) -> _Side | None:
    """One side of an equality, evaluated; None when it is not an arithmetic expression."""
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        value = parser.parse()
    except ValueError:
        return None
    numbers = [t for t in tokens if t.kind == "num"]
    if value is None:
        readings = ()
    elif parser.num_binary == 0 and len(numbers) == 1:  # a claimed result, rounded to the digits written
        sign = -1 if value != numbers[0].value else 1
        readings = tuple((sign * v, tol) for v, tol in _readings(numbers[0]))
    else:
        readings = ((value, Fraction(0)),)
    leading = _readings(tokens[0]) if tokens[0].kind == "num" else ()
    return _Side(" ".join(t.text for t in tokens), readings, parser.num_binary, leading)


def _depth(tokens: list[_Token]) -> int:
    return sum((t.kind == "lp") - (t.kind == "rp") for t in tokens)


def _trim_parentheses(tokens: list[_Token], first: bool, last: bool) -> list[_Token]:
    """The first segment of a run loses the parentheses it opens and does not close, and any it closes before
    opening ("a) 3 + 4 = 7", "(so 3 + 4 = 7)"); the last loses the ones it closes and did not open."""
    if first:
        while tokens and tokens[0].kind == "rp":
            tokens = tokens[1:]
        while tokens and tokens[0].kind == "lp" and _depth(tokens) > 0:
            tokens = tokens[1:]
    if last:
        while tokens and tokens[-1].kind == "rp" and _depth(tokens) < 0:
            tokens = tokens[:-1]
    return tokens


def _matches(left: tuple, right: tuple) -> bool:
    return any(abs(a - b) <= max(ta, tb) for a, ta in left for b, tb in right)


def _holds(left: _Side, right: _Side) -> bool:
    """left = right holds: equal values within the written precision of a single-number side, or (a running
    total, "2 + 3 = 5 + 4 = 9") the left side's value is the right side's first number."""
    if _matches(left.readings, right.readings):
        return True
    return right.num_binary > 0 and _matches(left.readings, right.leading)


def _chain_statements(run: _Run, annotation: bool) -> list[ArithmeticStatement]:
    """The statements of one run: each '=' between two arithmetic expressions, at least one with an operator.

    A segment that is part of an expression with a variable (_Run) is not arithmetic; nor is one that does
    not parse (implicit products "2(3 + 4)", powers "2^3", ...).
    """
    segments, current = [], []
    for t in run.tokens:
        if t.kind == "eq":
            segments.append(current)
            current = []
        else:
            current.append(t)
    segments.append(current)
    last = len(segments) - 1
    sides = [_side(_trim_parentheses(s, i == 0, i == last)) for i, s in enumerate(segments)]
    if run.variable_before:
        sides[0] = None
    if run.variable_after:
        sides[-1] = None
    out = []
    for left, right in itertools.pairwise(sides):
        if left is None or right is None or (left.num_binary == 0 and right.num_binary == 0):
            continue
        out.append(ArithmeticStatement(left.text, right.text, _holds(left, right), annotation))
    return out


def arithmetic_statements(text: str) -> list[ArithmeticStatement]:
    """Every arithmetic statement of text, checked: first the <<...>> annotations, then the rest of the text.

    An annotation counts once: the text `16 - 3 - 4 = <<16-3-4=9>>9` is one statement (the annotation's),
    since the annotation is cut out of the text (leaving a break) before the text is read.
    """
    out = []
    for m in _ANNOTATION.finditer(text):
        for run in _tokenize(m.group(1)):
            out.extend(_chain_statements(run, annotation=True))
    for run in _tokenize(_ANNOTATION.sub("\n", text)):
        out.extend(_chain_statements(run, annotation=False))
    return out


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def gsm8k_hallucination(answers: list[str]) -> dict:
    """Wrong arithmetic and missing final answers over GSM8K-style generated answers (micro averages).

    wrong_statement_rate: wrong statements / statements, over all answers (None when there are none).
    no_final_answer_rate: answers without a final answer (no '#### N', no '\\boxed{N}') / answers.
    """
    statements = [arithmetic_statements(a) for a in answers]
    num_statements = sum(len(s) for s in statements)
    num_wrong = sum(not st.correct for s in statements for st in s)
    num_without = sum(gsm8k_final_answer(a)[0] is None for a in answers)
    return {"wrong_statement_rate": _rate(num_wrong, num_statements), "num_statements": num_statements,
            "num_wrong_statements": num_wrong,
            "num_annotation_statements": sum(st.annotation for s in statements for st in s),
            "num_answers_with_wrong_statement": sum(any(not st.correct for st in s) for s in statements),
            "no_final_answer_rate": _rate(num_without, len(answers)), "num_without_final_answer": num_without,
            "num_answers": len(answers)}


# ---------------------------------------------------------------------------------------------
# Numbers and names not in the prompt or the context

_WORD_OR_NUMBER = re.compile(rf"(?P<num>{_NUMBER})|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)")
_SENTENCE_END = re.compile(r"[.!?:\n]")


def normalize_number(text: str) -> str:
    """'1,234' -> '1234', '3.50' -> '3.5', '007' -> '7', '2.0' -> '2', '0.50' -> '0.5': one spelling per value."""
    return format(Decimal(text.replace(",", "")).normalize(), "f")


def normalize_word(word: str) -> str:
    """NFKC, case-folded, without a possessive or contraction ending: 'Google’s' -> 'google', "I'm" -> 'i'."""
    word = unicodedata.normalize("NFKC", word)
    word = re.sub(r"['’](?:s|m|d|t|ve|ll|re)$", "", word, flags=re.IGNORECASE)
    return word.casefold()


def grounding_items(text: str) -> tuple[set[str], set[str]]:
    """(numbers, names) a generated answer states: each normalized, each counted once.

    Numbers: every number (normalize_number); a sign, '%' or a unit around it is ignored. Names: words that
    start with a capital letter, do not start a sentence (first word of the text, or after '.', '!', '?', ':'
    or a newline since the previous word or number) and are longer than one letter once normalized
    (normalize_word: "I'm" is "i", not a name).
    """
    numbers, names = set(), set()
    previous_end = None
    for m in _WORD_OR_NUMBER.finditer(text):
        if m.lastgroup == "num":
            numbers.add(normalize_number(m.group(0)))
        else:
            word = m.group(0)
            starts_sentence = previous_end is None or _SENTENCE_END.search(text, previous_end, m.start()) is not None
            name = normalize_word(word)
            if word[0].isupper() and len(name) > 1 and not starts_sentence:
                names.add(name)
        previous_end = m.end()
    return numbers, names


def source_items(*texts: str) -> tuple[set[str], set[str]]:
    """(numbers, words) of the source texts (prompt, context), every word whatever its case, normalized."""
    numbers, words = set(), set()
    for text in texts:
        for m in _WORD_OR_NUMBER.finditer(text or ""):
            if m.lastgroup == "num":
                numbers.add(normalize_number(m.group(0)))
            else:
                words.add(normalize_word(m.group(0)))
    return numbers, words


def unsupported_items(generated: str, prompt: str, context: str | None = None) -> dict:
    """The numbers and names of `generated` that appear neither in `prompt` nor in `context`.

    Returns {"numbers": [...], "names": [...], "unsupported_numbers": [...], "unsupported_names": [...]}, sorted.
    """
    numbers, names = grounding_items(generated)
    source_numbers, source_words = source_items(prompt, context or "")
    return {"numbers": sorted(numbers), "names": sorted(names),
            "unsupported_numbers": sorted(numbers - source_numbers), "unsupported_names": sorted(names - source_words)}


def grounding_hallucination(generations: list[str], prompts: list[str], contexts: list[str | None]) -> dict:
    """Share of generated numbers and names found neither in the prompt nor in the context (micro averages).

    unsupported_rate: (unsupported numbers + names) / (numbers + names), each counted once per answer; None
    when the answers state none. Also per kind, and the number of answers with at least one unsupported item.
    """
    if not len(generations) == len(prompts) == len(contexts):
        raise ValueError(f"grounding_hallucination: {len(generations)} generations, {len(prompts)} prompts and "
                         f"{len(contexts)} contexts; pass one prompt and one context (or None) per generation")
    per_answer = [unsupported_items(g, p, c) for g, p, c in zip(generations, prompts, contexts)]
    count = {k: sum(len(a[k]) for a in per_answer)
             for k in ("numbers", "names", "unsupported_numbers", "unsupported_names")}
    unsupported = count["unsupported_numbers"] + count["unsupported_names"]
    return {"unsupported_rate": _rate(unsupported, count["numbers"] + count["names"]),
            "unsupported_number_rate": _rate(count["unsupported_numbers"], count["numbers"]),
            "unsupported_name_rate": _rate(count["unsupported_names"], count["names"]),
            **{f"num_{k}": v for k, v in count.items()},
            "num_answers_with_unsupported": sum(bool(a["unsupported_numbers"] or a["unsupported_names"])
                                                for a in per_answer),
            "num_answers": len(generations)}
