"""Lazy readers of velocity data on disk: The Well's HDF5 schema and plain arrays (npy / HDF5).

A reader opens a file, checks its structure once (every refusal names the file, the dataset
and, for per-frame problems, the trajectory and frame) and then hands out one frame at a time,
so a 100 GB file is never loaded whole: h5py slices one [X, Y, Z, 3] frame, npy is memory-mapped.

The Well (Ohana et al., 2024; the `the_well` package's `WellDataset` reads the same layout):
root attributes `dataset_name`, `n_spatial_dims`, `n_trajectories`; `dimensions/time` [T] (or
[n_traj, T]) and one coordinate array per name in `dimensions.attrs["spatial_dims"]`;
`boundary_conditions/<name>` groups with attributes `bc_type` (PERIODIC / WALL / OPEN) and
`associated_dims`; vector fields in `t1_fields/<field>` as [n_traj, T, X, Y, Z, 3] (no leading
n_traj when the field's `sample_varying` is false). The Well keeps its splits as folders
(`data/train`, `data/valid`, `data/test`), which is the file's own split.

Plain arrays: one file is one trajectory, [T, 3, X, Y, Z] (or [T, X, Y, Z, 3] with
channels_last); npy with `allow_pickle=False`, HDF5 as one named dataset (attribute `dt` used
when present).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from einops import rearrange

from shodh.errors import DataError

BOUNDARY_TYPES = ("periodic", "wall", "open")
WELL_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}  # folder name -> shodh split


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(value) -> list[str]:
    """An HDF5 attribute holding one name or a list of names (bytes or str)."""
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in np.atleast_1d(value)]


@dataclass
class Source:
    """One file's velocity field, opened and checked; frames are read on demand."""

    path: Path
    dataset: str  # the HDF5 dataset / npy file the velocity comes from (named in every error)
    dataset_name: str  # The Well's `dataset_name`, or the file stem
    trajectories: int
    times_T: list[np.ndarray]  # per trajectory: the frames' times
    boundaries: tuple[str, str, str]  # per axis x, y, z: periodic / wall / open
    spacing: tuple[float, float, float] | None  # grid spacing per axis, when the file says
    split: str | None  # the file's own split, if it has one
    mask_XYZ: np.ndarray | None = None
    _array: object = None  # h5py.Dataset or np.memmap
    _channels_last: bool = True
    _per_trajectory: bool = True
    _handle: object = None

    @property
    def sides(self) -> tuple[int, int, int]:
        shape = self._array.shape
        return tuple(shape[-4:-1]) if self._channels_last else tuple(shape[-3:])

    def frame(self, trajectory: int, t: int) -> np.ndarray:
        """u [3, X, Y, Z] float64 of one frame, checked finite."""
        index = (trajectory, t) if self._per_trajectory else (t,)
        raw = np.asarray(self._array[index])
        u_CXYZ = rearrange(raw, "x y z c -> c x y z") if self._channels_last else raw
        if not np.isfinite(u_CXYZ).all():
            bad = int((~np.isfinite(u_CXYZ)).sum())
            raise DataError(f"{self.path}: dataset '{self.dataset}', trajectory {trajectory}, frame {t}: "
                            f"{bad} NaN/inf values; remove the frame or fix the file")
        return u_CXYZ.astype(np.float64)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _split_of(path: Path) -> str | None:
    return WELL_SPLITS.get(path.parent.name)


def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise DataError(f"{path}: {message}")


def open_well(path: Path, field_name: str = "velocity") -> Source:
    """A Well-format HDF5 file's `t1_fields/<field_name>`, checked against the schema."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open as HDF5 ({exc})") from None
    try:
        return _open_well(f, path, field_name)
    except BaseException:
        f.close()
        raise


def _open_well(f: h5py.File, path: Path, field_name: str) -> Source:
    schema = "not in The Well's schema"
    for key in ("dataset_name", "n_spatial_dims", "n_trajectories"):
        _require(key in f.attrs, path, f"{schema}: root attribute '{key}' missing")
    for group in ("dimensions", "boundary_conditions", "t1_fields"):
        _require(group in f, path, f"{schema}: group '{group}' missing")
    name = _text(f.attrs["dataset_name"])
    ndim = int(f.attrs["n_spatial_dims"])
    _require(ndim == 3, path, f"dataset '{name}' is {ndim}D (n_spatial_dims={ndim}); shodh imports 3D velocity only")
    dims = f["dimensions"]
    _require("spatial_dims" in dims.attrs, path, f"{schema}: dimensions.attrs['spatial_dims'] missing")
    axes = _names(dims.attrs["spatial_dims"])
    _require(len(axes) == 3 and all(a in dims for a in axes) and "time" in dims, path,
             f"{schema}: dimensions must hold 'time' and the spatial dims {axes}")
    fields = list(f["t1_fields"].keys())
    where = f"t1_fields/{field_name}"
    _require(field_name in fields, path, f"dataset '{name}' has no vector field '{where}' "
             f"(t1_fields: {', '.join(fields) or 'none'}); pick one with --field")
    ds = f[where]
    per_traj = bool(ds.attrs.get("sample_varying", True))
    n_traj = int(f.attrs["n_trajectories"])
    sides = tuple(int(dims[a].shape[-1]) for a in axes)
    steps = int(dims["time"].shape[-1])
    expected = ((n_traj,) if per_traj else ()) + (steps, *sides, 3)
    _require(tuple(ds.shape) == expected, path, f"'{where}' has shape {list(ds.shape)}, expected {list(expected)} "
             f"([n_trajectories,] time, {', '.join(axes)}, 3 components)")
    _require(ds.dtype.kind == "f", path, f"'{where}' has dtype {ds.dtype}, expected floating point")
    time = np.asarray(dims["time"][()], dtype=np.float64)
    times = [time[i] if time.ndim == 2 else time for i in range(n_traj if per_traj else 1)]
    boundaries = {a: set() for a in axes}
    for key, group in f["boundary_conditions"].items():
        kind = _text(group.attrs.get("bc_type", "")).lower()
        _require(kind in BOUNDARY_TYPES, path, f"boundary_conditions/{key}: bc_type '{kind}' is not one of "
                 f"PERIODIC, WALL, OPEN")
        for axis in _names(group.attrs.get("associated_dims", [])):
            _require(axis in boundaries, path, f"boundary_conditions/{key}: unknown dimension '{axis}'")
            boundaries[axis].add(kind)
    missing = [a for a in axes if not boundaries[a]]
    _require(not missing, path, f"boundary_conditions gives no condition for axis {', '.join(missing)}")
    # An axis with an open end is open; one with a wall end (and no open one) is a wall.
    kinds = tuple(next(k for k in ("open", "wall", "periodic") if k in boundaries[a]) for a in axes)
    spacing = []
    for a in axes:
        coord = np.asarray(dims[a][()], dtype=np.float64)
        coord = coord[0] if coord.ndim == 2 else coord
        spacing.append(float(np.mean(np.diff(coord))) if coord.size > 1 else 1.0)
    return Source(path=path, dataset=where, dataset_name=name, trajectories=n_traj if per_traj else 1,
                  times_T=times, boundaries=kinds, spacing=tuple(spacing), split=_split_of(path), _array=ds,
                  _channels_last=True, _per_trajectory=per_traj, _handle=f)


def open_array(path: Path, fmt: str, dataset: str, channels_last: bool, dt: float | None,
               boundaries: tuple[str, str, str], mask_path: Path | None) -> Source:
    """One trajectory from a .npy file or an HDF5 dataset: [T, 3, X, Y, Z] (channels_last: [T, X, Y, Z, 3])."""
    path = Path(path)
    handle = None
    if fmt == "npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        where, attrs = path.name, {}
    else:
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise DataError(f"{path}: cannot open as HDF5 ({exc})") from None
        if dataset not in handle:
            have = ", ".join(handle.keys()) or "nothing"
            handle.close()
            raise DataError(f"{path}: no dataset '{dataset}' (has: {have}); pick one with --dataset")
        array, where, attrs = handle[dataset], dataset, dict(handle[dataset].attrs)
    try:
        layout = "[T, X, Y, Z, 3]" if channels_last else "[T, 3, X, Y, Z]"
        comp_axis = -1 if channels_last else 1
        _require(array.ndim == 5 and array.shape[comp_axis] == 3, path,
                 f"'{where}' has shape {list(array.shape)}, expected {layout}"
                 + ("" if channels_last else " (pass --channels-last for [T, X, Y, Z, 3])"))
        _require(array.dtype.kind == "f", path, f"'{where}' has dtype {array.dtype}, expected floating point")
        step = dt if dt is not None else float(attrs["dt"]) if "dt" in attrs else None
        _require(step is not None and step > 0, path, f"'{where}': no time step; pass --dt")
        mask = None
        if mask_path is not None:
            mask = np.load(mask_path, allow_pickle=False) if str(mask_path).endswith(".npy") else None
            sides = tuple(array.shape[1:4] if channels_last else array.shape[2:5])
            if mask is None or mask.shape != sides or not np.isin(mask, (0, 1)).all():
                raise DataError(f"{mask_path}: mask must be a .npy array of 0/1 with shape {list(sides)}")
            mask = mask.astype(np.uint8)
        steps = array.shape[0]
        return Source(path=path, dataset=where, dataset_name=path.stem, trajectories=1,
                      times_T=[np.arange(steps) * step], boundaries=boundaries, spacing=None, split=_split_of(path),
                      mask_XYZ=mask, _array=array, _channels_last=channels_last, _per_trajectory=False, _handle=handle)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
