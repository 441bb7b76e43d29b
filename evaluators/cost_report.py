"""Figures of a :class:`~evaluators.cost.CostReport`: per-layer stacked bars and a roofline scatter."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from evaluators.cost import CostModelError, CostReport

# Stacked components of each metric the bar chart can show, as (report column, legend label).
_STACKS = {
    "latency_ms": (
        ("gemm_ms", "GEMM (max of compute, memory)"),
        ("launch_ms", "launch overhead"),
        ("compress_ms", "activation compression"),
    ),
    "bytes_mb": (
        ("weight_mb", "weights"),
        ("activation_mb", "input activations"),
        ("output_mb", "output"),
        ("compress_mb", "activation compression"),
    ),
}
_DENSE_COLUMN = {"latency_ms": "dense_latency_ms", "bytes_mb": "dense_bytes_mb"}


def plot_layer_breakdown(report: CostReport, metric: str = "latency_ms") -> Figure:
    """Per-layer stacked bars of ``metric`` (``latency_ms`` or ``bytes_mb``) for the chosen options,
    with the dense model's value of each layer marked for comparison."""
    if metric not in _STACKS:
        raise CostModelError(f"plot_layer_breakdown shows {' or '.join(_STACKS)}, got {metric!r}")
    layers = report.layers.assign(gemm_ms=np.maximum(report.layers["compute_ms"], report.layers["memory_ms"]))
    positions = np.arange(len(layers))
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(layers))
    for column, label in _STACKS[metric]:
        ax.bar(positions, layers[column], bottom=bottom, label=label)
        bottom += layers[column].to_numpy()
    ax.scatter(positions, layers[_DENSE_COLUMN[metric]], marker="_", s=200, color="black", label="dense", zorder=3)
    ax.set_xticks(
        positions, [f"{name} [{option}]" for name, option in zip(layers["layer"], layers["option"], strict=True)]
    )
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.set_ylabel(metric)
    ax.set_title(
        f"{report.profile.name} {report.dtype}, batch {report.batch_size}: "
        f"{report.totals[metric]:.4g} vs dense {report.dense_totals[metric]:.4g} {metric}"
    )
    ax.legend(fontsize=8)
    return fig


def plot_roofline(report: CostReport) -> Figure:
    """Each layer at its dense-equivalent arithmetic intensity (2 x dense MACs per DRAM byte) and
    throughput (2 x dense MACs per second of latency), dense (hollow) and chosen (filled, coloured by
    bound), under
    the profile's efficiency-scaled roofs: memory, dense peak and each sparse peak the scheme uses."""
    layers = report.layers
    profile, spec = report.profile, report.profile.dtype(report.dtype)
    flops = 2 * layers["dense_macs"].to_numpy()
    points = {
        "dense": (flops / (layers["dense_bytes_mb"] * 1e6), flops / (layers["dense_latency_ms"] * 1e-3)),
        "chosen": (flops / (layers["bytes_mb"] * 1e6), flops / (layers["latency_ms"] * 1e-3)),
    }
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    intensities = np.concatenate([x for x, _ in points.values()])
    x = np.geomspace(intensities.min() / 2, intensities.max() * 2, 200)
    bandwidth = profile.memory_bandwidth_gbs * 1e9 * profile.efficiency.memory
    peak = spec.dense_tflops * 1e12
    roofs = {1.0: peak * profile.efficiency.compute_dense}
    for speedup in sorted(set(layers["tensor_core_speedup"]) - {1.0}):
        roofs[speedup] = peak * speedup * profile.efficiency.compute_sparse
    for speedup, roof in roofs.items():
        label = "dense roof" if speedup == 1.0 else f"sparse roof ({speedup:g}x peak)"
        ax.plot(x, np.minimum(roof, x * bandwidth), linestyle="-" if speedup == 1.0 else "--", label=label)
    dense_intensity, dense_throughput = points["dense"]
    ax.scatter(dense_intensity, dense_throughput, facecolors="none", edgecolors="gray", label="dense")
    chosen_intensity, chosen_throughput = points["chosen"]
    for bound, color in (("compute", "tab:red"), ("memory", "tab:blue")):
        selected = (layers["bound"] == bound).to_numpy()
        ax.scatter(chosen_intensity[selected], chosen_throughput[selected], color=color, label=f"chosen, {bound}-bound")
    ax.set_xlabel("arithmetic intensity [dense-equivalent FLOP / DRAM byte]")
    ax.set_ylabel("throughput [dense-equivalent FLOP/s]")
    ax.set_title(f"{profile.name} {report.dtype}, batch {report.batch_size}")
    ax.legend(fontsize=7)
    return fig
