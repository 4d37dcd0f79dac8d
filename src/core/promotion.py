"""The promotion rule: statistics and the decision, apart from any MLflow call.

A candidate and the champion (or, for a first champion, the majority-class baseline) are scored on
the same held-out texts, each distinct text counted once; McNemar's exact test on the texts where
exactly one of them is right, and a paired bootstrap interval of the accuracy difference. The
candidate becomes champion when it is better, p < alpha, the interval excludes 0 and the evidence
rests on at least `min_texts` distinct texts; else it is a challenger, or, as a first champion,
refused. A new rule is an edit of `decide`, and of `Policy` if it needs a setting of its own (the
registry's `policy` command and the registered model's tags follow from the field).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..base.config import DEFAULT_PROMOTION_ALPHA, DEFAULT_PROMOTION_MIN_TEXTS, ConfigError

BOOTSTRAP_SAMPLES = 10_000
CHAMPION, CHALLENGER, REFUSED = "champion", "challenger", "refused"


@dataclass(frozen=True)
class Policy:
    """A registered model's promotion policy, set by its owner: each field is a tag `promotion.<name>`
    of the registered model and an option of `python -m src.registry policy` (derived from the field)."""

    alpha: float = field(default=DEFAULT_PROMOTION_ALPHA, metadata={
        "help": "Promotion level: a candidate must beat the champion at p < alpha (submitters may only be stricter)."})
    min_texts: int = field(default=DEFAULT_PROMOTION_MIN_TEXTS, metadata={
        "help": "Fewest distinct held-out texts whose evidence may promote."})

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"--alpha must be between 0 and 1 exclusive, got {self.alpha}")
        if self.min_texts < 1:
            raise ConfigError(f"--min-texts must be at least 1, got {self.min_texts}")

    @staticmethod
    def tag(name: str) -> str:
        return f"promotion.{name}"

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Policy:
        kinds = {"float": float, "int": int}
        return cls(**{f.name: kinds[f.type](tags[cls.tag(f.name)]) for f in fields(cls) if cls.tag(f.name) in tags})

    def tags(self) -> dict[str, str]:
        return {self.tag(f.name): str(getattr(self, f.name)) for f in fields(self)}

    def __str__(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))


@dataclass
class Evidence:
    split: str
    n: int  # distinct texts compared
    candidate_accuracy: float
    champion_accuracy: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    level: float
    only_candidate_right: int | None
    only_champion_right: int | None
    p_value: float | None
    significant: bool
    against: str = ""
    excluded_seen_in_training: int = 0
    duplicates_dropped: int = 0
    min_texts: int = DEFAULT_PROMOTION_MIN_TEXTS
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def distinct(hashes: list[str]) -> np.ndarray:
    """True at the first occurrence of each hash: a text repeated 200 times is one piece of evidence."""
    seen: set[str] = set()
    keep = np.zeros(len(hashes), dtype=bool)
    for i, h in enumerate(hashes):
        keep[i] = h not in seen
        seen.add(h)
    return keep


def paired_evidence(candidate_correct: np.ndarray, champion_correct: np.ndarray, alpha: float, split: str,
                    seed: int = 0) -> Evidence:
    """McNemar (exact, two-sided) and a paired bootstrap CI of accuracy(candidate) - accuracy(champion)."""
    from scipy.stats import binomtest

    a = np.asarray(candidate_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    diff = (only_a - only_b) / n
    # Resampling examples with replacement only moves the counts of the three kinds of pairs
    # (only candidate right, only champion right, same): a multinomial draw is the exact same
    # bootstrap without an n x B index matrix.
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=BOOTSTRAP_SAMPLES)
    boot = (draws[:, 0] - draws[:, 1]) / n
    low, high = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    return Evidence(split=split, n=n, candidate_accuracy=float(a.mean()), champion_accuracy=float(b.mean()),
                    difference=float(diff), ci_low=low, ci_high=high, level=1 - alpha,
                    only_candidate_right=only_a, only_champion_right=only_b, p_value=p,
                    significant=bool(diff > 0 and p < alpha and low > 0))


def decide(evidence: Evidence, first: bool) -> str:
    """champion, challenger, or (a first candidate that does not beat the baseline) refused."""
    if evidence.significant and evidence.n >= evidence.min_texts:
        return CHAMPION
    return REFUSED if first else CHALLENGER


def describe(decision: dict) -> str:
    """The gate's decision in one readable sentence (printed, and the registered version's description)."""
    if decision.get("difference") is None:
        return f"{decision['model']}: {decision['decision']}"
    version = decision["candidate_version"]
    what = f"version {version} is {decision['decision']}" if version else "not registered (refused)"
    left_out = [f"{k} {what}" for k, what in ((decision.get("duplicates_dropped") or 0, "duplicates"),
                                               (decision.get("excluded_seen_in_training") or 0, "seen in training"))
                if k]
    few = (f"; fewer than the {decision['min_texts']} distinct texts the policy needs to promote"
           if decision["n"] < decision.get("min_texts", 0) else "")
    return (f"{decision['model']}: {what}: {decision['split']} accuracy {decision['candidate_accuracy']:.3f} vs "
            f"{decision['champion_accuracy']:.3f} ({decision['against']}), difference "
            f"{decision['difference']:+.3f} [{decision['level']:.0%} CI {decision['ci_low']:+.3f}, "
            f"{decision['ci_high']:+.3f}], McNemar p {decision['p_value']:.3g}, n {decision['n']} distinct texts"
            + (f" ({' and '.join(left_out)} left out)" if left_out else "") + few)
