"""Step-time prediction for the frame scheduler: ms of one engine step from its batch shape.

Owns: the law `step_ms ~ base_ms + ms_per_row * rows + ms_per_ktoken * tokens / 1000 +
ms_per_chunk * chunks + ms_per_first * firsts` (a chunk: one stream's new frames in the step,
which the VAE encodes and decodes once whatever its denoise steps, where each step is a row; a
first: a stream's first chunk, which costs more than its tokens say: a frame more to encode and
decode, its prompt, its lanes set up; measured on the CPU demo at 280 ms against 130-170 for a
later chunk, and fitted as tokens it made the law steep in rows), its
online fit from measured steps (windowed least squares, pulled gently toward a prior, every
coefficient held >= 0 so that a bigger batch never costs less) and the
safety margin added to every prediction the scheduler decides with.
Does not own: measuring (the executor times the step and reports `StepResult.step_ms`), what a
row or token is (the scheduler counts them), or which streams to batch. Pure Python, no torch.

Two models share one protocol (`predict_ms`, `observe`):
- `FixedCostModel`: a known law that never learns (tests, benchmarks, a pinned calibration).
- `OnlineCostModel`: starts from a conservative prior (prior law x (1 + prior_margin)) and,
  once `min_samples` steps were measured, predicts the fitted law x (1 + margin), where the
  margin is a high quantile (default p95) of the relative residuals of the latest
  `margin_window` steps. The fit weighs the window's samples by age (half as much every
  `half_life` steps): after a burst of slow steps (a busy machine) predictions come back down
  within tens of steps, not once the burst has left the whole window.

Provisional samples: steps measured at warm-up (often on a busy machine) are marked with
`mark_provisional()` and dropped as soon as `min_samples` steps measured while serving replace
them; `reset()` forgets everything (the engine re-measures on an idle engine after a refusal).
So predictions follow the step times observed now, not a busy start. The warm-up measures two
step counts and two streams together, and `calibrate_prior()` makes their fit the prior: what
serving steps cannot tell apart (below) then stays split as this machine measured it, not as
the default prior guesses.

Why a prior pull: when every stream has the same frame size, tokens = rows x constant in steady
steps, so rows and tokens are collinear and plain least squares is singular (while every stream
runs one step, chunks = rows too). A first chunk's cost is not in that fit: the steps without
one fit the rest, and `ms_per_first` is the median of what steps with first chunks took beyond
it (`_first_ms`), so that a rare, slow first step sets neither it nor the cost of a token.
A weak ridge term toward the
prior (`prior_strength`, a small fraction of one sample in scaled units), scaled to the speed the
samples show (`_speed_of`), splits the cost between the two as the prior does in that one
direction, while the data decide all they can see.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class LinearLaw:
    """step_ms = base_ms + ms_per_row * rows + ms_per_ktoken * tokens / 1000 + ms_per_chunk * chunks
    + ms_per_first * firsts."""

    base_ms: float
    ms_per_row: float
    ms_per_ktoken: float
    ms_per_chunk: float = 0.0
    ms_per_first: float = 0.0

    def predict_ms(self, rows: int, tokens: int, chunks: int = 0, firsts: int = 0) -> float:
        return (self.base_ms + self.ms_per_row * rows + self.ms_per_ktoken * tokens / 1000.0
                + self.ms_per_chunk * chunks + self.ms_per_first * firsts)

    def as_list(self) -> list[float]:
        return [self.base_ms, self.ms_per_row, self.ms_per_ktoken, self.ms_per_chunk, self.ms_per_first]


class StepCostModel(Protocol):
    """What the scheduler needs from a cost model."""

    def predict_ms(self, rows: int, tokens: int, chunks: int = 0, firsts: int = 0) -> float:
        """Conservative (margin included) step time for a batch of `rows` rows, `tokens` tokens,
        `chunks` streams' chunks, `firsts` of them streams' first chunks."""

    def observe(self, rows: int, tokens: int, step_ms: float, chunks: int = 0, firsts: int = 0) -> None:
        """Learn from one measured step."""


class FixedCostModel:
    """A known law plus a fixed relative margin; `observe` only counts. `law` may be replaced
    (tests use that to simulate a GPU that slows down after streams were admitted)."""

    def __init__(self, law: LinearLaw, margin: float = 0.0):
        self.law = law
        self.margin = margin
        self.samples = 0

    def predict_ms(self, rows: int, tokens: int, chunks: int = 0, firsts: int = 0) -> float:
        return max(0.0, self.law.predict_ms(rows, tokens, chunks, firsts)) * (1.0 + self.margin)

    def observe(self, rows: int, tokens: int, step_ms: float, chunks: int = 0, firsts: int = 0) -> None:
        self.samples += 1


# A deliberately pessimistic default prior (roughly a 1.3B DiT step at 512x512 on a mid-range
# GPU). The engine should pass its own prior or `observe` a few profile steps before admitting.
# Its chunk cost as much as a row: the only split of a row's cost between its DiT step and its
# chunk's VAE that 1-step streams (rows = chunks) leave to the prior (an H200 at 512x512: VAE
# 106 ms a chunk, DiT 94 a row; the CPU demo: about 90 and 25).
# A first chunk as much again as a chunk (its extra frame, prompt and lanes: a guess the warm-up
# replaces, `calibrate_prior`).
DEFAULT_PRIOR = LinearLaw(base_ms=30.0, ms_per_row=4.0, ms_per_ktoken=8.0, ms_per_chunk=4.0, ms_per_first=4.0)


class OnlineCostModel:
    """Windowed, prior-regularised least squares over (1, rows, ktokens, chunks, firsts) -> step_ms."""

    def __init__(
        self,
        prior: LinearLaw = DEFAULT_PRIOR,
        window: int = 128,
        min_samples: int = 8,
        prior_margin: float = 0.25,
        quantile: float = 0.95,
        min_margin: float = 0.05,
        prior_strength: float = 1e-3,
        margin_window: int = 32,
        half_life: float = 32.0,
    ):
        if (window < 3 or min_samples < 1 or not 0.0 < quantile <= 1.0 or not prior_strength > 0
                or margin_window < 1 or not half_life > 0):
            raise ValueError("window >= 3, min_samples >= 1, 0 < quantile <= 1, prior_strength > 0, "
                             "margin_window >= 1, half_life > 0")
        self.prior = prior
        self.min_samples = min_samples
        self.prior_margin = prior_margin
        self.quantile = quantile
        self.min_margin = min_margin
        self.prior_strength = prior_strength
        self.margin_window = margin_window
        self.half_life = half_life  # steps after which a sample weighs half in the fit
        # (rows, tokens, chunks, firsts, step_ms)
        self._window: deque[tuple[int, int, int, int, float]] = deque(maxlen=window)
        self._fit = prior
        self._margin = prior_margin
        self._provisional = 0  # the oldest samples in the window that newer ones will replace

    # -- what the scheduler calls --------------------------------------------------------

    @property
    def samples(self) -> int:
        return len(self._window)

    @property
    def calibrated(self) -> bool:
        return len(self._window) >= self.min_samples

    @property
    def law(self) -> LinearLaw:
        """The fitted law (the prior until the first sample)."""
        return self._fit

    @property
    def margin(self) -> float:
        """Relative margin added to predictions now."""
        return self._margin if self.calibrated else self.prior_margin

    def mean_ms(self, rows: int, tokens: int, chunks: int = 0, firsts: int = 0) -> float:
        """The fitted law without margin (the prior before `min_samples`)."""
        law = self._fit if self.calibrated else self.prior
        return max(0.0, law.predict_ms(rows, tokens, chunks, firsts))

    def predict_ms(self, rows: int, tokens: int, chunks: int = 0, firsts: int = 0) -> float:
        if not self.calibrated:
            # Few samples: never below the prior, and never below what was already seen.
            mean_ms = max(self.prior.predict_ms(rows, tokens, chunks, firsts),
                          self._fit.predict_ms(rows, tokens, chunks, firsts))
            return max(0.0, mean_ms) * (1.0 + self.prior_margin)
        return self.mean_ms(rows, tokens, chunks, firsts) * (1.0 + self._margin)

    def observe(self, rows: int, tokens: int, step_ms: float, chunks: int = 0, firsts: int = 0) -> None:
        if step_ms < 0 or rows <= 0:
            return
        self._window.append((rows, tokens, chunks, firsts, float(step_ms)))
        self._provisional = min(self._provisional, len(self._window) - 1)  # the window may have rolled
        if self._provisional and len(self._window) - self._provisional >= self.min_samples:
            for _ in range(self._provisional):
                self._window.popleft()
            self._provisional = 0
        self._refit()

    def mark_provisional(self) -> None:
        """The samples so far (warm-up) are dropped once `min_samples` newer ones are in."""
        self._provisional = len(self._window)

    def calibrate_prior(self) -> None:
        """The fit of the samples so far becomes the prior (the engine's warm-up measured steps
        of three batch shapes): a fit pulls toward its prior only where its samples cannot tell
        the coefficients apart, which while every stream runs the same steps is a row's cost
        against a chunk's, and while one stream runs a step's fixed cost against a chunk's; the
        default prior split those as a GPU does, not as this machine."""
        if self._window:
            self.prior = self._fit

    def reset(self) -> None:
        """Forget every sample: predictions fall back to the prior until new steps are observed."""
        self._window.clear()
        self._provisional = 0
        self._fit, self._margin = self.prior, self.prior_margin

    # -- fitting -------------------------------------------------------------------------

    def _refit(self) -> None:
        """Steps with no first chunk fit the law's other coefficients; a first chunk's cost is what
        steps with first chunks took beyond that law. Fitted together (one least squares) the
        rare first-chunk steps, often slow once on a busy machine, decided `ms_per_first` alone
        and, being the only steps with more tokens, `ms_per_ktoken` too (a probe: one 1.5 s first
        step among 127 of 120-400 ms made a two-stream step 3.1 s and refused newcomers for 50 s)."""
        samples = list(self._window)
        steady = [s for s in samples if s[3] == 0] or samples  # (before any: the first steps as they are)
        decay = 0.5 ** (1.0 / self.half_life)
        weights = [decay ** age for age in range(len(steady) - 1, -1, -1)]  # oldest first
        speed = self._speed_of(steady, weights)
        law = self._fit_steady(steady, weights, speed)
        self._fit = replace(law, ms_per_first=self._first_ms(samples, law, speed))
        # Margin: a high quantile of the latest steps' relative residuals (how much slower they ran).
        # Over the whole window, a burst of slow steps (a busy machine for 12 s) set it for as long
        # as they stayed in the window, and the more so as the fit came back down: a probe's
        # two-stream step was predicted at 1 s for 46 s after the burst while steps took 90 ms.
        rel = sorted(
            (step_ms - m) / m
            for rows, tokens, chunks, firsts, step_ms in samples[-self.margin_window:]
            if (m := self._fit.predict_ms(rows, tokens, chunks, firsts)) > 1e-9
        )
        if rel:
            k = min(len(rel) - 1, int(self.quantile * len(rel)))
            self._margin = max(self.min_margin, rel[k])
        else:
            self._margin = self.prior_margin

    def _fit_steady(self, samples: list[tuple[int, int, int, int, float]], weights: list[float],
                    speed: float) -> LinearLaw:
        """base, row, ktoken and chunk costs (first-chunk cost 0) from `samples`, each weighed by
        its weight (its age)."""
        # 1. Scale features to about [0, 1] so the prior pull weighs each coefficient alike. The
        #    pull is toward the prior at the speed the samples show (`speed`): steps of one shape
        #    pulled toward the prior itself, faster than it, took the row and token costs to 0
        #    (a second stream predicted free) and put it all in the base.
        scale = [1.0, float(max(1, max(r for r, _, _, _, _ in samples))),
                 max(1e-3, max(t for _, t, _, _, _ in samples) / 1000.0),
                 float(max(1, max(c for _, _, c, _, _ in samples)))]
        prior_scaled = [p * speed * s for p, s in zip(self.prior.as_list()[:4], scale)]
        # 2. Normal equations (Z^T Z + lam I) theta = Z^T y + lam theta_prior, in scaled units.
        lam, n = self.prior_strength, len(scale)
        gram = [[lam if i == j else 0.0 for j in range(n)] for i in range(n)]
        rhs = [lam * p for p in prior_scaled]
        for w, (rows, tokens, chunks, _, step_ms) in zip(weights, samples):
            z = (1.0, rows / scale[1], tokens / 1000.0 / scale[2], chunks / scale[3])
            for i in range(n):
                rhs[i] += w * z[i] * step_ms
                for j in range(n):
                    gram[i][j] += w * z[i] * z[j]
        theta_scaled = _solve_nonnegative(gram, rhs)
        return LinearLaw(*[t / s for t, s in zip(theta_scaled, scale)])

    def _speed_of(self, samples: list[tuple[int, int, int, int, float]], weights: list[float]) -> float:
        """How many times the prior's steady law these steps took (weighed as the fit weighs them):
        the prior's split of a step's cost, at the speed this machine runs now."""
        took = sum(w * step_ms for w, (*_, step_ms) in zip(weights, samples))
        said = sum(w * self.prior.predict_ms(rows, tokens, chunks)
                   for w, (rows, tokens, chunks, _, _) in zip(weights, samples))
        return took / said if said > 1e-9 else 1.0

    def _first_ms(self, samples: list[tuple[int, int, int, int, float]], law: LinearLaw, speed: float) -> float:
        """A first chunk's cost beyond the steady `law`: the median of what each step with first
        chunks took beyond it (per first chunk), the prior's figure (at `speed`) counted as one
        more: one slow first step moves it half way, not all the way, and two agree against an
        outlier."""
        extra = [(step_ms - law.predict_ms(rows, tokens, chunks)) / firsts
                 for rows, tokens, chunks, firsts, step_ms in samples if firsts > 0]
        values = sorted([self.prior.ms_per_first * speed, *extra])
        mid = len(values) // 2
        return max(0.0, values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2.0)


def _solve_nonnegative(gram: list[list[float]], rhs: list[float]) -> list[float]:
    """argmin over theta >= 0 of theta^T G theta - 2 rhs^T theta (the regularised least squares
    of `_fit_steady`; G is positive definite): no cost can be negative. Plain least squares gave
    ms_per_row -722 from two-row steps of 900 ms and one-row steps of 1300 ms on a shared CPU,
    so a batch of more streams was predicted at 0 ms and every newcomer was admitted. With four
    unknowns every set of free coefficients is tried (the others held at 0); the best feasible
    solution is the constrained optimum."""
    n = len(rhs)
    best, best_value = [0.0] * n, 0.0  # all held at 0: value 0
    for mask in range(1, 1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        sub = [[gram[i][j] for j in free] for i in free]
        try:
            x = _solve(sub, [rhs[i] for i in free])
        except ZeroDivisionError:
            continue
        if min(x) < 0.0:
            continue
        theta = [0.0] * n
        for i, v in zip(free, x):
            theta[i] = v
        value = sum(theta[i] * gram[i][j] * theta[j] for i in range(n) for j in range(n)) \
            - 2.0 * sum(r * t for r, t in zip(rhs, theta))
        if value < best_value:
            best, best_value = theta, value
    return best


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve an n x n system by Gaussian elimination with partial pivoting (a, b are copied)."""
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    n = len(b)
    # 1. Forward elimination.
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise ZeroDivisionError("singular system")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    # 2. Back substitution.
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
