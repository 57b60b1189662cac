"""The rehearsal's node provider: Ray's fake multi-node provider, each worker node in a temp dir of its own.

Ray's ``FakeMultiNodeProvider`` starts every worker raylet in the head's temp dir, so all nodes share one
session directory, and with it one ``runtime_resources/``: a worker node's runtime-env agent that deletes a
job's unpacked working dir when its last task there ends removes the very directory the job's driver runs
in on the head (seen: the driver's next ``os.getcwd()`` failed with ``FileNotFoundError``). Real nodes never
share a disk that way. Here each worker node gets ``<temp_root>/n<i>`` (``provider.temp_root`` in the
autoscaling config), as separate machines would. Loaded by the head's autoscaler as an external provider
(``provider: {type: external, module: fleet_provider.SeparateTempDirProvider}``; tests/fleet on PYTHONPATH).
"""

from __future__ import annotations

import itertools
import os

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateTempDirProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._temp_root = provider_config["temp_root"]
        self._counter = itertools.count(1)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        temp_dir = os.path.join(self._temp_root, f"n{next(self._counter)}")
        original = parameter.RayParams

        def ray_params(*args, **kwargs):  # the parent builds RayParams without a temp_dir: add ours
            return original(*args, **{**kwargs, "temp_dir": temp_dir})

        with self.lock:  # the parent takes the same (reentrant) lock around its launch
            parameter.RayParams = ray_params
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = original
