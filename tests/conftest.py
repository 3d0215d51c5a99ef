"""Shared fixtures. `served_workspace`: one tiny workspace whose runs are logged through a real
MLflow server started by `shodh ui` (tests/eval_workspace.py builds it); the evaluation and UI
tests share it so the pipeline runs once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_START_S = 120  # mlflow server imports for ~15 s on an idle 2-core box; far more under load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_unless_ci(reason: str) -> None:
    """A missing system component: skip with the reason locally, fail under CI=true (.ci/run installs
    everything, so a skip there would hide a test that checks nothing)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait until the MLflow server at `url` (process `proc`, output in `log`) answers /health."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"MLflow server not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny synthetic latent workspace (tests/latent_fixture.py), one per test module that asks for it
    (a module may define its own `root` with other shard counts, as test_loader.py does)."""
    from latent_fixture import make_latents

    root = tmp_path_factory.mktemp("work")
    make_latents(root)
    return root


@pytest.fixture(scope="session")
def served_workspace(tmp_path_factory):
    """(root, {"moe": run_dir, "dense": run_dir}, server url), built once per session."""
    import eval_workspace

    root = tmp_path_factory.mktemp("served")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shodh", "ui", "--root", str(root), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        wait_healthy(url, proc, log)
        os.environ["MLFLOW_TRACKING_URI"] = url  # every stage logs through the server
        runs = eval_workspace.build(root)
        yield root, runs, url
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------ `make test-fast` (pytest -m fast)
# In-process tests that each take well under 5 s on 2 cores (measured with --durations=0): whole
# files, minus the slow tests named in FAST_EXCLUDED, plus named tests from otherwise slow files.
# A new test in a FAST_FILES file is fast by default; keep it that way or add it to FAST_EXCLUDED.
FAST_FILES = {"test_config.py", "test_distributed.py", "test_eval_metrics.py", "test_loader.py",
              "test_model.py", "test_packaging.py", "test_physics.py"}
FAST_EXCLUDED = {"test_channel_meets_the_law_of_the_wall_and_the_bulk_correlation",  # ~8 s
                 "test_porous_darcy_linearity_and_solid_leak",  # ~10 s
                 "test_porous_permeability_does_not_depend_on_the_time_step",  # ~12 s
                 "test_sphere_array_drag_matches_zick_homsy_and_converges"}  # ~10 s
FAST_TESTS = {
    "test_reshard.py": {"test_a_resume_that_extends_max_steps_runs_on_the_new_schedule"},
    "test_tokenizer.py": {"test_curl_of_random_potential_is_divergence_free",
                          "test_operators_match_analytic_derivatives",
                          "test_decoder_output_for_random_latents_is_divergence_free",
                          "test_constant_mean_flow_is_representable",
                          "test_windows_cover_every_consecutive_pair_once",
                          "test_config_errors_name_the_field"},
    "test_import.py": {"test_mirror_extension_keeps_divergence_at_round_off", "test_solid_padding_marks_the_padding_solid",
                       "test_divergent_data_is_refused_with_figures_or_projected",
                       "test_a_staggered_tokenizer_measures_with_its_own_operator",
                       "test_refusals_name_file_dataset_and_trajectory", "test_open_axis_imports_with_allow_open",
                       "test_2d_file_from_the_wells_own_writer_is_refused", "test_npy_and_hdf5_arrays",
                       "test_reimport_replaces_the_domain_and_keeps_the_others", "test_cli_import_and_one_line_errors",
                       "test_vrmse_and_nrmse_equal_the_wells_implementation"},
    "test_plan.py": {"test_paper_plan_on_4x8_fits_and_states_its_terms",
                     "test_layout_that_does_not_fit_is_refused_naming_term_and_knob",
                     "test_world_that_ep_size_does_not_divide_is_refused"},
    "test_study.py": {"test_worse_arm_gives_positive_nt", "test_conflict_cosine_normalization",
                      "test_conflict_of_a_real_gradient_with_itself_is_one",
                      "test_domain_label_reaches_only_the_oracle_router"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        file, name = item.path.name, getattr(item, "originalname", item.name)
        if (file in FAST_FILES and name not in FAST_EXCLUDED) or name in FAST_TESTS.get(file, ()):
            item.add_marker(pytest.mark.fast)
