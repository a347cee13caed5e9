"""The one question both Ray front doors ask the cluster: does it have GPUs?"""

from __future__ import annotations

import ray


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster (connected to, or started, here) has any GPU."""
    if not ray.is_initialized():
        ray.init()
    return bool(ray.cluster_resources().get("GPU", 0))
