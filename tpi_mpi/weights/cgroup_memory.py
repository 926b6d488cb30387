"""What this process's memory cgroup says: its limit, current use and peak (cgroup v1 or v2).

Apart from the memory plan so that the config (which reads the limit for memory.budget=cgroup) and the plan
(which uses all three) both import it without importing each other."""

from __future__ import annotations

from typing import Any


def _cgroup_read(v1_name: str, v2_name: str, proc_cgroup: str, root: str) -> dict[str, Any] | None:
    """A memory file of this process's memory cgroup: v1 (`root`/memory/PATH/v1_name) or v2
    (`root`/PATH/v2_name, or under `root`/unified in hybrid mounts). None when there is none readable or
    the process is in the root cgroup."""
    try:
        lines = open(proc_cgroup).read().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if path == "/":
            continue
        if "memory" in controllers.split(","):
            candidates = [(f"{root}/memory{path}/{v1_name}", "v1")]
        elif hid == "0" and controllers == "":
            candidates = [(f"{root}{path}/{v2_name}", "v2"), (f"{root}/unified{path}/{v2_name}", "v2")]
        else:
            continue
        for file, version in candidates:
            try:
                text = open(file).read().strip()
            except OSError:
                continue
            value = None if text == "max" or not text.isdigit() else int(text)
            return {"cgroup": path, "version": version, "value": value, "text": text}
    return None


def cgroup_memory_peak(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> dict[str, Any] | None:
    """Peak memory use of this process's memory cgroup (v1 memory.max_usage_in_bytes, v2 memory.peak)."""
    found = _cgroup_read("memory.max_usage_in_bytes", "memory.peak", proc_cgroup, root)
    return None if found is None else {"cgroup": found["cgroup"], "peak_bytes": found["value"]}


def cgroup_memory_usage(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's memory cgroup's working set: what it is charged (v1 memory.usage_in_bytes, v2
    memory.current) less its inactive file pages, which the kernel reclaims before it would kill (the
    library pages this process happened to read first are charged to it; how many depends on what was
    in the page cache already, so counting them made the overhead vary by ~100 MB from run to run)."""
    found = _cgroup_read("memory.usage_in_bytes", "memory.current", proc_cgroup, root)
    if found is None or found["value"] is None:
        return None
    stat = _cgroup_read("memory.stat", "memory.stat", proc_cgroup, root)
    fields = dict(line.split() for line in stat["text"].splitlines() if len(line.split()) == 2) if stat else {}
    inactive = int(fields.get("total_inactive_file") or fields.get("inactive_file") or 0)
    return max(0, int(found["value"]) - inactive)


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's memory cgroup, or None (none, or unlimited)."""
    found = _cgroup_read("memory.limit_in_bytes", "memory.max", proc_cgroup, root)
    if found is None or found["value"] is None or found["value"] >= 1 << 60:  # v1 writes "no limit" as ~2^63
        return None
    return int(found["value"])
