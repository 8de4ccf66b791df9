"""Run as a fresh process: start the embedded cluster as `r1pipe run` does, run a Ray Data pass
and a task on it, then print every TCP listener of this process and its descendants as JSON
(tests/cluster/test_security.py judges them).

    .venv/bin/python -m tests.listeners_probe
"""
import json
import os
from pathlib import Path

import psutil
import ray

from cluster.session import RaySettings, connect, run_task


def _square(x: int) -> int:
    return x * x


def main() -> None:
    connect(RaySettings(num_cpus=2))
    assert run_task(_square, 3) == 9
    assert ray.data.range(8).map(lambda r: {"id": r["id"] * 2}).count() == 8
    from ray.core.generated.common_pb2 import Address
    driver = Address()
    driver.ParseFromString(ray._private.worker.global_worker.core_worker.get_owner_address(ray.put(0)))
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    listeners = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                proc = psutil.Process(c.pid)
                listeners.append({"pid": c.pid, "name": proc.name(), "cmdline": proc.cmdline()[:3],
                                  "ip": c.laddr.ip, "port": c.laddr.port})
            except psutil.NoSuchProcess:
                continue
    print(json.dumps({"driver_pid": me.pid, "driver_port": driver.port, "ray_package": str(Path(ray.__file__).parent),
                      "listeners": listeners}))
    ray.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
