"""Study specs: axes of gin bindings -> cells -> a DAG of jobs.

A study (paper Table 1 and Figs. 2-8) is a set of *cells*, each one choice of
a level on every axis (pretext x trunk x width x seed, or any other gin
binding). Each cell becomes a chain of jobs run by the existing binaries:

    train (revisit-train) -> export (revisit-export) -> probe:<name> (revisit-probe)

Baselines (random init, raw pixels) are cells without the train (and export)
job. A spec comes from a gin file under ``gin/study/`` binding ``study.*``
(``configurables.study``); ``expand(spec)`` is pure and testable.

Gin of a job, in order: ``base`` files, each axis level's files (in axis
order), the stage's files, ``final`` files; then every binding in the same
order. Items ending in ``.gin`` are files, anything else is a binding.

Job identity: ``job.fingerprint`` is a SHA-256 over the job's kind, its gin
(the *text* of every file, includes resolved, comments and blank lines
dropped, and the bindings) and its dependencies' fingerprints, so editing a
shipped gin file, a level or a probe changes exactly the jobs it reaches.
Bindings of the probe root and its protocols (``linear_probe.*``,
``LbfgsProbe.*``, ...: ``PROBE_SCOPES``) are left out of train and export
fingerprints: they bind the probe only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

STAGES = ("train", "export", "probe")
# The probe's gin scopes: its root and the protocol classes of
# probe.protocols.REGISTRY (tests/test_study.py checks they agree; spec.py
# imports no TensorFlow).
PROBE_SCOPES = (
    "linear_probe.",
    "LbfgsProbe.",
    "SgdProbe.",
    "MlpProbe.",
    "KnnProbe.",
    "AugmentedSgdProbe.",
    "AugmentedMlpProbe.",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", re.M)


class SpecError(ValueError):
    """A malformed study spec; raised before any job runs."""


@dataclasses.dataclass(frozen=True)
class GinPart:
    """Gin files and bindings, in order."""

    files: tuple[str, ...] = ()
    bindings: tuple[str, ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str] | str, where: str) -> GinPart:
        if isinstance(items, str):
            items = (items,)
        if not isinstance(items, Sequence) or not all(
            isinstance(i, str) for i in items
        ):
            raise SpecError(
                f"{where} must be a list of gin files ('x.gin') and bindings "
                f"('a.b = 1'); got {items!r}."
            )
        files = tuple(i.strip() for i in items if i.strip().endswith(".gin"))
        bindings = tuple(i for i in items if not i.strip().endswith(".gin"))
        return cls(files, bindings)

    def __add__(self, other: GinPart) -> GinPart:
        return GinPart(self.files + other.files, self.bindings + other.bindings)


@dataclasses.dataclass(frozen=True)
class Probe:
    """A probe run on every cell matching ``where`` (axis -> allowed levels)."""

    name: str
    gin: GinPart
    where: Mapping[str, frozenset[str]]

    def applies(self, levels: Mapping[str, str]) -> bool:
        return all(
            levels.get(axis) in allowed or levels.get(axis) is None
            for axis, allowed in self.where.items()
        )


@dataclasses.dataclass(frozen=True)
class Baseline:
    """An untrained cell kind: ``over`` axes are taken from the grid's cells."""

    name: str
    gin: GinPart
    over: tuple[str, ...]
    export: bool


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed study spec (see ``make_spec`` for the fields)."""

    name: str
    base: GinPart
    final: GinPart
    axes: Mapping[str, Mapping[str, GinPart]]
    grids: Mapping[str, Mapping[str, tuple[str, ...]]]
    probes: Mapping[str, Probe]
    baselines: Mapping[str, Baseline]
    job_seconds: Mapping[str, float]
    images_per_second: Mapping[str, float]
    train_examples: int | None
    resources: Mapping[str, Mapping[str, Any]]
    baseline_axis: str = "pretext"
    text: str = ""  # the spec as gin (recorded in the study directory)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the study: a level per axis (absent axes: ``None``)."""

    levels: Mapping[str, str]
    grids: tuple[str, ...]
    baseline: str | None = None

    @property
    def id(self) -> str:
        return "/".join(v for v in self.levels.values() if v is not None)


@dataclasses.dataclass(frozen=True)
class Job:
    """One binary invocation: ``kind`` in STAGES, on the cell's workdir."""

    id: str
    kind: str
    cell: str
    gin: GinPart
    deps: tuple[str, ...]
    fingerprint: str
    probe: str | None = None
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def argv(self, workdir: str) -> list[str]:
        """The binary's arguments (``revisit-<kind>`` flags)."""
        args = [f"--workdir={workdir}"]
        args += [f"--gin_file={f}" for f in self.gin.files]
        args += [f"--gin_bindings={b}" for b in self.gin.bindings]
        return args

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "cell": self.cell,
            "probe": self.probe,
            "gin_files": list(self.gin.files),
            "gin_bindings": list(self.gin.bindings),
            "deps": list(self.deps),
            "fingerprint": self.fingerprint,
            "resources": dict(self.resources),
        }


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise SpecError(
            f"{what} {value!r} must be a non-empty name of letters, digits and "
            "'_.+-' (it becomes a directory name)."
        )
    return value


def _check_mapping(value: Any, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be a dict; got {value!r}.")
    return value


def make_spec(
    name: str,
    *,
    axes: Mapping[str, Mapping[str, Sequence[str]]],
    probes: Mapping[str, Any],
    base: Sequence[str] = (),
    final: Sequence[str] = (),
    grids: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    job_seconds: Mapping[str, float] | None = None,
    images_per_second: Mapping[str, float] | float | None = None,
    train_examples: int | None = None,
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> Spec:
    """Checks and normalises a study spec (the ``study.*`` gin bindings).

    Args:
      name: the study's name.
      axes: ``{axis: {level: [gin files and bindings]}}``, in axis order. The
        report knows the axes ``pretext``, ``trunk``, ``width`` and ``seed``
        (seeds are averaged over); any other axis is part of a cell's label.
      probes: ``{name: [gin...]}`` or ``{name: {"gin": [...], "where": {axis:
        [levels]}}}``: each probe is one ``revisit-probe`` run on every
        matching cell (baselines included; an axis a baseline cell lacks
        does not restrict it). At least one.
      base, final: gin every job gets first / last (e.g. ``smoke.gin``).
      grids: ``{grid: {axis: [levels]}}``: the cells are the union over grids
        of the product of the named levels (an axis a grid does not name:
        all its levels). Default: one grid ``all``, the full product.
      baselines: ``{name: {"gin": [...], "over": [axes], "export": bool}}``:
        one untrained cell per distinct combination of the ``over`` axes
        among the grid cells, with ``pretext = name``. ``export: True``
        (random init: ``export_model.random_init = True``) runs export and
        probes; ``False`` (raw pixels) runs only the probes.
      job_seconds: stated seconds per job kind (``train``, ``export``,
        ``probe``) for ``--dry_run``; replaced by measured durations once
        jobs of that kind have run.
      images_per_second: training throughput (a number, or ``{level:
        number}`` with ``default``) for the train-job estimate: images =
        ``pretrain.steps x global_batch_size`` or ``pretrain.epochs x
        train_examples`` or ``pretrain.examples``.
      train_examples: size of the training split (for ``pretrain.epochs``).
      resources: per job kind, executor resources (slurm: ``nodes``,
        ``tasks_per_node``, ``gpus_per_node``, ``cpus_per_task``,
        ``timeout_min``, ``partition``, ...).

    Raises:
      SpecError: a missing, empty or malformed field, an unknown axis or
        level in a grid, probe or baseline, or no probe.
    """
    _check_name(name, "study.name")
    _check_mapping(axes, "study.axes")
    if not axes:
        raise SpecError("study.axes is empty: name at least one axis of levels.")
    parsed_axes: dict[str, dict[str, GinPart]] = {}
    for axis, levels in axes.items():
        _check_name(axis, "axis")
        _check_mapping(levels, f"study.axes[{axis!r}]")
        if not levels:
            raise SpecError(
                f"axis {axis!r} has no levels: give it at least one "
                "{level: [gin...]} entry or remove it."
            )
        parsed_axes[axis] = {
            _check_name(level, f"level of axis {axis!r}"): GinPart.parse(
                gin, f"study.axes[{axis!r}][{level!r}]"
            )
            for level, gin in levels.items()
        }

    baseline_names = tuple(baselines or {})

    def check_levels(
        selection: Mapping, where: str, with_baselines: bool = False
    ) -> dict[str, tuple[str, ...]]:
        _check_mapping(selection, where)
        out = {}
        for axis, levels in selection.items():
            if axis not in parsed_axes:
                raise SpecError(
                    f"{where} names the unknown axis {axis!r}; axes are "
                    f"{sorted(parsed_axes)}."
                )
            levels = (levels,) if isinstance(levels, str) else tuple(levels)
            if not levels:
                raise SpecError(f"{where}[{axis!r}] is empty.")
            known = list(parsed_axes[axis])
            if with_baselines and axis == "pretext":
                known += baseline_names
            unknown = [lv for lv in levels if lv not in known]
            if unknown:
                raise SpecError(
                    f"{where}[{axis!r}] names unknown level(s) {unknown}; levels "
                    f"of {axis!r} are {sorted(known)}."
                )
            out[axis] = levels
        return out

    parsed_grids = {
        _check_name(g, "grid"): check_levels(sel, f"study.grids[{g!r}]")
        for g, sel in (grids if grids is not None else {"all": {}}).items()
    }
    if not parsed_grids:
        raise SpecError("study.grids is empty; omit it for the full product.")

    _check_mapping(probes, "study.probes")
    if not probes:
        raise SpecError(
            "study.probes is empty: a study needs at least one probe (e.g. "
            "{'linear': ['probe/lbfgs.gin']})."
        )
    parsed_probes = {}
    for pname, value in probes.items():
        _check_name(pname, "probe")
        where = {}
        if isinstance(value, Mapping):
            extra = set(value) - {"gin", "where"}
            if extra:
                raise SpecError(
                    f"study.probes[{pname!r}] has unknown key(s) {sorted(extra)}; "
                    "expected 'gin' and optionally 'where'."
                )
            where = check_levels(
                value.get("where", {}),
                f"study.probes[{pname!r}]['where']",
                with_baselines=True,
            )
            value = value.get("gin", ())
        parsed_probes[pname] = Probe(
            pname,
            GinPart.parse(value, f"study.probes[{pname!r}]"),
            {a: frozenset(lv) for a, lv in where.items()},
        )

    parsed_baselines = {}
    for bname, value in (baselines or {}).items():
        _check_name(bname, "baseline")
        _check_mapping(value, f"study.baselines[{bname!r}]")
        extra = set(value) - {"gin", "over", "export"}
        if extra:
            raise SpecError(
                f"study.baselines[{bname!r}] has unknown key(s) {sorted(extra)}; "
                "expected 'gin', 'over' and 'export'."
            )
        over = tuple(value.get("over", ()))
        for axis in over:
            if axis not in parsed_axes:
                raise SpecError(
                    f"study.baselines[{bname!r}]['over'] names the unknown axis "
                    f"{axis!r}; axes are {sorted(parsed_axes)}."
                )
        if "pretext" in over:
            raise SpecError(f"study.baselines[{bname!r}] cannot vary over 'pretext'.")
        parsed_baselines[bname] = Baseline(
            bname,
            GinPart.parse(value.get("gin", ()), f"study.baselines[{bname!r}]"),
            over,
            bool(value.get("export", True)),
        )
        if "pretext" in parsed_axes and bname in parsed_axes["pretext"]:
            raise SpecError(f"baseline {bname!r} is also a level of axis 'pretext'.")

    ips = images_per_second
    if ips is not None and not isinstance(ips, Mapping):
        ips = {"default": float(ips)}
    for kind in job_seconds or {}:
        if kind not in STAGES:
            raise SpecError(
                f"study.job_seconds has the unknown job kind {kind!r}; kinds are "
                f"{STAGES}."
            )
    for kind in resources or {}:
        if kind not in STAGES:
            raise SpecError(
                f"study.resources has the unknown job kind {kind!r}; kinds are "
                f"{STAGES}."
            )
    return Spec(
        name=name,
        base=GinPart.parse(base, "study.base"),
        final=GinPart.parse(final, "study.final"),
        axes=parsed_axes,
        grids=parsed_grids,
        probes=parsed_probes,
        baselines=parsed_baselines,
        job_seconds=dict(job_seconds or {}),
        images_per_second=dict(ips or {}),
        train_examples=train_examples,
        resources={k: dict(v) for k, v in (resources or {}).items()},
    )


def cells(spec: Spec) -> list[Cell]:
    """The grid cells (union over grids, in order) and then the baselines."""
    axis_names = list(spec.axes)
    found: dict[tuple[str, ...], list[str]] = {}
    for grid, selection in spec.grids.items():
        choices = [selection.get(a, tuple(spec.axes[a])) for a in axis_names]
        for combo in itertools.product(*choices):
            found.setdefault(combo, []).append(grid)
    out = [
        Cell(dict(zip(axis_names, c, strict=True)), tuple(g)) for c, g in found.items()
    ]
    base_axis = spec.baseline_axis
    for bname, baseline in spec.baselines.items():
        combos: dict[tuple[str | None, ...], None] = {}
        for cell in out:
            if cell.baseline is None:
                combos[tuple(cell.levels[a] for a in baseline.over)] = None
        for combo in combos:
            levels = {a: None for a in axis_names}
            levels[base_axis] = bname
            levels.update(zip(baseline.over, combo, strict=True))
            out.append(Cell(levels, ("baselines",), baseline=bname))
    return out


def _expand_includes(path: str, search: Sequence[str], seen: set[str]) -> str:
    """The text of a gin file followed by the text of its includes."""
    resolved = resolve_gin_file(path, search)
    if resolved in seen:
        return ""
    seen.add(resolved)
    with open(resolved) as f:
        text = f.read()
    # Comments and blank lines do not change what a job computes.
    body = "\n".join(
        line.rstrip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    parts = [f"# {path}\n{body}"]
    for inc in _INCLUDE.findall(text):
        parts.append(_expand_includes(inc, search, seen))
    return "\n".join(parts)


def resolve_gin_file(path: str, search: Sequence[str]) -> str:
    """A gin file's path: as given, or under one of the ``search`` dirs."""
    if os.path.exists(path):
        return os.path.abspath(path)
    for root in search:
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise SpecError(f"gin file {path!r} not found as a path nor under {list(search)}.")


def _fingerprint(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(spec: Spec, search: Sequence[str] = ()) -> list[Job]:
    """The study's jobs in dependency order (each after its ``deps``).

    Args:
      spec: the parsed spec.
      search: gin search directories (to read files for the fingerprints).

    Raises:
      SpecError: a gin file that cannot be found.
    """
    texts: dict[str, str] = {}

    def gin_text(part: GinPart) -> list[str]:
        for f in part.files:
            if f not in texts:
                texts[f] = _expand_includes(f, search, set())
        return [texts[f] for f in part.files] + list(part.bindings)

    def relevant(kind: str, part: GinPart) -> GinPart:
        # A binding of the probe root cannot change what training or the
        # export computes, so it stays out of their fingerprints (the study
        # may then change its probe without retraining).
        if kind == "probe":
            return part
        return GinPart(
            part.files,
            tuple(b for b in part.bindings if not b.strip().startswith(PROBE_SCOPES)),
        )

    jobs: list[Job] = []
    for cell in cells(spec):
        if cell.baseline is None:
            cell_gin = GinPart()
            for axis, level in cell.levels.items():
                cell_gin = cell_gin + spec.axes[axis][level]
        else:
            baseline = spec.baselines[cell.baseline]
            cell_gin = GinPart()
            for axis in baseline.over:
                cell_gin = cell_gin + spec.axes[axis][cell.levels[axis]]
            cell_gin = baseline.gin + cell_gin
        kinds: list[tuple[str, Probe | None]] = []
        if cell.baseline is None:
            kinds.append(("train", None))
        if cell.baseline is None or spec.baselines[cell.baseline].export:
            kinds.append(("export", None))
        kinds += [("probe", p) for p in spec.probes.values() if p.applies(cell.levels)]
        if not any(k == "probe" for k, _ in kinds):
            continue
        previous: Job | None = None  # the train or export job probes need
        for kind, probe in kinds:
            stage = probe.gin if probe is not None else GinPart()
            gin = spec.base + cell_gin + stage + spec.final
            job_id = f"{cell.id}/{kind if probe is None else 'probe-' + probe.name}"
            deps = (previous.id,) if previous is not None else ()
            fingerprint = _fingerprint(
                {
                    "kind": kind,
                    "gin": gin_text(relevant(kind, gin)),
                    "deps": [previous.fingerprint] if previous else [],
                }
            )
            job = Job(
                id=job_id,
                kind=kind,
                cell=cell.id,
                gin=gin,
                deps=deps,
                fingerprint=fingerprint,
                probe=None if probe is None else probe.name,
                resources=spec.resources.get(kind, {}),
            )
            jobs.append(job)
            # A probe needs only the export, so one failing probe does not
            # block the next; the runner never runs two jobs of one cell at
            # once, so probes share the cell's feature cache safely.
            if probe is None:
                previous = job
    return jobs


def cell_index(spec: Spec) -> dict[str, Cell]:
    """Cell id -> cell."""
    return {c.id: c for c in cells(spec)}


def validate_gin(jobs: Sequence[Job], parse: Callable[[GinPart], None]) -> None:
    """Parses every distinct job config with ``parse``; the first error names it.

    ``parse`` raises on an unknown configurable or parameter (gin's
    ``skip_unknown=False``); this runs before any job so that a misspelt
    binding never costs compute.
    """
    seen: set[GinPart] = set()
    for job in jobs:
        if job.gin in seen:
            continue
        seen.add(job.gin)
        try:
            parse(job.gin)
        except Exception as e:  # gin raises several types
            raise SpecError(
                f"job {job.id!r}: its gin config does not parse: {e}"
            ) from e
