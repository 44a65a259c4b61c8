from tests.crashlib import crash_and_resume


def test_kill_9_twenty_times_then_resume_is_bitwise_identical_torch(tmp_path):
    crash_and_resume("torch", tmp_path, kills=20, seed=2)
