#!/usr/bin/env python
"""Print the solver's physics checks as JSON (the numbers quoted in the README).

    python benchmarks/physics_report.py
"""

import json
import time

from shodh.physics import validation

if __name__ == "__main__":
    report = {}
    for name, fn in [("taylor_green_float64", validation.taylor_green),
                     ("projection_float32", validation.projection_divergence),
                     ("darcy_float64", validation.darcy),
                     ("darcy_float64_dt0.02", lambda: validation.darcy(max_dt=0.02)),
                     ("channel_float32", validation.channel_balance)]:
        t0 = time.perf_counter()
        report[name] = fn()
        report[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        if "profile" in report[name]:
            report[name]["profile"] = [round(v, 4) for v in report[name]["profile"]]
    print(json.dumps(report, indent=1))
