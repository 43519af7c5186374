"""A metric ready to score samples: its feature network and reference statistics, what the number depends on,
and the reference's noise floor. Made by a metric plugin's `load` (shortcut/metrics.py)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Metric:
    """A metric ready to score samples: its feature network and reference statistics, with what the number
    depends on (recorded in each evaluation entry)."""

    name: str
    net: Any  # outputs(images) -> (features [N, D], logits or None), name, sha256, score_names
    reference: Any  # evaluation.ReferenceStats
    reference_sha256: str
    classifier: Any = None  # for class accuracy of class-conditional samples
    note: str = ""
    provenance: dict = dataclasses.field(default_factory=dict)  # what the number depends on, for each entry
    floor_pool: Any = None  # features of real images disjoint from the reference (for its noise floor)
    floor_source: str = ""
    extra_references: dict = dataclasses.field(default_factory=dict)  # name -> (ReferenceStats, floor pool, source)
    memorisation: Any = None  # evaluation.memorisation.Memorisation

    def floor(self, num_samples: int, reference: str | None = None) -> dict | None:
        """The noise floor at `num_samples` of the main reference (or of one of `extra_references`): stored
        with the reference statistics (fid_stats), or measured here from its floor pool and then kept with
        them for this process. None when neither exists."""
        ref, pool, source = (self.reference, self.floor_pool, self.floor_source) if reference is None \
            else self.extra_references[reference]
        stored = (ref.provenance.get("noise_floor") or {}).get(str(num_samples))
        if stored is None and pool is not None:
            from shortcut.evaluation.noise_floor import noise_floor

            stored = noise_floor(pool, ref, num_samples, source=source)
            ref.provenance.setdefault("noise_floor", {})[str(num_samples)] = stored
        return stored
