"""py-spy profiles of the Python services during a benchmark's measured interval, and their reading.

``Profiler`` runs one ``py-spy record --pid P --rate 50 --format raw`` per service (collapsed stacks:
one line per distinct stack, ``frame;frame;...;leaf COUNT``, root first), stops them with SIGINT at the
end of the interval, converts each to a speedscope file (open it at speedscope.app or with the
``speedscope`` CLI) and summarises it: the top functions by *own* samples (the stack's leaf frame,
i.e. where the interpreter actually was), by *inclusive* samples (the function is anywhere on the
stack; Postbus's own functions only, so the list is not the event loop's frames), and own samples
per top-level package, and own samples charged to the innermost Postbus function on the stack (library
time counted for the Postbus code that called it; entry points such as ``serve`` or ``run_worker``,
on most stacks, are skipped; stacks without one, e.g. aiokafka's background sender, are named by their
innermost library frame outside the event loop). Idle threads are not sampled (py-spy's default), so
the samples of a service approximate its busy (CPU) time; py-spy's ``--native`` adds C frames.

Re-read a recorded file:  python bench/pyspy.py DIR/sender.txt [--top 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

Stack = tuple[tuple[str, ...], int]
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def parse_collapsed(text: str) -> list[Stack]:
    stacks: list[Stack] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks.append((tuple(frames.split(";")), int(count)))
    return stacks


def split_frame(frame: str) -> tuple[str, str, int | None]:
    """``'send (aiokafka/producer/producer.py:431)'`` -> (name, file, line)."""
    m = _FRAME.match(frame)
    if not m:
        return frame, "", None
    return m["name"], m["file"], int(m["line"]) if m["line"] else None


def function_key(frame: str) -> str:
    """The function without its line number: ``send (aiokafka/producer/producer.py)``."""
    name, file, _ = split_frame(frame)
    return f"{name} ({file})" if file else name


def package_of(frame: str) -> str:
    _, file, _ = split_frame(frame)
    if not file:
        return "<native>"
    parts = Path(file).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    elif len(parts) > 1 and parts[0] == "/":
        return file  # an absolute path py-spy did not shorten
    top = parts[0] if parts else file
    if top == "services" and len(parts) > 2:
        return "/".join(parts[:2])  # services/sender, services/common, ...
    return top.removesuffix(".py")


def _project_frame(frame: str) -> bool:
    """A frame of Postbus's own code (services/...), not a module's top level."""
    name, file, _ = split_frame(frame)
    return file.startswith("services/") and name != "<module>" and not file.endswith("__main__.py")


_PLUMBING = {"asyncio", "selectors", "threading", "concurrent", "runpy", "<native>", "<frozen runpy>", "mode",
             "uvicorn", "_weakrefset", "contextlib"}


def _library_caller(frames: tuple[str, ...]) -> str:
    """The innermost frame outside the event loop plumbing: which library the time went to."""
    for f in reversed(frames):
        if package_of(f) not in _PLUMBING and not split_frame(f)[1].startswith("services/"):
            return function_key(f)
    return "event loop / thread plumbing"


def summarize(stacks: list[Stack], top: int = 10) -> dict:
    total = sum(c for _, c in stacks)
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkgs: Counter[str] = Counter()
    charged: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[function_key(frames[-1])] += count
        pkgs[package_of(frames[-1])] += count
        for key in {function_key(f) for f in frames if _project_frame(f)}:
            incl[key] += count
    # entry points (main, serve, run_worker) are on most stacks: time is charged past them
    entry = {k for k, v in incl.items() if v > total / 2}
    for frames, count in stacks:
        if not frames:
            continue
        inner = next((f for f in reversed(frames) if _project_frame(f) and function_key(f) not in entry), None)
        charged[function_key(inner) if inner else f"(library) {_library_caller(frames)}"] += count

    def rows(counter: Counter[str]) -> list[dict]:
        return [{"function": k, "samples": v, "pct": round(100 * v / total, 1) if total else 0.0}
                for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "top_own": rows(own),
        "top_inclusive": rows(incl),
        "charged_to_postbus": rows(charged),
        "own_by_package": [{"package": k, "samples": v, "pct": round(100 * v / total, 1) if total else 0.0}
                           for k, v in pkgs.most_common(top)],
    }


def to_speedscope(stacks: list[Stack], name: str) -> dict:
    index: dict[str, int] = {}
    frames: list[dict] = []
    samples: list[list[int]] = []
    weights: list[int] = []
    for stack, count in stacks:
        ids = []
        for f in stack:
            if f not in index:
                fname, file, line = split_frame(f)
                index[f] = len(frames)
                frames.append({"name": fname, **({"file": file} if file else {}),
                               **({"line": line} if line is not None else {})})
            ids.append(index[f])
        samples.append(ids)
        weights.append(count)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "name": name,
        "exporter": "postbus bench/pyspy.py (from py-spy --format raw)",
        "shared": {"frames": frames},
        "profiles": [{"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                      "endValue": sum(weights), "samples": samples, "weights": weights}],
    }


def format_summary(name: str, summary: dict, rate: int) -> str:
    n = summary["samples"]
    lines = [f"--- {name}: {n} samples ({n / rate:.1f} s busy at {rate} Hz) ---", "  top own (leaf) samples:"]
    for r in summary["top_own"]:
        lines.append(f"    {r['pct']:5.1f}% {r['samples']:6d}  {r['function']}")
    lines.append("  own samples by package: " + ", ".join(
        f"{r['package']} {r['pct']}%" for r in summary["own_by_package"]))
    lines.append("  own samples charged to the innermost Postbus function on the stack (else the library):")
    for r in summary.get("charged_to_postbus", []):
        lines.append(f"    {r['pct']:5.1f}% {r['samples']:6d}  {r['function']}")
    lines.append("  top inclusive (Postbus code, callees included):")
    for r in summary["top_inclusive"]:
        lines.append(f"    {r['pct']:5.1f}% {r['samples']:6d}  {r['function']}")
    return "\n".join(lines)


class Profiler:
    def __init__(self, out_dir: Path, rate: int = 50, native: bool = False, blocking: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.rate = rate
        self.native = native
        # --nonblocking by default: py-spy then reads each thread's OS state and leaves idle threads out
        # (a thread pool worker waiting on its queue, a selector in epoll); when it pauses the process
        # for each sample (its default) those idle threads are sampled as if busy
        self.blocking = blocking
        self.procs: dict[str, subprocess.Popen] = {}
        binary = pyspy_binary()
        if binary is None:
            raise SystemExit("py-spy not found: pip install -e '.[bench]' (or `make bench`)")
        self.binary = binary

    def start(self, pids: dict[str, int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            cmd = [self.binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                   "-o", str(self.out_dir / f"{name}.txt")]
            if self.native:
                cmd.append("--native")
            if not self.blocking:
                cmd.append("--nonblocking")
            log = (self.out_dir / f"{name}.pyspy.log").open("wb")
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def pids(self) -> dict[str, int]:
        return {f"py-spy:{n}": p.pid for n, p in self.procs.items()}

    def stop(self, top: int = 10) -> dict[str, dict]:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGINT)
        out: dict[str, dict] = {}
        for name, p in self.procs.items():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            raw = self.out_dir / f"{name}.txt"
            if not raw.exists():
                tail = (self.out_dir / f"{name}.pyspy.log").read_text(errors="replace")[-500:]
                out[name] = {"error": f"py-spy wrote no profile (exit {p.returncode}): {tail}"}
                continue
            stacks = parse_collapsed(raw.read_text(errors="replace"))
            (self.out_dir / f"{name}.json").write_text(json.dumps(to_speedscope(stacks, name)))
            out[name] = summarize(stacks, top)
        (self.out_dir / "summary.json").write_text(json.dumps(out, indent=2))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="py-spy --format raw files")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--rate", type=int, default=50, help="the sampling rate it was recorded at")
    args = ap.parse_args()
    for f in args.files:
        print(format_summary(f.stem, summarize(parse_collapsed(f.read_text(errors="replace")), args.top), args.rate))


if __name__ == "__main__":
    main()
