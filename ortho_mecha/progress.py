"""Progress reporting: the dict callbacks long work calls, shown as a tqdm bar on a terminal, and the one-line
account of a finished analysis pass."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm


class TqdmProgress:
    """A context manager whose ``update(dict)`` drives a tqdm bar from ``fraction`` (and shows files, keys,
    signal SVDs and bytes read); with ``messages``, each ``message`` (what is being done: "merging alpha 0.5")
    replaces the description."""

    def __init__(self, description: str, total: int = 1000, messages: bool = False) -> None:
        self.total, self.messages = total, messages
        self.bar = tqdm(total=total, desc=description, unit="‰", disable=not sys.stderr.isatty(), leave=False)

    def update(self, info: dict) -> None:
        message = info.get("message") if self.messages and not self.bar.disable else None  # (no desc when off)
        if message and message != self.bar.desc:
            self.bar.set_description_str(message)
        target = int(min(max(info.get("fraction", 0.0), 0.0), 1.0) * self.total)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        postfix = {}
        if "files" in info:
            postfix["files"] = info["files"]
        if "keys_total" in info:
            postfix["keys"] = f"{info.get('keys_done', 0)}/{info['keys_total']}"
        if info.get("signal_total"):
            postfix["svd"] = f"{info.get('signal_done', 0)}/{info['signal_total']}"
        if info.get("bytes"):
            postfix["read"] = f"{info['bytes'] / 2**20:.0f} MiB"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def read_text(report: Mapping[str, Any]) -> str:
    """What an analysis report's pass read and how long it took ("7.3 MiB read in 40 ms"), or "from cache"."""
    if not report["bytes_read"]:
        return "from cache"
    read = f"{report['bytes_read'] / 2**20:.1f} MiB read in {duration(report['seconds'])}"
    cached, rows = report.get("cached_files", 0), report.get("cached_rows", 0)
    if not cached:
        return read
    rows_too = f", figures of {counted(rows, 'model')}" if rows else ""
    return f"{read} (Gram of {counted(cached, 'file')}{rows_too} from the cache)"


def duration(seconds: float) -> str:
    """``seconds`` for a person: "3.2 s", or "40 ms" below a tenth of a second (never "0.0 s")."""
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{max(1.0, seconds * 1000):.0f} ms"


def counted(count: int, noun: str) -> str:
    """"1 model", "3 models"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
