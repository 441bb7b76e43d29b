import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from optuna._hypervolume import compute_hypervolume

from evaluators import Objective
from evaluators.pareto import hypervolume, knee_index, pareto_front, pareto_mask, plot_pareto, reference_point
from search_space import NMSearchError

ACC = Objective("accuracy", "maximize")
LAT = Objective("latency_ms", "minimize", "ms")
BYTES = Objective("bytes_mb", "minimize", "MB")


def brute_force_front(values: np.ndarray, directions: list[str]) -> np.ndarray:
    losses = values * np.array([-1 if d == "maximize" else 1 for d in directions])
    keep = []
    for i, a in enumerate(losses):
        if np.isnan(a).any():
            keep.append(False)
            continue
        dominated = any(
            not np.isnan(b).any() and (b <= a).all() and (b < a).any() for j, b in enumerate(losses) if j != i
        )
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pareto_mask_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    for trial in range(20):
        values = rng.integers(0, 6, size=(rng.integers(1, 40), k)).astype(float)  # many ties
        if trial % 3 == 0:
            values[rng.integers(len(values))] = np.nan
        directions = [("maximize", "minimize")[(trial + i) % 2] for i in range(k)]
        np.testing.assert_array_equal(pareto_mask(values, directions), brute_force_front(values, directions))


def test_front_frame_sorted_and_validated() -> None:
    frame = pd.DataFrame({"accuracy": [0.9, 0.95, 0.8, 0.97, np.nan], "latency_ms": [1.0, 2.0, 1.5, 3.0, 0.1]})
    front = pareto_front(frame, [ACC, LAT])
    assert front.index.tolist() == [3, 1, 0]
    with pytest.raises(NMSearchError, match="no column 'bytes_mb'"):
        pareto_front(frame, [ACC, BYTES])
    with pytest.raises(NMSearchError, match="direction"):
        pareto_mask(np.ones((2, 1)), ["up"])


def test_hypervolume_2d_by_hand() -> None:
    values = np.array([[0.9, 1.0], [0.95, 2.0], [0.8, 1.5]])  # (accuracy, latency)
    # minimisation: (-0.9, 1), (-0.95, 2); reference (acc 0.5, lat 3) -> (-0.5, 3)
    expected = (0.9 - 0.5) * (3 - 1) + (0.95 - 0.9) * (3 - 2)
    assert hypervolume(values, ["maximize", "minimize"], [0.5, 3.0]) == pytest.approx(expected)
    assert hypervolume(values, ["maximize", "minimize"], [0.99, 3.0]) == 0.0  # nothing beats the reference
    assert hypervolume(np.zeros((0, 2)), ["maximize", "minimize"], [0, 1]) == 0.0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_agrees_with_optuna(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(10):
        values = rng.random((rng.integers(1, 25), k))
        directions = ["maximize"] + ["minimize"] * (k - 1)
        reference = np.array([-0.1] + [1.1] * (k - 1))
        losses = values * np.array([-1] + [1] * (k - 1))
        expected = compute_hypervolume(losses, reference * np.array([-1] + [1] * (k - 1)))
        assert hypervolume(values, directions, reference) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_reference_point_and_knee() -> None:
    a = pd.DataFrame({"accuracy": [0.9, 0.95], "latency_ms": [1.0, 2.0]})
    b = pd.DataFrame({"accuracy": [0.7, 0.99], "latency_ms": [0.5, 4.0]})
    ref = reference_point([a, b], [ACC, LAT], margin=0.1)
    assert ref == pytest.approx([0.7 - 0.1 * 0.29, 4.0 + 0.1 * 3.5])
    front = pd.DataFrame(
        {"accuracy": [0.5, 0.9, 0.93, 0.95], "latency_ms": [0.1, 0.3, 1.0, 2.0]}, index=[10, 11, 12, 13]
    )
    assert knee_index(front, [ACC, LAT]) == 11  # the bend: most accuracy per latency before the plateau
    assert knee_index(front.iloc[:2], [ACC, LAT]) in (10, 11)
    three = front.assign(bytes_mb=[4.0, 1.0, 2.0, 3.0])
    assert knee_index(three, [ACC, LAT, BYTES]) == 11
    with pytest.raises(NMSearchError, match="empty"):
        knee_index(front.iloc[:0], [ACC, LAT])


def test_plot_overlays_results() -> None:
    a = pd.DataFrame({"accuracy": [0.9, 0.95, 0.8], "latency_ms": [1.0, 2.0, 1.5]})
    b = pd.DataFrame({"accuracy": [0.92, 0.96], "latency_ms": [1.2, 1.8]})
    ax = plot_pareto({"optuna": a, "random": b}, LAT, ACC, title="digits")
    assert [line.get_label() for line in ax.get_lines()] == ["optuna", "random"]
    assert ax.get_xlabel() == "latency_ms [ms]" and ax.get_title() == "digits"
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [1.0, 2.0])
    plt.close(ax.figure)


def test_importing_the_packages_does_not_load_matplotlib() -> None:
    import subprocess
    import sys

    code = "import evaluators, search_space, strategies, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
