"""GSM8K-style final answers: the one reader of `kdcache build --filter gsm8k-answer` and the gsm8k metric.

Pure string functions; knows nothing about data sets, models or the cache format.
"""

from __future__ import annotations

import re

_NUMBER = r"-?[\d,]*\.?\d+"
# The content of a \boxed{...}, allowing one level of nested braces (\boxed{\frac{1}{2}}, \boxed{\text{5}}).
_BOXED = r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}"


def _normalize_number(text: str) -> str | None:
    """The first number in text, '$' and ',' removed, trailing zeros of a decimal dropped ('3.50' -> '3.5')."""
    match = re.search(_NUMBER, text.replace("$", ""))
    if not match:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm8k_final_answer(text: str | None) -> tuple[str | None, str | None]:
    """(the final answer of a GSM8K-style solution, how it was written: '####', 'boxed' or None).

    The number after the last '####'; when there is none (no '####', or no number after it), the number
    in the last \\boxed{...} (instruct models trained on MATH-style data answer that way). Normalized:
    '#### 1,234' -> '1234', '#### -3.50' -> '-3.5', '\\boxed{\\$4.50}' -> '4.5'.
    """
    if not text:
        return None, None
    if "####" in text:
        number = _normalize_number(text.rsplit("####", 1)[1])
        if number is not None:
            return number, "####"
    boxed = re.findall(_BOXED, text)
    number = _normalize_number(boxed[-1]) if boxed else None
    return (number, "boxed") if number is not None else (None, None)


def extract_gsm8k_answer(text: str | None) -> str | None:
    """The final answer of a GSM8K-style solution (gsm8k_final_answer): after the last '####', else in the
    last \\boxed{...}; None when there is neither. Used by `--filter gsm8k-answer` and the gsm8k metric."""
    return gsm8k_final_answer(text)[0]
