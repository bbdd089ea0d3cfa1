"""CPU time of processes and of the machine, from /proc (Linux).

``process_cpu_s(pid)`` is the process's own user + system time (``/proc/<pid>/stat`` fields 14 and 15,
utime + stime, all its threads, children excluded), in seconds. ``machine_busy_s()`` is the busy time
of all CPUs (``/proc/stat``: everything but idle and iowait), so a run can tell how much of the
machine went to processes it does not measure (other engineers' tests on a shared box).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def process_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (children excluded). Raises OSError when it is gone."""
    f = _stat_fields(pid)  # f[0] is field 3 (state): utime is field 14 -> f[11], stime field 15 -> f[12]
    return (int(f[11]) + int(f[12])) / CLK_TCK


def process_group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (the services run in their own session/group)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[2]) == pgid:  # field 5: pgrp
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()
    ticks = [int(x) for x in parts[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # guest time is already counted in user
    return (sum(ticks) - idle - guest) / CLK_TCK


@dataclass
class CpuSnapshot:
    per_process: dict[str, float]
    machine_busy: float
    missing: list[str] = field(default_factory=list)  # processes that had exited


def snapshot(pids: dict[str, int]) -> CpuSnapshot:
    per: dict[str, float] = {}
    missing: list[str] = []
    for name, pid in pids.items():
        try:
            per[name] = process_cpu_s(pid)
        except OSError:
            missing.append(name)
    return CpuSnapshot(per, machine_busy_s(), missing)


def delta(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    return {name: b.per_process[name] - a.per_process[name] for name in a.per_process if name in b.per_process}
