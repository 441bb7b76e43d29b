"""N:M patterns, eligibility rules and the errors raised for bad sparsity input."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_M = 32


class NMSearchError(ValueError):
    """Base class of every user-facing input error in nmsearch (one clear line)."""


class InvalidPatternError(NMSearchError):
    """An N:M pattern whose N or M is not valid."""


class IneligibleLayerError(NMSearchError):
    """A layer whose grouped dimension is not divisible by M."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, order=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive entries along the reduction dimension.

    Attributes:
        n: Entries kept per group, ``1 <= n <= m``.
        m: Group size, at most 32. ``n == m`` is dense.

    Raises:
        InvalidPatternError: If ``n`` or ``m`` is not a positive integer, ``n > m`` or ``m > 32``.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (_is_int(self.n) and _is_int(self.m)) or self.n < 1 or self.m < 1:
            raise InvalidPatternError(f"invalid N:M {self.n!r}:{self.m!r}: N and M must be positive integers, e.g. 2:4")
        if self.n > self.m:
            raise InvalidPatternError(
                f"invalid N:M {self.n}:{self.m}: N must not exceed M (keep N of every M), e.g. 2:4"
            )
        if self.m > MAX_M:
            raise InvalidPatternError(f"invalid N:M {self.n}:{self.m}: M must be at most {MAX_M}")

    @classmethod
    def parse(cls, text: str | NMPattern | tuple[int, int]) -> NMPattern:
        """Build a pattern from text, a pair or an existing pattern.

        Args:
            text: ``"2:4"`` (spaces allowed), ``(2, 4)`` or an ``NMPattern`` (returned as is).

        Returns:
            The pattern.

        Raises:
            InvalidPatternError: If ``text`` is not of the form ``N:M`` or the values are invalid.
        """
        if isinstance(text, NMPattern):
            return text
        if isinstance(text, tuple | list) and len(text) == 2:
            return cls(*text)
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if match is None:
            raise InvalidPatternError(f"invalid N:M {text!r}: write it as 'N:M', e.g. '2:4'")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_dense(self) -> bool:
        """Whether every entry is kept (``n == m``)."""
        return self.n == self.m

    @property
    def density(self) -> float:
        """The kept fraction ``n / m``."""
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def valid_m_values(dim: int, max_m: int = MAX_M) -> list[int]:
    """The M values (>= 2) that divide ``dim``: what a user could choose instead.

    Args:
        dim: The grouped dimension, e.g. a layer's input channels per group.
        max_m: The largest M to consider.

    Returns:
        The dividing M values in increasing order (empty when none does).
    """
    return [m for m in range(2, max_m + 1) if dim % m == 0]


def check_divisible(dim: int, m: int, *, layer: str, what: str) -> None:
    """Check that groups of ``m`` tile ``dim``.

    Args:
        dim: Size of the grouped dimension.
        m: The group size M.
        layer: The layer's name, for the message.
        what: What ``dim`` is, for the message, e.g. ``"input channels per group"``.

    Raises:
        IneligibleLayerError: If ``dim % m != 0``; the message lists the M values that would work.
    """
    if dim % m == 0:
        return
    options = valid_m_values(dim)
    fix = f"use M in {{{', '.join(map(str, options))}}}" if options else "no M >= 2 divides it"
    raise IneligibleLayerError(
        f"layer '{layer}': {what} = {dim} is not divisible by M={m}; {fix}, or keep the layer dense"
    )
