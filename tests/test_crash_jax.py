from tests.crashlib import crash_and_resume


def test_kill_9_twenty_times_then_resume_is_bitwise_identical_jax(tmp_path):
    crash_and_resume("jax", tmp_path, kills=20, seed=1)
