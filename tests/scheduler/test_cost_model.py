"""The step cost model: a conservative prior first, then an online fit of a linear law."""

from __future__ import annotations

import random

import pytest

from streamdiff.scheduler import FixedCostModel, LinearLaw, OnlineCostModel

TRUE_LAW = LinearLaw(base_ms=12.0, ms_per_row=3.0, ms_per_ktoken=2.5)


def _noisy_samples(n: int, seed: int, law: LinearLaw = TRUE_LAW, noise_ms: float = 1.0):
    rng = random.Random(seed)
    for _ in range(n):
        rows = rng.randint(1, 32)
        tokens = rows * rng.choice([256, 1024, 1560, 4096])  # mixed frame sizes: not collinear
        yield rows, tokens, law.predict_ms(rows, tokens) + rng.gauss(0.0, noise_ms)


def test_converges_to_known_linear_law_from_noisy_samples():
    model = OnlineCostModel(prior=LinearLaw(50.0, 10.0, 10.0), window=256)
    for rows, tokens, step_ms in _noisy_samples(256, seed=0):
        model.observe(rows, tokens, step_ms)
    fit = model.law
    assert fit.base_ms == pytest.approx(TRUE_LAW.base_ms, abs=1.0)
    assert fit.ms_per_row == pytest.approx(TRUE_LAW.ms_per_row, abs=0.15)
    assert fit.ms_per_ktoken == pytest.approx(TRUE_LAW.ms_per_ktoken, abs=0.05)
    # The margin is a high quantile of residuals: fresh samples from the same law fall under
    # the conservative prediction about 95% of the time, and the margin stays small.
    fresh = list(_noisy_samples(2000, seed=1))
    covered = sum(step_ms <= model.predict_ms(rows, tokens) for rows, tokens, step_ms in fresh)
    assert covered / len(fresh) >= 0.88
    assert 0.0 < model.margin < 0.2
    assert model.mean_ms(8, 8192) == pytest.approx(TRUE_LAW.predict_ms(8, 8192), rel=0.02)


def test_prior_is_conservative_before_enough_samples():
    prior = LinearLaw(40.0, 5.0, 5.0)
    model = OnlineCostModel(prior=prior, min_samples=8, prior_margin=0.25)
    assert not model.calibrated
    assert model.predict_ms(4, 4096) == pytest.approx(prior.predict_ms(4, 4096) * 1.25)
    # A few fast samples do not pull the prediction below the prior yet ...
    for rows, tokens, step_ms in _noisy_samples(7, seed=2):
        model.observe(rows, tokens, step_ms)
    assert model.predict_ms(4, 4096) >= prior.predict_ms(4, 4096) * 1.25
    # ... enough of them do.
    for rows, tokens, step_ms in _noisy_samples(40, seed=3):
        model.observe(rows, tokens, step_ms)
    assert model.calibrated
    assert model.predict_ms(4, 4096) < prior.predict_ms(4, 4096)


def test_collinear_rows_and_tokens_still_predict_the_seen_line():
    # Every stream at 512x512: tokens = 1024 * rows, so rows and tokens cannot be told apart.
    model = OnlineCostModel(prior=LinearLaw(30.0, 4.0, 8.0))
    rng = random.Random(4)
    for _ in range(100):
        rows = rng.randint(1, 16)
        model.observe(rows, 1024 * rows, TRUE_LAW.predict_ms(rows, 1024 * rows) + rng.gauss(0, 0.5))
    for rows in (1, 4, 16):
        assert model.mean_ms(rows, 1024 * rows) == pytest.approx(TRUE_LAW.predict_ms(rows, 1024 * rows), rel=0.05)


def test_window_follows_a_drifting_gpu():
    model = OnlineCostModel(prior=TRUE_LAW, window=64)
    for rows, tokens, step_ms in _noisy_samples(64, seed=5):
        model.observe(rows, tokens, step_ms)
    slower = LinearLaw(24.0, 6.0, 5.0)  # the GPU got twice as slow (thermal, a neighbour)
    for rows, tokens, step_ms in _noisy_samples(64, seed=6, law=slower):
        model.observe(rows, tokens, step_ms)
    assert model.mean_ms(8, 8192) == pytest.approx(slower.predict_ms(8, 8192), rel=0.05)


def test_fixed_cost_model_never_learns():
    model = FixedCostModel(LinearLaw(10.0, 1.0, 0.0), margin=0.1)
    model.observe(4, 100, 999.0)
    assert model.samples == 1
    assert model.predict_ms(4, 100) == pytest.approx(14.0 * 1.1)


def test_bad_samples_are_ignored():
    model = OnlineCostModel()
    model.observe(0, 0, 10.0)
    model.observe(2, 100, -1.0)
    assert model.samples == 0


def test_no_coefficient_of_the_fit_goes_negative():
    """Found by a probe (--stages 2, a shared CPU): one-row steps ran slower than two-row steps,
    least squares gave ms_per_row = -722, a batch of 6 rows was predicted at 0 ms and every
    newcomer was admitted with a promise of 0 ms steps."""
    rng = random.Random(0)
    model = OnlineCostModel(prior=LinearLaw(30.0, 4.0, 8.0))
    samples = [(2, 32, rng.gauss(900.0, 40.0)) for _ in range(20)] + [(1, 16, rng.gauss(1300.0, 60.0)) for _ in range(12)]
    for rows, tokens, step_ms in samples:
        model.observe(rows, tokens, step_ms)
    law = model.law
    assert min(law.as_list()) >= 0.0, law
    # more rows never cost less, and no batch is predicted below what such steps took
    predictions = [model.mean_ms(rows, 16 * rows) for rows in (1, 2, 4, 6)]
    assert predictions == sorted(predictions) and predictions[0] >= 850.0, predictions
    # where plain least squares is feasible it is unchanged (the law of the first test)
    free = OnlineCostModel(prior=LinearLaw(50.0, 10.0, 10.0), window=256)
    for rows, tokens, step_ms in _noisy_samples(256, seed=0):
        free.observe(rows, tokens, step_ms)
    assert free.law.ms_per_row == pytest.approx(TRUE_LAW.ms_per_row, abs=0.15)


def test_a_chunk_costs_once_whatever_its_denoise_steps():
    """A stream's chunk is encoded and decoded once, its rows (one per denoise step) each run
    the DiT: from streams of 1 and 3 steps the law tells the two apart, and predicts a 3-step
    stream's plans at what they cost (the served demo: about 100 ms a 1-step row, 35 a row of a
    3-step stream), where a law in rows alone is off for one or the other."""
    law = LinearLaw(base_ms=5.0, ms_per_row=25.0, ms_per_ktoken=0.0, ms_per_chunk=75.0)
    model = OnlineCostModel()
    rng = random.Random(7)
    for _ in range(120):
        streams, steps = rng.randint(1, 4), rng.choice([1, 3])
        rows, chunks = streams * steps, streams
        model.observe(rows, 256 * rows, law.predict_ms(rows, 256 * rows, chunks) + rng.gauss(0, 2.0), chunks)
    for rows, chunks in ((1, 1), (4, 4), (3, 1), (9, 3), (7, 3)):
        assert model.mean_ms(rows, 256 * rows, chunks) == pytest.approx(law.predict_ms(rows, 256 * rows, chunks), rel=0.05)
    # 1-step streams only (rows = chunks): the prior splits a row's cost between its DiT step and
    # its chunk, so a 3-step newcomer is predicted under 3 x a 1-step stream, over 1 x.
    ones = OnlineCostModel()
    for _ in range(120):
        n = rng.randint(1, 4)
        ones.observe(n, 256 * n, law.predict_ms(n, 256 * n, n) + rng.gauss(0, 2.0), n)
    one, three = ones.mean_ms(1, 256, 1), ones.mean_ms(3, 768, 1)
    assert one * 1.2 < three < one * 2.9


def test_one_slow_first_chunk_neither_sets_the_first_chunk_cost_nor_the_token_cost():
    """A probe: one first-chunk step of 1.5 s on a busy CPU among 127 steps of 120-400 ms was the
    only sample with more tokens and a first chunk, so it set both coefficients (0 ms base, 867
    ms/ktoken, 1055 ms a first chunk): a two-stream step was predicted at 3.1 s and newcomers were
    refused for 50 s while the real steps took 220-440 ms. Steps with first chunks now only measure
    a first chunk's extra cost, and the median with the prior's figure holds off one outlier."""
    prior = LinearLaw(base_ms=40.0, ms_per_row=30.0, ms_per_ktoken=60.0, ms_per_chunk=30.0, ms_per_first=150.0)

    def served(extra_firsts: list[float]) -> OnlineCostModel:
        model, rng = OnlineCostModel(prior=prior), random.Random(11)
        for _ in range(127):
            model.observe(1, 256, rng.choice([120.0, 150.0, 180.0, 200.0, 250.0, 300.0, 400.0]), 1)
        for step_ms in extra_firsts:
            model.observe(1, 512, step_ms, 1, 1)
        return model

    plain, slow = served([]), served([1500.0])
    assert slow.law.as_list()[:4] == pytest.approx(plain.law.as_list()[:4], rel=0.05)
    # the prior's figure (at the speed the steps show) and the slow step's: half way
    beyond, usual = 1500.0 - slow.law.predict_ms(1, 512, 1), plain.law.ms_per_first
    assert usual < beyond / 2
    assert slow.law.ms_per_first == pytest.approx((usual + beyond) / 2, rel=0.01)
    # a second, ordinary first chunk outvotes the slow one
    both = served([1500.0, slow.law.predict_ms(1, 512, 1) + 0.9 * usual])
    assert both.law.ms_per_first == pytest.approx(usual, rel=0.01)


def test_after_a_burst_of_slow_steps_predictions_come_back_within_tens_of_steps():
    """A probe: two busy loops on the server's CPUs for 12 s made one stream's steps 315-416 ms; 46 s
    after they ended (steps back at 90 ms) a two-stream step was still predicted at 1 s, and newcomers
    at a 2 s deadline were refused: the margin (p95 of the window's residuals) grew as the fit came
    down, and the fit held the burst until it left the 128-step window."""
    rng = random.Random(3)
    model = OnlineCostModel(prior=LinearLaw(20.0, 30.0, 20.0, 20.0, 100.0))
    for _ in range(30):
        model.observe(1, 384, rng.uniform(75.0, 95.0), 1)
    calm_ms = model.predict_ms(2, 768, 2)
    for _ in range(45):  # the busy machine
        model.observe(1, 384, rng.choice([250.0, 330.0, 380.0, 450.0, 550.0, 600.0]), 1)
    busy_ms = model.predict_ms(2, 768, 2)
    assert busy_ms > 4 * calm_ms  # while it lasts, the prediction follows it
    for _ in range(45):  # 18 s of calm at 2.5 steps a second: the burst is still in the window
        model.observe(1, 384, rng.uniform(75.0, 90.0), 1)
    assert model.predict_ms(2, 768, 2) < 2.5 * calm_ms < busy_ms / 2


def test_steps_of_one_shape_scale_the_prior_instead_of_zeroing_its_marginal_costs():
    """Steps of one shape (one stream) say how fast this machine runs, not how a step's cost splits
    between its base, rows, tokens and chunks: that split stays the prior's. Pulled toward the prior
    itself, steps faster than it drove the row, token and chunk costs to 0 (a CI run: a second
    stream was predicted to cost nothing and the first stream's figures did not move)."""
    prior = LinearLaw(base_ms=20.0, ms_per_row=30.0, ms_per_ktoken=60.0, ms_per_chunk=30.0, ms_per_first=50.0)
    for speed in (0.4, 2.5):
        model, rng = OnlineCostModel(prior=prior), random.Random(5)
        for _ in range(100):
            model.observe(1, 256, speed * prior.predict_ms(1, 256, 1) * rng.uniform(0.97, 1.03), 1)
        for rows, tokens, chunks in ((1, 256, 1), (2, 512, 2), (4, 1024, 4), (3, 768, 1)):
            assert model.mean_ms(rows, tokens, chunks) == pytest.approx(speed * prior.predict_ms(rows, tokens, chunks),
                                                                        rel=0.05), (speed, rows)
        assert model.law.ms_per_first == pytest.approx(speed * prior.ms_per_first, rel=0.05)
