"""The arena's leaderboard: runs ranked by a Bradley-Terry fit of pairwise votes, with bootstrap intervals, as
LMSYS Chatbot Arena computes it (Chiang et al. 2024, "Chatbot Arena", sec. 4 and 5; its notebook's
compute_mle_elo and get_bootstrap_result). docs/store.md, "Arena battles and the leaderboard".

The model. Run i has strength beta_i, and

    P(i beats j) = sigmoid(beta_i - beta_j) = 1 / (1 + exp(beta_j - beta_i))

Each vote is a logistic-regression row over the runs: +1 in the left run's column, -1 in the right run's, target
1 when left won and 0 when right won; a tie or both_bad is two rows of weight 1/2, one with each target (half a
win for each side, LMSYS's handling of ties). The fit minimises (no intercept)

    L(beta) = - sum_rows w log sigmoid(+-(beta_left - beta_right)) + (PENALTY / 2) * ||beta||^2

PENALTY is a ridge of 1e-6 (in units of one vote): it keeps an undefeated run finite (without it its beta goes to
infinity), and it pins the one direction the likelihood cannot see (adding a constant to every beta), so the fit
is unique; its effect on a rating is below 1e-3 Elo points once a run has a few votes. Ratings are Elo-scaled and
centred:

    R_i = base + scale * (beta_i - mean(beta)) / ln(10)

so that P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / scale)): with scale 400, 400 points more is 10:1 odds. The
mean rating over the runs is `base`.

The 95% interval of a rating: the votes are resampled with replacement `rounds` times (a seeded numpy
Generator), each resample refitted, and the interval is the 2.5th and 97.5th percentile of its ratings. A run
absent from a resample (one seen in few votes) has no rating in it; its percentiles are over the resamples that
have it.

The rank is LMSYS's: 1 + the number of runs whose lower bound is above this run's upper bound, so runs whose
intervals overlap share a rank.

No torch: numpy only, so that a leaderboard page starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from aigc.errors import BadRequest

PENALTY = 1e-6  # the ridge on beta, in units of one vote's log-likelihood (module docstring)
SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}  # the left side's share of a win
MAX_NEWTON_STEPS = 100
TOLERANCE = 1e-14  # Newton stops when its decrement, g H^-1 g (about twice L - min L), is below this
CELLS_PER_CHUNK = 2_000_000  # bootstrap rounds are fitted in batches of about this many pair cells (memory)


def leaderboard(votes: list[dict], *, rounds: int = 1000, seed: int = 0, scale: float = 400.0,
                base: float = 1000.0) -> list[dict]:
    """One row per run: run, rating, lower, upper (its 95% bootstrap interval), votes, wins, losses, ties (tie
    and both_bad), rank; best first. `votes` are rows with left_run, right_run and winner (Store.list_votes).
    A vote between two generations of one run says nothing about runs and is left out. No votes: []."""
    if not (isinstance(rounds, int) and rounds >= 1):
        raise BadRequest(f"rounds {rounds!r}: give the number of bootstrap resamples, an integer >= 1")
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(base)):
        raise BadRequest(f"scale {scale!r}, base {base!r}: give a finite scale > 0 and a finite base")
    pairs = [(v["left_run"], v["right_run"], _score(v)) for v in votes if v["left_run"] != v["right_run"]]
    if not pairs:
        return []
    runs = sorted({run for left, right, _ in pairs for run in (left, right)})
    column = {run: k for k, run in enumerate(runs)}
    left = np.array([column[p[0]] for p in pairs])  # (N,) run index of each vote's left side
    right = np.array([column[p[1]] for p in pairs])  # (N,)
    y = np.array([p[2] for p in pairs])  # (N,) the left side's share of the win
    n = len(runs)

    # 1. the point estimate, from every vote
    rating = _ratings(fit(_wins(left, right, y, n)), scale, base)[0]  # (n,)

    # 2. the bootstrap: `rounds` resamples of the votes, refitted in chunks
    rng = np.random.default_rng(seed)
    chunk = max(1, CELLS_PER_CHUNK // (n * n))
    boot = []
    for start in range(0, rounds, chunk):
        picks = rng.integers(0, len(pairs), size=(min(chunk, rounds - start), len(pairs)))  # (B, N)
        wins = _wins(left[picks], right[picks], y[picks], n)  # (B, n, n)
        seen = (wins.sum(axis=2) + wins.sum(axis=1)) > 0  # (B, n): runs in each resample
        boot.append(np.where(seen, _ratings(fit(wins), scale, base, seen), np.nan))
    lower, upper = np.nanpercentile(np.concatenate(boot), [2.5, 97.5], axis=0)  # (n,) each

    # 3. the rows: counts, then rank and order
    rows = []
    for k, run in enumerate(runs):
        as_left, as_right = y[left == k], y[right == k]
        scores = np.concatenate([as_left, 1.0 - as_right])  # this run's share of each of its votes
        rows.append({"run": run, "rating": float(rating[k]), "lower": float(lower[k]), "upper": float(upper[k]),
                     "votes": int(scores.size), "wins": int((scores == 1.0).sum()),
                     "losses": int((scores == 0.0).sum()), "ties": int((scores == 0.5).sum())})
    for row in rows:
        row["rank"] = 1 + sum(other["lower"] > row["upper"] for other in rows)
    return sorted(rows, key=lambda row: (-row["rating"], row["run"]))


def fit(wins: np.ndarray, penalty: float = PENALTY) -> np.ndarray:
    """The Bradley-Terry strengths beta that minimise L (module docstring) for each of a batch of win matrices:
    wins (B, n, n), wins[b, i, j] = the weight of votes in which i beat j (a tie adds 1/2 to both cells).
    Returns beta (B, n), natural-log units: P(i beats j) = sigmoid(beta_i - beta_j).

    Newton's method with a backtracking line search, batched over B (the bootstrap's resamples, a hundred or
    more at a time): scikit-learn's LogisticRegression, which LMSYS uses, fits one data set a call, and a
    thousand calls cost seconds; tests/test_arena.py checks this fit against statsmodels' Logit."""
    wins = np.asarray(wins, dtype=float)
    batch, n, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)  # (B, n, n) votes between i and j, either way
    beta = np.zeros((batch, n))
    loss = _loss(wins, beta, penalty)
    for _ in range(MAX_NEWTON_STEPS):
        p = _sigmoid(beta[:, :, None] - beta[:, None, :])  # (B, n, n) P(i beats j)
        # dL/dbeta_k = - sum_j wins[k, j] P(j beats k) + sum_i wins[i, k] P(k beats i) + penalty beta_k
        lost = wins * p.transpose(0, 2, 1)  # (B, n, n) wins[i, j] P(j beats i)
        grad = -lost.sum(axis=2) + lost.sum(axis=1) + penalty * beta  # (B, n)
        # d2L/dbeta_i dbeta_j = -games[i, j] P(i beats j) P(j beats i) off the diagonal; rows sum to the penalty
        curvature = games * p * p.transpose(0, 2, 1)  # (B, n, n)
        hessian = -curvature + np.eye(n) * (curvature.sum(axis=2, keepdims=True) + penalty)
        step = np.linalg.solve(hessian, grad[:, :, None])[:, :, 0]  # (B, n)
        decrement = (grad * step).sum(axis=1)  # (B,) >= 0; L - min L is about half of it
        if decrement.max() < TOLERANCE:
            return beta
        t = np.ones(batch)
        for _ in range(60):  # halve the step until L falls enough (Armijo); Newton's full step is usually fine
            new_beta = beta - t[:, None] * step
            new_loss = _loss(wins, new_beta, penalty)
            short = new_loss > loss - 1e-4 * t * decrement + 1e-12 * np.abs(loss)  # (the last term: rounding)
            if not short.any():
                break
            t = np.where(short, t / 2, t)
        beta, loss = new_beta, new_loss
    raise RuntimeError(f"the Bradley-Terry fit did not converge in {MAX_NEWTON_STEPS} Newton steps")


def _score(vote: Mapping) -> float:
    if vote["winner"] not in SCORE:
        raise BadRequest(f"vote {vote.get('id')!r}: winner {vote['winner']!r}: use one of {', '.join(SCORE)}")
    return SCORE[vote["winner"]]


def _wins(left: np.ndarray, right: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """The win matrices of batches of votes: left, right, y (..., N) -> (..., n, n); wins[i, j] adds y for a vote
    of i (left) against j, and 1 - y to wins[j, i]."""
    batch = left.shape[:-1]
    offset = (np.arange(int(np.prod(batch))) * n * n).reshape(*batch, 1)  # each batch's own n * n cells
    cells = np.concatenate([offset + left * n + right, offset + right * n + left], axis=-1).ravel()
    weights = np.concatenate([y, 1.0 - y], axis=-1).ravel()
    flat = np.bincount(cells, weights=weights, minlength=int(np.prod(batch)) * n * n)
    return flat.reshape(*batch, n, n) if batch else flat.reshape(1, n, n)


def _ratings(beta: np.ndarray, scale: float, base: float, seen: np.ndarray | None = None) -> np.ndarray:
    """Elo-scaled ratings, centred on `base` over the runs seen: R = base + scale (beta - mean beta) / ln 10."""
    seen = np.ones_like(beta, dtype=bool) if seen is None else seen
    mean = (beta * seen).sum(axis=1, keepdims=True) / seen.sum(axis=1, keepdims=True)
    return base + scale * (beta - mean) / math.log(10)


def _loss(wins: np.ndarray, beta: np.ndarray, penalty: float) -> np.ndarray:
    """L for each batch: - sum_ij wins[i, j] log sigmoid(beta_i - beta_j) + penalty / 2 ||beta||^2 -> (B,)."""
    margin = beta[:, :, None] - beta[:, None, :]
    return (wins * np.logaddexp(0.0, -margin)).sum(axis=(1, 2)) + 0.5 * penalty * (beta ** 2).sum(axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
