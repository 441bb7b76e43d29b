"""Measured latency tables: a device's own (layer, option) latencies as the cost model's latency.

``python -m experiments.profile`` times every (layer, option) of a search space on the device it
runs on, as nmsearch deploys it, and writes a :class:`LatencyTable`: one file whose first line is
``# `` and a JSON header (format version, device, torch version, dtype, batch, date, load average,
the model's fingerprint), then CSV rows ``layer, option, median_ms, iqr_ms, runs, kernel``.

:class:`MeasuredCostModel` is a :class:`~evaluators.cost.HardwareCostModel` whose latency of every
measured (layer, option) is the table's median, and the fallback profile's roofline for the rest
(bytes, energy, params and MACs stay the profile's). Every strategy sees it through the same
``costs`` / ``table`` / ``evaluate`` calls, so Optuna, Gumbel's expected cost and Domino's cost
targets all use the measurements; :meth:`MeasuredCostModel.coverage` lists which entries came
from where.

The table's latencies are the searchable layers only (as the roofline's): the rest of the
network (normalisation, activations, pooling, residual adds) is the row ``<rest>``, a constant
used by the additivity check, not by the search.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluators.cost import CostReport, GemmTerms, HardwareCostModel, Roofline
from evaluators.hardware import HardwareProfile, load_profile
from search_space import NMSearchError, Option, Scheme, SearchSpace, atomic_write_text

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "REST",
    "STATISTICS",
    "TABLE_COLUMNS",
    "Coverage",
    "LatencyTable",
    "MeasuredCostModel",
    "MeasuredTableError",
]

FORMAT = "nmsearch-latency-table"
FORMAT_VERSION = 1
REST = "<rest>"  # the network's non-searchable work, timed with every searchable layer's output precomputed
TABLE_COLUMNS = ("layer", "option", "median_ms", "iqr_ms", "min_ms", "runs", "kernel")
STATISTICS = ("median", "min")  # which column a search uses: the median, or the fastest block on a shared machine
HEADER_KEYS = ("format", "format_version", "device", "device_type", "torch", "dtype", "batch_size", "fingerprint")


class MeasuredTableError(NMSearchError):
    """A latency table that is unreadable, corrupt, or made for another model, device, dtype or batch."""


@dataclass(frozen=True, eq=False)  # identity equality: the rows are a DataFrame
class LatencyTable:
    """A measured (layer, option) latency table and its header.

    Attributes:
        header: format, device, torch version, dtype, batch size, date, load average, fingerprint, ...
        rows: one row per measured entry, columns :data:`TABLE_COLUMNS`.
        path: where it was read from (for messages), if anywhere.
    """

    header: Mapping[str, Any]
    rows: pd.DataFrame
    path: str = "<memory>"
    statistic: str = "median"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise MeasuredTableError(f"statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")

    # -- reading and writing -----------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike, statistic: str = "median") -> LatencyTable:
        """Read and validate a table file.

        Args:
            path: a file written by :meth:`write`.
            statistic: which latency :attr:`latencies` gives: ``median`` (default) or ``min`` (the
                fastest timed block: less of other jobs' time on a shared machine).

        Returns:
            The table.

        Raises:
            MeasuredTableError: missing file, no JSON header, an unsupported version, a missing
                header key or column, or a corrupt row (named by its line number).
        """
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MeasuredTableError(f"latency table {where}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise MeasuredTableError(f"latency table {where}: unreadable ({error})") from None
        first, _, body = text.partition("\n")
        if not first.startswith("# "):
            raise MeasuredTableError(
                f"latency table {where}: line 1 is not the '# {{...}}' JSON header; "
                "write tables with `python -m experiments.profile`"
            )
        try:
            header = json.loads(first[2:])
        except json.JSONDecodeError as error:
            raise MeasuredTableError(f"latency table {where}: line 1: corrupt JSON header ({error.msg})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise MeasuredTableError(f"latency table {where}: line 1: not an {FORMAT} header")
        missing = [key for key in HEADER_KEYS if key not in header]
        if missing:
            raise MeasuredTableError(f"latency table {where}: header lacks {', '.join(missing)}")
        if header["format_version"] != FORMAT_VERSION:
            raise MeasuredTableError(
                f"latency table {where}: format version {header['format_version']!r}, this nmsearch reads "
                f"{FORMAT_VERSION}; profile again"
            )
        rows = _parse_rows(body, where)
        return cls(header, rows, where, statistic)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the table atomically (a reader sees the old file or the new one).

        Args:
            path: the file.

        Returns:
            The path written.
        """
        body = self.rows.loc[:, list(TABLE_COLUMNS)].to_csv(index=False, float_format="%.6g", lineterminator="\n")
        return atomic_write_text(path, f"# {json.dumps(dict(self.header), sort_keys=True)}\n{body}")

    # -- content -----------------------------------------------------------------------------
    @property
    def latencies(self) -> dict[tuple[str, str], float]:
        """``{(layer, option name): ms}`` (the :attr:`statistic`) of every measured entry (``<rest>`` included)."""
        column = self.rows[f"{self.statistic}_ms"]
        return {
            (layer, option): float(ms)
            for layer, option, ms in zip(self.rows["layer"], self.rows["option"], column, strict=True)
        }

    @property
    def rest_ms(self) -> float | None:
        """The ``<rest>`` row's latency (the non-searchable work), if measured."""
        return self.latencies.get((REST, "dense"))

    def describe(self) -> str:
        """``"<device> (<device_type>), torch <v>, <dtype>, batch <b>"``."""
        h = self.header
        return f"{h['device']} ({h['device_type']}), torch {h['torch']}, {h['dtype']}, batch {h['batch_size']}"

    def check(
        self,
        *,
        fingerprint: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        """Raise unless the table was made for this model, dtype, batch size and device.

        Args:
            fingerprint: the search space's model fingerprint.
            dtype: the cost model's dtype (``fp32``, ``fp16``, ...).
            batch_size: the deployment batch.
            device: a device name the table's must contain (case-insensitive), e.g. ``"A100"``.

        Raises:
            MeasuredTableError: one line naming the first mismatch.
        """
        h = self.header
        checks = (
            ("model fingerprint", fingerprint, h["fingerprint"], fingerprint != h["fingerprint"]),
            ("dtype", dtype, h["dtype"], dtype != h["dtype"]),
            ("batch size", batch_size, h["batch_size"], batch_size != h["batch_size"]),
            ("device", device, h["device"], device is not None and device.lower() not in str(h["device"]).lower()),
        )
        for what, wanted, has, differs in checks:
            if wanted is not None and differs:
                raise MeasuredTableError(
                    f"latency table {self.path} was measured for {what} {has!r}, the search uses {wanted!r}; "
                    "profile this model with the search's settings (python -m experiments.profile)"
                )

    def predict(self, scheme: Scheme) -> float:
        """A whole scheme's latency from the table: ``<rest>`` plus every layer's (layer, option) median.

        Args:
            scheme: a scheme every (layer, option) of which is in the table.

        Returns:
            Milliseconds.

        Raises:
            MeasuredTableError: an entry (or ``<rest>``) is missing.
        """
        latencies = self.latencies
        missing = [f"{name} {option.name}" for name, option in scheme if (name, option.name) not in latencies]
        if self.rest_ms is None:
            missing.append(REST)
        if missing:
            raise MeasuredTableError(f"latency table {self.path} lacks {', '.join(missing[:5])}")
        return float(self.rest_ms + sum(latencies[(name, option.name)] for name, option in scheme))


def _parse_rows(body: str, where: str) -> pd.DataFrame:
    """The CSV rows, every field checked; errors name the file line (the header is line 1)."""
    try:
        frame = pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise MeasuredTableError(f"latency table {where}: corrupt CSV ({str(error).strip()})") from None
    missing = [c for c in TABLE_COLUMNS if c not in frame.columns]
    if missing:
        raise MeasuredTableError(f"latency table {where}: line 2: columns {', '.join(missing)} are missing")
    layers, options, medians, iqrs, minima, runs, kernels = [], [], [], [], [], [], []
    seen: set[tuple[str, str]] = set()
    for number, row in enumerate(frame.itertuples(index=False), start=3):
        values = row._asdict()
        what = f"latency table {where}: line {number}"
        if any(values[c] == "" for c in TABLE_COLUMNS if c != "kernel"):
            raise MeasuredTableError(f"{what}: empty field (a partial row); profile again to complete it")
        try:
            option = Option.parse(values["option"]).name
        except NMSearchError as error:
            raise MeasuredTableError(f"{what}: option {values['option']!r}: {error}") from None
        try:
            median, iqr, count = float(values["median_ms"]), float(values["iqr_ms"]), int(values["runs"])
            fastest = float(values["min_ms"])
        except ValueError:
            raise MeasuredTableError(f"{what}: median_ms, iqr_ms, min_ms and runs must be numbers") from None
        if not (math.isfinite(median) and 0 < fastest <= median and math.isfinite(iqr) and iqr >= 0 and count > 0):
            raise MeasuredTableError(
                f"{what}: needs 0 < min_ms <= median_ms, iqr_ms >= 0, runs > 0 "
                f"(got {fastest}, {median}, {iqr}, {count})"
            )
        key = (values["layer"], option)
        if key in seen:
            raise MeasuredTableError(f"{what}: ({key[0]}, {key[1]}) appears twice")
        seen.add(key)
        layers.append(key[0])
        options.append(option)
        medians.append(median)
        iqrs.append(iqr)
        minima.append(fastest)
        runs.append(count)
        kernels.append(values["kernel"])
    return pd.DataFrame(
        {
            "layer": layers,
            "option": options,
            "median_ms": medians,
            "iqr_ms": iqrs,
            "min_ms": minima,
            "runs": runs,
            "kernel": kernels,
        }
    )


@dataclass(frozen=True)
class Coverage:
    """Where each (layer, option) latency of a space comes from.

    Attributes:
        frame: ``layer, option, source, latency_ms``; ``source`` is ``measured`` or ``roofline <profile>``.
    """

    frame: pd.DataFrame

    @property
    def fallback(self) -> pd.DataFrame:
        """The entries costed by the roofline."""
        return self.frame[self.frame["source"] != "measured"]

    def summary(self) -> str:
        """One line: how many entries were measured, and the roofline ones by name (first 10)."""
        total, fallback = len(self.frame), self.fallback
        line = f"measured latency: {total - len(fallback)} of {total} (layer, option) entries from the table"
        if len(fallback):
            names = ", ".join(f"{r.layer} {r.option}" for r in fallback.head(10).itertuples())
            more = f" (+{len(fallback) - 10} more)" if len(fallback) > 10 else ""
            line += f"; {len(fallback)} from the {fallback['source'].iloc[0]}: {names}{more}"
        return line


@dataclass(frozen=True, eq=False)
class MeasuredCostModel(HardwareCostModel):
    """The cost model with measured latencies: the table where it has the entry, the roofline of
    ``profile`` (the fallback) elsewhere. ``dtype`` and ``batch_size`` must match the table's."""

    measured: LatencyTable | None = None
    device: str | None = None  # a device name the table's must contain; None: any

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.measured is None:
            raise MeasuredTableError("MeasuredCostModel needs a latency table (measured=LatencyTable.read(path))")
        self.measured.check(dtype=self.dtype, batch_size=self.batch_size, device=self.device)
        object.__setattr__(self, "_latencies", self.measured.latencies)

    @classmethod
    def from_table(
        cls,
        table: str | os.PathLike | LatencyTable,
        fallback: str | Path | Mapping[str, Any] | HardwareProfile | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        statistic: str = "median",
    ) -> MeasuredCostModel:
        """A measured cost model from a table file.

        Args:
            table: the table, or its path.
            fallback: the roofline profile for unmeasured entries (default: the table header's ``fallback``).
            dtype: must equal the table's (default: the table's).
            batch_size: must equal the table's (default: the table's).
            device: a device name the table's must contain (None: any).
            statistic: ``median`` or ``min`` (see :meth:`LatencyTable.read`).

        Returns:
            The cost model; its profile's name says ``measured <device> + <fallback>``.

        Raises:
            MeasuredTableError: an unreadable table, no fallback, or a mismatch.
            HardwareProfileError: an unknown fallback profile, or one without the dtype.
        """
        loaded = (
            dataclasses.replace(table, statistic=statistic)
            if isinstance(table, LatencyTable)
            else LatencyTable.read(table, statistic)
        )
        fallback = fallback if fallback is not None else loaded.header.get("fallback")
        if fallback is None:
            raise MeasuredTableError(
                f"latency table {loaded.path} names no fallback profile; set hardware.fallback (e.g. a100)"
            )
        profile = fallback if isinstance(fallback, HardwareProfile) else load_profile(fallback)
        profile_cpu, table_cpu = profile.name.lower().startswith("cpu"), loaded.header["device_type"] == "cpu"
        if profile_cpu != table_cpu:
            raise MeasuredTableError(
                f"latency table {loaded.path} was measured on {loaded.header['device']} "
                f"({loaded.header['device_type']}), the fallback profile {profile.name} is "
                f"{'a CPU' if profile_cpu else 'an accelerator'} profile; choose a fallback for that device"
            )
        loaded.check(dtype=dtype, batch_size=batch_size)
        named = dataclasses.replace(profile, name=f"measured {loaded.header['device']} + {profile.name} roofline")
        return cls(
            named,
            dtype=loaded.header["dtype"],
            batch_size=int(loaded.header["batch_size"]),
            measured=loaded,
            device=device,
        )

    def _lookup(self, pairs: Sequence[tuple[str, Option]]) -> np.ndarray:
        """Measured milliseconds of each pair, NaN where the table lacks it."""
        latencies: dict[tuple[str, str], float] = self._latencies  # type: ignore[attr-defined]
        return np.array([latencies.get((name, option.name), math.nan) for name, option in pairs], dtype=np.float64)

    def costs(self, space: SearchSpace, pairs: Sequence[tuple[str, Option]]) -> tuple[GemmTerms, Roofline]:
        """The roofline's terms and costs, with the latency of every measured pair replaced by the table's."""
        assert self.measured is not None
        self.measured.check(fingerprint=space.fingerprint)
        terms, roof = super().costs(space, pairs)
        measured_ms = self._lookup(pairs)
        latency = np.where(np.isnan(measured_ms), roof.latency_s, measured_ms * 1e-3)
        return terms, dataclasses.replace(roof, latency_s=latency)

    def coverage(self, space: SearchSpace) -> Coverage:
        """Which (layer, option) latencies of ``space`` are measured and which are the roofline's.

        Args:
            space: the search space.

        Returns:
            The per-entry sources and latencies.
        """
        pairs = [(name, option) for name in space.layer_names for option in space.options[name]]
        _, roof = self.costs(space, pairs)
        measured = ~np.isnan(self._lookup(pairs))
        fallback_name = self.profile.name.split(" + ")[-1]
        return Coverage(
            pd.DataFrame(
                {
                    "layer": [name for name, _ in pairs],
                    "option": [option.name for _, option in pairs],
                    "source": np.where(measured, "measured", fallback_name),
                    "latency_ms": roof.latency_s * 1e3,
                }
            )
        )

    def evaluate(self, space: SearchSpace, scheme: Scheme) -> CostReport:
        """:meth:`HardwareCostModel.evaluate` with a ``latency_source`` column per layer."""
        report = super().evaluate(space, scheme)
        measured = ~np.isnan(self._lookup(list(scheme)))
        report.layers.insert(3, "latency_source", np.where(measured, "measured", "roofline"))
        return report
