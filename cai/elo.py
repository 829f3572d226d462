"""Elo ratings: a Bradley-Terry fit on the Elo scale to pairwise (soft) game results."""

from __future__ import annotations

import math
from collections.abc import Sequence

ELO_BASE = 1000.0
ELO_SCALE = 400.0  # rating points per factor of 10 in the odds of winning


def elo_expected(r_a: float, r_b: float) -> float:
    """P(A beats B) for ratings on the Elo scale."""
    return 1.0 / (1.0 + 10 ** ((r_b - r_a) / ELO_SCALE))


def fit_elo(games: Sequence[tuple[str, str, float]], *, prior: float = 1.0, base: float = ELO_BASE,
            max_iter: int = 10_000, tol: float = 1e-12) -> dict[str, float]:
    """Ratings from pairwise games ``(a, b, s)`` with ``s`` = A's (soft) score in [0, 1].

    The Bradley-Terry maximum-likelihood fit (P(a beats b) = pi_a / (pi_a + pi_b)), not sequential
    Elo updates, so the order of the games does not matter; a soft score s counts as s of a win
    and 1 - s of a loss. Solved with the MM iteration of Hunter (2004): pi_i <- W_i / sum_g 1/(pi_i + pi_opp).
    Ratings are ``base + 400 log10(pi)``. ``prior`` adds that many drawn games of every model against
    a virtual opponent rated ``base``: ratings stay finite for a model that never lost (or won) and
    shrink towards ``base`` when there are few games. With ``prior = 0`` ratings are centred so their
    mean is ``base`` (only differences are identified).
    """
    players = sorted({p for a, b, _ in games for p in (a, b)})
    if not players:
        return {}
    wins = dict.fromkeys(players, prior / 2)
    opponents: dict[str, list[str]] = {p: [] for p in players}
    for a, b, s in games:
        if a == b:
            continue  # a model against itself tells nothing about its rating
        s = min(max(float(s), 0.0), 1.0)
        wins[a] += s
        wins[b] += 1.0 - s
        opponents[a].append(b)
        opponents[b].append(a)
    if prior == 0:
        perfect = [p for p in players if opponents[p] and (wins[p] == 0 or wins[p] == len(opponents[p]))]
        if perfect:
            raise ValueError(f"{perfect} won or lost every game: the fit has no finite ratings; use prior > 0")
    pi = dict.fromkeys(players, 1.0)
    for _ in range(max_iter):
        new = {}
        for p in players:
            denom = sum(1.0 / (pi[p] + pi[o]) for o in opponents[p]) + prior / (pi[p] + 1.0)
            new[p] = wins[p] / denom if denom > 0 else 1.0
        if prior == 0:  # fix the scale's free offset: geometric mean 1
            g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
            new = {p: v / g for p, v in new.items()}
        delta = max(abs(math.log(new[p]) - math.log(pi[p])) for p in players)
        pi = new
        if delta < tol:
            break
    return {p: base + ELO_SCALE * math.log10(pi[p]) for p in players}
