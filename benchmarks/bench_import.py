#!/usr/bin/env python
"""What `shodh import` costs on a Well-format file: frames per second and peak memory.

    python benchmarks/bench_import.py [--grid 128] [--frames 8] [--walls] [--project]

Writes a synthetic Well-format HDF5 file (one trajectory of divergence-free random fields,
stored frame by frame like The Well's velocity, [1, T, X, Y, Z, 3] float32) into a temporary
folder, then runs `shodh import` on it in a child process and reports the child's wall time, its
import rate from the frames and the time spent before the first frame, and its peak resident
memory (ru_maxrss). --walls makes z a WALL axis of half the grid (mirror-extended back to the
grid); --project adds a gradient part (20 % of the fluctuation) and imports with --project.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from einops import rearrange

from shodh.fields.spectral import SpectralGrid


def write_file(path: Path, n: int, frames: int, walls: bool, divergent: bool) -> None:
    nz = n // 2 if walls else n
    grid = SpectralGrid(n, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = np.arange(n, dtype=np.float32) * 2 * math.pi / n
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset_name": "bench_3d", "grid_type": "cartesian", "n_spatial_dims": 3, "n_trajectories": 1})
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y", "z"]
        dims.create_dataset("time", data=np.arange(frames, dtype=np.float32))
        for axis, side in zip("xyz", (n, n, nz)):
            dims.create_dataset(axis, data=x[:side] + x[1] / 2)
            kind = "WALL" if walls and axis == "z" else "PERIODIC"
            group = f.require_group("boundary_conditions").create_group(f"{axis}_{kind.lower()}")
            group.attrs.update({"associated_dims": [axis], "bc_type": kind})
        f.create_group("scalars").attrs["field_names"] = []
        for order in range(3):
            f.create_group(f"t{order}_fields").attrs["field_names"] = ["velocity"] if order == 1 else []
        ds = f["t1_fields"].create_dataset("velocity", shape=(1, frames, n, n, nz, 3), dtype=np.float32,
                                           chunks=(1, 1, n, n, nz, 3))
        ds.attrs.update({"sample_varying": True, "time_varying": True})
        for t in range(frames):
            u = grid.random_solenoidal(kmax=n / 3, rms=1.0, generator=gen)
            if divergent:
                u = u + 0.2 * torch.stack([torch.sin(grid.x_CXYZ[0])] + [torch.zeros_like(u[0])] * 2)
            ds[0, t] = rearrange(u[..., :nz].numpy(), "c x y z -> x y z c")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--walls", action="store_true")
    parser.add_argument("--project", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.hdf5"
        write_file(path, args.grid, args.frames, args.walls, args.project)
        cmd = [sys.executable, "-m", "shodh", "import", "--format", "well", str(path), "--domain", "bench", "--split",
               "train", "--root", str(Path(tmp) / "ws"), *(["--project"] if args.project else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(proc.stderr)
        # tqdm's last line: "... N/N [mm:ss<00:00, R frame/s]" or "s/frame"
        rate = re.findall(r"([\d.]+)(frame/s|s/frame)\]", proc.stderr)[-1]
        frames_per_s = float(rate[0]) if rate[1] == "frame/s" else 1 / float(rate[0])
        print(json.dumps({"grid": args.grid, "frames": args.frames, "walls": args.walls, "project": args.project,
                          "file_mb": round(path.stat().st_size / 2**20, 1), "wall_s": round(wall, 1),
                          "frames_per_s": round(frames_per_s, 3),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
