"""Protocol fingerprints: a short hash of everything that defines a probe result.

Place in the data flow (stage 6 -> 7): every result row the probe writes
carries ``protocol`` (the inputs below, as plain JSON) and
``fingerprint = protocol_fingerprint(protocol)``; the report
(``report/tables.py``) uses the fingerprint to refuse to put rows measured
under different protocols in one column without saying so.

What defines a protocol (issue 5): the solver and its settings (kind, penalty
grid, tolerance, iteration cap, precision, standardisation, epochs and
schedule for SGD, hidden width for the MLP, k for k-NN), the dataset and its
splits, the preprocessing, the pooling, the label subset and its seed, and
the package version. Not part of it: the model, the endpoint, where files
live, timings, and the result itself, since a column compares exactly those.

Contract: ``protocol_fingerprint(mapping) -> 12 hex digits``, a SHA-256 of
the canonical JSON (sorted keys, tuples as lists), so it changes when any
input changes and not when key order or container types do.

Online protocols (``probe/online.py``: probes of the live trunk during
pretraining) carry ``ONLINE_KEY: True`` and a name starting with
``ONLINE_PREFIX``; offline ones carry neither (``protocol_fingerprint``
refuses a protocol that has one without the other). An online fingerprint
therefore never equals an offline one, and ``is_online`` tells them apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from revisit_tf.probe.cache import canonical_json

# Keys a protocol must name (a missing one is an error, so that two rows can
# never share a fingerprint because one of them forgot a field).
REQUIRED_KEYS = (
    "protocol",
    "dataset",
    "splits",
    "pp",
    "pooling",
    "subset",
    "seed",
    "version",
)
ONLINE_KEY = "online"  # True in online protocols and their rows
ONLINE_PREFIX = "online_"  # online protocol names: "online_knn", "online_lbfgs"


def is_online(record: Mapping[str, Any]) -> bool:
    """True for an online protocol, or a result row of one (``ONLINE_KEY``).

    Args:
        record: a protocol mapping or a result row (its ``protocol_spec`` is
            looked at too).
    """
    spec = record.get("protocol_spec")
    return record.get(ONLINE_KEY) is True or (
        isinstance(spec, Mapping) and spec.get(ONLINE_KEY) is True
    )


def protocol_fingerprint(protocol: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over ``canonical_json(protocol)``.

    Args:
        protocol: a mapping with at least ``REQUIRED_KEYS`` (plus the
            solver's settings); values must be JSON-representable.

    Returns:
        The fingerprint, e.g. ``"3f2a9c01be47"``.

    Raises:
        ValueError: a required key is missing, a value is not
            JSON-representable, or the name and ``ONLINE_KEY`` disagree.
    """
    if not isinstance(protocol, Mapping):
        raise ValueError(f"protocol must be a mapping; got {type(protocol).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in protocol]
    if missing:
        raise ValueError(
            f"protocol lacks {missing}; a fingerprint must cover {list(REQUIRED_KEYS)}."
        )
    named_online = str(protocol["protocol"]).startswith(ONLINE_PREFIX)
    if named_online != (protocol.get(ONLINE_KEY) is True):
        raise ValueError(
            f"protocol {protocol['protocol']!r} has {ONLINE_KEY}="
            f"{protocol.get(ONLINE_KEY)!r}: online protocols (and only they) are "
            f"named {ONLINE_PREFIX}* and carry {ONLINE_KEY}=True."
        )
    return hashlib.sha256(canonical_json(protocol).encode()).hexdigest()[:12]


def protocol_differences(
    first: Mapping[str, Any], second: Mapping[str, Any]
) -> list[str]:
    """Sorted top-level keys whose values differ (a key present in one only counts)."""
    keys = set(first) | set(second)
    return sorted(
        k
        for k in keys
        if k not in first
        or k not in second
        or canonical_json(first[k]) != canonical_json(second[k])
    )
