"""Ray as the optional distributed backend of eval.py, analysis.py and bench/calibration_draws.py.

Nothing in this package imports ray at module level: the scripts import it only with
--ray_address, and without the flag Ray is never imported.

* cluster.py: `connect` (start a local cluster or join one, with a fast reachability check),
  `run_tasks` / `run_on_actors` (independent work units, results as they finish, a progress
  bar over finished tasks).
* evaluation.py: eval.py's images sharded over workers, one inference session per worker,
  detections scored once on the driver by the validator.
* analysis.py: analysis.py's per-conv measurements as tasks; the driver keeps the checkpoint.
"""
from .cluster import (LOCAL, RAY_PIN, Cluster, TaskFailed, add_ray_flags, check_flags,
                      check_reachable, connect, put, run_on_actors, run_tasks)

__all__ = ["Cluster", "LOCAL", "RAY_PIN", "TaskFailed", "add_ray_flags", "check_flags",
           "check_reachable", "connect", "put", "run_on_actors", "run_tasks"]
