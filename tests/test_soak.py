"""A small, bounded run of the soak benchmark: its figures must show no losses."""

import pytest


@pytest.mark.slow
def test_soak_small_run_loses_nothing():
    from backend.bench.soak import bench_soak
    # 2 load clients x 40 jobs: more than the server's per-client cap (32) each, so the
    # load keeps a window of jobs in flight instead of failing at the cap
    figures = bench_soak(fuzz_cases=400, clients=12, jobs=80, load_clients=2, cancel_trials=5,
                         step_seconds=0.01, tiny=False, per_peer=False, crashes=0)
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


@pytest.mark.slow
def test_soak_per_peer_parts_hold():
    """Small runs of the per-peer parts (issue 18): strangers cannot lock a client out or
    make the server buffer their frames, a request flood does not starve others, and a
    client that never reads holds no more than the retention budget."""
    from backend.bench.peers import postauth_flood, preauth_flood, retention_nonreader
    pre = preauth_flood(holders=20, stuffers=4, stuff_mb=16, stuff_seconds=2, attempts=6)
    assert pre["slots_phase"]["legit"]["success_rate"] == 1.0
    # 4 strangers sending 16 MiB frames over and over: the server reads none of them
    # (before: hundreds of MiB)
    assert pre["memory_phase"]["rss_mb_peak"] - pre["rss_mb_start"] < 32
    post = postauth_flood(messages=20_000, rounds=5)
    assert post["flooder_never_reads"]["success_rate"] == 1.0
    assert post["flooder_reads"]["success_rate"] == 1.0
    kept = retention_nonreader(jobs=48, side=512, retention_mb=8)
    assert kept["all_jobs_ran"]
    # 48 MiB of results, 8 MiB of retention: growth stays near the budget, not the total
    assert kept["rss_mb_growth_peak"] < 8 + 20


@pytest.mark.slow
def test_soak_crash_restart_loses_nothing():
    """The server killed (SIGKILL) 5 times under a 4-client load and restarted on its job
    store: every result comes back, once, with the right pixels."""
    from backend.bench.soak import crash_restart
    crash = crash_restart(crashes=5)
    assert crash["crashes"] == 5 and crash["results_delivered"] == crash["jobs_submitted"] > 0
    assert crash["results_lost"] == 0 and crash["results_duplicated"] == 0
    assert crash["held_after_ack"] <= 5 and not crash["client_errors"]
