import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one compute thread each. torch's OpenMP threads spin-wait; two
    # processes each spinning on both cores run a torch step ~10x slower than one thread each.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tokenize the built-in corpus once per session, into a temp cache (not the user's)."""
    os.environ.setdefault("TRICHIP_CACHE", str(tmp_path_factory.mktemp("cache")))


def compose(overrides=()):
    """The run config exactly as `python -m launch.train OVERRIDES` would build it, as a plain dict."""
    from configs.schema import compose as compose_run
    cfg = compose_run(overrides)
    cfg.pop("run_dir", None)
    return cfg


def train(run_dir, *overrides):
    from trainer.loop import train as run_training
    return run_training(compose(overrides), run_dir)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cli(module, *args, cwd=None, timeout=600):
    """Run `python -m module args...` as a user would; returns CompletedProcess (text)."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# The slow tests: each started subprocess trainings, torchrun or several processes, trained in a module
# fixture it needs, or took over ~5 s of its own in a timed run of the whole suite
# (`pytest --durations=0 -n 2 --dist loadfile` on a shared 2-core machine). `pytest -m "not slow"` leaves
# them out for a fast inner loop. Named by module and function (every parametrization); tests written
# since carry @pytest.mark.slow themselves.
SLOW = {
    "test_bad_input_properties.py": {"test_bad_overrides_are_one_line_errors"},
    "test_checkpoint.py": {"test_async_and_sync_saves_write_the_same_checkpoints",
                           "test_async_snapshot_is_the_state_when_taken",
                           "test_digest_is_the_reference_value_under_any_sharding"},
    "test_cli.py": {"test_default_training_beats_the_unigram_baseline", "test_prepare_data_then_train_on_it",
                    "test_checkpoint_of_another_model_shape_is_refused",
                    "test_resume_after_the_end_does_nothing_and_keeps_the_checkpoint", "test_tensorboard_and_mfu"},
    "test_config_schema.py": {"test_a_wrong_type_or_member_is_one_line", "test_a_value_outside_its_range_is_one_line"},
    "test_crash_jax.py": {"test_kill_9_twenty_times_then_resume_is_bitwise_identical_jax"},
    "test_crash_torch.py": {"test_kill_9_twenty_times_then_resume_is_bitwise_identical_torch"},
    "test_frozen_format.py": {"test_training_resumes_from_the_fixture_on_both_frameworks",
                              "test_the_fixture_verifies_with_the_cli_and_a_damaged_copy_does_not",
                              "test_the_fixture_tensors_have_the_digests_its_manifest_records"},
    "test_hf_convert.py": {"test_imported_model_matches_transformers_on_both_frameworks",
                           "test_cli_from_hf_inspect_verify_score_compare",
                           "test_verify_and_to_hf_detect_a_damaged_checkpoint",
                           "test_cli_errors_are_one_line_and_leave_nothing",
                           "test_trained_checkpoint_exports_and_imports_unchanged",
                           "test_init_from_a_hugging_face_directory"},
    "test_launch_tools.py": {"test_labels_come_from_checkpoint_then_config_then_dir_name",
                             "test_plot_two_runs_writes_a_png_with_both_curves", "test_plot_errors_are_one_line"},
    "test_object_store.py": {"test_train_on_s3_killed_then_resumed_on_torch", "test_copy_s3_to_local_to_s3_verified",
                             "test_damaged_remote_checkpoint_is_detected",
                             "test_resume_skips_damaged_and_incomplete_remote_checkpoints",
                             "test_missing_credentials_one_line_and_nothing_written", "test_unknown_bucket_one_line"},
    "test_optimizer_reference.py": {"test_first_update_bias_corrected_without_clipping",
                                    "test_later_update_with_and_without_clipping",
                                    "test_eps_sits_outside_the_square_root",
                                    "test_weight_decay_is_decoupled_and_on_2d_weights_only",
                                    "test_accumulated_micro_batches_equal_one_full_batch"},
    "test_parity.py": {"test_same_loss_curve", "test_checkpoint_records_who_wrote_it", "test_resume_from_step_50",
                       "test_init_from_another_runs_checkpoint"},
    "test_readme.py": {"test_readme_commands_work"},
    "test_reliability.py": {"test_preemption_signal_checkpoints_and_exits_0",
                            "test_second_signal_exits_at_once_without_damage",
                            "test_damaged_checkpoint_falls_back_with_a_warning",
                            "test_a_save_that_fails_half_way_keeps_earlier_checkpoints",
                            "test_a_background_save_that_fails_stops_with_its_step",
                            "test_nonfinite_loss_stop_or_skip", "test_second_run_on_the_same_dir_is_refused",
                            "test_preemption_of_one_rank_stops_all_ranks_at_the_same_step"},
    "test_scale.py": {"test_jax_mesh_on_8_devices_equals_single_device",
                      "test_fsdp2_two_processes_equals_single_process", "test_fsdp2_hybrid_sharding",
                      "test_multiprocess_jax_trains_and_checkpoints",
                      "test_jax_8_devices_to_torch_2_processes_and_back",
                      "test_activation_checkpointing_computes_the_same", "test_bf16_fsdp2_mixed_precision_trains"},
    "test_trainium_and_static_shapes.py": {"test_jax_train_step_compiles_once_in_50_steps",
                                           "test_torch_compile_does_not_recompile_in_50_steps",
                                           "test_precompile_trial_run_writes_nothing",
                                           "test_asking_for_a_gpu_here_fails_in_one_line", "test_info_lists_targets"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
