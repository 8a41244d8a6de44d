"""The mask expression language: kind names combined with ~ & ^ | and parentheses.

`parse_expression("low | ~principal")` gives an `Expr` tree; `Expr.evaluate(atom)` computes
it from the atoms' masks. `non-principal` and `safe` are macros over the atoms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ckptprobe.analysis.choices import Kind
from ckptprobe.errors import UsageError


# Kinds defined by other kinds; the rest are atoms computed per matrix.
_MACROS = {"non-principal": "~principal", "safe": "low | ~principal"}
ATOMS = ("principal", "low", "random", "update", "consensus")


@dataclass(frozen=True)
class Expr:
    """A parsed mask expression: op is "atom" (args: (name,)), "not" (one Expr), or "and", "or", "xor" (two)."""

    op: str
    args: tuple

    def atoms(self) -> set[str]:
        return {self.args[0]} if self.op == "atom" else set().union(*(a.atoms() for a in self.args))

    def evaluate(self, atom: Callable[[str], np.ndarray]) -> np.ndarray:
        """The bool mask, getting each atom's mask from `atom(name)`."""
        if self.op == "atom":
            return atom(self.args[0])
        if self.op == "not":
            return ~self.args[0].evaluate(atom)
        a, b = (x.evaluate(atom) for x in self.args)
        return {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[self.op](a, b, out=a)

    def __str__(self) -> str:
        """Canonical text: every binary operation parenthesized, except the outermost."""
        text = self._text()
        return text[1:-1] if self.op in ("and", "or", "xor") else text

    def _text(self) -> str:
        if self.op == "atom":
            return self.args[0]
        if self.op == "not":
            return "~" + self.args[0]._text()
        sym = {"and": "&", "or": "|", "xor": "^"}[self.op]
        return "(" + f" {sym} ".join(a._text() for a in self.args) + ")"


_TOKEN = re.compile(r"\s*(?:([A-Za-z][\w-]*)|([|&^~()]))")
_BINARY = (("|", "or"), ("^", "xor"), ("&", "and"))  # loosest first, as in Python


def parse_expression(text: str) -> Expr:
    """Parse `text` over kind names with ~ (not), & (and), ^ (xor), | (or) and parentheses.

    Precedence as in Python: ~ binds tightest, then &, ^, |. `non-principal` and `safe`
    expand to `~principal` and `low | ~principal`. No eval: a small recursive-descent parser.
    """
    tokens, pos = [], 0
    text_stripped = text.rstrip()
    while pos < len(text_stripped):
        m = _TOKEN.match(text_stripped, pos)
        if not m:
            raise UsageError(f"mask expression {text!r}: unexpected {text_stripped[pos:].strip()[:1]!r} "
                             f"at position {pos}", hint="use kind names with | & ^ ~ and parentheses")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    if not tokens:
        raise UsageError("empty mask expression", hint="e.g. --expr 'low | ~principal'")
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def take():
        nonlocal i
        i += 1
        return tokens[i - 1]

    def binary(level: int) -> Expr:
        if level == len(_BINARY):
            return unary()
        sym, op = _BINARY[level]
        left = binary(level + 1)
        while peek() == sym:
            take()
            left = Expr(op, (left, binary(level + 1)))
        return left

    def unary() -> Expr:
        tok = peek()
        if tok is None:
            raise UsageError(f"mask expression {text!r} ends too early", hint="is an operand or ')' missing?")
        take()
        if tok == "~":
            return Expr("not", (unary(),))
        if tok == "(":
            inner = binary(0)
            if peek() != ")":
                raise UsageError(f"mask expression {text!r}: missing ')'")
            take()
            return inner
        if tok in ("|", "&", "^", ")"):
            raise UsageError(f"mask expression {text!r}: unexpected {tok!r}", hint="an operand is missing")
        if tok in _MACROS:
            return parse_expression(_MACROS[tok])
        if tok not in ATOMS:
            raise UsageError(f"mask expression {text!r}: unknown name {tok!r}",
                             hint=f"kinds are {', '.join(k.value for k in Kind)}")
        return Expr("atom", (tok,))

    try:
        expr = binary(0)
    except RecursionError:
        raise UsageError(f"mask expression nested too deeply ({len(text)} characters)") from None
    if i != len(tokens):
        raise UsageError(f"mask expression {text!r}: unexpected {tokens[i]!r}", hint="is an operator missing?")
    return expr
