import pytest

from search_space import IneligibleLayerError, InvalidPatternError, NMPattern, NMSearchError, valid_m_values
from search_space.patterns import check_divisible


@pytest.mark.parametrize("n,m", [(1, 1), (2, 4), (1, 8), (4, 8), (31, 32), (1, 32), (8, 8)])
def test_valid_patterns(n: int, m: int) -> None:
    pattern = NMPattern(n, m)
    assert pattern.density == n / m
    assert pattern.is_dense == (n == m)
    assert str(pattern) == f"{n}:{m}"
    assert NMPattern.parse(str(pattern)) == pattern


@pytest.mark.parametrize(
    "n,m,fragment",
    [
        (0, 4, "positive integers"),
        (-1, 4, "positive integers"),
        (2, 0, "positive integers"),
        (5, 4, "must not exceed M"),
        (2, 64, "at most 32"),
        (2.0, 4, "positive integers"),
        (True, 4, "positive integers"),
        ("2", 4, "positive integers"),
    ],
)
def test_invalid_patterns(n: object, m: object, fragment: str) -> None:
    with pytest.raises(InvalidPatternError, match=fragment) as info:
        NMPattern(n, m)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_parse_forms() -> None:
    assert NMPattern.parse(" 1 : 8 ") == NMPattern(1, 8)
    assert NMPattern.parse((2, 4)) == NMPattern(2, 4)
    assert NMPattern.parse(NMPattern(2, 8)) == NMPattern(2, 8)
    with pytest.raises(InvalidPatternError, match="'N:M'"):
        NMPattern.parse("2-4")


def test_valid_m_values_and_divisibility_message() -> None:
    assert valid_m_values(12) == [2, 3, 4, 6, 12]
    assert valid_m_values(1) == []
    with pytest.raises(IneligibleLayerError) as info:
        check_divisible(12, 8, layer="blocks.0.fc", what="in_features")
    message = str(info.value)
    assert "blocks.0.fc" in message and "in_features = 12" in message and "M=8" in message
    assert "{2, 3, 4, 6, 12}" in message
    assert isinstance(info.value, NMSearchError) and isinstance(info.value, ValueError)
    with pytest.raises(IneligibleLayerError, match="no M >= 2 divides it"):
        check_divisible(1, 4, layer="dw", what="input channels per group")
    check_divisible(16, 4, layer="ok", what="in_features")
