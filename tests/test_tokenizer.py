"""Divergence-free tokenizer: operators, decoder structure, train -> encode -> decode, CLI errors.

One tiny 32^3 raw dataset is simulated once per session (short spin-up; the tokenizer does not
care whether the channel is fully turbulent) and copied where a test modifies it.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shodh import cli
from shodh.config import load_config
from shodh.errors import ConfigError, DataError
from shodh.fields import spectral
from shodh.fields.metrics import energy_spectrum_BS, shells_and_weights_XYH, vrmse_BC
from shodh.fields.normalization import Normalization
from shodh.io import iter_shard, read_json, sha256_file, sha256_json
from shodh.physics import simulate
from shodh.physics.solver import band_limit
from shodh.tokenizer import load_tokenizer
from shodh.tokenizer.encode import windows
from shodh.tokenizer.model import TokenizerNet, build_net, velocity, window_taper

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = ["--profile", "smoke"]
# Short and single-threaded: the test machine is small and shared.
FAST = ["tracking.mlflow=false", "tokenizer.steps=100", "tokenizer.threads=1", "tokenizer.warmup=5"]


def _sim_overrides() -> list[str]:
    return ["sim.trajectories.train=2", "sim.trajectories.val=1", "sim.trajectories.test=1", "sim.frames=3",
            "sim.channel.spinup_time=1.0", "sim.channel.settle_time=0.5", "sim.channel.decorrelation_time=0.5",
            "sim.porous.spinup_time=1.0",
            "sim.threads=1"]


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "ws"
    cfg = load_config("smoke", _sim_overrides())
    simulate.run(cfg.sim, cfg.seed, root)
    return root


@pytest.fixture(scope="session")
def trained_root(raw_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "trained"
    shutil.copytree(raw_root, root)
    assert cli.main(["train-tokenizer", *SMOKE, "--root", str(root), *_sim_overrides(), *FAST]) == 0
    assert cli.main(["encode", *SMOKE, "--root", str(root), *_sim_overrides(), *FAST]) == 0
    return root


# ---------------------------------------------------------------- operators


@pytest.mark.parametrize("operator", spectral.OPERATORS)
@pytest.mark.parametrize("n", [32, 64])
def test_curl_of_random_potential_is_divergence_free(operator, n):
    a = torch.randn(2, 3, n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    u = spectral.curl(a, operator)
    stats = spectral.divergence_stats(u, operator)
    assert stats["grad_rms"] > 1.0  # a real, non-trivial field
    assert stats["rel_max"] <= 1e-12 and stats["rel_rms"] <= 1e-13


def test_operators_match_analytic_derivatives():
    n = 32
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    a = torch.stack([torch.zeros_like(X), torch.zeros_like(X), torch.sin(2 * X) * torch.cos(Y)])
    # curl (0, 0, f) = (df/dy, -df/dx, 0)
    exact = torch.stack([-torch.sin(2 * X) * torch.sin(Y), -2 * torch.cos(2 * X) * torch.cos(Y), torch.zeros_like(X)])
    assert torch.allclose(spectral.curl(a, "spectral"), exact, atol=1e-12)
    # forward differences: first order, error ~ k^2 dx / 2
    err = (spectral.curl(a, "staggered") - exact).abs().max()
    assert 1e-3 < err < 0.5
    u_div = torch.stack([torch.sin(X), torch.zeros_like(X), torch.zeros_like(X)])
    assert torch.allclose(spectral.divergence(u_div, "spectral"), torch.cos(X), atol=1e-12)


# ---------------------------------------------------------------- decoder structure


@pytest.mark.parametrize("operator", spectral.OPERATORS)
def test_decoder_output_for_random_latents_is_divergence_free(operator):
    torch.manual_seed(0)
    net = TokenizerNet(32, channels=4, width=8, hidden=16, blocks=1)
    mask = torch.zeros(2, 32, 32, 32)
    mask[:, :, :, :4] = 1
    with torch.no_grad():
        w = net.decode(torch.randn(2, 4, 16, 16, 16), mask)
    u = velocity(w.double(), operator)
    assert u.dtype == torch.float64
    stats = spectral.divergence_stats(u, operator)
    assert stats["grad_rms"] > 0 and stats["rel_max"] <= 1e-12


def test_constant_mean_flow_is_representable():
    """A decoder output that is constant decodes to exactly that uniform flow, in physical units."""
    torch.manual_seed(0)
    net = TokenizerNet(32, channels=4, width=8, hidden=16, blocks=1)
    target = torch.tensor([0.7, -0.2, 0.05])
    with torch.no_grad():
        net.dec_out[-1].weight.zero_()
        # one window's features are (a e f c p q r): halves of each axis, then component-major
        net.dec_out[-1].bias.copy_(target.repeat_interleave((2 * net.p) ** 3 // 8).repeat(8))
        z = torch.randn(1, 4, 16, 16, 16)
        z[:, :3] = 0  # no low-pass velocity: the learned windows alone
        w = net.decode(z, torch.zeros(1, 32, 32, 32))
    norm = Normalization.from_raw_stats({"channel": {"mean": [1.0, 0.0, 0.0], "std": [0.3, 0.1, 0.1]}})
    u = norm.denormalize(velocity(w.double(), "spectral"), "channel")
    expected = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + norm.scale["channel"] * target.double()
    assert torch.allclose(u, expected.view(1, 3, 1, 1, 1).expand_as(u), atol=1e-7)
    # the curl part never carries a mean: the field mean is the mean-flow term alone
    w_rand = torch.randn(1, 3, 32, 32, 32, dtype=torch.float64) + target.double().view(1, 3, 1, 1, 1)
    for operator in spectral.OPERATORS:
        assert torch.allclose(velocity(w_rand, operator).mean(dim=(-3, -2, -1)), w_rand.mean(dim=(-3, -2, -1)), atol=1e-12)
    # spectrally, mean + curl(Biot–Savart(w)) is the Leray projection of w: a solenoidal w comes back unchanged
    w_solenoidal = spectral.curl(torch.randn(1, 3, 32, 32, 32, dtype=torch.float64), "spectral") + 0.3
    assert torch.allclose(velocity(w_solenoidal, "spectral"), w_solenoidal, atol=1e-10)


@pytest.mark.parametrize("grid", [16, 32, 48, 64])
def test_decoder_windows_blend_into_a_partition_of_unity_centred_on_their_patch(grid):
    """Each latent voxel's window covers [p j - p/2, p j + 3p/2) per axis with weights that
    fall to sin²(π / 4p) at its edges, and the windows sum to 1 everywhere: no cell sits on a
    seam between independently decoded patches."""
    net = TokenizerNet(grid, channels=4, width=8, hidden=16, blocks=1)
    p, k = net.p, 3 * (2 * net.p) ** 3
    ones = net._overlap_add(torch.ones(1, 16, 16, 16, k) * net.taper_K)
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-6)
    one = torch.zeros(1, 16, 16, 16, k)
    one[0, 5, 7, 9] = net.taper_K
    field = net._overlap_add(one)[0, 0]
    support = field.nonzero()
    lo, hi = (torch.tensor([5, 7, 9]) * p - p // 2), (torch.tensor([5, 7, 9]) * p - p // 2 + 2 * p - 1)
    assert torch.equal(support.min(0).values, lo) and torch.equal(support.max(0).values, hi)
    taper = window_taper(p)
    assert torch.allclose(taper + taper.roll(p), torch.ones(2 * p, dtype=torch.float64))
    edge = float(field[lo[0], lo[1] + p, lo[2] + p])  # an edge cell of the window, mid-window on y and z
    assert edge == pytest.approx(float(taper[0] * taper[p] ** 2), rel=1e-5)
    assert float(taper[0]) == pytest.approx(math.sin(math.pi / (4 * p)) ** 2)  # 0.5 at p = 1, 0.04 at p = 4


def test_decoder_is_equivariant_to_shifts_by_one_latent_voxel():
    """Rolling latent and mask by one voxel rolls the decoded field by one patch (p cells)."""
    torch.manual_seed(0)
    net = TokenizerNet(32, channels=4, width=8, hidden=16, blocks=1)
    z = torch.randn(1, 4, 16, 16, 16)
    mask = (torch.rand(1, 32, 32, 32) > 0.8).float()
    with torch.no_grad():
        w = net.decode(z, mask)
        w_shifted = net.decode(z.roll(3, dims=-1), mask.roll(3 * net.p, dims=-1))
    assert torch.allclose(w_shifted, w.roll(3 * net.p, dims=-1), atol=1e-5)


def test_low_pass_channels_carry_the_large_scales_exactly():
    """Latent channels 0..2 are the velocity's modes |k_i| < 8: for a field holding only those,
    its point samples on the 16^3 grid; the decoder adds them back, so with the learned
    windows silent such a field round-trips to float32 round-off."""
    torch.manual_seed(0)
    net = TokenizerNet(32, channels=5, width=8, hidden=16, blocks=1)
    v = spectral.SpectralGrid(32).random_solenoidal(6.0, 1.0, torch.Generator().manual_seed(1))[None].float()
    mask = (torch.rand(1, 32, 32, 32) > 0.8).float()
    with torch.no_grad():
        z = net.encode(v, mask)
        assert z.shape == (1, 5, 16, 16, 16)
        assert torch.allclose(z[0, :3], v[0, :, ::2, ::2, ::2], atol=1e-5)
        net.dec_out[-1].weight.zero_()
        net.dec_out[-1].bias.zero_()
        assert torch.allclose(net.decode(z, mask), v, atol=1e-5)
        z[:, :3] = 0
        assert float(net.decode(z, mask).abs().max()) == 0.0


@pytest.mark.parametrize("operator", spectral.OPERATORS)
def test_band_limited_decoder_puts_no_energy_past_the_band(operator):
    """With band K the decoded field has no mode with |k_i| > K (the solver's 2/3 rule keeps
    K = (N - 1) // 3) and stays divergence-free; without a band the decoder fills every mode."""
    torch.manual_seed(0)
    n = 32
    w = torch.randn(1, 3, n, n, n, dtype=torch.float64)
    outside = 1 - spectral.band_mask(n, band_limit(n))
    for band, empty in ((band_limit(n), True), (None, False)):
        net = TokenizerNet(n, channels=4, width=8, hidden=16, blocks=1, band=band, operator=operator)
        u = net.velocity(w)
        power_past = float((spectral.fft(u).abs() ** 2 * outside).sum() / (spectral.fft(u).abs() ** 2).sum())
        assert (power_past < 1e-28) == empty, (band, power_past)
        assert spectral.divergence_stats(u, operator)["rel_max"] <= 1e-12
    # the spectral operator's one-transform-pair form is the curl of the Biot–Savart potential
    for band in (None, 7):
        assert torch.allclose(spectral.solenoidal_part(w, band=band),
                              spectral.curl(spectral.biot_savart(w, band=band), "spectral"), atol=1e-12)


def test_spectral_gain_scales_each_shell_and_keeps_the_field_divergence_free():
    """`model.equalize` multiplies shell k's energy by gain_k² exactly, keeps the mean (shell 0)
    and, being a real Fourier multiplier, keeps the field divergence-free and band-limited."""
    from shodh.fields.metrics import energy_spectrum_BS
    from shodh.tokenizer.model import equalize, gain_multiplier

    n, band = 32, 10
    w = torch.randn(2, 3, n, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u = 0.3 + spectral.solenoidal_part(w, band=band)
    e_S = energy_spectrum_BS(u)
    gain_S = 1 + torch.rand(e_S.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gain_S[0] = 1.0
    lifted = equalize(u, gain_multiplier(gain_S, n))
    assert torch.allclose(energy_spectrum_BS(lifted), e_S * gain_S**2, rtol=1e-10, atol=1e-20)
    assert torch.allclose(lifted.mean(dim=(-3, -2, -1)), u.mean(dim=(-3, -2, -1)), atol=1e-14)
    assert spectral.divergence_stats(lifted, "spectral")["rel_max"] <= 1e-12
    # projecting onto divergence-free fields within the band changes nothing
    mean_BC111 = lifted.mean(dim=(-3, -2, -1), keepdim=True)
    assert torch.allclose(mean_BC111 + spectral.solenoidal_part(lifted, band=band), lifted, atol=1e-12)


def test_reconstruction_loss_weighs_solid_cells_and_components():
    """The same error costs solid_weight times as much in a solid cell as in a fluid one, and
    each component's error is divided by its variance (weight = 1/σ²)."""
    from shodh.tokenizer.config import TokenizerConfig
    from shodh.tokenizer.train import reconstruction_loss

    n = 32
    truth = torch.zeros(1, 3, n, n, n)
    mask = torch.zeros(1, n, n, n)
    mask[0, :, :, :4] = 1  # a wall
    weight = torch.tensor([1.0, 1.0, 4.0]).view(1, 3, 1, 1, 1)
    cfg = TokenizerConfig(solid_weight=4.0)

    def cost(cell, component=0):
        err = truth.clone()
        err[0, component, cell[0], cell[1], cell[2]] = 1.0
        return float(reconstruction_loss(err, truth, mask, weight, cfg))

    fluid, solid = cost((5, 5, 10)), cost((5, 5, 1))
    assert fluid > 0 and solid == pytest.approx(4.0 * fluid)
    assert cost((5, 5, 10), component=2) == pytest.approx(4.0 * fluid)
    uniform = TokenizerConfig(solid_weight=1.0)
    err = torch.randn(1, 3, n, n, n)
    assert float(reconstruction_loss(err, truth, mask, torch.ones(1, 3, 1, 1, 1), uniform)) == \
        pytest.approx(float(err.pow(2).mean()), rel=1e-6)


def test_patch_artifact_measures_see_blocks_and_not_smooth_fields():
    """seam_ratio and the patch comb, the two measures of patch artifacts the tokenizer logs:
    a field of independent per-patch blocks has seams and puts energy on the comb; a smooth
    field below the comb has neither."""
    from shodh.tokenizer.train import patch_comb_XYH, seam_ratio

    torch.manual_seed(0)
    n, p = 32, 2
    blocks = torch.randn(1, 3, n // p, n // p, n // p).repeat_interleave(p, -3).repeat_interleave(p, -2)
    blocks = blocks.repeat_interleave(p, -1)
    smooth = spectral.curl(spectral.biot_savart(torch.randn(1, 3, n, n, n), band=6), "spectral")
    assert seam_ratio(blocks, p) > 5 and seam_ratio(smooth, p) == pytest.approx(1.0, abs=0.1)
    comb = patch_comb_XYH(n, p)
    repeated = torch.randn(1, 3, p, p, p).repeat(1, 1, n // p, n // p, n // p)  # one pattern in every patch
    fluctuation = repeated - repeated.mean((-3, -2, -1), keepdim=True)
    on_comb = energy_spectrum_BS(repeated, comb).sum() / energy_spectrum_BS(fluctuation).sum()
    assert float(on_comb) == pytest.approx(1.0, rel=1e-6)
    assert float(energy_spectrum_BS(smooth, comb).sum()) < 1e-10 * float(energy_spectrum_BS(smooth).sum())


def test_data_band_follows_the_data_source():
    from shodh.tokenizer.data import data_band

    simulated = {"grid": 64, "generator": {"solver": simulate.SOLVER_VERSION}}
    assert data_band(simulated) == 21 == band_limit(64)
    assert data_band({**simulated, "imported": ["well"]}) is None  # imported fields may fill every mode
    assert data_band({"grid": 64, "imported": ["well"]}) is None


def test_windows_cover_every_consecutive_pair_once():
    for frames in range(2, 12):
        for window in (2, 3, 4):
            spans = windows(frames, window)
            pairs = [(t, t + 1) for t0, t1 in spans for t in range(t0, t1 - 1)]
            assert sorted(pairs) == [(t, t + 1) for t in range(frames - 1)]
            assert all(2 <= t1 - t0 <= window for t0, t1 in spans)
    assert windows(8, 4) == [(0, 4), (3, 7), (6, 8)]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"tokenizer\.window"):
        load_config("smoke", ["tokenizer.window=1"])
    with pytest.raises(ConfigError, match=r"tokenizer\.operator"):
        load_config("smoke", ["tokenizer.operator=finite"])
    with pytest.raises(ConfigError, match=r"tokenizer\.channels: must be > 3 \(channels 0\.\.2 hold the low-pass"):
        load_config("smoke", ["tokenizer.channels=3"])


# ---------------------------------------------------------------- train -> encode -> decode


def _initial_net(root: Path) -> TokenizerNet:
    cfg = load_config("smoke", [*_sim_overrides(), *FAST])
    torch.manual_seed(cfg.seed)  # train.py seeds the same way before building the network
    return build_net({**cfg.tokenizer.architecture(), "band": band_limit(32)}, 32)


def _val_frames(root: Path):
    manifest = read_json(root / "raw" / "manifest.json")
    for shard in manifest["shards"]:
        if shard["split"] == "val":
            for sample in iter_shard(root / "raw" / shard["path"]):
                yield shard["domain"], sample


def test_split_report_scores_the_train_split(trained_root):
    """benchmarks/tokenizer_split.py (the README's over- / underfitting check) evaluates a split
    that train-tokenizer does not: the trained tokenizer's train fields, both domains."""
    script = REPO / "benchmarks" / "tokenizer_split.py"
    out = subprocess.run([sys.executable, str(script), "--root", str(trained_root), "--split", "train",
                          "--max-fields", "2"], capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(out.stdout)
    assert report["tokenizer"] == load_tokenizer(trained_root).id and report["split"] == "train"
    for domain in ("channel", "porous"):
        assert 0 < report[f"train/{domain}/vrmse"] < 1  # trained: below the zero predictor's 1
        assert f"val/{domain}/vrmse" not in report


def test_training_lowers_reconstruction_error(trained_root):
    tok = load_tokenizer(trained_root)
    initial = _initial_net(trained_root)
    errors = {"initial": [], "trained": []}
    for domain, sample in _val_frames(trained_root):
        u = torch.from_numpy(sample["u.npy"])[None]
        mask = torch.from_numpy(sample["mask.npy"].astype(np.float32))[None]
        decoded = tok.decode(tok.encode(u, mask, domain), mask, domain)
        assert decoded.dtype == torch.float64 and decoded.shape == (1, 3, 32, 32, 32)
        assert spectral.divergence_stats(decoded, tok.operator)["rel_max"] <= 1e-12
        errors["trained"].append(float(vrmse_BC(decoded, u.double()).mean()))
        with torch.no_grad():
            w = initial.decode(initial.encode(tok.norm.normalize(u, domain), mask), mask)
        start = tok.norm.denormalize(initial.velocity(w.double()), domain)
        errors["initial"].append(float(vrmse_BC(start, u.double()).mean()))
    assert np.mean(errors["trained"]) < 0.8 * np.mean(errors["initial"]), errors
    info = read_json(trained_root / "tokenizer" / "tokenizer.json")
    assert info["loss"]["last_loss"] < info["loss"]["first_loss"]
    run = trained_root / "runs" / "shodh-tokenizer" / "tokenizer"  # the tokenizer's own experiment
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = logged[-1]
    for domain in ("channel", "porous"):
        for key in ("vrmse", "mse", "spectrum_ratio_min", "spectrum_ratio_max", "vrmse_low", "vrmse_mid", "vrmse_high",
                    "seam_ratio", "seam_ratio_raw"):
            assert f"val/{domain}/{key}" in final, key
        per_component = [final[f"val/{domain}/vrmse_u{axis}"] for axis in "xyz"]
        assert final[f"val/{domain}/vrmse"] == pytest.approx(np.mean(per_component), rel=1e-12)
        assert f"val/{domain}/comb_ratio" not in final  # at 32³ the comb (|k_i| = 16) lies past the band (10)
        assert 0 < final[f"val/{domain}/spectrum_ratio_min"] <= final[f"val/{domain}/spectrum_ratio_max"]
    assert final["audit/rel_max"] <= 1e-12
    assert info["config"]["band"] == band_limit(32) == 10  # simulated data: the solver's 2/3 rule
    for name in ("slices_xy", "slices_xz", "spectra", "vrmse_per_shell"):
        assert (run / "plots" / f"tokenizer_{name}.png").stat().st_size > 1000, name


def test_spectral_gain_lifts_the_train_spectrum_to_the_target(trained_root):
    """tokenizer.json's spectral gain (fit by train-tokenizer on the train split) is 1 at the
    mean and past the band, at least 1 elsewhere, and decoding the fields it was fit on with it
    brings every lifted shell's mean energy to exactly `spectrum_target` of the truth's (and
    leaves none below that)."""
    from shodh.fields.metrics import energy_spectrum_BS
    from shodh.tokenizer.data import domain_frames, load_raw_manifest
    from shodh.tokenizer.train import GAIN_FIELDS

    tok = load_tokenizer(trained_root)
    manifest = load_raw_manifest(trained_root)
    band, target = tok.net.band, tok.info["training"]["spectrum_target"]
    assert 0 < target <= 1
    lifted_any = False
    for domain in manifest["domains"]:
        gain_S = torch.tensor(tok.info["spectral_gain"][domain], dtype=torch.float64)
        assert gain_S[0] == 1 and bool((gain_S[band + 1 :] == 1).all()) and bool((gain_S >= 1).all())
        e_true, e_dec = 0, 0
        for u, mask in domain_frames(manifest, trained_root, "train", domain, GAIN_FIELDS):
            u_t, m_t = torch.from_numpy(u)[None], torch.from_numpy(mask.astype(np.float32))[None]
            e_true = e_true + energy_spectrum_BS(u_t.double())[0]
            e_dec = e_dec + energy_spectrum_BS(tok.decode(tok.encode(u_t, m_t, domain), m_t, domain))[0]
        ratio_S = (e_dec / e_true)[1 : band + 1]
        lifted_S = gain_S[1 : band + 1] > 1
        lifted_any |= bool(lifted_S.any())
        assert bool((ratio_S >= target * (1 - 1e-6)).all()), ratio_S
        assert torch.allclose(ratio_S[lifted_S], torch.full_like(ratio_S[lifted_S], target), rtol=1e-6)
    assert lifted_any  # the smoke decoder under-fills some shell: the check above is not vacuous


def test_spectrum_target_refits_the_gain_without_retraining_and_names_a_new_tokenizer(trained_root, tmp_path):
    """Rerunning train-tokenizer with another tokenizer.spectrum_target keeps the weights (nothing
    to train), refits the gain (0: none) and gives the tokenizer a new id, since decoding changed."""
    root = tmp_path / "ws"
    shutil.copytree(trained_root, root, ignore=shutil.ignore_patterns("latents", "runs"))
    before = read_json(root / "tokenizer" / "tokenizer.json")
    args = ["train-tokenizer", *SMOKE, "--root", str(root), *_sim_overrides(), *FAST]
    assert cli.main([*args, "tokenizer.spectrum_target=0"]) == 0
    after = read_json(root / "tokenizer" / "tokenizer.json")
    assert after["sha256"] == before["sha256"] and after["steps"] == before["steps"]
    assert all(g == 1 for gains in after["spectral_gain"].values() for g in gains)
    assert after["spectral_gain"] != before["spectral_gain"] and after["id"] != before["id"]


def test_checkpoint_loads_with_weights_only_and_id_names_weights_and_gain(trained_root):
    folder = trained_root / "tokenizer"
    state = torch.load(folder / "tokenizer.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    info = read_json(folder / "tokenizer.json")
    assert info["sha256"] == sha256_file(folder / "tokenizer.pt")
    assert info["id"] == sha256_json({"weights": info["sha256"], "spectral_gain": info["spectral_gain"]})
    torch.load(folder / "checkpoint.pt", weights_only=True)  # resumable state is pickle-free too
    assert {"mean", "scale", "std"} <= set(info["normalization"]["porous"])


def test_tokenizer_of_an_older_format_is_refused_naming_its_file(trained_root, tmp_path):
    """A tokenizer.json of another format (e.g. one trained before the low-pass channels) is
    refused by name, not loaded into a network it does not fit."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(trained_root / "tokenizer", folder)
    info = read_json(folder / "tokenizer.json")
    (folder / "tokenizer.json").write_text(json.dumps({**info, "format": "shodh-tokenizer-2"}))
    with pytest.raises(DataError, match=r"tokenizer\.json: format 'shodh-tokenizer-2', expected 'shodh-tokenizer-4'"):
        load_tokenizer(tmp_path)


def test_latent_shards_carry_the_tokenizer_id_and_decode_back(trained_root):
    tok = load_tokenizer(trained_root)
    out = trained_root / "latents" / tok.id
    manifest = read_json(out / "manifest.json")
    assert manifest["tokenizer_id"] == tok.id and manifest["channels"] == tok.channels
    assert len(manifest["stats"]["mean"]) == tok.channels and len(manifest["stats"]["std"]) == tok.channels
    assert len(manifest["shards"]) == 8
    raw = {(s["domain"], s["trajectory"]): s for s in read_json(trained_root / "raw" / "manifest.json")["shards"]}
    window = load_config("smoke").tokenizer.window
    for shard in manifest["shards"]:
        assert sha256_file(out / shard["path"]) == shard["sha256"]
        samples = list(iter_shard(out / shard["path"]))
        assert len(samples) == shard["samples"] == len(windows(3, window))
        frames = list(iter_shard(trained_root / "raw" / raw[(shard["domain"], shard["trajectory"])]["path"]))
        for sample in samples:
            meta, z = sample["meta.json"], sample["z.npy"]
            assert meta["tokenizer_id"] == tok.id and meta["split"] == shard["split"]
            assert sample["__key__"] == f"{shard['domain']}_{shard['trajectory']:05d}_{meta['t0']:05d}"
            assert z.dtype == np.float32 and z.shape[1:] == (tok.channels, 16, 16, 16) and z.shape[0] >= 2
            # stored latents are exactly what the API encodes for that frame
            raw_frame = frames[meta["t0"]]
            u = torch.from_numpy(raw_frame["u.npy"])[None]
            mask = torch.from_numpy(raw_frame["mask.npy"].astype(np.float32))[None]
            assert torch.allclose(torch.from_numpy(z[:1]), tok.encode(u, mask, shard["domain"]), atol=1e-5)


def test_encode_and_train_resume_without_redoing_work(trained_root, capsys):
    tok_id = read_json(trained_root / "tokenizer" / "tokenizer.json")["id"]
    shard = next((trained_root / "latents" / tok_id / "train").glob("*.tar"))
    before = shard.stat().st_mtime_ns
    assert cli.main(["encode", *SMOKE, "--root", str(trained_root), *_sim_overrides(), *FAST]) == 0
    assert shard.stat().st_mtime_ns == before
    # train resumes at its last step: nothing to train, same weights, same id
    assert cli.main(["train-tokenizer", *SMOKE, "--root", str(trained_root), *_sim_overrides(), *FAST]) == 0
    assert read_json(trained_root / "tokenizer" / "tokenizer.json")["id"] == tok_id


def test_float16_latents_are_the_rounded_float32_ones_and_switching_dtype_re_encodes(trained_root, tmp_path):
    """tokenizer.latent_dtype=float16: every stored latent is the float32 encoding rounded to float16, the
    manifest says so and its stats are those of the stored values; the loader yields float32 batches of
    them; switching the dtype re-encodes every trajectory (no shard set mixes dtypes)."""
    root = tmp_path / "ws"
    shutil.copytree(trained_root, root)
    tok_id = read_json(root / "tokenizer" / "tokenizer.json")["id"]
    out = root / "latents" / tok_id
    z32 = {s["path"]: [x["z.npy"] for x in iter_shard(out / s["path"])] for s in read_json(out / "manifest.json")["shards"]}
    args = ["encode", *SMOKE, "--root", str(root), *_sim_overrides(), *FAST]
    assert cli.main([*args, "tokenizer.latent_dtype=float16"]) == 0
    manifest = read_json(out / "manifest.json")
    assert manifest["dtype"] == "float16"
    for shard in manifest["shards"]:
        z16 = [x["z.npy"] for x in iter_shard(out / shard["path"])]
        assert all(z.dtype == np.float16 for z in z16)
        for a, b in zip(z16, z32[shard["path"]], strict=True):
            np.testing.assert_array_equal(a, b.astype(np.float16))
    train = [np.concatenate([x["z.npy"] for x in iter_shard(out / s["path"])]).astype(np.float64)
             for s in manifest["shards"] if s["split"] == "train"]
    frames = np.concatenate(train)
    np.testing.assert_allclose(manifest["stats"]["mean"], frames.mean(axis=(0, 2, 3, 4)), rtol=1e-9, atol=1e-12)
    from shodh.data.loader import DataConfig, eval_batches
    batch = next(iter(eval_batches(DataConfig(), root, tok_id, "val", 2, 0, 1)))
    assert batch["z_in"].dtype == torch.float32 and torch.isfinite(batch["z_in"]).all()
    assert cli.main([*args, "tokenizer.latent_dtype=float32"]) == 0
    back = read_json(out / "manifest.json")
    assert back["dtype"] == "float32"
    assert all(x["z.npy"].dtype == np.float32 for s in back["shards"] for x in iter_shard(out / s["path"]))


def test_float16_latents_out_of_range_are_refused():
    from shodh.errors import DataError
    from shodh.tokenizer.encode import stored
    z = np.ones((2, 4, 16, 16, 16), np.float32)
    assert stored(z, "float16", "raw/x.tar").dtype == np.float16
    z[1, 2, 3, 4, 5] = -7e4
    with pytest.raises(DataError, match=r"raw/x\.tar: latents reach \|z\| = 7e\+04.*latent_dtype=float32"):
        stored(z, "float16", "raw/x.tar")


def test_audit_prints_one_json_object(trained_root, capsys):
    assert cli.main(["audit", *SMOKE, "--root", str(trained_root), *_sim_overrides()]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"operator", "dtype", "max_abs", "rel_max", "rel_rms"} <= set(report)
    assert report["operator"] == "spectral" and report["dtype"] == "float64" and report["grid"] == 32
    assert report["rel_max"] <= 1e-12 and set(report["cases"]) == {"random_latent", "encoded_channel", "encoded_porous"}
    assert report["weights"].startswith("trained")


def test_audit_at_another_grid_uses_a_fresh_decoder(trained_root, capsys):
    assert cli.main(["audit", *SMOKE, "--root", str(trained_root), "--grid", "64", "tokenizer.operator=staggered",
                     "tokenizer.width=8", "tokenizer.hidden=16", *_sim_overrides()]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grid"] == 64 and report["weights"] == "random-init" and report["operator"] == "staggered"
    assert report["rel_max"] <= 1e-12 and report["cases"]["encoded_porous"]["grad_rms"] > 0


# ---------------------------------------------------------------- bad input


def _corrupt_member(shard: Path, member_suffix: str) -> str:
    """Rewrite `shard` with garbage bytes in the first member ending in `member_suffix`; return its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    hit = next(m for m, _ in members if m.name.endswith(member_suffix))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = b"not an array" if m is hit else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return hit.name[: -len(member_suffix) - 1]


def test_corrupt_raw_shard_error_names_shard_and_key(trained_root, tmp_path, capsys):
    root = tmp_path / "ws"
    shutil.copytree(trained_root / "raw", root / "raw")
    shutil.copytree(trained_root / "tokenizer", root / "tokenizer")
    shard = root / "raw" / "train" / "porous-000001.tar"
    key = _corrupt_member(shard, "u.npy")
    assert cli.main(["encode", *SMOKE, "--root", str(root), *_sim_overrides(), *FAST]) == 2
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("shodh: error:"))
    assert str(shard) in line and f"'{key}'" in line and "u.npy" in line


def test_grid_mismatch_with_raw_manifest_is_a_config_error(trained_root, capsys):
    assert cli.main(["encode", *SMOKE, "--root", str(trained_root), "sim.grid=64"]) == 2
    err = capsys.readouterr().err
    assert "sim.grid" in err and "grid 32" in err


# ---------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_train_and_encode_with_the_deepspeed_launcher(raw_root, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(raw_root, root)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    args = [*SMOKE, "--root", str(root), *_sim_overrides(), "tracking.mlflow=false", "tokenizer.steps=4",
            "tokenizer.warmup=1"]
    for module in ("shodh.train_tokenizer", "shodh.encode"):
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", module, *args]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = read_json(root / "tokenizer" / "tokenizer.json")
    manifest = read_json(root / "latents" / info["id"] / "manifest.json")
    assert len(manifest["shards"]) == 8 and all(s["samples"] >= 1 for s in manifest["shards"])
    assert info["training"]["steps"] == 4


def test_linear_reference_keeps_what_fits_in_the_latent():
    """benchmarks/tokenizer_reference.py (the README's linear reference): a field whose energy
    fits in the latent's budget is kept exactly; a richer one loses the least energetic modes,
    less with more channels; and the budget counts 2 real degrees of freedom per mode."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import tokenizer_reference as ref
    finally:
        sys.path.pop(0)
    grid = spectral.SpectralGrid(32)
    gen = torch.Generator().manual_seed(0)
    smooth = [grid.random_solenoidal(3.0, 1.0, gen) for _ in range(2)]  # ~120 modes: fits in C = 1
    assert ref.reference_vrmse(smooth, smooth, 1) < 1e-10
    rich = [grid.random_solenoidal(10.0, 1.0, gen) for _ in range(3)]  # ~4,200 modes: 8,400 reals
    errors = [ref.reference_vrmse(rich[:2], rich[2:], c) for c in (1, 2, 4)]  # 4,096 / 8,192 / 16,384 reals
    assert errors[0] > errors[1] > 0.05 and errors[2] < 1e-10, errors
    keep_XYH = ref.kept_modes_XYH(ref.mode_order_XYH(rich), 4096)
    _, weights_XYH = shells_and_weights_XYH(32, torch.device("cpu"))
    dof_XYH = 2 * weights_XYH
    dof_XYH[0, 0, 0] = 3  # the mean flow
    assert 4096 - 4 < float((dof_XYH * keep_XYH).sum()) <= 4096
