"""`shodh import`: Well-format files (written per the_well's schema, validated by its own
`WellDataset`), plain arrays, boundary rules, the divergence refusal and projection, every
refusal, and the metric cross-check against the_well's VRMSE / NRMSE."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from einops import rearrange

from shodh.cli import main
from shodh.errors import DataError
from shodh.fields import metrics as M
from shodh.fields.spectral import SpectralGrid, divergence_stats
from shodh.ingest.importer import ImportOptions, run_import
from shodh.io import iter_shard, read_json

N = 16
BC_NAMES = {"periodic": "PERIODIC", "wall": "WALL", "open": "OPEN"}


def write_well(path: Path, u_NTCXYZ: np.ndarray, boundaries=("periodic",) * 3, name="toy_3d", field="velocity",
               dt=0.25, lengths=(2 * math.pi,) * 3) -> Path:
    """A 3D Well-format file, laid out as the_well's own writer (the_well.utils.dummy_data) lays out
    its 2D files: root attributes, dimensions, boundary_conditions, scalars, t0/t1/t2 fields.
    Velocity is stored channels-last [n_traj, T, X, Y, Z, 3], as in The Well."""
    n_traj, steps = u_NTCXYZ.shape[:2]
    sides = u_NTCXYZ.shape[-3:]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset_name": name, "grid_type": "cartesian", "n_spatial_dims": 3,
                        "n_trajectories": n_traj, "simulation_parameters": []})
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y", "z"]
        dims.create_dataset("time", data=np.arange(steps, dtype=np.float32) * dt).attrs["sample_varying"] = False
        for axis, n, length, kind in zip("xyz", sides, lengths, boundaries):
            # cell centres: half a cell from each end
            dims.create_dataset(axis, data=((np.arange(n) + 0.5) * length / n).astype(np.float32))
            dims[axis].attrs["sample_varying"] = False
            group = f.require_group("boundary_conditions").create_group(f"{axis}_{kind}")
            group.attrs.update({"associated_dims": [axis], "associated_fields": [], "bc_type": BC_NAMES[kind],
                                "sample_varying": False, "time_varying": False})
            mask = np.zeros(n, bool)
            mask[[0, -1]] = kind != "periodic"
            group.create_dataset("mask", data=mask)
        scalars = f.create_group("scalars")
        scalars.attrs["field_names"] = []
        for order in range(3):
            f.create_group(f"t{order}_fields").attrs["field_names"] = [field] if order == 1 else []
        ds = f["t1_fields"].create_dataset(field, data=rearrange(u_NTCXYZ, "n t c x y z -> n t x y z c").astype(np.float32))
        ds.attrs.update({"dim_varying": [True, True, True], "sample_varying": True, "time_varying": True})
    return path


def solenoidal_frames(n_traj: int, steps: int, seed: int = 0, n: int = N) -> np.ndarray:
    """Divergence-free periodic fields plus a mean flow: [n_traj, T, 3, n, n, n]."""
    grid = SpectralGrid(n)
    gen = torch.Generator().manual_seed(seed)
    out = np.stack([np.stack([(grid.random_solenoidal(kmax=4.0, rms=0.5, generator=gen)
                               + torch.tensor([1.0, 0, 0], dtype=torch.float64).view(3, 1, 1, 1)).numpy()
                              for _ in range(steps)]) for _ in range(n_traj)])
    return out.astype(np.float32)


def opts(paths, **kw) -> ImportOptions:
    return ImportOptions(format=kw.pop("format", "well"), paths=[Path(p) for p in paths], domain=kw.pop("domain", "toy"), **kw)


def frames_of(root: Path, entry: dict) -> list[dict]:
    return list(iter_shard(root / "raw" / entry["path"], entry))


def test_well_file_is_valid_for_the_well_and_round_trips(tmp_path):
    from the_well.data import WellDataset

    u = solenoidal_frames(3, 3)
    path = write_well(tmp_path / "well" / "toy.hdf5", u)
    ds = WellDataset(path=str(path.parent), n_steps_input=1, n_steps_output=1, use_normalization=False)
    item = ds[0]  # trajectory 0, frames 0 -> 1, channels-last as the_well returns them
    assert ds.metadata.dataset_name == "toy_3d" and ds.metadata.n_spatial_dims == 3
    assert torch.equal(item["input_fields"][0], torch.from_numpy(rearrange(u[0, 0], "c x y z -> x y z c")))
    assert torch.equal(item["output_fields"][0], torch.from_numpy(rearrange(u[0, 1], "c x y z -> x y z c")))

    root = tmp_path / "ws"
    manifest = run_import(opts([path]), root, "spectral")
    assert manifest["domains"] == ["toy"] and manifest["imported"] == ["toy"] and manifest["grid"] == N
    by_split = {s["split"]: s for s in manifest["shards"]}
    assert sorted(by_split) == ["test", "train", "val"]  # 3 trajectories, no file split: one each, by trajectory
    assert [by_split[s]["source_trajectory"] for s in ("train", "val", "test")] == [0, 1, 2]
    for entry in by_split.values():
        samples = frames_of(root, entry)
        assert len(samples) == 3
        for t, sample in enumerate(samples):
            assert np.array_equal(sample["u.npy"], u[entry["source_trajectory"], t])
            assert sample["mask.npy"].dtype == np.uint8 and not sample["mask.npy"].any()
            meta = sample["meta.json"]
            assert meta["source"] == "import" and meta["dataset_name"] == "toy_3d" and meta["t"] == 0.25 * t
            assert meta["dataset"] == "t1_fields/velocity" and meta["source_file"] == str(path.resolve())
            assert meta["boundaries"] == {"x": "periodic", "y": "periodic", "z": "periodic"}
            assert meta["divergence"]["nonsolenoidal"] < 1e-6 and meta["resampled"] is None
    # train statistics, as the simulator computes them (population moments over the train frames)
    train = u[0].astype(np.float64).transpose(1, 0, 2, 3, 4).reshape(3, -1)
    stats = manifest["stats"]["toy"]
    assert np.allclose(stats["mean"], train.mean(1)) and np.allclose(stats["std"], train.std(1))


def test_the_files_own_split_wins(tmp_path):
    path = write_well(tmp_path / "data" / "valid" / "a.hdf5", solenoidal_frames(1, 2))
    train = write_well(tmp_path / "data" / "train" / "b.hdf5", solenoidal_frames(1, 2, seed=1))
    manifest = run_import(opts([train, path]), tmp_path / "ws", "spectral")
    assert {(s["source_file"], s["split"]) for s in manifest["shards"]} == {(str(train.resolve()), "train"),
                                                                            (str(path.resolve()), "val")}


def _wall_field(n: int, nz: int, length_z: float = math.pi) -> np.ndarray:
    """u = (sin x cos z, sin x cos 2z, -cos x sin z) on x, y in [0, 2π) and nz cell centres of z in
    [0, length_z]: divergence-free; with length_z = π, u_z = 0 at the walls z = 0, π, tangential
    components even about them, normal odd."""
    x = np.arange(n) * 2 * math.pi / n
    z = (np.arange(nz) + 0.5) * length_z / nz
    X, _, Z = np.meshgrid(x, x, z, indexing="ij")
    return np.stack([np.sin(X) * np.cos(Z), np.sin(X) * np.cos(2 * Z), -np.cos(X) * np.sin(Z)])


def test_mirror_extension_keeps_divergence_at_round_off(tmp_path):
    half = _wall_field(N, N // 2)
    path = write_well(tmp_path / "wall.hdf5", np.stack([np.stack([half, half])]).astype(np.float64),
                      boundaries=("periodic", "periodic", "wall"), lengths=(2 * math.pi, 2 * math.pi, math.pi))
    manifest = run_import(opts([path], split="train"), tmp_path / "ws", "spectral")
    sample = frames_of(tmp_path / "ws", manifest["shards"][0])[0]
    u = sample["u.npy"]
    assert u.shape == (3, N, N, N)
    # the extension is the analytic field on the whole period [0, 2π) of z (cell centres)
    full = _wall_field(N, N, 2 * math.pi)
    assert np.abs(u - full).max() < 1e-6
    assert divergence_stats(torch.from_numpy(u.astype(np.float64))[None], "spectral")["rel_max"] < 1e-6  # float32 storage
    meta = sample["meta.json"]
    assert meta["divergence"]["rel_max"] < 1e-6 and meta["boundaries"]["z"] == "wall"
    assert meta["boundary_treatment"]["z"].startswith("wall: mirror extension 8 -> 16")


def test_solid_padding_marks_the_padding_solid(tmp_path):
    half = _wall_field(N, 12)
    path = write_well(tmp_path / "wall.hdf5", np.stack([np.stack([half, half])]),
                      boundaries=("periodic", "periodic", "wall"), lengths=(2 * math.pi, 2 * math.pi, 12 * 2 * math.pi / N))
    manifest = run_import(opts([path], split="train", walls="solid", max_nonsolenoidal=1.0), tmp_path / "ws", "spectral")
    sample = frames_of(tmp_path / "ws", manifest["shards"][0])[0]
    assert sample["mask.npy"][:, :, 12:].all() and not sample["mask.npy"][:, :, :12].any()
    assert not sample["u.npy"][:, :, :, 12:].any()
    assert np.allclose(sample["u.npy"][:, :, :, :12], half, atol=1e-6)
    assert sample["meta.json"]["boundary_treatment"]["z"] == "wall: padded with solid 12 -> 16"


def _divergent(fraction: float) -> tuple[np.ndarray, float]:
    """A solenoidal field plus a gradient part whose rms is `fraction` of the fluctuation rms.
    Returns ([1, 2, 3, N, N, N], the exact non-solenoidal fraction)."""
    w = solenoidal_frames(1, 1)[0, 0].astype(np.float64)
    x = np.arange(N) * 2 * math.pi / N
    X, Y, _ = np.meshgrid(x, x, x, indexing="ij")
    grad = np.stack([-np.sin(X + 2 * Y), -2 * np.sin(X + 2 * Y), np.zeros_like(X)])  # ∇ cos(x + 2y)
    w_fluct = w - w.mean(axis=(1, 2, 3), keepdims=True)
    scale = fraction * math.sqrt((w_fluct**2).mean() / (grad**2).mean() / (1 - fraction**2))
    u = w + scale * grad
    u_fluct = u - u.mean(axis=(1, 2, 3), keepdims=True)
    exact = math.sqrt(((scale * grad) ** 2).mean() / (u_fluct**2).mean())
    return np.stack([u, u])[None], exact


def test_divergent_data_is_refused_with_figures_or_projected(tmp_path):
    u, exact = _divergent(0.2)
    assert abs(exact - 0.2) < 1e-9
    path = write_well(tmp_path / "div.hdf5", u.astype(np.float64))
    with pytest.raises(DataError) as err:
        run_import(opts([path], split="train"), tmp_path / "ws", "spectral")
    msg = str(err.value)
    assert str(path) in msg and "trajectory 0, frame 0" in msg and "20.00%" in msg and "--project" in msg
    assert not list((tmp_path / "ws" / "raw").rglob("*.tar"))  # nothing half-imported

    manifest = run_import(opts([path], split="train", project=True), tmp_path / "ws", "spectral")
    sample = frames_of(tmp_path / "ws", manifest["shards"][0])[0]
    div = sample["meta.json"]["divergence"]
    assert div["projected"] and abs(div["nonsolenoidal"] - exact) < 1e-5  # the removed part, per frame
    assert div["rel_max_after"] < 1e-12
    stored = sample["u.npy"].astype(np.float64)
    assert np.abs(stored - (u[0, 0] - (u[0, 0] - solenoidal_frames(1, 1)[0, 0]))).max() < 1e-5  # the solenoidal part back


def test_a_staggered_tokenizer_measures_with_its_own_operator(tmp_path):
    path = write_well(tmp_path / "a.hdf5", solenoidal_frames(1, 2))
    with pytest.raises(DataError, match="staggered operator"):
        run_import(opts([path], split="train"), tmp_path / "ws", "staggered")


def _well_with(tmp_path, edit) -> Path:
    path = write_well(tmp_path / "bad.hdf5", solenoidal_frames(1, 2))
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _nan_in_frame_1(f):
    data = f["t1_fields/velocity"][()]
    data[0, 1, 3, 3, 3, 0] = np.nan
    f["t1_fields/velocity"][...] = data


def _two_components(f):
    del f["t1_fields/velocity"]
    f["t1_fields"].create_dataset("velocity", data=np.zeros((1, 2, N, N, N, 2), np.float32))


@pytest.mark.parametrize("edit, expected", [
    (lambda f: f["t1_fields"].move("velocity", "density"), r"has no vector field 't1_fields/velocity' \(t1_fields: density\)"),
    (lambda f: f.attrs.__delitem__("n_trajectories"), "not in The Well's schema: root attribute 'n_trajectories' missing"),
    (lambda f: f.__delitem__("boundary_conditions"), "not in The Well's schema: group 'boundary_conditions' missing"),
    (_two_components, r"'t1_fields/velocity' has shape \[1, 2, 16, 16, 16, 2\], expected \[1, 2, 16, 16, 16, 3\]"),
    (_nan_in_frame_1, "dataset 't1_fields/velocity', trajectory 0, frame 1: 1 NaN/inf values"),
    (lambda f: f["boundary_conditions/y_periodic"].attrs.__setitem__("bc_type", "OPEN"), "axis y has an OPEN boundary"),
])
def test_refusals_name_file_dataset_and_trajectory(tmp_path, edit, expected):
    path = _well_with(tmp_path, edit)
    with pytest.raises(DataError, match=expected) as err:
        run_import(opts([path], split="train"), tmp_path / "ws", "spectral")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_open_axis_imports_with_allow_open(tmp_path):
    path = _well_with(tmp_path, lambda f: f["boundary_conditions/y_periodic"].attrs.__setitem__("bc_type", "OPEN"))
    manifest = run_import(opts([path], split="train", allow_open=True), tmp_path / "ws", "spectral")
    meta = frames_of(tmp_path / "ws", manifest["shards"][0])[0]["meta.json"]
    assert meta["boundary_treatment"]["y"] == "open: used as periodic (--allow-open)"


def test_2d_file_from_the_wells_own_writer_is_refused(tmp_path):
    from the_well.utils.dummy_data import write_dummy_data

    path = tmp_path / "dummy.hdf5"
    write_dummy_data(str(path))
    with pytest.raises(DataError, match=r"dataset 'dummy_dataset' is 2D \(n_spatial_dims=2\)"):
        run_import(opts([path]), tmp_path / "ws", "spectral")


def test_grids_are_resampled_only_on_request(tmp_path):
    fine = solenoidal_frames(1, 2, n=2 * N)  # band-limited (k <= 4): resampling to 16^3 is exact
    path = write_well(tmp_path / "fine.hdf5", fine)
    root = tmp_path / "ws"
    run_import(opts([write_well(tmp_path / "base.hdf5", solenoidal_frames(1, 2))], split="train", domain="base"), root,
               "spectral")
    with pytest.raises(DataError, match="differs from the workspace's 16\\^3 .*pass --resample 16"):
        run_import(opts([path], split="train"), root, "spectral")
    manifest = run_import(opts([path], split="train", resample=N), root, "spectral")
    assert manifest["domains"] == ["base", "toy"]
    entry = next(s for s in manifest["shards"] if s["domain"] == "toy")
    sample = frames_of(root, entry)[0]
    from shodh.fields.spectral import resample

    assert np.abs(sample["u.npy"] - resample(torch.from_numpy(fine[0, 0].astype(np.float64)), N).numpy()).max() < 1e-5
    assert sample["meta.json"]["resampled"] == "spectral 32x32x32 -> 16^3"
    odd = write_well(tmp_path / "odd.hdf5", solenoidal_frames(1, 2, n=24)[..., :24])
    with pytest.raises(DataError, match="not a cube of side 16·2\\^k; pass --resample N"):
        run_import(opts([odd], split="train"), tmp_path / "ws2", "spectral")


def test_npy_and_hdf5_arrays(tmp_path):
    u = solenoidal_frames(1, 3)[0]
    mask = np.zeros((N,) * 3, np.uint8)
    mask[:2] = 1
    np.save(tmp_path / "first.npy", u)
    np.save(tmp_path / "second.npy", rearrange(u, "t c x y z -> t x y z c"))
    np.save(tmp_path / "mask.npy", mask)
    root = tmp_path / "ws"
    manifest = run_import(opts([tmp_path / "first.npy"], format="npy", split="train", dt=0.5, mask=tmp_path / "mask.npy"),
                          root, "spectral")
    sample = frames_of(root, manifest["shards"][0])[2]
    assert np.array_equal(sample["u.npy"], u[2]) and np.array_equal(sample["mask.npy"], mask)
    assert sample["meta.json"]["t"] == 1.0 and sample["meta.json"]["source_format"] == "npy"
    manifest = run_import(opts([tmp_path / "second.npy"], format="npy", split="train", dt=0.5, channels_last=True,
                               domain="last"), root, "spectral")
    entry = next(s for s in manifest["shards"] if s["domain"] == "last")
    assert np.array_equal(frames_of(root, entry)[1]["u.npy"], u[1])
    with pytest.raises(DataError, match=r"expected \[T, 3, X, Y, Z\] \(pass --channels-last"):
        run_import(opts([tmp_path / "second.npy"], format="npy", split="train", dt=0.5), tmp_path / "ws2", "spectral")
    with h5py.File(tmp_path / "arr.h5", "w") as f:
        f.create_dataset("u", data=u).attrs["dt"] = 0.125
    manifest = run_import(opts([tmp_path / "arr.h5"], format="hdf5", dataset="u", split="train", domain="h5"), root,
                          "spectral")
    entry = next(s for s in manifest["shards"] if s["domain"] == "h5")
    assert frames_of(root, entry)[1]["meta.json"]["t"] == 0.125
    with pytest.raises(DataError, match=r"arr.h5: no dataset 'velocity' \(has: u\); pick one with --dataset"):
        run_import(opts([tmp_path / "arr.h5"], format="hdf5", split="train"), tmp_path / "ws3", "spectral")


def test_reimport_replaces_the_domain_and_keeps_the_others(tmp_path):
    root = tmp_path / "ws"
    run_import(opts([write_well(tmp_path / "a.hdf5", solenoidal_frames(3, 2))], domain="a"), root, "spectral")
    run_import(opts([write_well(tmp_path / "b.hdf5", solenoidal_frames(1, 2))], domain="b", split="train"), root, "spectral")
    manifest = run_import(opts([write_well(tmp_path / "a2.hdf5", solenoidal_frames(1, 2))], domain="a", split="train"),
                          root, "spectral")
    assert sorted(manifest["domains"]) == ["a", "b"] and len(manifest["shards"]) == 2
    assert sorted(p.name for p in (root / "raw").rglob("*.tar")) == ["a-000000.tar", "b-000000.tar"]
    assert read_json(root / "raw" / "manifest.json") == manifest


def test_cli_import_and_one_line_errors(tmp_path, capsys):
    path = write_well(tmp_path / "a.hdf5", solenoidal_frames(1, 2))
    root = tmp_path / "ws"
    assert main(["import", "--format", "well", str(path), "--domain", "toy", "--split", "train", "--root", str(root),
                 "--profile", "smoke", "tokenizer.operator=spectral"]) == 0
    assert "imported toy" in capsys.readouterr().out
    assert json.loads((root / "raw" / "manifest.json").read_text())["domains"] == ["toy"]
    assert main(["import", "--format", "well", str(tmp_path / "missing.hdf5"), "--domain", "toy", "--root", str(root),
                 "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "missing.hdf5: cannot open as HDF5" in err and err.count("\n") == 1


def test_vrmse_and_nrmse_equal_the_wells_implementation():
    from the_well.benchmark.metrics.spatial import NRMSE, VRMSE

    g = torch.Generator().manual_seed(3)
    true = torch.randn(2, 3, N, N, N, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1, 3.0]).view(1, 3, 1, 1, 1) + 0.7
    pred = true + 0.3 * torch.randn(true.shape, generator=g, dtype=torch.float64)
    meta = SimpleNamespace(n_spatial_dims=3)  # all the_well's spatial metrics read from the metadata
    to_well = "b c x y z -> b x y z c"
    for ours, theirs in ((M.vrmse_BC, VRMSE), (M.nrmse_BC, NRMSE)):
        expected_BC = theirs.eval(rearrange(pred, to_well), rearrange(true, to_well), meta)
        assert expected_BC.shape == (2, 3)
        assert torch.allclose(ours(pred, true), expected_BC, rtol=1e-12, atol=0)
    # a constant truth: both divide by eps = 1e-7 inside the root
    const = torch.full((1, 3, N, N, N), 2.0, dtype=torch.float64)
    assert torch.allclose(M.vrmse_BC(const + 1e-3, const),
                          VRMSE.eval(rearrange(const + 1e-3, to_well), rearrange(const, to_well), meta), rtol=1e-12)


def test_end_to_end_two_simulated_domains_and_one_imported(tmp_path):
    """simulate (channel, porous) + import (a Well file) -> tokenizer -> encode -> 3-domain MoE
    pretraining -> evaluate; training and evaluation telemetry name all three domains."""
    import eval_workspace

    root = tmp_path / "ws"
    common = ["--profile", "smoke", "--root", str(root), *eval_workspace.FAST]
    quick_sim = ["sim.trajectories.train=1", "sim.trajectories.val=1", "sim.trajectories.test=1", "sim.frames=4",
                 "sim.channel.spinup_time=1", "sim.channel.settle_time=0.2", "sim.channel.decorrelation_time=0.2",
                 "sim.channel.frame_interval=0.2",
                 "sim.porous.spinup_time=0.2", "sim.porous.frame_interval=0.2", "sim.porous.porosity=[0.75, 0.8]"]
    assert main(["simulate", *common, *quick_sim]) == 0
    well = write_well(tmp_path / "toy.hdf5", solenoidal_frames(3, 4, seed=7))
    assert main(["import", "--format", "well", str(well), "--domain", "well_toy", *common]) == 0
    manifest = read_json(root / "raw" / "manifest.json")
    assert manifest["domains"] == ["channel", "porous", "well_toy"] and manifest["imported"] == ["well_toy"]
    # a rerun of the simulation keeps the imported domain (its section is folded in again)
    assert main(["simulate", *common, *quick_sim]) == 0
    assert read_json(root / "raw" / "manifest.json")["domains"] == ["channel", "porous", "well_toy"]

    mix = "data.weights={channel: 1, porous: 1, well_toy: 1}"
    for argv in (["train-tokenizer"], ["encode"], ["pretrain", "--run-name", "three"]):
        assert main([*argv, *common, mix]) == 0, argv
    run = root / "runs" / "shodh" / "three"
    assert main(["evaluate", *common, mix, "--run", str(run)]) == 0
    names = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        names |= set(json.loads(line).get("metrics", json.loads(line)))
    for domain in ("channel", "porous", "well_toy"):
        assert any(n.startswith(f"route/{domain}/layer") for n in names), domain
        assert any(n.startswith(f"val/{domain}/") for n in names), domain
    summary = read_json(run / "eval" / "summary.json")
    assert set(summary["samples"][summary["splits"][0]]) == {"channel", "porous", "well_toy"}
