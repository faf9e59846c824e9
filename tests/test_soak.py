"""A small, bounded run of the soak benchmark: its figures must show no losses."""

import pytest


@pytest.mark.slow
def test_soak_small_run_loses_nothing():
    from backend.bench.soak import bench_soak
    figures = bench_soak(fuzz_cases=400, clients=12, jobs=24, load_clients=4, cancel_trials=5,
                         step_seconds=0.01, tiny=False, crashes=5)
    assert figures["fuzz"]["crashes"] == 0 and figures["fuzz"]["server_alive_after"]
    d = figures["disconnect"]
    assert d["results_lost"] == 0 and d["results_duplicated"] == 0 and not d["client_errors"]
    assert d["results_delivered"] == 12 - d["disconnect_points"].get("before_submit", 0)
    load = figures["load"]
    assert load["failures"] == 0 and load["first_half_share_min"] > 0
    assert load["rss_mb_end"] - load["rss_mb_after_tenth"] < 20  # no growth after warm-up
    assert figures["cancel"]["cancelled"] == 5
    retention = figures["retention"]
    assert retention["resume_says_expired"]
    # 20 MiB of results were held, then expired: most of it goes back to the system
    # (glibc's malloc_trim; without it RSS stayed at the high-water mark)
    held = retention["rss_mb_holding"] - retention["rss_mb_start"]
    assert retention["rss_mb_after_expiry"] - retention["rss_mb_start"] < 0.35 * held
    # the server killed 5 times under a 4-client load: every result comes back, once
    crash = figures["crash_restart"]
    assert crash["crashes"] == 5 and crash["results_delivered"] == crash["jobs_submitted"] > 0
    assert crash["results_lost"] == 0 and crash["results_duplicated"] == 0
    assert crash["held_after_ack"] <= 5 and not crash["client_errors"]
