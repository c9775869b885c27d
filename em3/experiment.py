"""A/B experiments: arms, salted-hash bucketing and the training-data policy.

Shared by the servers (which route users to arms), the learners (which honour the
experiment's training-data policy), the simulators and the demo; the non-learned
baseline rankers live in :mod:`serving.ab`.

A user's bucket is ``u = blake2b(salt | user_id) / 2**64``, a number in ``[0, 1)``
that depends only on the salt and the user id: the same user lands in the same
arm on every server and every request, and users spread uniformly over
``[0, 1)``. Arms own consecutive slices of that interval in config order, as
wide as their traffic fractions. Changing the salt reshuffles everyone (a new
experiment); changing fractions moves only the users at the slice borders.

Arm kinds:

``line``        the latest snapshot of a model line (hot-reloaded)
``snapshot``    one fixed version of a line
``popularity``  candidates by a Redis counter of clicks or impressions
``random``      a uniformly random order (propensity ``1 / n`` per shown slot)

>>> exp = ExperimentConfig.single_line("main")
>>> exp.arm_for("user-1").name
'main'
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import field
from pathlib import Path
from typing import Any, Mapping, get_args

from em3.constraints import Annotated, Field, Fraction, Literal, NonEmptyStr, PositiveInt, config_class
from em3.errors import ImproperlyConfigured

__all__ = ["ARM_KINDS", "OBJECTIVES", "TRAINING_DATA", "ArmConfig", "ExperimentConfig", "bucket"]

ArmKind = Literal["line", "snapshot", "popularity", "random"]
ARM_KINDS: tuple[str, ...] = get_args(ArmKind)
#: What a model arm ranks by (:data:`em3.model.config.OBJECTIVES`, repeated here so the
#: experiment needs no torch): the click probability, click-and-conversion, or the
#: expected conversion value.
Objective = Literal["ctr", "ctcvr", "value"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
_TWO_64 = float(1 << 64)


def bucket(user_id: str, salt: str) -> float:
    """The user's position in ``[0, 1)``: a salted 64-bit hash, scaled.

    >>> bucket("u1", "s") == bucket("u1", "s")
    True
    >>> 0.0 <= bucket("u1", "s") < 1.0
    True
    """
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


@config_class
class ArmConfig:
    """One arm of an experiment.

    Parameters
    ----------
    name : str
        Logged with every impression (``Impression.arm``).
    fraction : float
        Share of users, in ``(0, 1]``.
    kind : {"line", "snapshot", "popularity", "random"}
    model_line : str
        The line served (``line``, ``snapshot``); for baselines a label logged
        as ``Impression.model_line`` (default: the kind).
    version : int, optional
        The fixed snapshot version (``snapshot`` only).
    popularity : {"clicks", "impressions"}
        Which counter the popularity arm ranks by.
    objective : {"ctr", "ctcvr", "value"}
        What a model arm ranks by: ``ctr`` the click probability, ``ctcvr`` the
        probability of a click followed by a conversion (pCTR x pCVR), ``value`` the
        expected conversion value (pCTCVR x the item's mean value). ``ctcvr`` and
        ``value`` need a line whose model has the CVR head; a server refuses its
        snapshots otherwise (``/readyz`` says why).
    """

    name: NonEmptyStr
    fraction: Fraction
    kind: ArmKind = "line"
    model_line: str = ""
    version: PositiveInt | None = None
    popularity: Literal["clicks", "impressions"] = "clicks"
    objective: Objective = "ctr"

    def __post_init__(self) -> None:
        if self.kind in ("line", "snapshot") and not self.model_line:
            raise ValueError(f"model_line must be given for a {self.kind!r} arm, but {self.model_line!r} is given")
        if self.kind == "snapshot" and self.version is None:
            raise ValueError("version must be > 0 for a 'snapshot' arm, but None is given")
        if self.kind != "snapshot" and self.version is not None:
            raise ValueError(f"version is only for 'snapshot' arms, but {self.version!r} is given for a {self.kind!r} arm")
        if self.objective != "ctr" and not self.is_model:
            raise ValueError(f"objective is only for model arms ('line', 'snapshot'), but {self.objective!r} "
                             f"is given for a {self.kind!r} arm")

    @property
    def is_model(self) -> bool:
        return self.kind in ("line", "snapshot")

    @property
    def source_key(self) -> str:
        """The reloader key of a model arm: ``line`` or ``line@version``."""
        return self.model_line if self.kind == "line" else f"{self.model_line}@{self.version}"

    @property
    def logged_line(self) -> str:
        return self.model_line or self.kind


#: What each arm's learner trains on (see :meth:`ExperimentConfig.excluded_lines`
#: and :class:`ArmPropensity`).
TrainingData = Literal["split", "pooled", "weighted"]
TRAINING_DATA: tuple[str, ...] = get_args(TrainingData)


class ArmPropensity:
    """Si's weighted training (arXiv 2310.17496): every arm's learner learns from all
    the experiment's data, each sample weighted so that the data looks as if that arm
    had served everyone.

    Pooled data mixes the arms' exposures, ``p_mix(x) = sum_a q_a p_a(x)`` with ``q_a``
    an arm's share of the impressions. The weight that turns it into arm ``a``'s own
    distribution is ``p_a(x) / p_mix(x) = P(a | x) / q_a``, where ``P(a | x)`` is the
    probability that an impression like ``x`` was served by arm ``a``. Here ``x`` is
    the item, and ``P(a | item)`` a running, smoothed count of which arm served the
    item's impressions: ``(n_a,item + prior q_a) / (n_item + prior)``. An item only the
    other arm shows gets a weight near 0 (this arm alone would never have learned
    about it); an item both show alike gets about 1. Weights are clipped at
    ``max_weight``.

    >>> p = ArmPropensity()
    >>> for _ in range(50):
    ...     p.observe("a", "both"); p.observe("b", "both"); p.observe("b", "b-only")
    >>> round(p.weight("a", "both"), 2), round(p.weight("a", "b-only"), 2), round(p.weight("b", "b-only"), 2)
    (1.49, 0.04, 1.48)
    """

    def __init__(self, prior: float = 2.0, max_weight: float = 10.0) -> None:
        if not (prior > 0 and max_weight > 0):
            raise ValueError(f"prior and max_weight must be > 0, but {prior} and {max_weight} are given")
        self.prior, self.max_weight = prior, max_weight
        self._by_item: dict[str, dict[str, int]] = {}
        self._by_arm: dict[str, int] = {}
        self._total = 0

    def observe(self, arm: str, item_id: str) -> None:
        """Count one impression of ``item_id`` served by ``arm``."""
        counts = self._by_item.setdefault(item_id, {})
        counts[arm] = counts.get(arm, 0) + 1
        self._by_arm[arm] = self._by_arm.get(arm, 0) + 1
        self._total += 1

    def state(self) -> dict:
        """The counts as JSON-ready data (a learner checkpoint carries them).

        >>> p = ArmPropensity(); p.observe("a", "i1")
        >>> q = ArmPropensity(); q.load_state(p.state()); q.weight("a", "i1") == p.weight("a", "i1")
        True
        """
        return {"by_item": {k: dict(v) for k, v in self._by_item.items()}, "by_arm": dict(self._by_arm),
                "total": self._total}

    def load_state(self, state: dict) -> None:
        """Replace the counts with :meth:`state` output."""
        self._by_item = {str(k): {str(a): int(n) for a, n in v.items()} for k, v in state["by_item"].items()}
        self._by_arm = {str(a): int(n) for a, n in state["by_arm"].items()}
        self._total = int(state["total"])

    def weight(self, arm: str, item_id: str) -> float:
        """The loss weight of a sample of ``item_id`` for ``arm``'s learner."""
        if not self._total or not self._by_arm.get(arm):
            return 1.0
        share = self._by_arm[arm] / self._total
        counts = self._by_item.get(item_id, {})
        n = sum(counts.values())
        p_arm = (counts.get(arm, 0) + self.prior * share) / (n + self.prior)
        return min(self.max_weight, p_arm / share)


@config_class
class ExperimentConfig:
    """Arms and the salt that buckets users; fractions must add up to 1.

    ``training_data`` is the experiment's training-data policy:

    * ``"split"`` (default): each model line learns only from impressions that no
      *other* model arm of this experiment served (its own arm's, the baseline
      arms', replayed logs). Arms then do not train on each other's exposures,
      which would bias the measured effect (training-loop interference, Si 2023),
      at the cost of each learner seeing only its share of the traffic.
    * ``"pooled"``: every line learns from every sample.
    * ``"weighted"``: every line learns from every sample, each weighted by
      :class:`ArmPropensity` so that the data looks as if that line's arm had served
      everyone (Si's weighted training: all the data, without the shift).
    """

    name: NonEmptyStr
    arms: Annotated[tuple[ArmConfig, ...], Field(min_length=1)]
    salt: str = ""
    training_data: TrainingData = "split"
    _edges: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, but {names} are given")
        total = math.fsum(a.fraction for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"arm fractions must add up to 1, but they add up to {total:.6g}")
        edges, acc = [], 0.0
        for arm in self.arms:
            acc += arm.fraction
            edges.append(acc)
        edges[-1] = 1.0  # rounding must never leave a user without an arm
        object.__setattr__(self, "_edges", tuple(edges))

    @property
    def effective_salt(self) -> str:
        """The salt, defaulting to the experiment name."""
        return self.salt or self.name

    def arm_for(self, user_id: str) -> ArmConfig:
        """The arm that serves ``user_id`` (stable for a given salt)."""
        u = bucket(user_id, self.effective_salt)
        for arm, edge in zip(self.arms, self._edges):
            if u < edge:
                return arm
        return self.arms[-1]

    def excluded_lines(self, model_line: str) -> tuple[str, ...]:
        """The model lines whose impressions ``model_line``'s learner must not learn
        from under this experiment's policy (none when pooled).

        >>> e = ExperimentConfig("x", (ArmConfig("a", 0.5, "line", "em3"), ArmConfig("b", 0.5, "line", "id_only")))
        >>> e.excluded_lines("em3"), ExperimentConfig("x", e.arms, training_data="pooled").excluded_lines("em3")
        (('id_only',), ())
        """
        if self.training_data in ("pooled", "weighted"):
            return ()
        return tuple(sorted({a.model_line for a in self.arms if a.is_model and a.model_line != model_line}))

    def loop_settings(self, model_line: str) -> dict[str, Any]:
        """The :class:`learners.loop.LoopConfig` fields that make ``model_line``'s learner
        follow this experiment's policy: ``exclude_lines`` (split) and
        ``weight_as_line`` (weighted: samples weighted by :class:`ArmPropensity` for
        this line's arm).

        >>> e = ExperimentConfig("x", (ArmConfig("a", 0.5, "line", "em3"), ArmConfig("b", 0.5, "line", "id_only")),
        ...                      training_data="weighted")
        >>> e.loop_settings("em3")
        {'exclude_lines': (), 'weight_as_line': 'em3'}
        """
        return {"exclude_lines": self.excluded_lines(model_line),
                "weight_as_line": model_line if self.training_data == "weighted" else ""}

    @classmethod
    def single_line(cls, model_line: str, objective: str = "ctr") -> "ExperimentConfig":
        """All traffic on the latest snapshot of one line, ranked by ``objective``
        (``em3 serve --model-line [--objective]``)."""
        return cls(name=model_line, arms=(ArmConfig(model_line, 1.0, "line", model_line, objective=objective),))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        """From ``{"name", "salt"?, "training_data"?, "arms": [{"name", "fraction", "kind"?,
        "model_line"?, "version"?, "popularity"?, "objective"?}, ...]}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an experiment must be a JSON object, but {type(data).__name__} is given")
        arms_raw = data.get("arms")
        if not isinstance(arms_raw, list):
            raise ValueError(f"arms must be a list, but {arms_raw!r} is given")
        known = {"name", "fraction", "kind", "model_line", "version", "popularity", "objective"}
        arms = []
        for n, arm in enumerate(arms_raw):
            if not isinstance(arm, Mapping):
                raise ValueError(f"arms[{n}] must be an object, but {arm!r} is given")
            unknown = sorted(set(arm) - known)
            if unknown:
                raise ValueError(f"arms[{n}] has unknown keys {unknown}; expected a subset of {sorted(known)}")
            arms.append(ArmConfig(**arm))
        return cls(name=str(data.get("name", "")), arms=tuple(arms), salt=str(data.get("salt", "")),
                   training_data=str(data.get("training_data", "split")))

    @classmethod
    def from_file(cls, path: str | Path) -> "ExperimentConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ImproperlyConfigured(f"experiment file {str(path)!r} cannot be read as JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ImproperlyConfigured(f"experiment file {str(path)!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "salt": self.salt,
            "training_data": self.training_data,
            "arms": [
                {k: v for k, v in a.__dict__.items() if v is not None} for a in self.arms
            ],
        }
