"""Making every axis periodic, because the tokenizer's operators and the spectral metrics live on
the periodic box.

- periodic axes are used as they are;
- wall axes, by default, get the even/odd mirror extension the channel domain uses
  (`shodh.physics.solver.mirror_z`): the field is continued by its reflection with the normal
  component negated (tangential components even, normal odd), which doubles the axis. The
  normal velocity vanishes at a wall, so the odd continuation is continuous, and the extension
  maps a divergence-free field to a divergence-free field (∂_n of an odd function is even).
  Samples are taken as cell centres (half a cell from each wall), so the reflection repeats no
  sample;
- or, on request, wall axes are padded with solid cells (mask = 1, u = 0) up to the longest axis:
  no mirror image, at the price of a velocity jump into the solid that a penalized solid has too;
- open axes have no periodic continuation that keeps the physics (inflow and outflow differ);
  they are refused unless allowed, and then used as if periodic.
"""

from __future__ import annotations

import numpy as np

from shodh.errors import DataError

Walls = str  # "mirror" | "solid"


def mirror_extend(u_CXYZ: np.ndarray, mask_XYZ: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """[3, X, Y, Z] -> the same with grid axis `axis` (0, 1, 2) doubled by its mirror image,
    component `axis` negated in the image; the mask is mirrored evenly."""
    image = np.flip(u_CXYZ, axis=1 + axis).copy()
    image[axis] *= -1
    return (np.concatenate([u_CXYZ, image], axis=1 + axis),
            np.concatenate([mask_XYZ, np.flip(mask_XYZ, axis=axis)], axis=axis))


def solid_pad(u_CXYZ: np.ndarray, mask_XYZ: np.ndarray, axis: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Append solid cells (u = 0, mask = 1) along `axis` until it has `side` cells."""
    extra = side - u_CXYZ.shape[1 + axis]
    pad_u = [(0, 0)] * 4
    pad_u[1 + axis] = (0, extra)
    pad_m = [(0, 0)] * 3
    pad_m[axis] = (0, extra)
    return np.pad(u_CXYZ, pad_u), np.pad(mask_XYZ, pad_m, constant_values=1)


def plan(boundaries: tuple[str, str, str], sides: tuple[int, int, int], walls: Walls, allow_open: bool,
         where: str) -> list[str]:
    """What happens to each axis ("as is", "mirror", "solid to N", "open used as periodic"), checked
    once per file; refusals name `where` (the file and dataset)."""
    out = []
    for axis, (kind, n) in enumerate(zip(boundaries, sides)):
        name = "xyz"[axis]
        if kind == "periodic":
            out.append("periodic: as is")
        elif kind == "open":
            if not allow_open:
                raise DataError(f"{where}: axis {name} has an OPEN boundary; an open axis has no periodic continuation "
                                f"that keeps its inflow/outflow physics, and the tokenizer works on the periodic box. "
                                f"Pass --allow-open to use it as if periodic (the wrap-around seam then becomes a "
                                f"jump the tokenizer must learn)")
            out.append("open: used as periodic (--allow-open)")
        elif walls == "mirror":
            out.append(f"wall: mirror extension {n} -> {2 * n} (tangential even, normal odd)")
        else:
            side = max(sides)
            if side <= n:
                raise DataError(f"{where}: axis {name} is a WALL axis and already the longest ({n} cells): solid padding "
                                f"has no room to reach the cube; use --walls mirror")
            out.append(f"wall: padded with solid {n} -> {side}")
    return out


def make_periodic(u_CXYZ: np.ndarray, mask_XYZ: np.ndarray, boundaries: tuple[str, str, str],
                  walls: Walls) -> tuple[np.ndarray, np.ndarray]:
    """Apply the per-axis rule of `plan` (which has already refused what cannot be done)."""
    side = max(u_CXYZ.shape[1:])
    for axis, kind in enumerate(boundaries):
        if kind != "wall":
            continue
        if walls == "mirror":
            u_CXYZ, mask_XYZ = mirror_extend(u_CXYZ, mask_XYZ, axis)
        else:
            u_CXYZ, mask_XYZ = solid_pad(u_CXYZ, mask_XYZ, axis, side)
    return u_CXYZ, mask_XYZ
